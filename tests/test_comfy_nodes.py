"""The ComfyUI node pack without ComfyUI: node contracts, parity with the pipeline, loading
from model folders, progress / interruption, validation messages, saving with metadata."""

from __future__ import annotations

import inspect
import json
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch

import comfy_nodes
from comfy_nodes import comfy_host as host
from comfy_nodes import conditioning, latent, loaders, sampler, text, vae, video

ROOT = Path(__file__).resolve().parents[1]
NODES = comfy_nodes.NODE_CLASS_MAPPINGS
WIDGETS = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}


# --------------------------------------------------------------------------------------------
# Contracts
# --------------------------------------------------------------------------------------------


def test_ids_prefixed_unique_and_named():
    assert len(NODES) >= 12
    assert all(node_id.startswith("OpenSora") for node_id in NODES)
    assert set(comfy_nodes.NODE_DISPLAY_NAME_MAPPINGS) == set(NODES)
    labels = list(comfy_nodes.NODE_DISPLAY_NAME_MAPPINGS.values())
    assert len(set(labels)) == len(labels)


@pytest.mark.parametrize("node_id", sorted(NODES))
def test_node_contract(node_id):
    cls = NODES[node_id]
    spec = cls.INPUT_TYPES()
    assert set(spec) <= {"required", "optional", "hidden"} and spec["required"]
    assert cls.CATEGORY.startswith("OpenSora") and cls.DESCRIPTION
    assert isinstance(cls.RETURN_TYPES, tuple)
    assert len(getattr(cls, "RETURN_NAMES", cls.RETURN_TYPES)) == len(cls.RETURN_TYPES)
    if hasattr(cls, "OUTPUT_TOOLTIPS"):
        assert len(cls.OUTPUT_TOOLTIPS) == len(cls.RETURN_TYPES)
    assert cls.RETURN_TYPES or getattr(cls, "OUTPUT_NODE", False)
    function = getattr(cls(), cls.FUNCTION)
    assert callable(function)
    params = inspect.signature(function).parameters
    names = {**spec["required"], **spec.get("optional", {})}
    for name in list(names) + list(spec.get("hidden", {})):
        assert name in params, f"{node_id}.{cls.FUNCTION} does not take input {name!r}"
    for name, entry in names.items():
        kind, opts = entry[0], entry[1] if len(entry) > 1 else {}
        assert opts.get("tooltip"), f"{node_id}.{name} has no tooltip"
        assert isinstance(kind, list) or isinstance(kind, str) and kind
        if isinstance(kind, list):
            assert kind and opts.get("default", kind[0]) in kind, f"{node_id}.{name} default not among the options"
        elif kind in ("INT", "FLOAT"):
            default = opts["default"]
            assert isinstance(default, int if kind == "INT" else (int, float)) and not isinstance(default, bool)
            assert opts.get("min", default) <= default <= opts.get("max", default), f"{node_id}.{name} out of range"
        elif kind == "BOOLEAN":
            assert isinstance(opts["default"], bool)
        elif kind == "STRING":
            assert isinstance(opts.get("default", ""), str)
        else:
            assert kind.startswith("OPENSORA_") or kind in ("IMAGE", "LATENT"), f"{node_id}.{name}: unexpected {kind}"
    validator = getattr(cls, "VALIDATE_INPUTS", None)
    if validator is not None:
        assert set(inspect.getfullargspec(validator).args) - {"cls"} <= set(names)
        defaults = {a: names[a][1].get("default", names[a][0][0] if isinstance(names[a][0], list) else None)
                    for a in inspect.getfullargspec(validator).args if a != "cls"}
        assert validator(**defaults) is True, f"{node_id}: defaults fail VALIDATE_INPUTS"


def test_pack_import_touches_no_comfyui_and_lists_no_folder(tmp_path):
    """Importing the pack (as ComfyUI does, the repo root as a package) imports no ComfyUI
    module and no model code, and lists no folder."""
    code = (
        "import importlib.util, os, sys\n"
        f"spec = importlib.util.spec_from_file_location('pack', {str(ROOT / '__init__.py')!r}, "
        f"submodule_search_locations=[{str(ROOT)!r}])\n"
        "pack = importlib.util.module_from_spec(spec); sys.modules['pack'] = pack; spec.loader.exec_module(pack)\n"
        "listed = []\n"
        "os.listdir = lambda *a: listed.append(a)\n"
        "assert len(pack.NODE_CLASS_MAPPINGS) >= 12\n"
        "bad = [m for m in ('folder_paths', 'comfy', 'transformers', 'opensora_sdk.models') if m in sys.modules]\n"
        "assert not bad, bad\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


# --------------------------------------------------------------------------------------------
# Building blocks
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def models():
    model = loaders.load_model(loaders.BUILTIN, "fp32")
    return model, loaders.load_vae(loaders.BUILTIN, "fp32"), loaders.load_text_encoder(loaders.BUILTIN, "fp32")


@pytest.fixture(scope="module")
def pipe():
    from opensora_sdk.pipeline import OpenSoraPipeline
    from opensora_sdk.presets import builtin_preset

    return OpenSoraPipeline.from_preset(builtin_preset(), device="cpu", dtype=torch.float32, progress=False)


def test_the_sampler_switch_turns_the_models_own_timestep_warp_on_or_off(models):
    """The built-in model was trained without the timestep warp: its schedule has none, switch
    on or off (the SDK's default for it too); a v1.2 model's switch on is the official warp."""
    import dataclasses

    from comfy_nodes.sampler import plan_for_latent

    model, vae_, te = models
    embeds = text.OpenSoraTextEncode().encode(te, "a cat", "", 6.5, -1.0, "none")[0]
    empty = latent.OpenSoraEmptyLatentVideo().create("custom", "9:16", "custom", 64, 64, 17, 8.0, 1)[0]

    def warped(m, switch):
        plan = plan_for_latent(m, embeds, empty, vae=vae_, seed=0, steps=10, cfg=5.0, timestep_warp=switch)
        return plan.scheduler.use_timestep_transform

    assert model.timestep_warp is False and not warped(model, True) and not warped(model, False)
    v12 = dataclasses.replace(model, timestep_warp=True)  # what a v1.2 checkpoint loads as
    assert warped(v12, True) and not warped(v12, False)


def _uint8(images: torch.Tensor) -> np.ndarray:
    return images.mul(255).add(0.5).clamp(0, 255).to(torch.uint8).numpy()


def test_nodes_match_the_pipeline_with_conditions(models, pipe):
    """Same seed and settings: the graph gives the pipeline's video, pixel for pixel."""
    from opensora_sdk.conditioning import ImageCondition

    model, vae_, te = models
    image = torch.rand(1, 40, 48, 3)
    conds = conditioning.OpenSoraImageCondition().add(image, 0, 0, 0.0, 0)[0]
    conds = conditioning.OpenSoraImageCondition().add(image, -1, 0, 0.0, 0, conds)[0]
    embeds = text.OpenSoraTextEncode().encode(te, "a cat", "blurry", 6.5, 5.0, "pan left")[0]
    empty = latent.OpenSoraEmptyLatentVideo().create("custom", "9:16", "custom", 32, 32, 34, 24.0, 1)[0]
    out = sampler.OpenSoraSampler().sample(model, embeds, empty, 7, 2, 7.0, True, vae_, conds, 5)[0]
    (frames,), fps = vae.OpenSoraVAEDecode().decode(vae_, out, 0, 64)  # one IMAGE per video
    px = image[0].permute(2, 0, 1) * 2 - 1
    expected = pipe("a cat", negative_prompt="blurry", motion_score=5.0, camera_motion="pan left", height=32,
                    width=32, num_frames=34, fps=24, num_steps=2, guidance_scale=7.0, seed=7, align=5,
                    conditions=[ImageCondition(px, 0), ImageCondition(px, -1)])
    assert fps == 24.0 and tuple(frames.shape) == (34, 32, 32, 3)
    assert out["samples"].shape == (1, 4, 10, 4, 4) and out["num_frames"] == 34
    np.testing.assert_array_equal(_uint8(frames), expected.frames)
    blank = text.OpenSoraTextEncode().encode(te, "a cat", "  ", 6.5, 5.0, "pan left")[0]
    assert blank.negative is None  # white space is no negative prompt, as in the SDK's plan_prompts


def test_long_video_matches_pipeline_loops(models, pipe):
    model, vae_, te = models
    embeds = text.OpenSoraTextEncode().encode(te, "|0|a boat|1|a boat at sunset", "", 6.5, -1.0, "none")[0]
    empty = latent.empty_latent(32, 32, 34, 12.0)
    (frames,), fps = video.OpenSoraLongVideo().generate(model, vae_, embeds, empty, 2, 5, 0.0, 3, 2, 7.0, True, 0, 64)
    expected = pipe("|0|a boat|1|a boat at sunset", height=32, width=32, num_frames=34, num_steps=2,
                    guidance_scale=7.0, seed=3, loop=2, fps=12)
    assert fps == 12.0 and frames.shape[0] == 51
    np.testing.assert_array_equal(_uint8(frames), expected.frames)


def test_bad_sizes_are_rejected_with_clear_messages(models):
    check = latent.resolve_size  # run when the node runs; ComfyUI checks each widget's options and range itself
    assert check("custom", "9:16", "custom", 424, 240, 51) == (240, 424, 51)
    assert check("240p", "9:16", "4s", 100, 64, 1)[:2] == (240, 426)  # width/height ignored with a table size
    with pytest.raises(ValueError, match="width=100 .*multiple of 8"):
        check("custom", "9:16", "custom", 100, 64, 17)
    with pytest.raises(ValueError, match="num_frames=500 .*1..408.*OpenSoraLongVideo"):
        check("custom", "9:16", "custom", 64, 64, 500)
    with pytest.raises(ValueError, match="resolution='999p'"):
        check("999p", "9:16", "2s", 64, 64, 17)
    with pytest.raises(ValueError, match="height=20"):
        latent.OpenSoraEmptyLatentVideo().create("custom", "9:16", "custom", 64, 20, 17, 24.0, 1)
    assert "tile_size=40" in vae.OpenSoraVAEDecode.VALIDATE_INPUTS(40)
    with pytest.raises(ValueError, match="tile_overlap=256 is not allowed with tile_size=256"):
        vae.make_tiling(256, 256)
    with pytest.raises(ValueError, match="condition_frames=7"):
        model, vae_, te = models
        video.long_video(model, vae_, text.encode_prompt(te, "a cat"), latent.empty_latent(32, 32, 34, 24), loops=2,
                         condition_frames=7, seed=0, steps=1, cfg=1.0)
    with pytest.raises(ValueError, match="multiple of 17|whole 17-frame"):
        model, vae_, te = models  # the loop check is the SDK's plan, before any model runs
        video.long_video(model, vae_, text.encode_prompt(te, "a cat"), latent.empty_latent(32, 32, 30, 24), loops=2,
                         seed=0, steps=1, cfg=1.0)


def test_sampler_input_errors(models):
    model, vae_, te = models
    embeds = text.encode_prompt(te, "a cat")
    wrong = {"samples": torch.zeros(1, 16, 5, 4, 4)}
    with pytest.raises(ValueError, match="16 channels"):
        sampler.OpenSoraSampler().sample(model, embeds, wrong, 0, 1, 7.0, True)
    conds = conditioning.OpenSoraImageCondition().add(torch.rand(1, 8, 8, 3), 0, 0, 0.0, 0)[0]
    with pytest.raises(ValueError, match="vae is not"):
        sampler.OpenSoraSampler().sample(model, embeds, latent.empty_latent(32, 32, 17, 24), 0, 1, 7.0, True,
                                         None, conds)
    with pytest.raises(ValueError, match="inline JSON"):
        text.encode_prompt(te, 'a cat {"reference_path": "x.png"}')


def test_interrupt_stops_between_steps(models):
    model, _, te = models
    embeds = text.encode_prompt(te, "a cat")
    seen = []

    def listener(value, total, preview):
        seen.append((value, total))
        if value == 2:
            host.request_interrupt()

    host.add_progress_listener(listener)
    try:
        with pytest.raises(host.InterruptedByUser):
            sampler.OpenSoraSampler().sample(model, embeds, latent.empty_latent(32, 32, 17, 24), 0, 8, 1.0, True)
    finally:
        host.remove_progress_listener(listener)
    assert seen == [(1, 8), (2, 8)]
    assert next(model.transformer.parameters()).device.type == "cpu"


def test_comfyui_services_are_used_when_present(models, monkeypatch):
    """With ComfyUI's modules present: ProgressBar per step, its interrupt check, devices and
    memory from model_management, models back on the offload device afterwards."""
    calls = {"progress": [], "interrupt": 0, "free": 0, "empty": 0}

    class Interrupted(Exception):
        pass

    class ProgressBar:
        def __init__(self, total):
            self.total = total

        def update_absolute(self, value, total=None, preview=None):
            calls["progress"].append((value, total))
            assert preview == ("JPEG", "image", 512)

    def throw():
        calls["interrupt"] += 1
        if calls.get("stop"):
            raise Interrupted()

    cpu = torch.device("cpu")
    mm = types.SimpleNamespace(
        get_torch_device=lambda: cpu, unet_offload_device=lambda: cpu, vae_offload_device=lambda: cpu,
        text_encoder_offload_device=lambda: cpu, text_encoder_device=lambda: cpu, intermediate_device=lambda: cpu,
        free_memory=lambda n, d: calls.__setitem__("free", calls["free"] + 1),
        soft_empty_cache=lambda: calls.__setitem__("empty", calls["empty"] + 1),
        throw_exception_if_processing_interrupted=throw,
    )
    folder_paths = types.SimpleNamespace(folder_names_and_paths={}, get_folder_paths=lambda k: [])
    monkeypatch.setattr(host, "_comfy", {"mm": mm, "utils": types.SimpleNamespace(ProgressBar=ProgressBar),
                                         "folder_paths": folder_paths})
    class Previewer:
        def decode_latent_to_preview_image(self, fmt, x0):
            calls.setdefault("previews", []).append(tuple(x0.shape))
            return ("JPEG", "image", 512)

    formats = []
    monkeypatch.setitem(sys.modules, "latent_preview", types.SimpleNamespace(
        get_previewer=lambda device, fmt: formats.append(fmt) or Previewer()))
    model, _, te = models
    embeds = text.encode_prompt(te, "a cat")
    out = sampler.OpenSoraSampler().sample(model, embeds, latent.empty_latent(32, 32, 17, 24), 0, 3, 7.0, True)[0]
    # the interrupt is checked before every transformer block (2 x depth per forward) and after every step
    blocks = 2 * model.transformer.config.depth
    assert calls["progress"] == [(1, 3), (2, 3), (3, 3)] and calls["interrupt"] == 3 * (blocks + 1)
    assert calls["empty"] >= 2
    assert calls["previews"] == [(1, 4, 4, 4)] * 3  # the middle latent frame of sample 0
    assert formats[0].latent_channels == 4 and len(formats[0].latent_rgb_factors) == 4
    assert out["samples"].device.type == "cpu"
    calls["stop"] = True
    with pytest.raises(Interrupted):
        sampler.OpenSoraSampler().sample(model, embeds, latent.empty_latent(32, 32, 17, 24), 0, 3, 7.0, True)


# --------------------------------------------------------------------------------------------
# Model folders
# --------------------------------------------------------------------------------------------


def test_loaders_read_hf_folders_and_single_files(tmp_path, models, monkeypatch):
    from safetensors.torch import save_file

    model, vae_, te = models
    model.transformer.save_pretrained(tmp_path / "diffusion_models" / "tiny-stdit")
    (tmp_path / "opensora").mkdir()
    save_file(dict(model.transformer.state_dict()), str(tmp_path / "opensora" / "stdit.safetensors"))
    vae_.vae.save_pretrained(tmp_path / "vae" / "tiny-vae")
    t5_dir = tmp_path / "text_encoders"
    t5_dir.mkdir()
    t5_tensors = {k: v.clone() for k, v in te.encoder.model.state_dict().items() if k != "encoder.embed_tokens.weight"}
    save_file(t5_tensors, str(t5_dir / "t5.safetensors"))  # the tied embedding once, as ComfyUI's T5 files
    te.encoder.tokenizer.save_pretrained(str(t5_dir))
    monkeypatch.setitem(host._settings, "models_dir", tmp_path)

    assert loaders.model_choices("model") == [loaders.BUILTIN, "stdit.safetensors", "tiny-stdit/"]
    # models/opensora is offered to every loader
    assert loaders.model_choices("vae") == [loaders.BUILTIN, "stdit.safetensors", "tiny-vae/"]
    assert loaders.model_choices("text_encoder") == [loaders.BUILTIN, "stdit.safetensors", "t5.safetensors"]
    for choice in ("tiny-stdit/", "stdit.safetensors"):
        loaded = loaders.OpenSoraModelLoader().load(choice, "fp32", "sdpa")[0]
        for (k, a), b in zip(loaded.transformer.state_dict().items(), model.transformer.state_dict().values()):
            assert torch.equal(a, b), k
    loaded_vae = loaders.OpenSoraVAELoader().load("tiny-vae/", "fp32")[0]
    assert torch.equal(next(loaded_vae.vae.parameters()), next(vae_.vae.parameters()))
    loaded_te = loaders.OpenSoraTextEncoderLoader().load("t5.safetensors", "fp32", te.encoder.model_max_length)[0]
    a, b = text.encode_prompt(loaded_te, "a cat"), text.encode_prompt(te, "a cat")
    assert torch.allclose(a.for_loop(0)[0], b.for_loop(0)[0], atol=1e-6)
    # another session: the loader checks the file, T5 stays unloaded for a prompt in the text cache
    again = loaders.OpenSoraTextEncoderLoader().load("t5.safetensors", "fp32", te.encoder.model_max_length)[0]
    assert not again.encoder.is_loaded
    c = text.encode_prompt(again, "a cat")
    assert not again.encoder.is_loaded and torch.equal(c.for_loop(0)[0], a.for_loop(0)[0])
    with pytest.raises(ValueError, match="'stdit.safetensors' is not a T5 v1.1 encoder"):
        loaders.load_text_encoder("stdit.safetensors")
    with pytest.raises(FileNotFoundError, match="missing.safetensors.*not found in the model folders"):
        loaders.load_model("missing.safetensors")
    with pytest.raises(ValueError, match="dtype='fp64'"):
        loaders.load_model(loaders.BUILTIN, "fp64")


# --------------------------------------------------------------------------------------------
# Saving
# --------------------------------------------------------------------------------------------


def test_save_video_embeds_workflow_and_counts(tmp_path, monkeypatch):
    from opensora_sdk.video_io import read_metadata, read_video

    monkeypatch.setitem(host._settings, "output_dir", tmp_path)
    frames = torch.rand(9, 32, 48, 3)
    workflow = {"nodes": [{"id": 1, "type": "OpenSoraSaveVideo"}], "links": []}
    prompt = {"1": {"class_type": "OpenSoraSaveVideo", "inputs": {}}}
    node = video.OpenSoraSaveVideo()
    first = node.save(frames, 12.0, "clips/test", "mp4", 19, prompt, {"workflow": workflow})
    second = node.save(frames, 12.0, "clips/test", "mp4", 19, prompt, {"workflow": workflow})
    entry = first["ui"]["images"][0]
    assert entry == {"filename": "test_00001_.mp4", "subfolder": "clips", "type": "output"}
    assert second["ui"]["images"][0]["filename"] == "test_00002_.mp4" and first["ui"]["animated"] == (True,)
    path = tmp_path / "clips" / "test_00001_.mp4"
    meta = read_metadata(path)
    assert json.loads(meta["workflow"]) == workflow and json.loads(meta["prompt"]) == prompt
    pixels, fps = read_video(path)
    assert pixels.shape == (9, 32, 48, 3) and fps == 12.0
    assert not list(tmp_path.rglob(".*.tmp*")), "temporary files left behind"
    with pytest.raises(ValueError, match="format=png holds one frame"):
        node.save(frames, 12.0, "x", "png", 19)
    with pytest.raises(ValueError, match="outside the output folder"):
        node.save(frames, 12.0, "../escape", "mp4", 19)


# --------------------------------------------------------------------------------------------
# Registry metadata
# --------------------------------------------------------------------------------------------


def test_registry_metadata_and_requirements():
    import tomllib

    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    comfy = config["tool"]["comfy"]
    assert comfy["PublisherId"] and comfy["DisplayName"] and "Icon" in comfy
    assert config["project"]["version"] and config["project"]["name"] == config["project"]["name"].lower()
    lines = (ROOT / "requirements.txt").read_text().splitlines()
    wanted = {line.split(">")[0].split("=")[0].strip().lower() for line in lines if line and not line.startswith("#")}
    sdk = {d.split(">")[0].split("=")[0].strip().lower() for d in config["project"]["dependencies"]}
    assert "torch" not in wanted  # ComfyUI brings its own build
    assert sdk - wanted == {"torch", "accelerate", "pyyaml"}  # the last two only for training


def _comfy_cli():
    exe = Path(sys.executable).with_name("comfy")
    if not exe.is_file():
        pytest.skip("comfy-cli is not installed (pip install -e '.[dev]')")
    return [str(exe), "--skip-prompt", "--no-enable-telemetry", "node"]


def test_comfy_cli_validates_and_packs(tmp_path):
    import zipfile

    clone = tmp_path / "pack"
    subprocess.run(["git", "clone", "-q", str(ROOT), str(clone)], check=True, timeout=120)
    env = {**__import__("os").environ, "HOME": str(tmp_path)}
    validate = subprocess.run(_comfy_cli() + ["validate"], cwd=clone, capture_output=True, text=True, env=env,
                              timeout=300)
    said = validate.stdout + validate.stderr
    assert validate.returncode == 0 and "checks passed" in said and "warnings" not in said, said
    pack = subprocess.run(_comfy_cli() + ["pack"], cwd=clone, capture_output=True, text=True, env=env, timeout=300)
    assert pack.returncode == 0, pack.stdout + pack.stderr
    names = zipfile.ZipFile(clone / "node.zip").namelist()
    for needed in ("__init__.py", "requirements.txt", "pyproject.toml", "comfy_nodes/__init__.py",
                   "opensora_sdk/pipeline.py", "workflows/opensora_text_to_video.json"):
        assert needed in names
    assert not [n for n in names if n.startswith(("tests/", "benchmarks/", "training/"))]
