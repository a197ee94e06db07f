"""A LoRA for the built-in model that teaches it "big" shapes: data -> features + LoRA -> export -> benchmark.

    python training/recipes/lora_builtin_big.py                   # into outputs/lora_builtin_big
    python training/recipes/lora_builtin_big.py --export opensora_sdk/builtin/lora/big.safetensors

The built-in model (opensora_sdk/builtin/tiny) was trained on shapes of radius 0.15 to 0.19 of
the frame, and no caption said "big". Its tiny VAE cannot show colours or shapes outside its
training palette (a cyan or orange object decodes as purple or red, a star as a blob), so the
new concept is one it can draw: size. Steps (each skipped when its result exists; --force STEP):

  data    640 clips like the built-in model's (64x64, 52 frames at 24 fps, the same colours,
          shapes, directions, backgrounds, pans; the held-out colour x shape x direction
          triples left out): 320 with big shapes (radius 0.32 to 0.36, crossing their room in
          the clip) captioned "a big red circle moving left on ...", 320 ordinary ones (heads of
          the base model's 153-frame scenes) with their usual captions, so the
          adapter learns the contrast and leaves ordinary prompts alone; suffixes as the
          built-in model's captions (`tiny_builtin.training_caption`)
  train   training/train.py with training/configs/lora_builtin_big.yaml: features once, then a
          rank-8 LoRA on every attention, cross-attention and MLP layer (188k parameters)
  export  the EMA adapter (float16, about 370 KiB) to WORK/export/big.safetensors (and --export)
  bench   benchmarks/bench_lora.py: the base model and base + adapter on held-out prompts

Wall and CPU time per step go to WORK/times.json (the machine may be shared).
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "training" / "recipes"))
from tiny_builtin import cpu_seconds, run, training_caption  # noqa: E402

STEPS = ("data", "train", "export", "bench")
CONFIG = ROOT / "training" / "configs" / "lora_builtin_big.yaml"
BIG_RADIUS = (0.32, 0.36)
NUM_BIG, NUM_NORMAL = 320, 320
SEED = 11


def big_caption(text: str) -> str:
    """"a red circle ..." / "a still red circle ..." -> "a big red circle ..." / "a still big red circle ..."."""
    if text.startswith("a still "):
        return "a still big " + text[len("a still ") :]
    return "a big " + text[len("a ") :]


def step_data(work: Path, args) -> None:
    from opensora_sdk.models.t5_file import load_tiny_tokenizer
    from opensora_sdk.training import synthetic
    from opensora_sdk.training.shapes_benchmark import BUILTIN_STYLE, is_held_out

    out = work / "data"
    shutil.rmtree(out, ignore_errors=True)
    # a big shape has little room (18 px of 64): its clips cross it in their own 52 frames
    # (as the base model's first-stage clips did), not over a 153-frame scene, or it barely moves
    big_style = dataclasses.replace(BUILTIN_STYLE, radius=BIG_RADIUS, scene_frames=None)
    rows = []
    rng = np.random.default_rng([SEED, 1])
    tokenizer = load_tiny_tokenizer()
    for name, num, style, seed in (("big", args.num_big, big_style, SEED), ("normal", args.num_normal, BUILTIN_STYLE, SEED + 1)):
        made = synthetic.generate_dataset(out / name, num, size=64, num_frames=52, fps=24.0, seed=seed, static_fraction=0.05,
                                          camera_fraction=0.25, style=style, exclude=is_held_out)  # fmt: skip
        with open(made, newline="") as f:
            for row in csv.DictReader(f):
                row["path"] = f"{name}/{row['path']}"
                if name == "big":
                    row["text"] = big_caption(row["text"])
                row["text"] = training_caption(row, rng)
                row["size"] = name
                assert len(tokenizer(row["text"]).input_ids) <= 40, row["text"]
                rows.append(row)
    synthetic.write_csv(rows, out / "train.csv", columns=list(rows[0]))
    print(f"data: {len(rows)} clips ({args.num_big} big, {args.num_normal} ordinary); e.g. {rows[0]['text']!r}")


def step_train(work: Path, args) -> None:
    cmd = [sys.executable, "training/train.py", "--config", str(CONFIG), "--output-dir", str(work / "run"),
           "--set", f"data.csv={work / 'data' / 'train.csv'}", "--set", f"features.dir={work / 'features'}"]  # fmt: skip
    if args.threads:
        cmd += ["--set", f"cpu_threads={args.threads}"]
    if (work / "run" / "checkpoints").is_dir() and "train" not in args.force:
        cmd += ["--resume", "latest"]
    run(cmd + [f"--set={s}" for s in args.train_set], work / "logs" / "train.log", args.threads)


def step_export(work: Path, args) -> None:
    from opensora_sdk.loading import write_file_atomic
    from opensora_sdk.training.checkpoint import list_checkpoints

    last = list_checkpoints(work / "run" / "checkpoints")[-1]
    out = work / "export"
    out.mkdir(parents=True, exist_ok=True)
    write_file_atomic(out / "big.safetensors", lambda tmp: shutil.copyfile(last / "adapter_ema.safetensors", tmp))
    size = (out / "big.safetensors").stat().st_size
    if args.export:  # the shipped adapter is replaced whole or not at all
        write_file_atomic(args.export, lambda tmp: shutil.copyfile(out / "big.safetensors", tmp))
        print(f"export: copied to {args.export}")
    print(f"export: {last.name}, {size / 1024:.0f} KiB")


def step_bench(work: Path, args) -> None:
    cmd = [sys.executable, "benchmarks/bench_lora.py", "--lora", str(work / "export" / "big.safetensors"),
           "--json", str(work / "bench_lora.json")]  # fmt: skip
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    run(cmd, work / "logs" / "bench.log", args.threads)
    print((work / "logs" / "bench.log").read_text())


def done(step: str, work: Path) -> bool:
    return {"data": work / "data" / "train.csv", "train": work / "run" / "summary.json",
            "export": work / "export" / "big.safetensors", "bench": work / "bench_lora.json"}[step].is_file()  # fmt: skip


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description="Train the 'big shapes' LoRA of the built-in model (see the module docstring).")
    p.add_argument("--work", default="outputs/lora_builtin_big", help="work folder (data, run, logs, export)")
    p.add_argument("--export", default=None, help="also copy the adapter here, e.g. opensora_sdk/builtin/lora/big.safetensors")
    p.add_argument("--steps", default=",".join(STEPS), help=f"comma-separated subset of {','.join(STEPS)}")
    p.add_argument("--force", default="", help="comma-separated steps to redo even if their result exists")
    p.add_argument("--threads", type=int, default=None, help="torch threads per process (default: torch's choice)")
    p.add_argument("--num-big", type=int, default=NUM_BIG)
    p.add_argument("--num-normal", type=int, default=NUM_NORMAL)
    p.add_argument("--train-set", action="append", default=[], help="override for train.py, e.g. max_steps=100")
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
        if done(step, work) and step not in args.force and not ran:
            print(f"== {step}: done already (use --force {step} to redo)")
            continue
        print(f"== {step}", flush=True)
        t0, c0 = time.perf_counter(), cpu_seconds()
        globals()[f"step_{step}"](work, args)
        ran = True
        times[step] = {"wall_s": round(time.perf_counter() - t0, 1), "cpu_s": round(cpu_seconds() - c0, 1)}
        write_json_atomic(times, times_path)
        print(f"== {step}: {times[step]['wall_s']:.0f} s wall, {times[step]['cpu_s']:.0f} s CPU", flush=True)


if __name__ == "__main__":
    main()
