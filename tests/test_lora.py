"""LoRA adapters (opensora_sdk.lora, the pipeline's methods, `opensora generate --lora`, the
ComfyUI node) and the trainer's `lora:` section, generation.json, validation videos, resuming
from a damaged checkpoint, the training memory estimate. CPU, tiny models."""

from __future__ import annotations

import copy
import importlib.util
import json
import shutil
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from opensora_sdk import lora
from opensora_sdk.pipeline import OpenSoraPipeline

pytest.importorskip("peft")

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "training" / "configs" / "tiny_cpu.yaml"


@pytest.fixture(scope="module")
def base():
    return OpenSoraPipeline.from_preset("tiny-random", device="cpu", progress=False)


@pytest.fixture
def pipe(base):
    return copy.deepcopy(base)


def make_adapter(transformer, rank=4, alpha=8.0, seed=0, targets=lora.DEFAULT_TARGETS, amp=0.1) -> dict:
    """Our-format tensors for `transformer` with random A and B (B non-zero, so it changes outputs)."""
    g = torch.Generator().manual_seed(seed)
    layers = lora.linear_layers(transformer)
    out = {}
    for name in lora.target_names(transformer, targets):
        fan_in, fan_out = lora.apply._features(layers[name])
        out[f"transformer.{name}.lora_A.weight"] = torch.randn(rank, fan_in, generator=g) * amp
        out[f"transformer.{name}.lora_B.weight"] = torch.randn(fan_out, rank, generator=g) * amp
    return out


def write_adapter(path, transformer, **kw) -> Path:
    meta = lora.lora_metadata(transformer, rank=kw.get("rank", 4), alpha=kw.get("alpha", 8.0), target_modules=["all"],
                              fingerprint=lora.base_fingerprint(transformer), steps=3, base_model="test")  # fmt: skip
    return lora.save_lora(path, make_adapter(transformer, **{k: v for k, v in kw.items() if k != "alpha"},
                                             alpha=kw.get("alpha", 8.0)), meta)


@torch.no_grad()
def forward(transformer, seed=0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    c = transformer.config
    x = torch.randn(1, 4, 2, 8, 8, generator=g)
    y = torch.randn(1, 1, c.model_max_length, c.caption_channels, generator=g)
    size = dict(fps=torch.tensor([8.0]), height=torch.tensor([64.0]), width=torch.tensor([64.0]))
    return transformer(x, torch.tensor([500.0]), y, mask=torch.ones(1, c.model_max_length, dtype=torch.long), **size)


def test_load_save_load_scale_fuse_unload(pipe, tmp_path):
    base_out = forward(pipe.transformer)
    base_state = {k: v.clone() for k, v in pipe.transformer.state_dict().items()}
    call = dict(height=64, width=64, num_frames=1, num_steps=2, seed=3, progress=False)
    base_frames = pipe("a red circle", **call)[0].frames
    path = write_adapter(tmp_path / "a.safetensors", pipe.transformer)
    assert path.stat().st_size < 120_000  # rank 4 on 28 layers of a hidden-64 model, float32
    name = pipe.load_lora_weights(path)
    assert name == "a" and pipe.get_active_adapters() == {"a": 1.0}
    with_a = forward(pipe.transformer)
    assert not torch.allclose(with_a, base_out)
    # the forward by hand: W x + b + alpha / r * B A x on one layer
    layer = pipe.transformer.spatial_blocks[0].cross_attn.q_linear
    x = torch.randn(3, layer.in_features)
    a = load_file(str(path))
    want = layer.base_layer(x) + 2.0 * x @ a["transformer.spatial_blocks.0.cross_attn.q_linear.lora_A.weight"].T @ \
        a["transformer.spatial_blocks.0.cross_attn.q_linear.lora_B.weight"].T  # fmt: skip
    torch.testing.assert_close(layer(x), want)
    # save -> load gives the same outputs
    lora.save_loaded_lora(tmp_path / "again.safetensors", pipe.transformer, "a")
    other = copy.deepcopy(pipe)
    other.unload_lora_weights()
    other.load_lora_weights(tmp_path / "again.safetensors", adapter_name="b")
    assert torch.equal(forward(other.transformer), with_a)
    # scale 0 is the base model exactly, also through the whole pipeline
    pipe.set_adapters("a", 0.0)
    assert torch.equal(forward(pipe.transformer), base_out)
    assert (pipe("a red circle", **call)[0].frames == base_frames).all()
    pipe.set_adapters(["a"], [1.0])
    assert not (pipe("a red circle", **call)[0].frames == base_frames).all()
    # fused equals unfused within 1e-5; unfusing restores the weights
    pipe.fuse_lora()
    torch.testing.assert_close(forward(pipe.transformer), with_a, atol=1e-5, rtol=0)
    pipe.unfuse_lora()
    torch.testing.assert_close(forward(pipe.transformer), with_a, atol=1e-6, rtol=0)
    # unloading puts the original layers back
    pipe.unload_lora_weights()
    assert not any(".lora_" in k or "base_layer" in k for k in pipe.transformer.state_dict())
    for k, v in pipe.transformer.state_dict().items():
        torch.testing.assert_close(v, base_state[k], atol=1e-6, rtol=0)


def test_several_adapters_with_their_scales(pipe, tmp_path):
    base_out = forward(pipe.transformer)
    pipe.load_lora_weights(write_adapter(tmp_path / "one.safetensors", pipe.transformer, seed=1), scale=0.5)
    one = forward(pipe.transformer) - base_out
    pipe.load_lora_weights(write_adapter(tmp_path / "two.safetensors", pipe.transformer, seed=2, rank=2))
    assert pipe.get_active_adapters() == {"one": 0.5, "two": 1.0}
    pipe.set_adapters(["two"], [1.0])
    two = forward(pipe.transformer) - base_out
    pipe.set_adapters(["one", "two"], [0.5, 1.0])
    both = forward(pipe.transformer) - base_out
    assert both.abs().max() > 0 and one.abs().max() > 0
    # adapters act on different layers' outputs, so effects do not simply add; both are in play
    assert not torch.allclose(both, one, atol=1e-4) and not torch.allclose(both, two, atol=1e-4)
    pipe.unload_lora_weights(["one"])
    torch.testing.assert_close(forward(pipe.transformer) - base_out, two)
    with pytest.raises(ValueError, match="not loaded"):
        pipe.set_adapters(["one"])


def test_community_layouts_load(pipe, tmp_path):
    ours = write_adapter(tmp_path / "ours.safetensors", pipe.transformer)
    pipe.load_lora_weights(ours)
    want = forward(pipe.transformer)
    pipe.unload_lora_weights()
    t = load_file(str(ours))
    modules = sorted({k[len("transformer."):].rsplit(".lora_", 1)[0] for k in t})
    kohya, comfy, peft_dir = {}, {}, tmp_path / "peft"
    for m in modules:
        a, b = t[f"transformer.{m}.lora_A.weight"], t[f"transformer.{m}.lora_B.weight"]
        kohya[f"lora_unet_{m.replace('.', '_')}.lora_down.weight"] = a
        kohya[f"lora_unet_{m.replace('.', '_')}.lora_up.weight"] = b
        kohya[f"lora_unet_{m.replace('.', '_')}.alpha"] = torch.tensor(8.0)
        comfy[f"diffusion_model.{m}.lora_down.weight"] = a
        comfy[f"diffusion_model.{m}.lora_up.weight"] = b
        comfy[f"diffusion_model.{m}.alpha"] = torch.tensor(8.0)
    peft_dir.mkdir()
    save_file({f"base_model.model.{m}.lora_A.weight": t[f"transformer.{m}.lora_A.weight"] for m in modules}
              | {f"base_model.model.{m}.lora_B.weight": t[f"transformer.{m}.lora_B.weight"] for m in modules},
              str(peft_dir / "adapter_model.safetensors"))  # fmt: skip
    (peft_dir / "adapter_config.json").write_text(json.dumps({"r": 4, "lora_alpha": 8, "peft_type": "LORA"}))
    save_file(kohya, str(tmp_path / "kohya.safetensors"))
    save_file(comfy, str(tmp_path / "comfy.safetensors"))
    for path, layout in ((tmp_path / "kohya.safetensors", "kohya"), (tmp_path / "comfy.safetensors", "kohya"), (peft_dir, "peft")):
        assert lora.read_lora(path).layout == layout
        pipe.load_lora_weights(path, adapter_name="c")
        torch.testing.assert_close(forward(pipe.transformer), want, msg=str(path))
        pipe.unload_lora_weights()
    (peft_dir / "adapter_config.json").write_text('{"r": 4, "lora_alpha": ')  # cut short: alpha unknown
    with pytest.raises(lora.LoraError, match=r"adapter_config\.json' cannot be read .*lora_alpha"):
        lora.read_lora(peft_dir)  # not alpha = r in silence (another scale)


def test_bad_files_fail_clearly_and_change_nothing(pipe, tmp_path):
    state = {k: v.clone() for k, v in pipe.transformer.state_dict().items()}

    def unchanged():
        assert pipe.transformer.state_dict().keys() == state.keys()
        assert all(torch.equal(v, state[k]) for k, v in pipe.transformer.state_dict().items())
        assert not lora.list_adapters(pipe.transformer)

    full = tmp_path / "model.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(full))
    with pytest.raises(lora.LoraError, match=r"model\.safetensors' holds no LoRA tensors .*full model"):
        pipe.load_lora_weights(full)
    unchanged()
    good = write_adapter(tmp_path / "good.safetensors", pipe.transformer)
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(good.read_bytes()[:200])
    with pytest.raises(lora.LoraError, match=r"cut\.safetensors' cannot be read: it is damaged"):
        pipe.load_lora_weights(cut)
    with pytest.raises(lora.LoraError, match="file not found"):
        pipe.load_lora_weights(tmp_path / "nope.safetensors")
    unchanged()
    v11 = OpenSoraPipeline.from_preset("tiny-random-v1.1", device="cpu", progress=False)
    wrong_family = write_adapter(tmp_path / "v11.safetensors", v11.transformer)
    with pytest.raises(lora.LoraError, match=r"v11\.safetensors.*trained for Open-Sora v1\.1 \(STDiT2\) but the model is Open-Sora "
                                             r"v1\.2 STDiT3 \(hidden 64, depth 2\)"):  # fmt: skip
        pipe.load_lora_weights(wrong_family)
    from opensora_sdk.models.stdit3 import STDiT3  # shapes: an adapter for hidden 128, without metadata

    wide = STDiT3(pipe.transformer.config.__class__(**{**pipe.transformer.config.__dict__, "hidden_size": 128}))
    t = make_adapter(wide)
    save_file(t, str(tmp_path / "wide.safetensors"))
    with pytest.raises(lora.LoraError, match=r"wide\.safetensors' does not fit the model STDiT3 \(hidden 64, depth 2\).*"
                                             r"shapes that differ: spatial_blocks\.0\.attn\.proj: the model's layer is 64 -> 64, "
                                             r"the adapter's 128 -> 128"):  # fmt: skip
        pipe.load_lora_weights(tmp_path / "wide.safetensors")
    unchanged()
    # same shapes, other weights: a warning, and it loads
    other = OpenSoraPipeline.from_preset("tiny-random", seed=5, device="cpu", progress=False)
    foreign = write_adapter(tmp_path / "foreign.safetensors", other.transformer)
    with pytest.warns(lora.LoraWarning, match="trained on base weights with fingerprint"):
        pipe.load_lora_weights(foreign)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pipe.load_lora_weights(good)  # its own fingerprint: no warning


def test_fp8_weights_refuse_a_lora_on_every_route(pipe, tmp_path):
    """The check lives in lora.apply_lora, which the pipeline and the ComfyUI node both call."""
    good = write_adapter(tmp_path / "good.safetensors", pipe.transformer)
    pipe.enable_fp8()
    with pytest.raises(lora.LoraError, match="a LoRA cannot be applied to fp8 weights: load the model without fp8"):
        pipe.load_lora_weights(good)
    with pytest.raises(lora.LoraError, match="cannot be applied to fp8 weights"):
        lora.apply_lora(pipe.transformer, lora.read_lora(good))  # what the node's adapter does
    assert not lora.list_adapters(pipe.transformer)


def test_cli_generate_with_lora(base, tmp_path, capsys):
    from opensora_sdk import cli, cli_args

    path = write_adapter(tmp_path / "a.safetensors", base.transformer)
    argv = ["generate", "--preset", "tiny-random", "--prompt", "a red circle", "--image-size", "64", "64",
            "--num-frames", "1", "--num-sampling-steps", "2", "--save-dir", str(tmp_path / "out"), "--no-progress"]  # fmt: skip
    assert cli.main(argv + ["--lora", f"{path}:0.5", "--lora", str(path)]) == 0
    err = capsys.readouterr().err
    assert "LoRA a: " in err and "(scale 0.5)" in err and "LoRA a_2: " in err
    assert cli_args._lora_spec("C:\\x\\a.safetensors") == ("C:\\x\\a.safetensors", 1.0)
    assert cli_args._lora_spec("dir/a.safetensors:-0.25") == ("dir/a.safetensors", -0.25)
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"nope")
    assert cli.main(argv + ["--lora", str(bad)]) == 2
    assert "bad.safetensors' cannot be read" in capsys.readouterr().err


def test_comfy_node_copies_and_stacks(tmp_path, monkeypatch):
    from comfy_nodes import comfy_host as host
    from comfy_nodes import loaders
    from comfy_nodes.lora import OpenSoraLoraLoader, lora_choices

    model = loaders.load_model("(built-in)", "fp32")
    folder = tmp_path / "models" / "loras"
    folder.mkdir(parents=True)
    write_adapter(folder / "one.safetensors", model.transformer, seed=1)
    write_adapter(folder / "two.safetensors", model.transformer, seed=2)
    monkeypatch.setitem(host._settings, "models_dir", tmp_path / "models")
    assert lora_choices() == ["(built-in)", "one.safetensors", "two.safetensors"]
    before = forward(model.transformer)
    (one,) = OpenSoraLoraLoader().load("one.safetensors", model, 1.0)
    (both,) = OpenSoraLoraLoader().load("two.safetensors", one, 0.7)
    (zero,) = OpenSoraLoraLoader().load("one.safetensors", model, 0.0)
    assert torch.equal(forward(model.transformer), before) and not lora.list_adapters(model.transformer)
    assert list(lora.list_adapters(one.transformer)) == ["one"]
    assert {k: v["scale"] for k, v in lora.list_adapters(both.transformer).items()} == {"one": 1.0, "two": 0.7}
    assert torch.equal(forward(zero.transformer), before)
    assert not torch.allclose(forward(one.transformer), before) and not torch.allclose(forward(both.transformer), forward(one.transformer))
    assert one.transformer.x_embedder.proj.weight is model.transformer.x_embedder.proj.weight  # weights shared
    (folder / "junk.safetensors").write_bytes(b"junk")
    with pytest.raises(ValueError, match="junk.safetensors' cannot be read"):
        OpenSoraLoraLoader().load("junk.safetensors", model, 1.0)


# ---- training -------------------------------------------------------------------------------


def load_trainer():
    spec = importlib.util.spec_from_file_location("opensora_train_lora", REPO / "training" / "train.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def train():
    module = load_trainer()
    threads = torch.get_num_threads()

    def run(argv):
        from accelerate.state import AcceleratorState, GradientState

        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()
        return module.main(argv)

    yield run
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from opensora_sdk.models.stdit3 import STDiT3
    from opensora_sdk.configs import STDIT3_PRESETS
    from opensora_sdk.training import synthetic

    out = tmp_path_factory.mktemp("lora_data")
    csv_path = synthetic.generate_dataset(out / "clips", 16, size=32, num_frames=20, seed=0)
    torch.manual_seed(0)
    cfg = STDIT3_PRESETS["STDiT3-tiny"].__class__(**{**STDIT3_PRESETS["STDiT3-tiny"].__dict__, "model_max_length": 40})
    STDiT3(cfg).save_pretrained(out / "base")
    return {"csv": csv_path, "base": out / "base", "features": out / "features"}


def argv_for(data, out, *sets, lora_rank=4):
    sets = [f"data.csv={data['csv']}", f"features.dir={data['features']}", "data.extra_resolutions={32px: 1024}",
            "data.buckets={32px: {17: [1.0, 4]}}", "cpu_threads=1", "log_every=1", "ckpt_every=2", "max_steps=4",
            f"model.from_pretrained={data['base']}", "optim.warmup_steps=0", "optim.lr=1e-2", f"lora.rank={lora_rank}",
            "tensorboard=false", *sets]  # fmt: skip
    argv = ["--config", str(TINY), "--output-dir", str(out)]
    for s in sets:
        argv += ["--set", s]
    return argv


def test_lora_training_changes_only_the_adapter_and_resumes_exactly(train, data, tmp_path):
    from opensora_sdk.models.stdit3 import STDiT3

    out = tmp_path / "a"
    summary = train(argv_for(data, out, "validation.every=4", "validation.prompts=[a red circle moving left]",
                             "validation.num_steps=2", "tensorboard=true"))  # fmt: skip
    last = out / "checkpoints" / "step-00000004"
    assert sorted(p.name for p in last.iterdir()) == ["adapter.safetensors", "adapter_ema.safetensors", "generation.json",
                                                     "lr_scheduler.pt", "optimizer.pt", "rng", "sampler.json", "state.json"]
    raw = load_file(str(last / "adapter.safetensors"))
    assert all(k.startswith("transformer.") and k.endswith(("lora_A.weight", "lora_B.weight")) for k in raw)
    assert all(v.abs().max() > 0 for k, v in raw.items() if "lora_B" in k)  # B started at zero and trained
    meta = lora.read_metadata(last / "adapter_ema.safetensors")
    base = STDiT3.from_pretrained(data["base"])
    assert meta["base_fingerprint"] == lora.base_fingerprint(base) and meta["steps"] == "4" and meta["rank"] == "4"
    # the run's weights: the base's, untouched, plus the adapter
    base_sum = sum(float(p.detach().double().sum()) for p in base.parameters())
    adapter_sum = sum(float(v.double().sum()) for v in raw.values())
    assert summary["param_digest"][0] == pytest.approx(base_sum + adapter_sum, rel=1e-9, abs=1e-6)
    assert (out / "validation" / "step-00000004" / "00.mp4").is_file()
    if importlib.util.find_spec("tensorboard") is not None:  # loss, lr, grad norm, throughput and the validation frames
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

        events = EventAccumulator(str(next((out / "tb").rglob("events.out.tfevents.*")).parent)).Reload()
        assert {"loss", "lr", "grad_norm", "samples_per_s"} <= set(events.Tags()["scalars"])
        assert "validation" in events.Tags()["images"]
    # resume from step 2 with a damaged step 3 in between: skips it, names the file, continues exactly
    out_b = tmp_path / "b"
    (out_b / "checkpoints").mkdir(parents=True)
    shutil.copytree(out / "checkpoints" / "step-00000002", out_b / "checkpoints" / "step-00000002")
    bad = shutil.copytree(out / "checkpoints" / "step-00000002", out_b / "checkpoints" / "step-00000003")
    (bad / "adapter.safetensors").write_bytes((bad / "adapter.safetensors").read_bytes()[:300])
    shutil.copytree(out / "random_encoders", out_b / "random_encoders") if (out / "random_encoders").exists() else None
    warnings_seen = []
    import logging

    class Catch(logging.Handler):
        def emit(self, record):
            warnings_seen.append(record.getMessage())

    handler = Catch(level=logging.WARNING)
    logging.getLogger("train").addHandler(handler)
    try:
        train(argv_for(data, out_b) + ["--resume", "latest"])
    finally:
        logging.getLogger("train").removeHandler(handler)
    assert any("step-00000003/adapter.safetensors" in w and "damaged" in w for w in warnings_seen), warnings_seen
    again = load_file(str(out_b / "checkpoints" / "step-00000004" / "adapter.safetensors"))
    assert all(torch.equal(again[k], raw[k]) for k in raw)


def test_full_finetune_checkpoint_generates_without_flags(train, data, tmp_path):
    from opensora_sdk import cli
    from opensora_sdk.video_io import read_video

    out = tmp_path / "full"
    train(argv_for(data, out, "max_steps=2", lora_rank=0))
    ema = out / "checkpoints" / "step-00000002" / "ema"
    card = json.loads((ema / "generation.json").read_text())
    # the data's size, length and fps; the schedule the run trained with (the warp: the default)
    assert card["defaults"] == {"height": 32, "width": 32, "num_frames": 17, "fps": 24.0, "timestep_warp": True}
    assert card["vae"] == str((out / "random_encoders" / "vae").resolve())
    save = tmp_path / "samples"
    assert cli.main(["generate", "--model", str(ema), "--prompt", "a red circle", "--num-sampling-steps", "2",
                     "--save-dir", str(save), "--no-progress", "--quiet"]) == 0  # fmt: skip
    frames, fps = read_video(save / "sample_0000.mp4")
    assert frames.shape == (17, 32, 32, 3) and fps == 24.0


def test_window_length_rule_and_the_no_bucket_error(train, data, tmp_path):
    from opensora_sdk.training.buckets import BucketConfig

    b = {"64px": {17: [1.0, 4]}}
    assert BucketConfig(b, {"64px": 4096}).get_bucket_id(51, 64, 64, frame_interval=3) is None  # official: 51 > 51 is false
    assert BucketConfig(b, {"64px": 4096}, "window").get_bucket_id(51, 64, 64, frame_interval=3) == ("64px", 17, "1.00")
    with pytest.raises(ValueError, match=r"source \(frames, height, width\) of the first rows: \[\(20, 32, 32\).*"
                                         r"more than T \* frame_interval = T \* 3 frames"):  # fmt: skip
        train(argv_for(data, tmp_path / "x", "data.frame_interval=3", "features.dir=null"))


def test_eight_bit_adam_needs_bitsandbytes():
    from opensora_sdk.training.config import OptimSection
    from opensora_sdk.training.lora import make_optimizer

    if importlib.util.find_spec("bitsandbytes") is not None:
        pytest.skip("bitsandbytes is installed")
    with pytest.raises(ImportError, match="optim.name: adamw8bit needs bitsandbytes"):
        make_optimizer([torch.nn.Parameter(torch.zeros(2))], OptimSection(name="adamw8bit"))


@pytest.mark.parametrize("kind", ["full", "lora"])
def test_training_memory_estimate_matches_saved_activations(kind):
    """The activation term of `estimate_training` against the tensors autograd keeps for the
    backward pass of one step (saved-tensor hooks, unique storages), on a small config."""
    from opensora_sdk.configs import STDIT3_PRESETS
    from opensora_sdk.estimates import estimate_training
    from opensora_sdk.models.stdit3 import STDiT3

    torch.manual_seed(0)
    cfg = STDIT3_PRESETS["STDiT3-tiny"].__class__(**{**STDIT3_PRESETS["STDiT3-tiny"].__dict__, "hidden_size": 96,
                                                     "depth": 3, "num_heads": 4, "model_max_length": 24})  # fmt: skip
    model = STDiT3(cfg).train()
    if kind == "lora":
        model.requires_grad_(False)
        lora.inject(model, {n: (8, 8.0) for n in lora.target_names(model)}, "default")
        for n, p in model.named_parameters():
            p.requires_grad_(".lora_" in n)
    B, T, H, W = 2, 5, 24, 24  # 17 frames of 192 x 192
    seen = {}

    def pack(t):
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(torch.randn(B, 4, T, H, W), torch.rand(B) * 1000, torch.randn(B, 1, 24, cfg.caption_channels),
              mask=torch.ones(B, 24, dtype=torch.long), fps=torch.full((B,), 8.0), height=torch.full((B,), 192.0),
              width=torch.full((B,), 192.0))  # fmt: skip
    est = estimate_training(model, batch=B, num_frames=17, height=192, width=192, mixed_precision="no")
    measured = sum(seen.values())
    assert 0.8 < est.activations / measured < 1.2, (est.activations, measured)
    assert est.trainable == sum(p.numel() for p in model.parameters() if p.requires_grad)
