"""STDiT2 (Open-Sora v1.1): official state dict, golden parity, micro-conditions, loading,
and telling the STDiT families apart by their checkpoint keys."""

from __future__ import annotations

import json
import math

import pytest
import torch

from opensora_sdk.configs import STDIT2_PRESETS, STDiT2Config, config_from_dict, preset
from opensora_sdk.loading import CheckpointError, save_safetensors_atomic
from opensora_sdk.models import STDiT2, STDiT3
from opensora_sdk.models.attention import available_backends
from opensora_sdk.models.stdit2 import detect_stdit_family, is_stdit2_state_dict

TOL = 1e-5
# As for STDiT3: the output holds to 1e-5 on CPUs (float32 GEMMs on a GPU, TF32 off,
# accumulate in another order); intermediate activations get a looser bound.
GOLDEN_OUT_TOL = {"cpu": 1e-5, "cuda": 5e-5}
GOLDEN_MID_TOL = 5e-5


def tiny(**overrides) -> STDiT2Config:
    cfg = preset("STDiT2-tiny", STDIT2_PRESETS)
    for key, value in overrides.items():
        setattr(cfg, key, value)
    return cfg


def make_inputs(cfg: STDiT2Config, B=2, T=3, H=5, W=7, lens=(7, 16), seed=0):
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
        num_frames=torch.tensor([16.0, 32.0][:B]),
        height=torch.tensor([240.0, 360.0][:B]),
        width=torch.tensor([426.0, 640.0][:B]),
        ar=torch.tensor([240 / 426, 360 / 640][:B]),
        fps=torch.tensor([24.0, 8.0][:B]),
    )


def model_for(cfg: STDiT2Config, seed=0) -> STDiT2:
    torch.manual_seed(seed)
    model = STDiT2(cfg).eval()
    with torch.no_grad():  # break the zero init of attn_temp.proj so every path matters
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.02)
    return model


def assert_same_weights(a: torch.nn.Module, b: torch.nn.Module):
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for key in sa:
        torch.testing.assert_close(sa[key], sb[key], atol=0, rtol=0, msg=key)


# --------------------------------------------------------------------------------------------
# State dict
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("build", ["default", "preset"])
def test_xl2_state_dict_equals_official_schema(reference, build):
    schema = json.loads((reference / "stdit2-xl2.schema.json").read_text())
    cfg = STDiT2Config() if build == "default" else preset("STDiT2-XL/2", STDIT2_PRESETS)
    with torch.device("meta"):
        model = STDiT2(cfg)
    sd = model.state_dict()
    assert list(sd) == list(schema)  # keys and order
    assert {k: list(v.shape) for k, v in sd.items()} == {k: v["shape"] for k, v in schema.items()}
    assert sum(p.numel() for p in model.parameters()) == 767_452_100
    assert sum(t.numel() for t in sd.values()) == 768_271_300
    assert [n for n, _ in model.named_buffers()] == ["y_embedder.y_embedding"]
    assert not any(m._non_persistent_buffers_set for m in model.modules())
    assert model.rope.freqs.shape == (36,) and not model.rope.freqs.requires_grad


def test_config_checks_hidden_divisible_by_3_and_rejects_unsupported_fields():
    with pytest.raises(ValueError, match="divisible by 3.*got 64"):
        STDiT2Config(hidden_size=64, num_heads=4)
    with pytest.raises(ValueError, match="no_temporal_pos_emb=True is not supported"):
        STDiT2(tiny(no_temporal_pos_emb=True))
    cfg = STDiT2Config()
    assert (cfg.input_sq_size, cfg.model_max_length, cfg.qk_norm_legacy, cfg.out_channels) == (512, 200, True, 8)


# --------------------------------------------------------------------------------------------
# Golden parity
# --------------------------------------------------------------------------------------------


def golden_model(bundle, **overrides) -> STDiT2:
    cfg = config_from_dict(STDiT2Config, {**bundle.meta["config"], **overrides})
    with torch.device("meta"):
        model = STDiT2(cfg)
    model.load_state_dict(bundle.with_prefix("sd."), strict=True, assign=True)
    return model.eval()


def golden_call(model, bundle, device="cpu", **extra):
    """The sidecar's call: model(x, timestep, y, mask=, x_mask=, num_frames=, height=, width=, ar=, fps=)."""
    inp = {k: v.to(device) for k, v in bundle.with_prefix("in.").items()}
    kw = {name: inp.get(name) for name in ("mask", "x_mask", "num_frames", "height", "width", "ar", "fps")}
    return model(inp["x"], inp["timestep"], inp["y"], **{**kw, **extra})


def record_hooks(model):
    """Forward-hook outputs keyed like the bundles' mid.* (a '.callK' suffix when called twice)."""
    seen: dict[str, list] = {}
    names = ["x_embedder", "pos_embed", "t_embedder", "t_block", "t_block_temp", "y_embedder", "final_layer"]
    names += ["csize_embedder", "ar_embedder", "fl_embedder", "fps_embedder"]
    names += [f"blocks.{i}" for i in range(model.config.depth)]
    for name in names:
        model.get_submodule(name).register_forward_hook(lambda m, i, o, name=name: seen.setdefault(name, []).append(o))
    return seen


CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=CUDA)])
@pytest.mark.parametrize("name", ["stdit2_a", "stdit2_b"])
def test_golden_forward_and_intermediates(golden, name, device):
    bundle = golden(name)
    model = golden_model(bundle).to(device)
    assert model.config.qk_norm_legacy and model.config.input_sq_size == 512
    seen = record_hooks(model)
    precision = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")  # no TF32 on GPUs
    try:
        with torch.no_grad(), torch.backends.cudnn.flags(enabled=True, allow_tf32=False):
            out = golden_call(model, bundle, device=device)
    finally:
        torch.set_float32_matmul_precision(precision)
    assert out.dtype == torch.float32 and out.shape == bundle["out"].shape
    assert out.shape[1] == 2 * model.config.in_channels  # epsilon + learned sigma
    # mid.* first: they say where a mismatch starts
    mids = [k for k in bundle.tensors if k.startswith("mid.")]
    assert len(mids) >= 13
    for key in mids:
        hook, _, call = key[4:].partition(".call")
        got = seen[hook][int(call or 0)].cpu()
        torch.testing.assert_close(got, bundle[key], atol=GOLDEN_MID_TOL, rtol=0, msg=lambda m, key=key: f"{key}: {m}")
    torch.testing.assert_close(out.cpu(), bundle["out"], atol=GOLDEN_OUT_TOL[device], rtol=0)


def test_golden_b_uses_condition_frames(golden):
    bundle = golden("stdit2_b")
    model = golden_model(bundle)
    with torch.no_grad():
        without = golden_call(model, bundle, x_mask=None)
    assert (without - bundle["out"]).abs().max() > 1e-3  # the t=0 path really changes the output


def test_golden_needs_rope_before_qk_norm(golden):
    bundle = golden("stdit2_a")
    with torch.no_grad():
        v12_order = golden_call(golden_model(bundle, qk_norm_legacy=False), bundle)
    assert (v12_order - bundle["out"]).abs().max() > 1e-4  # the v1.2 order is measurably wrong here


# --------------------------------------------------------------------------------------------
# Micro-conditions and inputs
# --------------------------------------------------------------------------------------------


def test_micro_conditions_are_per_sample_and_tiled_like_the_official_cfg_batch():
    cfg = tiny()
    model = model_for(cfg)
    a = make_inputs(cfg)
    # CFG: x, timestep, y have 2B rows; the micro-conditions and the mask keep B rows
    null = model.y_embedder.y_embedding[None, None].expand(2, 1, -1, -1)
    doubled = dict(a, x=torch.cat([a["x"]] * 2), timestep=torch.cat([a["timestep"]] * 2), y=torch.cat([a["y"], null]))
    explicit = {k: torch.cat([a[k]] * 2) for k in ("num_frames", "height", "width", "ar", "fps")}
    with torch.no_grad():
        tiled = model(**doubled)
        full = model(**dict(doubled, **explicit, mask=a["mask"].repeat(2, 1)))
        cond = model(**a)
        # each micro-condition acts per sample: changing row 1's changes row 1 only
        other = model(**dict(a, ar=torch.tensor([a["ar"][0], 1.0]), num_frames=torch.tensor([16.0, 64.0])))
        scalars = model(**dict(a, num_frames=16, height=240, width=426, ar=240 / 426, fps=24))
        row0 = model(**{k: (v[:1] if isinstance(v, torch.Tensor) else v) for k, v in a.items()})
    torch.testing.assert_close(tiled, full, atol=0, rtol=0)
    torch.testing.assert_close(tiled[:2], cond, atol=TOL, rtol=0)
    torch.testing.assert_close(other[0], cond[0], atol=TOL, rtol=0)
    assert (other[1] - cond[1]).abs().max() > 1e-4
    torch.testing.assert_close(scalars[0], row0[0], atol=TOL, rtol=0)


def test_bf16_option_quantizes_conditions_and_default_does_not():
    cfg = tiny()
    model = model_for(cfg)
    a = make_inputs(cfg)
    with torch.no_grad():
        w854, w856 = (model(**dict(a, width=torch.tensor([w, 640.0]))) for w in (854.0, 856.0))
        assert (w854 - w856).abs().max() > 1e-6
        model.official_bf16_quantization = True
        torch.testing.assert_close(
            model(**dict(a, width=torch.tensor([854.0, 640.0]))), model(**dict(a, width=torch.tensor([856.0, 640.0]))), atol=0, rtol=0
        )
        torch.testing.assert_close(
            model(**dict(a, timestep=torch.tensor([985.96, 120.25]))), model(**dict(a, timestep=torch.tensor([984.0, 120.25]))), atol=0, rtol=0
        )


@pytest.mark.parametrize(
    "change, pattern",
    [
        (lambda a: dict(a, num_frames=None), r"STDiT2 needs num_frames \(the pixel frame count"),
        (lambda a: dict(a, ar=None), r"STDiT2 needs ar \(height / width"),
        (lambda a: dict(a, fps=torch.ones(3)), r"fps must be \[b\] with b dividing B=2.*got shape \(3,\)"),
        (lambda a: dict(a, x=a["x"][:, :3]), r"x must be \[B, 4, T, H, W\].*got \(2, 3, 3, 5, 7\)"),
        (lambda a: dict(a, mask=a["mask"][:, :10]), r"mask must be \[B', L\] with L=16.*got \(2, 10\)"),
        (lambda a: dict(a, x_mask=torch.ones(2, 4, dtype=torch.bool)), r"x_mask must be \[B, T_p\] = \[2, 3\]"),
        (lambda a: dict(a, timestep=torch.tensor([float("nan"), 1.0])), r"timestep must be finite"),
    ],
)
def test_bad_inputs_raise_clear_errors(change, pattern):
    cfg = tiny()
    with pytest.raises(ValueError, match=pattern):
        model_for(cfg)(**change(make_inputs(cfg)))


def test_sizes_needing_padding_are_cropped_back_and_x_mask_runs():
    cfg = tiny(patch_size=(2, 2, 2))
    model = model_for(cfg)
    a = make_inputs(cfg, T=3, H=5, W=3)
    with torch.no_grad():
        out = model(**dict(a, x_mask=torch.tensor([[False, True], [True, True]])))
    assert out.shape == (2, 8, 3, 5, 3) and torch.isfinite(out).all()


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
    checked = grads()
    assert plain.keys() == checked.keys() and len(plain) > 50 and "rope.freqs" not in plain
    for name in plain:
        torch.testing.assert_close(checked[name], plain[name], atol=1e-6, rtol=1e-5)


def test_attention_backend_reaches_temporal_attention():
    model = STDiT2(tiny())
    model.set_attention_backend("sdpa")
    assert {m.attention_backend for m in model.modules() if hasattr(m, "attention_backend")} == {"sdpa"}
    if "xformers" not in available_backends():
        with pytest.raises(ImportError, match="use backend='sdpa'"):
            model.set_attention_backend("xformers")


def test_new_temporal_attention_starts_as_identity():
    model = STDiT2(tiny())
    for block in model.blocks:
        assert not block.attn_temp.proj.weight.any() and not block.attn_temp.proj.bias.any()
    bound = math.sqrt(6 / sum(model.t_block_temp[1].weight.shape))
    assert model.t_block_temp[1].weight.abs().max() <= bound


# --------------------------------------------------------------------------------------------
# Loading and saving
# --------------------------------------------------------------------------------------------


def official_config_json(cfg: STDiT2Config) -> dict:
    """A config.json in the layout of hpcai-tech/OpenSora-STDiT-v2-stage2/3 (spec 9.1): the
    v1.1 STDiT2Config fields (no qk_norm_legacy: v1.1 always applies RoPE first), the
    unused training-time input_size, and transformers bookkeeping incl. the custom-code
    auto_map (illustrative module names: it is never executed, only ignored)."""
    return {
        "architectures": ["STDiT2"],
        "auto_map": {"AutoConfig": "configuration_stdit2.STDiT2Config", "AutoModel": "modeling_stdit2.STDiT2"},
        "caption_channels": cfg.caption_channels,
        "class_dropout_prob": 0.1,
        "depth": cfg.depth,
        "drop_path": 0.0,
        "enable_flash_attn": True,
        "enable_layernorm_kernel": True,
        "freeze": None,
        "hidden_size": cfg.hidden_size,
        "in_channels": 4,
        "input_size": [32, 60, 106],
        "input_sq_size": 512,
        "mlp_ratio": 4.0,
        "model_max_length": cfg.model_max_length,
        "model_type": "stdit2",
        "no_temporal_pos_emb": False,
        "num_heads": cfg.num_heads,
        "patch_size": [1, 2, 2],
        "pred_sigma": True,
        "qk_norm": True,
        "torch_dtype": "float32",
        "transformers_version": "4.36.2",
    }


def test_official_hf_folder_layout_loads(tmp_path):
    cfg = tiny()
    model = model_for(cfg)
    folder = tmp_path / "OpenSora-STDiT-v2-stage3"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(official_config_json(cfg), indent=2))
    save_safetensors_atomic(model.state_dict(), folder / "model.safetensors")
    loaded = STDiT2.from_pretrained(folder)
    assert not loaded.training
    assert loaded.config.qk_norm_legacy and loaded.config.input_size == (32, 60, 106)
    for field in ("hidden_size", "depth", "num_heads", "model_max_length", "caption_channels", "input_sq_size"):
        assert getattr(loaded.config, field) == getattr(cfg, field), field
    assert_same_weights(loaded, model)
    a = make_inputs(cfg)
    with torch.no_grad():
        torch.testing.assert_close(loaded(**a), model(**a), atol=0, rtol=0)


def test_save_pretrained_writes_the_official_layout_and_reads_back(tmp_path):
    cfg = tiny()
    model = model_for(cfg)
    model.save_pretrained(tmp_path / "hf")
    written = json.loads((tmp_path / "hf" / "config.json").read_text())
    official = official_config_json(cfg)
    assert written["model_type"] == "stdit2" and written["architectures"] == ["STDiT2"]
    assert set(official) - {"auto_map", "transformers_version"} <= set(written)  # every official field
    assert written["patch_size"] == [1, 2, 2] and written["qk_norm_legacy"] is True
    assert not list((tmp_path / "hf").glob(".*tmp*"))  # atomic writes leave no temporaries
    loaded = STDiT2.from_pretrained(tmp_path / "hf")
    assert loaded.config == model.config
    assert_same_weights(loaded, model)
    half = STDiT2.from_pretrained(tmp_path / "hf", dtype=torch.bfloat16)
    assert half.x_embedder.proj.weight.dtype == torch.bfloat16 and half.rope.freqs.dtype == torch.float32


def test_pth_training_wrapper_and_bare_safetensors_load(tmp_path):
    cfg = tiny(hidden_size=96, num_heads=6, mlp_ratio=2.0, pred_sigma=False)
    model = model_for(cfg)
    sd = model.state_dict()
    (tmp_path / "pth").mkdir()
    ema = {f"module.{k}": v for k, v in sd.items()}
    torch.save({"ema": ema, "model": {k: torch.zeros_like(v) for k, v in sd.items()}}, tmp_path / "pth" / "ckpt.pth")
    from_pth = STDiT2.from_pretrained(tmp_path / "pth" / "ckpt.pth", config=cfg)
    assert_same_weights(from_pth, model)
    save_safetensors_atomic(sd, tmp_path / "bare" / "weights.safetensors")
    from_bare = STDiT2.from_pretrained(tmp_path / "bare" / "weights.safetensors")  # config from shapes
    for field in ("hidden_size", "num_heads", "depth", "mlp_ratio", "pred_sigma", "caption_channels", "model_max_length"):
        assert getattr(from_bare.config, field) == getattr(cfg, field), field
    assert_same_weights(from_bare, model)
    a = make_inputs(cfg)
    with torch.no_grad():
        torch.testing.assert_close(from_pth(**a), model(**a), atol=0, rtol=0)


def test_missing_and_unexpected_keys_are_named(tmp_path):
    cfg = tiny()
    sd = model_for(cfg).state_dict()
    del sd["blocks.1.scale_shift_table_temporal"]
    sd["blocks.0.attn_temp.extra"] = torch.zeros(3)
    save_safetensors_atomic(sd, tmp_path / "model.safetensors")
    pattern = (
        r"missing from the checkpoint \(1\):\n    blocks.1.scale_shift_table_temporal\n"
        r"  unexpected in the checkpoint \(1\):\n    blocks.0.attn_temp.extra"
    )
    with pytest.raises(CheckpointError, match=pattern):
        STDiT2.from_pretrained(tmp_path / "model.safetensors", config=cfg)
    with pytest.warns(UserWarning, match="blocks.1.scale_shift_table_temporal"):
        partial = STDiT2.from_pretrained(tmp_path / "model.safetensors", config=cfg, strict=False)
    assert not partial.blocks[1].scale_shift_table_temporal.is_meta


def test_other_family_checkpoints_are_named_in_the_error(tmp_path):
    v12 = STDiT3(STDiT3Config_tiny())
    v12.save_pretrained(tmp_path / "v12")
    with pytest.raises(CheckpointError, match="model_type 'STDiT3', not 'stdit2'"):
        STDiT2.from_pretrained(tmp_path / "v12")
    with pytest.raises(CheckpointError, match="keys are those of STDiT3, not STDiT2"):
        STDiT2.from_pretrained(tmp_path / "v12" / "model.safetensors", config=tiny())
    save_safetensors_atomic(v12.state_dict(), tmp_path / "bare" / "v12.safetensors")  # no config.json
    with pytest.raises(CheckpointError, match="cannot infer the STDiT2 config.*its keys are those of STDiT3"):
        STDiT2.from_pretrained(tmp_path / "bare" / "v12.safetensors")


def STDiT3Config_tiny():
    from opensora_sdk.configs import STDIT3_PRESETS

    return preset("STDiT3-tiny", STDIT3_PRESETS)


def test_hub_offline_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(CheckpointError, match="huggingface-cli download"):
        STDiT2.from_pretrained("no-such-org/no-such-stdit2", local_files_only=True)


# --------------------------------------------------------------------------------------------
# Family detection
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "schema, family",
    [("stdit2-xl2", "STDiT2"), ("stdit3-xl2", "STDiT3"), ("stdit-xl2", "STDiT")],
)
def test_family_detection_on_the_official_schemas(reference, schema, family):
    keys = list(json.loads((reference / f"{schema}.schema.json").read_text()))
    assert detect_stdit_family(keys) == family
    assert detect_stdit_family(f"module.{k}" for k in keys) == family  # DDP prefixes
    assert is_stdit2_state_dict(keys) == (family == "STDiT2")


@pytest.mark.parametrize("bundle, family", [("stdit2_a", "STDiT2"), ("stdit3_a", "STDiT3"), ("stdit_a", "STDiT")])
def test_family_detection_on_the_golden_state_dicts(golden, bundle, family):
    assert detect_stdit_family(golden(bundle).with_prefix("sd.")) == family


def test_family_detection_of_other_checkpoints():
    pixart = ["x_embedder.proj.weight", "blocks.0.attn.qkv.weight", "blocks.0.cross_attn.proj.weight"]
    assert detect_stdit_family(pixart) is None
    assert detect_stdit_family([]) is None
    assert detect_stdit_family(STDiT2(tiny()).state_dict()) == "STDiT2"
