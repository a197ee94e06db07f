"""Every workflow in workflows/ runs headless on the built-in model; the files it saves carry
the workflow; `opensora workflow run` (editor and API format, --set, errors, exit codes)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from comfy_nodes import comfy_host as host
from comfy_nodes import headless

ROOT = Path(__file__).resolve().parents[1]
WORKFLOWS = sorted((ROOT / "workflows").glob("*.json"))
INPUTS = ROOT / "workflows" / "inputs"

# what each workflow must save: (file name prefix, frames of each video or (height, width) of an image)
EXPECTED = {
    "opensora_text_to_video.json": {"t2v_00001_.mp4": 17, "t2v_core_00001_.mp4": 17},
    "opensora_image_to_video.json": {"i2v_00001_.mp4": 17},
    "opensora_first_last_frame.json": {"first_last_00001_.mp4": 17},
    "opensora_video_extension.json": {"extend_00001_.mp4": 34},  # the 17 given frames + 17 new
    "opensora_long_video.json": {"long_00001_.mp4": 51},  # 2 loops of 34 frames sharing 17
    "opensora_text_to_image.json": {"t2i_00001_.png": 1},
    "opensora_lora.json": {"lora_00001_.mp4": 17},  # the built-in model + the shipped "big" adapter
    "opensora_v11_text_to_video.json": {"v11_00001_.mp4": 16},  # on tiny v1.1 models, see below
}
# Workflows for models that do not ship with the pack: the folder each loader names.
NOT_BUILTIN = {"opensora_v11_text_to_video.json": ["OpenSora-STDiT-v2-stage3/", "sd-vae-ft-ema/", "t5-v1_1-xxl/"]}
BUILTIN_WORKFLOWS = [p for p in WORKFLOWS if p.name not in NOT_BUILTIN]


def test_every_workflow_is_listed_and_inputs_are_small():
    assert sorted(p.name for p in WORKFLOWS) == sorted(EXPECTED)
    for path in INPUTS.iterdir():
        assert path.stat().st_size < 200_000, path.name


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.stem)
def test_workflow_converts_strictly(path):
    """Widget values line up one for one with the node definitions (no drift)."""
    data = json.loads(path.read_text())
    prompt = headless.editor_to_api(data, headless.node_classes(), strict=True)
    errors = headless.validate(prompt, headless.node_classes())
    if path.name in NOT_BUILTIN:  # its models are not installed here: only the loaders' choices may be missing
        errors = [e for e in errors if not ("Loader: input" in e and "is not one of" in e)]
    assert errors == []
    loaders = [n for n in prompt.values() if n["class_type"].endswith("Loader")]
    wanted = NOT_BUILTIN.get(path.name, ["(built-in)"] * len(loaders))
    assert loaders and sorted(list(n["inputs"].values())[0] for n in loaders) == sorted(wanted)


@pytest.mark.parametrize("path", BUILTIN_WORKFLOWS, ids=lambda p: p.stem)
def test_workflow_runs_headless(path, tmp_path, monkeypatch):
    from opensora_sdk.video_io import read_metadata, read_video

    monkeypatch.setitem(host._settings, "output_dir", tmp_path)
    monkeypatch.setitem(host._settings, "input_dir", INPUTS)
    data = json.loads(path.read_text())
    _, files = headless.run_workflow(data)
    assert sorted(f.name for f in files) == sorted(EXPECTED[path.name])
    for file in files:
        frames, _ = read_video(file)
        assert len(frames) == EXPECTED[path.name][file.name]
        meta = read_metadata(file)
        assert json.loads(meta["workflow"]) == data
        assert json.loads(meta["prompt"]) == headless.editor_to_api(data, headless.node_classes())


def test_v11_workflow_runs_on_tiny_official_format_models(tmp_path, monkeypatch):
    """The v1.1 workflow on tiny random models written as the released ones are laid out: an
    STDiT2 Hugging Face folder (config.json model_type "stdit2"), a diffusers SD VAE folder and
    a T5 folder, under the names the workflow's loaders pick; size and steps made small."""
    from opensora_sdk.pipeline import OpenSoraPipeline
    from opensora_sdk.video_io import read_metadata, read_video

    tiny = OpenSoraPipeline.from_preset("tiny-random-v1.1", device="cpu", progress=False)
    models = tmp_path / "models"
    tiny.transformer.save_pretrained(models / "diffusion_models" / "OpenSora-STDiT-v2-stage3")
    tiny.vae.save_pretrained(models / "vae" / "sd-vae-ft-ema")
    tiny.text_encoder.model.save_pretrained(str(models / "text_encoders" / "t5-v1_1-xxl"))
    tiny.text_encoder.tokenizer.save_pretrained(str(models / "text_encoders" / "t5-v1_1-xxl"))
    monkeypatch.setitem(host._settings, "models_dir", models)
    monkeypatch.setitem(host._settings, "output_dir", tmp_path / "out")
    path = ROOT / "workflows" / "opensora_v11_text_to_video.json"
    data = json.loads(path.read_text())
    sets = ["Open-Sora Empty Latent Video.resolution=custom", "Open-Sora Empty Latent Video.width=64",
            "Open-Sora Empty Latent Video.height=64", "Open-Sora Sampler.steps=3",
            "Open-Sora Text Encode.prompt=a red panda"]  # fmt: skip
    _, files = headless.run_workflow(data, sets)
    assert [f.name for f in files] == list(EXPECTED[path.name])
    frames, fps = read_video(files[0])
    assert frames.shape == (16, 64, 64, 3) and fps == 8.0  # 24 fps to the model, saved at 24 / 3
    assert json.loads(read_metadata(files[0])["workflow"]) == data


def test_api_format_overrides_and_validation(tmp_path, monkeypatch):
    from opensora_sdk.video_io import read_metadata, read_video

    monkeypatch.setitem(host._settings, "output_dir", tmp_path)
    data = json.loads((ROOT / "workflows" / "opensora_text_to_image.json").read_text())
    prompt = headless.editor_to_api(data, headless.node_classes())
    _, files = headless.run_workflow(prompt, ["Open-Sora Empty Latent Video.width=32"])
    frames, _ = read_video(files[0])
    assert frames.shape[1:3] == (64, 32)
    meta = read_metadata(files[0])  # an API prompt has no editor workflow to embed
    assert "workflow" not in meta and json.loads(meta["prompt"])["5"]["inputs"]["width"] == 32
    with pytest.raises(headless.NodeFailed, match=r"EmptyLatentVideo: ValueError: width=100 is not allowed.*multiple of 8"):
        headless.run_workflow(prompt, ["Open-Sora Empty Latent Video.width=100"])  # two-widget rule: at run time
    with pytest.raises(headless.WorkflowError, match=r"input 'steps': 0 is smaller than the minimum 1"):
        headless.run_workflow(prompt, ["Open-Sora Sampler.steps=0"])
    with pytest.raises(headless.WorkflowError, match="no node matches 'Nope'"):
        headless.run_workflow(prompt, ["Nope.steps=1"])
    with pytest.raises(headless.WorkflowError, match="expected NODE.INPUT=VALUE"):
        headless.run_workflow(prompt, ["steps"])
    with pytest.raises(headless.WorkflowError, match=r"Sampler: it has no input 'stpes'; its inputs: \[.*'steps'"):
        headless.run_workflow(prompt, ["Open-Sora Sampler.stpes=3"])  # a misspelt input fails before anything runs


def _cli(*args, cwd):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "opensora_sdk", *args], capture_output=True, text=True, cwd=cwd,
                          env=env, timeout=300)


def test_cli_workflow_run(tmp_path):
    wf = str(ROOT / "workflows" / "opensora_text_to_image.json")
    out = _cli("workflow", "run", wf, "--set", "Open-Sora Sampler.seed=3", "--set", "SaveImage.filename_prefix=cli/img",
               "--output-dir", str(tmp_path / "out"), "--quiet", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    saved = Path(out.stdout.strip())
    assert saved == tmp_path / "out" / "cli" / "img_00001_.png" and saved.is_file()

    bad = _cli("workflow", "run", wf, "--set", "Open-Sora Empty Latent Video.num_frames=999", cwd=tmp_path)
    assert bad.returncode == 2 and "input 'num_frames': 999 is bigger than the maximum 408" in bad.stderr
    i2v = str(ROOT / "workflows" / "opensora_image_to_video.json")
    failed = _cli("workflow", "run", i2v, "--input-dir", str(tmp_path), cwd=tmp_path)
    assert failed.returncode == 1 and "LoadImage: FileNotFoundError: input file 'opensora_example.png'" in failed.stderr
    missing = _cli("workflow", "run", str(tmp_path / "nope.json"), cwd=tmp_path)
    assert missing.returncode == 2 and "cannot read" in missing.stderr
    unknown = tmp_path / "unknown.json"
    unknown.write_text(json.dumps({"1": {"class_type": "KSampler", "inputs": {}}}))
    out = _cli("workflow", "run", str(unknown), cwd=tmp_path)
    assert out.returncode == 2 and "KSampler" in out.stderr


def test_cli_help_does_not_import_the_pack():
    code = "import sys; from opensora_sdk.cli import build_parser; build_parser(); print('comfy_nodes' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "False", out.stderr
