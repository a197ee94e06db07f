"""How long the built-in model takes to make its default 2 s clip on this machine's CPU.

    python benchmarks/bench_builtin_speed.py                 # 5 timed runs, torch's thread count
    python benchmarks/bench_builtin_speed.py --threads 1 --runs 7
    python benchmarks/bench_builtin_speed.py --cli           # also one `opensora generate` end to end
    python benchmarks/bench_builtin_speed.py --compare [--compile]   # every speed switch side by side

One pipeline call with the preset's defaults (native 64x64, 17 frames at 8 fps = 2.1 s, its
default steps and guidance) per run: text encoding, sampling, VAE decode, uint8 frames. The
first call is a warm-up (not counted); then the median and min / max of `--runs` calls, each
with its wall time and this process's CPU time (user + sys), and the split of the median run
into text / sampling / decode. `--cli` times a fresh `opensora generate --prompt ...` process
(Python start, imports, loading the models from the package, generating, writing the mp4).

`--compare` runs the same generation with each speed switch in one process, the variants
alternating round by round, and prints their median wall and CPU time, the ratio to the plain
path (no per-clip reuse, plain VAE decoders: what the code computed before the speed work) and
how far their frames are from the plain path's (max uint8 difference, PSNR): the exact
switches (per-clip reuse and the fast VAE decode, both on by default; `--compile` adds the
regional compile, which compiles in the warm-up round, and compile with the bf16 VAE) and the
approximate ones (bf16 VAE, bf16 everywhere, TeaCache at two thresholds).

Target: under 10 s for the 2 s clip on a 2-core CPU.
"""

from __future__ import annotations

import argparse
import math
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

import torch

from opensora_sdk.pipeline import OpenSoraPipeline
from opensora_sdk.presets import BUILTIN_PRESET

PROMPT = "a yellow square moving right on a gray background"


def cpu_s(who=resource.RUSAGE_SELF) -> float:
    r = resource.getrusage(who)
    return r.ru_utime + r.ru_stime


def timed_call(pipe, seed: int, steps: int | None) -> dict:
    """One generation, split into text / sampling / decode by wrapping the stages of
    `opensora_sdk.generation`."""
    from opensora_sdk import generation

    marks = {}

    def wrap(name, fn):
        def inner(*a, **k):
            t = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                marks[name] = marks.get(name, 0.0) + time.perf_counter() - t

        return inner

    stages = generation.encode_texts, generation.decode_clip
    generation.encode_texts = wrap("text_s", stages[0])
    generation.decode_clip = wrap("decode_s", stages[1])
    try:
        t0, c0 = time.perf_counter(), cpu_s()
        video = pipe(PROMPT, seed=seed, num_steps=steps, progress=False)
        wall, cpu = time.perf_counter() - t0, cpu_s() - c0
    finally:
        generation.encode_texts, generation.decode_clip = stages
    other = wall - sum(marks.values())
    return {"wall_s": wall, "cpu_s": cpu, **marks, "sampling_and_rest_s": other, "frames": video.num_frames,
            "size": f"{video.height}x{video.width}"}  # fmt: skip


def frames_psnr(frames: torch.Tensor, ref: torch.Tensor) -> float:
    """PSNR in dB of uint8 frames against `ref` (inf when they are equal)."""
    mse = (frames.float() - ref.float()).pow(2).mean().item()
    return math.inf if mse == 0 else 10 * math.log10(255**2 / mse)


def compare(args) -> dict:
    """Each switch on the same prompt and seed, alternating; medians over `args.runs` rounds
    after one warm-up round."""

    def build(**kw):
        return OpenSoraPipeline.from_preset(args.preset, device="cpu", progress=False, **kw)

    plain = build()
    plain.transformer.set_step_reuse(False)
    plain.vae.set_fast_decode(False)
    exact = build()
    variants = {  # name: (pipeline, call options, exact?)
        "plain (before)": (plain, {}, True),
        "reuse + fast VAE (default)": (exact, {}, True),
    }
    if args.compile:
        variants["+ compile"] = (build(compile=True), {}, True)
    variants["+ bf16 VAE"] = (build(vae_dtype=torch.bfloat16), {}, False)
    variants["+ bf16 everywhere"] = (build(dtype=torch.bfloat16), {}, False)
    variants["+ teacache:0.1"] = (exact, {"cache": "teacache:0.1"}, False)
    variants["+ teacache:0.2"] = (exact, {"cache": "teacache:0.2"}, False)
    if args.compile:
        variants["+ compile + bf16 VAE"] = (build(compile=True, vae_dtype=torch.bfloat16), {}, False)
    times = {name: [] for name in variants}
    frames = {}
    for round_ in range(args.runs + 1):  # round 0 warms up (and compiles)
        for name, (pipe, options, _) in variants.items():
            t0, c0 = time.perf_counter(), cpu_s()
            video = pipe(PROMPT, seed=1, num_steps=args.steps, progress=False, **options)
            if round_:
                times[name].append((time.perf_counter() - t0, cpu_s() - c0))
            frames.setdefault(name, torch.from_numpy(video.frames.copy()))
    ref = frames["plain (before)"]
    base_wall = statistics.median(w for w, _ in times["plain (before)"])
    base_cpu = statistics.median(c for _, c in times["plain (before)"])
    rows = []
    print(f"\n{'variant':28s} {'exact':>5s} {'wall':>8s} {'CPU':>8s} {'CPU ratio':>9s} {'max diff':>8s} {'PSNR':>8s}")
    for name, (_, _, is_exact) in variants.items():
        wall = statistics.median(w for w, _ in times[name])
        cpu = statistics.median(c for _, c in times[name])
        diff = int((frames[name].int() - ref.int()).abs().max())
        psnr = frames_psnr(frames[name], ref)
        rows.append({"variant": name, "exact": is_exact, "median_wall_s": wall, "median_cpu_s": cpu,
                     "wall_ratio": base_wall / wall, "cpu_ratio": base_cpu / cpu, "max_uint8_diff": diff, "psnr_db": psnr})
        print(f"{name:28s} {'yes' if is_exact else 'no':>5s} {wall:7.3f}s {cpu:7.3f}s {base_cpu / cpu:8.2f}x "
              f"{diff:8d} {'exact' if math.isinf(psnr) else f'{psnr:.1f} dB':>8s}")
    return {"compare": rows}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default=BUILTIN_PRESET)
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--steps", type=int, default=None, help="sampling steps (default: the preset's)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--cli", action="store_true", help="also time one `opensora generate` process end to end")
    p.add_argument("--compare", action="store_true", help="every speed switch side by side in one run")
    p.add_argument("--compile", action="store_true", help="with --compare: also the regional compile")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.compare:
        report = compare(args)
        if args.json:
            from opensora_sdk.loading import write_json_atomic

            write_json_atomic(report, args.json)
        return report
    t0, c0 = time.perf_counter(), cpu_s()
    pipe = OpenSoraPipeline.from_preset(args.preset, device="cpu", progress=False)
    load = {"wall_s": time.perf_counter() - t0, "cpu_s": cpu_s() - c0}
    plan = pipe.plan(PROMPT, num_steps=args.steps)
    timed_call(pipe, 0, args.steps)  # warm-up
    runs = [timed_call(pipe, k + 1, args.steps) for k in range(args.runs)]
    walls = [r["wall_s"] for r in runs]
    median = sorted(runs, key=lambda r: r["wall_s"])[len(runs) // 2]
    report = {
        "preset": args.preset, "size": f"{plan.height}x{plan.width}", "frames": plan.total_frames, "fps": plan.fps,
        "steps": plan.num_steps, "guidance": plan.guidance_scale, "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(), "load": load, "median_wall_s": statistics.median(walls), "min_wall_s": min(walls),
        "max_wall_s": max(walls), "median_cpu_s": statistics.median(r["cpu_s"] for r in runs), "median_run": median, "runs": runs,
    }  # fmt: skip
    print(f"{args.preset}: {report['size']}, {report['frames']} frames ({report['frames'] / plan.fps:.2f} s at {plan.fps:g} fps), "
          f"{plan.num_steps} steps, guidance {plan.guidance_scale}, {report['threads']} threads, {os.cpu_count()} CPUs")
    print(f"load from the package: {load['wall_s']:.2f} s wall, {load['cpu_s']:.2f} s CPU")
    print(f"generate ({args.runs} runs): median {report['median_wall_s']:.2f} s wall (min {min(walls):.2f}, max {max(walls):.2f}), "
          f"median {report['median_cpu_s']:.2f} s CPU")
    print("median run: " + ", ".join(f"{k.removesuffix('_s')} {median[k]:.2f} s"
                                     for k in ("text_s", "sampling_and_rest_s", "decode_s")))  # fmt: skip
    if args.cli:
        with tempfile.TemporaryDirectory() as tmp:
            cmd = [sys.executable, "-m", "opensora_sdk", "generate", "--prompt", PROMPT, "--save-dir", tmp, "--no-progress"]
            env = dict(os.environ, OMP_NUM_THREADS=str(args.threads)) if args.threads else None
            t, c = time.perf_counter(), cpu_s(resource.RUSAGE_CHILDREN)
            subprocess.run(cmd, check=True, capture_output=True, env=env)
            report["cli"] = {"wall_s": time.perf_counter() - t, "cpu_s": cpu_s(resource.RUSAGE_CHILDREN) - c}
        print(f"`opensora generate` end to end: {report['cli']['wall_s']:.2f} s wall, {report['cli']['cpu_s']:.2f} s CPU")
    if args.json:
        from opensora_sdk.loading import write_json_atomic

        write_json_atomic(report, args.json)
    return report


if __name__ == "__main__":
    main()
