"""STDiT3: official state dict, golden parity, text masks, bf16 option, attention, loading."""

from __future__ import annotations

import json
import math

import pytest
import torch

from opensora_sdk.configs import STDIT3_PRESETS, STDiT3Config, config_from_dict, preset
from opensora_sdk.loading import CheckpointError, save_safetensors_atomic
from opensora_sdk.models import STDiT3
from opensora_sdk.models.attention import attention, available_backends
from opensora_sdk.models.layers import RotaryEmbedding

TOL = 1e-5
# Golden tolerances. The output holds to 1e-5 on CPUs (2e-6 on the reference CPU, 9e-6 on
# another Xeon with torch 2.11); float32 GEMMs on a GPU (TF32 off) accumulate in another order
# and reach 1.6e-5. The intermediate activations are for localising a mismatch; the residual
# stream grows across blocks, so they get a looser bound.
GOLDEN_OUT_TOL = {"cpu": 1e-5, "cuda": 5e-5}
GOLDEN_MID_TOL = 5e-5


def tiny(**overrides) -> STDiT3Config:
    cfg = preset("STDiT3-tiny", STDIT3_PRESETS)
    for key, value in overrides.items():
        setattr(cfg, key, value)
    return cfg


def make_inputs(cfg: STDiT3Config, B=2, T=3, H=5, W=7, lens=(7, 16), seed=0):
    g = torch.Generator().manual_seed(seed)
    L = cfg.model_max_length
    mask = torch.zeros(B, L, dtype=torch.long)
    for i, n in enumerate(lens):
        mask[i, :n] = 1
    return dict(
        x=torch.randn(B, cfg.in_channels, T, H, W, generator=g),
        timestep=torch.tensor([873.5, 120.25][:B]),
        y=torch.randn(B, 1, L, cfg.caption_channels, generator=g),
        mask=mask,
        fps=torch.full((B,), 24.0),
        height=torch.full((B,), 240.0),
        width=torch.full((B,), 426.0),
    )


def model_for(cfg: STDiT3Config, seed=0, **kw) -> STDiT3:
    torch.manual_seed(seed)
    model = STDiT3(cfg, **kw).eval()
    with torch.no_grad():  # break the identity init of temporal blocks so every path matters
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.02)
    return model


# --------------------------------------------------------------------------------------------
# State dict
# --------------------------------------------------------------------------------------------


def test_xl2_state_dict_equals_official_schema(reference):
    schema = json.loads((reference / "stdit3-xl2.schema.json").read_text())
    with torch.device("meta"):
        model = STDiT3(preset("STDiT3-XL/2", STDIT3_PRESETS))
    sd = model.state_dict()
    assert list(sd) == list(schema)
    assert {k: list(v.shape) for k, v in sd.items()} == {k: v["shape"] for k, v in schema.items()}
    assert sum(p.numel() for p in model.parameters()) == 1_207_643_972
    assert [n for n, _ in model.named_buffers()] == ["y_embedder.y_embedding"]
    assert not any(m._non_persistent_buffers_set for m in model.modules())
    assert model.rope.freqs.shape == (36,) and not model.rope.freqs.requires_grad


# --------------------------------------------------------------------------------------------
# Golden parity
# --------------------------------------------------------------------------------------------


def golden_model(bundle) -> STDiT3:
    cfg = config_from_dict(STDiT3Config, bundle.meta["config"])
    with torch.device("meta"):
        model = STDiT3(cfg)
    model.load_state_dict(bundle.with_prefix("sd."), strict=True, assign=True)
    return model.eval()


def golden_call(model, bundle, device="cpu", **extra):
    inp = {k: v.to(device) for k, v in bundle.with_prefix("in.").items()}
    kw = dict(mask=inp.get("mask"), x_mask=inp.get("x_mask"), fps=inp["fps"], height=inp["height"], width=inp["width"])
    return model(inp["x"], inp["timestep"], inp["y"], **{**kw, **extra})


def record_hooks(model):
    """Forward-hook outputs keyed like the bundles' mid.* (a '.callK' suffix when called twice)."""
    seen: dict[str, list] = {}
    names = ["x_embedder", "pos_embed", "t_embedder", "fps_embedder", "t_block", "y_embedder", "final_layer"]
    names += [f"{kind}_blocks.{i}" for kind in ("spatial", "temporal") for i in range(model.config.depth)]
    for name in names:
        model.get_submodule(name).register_forward_hook(lambda m, i, o, name=name: seen.setdefault(name, []).append(o))
    return seen


CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=CUDA)])
@pytest.mark.parametrize("name", ["stdit3_a", "stdit3_b"])
def test_golden_forward_and_intermediates(golden, name, device):
    bundle = golden(name)
    model = golden_model(bundle).to(device)
    seen = record_hooks(model)
    extra = dict(num_frames=torch.tensor([17.0, 17.0]), ar=torch.tensor([0.56, 0.56]))
    precision = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")  # no TF32 on GPUs
    try:
        with torch.no_grad(), torch.backends.cudnn.flags(enabled=True, allow_tf32=False):
            out = golden_call(model, bundle, device=device, **extra)
    finally:
        torch.set_float32_matmul_precision(precision)
    assert out.dtype == torch.float32 and out.shape == bundle["out"].shape
    torch.testing.assert_close(out.cpu(), bundle["out"], atol=GOLDEN_OUT_TOL[device], rtol=0)
    mids = [k for k in bundle.tensors if k.startswith("mid.")]
    assert len(mids) >= 11
    for key in mids:
        name, _, call = key[4:].partition(".call")
        got = seen[name][int(call or 0)].cpu()
        torch.testing.assert_close(got, bundle[key], atol=GOLDEN_MID_TOL, rtol=0, msg=lambda m: f"{key}: {m}")


def test_golden_b_uses_condition_frames(golden):
    bundle = golden("stdit3_b")
    model = golden_model(bundle)
    with torch.no_grad():
        without = golden_call(model, bundle, x_mask=None)
    assert (without - bundle["out"]).abs().max() > 1e-3  # the t=0 path really changes the output


# --------------------------------------------------------------------------------------------
# Text masks and classifier-free guidance
# --------------------------------------------------------------------------------------------


def test_cfg_mask_with_fewer_rows_is_tiled_and_null_rows_use_prompt_mask():
    cfg = tiny()
    model = model_for(cfg)
    a = make_inputs(cfg)
    null = model.y_embedder.y_embedding[None, None].expand(2, 1, -1, -1)
    cfg_in = dict(a, x=torch.cat([a["x"]] * 2), timestep=torch.cat([a["timestep"]] * 2),
                  y=torch.cat([a["y"], null]), fps=a["fps"][:1])
    with torch.no_grad():
        tiled = model(**cfg_in)  # mask has 2 rows for 4 latent rows
        explicit = model(**dict(cfg_in, mask=a["mask"].repeat(2, 1)))
        cond = model(**a)
    torch.testing.assert_close(tiled, explicit, atol=0, rtol=0)
    torch.testing.assert_close(tiled[:2], cond, atol=TOL, rtol=0)


def test_mask_with_as_many_rows_as_x_is_used_row_by_row():
    cfg = tiny()
    model = model_for(cfg)
    a = make_inputs(cfg, lens=(7, 16))
    with torch.no_grad():
        both = model(**dict(a, mask=a["mask"]))
        row1_short = model(**dict(a, mask=torch.stack([a["mask"][0], a["mask"][0]])))
    torch.testing.assert_close(both[0], row1_short[0], atol=TOL, rtol=0)
    assert (both[1] - row1_short[1]).abs().max() > 1e-4


def test_text_padded_to_longest_row_and_mask_holes_select_tokens():
    cfg = tiny()
    model = model_for(cfg)
    a = make_inputs(cfg, lens=(3, 5))
    tokens, valid = model.encode_text(a["y"], a["mask"])
    assert tokens.shape[1] == 5 and valid.tolist() == [[True] * 3 + [False] * 2, [True] * 5]
    # the same three tokens spread over the sequence give the same output (no text positions)
    spread_y, spread_mask = a["y"].clone(), a["mask"].clone()
    spread_mask[0] = 0
    spread_mask[0, [2, 9, 14]] = 1
    spread_y[0, 0, [2, 9, 14]] = a["y"][0, 0, :3]
    with torch.no_grad():
        torch.testing.assert_close(model(**dict(a, y=spread_y, mask=spread_mask)), model(**a), atol=TOL, rtol=0)


def test_row_without_text_tokens_is_an_error_naming_mask():
    cfg = tiny()
    a = make_inputs(cfg, lens=(0, 4))
    with pytest.raises(ValueError, match=r"mask rows \[0\]"):
        model_for(cfg)(**a)


def test_skip_y_embedder_takes_projected_packed_text():
    cfg = tiny()
    model = model_for(cfg)
    a = make_inputs(cfg, lens=(3, 5))
    projected = model.y_embedder(a["y"], train=False)[:, 0]  # [B, L, C]
    packed = torch.cat([projected[0, :3], projected[1, :5]])[None]  # [1, 8, C]
    skip = model_for(tiny(skip_y_embedder=True))
    skip.load_state_dict(model.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(skip(**dict(a, y=packed, mask=[3, 5])), model(**a), atol=TOL, rtol=0)


# --------------------------------------------------------------------------------------------
# Official bf16 quantisation option
# --------------------------------------------------------------------------------------------


def test_bf16_option_quantizes_timestep_and_default_does_not():
    cfg = tiny()
    model = model_for(cfg)
    a = make_inputs(cfg)
    at = lambda t: dict(a, timestep=torch.tensor([t, 431.0]))  # noqa: E731
    with torch.no_grad():
        assert (model(**at(985.96)) - model(**at(984.0))).abs().max() > 1e-5
        model.official_bf16_quantization = True
        torch.testing.assert_close(model(**at(985.96)), model(**at(984.0)), atol=0, rtol=0)
        # width 854 -> 856 in bf16 (spacing 4 in [512, 1024)); 426 is exact
        torch.testing.assert_close(model(**dict(a, width=854.0)), model(**dict(a, width=856.0)), atol=0, rtol=0)


def test_bf16_option_quantizes_frequency_tables():
    rope = RotaryEmbedding(72)
    cos32, _ = rope.cos_sin(30, device=torch.device("cpu"))
    cos16, _ = rope.cos_sin(30, device=torch.device("cpu"), quantize_bf16=True)
    assert (cos32 - cos16).abs().max() > 0.05  # the official bf16 angles differ visibly at T=30
    model = STDiT3(tiny())
    pos = lambda q: model.pos_embed(8, 12, scale=1.5, base_size=10, device="cpu", dtype=torch.float32, quantize_bf16=q)  # noqa: E731
    assert (pos(True) - pos(False)).abs().max() > 1e-4


# --------------------------------------------------------------------------------------------
# Attention backends, gradient checkpointing, caption dropout
# --------------------------------------------------------------------------------------------


def naive_attention(q, k, v, key_padding_mask=None):
    scores = (q.double() @ k.double().transpose(-1, -2)) / math.sqrt(q.shape[-1])
    if key_padding_mask is not None:
        scores = scores.masked_fill(~key_padding_mask[:, None, None, :], float("-inf"))
    return (scores.softmax(-1) @ v.double()).to(q.dtype)


def test_sdpa_equals_naive_attention_with_and_without_key_mask():
    q, k, v = torch.randn(2, 3, 11, 8), torch.randn(2, 3, 6, 8), torch.randn(2, 3, 6, 8)
    keep = torch.tensor([[True] * 4 + [False] * 2, [True] * 6])
    torch.testing.assert_close(attention(q, k, v), naive_attention(q, k, v), atol=1e-6, rtol=0)
    torch.testing.assert_close(attention(q, k, v, key_padding_mask=keep), naive_attention(q, k, v, keep), atol=1e-6, rtol=0)


@pytest.mark.parametrize("backend", ["flash", "xformers"])
def test_uninstalled_backend_is_a_clear_error(backend):
    if backend in available_backends():
        pytest.skip(f"{backend} is installed here")
    q = torch.randn(1, 1, 2, 4)
    with pytest.raises(ImportError, match=f"backend '{backend}' needs"):
        attention(q, q, q, backend=backend)
    with pytest.raises(ImportError, match="use backend='sdpa'"):
        STDiT3(tiny()).set_attention_backend(backend)
    with pytest.raises(ValueError, match="unknown attention backend"):
        attention(q, q, q, backend="fast")


def test_gradient_checkpointing_gives_the_same_gradients():
    cfg = tiny()
    model = model_for(cfg)
    a = make_inputs(cfg)

    def grads():
        model.zero_grad()
        model(**a).square().mean().backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    plain = grads()
    model.enable_gradient_checkpointing()
    assert model.gradient_checkpointing
    checked = grads()
    assert plain.keys() == checked.keys() and len(plain) > 50
    for name in plain:
        torch.testing.assert_close(checked[name], plain[name], atol=1e-6, rtol=1e-5)


def test_caption_dropout_train_only_reproducible_and_overridable():
    cfg = tiny(class_dropout_prob=0.5)
    model = model_for(cfg)
    a = make_inputs(cfg, B=2)
    y = torch.randn(8, 1, cfg.model_max_length, cfg.caption_channels)
    emb = model.y_embedder
    null = emb.y_proj(emb.y_embedding)
    drawn = lambda seed: emb(y, train=True, generator=torch.Generator().manual_seed(seed))  # noqa: E731
    dropped = [torch.equal(row[0], null) for row in drawn(3)]
    assert 0 < sum(dropped) < 8  # p = 0.5 over 8 rows with this seed
    torch.testing.assert_close(drawn(3), drawn(3), atol=0, rtol=0)
    torch.testing.assert_close(emb(y, train=False), emb.y_proj(y), atol=0, rtol=0)
    forced = emb(y, train=False, force_drop_ids=torch.tensor([1, 0, 0, 0, 0, 0, 0, 1]))
    torch.testing.assert_close(forced[0, 0], null, atol=0, rtol=0)
    torch.testing.assert_close(forced[1], emb.y_proj(y[1]), atol=0, rtol=0)
    # in the model: train mode draws from the generator, the text mask is left as it is
    model.train()
    with torch.no_grad():
        first = model(**a, generator=torch.Generator().manual_seed(1))
        again = model(**a, generator=torch.Generator().manual_seed(1))
        both_null = model(**a, force_drop_ids=torch.tensor([1, 1]))
        model.eval()
        null_eval = model(**dict(a, y=emb.y_embedding[None, None].expand(2, 1, -1, -1)))
    torch.testing.assert_close(first, again, atol=0, rtol=0)
    torch.testing.assert_close(both_null, null_eval, atol=TOL, rtol=0)


# --------------------------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "change, pattern",
    [
        (lambda a: dict(a, x=a["x"][:, :3]), r"x must be \[B, 4, T, H, W\].*got \(2, 3, 3, 5, 7\)"),
        (lambda a: dict(a, y=a["y"][:1]), r"y must be .*batch of x.*got \(1, 1, 16, 32\)"),
        (lambda a: dict(a, mask=a["mask"][:, :10]), r"mask must be \[B', L\] with L=16.*got \(2, 10\)"),
        (lambda a: dict(a, x_mask=torch.ones(2, 4, dtype=torch.bool)), r"x_mask must be \[B, T_p\] = \[2, 3\].*got \(2, 4\)"),
        (lambda a: dict(a, timestep=torch.tensor([float("nan"), 1.0])), r"timestep must be finite, got \[nan, 1.0\]"),
        (lambda a: dict(a, timestep=torch.ones(3)), r"timestep must be \[B\]=\[2\].*got shape \(3,\)"),
        (lambda a: dict(a, fps=None), r"fps is required"),
        (lambda a: dict(a, cond=1), r"unexpected keyword arguments \['cond'\]"),
    ],
)
def test_bad_inputs_raise_clear_errors(change, pattern):
    cfg = tiny()
    model = model_for(cfg)
    with pytest.raises((ValueError, TypeError), match=pattern):
        model(**change(make_inputs(cfg)))


def test_sizes_needing_padding_are_cropped_back():
    cfg = tiny(patch_size=(2, 2, 2))
    model = model_for(cfg)
    a = make_inputs(cfg, T=3, H=5, W=3)
    with torch.no_grad():
        out = model(**dict(a, x_mask=torch.tensor([[False, True], [True, True]])))
    assert out.shape == (2, 8, 3, 5, 3) and torch.isfinite(out).all()


# --------------------------------------------------------------------------------------------
# Initialisation and loading
# --------------------------------------------------------------------------------------------


def test_initialize_weights_makes_temporal_blocks_identity():
    model = STDiT3(tiny())
    block = model.temporal_blocks[0]
    for w in (block.attn.proj.weight, block.cross_attn.proj.weight, block.mlp.fc2.weight, model.fps_embedder.mlp[2].weight):
        assert not w.any()
    bound = math.sqrt(6 / sum(model.t_block[1].weight.shape))
    assert model.t_block[1].weight.abs().max() <= bound and not model.t_block[1].bias.any()
    x = torch.randn(1, 6, 64)
    y = torch.randn(1, 4, 64)
    t_mlp = torch.randn(1, 6 * 64)
    torch.testing.assert_close(block(x, y, None, t_mlp, 3, 2), x, atol=0, rtol=0)


def test_save_pretrained_round_trip_and_bf16_load(tmp_path):
    cfg = tiny()
    model = model_for(cfg)
    model.save_pretrained(tmp_path / "hf")
    written = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert written["model_type"] == "STDiT3" and written["hidden_size"] == 64 and written["patch_size"] == [1, 2, 2]
    loaded = STDiT3.from_pretrained(tmp_path / "hf")
    assert not loaded.training
    a = make_inputs(cfg)
    with torch.no_grad():
        torch.testing.assert_close(loaded(**a), model(**a), atol=0, rtol=0)
    half = STDiT3.from_pretrained(tmp_path / "hf", dtype=torch.bfloat16)
    assert half.x_embedder.proj.weight.dtype == torch.bfloat16 and half.rope.freqs.dtype == torch.float32
    with torch.no_grad():
        out = half(**a)
    assert out.dtype == torch.float32 and (out - model(**a)).abs().max() < 0.5


def test_bare_files_infer_config_and_unwrap_training_checkpoints(tmp_path):
    cfg = tiny(hidden_size=96, num_heads=4, qk_norm=True, mlp_ratio=2.0, pred_sigma=False)
    model = model_for(cfg)
    sd = model.state_dict()
    save_safetensors_atomic(sd, tmp_path / "bare" / "weights.safetensors")
    from_bare = STDiT3.from_pretrained(tmp_path / "bare" / "weights.safetensors")
    for field in ("hidden_size", "num_heads", "depth", "mlp_ratio", "pred_sigma", "caption_channels", "model_max_length"):
        assert getattr(from_bare.config, field) == getattr(cfg, field), field
    (tmp_path / "pth").mkdir()
    ema = {f"module.{k}": v for k, v in sd.items()}
    torch.save({"ema": ema, "model": {k: torch.zeros_like(v) for k, v in sd.items()}}, tmp_path / "pth" / "ckpt.pth")
    from_pth = STDiT3.from_pretrained(tmp_path / "pth" / "ckpt.pth")
    for k, v in from_pth.state_dict().items():
        torch.testing.assert_close(v, sd[k], atol=0, rtol=0)


def test_strict_load_reports_missing_keys_and_hub_offline_is_clear(tmp_path, monkeypatch):
    sd = model_for(tiny()).state_dict()
    del sd["final_layer.linear.bias"]
    save_safetensors_atomic(sd, tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"missing from the checkpoint \(1\):\n    final_layer.linear.bias"):
        STDiT3.from_pretrained(tmp_path / "model.safetensors", config=tiny())
    with pytest.warns(UserWarning, match="final_layer.linear.bias"):
        partial = STDiT3.from_pretrained(tmp_path / "model.safetensors", config=tiny(), strict=False)
    assert not partial.final_layer.linear.bias.is_meta
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(CheckpointError, match="huggingface-cli download"):
        STDiT3.from_pretrained("no-such-org/no-such-stdit3", local_files_only=True)
