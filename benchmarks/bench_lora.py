"""What a LoRA teaches the built-in model, and what it leaves alone: the base model against
base + adapter on held-out prompts, measured without a human.

    python benchmarks/bench_lora.py                                      # the shipped "big" adapter
    python benchmarks/bench_lora.py --lora outputs/lora_builtin_big/export/big.safetensors --json b.json

The adapter (training/recipes/lora_builtin_big.py) teaches "big" shapes (radius 0.32 to 0.36 of
the frame; the built-in model only saw 0.15 to 0.19, and never the word). Prompts:

* big, held out: "a big {colour} {shape} moving {direction} on a {background} background" for
  the built-in model's held-out colour x shape x direction triples (never in the base model's
  nor the adapter's training data), each on `--per-triple` backgrounds;
* ordinary, held out: the same triples without "big" (what benchmarks/bench_quality.py asks).

Every prompt runs with `--seeds` seeds (default 3: 216 clips per line; the shape measure
swings by 7 points between seeds on 72 clips). Each clip is measured as bench_quality does
(colour, shape, direction; `shapes_benchmark`) plus
size: the median over frames of the object's bounding-box side as a share of the frame, "big"
at >= 0.45 (rendered big shapes after the VAE: 0.42 to 0.97, ordinary ones: 0.28 to 0.41).
"VAE ceiling (big)" measures rendered big clips after the tiny VAE's encode + decode.

Targets: base + adapter shows "big" in >= 80% of the big prompts; on ordinary prompts
colour, shape and direction stay within 5 points of the base model.
"""

from __future__ import annotations

import argparse
import dataclasses
import resource
import sys
import time
from pathlib import Path

import numpy as np
import torch

from opensora_sdk.pipeline import OpenSoraPipeline
from opensora_sdk.training.shapes_benchmark import (
    ATTRIBUTES,
    BUILTIN_STYLE,
    MIN_PIXELS,
    Case,
    analyse_clip,
    held_out_cases,
    object_masks,
    rendered_clip,
)

SHIPPED = Path(__file__).resolve().parents[1] / "opensora_sdk" / "builtin" / "lora" / "big.safetensors"
BIG_RADIUS = (0.32, 0.36)
BIG_EXTENT = 0.45
TARGET_BIG, TOLERANCE = 0.80, 0.05


def extent(frames: np.ndarray) -> float:
    """Median over frames with an object of its bounding-box side / frame side (0: no object)."""
    masks = object_masks(frames)
    sides = []
    for m in masks:
        if m.sum() < MIN_PIXELS:
            continue
        ys, xs = np.nonzero(m)
        sides.append(max(ys.max() - ys.min() + 1, xs.max() - xs.min() + 1) / max(m.shape))
    return float(np.median(sides)) if sides else 0.0


def big_cases(per_triple: int) -> list[Case]:
    return [dataclasses.replace(c, prompt="a big " + c.prompt[len("a ") :]) for c in held_out_cases(per_triple=per_triple)]


def measure(frames: np.ndarray, case: Case, want_big: bool) -> dict:
    found = analyse_clip(frames)
    e = extent(frames)
    row = {"prompt": case.prompt, **{f"want_{a}": getattr(case, a) for a in ATTRIBUTES}, **{f"got_{a}": found[a] for a in ATTRIBUTES}}
    row.update(extent=round(e, 3), want_size="big" if want_big else "ordinary", got_size="big" if e >= BIG_EXTENT else "ordinary")
    return row


def generate(pipe, cases: list[Case], want_big: bool, seed: int, batch: int = 6, **call) -> list[dict]:
    rows = []
    for start in range(0, len(cases), batch):
        chunk = cases[start : start + batch]
        videos = pipe([c.prompt for c in chunk], seed=seed + start, batch_size=len(chunk), progress=False, **call)
        rows += [measure(v.frames, c, want_big) for c, v in zip(chunk, videos)]
    return rows


def vae_ceiling(vae, cases: list[Case], seed: int) -> list[dict]:
    style = dataclasses.replace(BUILTIN_STYLE, radius=BIG_RADIUS, scene_frames=None)  # as the adapter's big clips
    rows = []
    for k, case in enumerate(cases):
        clip = rendered_clip(case, 64, 64, 17, seed + k, 3, style=style)
        x = torch.from_numpy(clip).permute(3, 0, 1, 2)[None].float().div(127.5).sub(1)
        with torch.no_grad():
            y = vae.decode(vae.encode(x.to(vae.device, vae.dtype), sample=False), num_frames=17)
        frames = y[0].float().clamp(-1, 1).add(1).mul(127.5).round().byte().permute(1, 2, 3, 0).cpu().numpy()
        rows.append(measure(frames, case, True))
    return rows


def summarize(rows: list[dict]) -> dict:
    out = {"cases": len(rows)}
    for a in (*ATTRIBUTES, "size"):
        out[f"{a}_accuracy"] = float(np.mean([r[f"want_{a}"] == r[f"got_{a}"] for r in rows]))
    out["extent_median"] = float(np.median([r["extent"] for r in rows]))
    return out


def line(name: str, s: dict) -> str:
    return (f"{name:<26} n={s['cases']:<3} size {s['size_accuracy']:6.1%}  colour {s['color_accuracy']:6.1%}  "
            f"shape {s['shape_accuracy']:6.1%}  direction {s['direction_accuracy']:6.1%}  extent {s['extent_median']:.2f}")  # fmt: skip


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--lora", default=str(SHIPPED), help="the adapter (default: the shipped big.safetensors)")
    p.add_argument("--scale", type=float, default=1.0, help="adapter scale (default 1)")
    p.add_argument("--per-triple", type=int, default=4, help="backgrounds per held-out triple (default 4: 72 prompts)")
    p.add_argument("--seed", type=int, default=0, help="first seed (default 0)")
    p.add_argument("--seeds", type=int, default=3, help="seeds per prompt (default 3)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--json", default=None, help="write the figures and every case here")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    t0, r0 = time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF)
    pipe = OpenSoraPipeline.from_preset(device="cpu", progress=False)
    big, ordinary = big_cases(args.per_triple), held_out_cases(per_triple=args.per_triple)
    seeds = [(args.seed + k) * 100_000 for k in range(args.seeds)]  # seed s: prompts s, s + 1, ... (ordinary: +10000)

    def run(cases, want_big, offset=0):
        return [row for s in seeds for row in generate(pipe, cases, want_big, s + offset)]

    results = {"base, big prompts": run(big, True), "base, ordinary prompts": run(ordinary, False, 10_000)}
    pipe.load_lora_weights(args.lora, adapter_name="bench", scale=args.scale)
    results["LoRA, big prompts"] = run(big, True)
    results["LoRA, ordinary prompts"] = run(ordinary, False, 10_000)
    results["VAE ceiling (big)"] = vae_ceiling(pipe.vae, big, args.seed)
    r1 = resource.getrusage(resource.RUSAGE_SELF)
    summary = {name: summarize(rows) for name, rows in results.items()}
    print(f"adapter {args.lora} (scale {args.scale}); built-in model, 64x64, 17 frames, 20 steps, guidance 5; "
          f"{len(big)} prompts x {args.seeds} seeds")
    for name, s in summary.items():
        print(line(name, s))
    base, lora = summary["base, ordinary prompts"], summary["LoRA, ordinary prompts"]
    checks = {"big_size_with_lora": summary["LoRA, big prompts"]["size_accuracy"] >= TARGET_BIG}
    for a in ATTRIBUTES:
        checks[f"ordinary_{a}_within_5_points"] = lora[f"{a}_accuracy"] >= base[f"{a}_accuracy"] - TOLERANCE
    print("targets:", ", ".join(f"{k} {'ok' if v else 'MISSED'}" for k, v in checks.items()))
    report = {"lora": args.lora, "scale": args.scale, "summary": summary, "targets_met": checks, "cases": results,
              "wall_s": round(time.perf_counter() - t0, 1), "cpu_s": round(r1.ru_utime + r1.ru_stime - r0.ru_utime - r0.ru_stime, 1)}  # fmt: skip
    print(f"{report['wall_s']:.0f} s wall, {report['cpu_s']:.0f} s CPU")
    if args.json:
        from opensora_sdk.loading import write_json_atomic

        write_json_atomic(report, args.json)
    return report


if __name__ == "__main__":
    sys.exit(0 if all(main()["targets_met"].values()) else 1)
