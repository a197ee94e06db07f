"""The node pack never locks up the server: refusals before any model work, interrupts between
transformer blocks and VAE units, progress from the VAE, one video per batch item, one error
per wrong input, loader errors that name the file, the full seed range, image fitting, and
the template thumbnails. Headless, on the built-in tiny models."""

from __future__ import annotations

import inspect
import json
import threading
import time
from pathlib import Path

import pytest
import torch

import comfy_nodes
from comfy_nodes import comfy_host as host
from comfy_nodes import conditioning, guard, headless, latent, loaders, sampler, text, vae, video

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def models():
    return (loaders.load_model(loaders.BUILTIN, "fp32"), loaders.load_vae(loaders.BUILTIN, "fp32"),
            loaders.load_text_encoder(loaders.BUILTIN, "fp32"))


@pytest.fixture(autouse=True)
def clean_guard_env(monkeypatch):
    for name in ("OPENSORA_MAX_MEMORY_GB", "OPENSORA_DEVICE_TFLOPS", "OPENSORA_MAX_UNIT_SECONDS"):
        monkeypatch.delenv(name, raising=False)
    host._interrupt.clear()
    yield
    host._interrupt.clear()


class Listener:
    """Records (label, value, total) of every progress update; optional action on each."""

    def __init__(self, action=None):
        self.seen, self.action = [], action

    def __call__(self, value, total, preview):
        self.seen.append((host.progress_label(), value, total))
        if self.action is not None:
            self.action(value, total)

    def __enter__(self):
        host.add_progress_listener(self)
        return self

    def __exit__(self, *exc):
        host.remove_progress_listener(self)


def _spy_forward(module):
    calls = []
    handle = module.register_forward_pre_hook(lambda m, args: calls.append(1))
    return calls, handle


# --------------------------------------------------------------------------------------------
# The resource guard
# --------------------------------------------------------------------------------------------


def test_oversized_request_is_refused_before_any_model_work(models, monkeypatch):
    model, vae_, te = models
    embeds = text.encode_prompt(te, "a cat")
    calls, handle = _spy_forward(model.transformer)
    vae_calls, vae_handle = _spy_forward(vae_.vae.spatial.decoder)
    try:
        # an 8192x8192 frame: one block's spatial attention is O(S^2) in its 262144 tokens;
        # 7e13 FLOPs in one block of the tiny model, over a minute even at 1 TFLOP/s
        monkeypatch.setenv("OPENSORA_DEVICE_TFLOPS", "1")
        huge = latent.OpenSoraEmptyLatentVideo().create("custom", "9:16", "custom", 8192, 8192, 1, 24.0, 1)[0]
        start = time.perf_counter()
        with pytest.raises(guard.ResourceLimitError) as err:
            sampler.OpenSoraSampler().sample(model, embeds, huge, 0, 30, 7.0, True)
        assert time.perf_counter() - start < 5
        message = str(err.value)
        assert "refused before any model work" in message and "262144 tokens per frame" in message
        assert "OPENSORA_MAX_UNIT_SECONDS" in message and "What fits:" in message

        # memory: a cap far below what one step needs
        monkeypatch.setenv("OPENSORA_MAX_MEMORY_GB", "0.005")
        big = latent.empty_latent(256, 256, 34, 24.0)
        with pytest.raises(guard.ResourceLimitError, match=r"needs about .* OPENSORA_MAX_MEMORY_GB") as err:
            sampler.OpenSoraSampler().sample(model, embeds, big, 0, 30, 7.0, True)
        fits = str(err.value).split("What fits:")[1]
        assert " frames at 256x256" in fits and "at 34 frames" in fits and "cfg 1" in fits
        # the suggested size does fit
        width = int(fits.split("x")[0].strip())
        assert width < 256
        small = latent.empty_latent(width, width, 34, 24.0)
        sampler.plan_for_latent(model, embeds, small, seed=0, steps=1, cfg=7.0)  # plans without a refusal
        guard.check_generation("test", model, None, sampler.plan_for_latent(model, embeds, small, seed=0, steps=1,
                                                                            cfg=7.0), _facts(model))

        # the decoder too (its output alone is over the cap)
        monkeypatch.setenv("OPENSORA_MAX_MEMORY_GB", "0.02")
        samples = {"samples": torch.zeros(1, 4, 10, 64, 64), "num_frames": 34, "height": 512, "width": 512,
                   "fps": 24.0}
        with pytest.raises(guard.ResourceLimitError, match="OpenSoraVAEDecode: refused before any model work"):
            vae.OpenSoraVAEDecode().decode(vae_, samples, 0, 64)
        assert calls == [] and vae_calls == []
    finally:
        handle.remove()
        vae_handle.remove()
    assert next(model.transformer.parameters()).device.type == "cpu"


def _facts(model):
    from opensora_sdk.plan import ModelFacts

    return ModelFacts.from_configs(model.transformer.config, sampler.vae_config_for(model, None),
                                   model.max_latent_frames)


def test_guard_bounds_are_documented_and_configurable(models, monkeypatch):
    model, _, _ = models
    config = model.transformer.config
    # spatial attention dominates a big frame: 4 S^2 C per frame and row
    S = (8192 // 16) ** 2
    flops = guard.transformer_unit_flops(config, 2, 1, S, 40)
    assert flops >= 2 * 4 * S * S * config.hidden_size
    rate, how = guard.device_flops(torch.device("cpu"), torch.float32)
    assert rate > 1e8 and "measured" in how and guard.cpu_flops(torch.float32) == rate  # measured once
    assert guard.device_flops(torch.device("cuda"), torch.bfloat16)[0] == 400e12
    monkeypatch.setenv("OPENSORA_DEVICE_TFLOPS", "2.5")
    assert guard.device_flops(torch.device("cpu"), torch.float32)[0] == 2.5e12
    assert guard.max_unit_seconds() == 60
    monkeypatch.setenv("OPENSORA_MAX_UNIT_SECONDS", "1000")
    assert guard.max_unit_seconds() == 1000
    monkeypatch.setenv("OPENSORA_MAX_MEMORY_GB", "2")
    assert guard.available_memory(torch.device("cpu")) == (2 * 2**30, "OPENSORA_MAX_MEMORY_GB")
    monkeypatch.setenv("OPENSORA_MAX_MEMORY_GB", "lots")
    with pytest.raises(ValueError, match="OPENSORA_MAX_MEMORY_GB='lots' is not a number"):
        guard.available_memory(torch.device("cpu"))
    # the estimate the guard uses is the SDK's
    from opensora_sdk.estimates import estimate_peak

    assert "estimate_peak" in inspect.getsource(guard.check_generation) and callable(estimate_peak)


def test_model_limits_are_the_loaded_models_in_node_terms(models):
    model, _, te = models
    embeds = text.encode_prompt(te, "a cat")
    fresh = latent.OpenSoraEmptyLatentVideo().create("240p", "9:16", "2s", 424, 240, 51, 24.0, 1)[0]
    with pytest.raises(ValueError) as err:
        sampler.OpenSoraSampler().sample(model, embeds, fresh, 0, 1, 7.0, True)
    message = str(err.value)
    assert "at most 34 frames" in message and "num_frames to 34" in message and "OpenSoraLongVideo" in message
    assert "408" not in message and "loop=" not in message


# --------------------------------------------------------------------------------------------
# Interrupts and progress
# --------------------------------------------------------------------------------------------


def _run_in_thread(fn):
    box = {}

    def target():
        try:
            box["result"] = fn()
        except BaseException as err:  # noqa: BLE001 - handed to the test
            box["error"] = err
        box["end"] = time.perf_counter()

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    return thread, box


def test_interrupt_between_blocks_returns_within_2s(models):
    """A step whose blocks are slow (0.3 s each): the interrupt lands between two blocks of the
    first step, long before the step would end."""
    model, _, te = models
    embeds = text.encode_prompt(te, "a cat")
    started = threading.Event()

    def slow(module, args):
        started.set()
        time.sleep(0.3)

    blocks = list(model.transformer.spatial_blocks) + list(model.transformer.temporal_blocks)
    handles = [b.register_forward_pre_hook(slow) for b in blocks]
    try:
        with Listener() as steps:
            thread, box = _run_in_thread(lambda: sampler.OpenSoraSampler().sample(
                model, embeds, latent.empty_latent(32, 32, 17, 24), 0, 1000, 7.0, True))
            assert started.wait(30)
            asked = time.perf_counter()
            host.request_interrupt()
            thread.join(10)
    finally:
        for h in handles:
            h.remove()
    assert isinstance(box.get("error"), host.InterruptedByUser), box
    assert box["end"] - asked < 2.0
    assert steps.seen == []  # no step finished: it stopped between blocks
    assert model.transformer.block_callback is None  # the hook is removed after the run
    assert next(model.transformer.parameters()).device.type == "cpu"


def test_decode_reports_progress_and_stops_on_interrupt(models):
    model, vae_, te = models
    z = torch.randn(2, 4, 15, 8, 8)  # 2 videos x 51 frames: 3 chunks, 2 x 17 frames per micro-batch round
    samples = {"samples": z, "num_frames": 51, "height": 64, "width": 64, "fps": 24.0}
    with Listener() as done:
        images, fps = vae.OpenSoraVAEDecode().decode(vae_, samples, 0, 64)
    units = [(label, v, t) for label, v, t in done.seen]
    total = units[0][2]
    assert all(label == "decoding" for label, _, _ in units) and total == 3 * (1 + 2)
    assert [v for _, v, _ in units] == list(range(1, total + 1))
    assert len(images) == 2 and all(tuple(i.shape) == (51, 64, 64, 3) for i in images)

    wide = {"samples": torch.randn(1, 4, 5, 16, 16), "num_frames": 17, "height": 128, "width": 128, "fps": 24.0}
    with Listener() as tiled:  # tiles count as units too: 64-px tiles over 128 px, overlap 16: 3 x 3
        vae.OpenSoraVAEDecode().decode(vae_, wide, 64, 16)
    assert tiled.seen[-1][1:] == (10, 10)  # the chunk + one micro-batch of 9 tiles

    decoder = vae_.vae.spatial.decoder
    handle = decoder.register_forward_pre_hook(lambda m, a: time.sleep(0.3))
    first = threading.Event()
    try:
        with Listener(lambda v, t: first.set()) as seen:
            thread, box = _run_in_thread(lambda: vae.OpenSoraVAEDecode().decode(vae_, samples, 0, 64))
            assert first.wait(30)
            asked = time.perf_counter()
            host.request_interrupt()
            thread.join(10)
    finally:
        handle.remove()
    assert isinstance(box.get("error"), host.InterruptedByUser), box
    assert box["end"] - asked < 2.0 and seen.seen[-1][1] < total


def test_encode_reports_progress(models):
    _, vae_, _ = models
    with Listener() as seen:
        out = vae.OpenSoraVAEEncode().encode(vae_, torch.rand(34, 32, 32, 3), 24.0, 0, 64)[0]
    assert out["samples"].shape == (1, 4, 10, 4, 4)
    assert seen.seen and all(label == "encoding" for label, _, _ in seen.seen)
    assert seen.seen[-1][1] == seen.seen[-1][2] == 2 + 2  # 2 spatial micro-batches of 17, 2 temporal chunks


def test_sdk_hooks_reach_any_transformer_and_the_vae():
    from opensora_sdk.generation import Hooks, block_callback

    class Toy(torch.nn.Module):  # a model without set_block_callback (as STDiT2 / STDiT): forward pre-hooks
        def __init__(self):
            super().__init__()
            self.blocks = torch.nn.ModuleList(torch.nn.Linear(2, 2) for _ in range(3))

        def forward(self, x):
            for b in self.blocks:
                x = b(x)
            return x

    toy, seen = Toy(), []
    with block_callback(toy, lambda: seen.append(1)):
        toy(torch.zeros(1, 2))
    toy(torch.zeros(1, 2))
    assert len(seen) == 3
    reports = []
    hooks = Hooks(vae_progress=lambda stage, done, total: reports.append((stage, done, total)))
    hooks.vae("decoding")(1, 4)
    assert reports == [("decoding", 1, 4)] and Hooks().vae("decoding") is None


# --------------------------------------------------------------------------------------------
# Batches, validation, loaders, seeds
# --------------------------------------------------------------------------------------------


def test_batch_of_two_gives_two_files_in_both_savers(tmp_path, monkeypatch):
    from opensora_sdk.video_io import read_video

    monkeypatch.setitem(host._settings, "output_dir", tmp_path)
    data = json.loads((ROOT / "workflows" / "opensora_text_to_video.json").read_text())
    sets = ["Open-Sora Empty Latent Video.batch_size=2", "Open-Sora Sampler.steps=2"]
    _, files = headless.run_workflow(data, sets)
    names = sorted(f.name for f in files)
    assert names == ["t2v_00001_.mp4", "t2v_00002_.mp4", "t2v_core_00001_.mp4", "t2v_core_00002_.mp4"]
    clips = {f.name: read_video(f)[0] for f in files}
    assert all(len(c) == 17 for c in clips.values())
    assert (clips["t2v_00001_.mp4"] != clips["t2v_00002_.mp4"]).any()  # seed and seed + 1


def test_sdk_gives_one_video_per_sample():
    from opensora_sdk.presets import builtin_preset

    pipe = loaders._builtin_pipeline(builtin_preset())  # the built-in models, as the pipeline loads them
    videos = pipe(["a cat", "a dog"], height=32, width=32, num_frames=17, num_steps=1, batch_size=2, seed=1)
    assert len(videos) == 2 and all(v.frames.shape[0] == 17 for v in videos)


def test_each_wrong_input_gives_one_error_on_that_input():
    classes = headless.node_classes()
    for node_id, cls in comfy_nodes.NODE_CLASS_MAPPINGS.items():  # ComfyUI repeats a message per declared input
        validator = getattr(cls, "VALIDATE_INPUTS", None)
        if validator is not None:
            assert len([a for a in inspect.getfullargspec(validator).args if a != "cls"]) <= 1, node_id

    def node(**inputs):
        base = {"resolution": "custom", "aspect_ratio": "9:16", "duration": "custom", "width": 64, "height": 64,
                "num_frames": 17, "fps": 24.0, "batch_size": 1}
        return {"1": {"class_type": "OpenSoraEmptyLatentVideo", "inputs": {**base, **inputs}}}

    errors = headless.validate(node(num_frames=999), classes)
    assert len(errors) == 1 and "input 'num_frames'" in errors[0]
    errors = headless.validate(node(aspect_ratio="no"), classes)
    assert len(errors) == 1 and "input 'aspect_ratio'" in errors[0]
    # rules over two widgets run with the node: one message that names the one input to change
    assert headless.validate(node(resolution="256", aspect_ratio="9:16"), classes) == []
    with pytest.raises(ValueError) as err:
        latent.OpenSoraEmptyLatentVideo().create("256", "9:16", "2s", 64, 64, 17, 24.0, 1)
    assert str(err.value).startswith("aspect_ratio='9:16'") and "width" not in str(err.value)
    decode = {"1": {"class_type": "OpenSoraVAEDecode", "inputs": {"vae": ["2", 0], "samples": ["3", 0],
                                                                   "tile_size": 40, "tile_overlap": 8}},
              "2": {"class_type": "OpenSoraVAELoader", "inputs": {"vae": "(built-in)", "dtype": "auto"}},
              "3": {"class_type": "OpenSoraEmptyLatentVideo", "inputs": node()["1"]["inputs"]}}
    errors = headless.validate(decode, classes)
    assert len(errors) == 1 and "input 'tile_size': tile_size=40" in errors[0]

    class Six:  # the headless validator repeats a message per declared input, as ComfyUI does
        @classmethod
        def INPUT_TYPES(cls):
            return {"required": {k: ("INT", {"default": 0}) for k in "abcdef"}}

        @classmethod
        def VALIDATE_INPUTS(cls, a, b, c, d, e, f):
            return "wrong"

    assert len(headless.validate({"1": {"class_type": "Six", "inputs": dict.fromkeys("abcdef", 0)}},
                                 {"Six": Six})) == 6


@pytest.fixture
def model_folder(tmp_path, monkeypatch):
    import os

    from safetensors.torch import save_file

    for kind in ("diffusion_models", "vae", "text_encoders"):
        (tmp_path / kind).mkdir()
        (tmp_path / kind / "broken.safetensors").write_bytes(os.urandom(3000))
    save_file({"x_embedder.proj.weight": torch.zeros(8, 4, 1, 2, 2), "spatial_blocks.0.scale_shift_table":
               torch.zeros(6, 8)}, str(tmp_path / "diffusion_models" / "partial.safetensors"))
    monkeypatch.setitem(host._settings, "models_dir", tmp_path)
    return tmp_path


@pytest.mark.parametrize("kind, node, source", [
    ("diffusion_models", lambda: loaders.OpenSoraModelLoader().load("broken.safetensors", "fp32", "sdpa"),
     "hpcai-tech/OpenSora-STDiT-v3"),
    ("vae", lambda: loaders.OpenSoraVAELoader().load("broken.safetensors", "fp32"), "hpcai-tech/OpenSora-VAE-v1.2"),
    ("text_encoders", lambda: loaders.OpenSoraTextEncoderLoader().load("broken.safetensors", "fp32", 300),
     "DeepFloyd/t5-v1_1-xxl"),
])
def test_loader_errors_name_the_file_and_where_files_come_from(model_folder, kind, node, source):
    with pytest.raises(loaders.ModelFileError) as err:
        node()
    message = str(err.value)
    assert "'broken.safetensors' cannot be loaded" in message
    assert str(model_folder / kind / "broken.safetensors") in message
    assert "damaged or was cut short" in message and source in message and "models/" in message
    assert "SafetensorError" not in type(err.value).__name__


def test_loader_error_for_a_checkpoint_it_cannot_read_has_no_sdk_only_advice(model_folder):
    with pytest.raises(loaders.ModelFileError) as err:
        loaders.OpenSoraModelLoader().load("partial.safetensors", "fp32", "sdpa")
    message = str(err.value)
    assert "config=" not in message and "STDiT3Config" not in message
    assert "partial.safetensors" in message and "config.json" in message and "pick 'name/'" in message


def test_full_seed_range_maps_deterministically(models):
    model, _, te = models
    top = 2**64 - 1
    spec = sampler.sampling_inputs()["seed"][1]
    assert spec["min"] == 0 and spec["max"] == top
    assert sampler.generator_seed(42) == 42 and sampler.generator_seed(2**63 - 4097) == 2**63 - 4097
    assert sampler.generator_seed(top) == top % (2**63 - 4096) == sampler.generator_seed(top)
    with pytest.raises(ValueError, match="seed=18446744073709551616"):
        sampler.generator_seed(2**64)
    embeds = text.encode_prompt(te, "a cat")
    run = lambda seed: sampler.OpenSoraSampler().sample(  # noqa: E731
        model, embeds, latent.empty_latent(32, 32, 17, 24), seed, 1, 7.0, True)[0]
    a, b, c = run(top), run(top), run(sampler.generator_seed(top))
    assert a["seed"] == top and torch.equal(a["samples"], b["samples"]) and torch.equal(a["samples"], c["samples"])


# --------------------------------------------------------------------------------------------
# Image fitting and thumbnails
# --------------------------------------------------------------------------------------------


def test_image_condition_fit_choice(models):
    from opensora_sdk.fit import fit_pixels
    from opensora_sdk.video_io import resize_crop

    spec = conditioning.OpenSoraImageCondition.INPUT_TYPES()
    widgets = [k for k, v in {**spec["required"], **spec["optional"]}.items() if v[0] != "IMAGE"
               and not str(v[0]).startswith("OPENSORA_")]
    assert widgets[-1] == "fit" and spec["optional"]["fit"][1]["default"] == "crop"  # appended last

    wide = torch.rand(3, 1, 16, 64) * 2 - 1  # 4:1 image into a square output
    padded = fit_pixels(wide, 32, 32, "pad")
    assert padded.shape == (3, 1, 32, 32) and (padded[:, :, :12] == -1).all() and (padded[:, :, 20:] == -1).all()
    assert (padded[:, :, 12:20] > -1).any()
    stretched = fit_pixels(wide, 32, 32, "stretch")
    assert stretched.shape == (3, 1, 32, 32) and stretched.min() >= -1 and stretched.max() <= 1
    u8 = ((wide.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 3, 0).numpy()
    assert torch.equal(fit_pixels(wide, 32, 32, "crop"), resize_crop(u8, 32, 32, mode="bicubic"))
    with pytest.raises(ValueError, match="fit='zoom'"):
        fit_pixels(wide, 32, 32, "zoom")

    image = torch.rand(1, 16, 64, 3)
    node = conditioning.OpenSoraImageCondition()
    crop = node.add(image, 0, 0, 0.0, 0)[0]  # a saved workflow without the widget: today's behaviour
    pad = node.add(image, 0, 0, 0.0, 0, fit="pad")[0]
    assert crop.items[0].fit == "crop" and pad.items[0].fit == "pad"  # the SDK fits at sampling
    from opensora_sdk.conditioning import condition_pixels

    assert torch.equal(condition_pixels(pad.items[0], 32, 32)[:, 0], fit_pixels(pad.items[0].image[:, None], 32, 32, "pad")[:, 0])
    model, vae_, te = models
    out = sampler.OpenSoraSampler().sample(model, text.encode_prompt(te, "a cat"), latent.empty_latent(32, 32, 17, 24),
                                           0, 1, 7.0, True, vae_, pad)[0]
    assert out["samples"].shape == (1, 4, 5, 4, 4)


def test_every_builtin_workflow_has_a_thumbnail():
    from PIL import Image

    from workflows.inputs.make_thumbnails import thumbnail

    for path in sorted((ROOT / "workflows").glob("*.json")):
        if "v11" in path.stem:  # needs the released v1.1 models (see make_thumbnails.py)
            continue
        thumb = path.with_suffix(".jpg")  # what ComfyUI's template browser asks for
        assert thumb.is_file(), f"{thumb.name} missing: python workflows/inputs/make_thumbnails.py"
        assert thumb.stat().st_size < 60_000
        with Image.open(thumb) as img:
            assert img.size == (256, 256)
    import numpy as np

    assert thumbnail(np.zeros((17, 64, 64, 3), np.uint8)).size == (256, 256)
    assert thumbnail(np.zeros((1, 64, 32, 3), np.uint8)).size == (256, 256)


def test_long_video_batch_gives_one_image_per_video(models):
    model, vae_, te = models
    embeds = text.encode_prompt(te, "a boat")
    empty = latent.empty_latent(32, 32, 34, 12.0)
    empty["samples"] = torch.zeros(2, *empty["samples"].shape[1:])
    frames, fps = video.OpenSoraLongVideo().generate(model, vae_, embeds, empty, 2, 5, 0.0, 3, 1, 1.0, True, 0, 64)
    assert len(frames) == 2 and all(f.shape[0] == 51 for f in frames)


# --------------------------------------------------------------------------------------------
# In a real ComfyUI (skipped without one): the shared harness starts a CPU server with this pack
# --------------------------------------------------------------------------------------------


def _harness(tmp_path, *args) -> tuple[int, dict, str]:
    import os
    import subprocess
    import sys

    comfy_dir = Path(os.environ.get("COMFY_DIR", "/tmp/comfyui"))
    venv = Path(os.environ.get("COMFY_VENV", "/tmp/comfyvenv"))
    script = Path(os.environ.get("OPENSORA_COMFY_HARNESS", ROOT.parent / "shared" / "comfy" / "run_workflow.py"))
    missing = [what for what, there in (
        (f"a ComfyUI checkout (COMFY_DIR={comfy_dir})", (comfy_dir / "main.py").is_file()),
        (f"its Python environment (COMFY_VENV={venv})", (venv / "bin" / "python").is_file()),
        (f"the run_workflow.py harness (OPENSORA_COMFY_HARNESS={script})", script.is_file()),
    ) if not there]
    if missing:
        pytest.skip("no real ComfyUI to run in: missing " + ", ".join(missing))
    out = tmp_path / "out"
    done = subprocess.run([sys.executable, str(script), "--comfy-dir", str(comfy_dir), "--venv", str(venv),
                           "--custom-node", str(ROOT), "--out", str(out), *args],
                          capture_output=True, text=True, timeout=1200)
    result = json.loads((out / "result.json").read_text()) if (out / "result.json").is_file() else {}
    return done.returncode, result, done.stderr


def test_real_comfyui_batch_gives_two_files_per_saver(tmp_path):
    workflow = ROOT / "workflows" / "opensora_text_to_video.json"
    rc, result, log = _harness(tmp_path, "--workflow", str(workflow), "--set", "5.batch_size=2", "--set", "6.steps=2")
    assert rc == 0, log[-3000:]
    files = sorted(Path(f["path"]).name for w in result["workflows"] for f in w["files"])
    assert files == ["t2v_00001_.mp4", "t2v_00002_.mp4", "t2v_core_00001_.mp4", "t2v_core_00002_.mp4"], files


def test_real_comfyui_interrupt_stops_a_long_step(tmp_path):
    """Steps of a 512x512 video take long on a CPU; /interrupt 20 s in stops it between blocks."""
    workflow = ROOT / "workflows" / "opensora_text_to_video.json"
    start = time.perf_counter()
    rc, result, log = _harness(tmp_path, "--workflow", str(workflow), "--set", "5.width=512", "--set", "5.height=512",
                               "--set", "5.num_frames=34", "--set", "6.steps=1000", "--interrupt-after", "20",
                               "--expect-error")
    assert rc == 0 and result["workflows"][0]["status"] != "success", log[-3000:]
    events = [(e.get("event"), e.get("node_type")) for e in result["workflows"][0]["errors"]]
    assert events == [("execution_interrupted", "OpenSoraSampler")], events  # stopped, not crashed
    assert time.perf_counter() - start < 300


def test_real_comfyui_runs_every_example_workflow(tmp_path):
    """Every shipped workflow as the editor would queue it (UI format converted with /object_info, so a
    widget added to a node without updating the workflows shows up here), on the built-in models, at
    its own settings; the v1.1 one needs the released weights, so it must be rejected by ComfyUI's own
    validation (model not in the list), not fail inside a node."""
    inputs = ROOT / "workflows" / "inputs"
    flows = sorted(p for p in (ROOT / "workflows").glob("*.json") if "v11" not in p.stem)
    args = [a for p in flows for a in ("--workflow", str(p))]
    args += [a for f in ("opensora_example.png", "opensora_example_end.png", "opensora_example.mp4")
             for a in ("--input-file", str(inputs / f))]
    rc, result, log = _harness(tmp_path, *args, "--xfail", str(ROOT / "workflows" / "opensora_v11_text_to_video.json"))
    assert rc == 0, log[-3000:]
    runs = {Path(w["workflow"]).stem: w for w in result["workflows"]}
    assert [runs[p.stem]["status"] for p in flows] == ["success"] * len(flows), log[-3000:]
    assert all(runs[p.stem]["files"] for p in flows)
    rejected = runs["opensora_v11_text_to_video"]
    assert rejected["status"] == "rejected", rejected
    kinds = {e["type"] for n in rejected["response"]["node_errors"].values() for e in n["errors"]}
    assert kinds == {"value_not_in_list"}, rejected["response"]
