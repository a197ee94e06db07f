"""Quality of the built-in model without a human: does a generated clip show what was asked?

    python benchmarks/bench_quality.py                                   # the shipped model
    python benchmarks/bench_quality.py --model-dir outputs/tiny_builtin/export --json q.json
    python benchmarks/bench_quality.py --per-triple 2 --seen 18 --steps 30

Prompts: the held-out colour x shape x direction triples of the built-in model's training data
(`opensora_sdk.training.shapes_benchmark.held_out_triples`: never shown together in training;
every single value and every pair was), each on `--per-triple` backgrounds. Each prompt is
generated with the model's defaults (native size, length, steps, guidance; aes 6.5, no
motion score, no camera motion) and measured by simple image analysis (see
`shapes_benchmark`): colour of the object (nearest palette colour), shape (bounding-box fill
ratio), direction of motion (centroid track). Image-to-video: the same prompts, conditioned on
frame 0 of a rendered clip with those attributes; PSNR of the generated first frame against
it, and colour / direction again. `--seen N` adds N prompts whose triples training did show.
"VAE reconstructions" measures rendered clips of the held-out prompts after the model's VAE
encodes and decodes them: the most a generated clip can score with that VAE.

Text-to-image: the same prompts as one frame (colour and shape). Extension: a rendered clip of
one VAE chunk (17 frames) of each prompt, continued to the loop length (34 frames); 2 loops:
text-to-video in two loops. For both only the second part (the frames after the first) is
measured.

Targets: colour >= 90%, direction >= 80%, first-frame PSNR >= 25 dB.
Targets for stills and long videos: text-to-image colour >= 90%; extension and 2-loop second parts colour
>= 90% and direction >= 80%.
"""

from __future__ import annotations

import argparse
import resource
import sys
import time
from pathlib import Path

import torch

from opensora_sdk.pipeline import OpenSoraPipeline
from opensora_sdk.presets import BUILTIN_PRESET, get_preset
from opensora_sdk.training.shapes_benchmark import (
    CLIP_FPS,
    evaluate,
    evaluate_continuation,
    evaluate_reconstructions,
    evaluate_still,
    held_out_cases,
    seen_cases,
    summarize,
)

TARGETS = {"color_accuracy": 0.90, "direction_accuracy": 0.80, "first_frame_psnr_db_mean": 25.0}
# stills and long videos: (line, measure) -> target
LONG_TARGETS = {("t2i held-out", "color_accuracy"): 0.90,
                ("extension, 2nd part", "color_accuracy"): 0.90, ("extension, 2nd part", "direction_accuracy"): 0.80,
                ("2 loops, 2nd part", "color_accuracy"): 0.90, ("2 loops, 2nd part", "direction_accuracy"): 0.80}  # fmt: skip


def load_pipeline(model_dir: str | None, preset: str):
    if model_dir is None:
        return OpenSoraPipeline.from_preset(preset, device="cpu", progress=False)
    d = Path(model_dir)
    p = get_preset(preset)
    return OpenSoraPipeline.from_pretrained(d / "transformer", d / "vae", d / "text_encoder", device="cpu", progress=False,
                                            defaults=p.defaults, max_latent_frames=p.max_latent_frames)  # fmt: skip


def line(name: str, summary: dict) -> str:
    parts = [f"{name:<22} n={summary['cases']:<3}"]
    parts += [f"{a} {summary[f'{a}_accuracy']:6.1%}" for a in ("color", "shape", "direction")]
    if "first_frame_psnr_db_mean" in summary:
        parts.append(f"first-frame PSNR {summary['first_frame_psnr_db_mean']:.1f} dB (min {summary['first_frame_psnr_db_min']:.1f})")
    return "  ".join(parts)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model-dir", default=None, help="folder with transformer/, vae/, text_encoder/ (default: the preset)")
    p.add_argument("--preset", default=BUILTIN_PRESET, help="preset whose model (or defaults, with --model-dir) is used")
    p.add_argument("--per-triple", type=int, default=2, help="backgrounds per held-out triple (default 2)")
    p.add_argument("--i2v", type=int, default=None, help="image-to-video cases (default: all held-out prompts; 0: skip)")
    p.add_argument("--seen", type=int, default=0, help="also measure this many prompts of triples seen in training")
    p.add_argument("--steps", type=int, default=None, help="sampling steps (default: the preset's)")
    p.add_argument("--guidance", type=float, default=None, help="guidance scale (default: the preset's)")
    p.add_argument("--long", type=int, default=None,
                   help="text-to-image, extension and 2-loop cases (default: all held-out prompts; 0: skip)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--json", default=None, help="write the figures and every case here")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    t0, r0 = time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF)
    pipe = load_pipeline(args.model_dir, args.preset)
    call = {k: v for k, v in (("num_steps", args.steps), ("guidance_scale", args.guidance)) if v is not None}
    cases = held_out_cases(per_triple=args.per_triple)
    report = {}
    results = {"t2v held-out": evaluate(pipe, cases, seed=args.seed, **call)}
    if args.i2v != 0:
        results["i2v held-out"] = evaluate(pipe, cases[: args.i2v], image_to_video=True, seed=args.seed + 10_000, **call)
    if args.seen:
        results["t2v seen"] = evaluate(pipe, seen_cases(count=args.seen), seed=args.seed + 20_000, **call)
    long_cases = cases[: args.long]
    if long_cases:
        results["t2i held-out"] = evaluate_still(pipe, long_cases, seed=args.seed + 30_000, **call)
        results["extension, 2nd part"] = evaluate_continuation(pipe, long_cases, how="extension",
                                                               seed=args.seed + 40_000, **call)  # fmt: skip
        results["2 loops, 2nd part"] = evaluate_continuation(pipe, long_cases, how="loop", seed=args.seed + 50_000,
                                                             **call)  # fmt: skip
    plan = pipe.plan(cases[0].prompt, **call)
    results["VAE reconstructions"] = evaluate_reconstructions(
        pipe.vae, cases, height=plan.height, width=plan.width, num_frames=plan.total_frames,
        frame_interval=max(1, round(CLIP_FPS / plan.fps)), seed=args.seed)  # fmt: skip
    r1 = resource.getrusage(resource.RUSAGE_SELF)
    report["settings"] = {"model": args.model_dir or f"preset {args.preset}", "size": f"{plan.height}x{plan.width}",
                          "frames": plan.total_frames, "steps": plan.num_steps, "guidance": plan.guidance_scale,
                          "seed": args.seed, "threads": torch.get_num_threads()}  # fmt: skip
    report["summary"] = {name: summarize(rows) for name, rows in results.items()}
    report["cases"] = results
    report["wall_s"] = round(time.perf_counter() - t0, 1)
    report["cpu_s"] = round(r1.ru_utime + r1.ru_stime - r0.ru_utime - r0.ru_stime, 1)
    print(f"model {report['settings']['model']}: {plan.height}x{plan.width}, {plan.total_frames} frames, "
          f"{plan.num_steps} steps, guidance {plan.guidance_scale}, seed {args.seed}")
    for name, summary in report["summary"].items():
        print(line(name, summary))
    t2v, i2v = report["summary"]["t2v held-out"], report["summary"].get("i2v held-out", {})
    checks = {"color_accuracy": t2v["color_accuracy"], "direction_accuracy": t2v["direction_accuracy"],
              "first_frame_psnr_db_mean": i2v.get("first_frame_psnr_db_mean", float("nan"))}  # fmt: skip
    report["targets_met"] = {k: bool(v >= TARGETS[k]) for k, v in checks.items()}
    print("targets:", ", ".join(f"{k} {v:.3g} >= {TARGETS[k]} {'ok' if v >= TARGETS[k] else 'MISSED'}" for k, v in checks.items()))
    if long_cases:
        longs = {f"{name}: {m}": (report["summary"][name][m], t) for (name, m), t in LONG_TARGETS.items()}
        report["long_targets_met"] = {k: bool(v >= t) for k, (v, t) in longs.items()}
        print("targets (stills, extension, loops):",
              ", ".join(f"{k} {v:.3g} >= {t} {'ok' if v >= t else 'MISSED'}" for k, (v, t) in longs.items()))
    print(f"{report['wall_s']:.0f} s wall, {report['cpu_s']:.0f} s CPU")
    if args.json:
        from opensora_sdk.loading import write_json_atomic

        write_json_atomic(report, args.json)
    return report


if __name__ == "__main__":
    sys.exit(0 if all(main()["targets_met"].values()) else 1)
