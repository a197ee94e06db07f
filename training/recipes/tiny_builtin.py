"""The built-in tiny model, from scratch: data -> VAE -> T5 -> features + STDiT3 -> export -> benchmark.

    python training/recipes/tiny_builtin.py                  # everything, into outputs/tiny_builtin
    python training/recipes/tiny_builtin.py --export opensora_sdk/builtin/tiny   # and replace the shipped weights
    python training/recipes/tiny_builtin.py --steps vae,stdit3 --force           # redo some steps

Steps (each one is skipped when its result exists, unless --force names it or an earlier step ran;
stdit3 counts as done when it reached max_steps, so raising max_steps continues its run):

  data       synthetic moving shapes (`shapes_benchmark.BUILTIN_STYLE`: 6 colours, 3 shapes,
             4 directions, 3 checker backgrounds, 25% camera pans, 5% still shapes), 64x64,
             52 frames at 24 fps (STDiT3 reads every 3rd frame: 17 frames at 8 fps = 2.1 s =
             one VAE chunk = 5 latent frames), with the held-out colour x shape x direction triples
             excluded (`held_out_triples`); train.csv holds the captions exactly as the
             pipeline sends them to T5 (`process_prompt`: score suffixes, then cleaning), with
             the aesthetic / motion / camera suffixes each left out at random
  vae        training/train_vae.py with training/configs/tiny_vae.yaml (stages A, B, C, then
             shift / scale from the data, then D: the temporal decoder alone on 8 fps clips)
  t5         the tiny T5 encoder (d_model 64, 2 layers) with seeded random weights and the
             built-in tokenizer: T5 is not trained (its random features are distinct per word,
             and the transformer learns to read them)
  stdit3     training/train.py with training/configs/tiny_builtin.yaml: features (VAE latents
             + T5 embeddings) computed once, then STDiT3 with frame masks, 10% caption drop, EMA,
             constant learning rate then a linear decay over the last steps
  export     EMA transformer and VAE as float16 safetensors, T5 as float32, with a
             training.json (seeds, steps, figures) into WORK/export (and --export DIR)
  bench      benchmarks/bench_quality.py on the exported model

Everything is seeded. Threads: --threads (default: torch's choice). On a shared machine one
thread per process is often faster than two (less waiting between threads).
"""

from __future__ import annotations

import argparse
import csv
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
STEPS = ("data", "vae", "t5", "stdit3", "export", "bench")
NUM_TRAIN = 1000  # clips
SEED = 0
T5_FIELDS = {"d_model": 64, "d_kv": 16, "num_heads": 4, "d_ff": 128, "num_layers": 2}
MAX_TOKENS = 40
# Each suffix is kept with this probability (a missing suffix is what the pipeline's defaults
# send: aes 6.5, no motion score, no camera motion).
KEEP_AES, KEEP_FLOW, KEEP_PAN, KEEP_STATIC = 0.8, 0.5, 0.8, 0.5


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


def step_data(work: Path, args) -> None:
    from opensora_sdk.models.t5_file import load_tiny_tokenizer
    from opensora_sdk.training import synthetic
    from opensora_sdk.training.shapes_benchmark import BUILTIN_STYLE, held_out_triples, is_held_out

    out = work / "data" / "train"
    shutil.rmtree(out, ignore_errors=True)
    raw = synthetic.generate_dataset(out, args.num_train, size=64, num_frames=52, fps=24.0, seed=SEED, static_fraction=0.05,
                                     camera_fraction=0.25, style=BUILTIN_STYLE, exclude=is_held_out)  # fmt: skip
    with open(raw, newline="") as f:
        rows = list(csv.DictReader(f))
    rng = np.random.default_rng([SEED, 1])
    tokenizer = load_tiny_tokenizer()
    for row in rows:
        row["text"] = training_caption(row, rng)
        n = len(tokenizer(row["text"]).input_ids)
        if n > MAX_TOKENS:
            raise ValueError(f"caption {row['text']!r} has {n} tokens > {MAX_TOKENS}")
    synthetic.write_csv(rows, out / "train.csv")
    seen = {(r["color"], r["shape"], r["direction"]) for r in rows}
    assert not seen & set(held_out_triples()), "a held-out triple is in the training set"
    print(f"data: {len(rows)} clips, {len(seen)} colour x shape x direction triples; held out: {len(held_out_triples())}")


def step_vae(work: Path, args) -> None:
    cmd = [sys.executable, "training/train_vae.py", "--config", "training/configs/tiny_vae.yaml",
           "--output-dir", str(work / "vae"), "--set", f"data_csv={work / 'data' / 'train' / 'data.csv'}"]  # fmt: skip
    if args.threads:
        cmd += ["--set", f"cpu_threads={args.threads}"]
    run(cmd + [f"--set={s}" for s in args.vae_set], work / "logs" / "vae.log", args.threads)


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
    if args.threads:
        cmd += ["--set", f"cpu_threads={args.threads}"]
    if (work / "stdit3" / "checkpoints").is_dir() and "stdit3" not in args.force:
        cmd += ["--resume", "latest"]
    run(cmd + [f"--set={s}" for s in args.stdit3_set], work / "logs" / "stdit3.log", args.threads)


def step_export(work: Path, args) -> None:
    import torch

    from opensora_sdk.loading import write_json_atomic
    from opensora_sdk.models import STDiT3, VideoAutoencoder
    from opensora_sdk.training.checkpoint import list_checkpoints

    out = work / "export"
    shutil.rmtree(out, ignore_errors=True)
    last = list_checkpoints(work / "stdit3" / "checkpoints")[-1]
    model = STDiT3.from_pretrained(last / "ema").half()
    model.rope.freqs.data = model.rope.freqs.data.float()  # RoPE table stays float32
    model.save_pretrained(out / "transformer")
    VideoAutoencoder.from_pretrained(work / "vae" / "vae", dtype=torch.float16).save_pretrained(out / "vae")
    shutil.copytree(work / "text_encoder", out / "text_encoder")
    vae_summary = json.loads((work / "vae" / "summary.json").read_text())
    train_summary = json.loads((work / "stdit3" / "summary.json").read_text())
    info = {
        "recipe": "training/recipes/tiny_builtin.py", "seed": SEED, "num_train_clips": args.num_train,
        "stdit3_checkpoint": last.name, "stdit3_steps": train_summary["step"], "stdit3_last_loss": train_summary["last_loss"],
        "vae": {k: v for k, v in vae_summary.items() if k not in ("shift", "scale")}, "t5": T5_FIELDS,
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


def stdit3_max_steps(args) -> int:
    """max_steps of training/configs/tiny_builtin.yaml, or its --stdit3-set override."""
    import yaml

    steps = yaml.safe_load((ROOT / "training" / "configs" / "tiny_builtin.yaml").read_text())["max_steps"]
    for item in args.stdit3_set:
        key, _, value = item.partition("=")
        if key.strip() == "max_steps":
            steps = int(value)
    return int(steps)


def done(step: str, work: Path, args) -> bool:
    if step == "stdit3":  # trained as far as the config asks (raising max_steps continues the run)
        summary = work / "stdit3" / "summary.json"
        return summary.is_file() and json.loads(summary.read_text())["step"] >= stdit3_max_steps(args)
    return {
        "data": work / "data" / "train" / "train.csv", "vae": work / "vae" / "summary.json",
        "t5": work / "text_encoder" / "config.json",
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
    p.add_argument("--stdit3-set", action="append", default=[], help="override for train.py, e.g. max_steps=100")
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
        # stdit3 resumes from its checkpoints (e.g. after raising max_steps): its time adds up
        resumed = step == "stdit3" and (work / "stdit3" / "checkpoints").is_dir() and step not in args.force
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
