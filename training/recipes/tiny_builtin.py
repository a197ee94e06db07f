"""The built-in tiny model, from scratch: data -> VAE -> T5 -> features + STDiT3 -> export -> benchmark.

    python training/recipes/tiny_builtin.py                  # everything, into outputs/tiny_builtin
    python training/recipes/tiny_builtin.py --export opensora_sdk/builtin/tiny   # and replace the shipped weights
    python training/recipes/tiny_builtin.py --steps vae,stdit3 --force           # redo some steps

Steps (each one is skipped when its result exists, unless --force names it or an earlier step ran;
stdit3 and stdit3_scenes count as done when they reached max_steps, so raising max_steps
continues the run):

  data       synthetic moving shapes (`stage1_style()`: the built-in style's 6 colours, 3 shapes,
             4 directions, 3 checker backgrounds, 25% camera pans, 5% still shapes), 64x64,
             52 frames at 24 fps (STDiT3 reads every 3rd frame: 17 frames at 8 fps = 2.1 s =
             one VAE chunk = 5 latent frames) in which a moving shape crosses 60-95% of the
             room it has, with the held-out colour x shape x direction triples
             excluded (`held_out_triples`); train.csv holds the captions exactly as the
             pipeline sends them to T5 (`process_prompt`: score suffixes, then cleaning), with
             the aesthetic / motion / camera suffixes each left out at random
  vae        training/train_vae.py with training/configs/tiny_vae.yaml (stages A, B, C, then
             shift / scale from the data, then D: the temporal decoder alone on 8 fps clips)
  vae_stills the temporal decoder again (stage D from vae's result, `VAE_STILLS`): half of the
             steps decode stills (one frame, as text-to-image does), where the clips-only
             decoder gave the prompted colour in 83% of held-out stills; the encoders and
             shift / scale stay frozen, so the latents (and the transformer's features) are vae's
  t5         the tiny T5 encoder (d_model 64, 2 layers) with seeded random weights and the
             built-in tokenizer: T5 is not trained (its random features are distinct per word,
             and the transformer learns to read them)
  stdit3     stage 1: training/train.py with training/configs/tiny_builtin.yaml: features (VAE
             latents + T5 embeddings) computed once, then STDiT3 with frame masks, 10% caption
             drop, EMA, constant learning rate then a linear decay over the last steps
  scenes     stage 2's data (`shapes_benchmark.BUILTIN_STYLE`): scenes of 153 frames at 24 fps
             (51 at 8 fps) over which a moving shape crosses 80-100% of its room, each cut into
             the windows of `scene_windows()`: its head as 17 and 34 frames, 34 frames from a
             random start and from frame 51 (a second loop) with the first chunk given
             (`chunk_head`: extension and loops), and one frame as a still image (text-to-image)
  stdit3_scenes  stage 2: training/train.py with training/configs/tiny_builtin_scenes.yaml from
             stage 1's EMA weights, on the scenes (buckets of 1, 17 and 34 frames)
  export     stage 2's EMA transformer and the VAE as float16 safetensors, T5 as float32, with a
             training.json (seeds, steps, figures) into WORK/export (and --export DIR)
  bench      benchmarks/bench_quality.py on the exported model

Everything is seeded. Threads: --threads (default: torch's choice). On a shared machine one
thread per process is often faster than two (less waiting between threads).
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
STEPS = ("data", "vae", "vae_stills", "t5", "stdit3", "scenes", "stdit3_scenes", "export", "bench")
NUM_TRAIN = 1000  # clips (stage 1) and scenes (stage 2)
SEED = 0
T5_FIELDS = {"d_model": 64, "d_kv": 16, "num_heads": 4, "d_ff": 128, "num_layers": 2}
MAX_TOKENS = 40
# Each suffix is kept with this probability (a missing suffix is what the pipeline's defaults
# send: aes 6.5, no motion score, no camera motion).
KEEP_AES, KEEP_FLOW, KEEP_PAN, KEEP_STATIC = 0.8, 0.5, 0.8, 0.5
# the vae_stills step's stage D: half of the steps on stills; the image-to-video term of the
# other half counts twice, as much in all as in the first stage D (the example image of the
# image-to-video workflow: first frame 25.1 dB with weight 1, 25.5 with 2)
VAE_STILLS = ("decoder.image_prob=0.5", "decoder.steps=150", "decoder.first_frame_weight=2.0")


def cpu_seconds() -> float:
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def run(cmd: list[str], log: Path, threads: int | None) -> None:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    log.parent.mkdir(parents=True, exist_ok=True)
    print("$", " ".join(cmd), f"> {log}", flush=True)
    with open(log, "w") as f:
        done = subprocess.run(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT)
    if done.returncode:
        raise SystemExit(f"step failed (exit {done.returncode}); see {log}")


# ---- steps ----------------------------------------------------------------------------------


def training_caption(row: dict, rng: np.random.Generator) -> str:
    """The caption as the pipeline would send it: suffixes, each kept at random, then cleaned."""
    from opensora_sdk.text import process_prompt

    aes = float(row["aes"]) if rng.random() < KEEP_AES else None
    flow = float(row["flow"]) if rng.random() < KEEP_FLOW else None
    keep_camera = rng.random() < (KEEP_STATIC if row["camera"] == "static" else KEEP_PAN)
    return process_prompt(row["text"], aes=aes, flow=flow, camera_motion=row["camera"] if keep_camera else None).text


def stage1_style():
    """Stage 1's clips: the built-in style, but each clip is a scene of its own 52 frames in
    which a moving shape crosses 60-95% of its room (faster than in stage 2's scenes)."""
    from opensora_sdk.training.shapes_benchmark import BUILTIN_STYLE

    return dataclasses.replace(BUILTIN_STYLE, travel=(0.6, 0.95), scene_frames=None)


def scene_windows():
    """Stage 2's rows per scene of 153 frames at 24 fps (frames at 8 fps: every 3rd). A window
    fills its bucket exactly (data.length_rule: window): 52 frames for 17, 102 for 34."""
    from opensora_sdk.training.synthetic import Window

    return [
        Window("head17", 0, 52),  # text/image-to-video, frame masks drawn by the configured ratios
        Window("head34", 0, 102),  # the first loop of a long video
        Window("continue34", (0, 52), 102, "chunk_head"),  # extension: the first chunk given, from anywhere
        Window("loop2", 51, 102, "chunk_head"),  # a second loop: frames 17-50 at 8 fps, its first chunk the first loop's last
        Window("still", (0, 52), 1),  # text-to-image (a PNG at fps 120)
    ]


def write_training_csv(raw: Path, out: Path) -> list[dict]:
    """train.csv beside `raw`: its rows with the captions as the pipeline sends them to T5
    (a still has no camera motion), checked to fit MAX_TOKENS."""
    from opensora_sdk.models.t5_file import load_tiny_tokenizer
    from opensora_sdk.training import synthetic

    with open(raw, newline="") as f:
        rows = list(csv.DictReader(f))
    rng = np.random.default_rng([SEED, 1])
    tokenizer = load_tiny_tokenizer()
    for row in rows:
        if int(row["num_frames"]) == 1:
            row["camera"] = "static"
        row["text"] = training_caption(row, rng)
        n = len(tokenizer(row["text"]).input_ids)
        if n > MAX_TOKENS:
            raise ValueError(f"caption {row['text']!r} has {n} tokens > {MAX_TOKENS}")
    synthetic.write_csv(rows, out)
    return rows


def check_held_out(rows: list[dict], what: str) -> None:
    from opensora_sdk.training.shapes_benchmark import held_out_triples

    seen = {(r["color"], r["shape"], r["direction"]) for r in rows}
    assert not seen & set(held_out_triples()), "a held-out triple is in the training set"
    print(f"{what}: {len(rows)} rows, {len(seen)} colour x shape x direction triples; held out: {len(held_out_triples())}")


def step_data(work: Path, args) -> None:
    from opensora_sdk.training import synthetic
    from opensora_sdk.training.shapes_benchmark import is_held_out

    out = work / "data" / "train"
    shutil.rmtree(out, ignore_errors=True)
    raw = synthetic.generate_dataset(out, args.num_train, size=64, num_frames=52, fps=24.0, seed=SEED, static_fraction=0.05,
                                     camera_fraction=0.25, style=stage1_style(), exclude=is_held_out)  # fmt: skip
    check_held_out(write_training_csv(raw, out / "train.csv"), "data")


def step_scenes(work: Path, args) -> None:
    from opensora_sdk.training import synthetic
    from opensora_sdk.training.shapes_benchmark import BUILTIN_STYLE, is_held_out

    out = work / "data" / "scenes"
    shutil.rmtree(out, ignore_errors=True)
    raw = synthetic.generate_dataset(out, args.num_train, size=64, num_frames=BUILTIN_STYLE.scene_frames, fps=24.0,
                                     seed=SEED + 2, static_fraction=0.05, camera_fraction=0.25, style=BUILTIN_STYLE,
                                     exclude=is_held_out, windows=scene_windows())  # fmt: skip
    check_held_out(write_training_csv(raw, out / "train.csv"), "scenes")


def step_vae(work: Path, args) -> None:
    cmd = [sys.executable, "training/train_vae.py", "--config", "training/configs/tiny_vae.yaml",
           "--output-dir", str(work / "vae"), "--set", f"data_csv={work / 'data' / 'train' / 'data.csv'}"]  # fmt: skip
    if args.threads:
        cmd += ["--set", f"cpu_threads={args.threads}"]
    run(cmd + [f"--set={s}" for s in args.vae_set], work / "logs" / "vae.log", args.threads)


def step_vae_stills(work: Path, args) -> None:
    cmd = [sys.executable, "training/train_vae.py", "--config", "training/configs/tiny_vae.yaml",
           "--init", str(work / "vae" / "vae"), "--start-stage", "decoder", "--output-dir", str(work / "vae_stills"),
           "--set", f"data_csv={work / 'data' / 'train' / 'data.csv'}"]  # fmt: skip
    if args.threads:
        cmd += ["--set", f"cpu_threads={args.threads}"]
    run(cmd + [f"--set={s}" for s in (*VAE_STILLS, *args.vae_set)], work / "logs" / "vae_stills.log", args.threads)


def step_t5(work: Path, args) -> None:
    import torch

    from opensora_sdk.models.t5_file import TINY_TOKENIZER_DIR, tiny_t5_config
    from opensora_sdk.models.text_encoder import T5TextEncoder

    torch.manual_seed(SEED + 5)
    te = T5TextEncoder.from_config(tiny_t5_config(**T5_FIELDS), model_max_length=MAX_TOKENS)
    folder = work / "text_encoder"
    te.model.save_pretrained(folder)
    # the built-in tokenizer's own files: they load with every transformers version we support
    # (a tokenizer saved by transformers 5 names a class that 4.x does not have)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copyfile(TINY_TOKENIZER_DIR / name, folder / name)


def step_stdit3(work: Path, args) -> None:
    cmd = [sys.executable, "training/train.py", "--config", "training/configs/tiny_builtin.yaml",
           "--output-dir", str(work / "stdit3"),
           "--set", f"data.csv={work / 'data' / 'train' / 'train.csv'}",
           "--set", f"vae.from_pretrained={work / 'vae' / 'vae'}",
           "--set", f"text_encoder.from_pretrained={work / 'text_encoder'}",
           "--set", f"features.dir={work / 'features'}"]  # fmt: skip
    train(cmd, "stdit3", args.stdit3_set, work, args)


def step_stdit3_scenes(work: Path, args) -> None:
    from opensora_sdk.training.checkpoint import list_checkpoints

    stage1 = list_checkpoints(work / "stdit3" / "checkpoints")[-1] / "ema"
    cmd = [sys.executable, "training/train.py", "--config", "training/configs/tiny_builtin_scenes.yaml",
           "--output-dir", str(work / "stdit3_scenes"),
           "--set", f"model.from_pretrained={stage1}",
           "--set", f"data.csv={work / 'data' / 'scenes' / 'train.csv'}",
           "--set", f"vae.from_pretrained={work / 'vae' / 'vae'}",
           "--set", f"text_encoder.from_pretrained={work / 'text_encoder'}",
           "--set", f"features.dir={work / 'features_scenes'}"]  # fmt: skip
    train(cmd, "stdit3_scenes", args.scenes_set, work, args)


def train(cmd: list[str], step: str, overrides: list[str], work: Path, args) -> None:
    """Run training/train.py for `step` (its output folder work/<step>), resuming its last checkpoint."""
    if args.threads:
        cmd += ["--set", f"cpu_threads={args.threads}"]
    if (work / step / "checkpoints").is_dir() and step not in args.force:
        cmd += ["--resume", "latest"]
    run(cmd + [f"--set={s}" for s in overrides], work / "logs" / f"{step}.log", args.threads)


def step_export(work: Path, args) -> None:
    import torch

    from opensora_sdk.loading import write_json_atomic
    from opensora_sdk.models import STDiT3, VideoAutoencoder
    from opensora_sdk.training.checkpoint import list_checkpoints

    out = work / "export"
    shutil.rmtree(out, ignore_errors=True)
    last = list_checkpoints(work / "stdit3_scenes" / "checkpoints")[-1]
    model = STDiT3.from_pretrained(last / "ema").half()
    model.rope.freqs.data = model.rope.freqs.data.float()  # RoPE table stays float32
    model.save_pretrained(out / "transformer")
    VideoAutoencoder.from_pretrained(work / "vae_stills" / "vae", dtype=torch.float16).save_pretrained(out / "vae")
    shutil.copytree(work / "text_encoder", out / "text_encoder")
    vae_summary = json.loads((work / "vae_stills" / "summary.json").read_text())
    clips_only = json.loads((work / "vae" / "summary.json").read_text())
    stage1 = json.loads((work / "stdit3" / "summary.json").read_text())
    stage2 = json.loads((work / "stdit3_scenes" / "summary.json").read_text())
    info = {
        "recipe": "training/recipes/tiny_builtin.py", "seed": SEED, "num_train_clips": args.num_train,
        "num_train_scenes": args.num_train, "stdit3_steps": stage1["step"], "stdit3_last_loss": stage1["last_loss"],
        "stdit3_scenes_checkpoint": last.name, "stdit3_scenes_steps": stage2["step"], "stdit3_scenes_last_loss": stage2["last_loss"],
        "vae": {k: v for k, v in vae_summary.items() if k not in ("shift", "scale")},
        "vae_before_stills": {k: v for k, v in clips_only.items() if k not in ("shift", "scale")}, "t5": T5_FIELDS,
        "weights_bytes": sum(p.stat().st_size for p in out.rglob("*.safetensors")),
    }  # fmt: skip
    write_json_atomic(info, out / "training.json")
    if args.export:  # the shipped model is replaced whole: copied beside it, then swapped in by renames
        target = Path(args.export)
        staged, old = target.with_name(target.name + ".new"), target.with_name(target.name + ".old")
        shutil.rmtree(staged, ignore_errors=True)
        shutil.copytree(out, staged)
        shutil.rmtree(old, ignore_errors=True)
        if target.exists():
            target.rename(old)
        staged.rename(target)
        shutil.rmtree(old, ignore_errors=True)
        print(f"export: copied to {target}")
    print(f"export: {info['weights_bytes'] / 2**20:.1f} MiB of weights")


def step_bench(work: Path, args) -> None:
    cmd = [sys.executable, "benchmarks/bench_quality.py", "--model-dir", str(work / "export"),
           "--json", str(work / "bench_quality.json")]  # fmt: skip
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    run(cmd, work / "logs" / "bench.log", args.threads)
    print((work / "logs" / "bench.log").read_text())


def max_steps(config: str, overrides: list[str]) -> int:
    """max_steps of training/configs/<config>, or its override among `overrides`."""
    import yaml

    steps = yaml.safe_load((ROOT / "training" / "configs" / config).read_text())["max_steps"]
    for item in overrides:
        key, _, value = item.partition("=")
        if key.strip() == "max_steps":
            steps = int(value)
    return int(steps)


def done(step: str, work: Path, args) -> bool:
    trained = {"stdit3": ("tiny_builtin.yaml", args.stdit3_set), "stdit3_scenes": ("tiny_builtin_scenes.yaml", args.scenes_set)}
    if step in trained:  # trained as far as the config asks (raising max_steps continues the run)
        summary = work / step / "summary.json"
        return summary.is_file() and json.loads(summary.read_text())["step"] >= max_steps(*trained[step])
    return {
        "data": work / "data" / "train" / "train.csv", "vae": work / "vae" / "summary.json",
        "vae_stills": work / "vae_stills" / "summary.json",
        "t5": work / "text_encoder" / "config.json", "scenes": work / "data" / "scenes" / "train.csv",
        "export": work / "export" / "training.json", "bench": work / "bench_quality.json",
    }[step].is_file()  # fmt: skip


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description="Train the built-in tiny model from scratch (see the module docstring).")
    p.add_argument("--work", default="outputs/tiny_builtin", help="work folder (data, runs, logs, export)")
    p.add_argument("--export", default=None, help="also copy the exported model here, e.g. opensora_sdk/builtin/tiny")
    p.add_argument("--steps", default=",".join(STEPS), help=f"comma-separated subset of {','.join(STEPS)}")
    p.add_argument("--force", default="", help="comma-separated steps to redo even if their result exists")
    p.add_argument("--threads", type=int, default=None, help="torch threads per process (default: torch's choice)")
    p.add_argument("--num-train", type=int, default=NUM_TRAIN, help=f"training clips (default {NUM_TRAIN})")
    p.add_argument("--vae-set", action="append", default=[], help="override for train_vae.py, e.g. spatial.steps=100")
    p.add_argument("--stdit3-set", action="append", default=[], help="override for stage 1's train.py, e.g. max_steps=100")
    p.add_argument("--scenes-set", action="append", default=[], help="override for stage 2's train.py, e.g. max_steps=100")
    args = p.parse_args(argv)
    args.force = [s for s in args.force.split(",") if s]
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    wanted = [s for s in args.steps.split(",") if s]
    unknown = sorted(set(wanted + args.force) - set(STEPS))
    if unknown:
        raise SystemExit(f"unknown step(s) {unknown}; choose from {list(STEPS)}")
    from opensora_sdk.loading import write_json_atomic

    times_path = work / "times.json"
    times = json.loads(times_path.read_text()) if times_path.is_file() else {}
    ran = False
    for step in STEPS:
        if step not in wanted:
            continue
        if done(step, work, args) and step not in args.force and not ran:
            print(f"== {step}: done already (use --force {step} to redo)")
            continue
        print(f"== {step}", flush=True)
        # a training step resumes from its checkpoints (e.g. after raising max_steps): its time adds up
        resumed = step.startswith("stdit3") and (work / step / "checkpoints").is_dir() and step not in args.force
        before = times.get(step, {"wall_s": 0.0, "cpu_s": 0.0}) if resumed else {"wall_s": 0.0, "cpu_s": 0.0}
        t0, c0 = time.perf_counter(), cpu_seconds()
        globals()[f"step_{step}"](work, args)
        ran = True  # every later step depends on this one: redo them too
        times[step] = {"wall_s": round(before["wall_s"] + time.perf_counter() - t0, 1),
                       "cpu_s": round(before["cpu_s"] + cpu_seconds() - c0, 1)}
        write_json_atomic(times, times_path)
        print(f"== {step}: {times[step]['wall_s']:.0f} s wall, {times[step]['cpu_s']:.0f} s CPU", flush=True)
    total = {k: round(sum(t[k] for t in times.values()), 1) for k in ("wall_s", "cpu_s")}
    print(f"total (steps run so far): {total['wall_s'] / 60:.1f} min wall, {total['cpu_s'] / 60:.1f} min CPU")


if __name__ == "__main__":
    main()
