"""Step caching on the built-in model: how much transformer work each method and threshold
skips, how long sampling takes, and how far the video moves from the uncached one.

    python benchmarks/bench_cache.py                     # 6 held-out prompts, every variant
    python benchmarks/bench_cache.py --cases 18 --batch 6 --fit   # all 18 held-out prompts; also
                                                         # fit and try TeaCache coefficients for this model
    python benchmarks/bench_cache.py --variants none,teacache:0.1,pab --json cache.json

Prompts: the quality benchmark's held-out colour x shape x direction prompts
(`benchmarks/bench_quality.py`, `shapes_benchmark.held_out_cases`, one background each; the
first `--cases`), generated with the model's defaults (64x64, 17 frames, 20 steps, guidance
5) and the same seed per prompt for every variant. Per variant:

    evals     block-stack evaluations, rows x steps ([cond; uncond] = 2 rows per prompt per step)
              that ran, and how many times fewer than uncached
    sampling  CPU seconds of the sampling stage (process time: on a shared machine wall time
              mostly measures the neighbours), and the median over the batches of its ratio
              to the uncached run of the same batch (the variants alternate batch by batch)
    PSNR      dB of each video against the uncached video of the same seed (whole clip), mean / min
    SSIM      mean over frames and videos, against the uncached video
    scores    the quality benchmark's colour / shape / direction accuracy (shapes_benchmark)

Targets: >= 1.5x fewer evaluations at >= 30 dB mean PSNR with the scores within
2 points of uncached; >= 2x at >= 25 dB. "teacache:T" rescales with the coefficients fitted
for the built-in model (`step_cache.BUILTIN_COEFFICIENTS`); ":identity" without rescaling,
":open-sora-v1.2" with the published fit for the real model. `--fit` fits the polynomial
(degree 4, as the TeaCache authors do) on uncached runs of `--fit-cases` prompts of triples
the model was trained on (not the measured held-out ones): x = relative L1 change of the
modulated input between steps, y = relative L1 change of the block stack's residual; it
prints the coefficients and adds "teacache:T:fit" variants.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

from opensora_sdk.evaluation.metrics import ssim_frames
from opensora_sdk.generation import Timings, decode_clip
from opensora_sdk.models.layers import t2i_modulate
from opensora_sdk.pipeline import OpenSoraPipeline
from opensora_sdk.step_cache import TeaCacheConfig, parse_cache
from opensora_sdk.training.shapes_benchmark import _result, analyse_clip, held_out_cases, seen_cases, summarize
from opensora_sdk.video import Video

DEFAULT_VARIANTS = ("none,teacache:0.1,teacache:0.2,teacache:0.3,teacache:0.1:identity,teacache:0.2:identity,"
                    "teacache:0.1:open-sora-v1.2,pab,pab:2,2,2")
FIT_THRESHOLDS = (0.1, 0.2, 0.3)


class Recorder:
    """A step-cache state that computes every step and records, per row, the relative L1
    change of the modulated input and of the block residual between consecutive steps."""

    def __init__(self):
        self.previous = None
        self.pairs: list[tuple[float, float]] = []

    def run_blocks(self, model, x, y, y_valid, t_mlp, T, S, x_mask=None, t0_mlp=None, rope=None, *more):
        R, N, C = x.shape
        block = model.spatial_blocks[0]
        shift, scale = block.modulation(t_mlp, x_mask, t0_mlp)[:2]
        m = t2i_modulate(block.norm1(x).view(R, T, S, C), shift, scale).flatten(1).float()
        out = model.run_blocks(x, y, y_valid, t_mlp, T, S, x_mask, t0_mlp, rope, *more)
        r = (out - x).flatten(1).float()
        if self.previous is not None:
            pm, pr = self.previous
            dx = ((m - pm).abs().mean(1) / pm.abs().mean(1)).tolist()
            dy = ((r - pr).abs().mean(1) / pr.abs().mean(1)).tolist()
            self.pairs += zip(dx, dy)
        self.previous = (m, r)
        return out


def fit_coefficients(pipe, prompts, seed: int, degree: int = 4) -> tuple[float, ...]:
    """The rescaling polynomial (highest power first) fitted on uncached runs of `prompts`."""
    rec = Recorder()
    for k, prompt in enumerate(prompts):
        rec.previous = None
        plan = pipe.plan(prompt, seed=seed + k)
        pipe.transformer.step_cache = rec
        try:
            pipe.generate(plan, latents_only=True)
        finally:
            pipe.transformer.step_cache = None
    x, y = np.array(rec.pairs).T
    return tuple(float(c) for c in np.polyfit(x, y, degree))


def video_psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    mse = float((a.double() - b.double()).pow(2).mean())
    return 100.0 if mse < 1e-10 else 10 * np.log10(1.0 / mse)


def as_unit(frames: np.ndarray) -> torch.Tensor:
    """uint8 [N, H, W, 3] -> float [N, 3, H, W] in [0, 1]."""
    return torch.from_numpy(frames).permute(0, 3, 1, 2).float() / 255


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cases", type=int, default=6, help="held-out prompts measured (default 6 of 18)")
    p.add_argument("--batch", type=int, default=3, help="prompts per call (default 3)")
    p.add_argument("--variants", default=DEFAULT_VARIANTS, help=f"comma list of cache forms (default {DEFAULT_VARIANTS})")
    p.add_argument("--fit", action="store_true", help="fit TeaCache coefficients for the model and add teacache:T:fit")
    p.add_argument("--fit-cases", type=int, default=6, help="prompts of trained triples the fit runs on (default 6)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (default 1: on a shared machine more threads mostly spin)")
    p.add_argument("--json", default=None, help="write the figures here")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    names = [v for v in _split_variants(args.variants)]
    if "none" not in names:
        names.insert(0, "none")
    variants = {name: parse_cache(None if name == "none" else name) for name in names}
    pipe = OpenSoraPipeline.from_preset(device="cpu", progress=False)
    cases = held_out_cases(per_triple=1)
    if args.cases > len(cases):
        cases += held_out_cases(per_triple=2)[len(cases):]
    measured = cases[: args.cases]
    coefficients = None
    if args.fit:
        fit_prompts = [c.prompt for c in seen_cases(count=args.fit_cases)]
        coefficients = fit_coefficients(pipe, fit_prompts, args.seed + 50_000)
        print(f"fitted TeaCache coefficients (highest power first, {len(fit_prompts)} prompts): "
              f"{[float(f'{c:.6g}') for c in coefficients]}")
        for t in FIT_THRESHOLDS:
            variants[f"teacache:{t:g}:fit"] = TeaCacheConfig(t, coefficients)

    rows = {name: {"rows": 0, "computed": 0, "ratios": [], "seconds": 0.0, "psnr": [], "ssim": [], "results": [],
                   "attention": {}} for name in variants}  # fmt: skip
    reference: dict[int, np.ndarray] = {}
    for start in range(0, len(measured), args.batch):
        chunk = measured[start : start + args.batch]
        prompts = [c.prompt for c in chunk]
        base_seconds = None
        for name, config in variants.items():  # alternate the variants batch by batch
            plan = pipe.plan(prompts, seed=args.seed + start, batch_size=len(chunk), cache=config)
            timings = Timings()
            cpu = time.process_time()
            latents = pipe.generate(plan, timings=timings, latents_only=True)  # one loop: nothing decoded yet
            seconds = time.process_time() - cpu
            clip = decode_clip(pipe.models(), pipe.placement, latents, plan.num_frames)
            videos = [Video.from_tensor(clip[b]) for b in range(len(chunk))]
            r = rows[name]
            base_seconds = seconds if name == "none" else base_seconds
            r["seconds"] += seconds
            r["ratios"].append(seconds / base_seconds)
            stats = timings.cache_stats
            steps_rows = plan.num_steps * len(chunk) * (2 if plan.guidance_scale != 1 else 1)
            r["rows"] += steps_rows
            r["computed"] += steps_rows if stats is None else stats.rows_computed
            for kind, (c, t) in (stats.attention.items() if stats is not None else ()):
                a = r["attention"].setdefault(kind, [0, 0])
                a[0], a[1] = a[0] + c, a[1] + t
            for k, (case, video) in enumerate(zip(chunk, videos)):
                i = start + k
                if name == "none":
                    reference[i] = video.frames
                ref, got = as_unit(reference[i]), as_unit(video.frames)
                r["psnr"].append(video_psnr(got, ref))
                r["ssim"].append(float(ssim_frames(got, ref).mean()))
                r["results"].append(_result(case, analyse_clip(video.frames)))
        print(f"  batch {start // args.batch + 1}: {len(chunk)} prompts done", file=sys.stderr)

    report = {"settings": {"cases": len(measured), "steps": plan.num_steps, "guidance": plan.guidance_scale,
                           "size": f"{plan.height}x{plan.width}x{plan.num_frames}", "seed": args.seed,
                           "threads": torch.get_num_threads(), "fitted_coefficients": coefficients},
              "variants": {}}  # fmt: skip
    base = summarize(rows["none"]["results"])
    print(f"built-in model, {len(measured)} held-out prompts, {plan.height}x{plan.width}, {plan.num_frames} frames, "
          f"{plan.num_steps} steps, guidance {plan.guidance_scale:g}, seed {args.seed}, "
          f"{torch.get_num_threads()} threads")
    print(f"{'variant':<28} {'evals':>9} {'fewer':>6} {'CPU s':>7} {'ratio':>6} {'PSNR mean/min':>14} "
          f"{'SSIM':>6} {'colour':>7} {'shape':>6} {'direction':>9}  attention computed")
    for name, r in rows.items():
        s = summarize(r["results"])
        fewer = r["rows"] / max(r["computed"], 1)
        psnr_mean, psnr_min = statistics.fmean(r["psnr"]), min(r["psnr"])
        ssim = statistics.fmean(r["ssim"])
        ratio = statistics.median(r["ratios"])
        drop = max(100 * (base[f"{a}_accuracy"] - s[f"{a}_accuracy"]) for a in ("color", "direction"))
        entry = {"evals": r["computed"], "evals_uncached": r["rows"], "fewer": fewer, "sampling_s": r["seconds"],
                 "sampling_ratio_median": ratio, "psnr_mean": psnr_mean, "psnr_min": psnr_min, "ssim_mean": ssim,
                 "color_accuracy": s["color_accuracy"], "shape_accuracy": s["shape_accuracy"],
                 "direction_accuracy": s["direction_accuracy"], "score_drop_points": drop,
                 "attention": r["attention"],
                 "meets_1_5x_30dB": bool(fewer >= 1.5 and psnr_mean >= 30 and drop <= 2),
                 "meets_2x_25dB": bool(fewer >= 2 and psnr_mean >= 25)}  # fmt: skip
        report["variants"][name] = entry
        attn = ", ".join(f"{k} {c}/{t}" for k, (c, t) in r["attention"].items())
        psnr = "exact" if name == "none" else f"{psnr_mean:5.1f}/{psnr_min:5.1f}"
        print(f"{name:<28} {r['computed']:>4}/{r['rows']:<4} {fewer:>5.2f}x {r['seconds']:>7.1f} {ratio:>6.2f} "
              f"{psnr:>14} {ssim:>6.3f} {s['color_accuracy']:>7.1%} {s['shape_accuracy']:>6.1%} "
              f"{s['direction_accuracy']:>9.1%}  {attn}")
    for target, key in (("1.5x fewer at >= 30 dB, scores within 2 points", "meets_1_5x_30dB"),
                        ("2x fewer at >= 25 dB", "meets_2x_25dB")):
        met = [n for n, e in report["variants"].items() if n != "none" and e[key]]
        print(f"target {target}: {', '.join(met) if met else 'MISSED'}")
    if args.json:
        path = Path(args.json)
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_text(json.dumps(report, indent=2) + "\n")
        tmp.replace(path)
    return report


def _split_variants(text: str) -> list[str]:
    """"none,teacache:0.1,pab:2,4,6,pab" -> the forms, keeping pab's comma-separated intervals."""
    out: list[str] = []
    for part in text.split(","):
        part = part.strip()
        if out and out[-1].startswith("pab:") and part and part[0].isdigit() and out[-1].count(",") < 2:
            out[-1] += "," + part
        elif part:
            out.append(part)
    return out


if __name__ == "__main__":
    main()
