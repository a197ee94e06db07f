"""training/recipes/tiny_builtin.py end to end at toy sizes: every step runs, stage 2 starts
from stage 1's weights, the export loads as a pipeline and generates, and raising max_steps
continues the transformer's run."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
TOY = [
    "--num-train", "24", "--threads", "2", "--steps", "data,vae,vae_stills,t5,stdit3,scenes,stdit3_scenes,export",
    "--vae-set", "spatial.steps=2", "--vae-set", "temporal.steps=2", "--vae-set", "joint.steps=2",
    "--vae-set", "eval_clips=2", "--vae-set", "normalize_clips=4", "--vae-set", "max_clips=24",
    "--vae-set", "temporal_cache_clips=4", "--vae-set", "decoder.steps=2", "--stdit3-set", "ckpt_every=1",
    "--stdit3-set", "data.buckets={64px: {17: [1.0, 4]}}", "--stdit3-set", "optim.decay_steps=0",
    "--stdit3-set", "max_steps=2", "--scenes-set", "ckpt_every=1", "--scenes-set", "optim.decay_steps=0",
    "--scenes-set", "data.buckets={64px: {1: [1.0, 4], 17: [1.0, 4], 34: [1.0, 4]}}",
]  # fmt: skip


def recipe(work: Path, *args: str) -> str:
    cmd = [sys.executable, "training/recipes/tiny_builtin.py", "--work", str(work), *TOY, *args]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout


@pytest.mark.slow
def test_recipe_runs_exports_and_continues(tmp_path):
    import torch

    from opensora_sdk.pipeline import OpenSoraPipeline
    from opensora_sdk.presets import get_preset

    work = tmp_path / "work"
    shipped = tmp_path / "shipped"  # --export: the package's copy, replaced whole
    out = recipe(work, "--scenes-set", "max_steps=2", "--export", str(shipped))
    for step in ("data", "vae", "vae_stills", "t5", "stdit3", "scenes", "stdit3_scenes", "export"):
        assert f"== {step}: " in out
    info = json.loads((work / "export" / "training.json").read_text())
    assert info["stdit3_steps"] == 2 and info["stdit3_scenes_steps"] == 2
    assert info["recipe"] == "training/recipes/tiny_builtin.py"
    assert f"model.from_pretrained={work / 'stdit3' / 'checkpoints' / 'step-00000002' / 'ema'}" in out  # stage 1's EMA
    card = json.loads((work / "stdit3_scenes" / "checkpoints" / "step-00000002" / "ema" / "generation.json").read_text())
    assert card["defaults"]["timestep_warp"] is False  # trained without the warp (use_timestep_transform: false)
    with open(work / "data" / "scenes" / "train.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    windows = {r["path"].split("/")[0]: r for r in rows}
    assert sorted(windows) == ["continue34", "head17", "head34", "loop2", "still"] and len(rows) == 5 * 24
    assert {w: (int(r["num_frames"]), r["frame_mask"]) for w, r in windows.items()} == {
        "head17": (52, ""), "head34": (102, ""), "continue34": (102, "chunk_head"), "loop2": (102, "chunk_head"), "still": (1, "")}
    for part in ("transformer", "vae", "text_encoder"):
        assert list((work / "export" / part).glob("*.safetensors"))
    first = json.loads((work / "times.json").read_text())

    preset = get_preset("builtin")
    d = work / "export"
    pipe = OpenSoraPipeline.from_pretrained(d / "transformer", d / "vae", d / "text_encoder", device="cpu",
                                            progress=False, defaults=preset.defaults,
                                            max_latent_frames=preset.max_latent_frames)  # fmt: skip
    assert next(pipe.transformer.parameters()).dtype == torch.float32  # float16 files, float32 compute on CPU
    video = pipe("a red circle moving left on a black background", num_frames=17, num_steps=2, seed=0)
    assert (video.num_frames, video.height, video.width) == (17, 64, 64)

    again = recipe(work, "--scenes-set", "max_steps=3", "--export", str(shipped))  # more steps: resumes, re-exports
    for step in ("data", "vae", "vae_stills", "t5", "stdit3", "scenes"):
        assert f"== {step}: done already" in again
    assert "--resume latest" in again and "== export: " in again
    assert json.loads((work / "export" / "training.json").read_text())["stdit3_scenes_steps"] == 3
    assert json.loads((shipped / "training.json").read_text())["stdit3_scenes_steps"] == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["shipped", "work"]  # no staged or old copy left
    second = json.loads((work / "times.json").read_text())
    assert second["stdit3_scenes"]["wall_s"] > first["stdit3_scenes"]["wall_s"]  # the resumed run adds its time
    assert second["vae"] == first["vae"] and second["stdit3"] == first["stdit3"]


@pytest.mark.slow
def test_decoder_stage_keeps_the_latent_space(tmp_path):
    """Stage D from a trained VAE (--init, --start-stage decoder), here on stills only
    (decoder.image_prob 1, as the recipe's vae_stills step does on half of its steps): encoders,
    2D decoder and shift / scale stay bit-identical (a diffusion model trained on its latents
    stays valid); only the temporal decoder learns."""
    from safetensors.torch import load_file

    from opensora_sdk.presets import BUILTIN_DIR
    from opensora_sdk.training import synthetic
    from opensora_sdk.training.shapes_benchmark import BUILTIN_STYLE

    data = synthetic.generate_dataset(tmp_path / "data", 6, size=64, num_frames=52, style=BUILTIN_STYLE)
    out = tmp_path / "vae"
    cmd = [sys.executable, "training/train_vae.py", "--config", "training/configs/tiny_vae.yaml", "--init",
           str(BUILTIN_DIR / "vae"), "--start-stage", "decoder", "--output-dir", str(out), "--set", f"data_csv={data}",
           "--set", "decoder.steps=2", "--set", "decoder.image_prob=1.0", "--set", "eval_clips=2",
           "--set", "cpu_threads=2"]  # fmt: skip
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    before = {k: v.float() for k, v in load_file(str(BUILTIN_DIR / "vae" / "model.safetensors")).items()}
    after = load_file(str(out / "vae" / "model.safetensors"))
    assert before.keys() == after.keys()
    changed = {k for k in before if not torch.equal(before[k], after[k].float())}
    assert changed and all(k.startswith(("temporal_vae.decoder.", "temporal_vae.post_quant_conv.")) for k in changed)
    config = json.loads((out / "vae" / "config.json").read_text())
    assert config["shift"] == json.loads((BUILTIN_DIR / "vae" / "config.json").read_text())["shift"]
    assert json.loads((out / "summary.json").read_text())["video_psnr_db"] > 15
    logged = [json.loads(line) for line in (out / "logs" / "vae_log.jsonl").read_text().splitlines()]
    assert logged[-1]["stage"] == "decoder" and logged[-1]["still_psnr"] > 10 and "i2v_psnr" not in logged[-1]

    no_init = cmd[:4] + cmd[6:]  # the same without --init
    bad = subprocess.run(no_init, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert bad.returncode != 0 and "--start-stage decoder needs --init" in bad.stderr
