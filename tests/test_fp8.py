"""fp8 weight storage: quantisation error, a forward close to bf16, files round-trip, the
pipeline switch."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from opensora_sdk import fp8
from opensora_sdk.loading import CheckpointError, save_safetensors_atomic
from opensora_sdk.models import STDiT3
from opensora_sdk.pipeline import OpenSoraPipeline
from test_stdit3 import make_inputs, model_for, tiny

# One STDiT3 forward with fp8 weights against the same model in bf16 (both computing in bf16),
# relative to the output's magnitude. Measured on the tiny config: max 0.019, RMS 0.017 per
# channel (bf16 itself is 0.013 from float32). e4m3 keeps 3 mantissa bits: each weight is
# within 1/16 of itself, errors average out over the dot products.
MAX_REL_ERR = 0.06
RMS_REL_ERR = 0.04


def test_quantize_weight_per_channel_and_per_tensor():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(48, 40, generator=g) * torch.logspace(-5, 1, 48)[:, None]  # rows 6 decades apart
    for per_channel in (True, False):
        q, scale = fp8.quantize_weight(w, per_channel)
        assert q.dtype == torch.float8_e4m3fn and scale.dtype == torch.float32
        assert scale.shape == ((48,) if per_channel else ())
        deq = q.float() * (scale[:, None] if per_channel else scale)
        step = (scale[:, None] if per_channel else scale) * 2.0**-9  # e4m3's subnormal spacing
        assert bool((deq - w).abs().le(w.abs() / 16 + step).all())
    # per-channel scales keep small rows precise, one scale for the tensor does not
    small = slice(0, 8)
    q_c, s_c = fp8.quantize_weight(w, True)
    q_t, s_t = fp8.quantize_weight(w, False)
    err_c = ((q_c.float() * s_c[:, None])[small] - w[small]).norm() / w[small].norm()
    err_t = ((q_t.float() * s_t)[small] - w[small]).norm() / w[small].norm()
    assert err_c < 0.05 < 0.2 < err_t


def test_fp8_linear_matches_its_dequantized_weight_and_survives_casts():
    torch.manual_seed(0)
    linear = nn.Linear(64, 32)
    layer = fp8.FP8Linear.from_linear(linear)
    x = torch.randn(5, 64)
    want = nn.functional.linear(x, layer.dequantized(), linear.bias)
    torch.testing.assert_close(layer(x), want, rtol=1e-5, atol=1e-5)
    layer.to(torch.bfloat16)
    assert layer.weight.dtype == torch.float8_e4m3fn and layer.scale.dtype == torch.float32
    assert layer.bias.dtype == torch.bfloat16 and layer(x.bfloat16()).dtype == torch.bfloat16


@pytest.mark.parametrize("per_channel", [True, False])
def test_stdit3_forward_close_to_bf16(per_channel):
    cfg = tiny()
    model = model_for(cfg).to(torch.bfloat16)
    inputs = make_inputs(cfg)
    q = copy.deepcopy(model)
    names = fp8.quantize_transformer_fp8(q, per_channel=per_channel)
    # the blocks' attention and MLP layers, nothing of the kept embedders / final layer
    assert len(names) == 2 * cfg.depth * 7 and all("blocks." in n for n in names)
    assert isinstance(q.t_block[1], nn.Linear) and isinstance(q.final_layer.linear, nn.Linear)
    assert fp8.weight_bytes(q) < 0.7 * fp8.weight_bytes(model)
    with torch.no_grad():
        ref, out = model(**inputs), q(**inputs)
    err = (out - ref).abs()
    assert 0 < err.max() <= MAX_REL_ERR * ref.abs().max()
    assert err.pow(2).mean().sqrt() <= RMS_REL_ERR * ref.pow(2).mean().sqrt()


def test_save_load_identical_outputs_and_strict_keys(tmp_path):
    cfg = tiny()
    model = model_for(cfg).to(torch.bfloat16)
    fp8.quantize_transformer_fp8(model)
    path = tmp_path / "stdit3_fp8.safetensors"
    fp8.save_fp8(model, path)
    assert fp8.is_fp8_file(path)
    loaded = fp8.load_fp8_transformer(path)
    assert fp8.fp8_layers(loaded) == fp8.fp8_layers(model)
    assert loaded.spatial_blocks[0].attn.qkv.weight.dtype == torch.float8_e4m3fn
    assert loaded.rope.freqs.dtype == torch.float32 and loaded.t_block[1].weight.dtype == torch.bfloat16
    inputs = make_inputs(cfg)
    with torch.no_grad():
        assert torch.equal(loaded(**inputs), model(**inputs))
    # a missing tensor, a plain checkpoint: clear errors
    state = model.state_dict()
    state.pop("spatial_blocks.1.mlp.fc2.scale")
    broken = tmp_path / "broken.safetensors"
    save_safetensors_atomic(state, broken, metadata={fp8.FP8_METADATA_KEY: "float8_e4m3fn", "dtype": "bfloat16"})
    with pytest.raises(CheckpointError, match="fc2.scale"):
        fp8.load_fp8_transformer(broken, config=cfg)
    plain = tmp_path / "plain.safetensors"
    save_safetensors_atomic(model_for(cfg).state_dict(), plain)
    assert not fp8.is_fp8_file(plain)
    with torch.device("meta"):
        fresh = STDiT3(cfg)
    with pytest.raises(CheckpointError, match="not an fp8 file"):
        fp8.load_fp8_into(fresh, plain)
    with pytest.raises(ValueError, match="no fp8 layers"):
        fp8.save_fp8(model_for(cfg), tmp_path / "x.safetensors")


def test_pipeline_fp8_switch_and_fp8_file(tmp_path):
    plain = OpenSoraPipeline.from_preset("tiny-random", seed=0, device="cpu", progress=False)
    pipe = OpenSoraPipeline.from_preset("tiny-random", seed=0, device="cpu", progress=False, fp8=True)
    assert fp8.fp8_layers(pipe.transformer)
    kw = dict(num_frames=17, height=32, width=32, num_steps=2, seed=3, output_type="latent")
    a, b = plain("a boat", **kw).frames, pipe("a boat", **kw).frames
    assert not torch.equal(a, b)
    assert (a - b).pow(2).mean().sqrt() < 0.1 * a.pow(2).mean().sqrt()
    path = tmp_path / "model_fp8.safetensors"
    fp8.save_fp8(pipe.transformer, path)
    again = OpenSoraPipeline.from_pretrained(path, pipe.vae, pipe.text_encoder, device="cpu", progress=False)
    assert torch.equal(again("a boat", **kw).frames, b)
    with pytest.raises(ValueError, match="fp8 scales 'half'"):
        OpenSoraPipeline.from_preset("tiny-random", device="cpu", fp8="half")


def test_text_encoder_fp8_close_and_not_sharing_cache_entries():
    te = OpenSoraPipeline.from_preset("tiny-random", seed=0, device="cpu").text_encoder
    prompts = ["a red ball rolls on the grass", "two birds"]
    want, before = te.encode(prompts).y, te.identity
    names = fp8.quantize_text_encoder_fp8(te, min_weights=0)  # the tiny T5's layers are all small
    assert names and not any("shared" in n or n.endswith(".wo") for n in names)
    got = te.encode(prompts).y
    assert te.identity != before  # the embedding cache keys change with the weights
    assert not torch.equal(got, want)
    assert (got - want).pow(2).mean().sqrt() < 0.1 * want.pow(2).mean().sqrt()


def test_comfy_model_loader_weight_dtype():
    from comfy_nodes.loaders import OpenSoraModelLoader
    from comfy_nodes.types import BUILTIN

    optional = OpenSoraModelLoader.INPUT_TYPES()["optional"]["weight_dtype"]
    assert optional[0] == ["default", "fp8_e4m3fn"] and optional[1]["default"] == "default"
    loaded = OpenSoraModelLoader().load(BUILTIN, "auto", "sdpa", "fp8_e4m3fn")[0]
    plain = OpenSoraModelLoader().load(BUILTIN, "auto", "sdpa")[0]
    assert fp8.fp8_layers(loaded.transformer) and not fp8.fp8_layers(plain.transformer)
    with pytest.raises(ValueError, match="weight_dtype='fp8' is not allowed"):
        OpenSoraModelLoader().load(BUILTIN, "auto", "sdpa", "fp8")
