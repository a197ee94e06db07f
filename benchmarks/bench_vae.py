"""The v1.2 video VAE decode on CPU: the plain decoders against the fast path, float32 and
bfloat16, side by side in one run (and, with --table, the former per-size table).

Default: for the built-in tiny VAE (its default clip, 17 frames of 64x64) and the v1.2 VAE
architecture with random weights (seed 0) at 17x128x128, four variants decode the same
latent: the plain decoders (`vae.set_fast_decode(False)`) and the fast path (vae_fast.py,
the default), each in float32 and in bfloat16 (weights cast from the same float32 model).
Runs alternate variant by variant for `--rounds` rounds after one warm-up each; the table
gives medians, the ratio to the plain float32 decode, the difference from the plain float32
output (max / mean abs, and the PSNR of the uint8 frames a video stores), and the memory of
one decode measured in a fresh subprocess per variant (the peak resident memory of the decode,
VmHWM after resetting it just before; and the part of it above the resident memory then).

bfloat16 is fast where the CPU has AMX or AVX512-BF16 (torch.backends.cpu.get_cpu_capability()
and /proc/cpuinfo's amx_bf16 / avx512_bf16); elsewhere it is emulated and slower than float32.

    python benchmarks/bench_vae.py                    # both models (about 10 minutes on 2 free cores)
    python benchmarks/bench_vae.py --only builtin     # the built-in VAE only (seconds)
    python benchmarks/bench_vae.py --table [--quick]  # per-size decode/encode/tiling table, one process per case
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import resource
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

MODELS = {  # name: (description, frames, size, default rounds)
    "builtin": ("built-in tiny VAE", 17, 64, 5),
    "v1.2": ("v1.2 VAE architecture, random weights", 17, 128, 2),
}
VARIANTS = ("plain fp32", "fast fp32", "plain bf16", "fast bf16")  # (path, dtype)


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def _reset_peak_rss() -> bool:
    """Reset this process's peak RSS (Linux >= 4.0: clear_refs 5), so that the peak read after
    a call is the call's own rather than that of the loading before it."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _peak_rss_mb() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024  # kB


def _current_rss_mb() -> float:
    import os

    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


# --------------------------------------------------------------------------------------------
# Decode: plain against fast, float32 and bfloat16
# --------------------------------------------------------------------------------------------


def build(name: str, dtype=None):
    """The model of `name` in float32 (v1.2: seed 0), or built straight in `dtype` with
    placeholder weights (for the memory subprocess: no float32 copy in its peak)."""
    import torch

    from opensora_sdk.models import VideoAutoencoder

    if name == "builtin":
        from opensora_sdk.models.auto import load_vae
        from opensora_sdk.presets import BUILTIN_DIR

        return load_vae(str(BUILTIN_DIR / "vae"), dtype=dtype or torch.float32, device="cpu").eval()
    if dtype is None:
        torch.manual_seed(0)
        return VideoAutoencoder().eval()
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device("meta"):
            model = VideoAutoencoder()
    finally:
        torch.set_default_dtype(default)
    model.to_empty(device="cpu")
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02)
        model.scale.fill_(1)
        model.shift.zero_()
    return model.to(dtype).eval()  # the buffers too, as a cast of a loaded model


def _variant(model32, model16, variant: str):
    path, dtype = variant.split()
    model = model32 if dtype == "fp32" else model16
    return model, path == "fast"


def latent_for(model, name: str):
    import torch

    _, frames, size, _ = MODELS[name]
    t, h, w = model.latent_size(frames, size, size)
    return torch.randn(1, 4, t, h, w, generator=torch.Generator().manual_seed(1)), frames


def memory_worker(spec: dict) -> dict:
    """One decode of one variant in this fresh process: peak RSS and the part above the RSS before it."""
    import torch

    torch.set_num_threads(spec["threads"])
    dtype = torch.bfloat16 if spec["variant"].endswith("bf16") else torch.float32
    model = build(spec["model"], dtype).set_fast_decode(spec["variant"].startswith("fast"))
    latent, frames = latent_for(model, spec["model"])
    reset = _reset_peak_rss()
    before = _current_rss_mb()
    with torch.inference_mode():
        model.decode(latent, frames)
    peak = _peak_rss_mb() if reset else _rss_mb()
    return dict(peak_rss_mb=peak, decode_mb=max(peak - before, 0.0))


def run_memory(model: str, variant: str, threads: int) -> dict:
    spec = dict(model=model, variant=variant, threads=threads)
    out = subprocess.run([sys.executable, __file__, "--memory-worker", json.dumps(spec)],
                         capture_output=True, text=True, check=False)
    if out.returncode:
        raise RuntimeError(f"memory worker {spec} failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def psnr_uint8(a, b) -> float:
    """PSNR (dB, peak 255) of the uint8 frames two decoded videos [1, 3, N, H, W] are saved as."""
    import numpy as np

    from opensora_sdk.video import Video

    fa, fb = (Video.from_tensor(x[0]).frames.astype(np.float64) for x in (a, b))
    mse = float(((fa - fb) ** 2).mean())
    return math.inf if mse == 0 else 10 * math.log10(255**2 / mse)


def compare(name: str, rounds: int | None, threads: int) -> None:
    import torch

    torch.set_num_threads(threads)
    description, frames, size, default_rounds = MODELS[name]
    rounds = rounds or default_rounds
    model32 = build(name)
    model16 = copy.deepcopy(model32).to(torch.bfloat16)
    latent, frames = latent_for(model32, name)
    outputs, times = {}, {v: [] for v in VARIANTS}
    with torch.inference_mode():
        for variant in VARIANTS:  # warm-up; its output is the one compared
            model, fast = _variant(model32, model16, variant)
            outputs[variant] = model.set_fast_decode(fast).decode(latent, frames).float()
        for _ in range(rounds):
            for variant in VARIANTS:
                model, fast = _variant(model32, model16, variant)
                model.set_fast_decode(fast)
                start = time.perf_counter()
                model.decode(latent, frames)
                times[variant].append(time.perf_counter() - start)
    memory = {v: run_memory(name, v, threads) for v in VARIANTS}
    ref = outputs["plain fp32"]
    base = statistics.median(times["plain fp32"])
    print(f"\n{description}: decode of a {frames}x{size}x{size} clip (latent {list(latent.shape)}), "
          f"median of {rounds} interleaved rounds")
    print(f"{'variant':<12}{'median s':>10}{'speed-up':>10}{'max abs diff':>14}{'mean abs diff':>15}"
          f"{'PSNR uint8':>12}{'peak RSS MB':>13}{'decode MB':>11}")
    for variant in VARIANTS:
        med = statistics.median(times[variant])
        diff = (outputs[variant] - ref).abs()
        psnr = psnr_uint8(outputs[variant], ref)
        mem = memory[variant]
        print(f"{variant:<12}{med:>10.3f}{base / med:>9.2f}x{diff.max().item():>14.2e}{diff.mean().item():>15.2e}"
              f"{psnr:>9.1f} dB{mem['peak_rss_mb']:>13.0f}{mem['decode_mb']:>11.0f}", flush=True)


# --table: (op, frames, size, tile, overlap, repeats); tile None = untiled. A tile_error case takes a
# list of tiles and overlaps, all compared with one untiled decode.
DEFAULT_CASES = [
    ("decode", 17, 128, None, None, 3),
    ("decode", 51, 128, None, None, 1),
    ("decode", 17, 256, None, None, 1),
    ("decode", 17, 256, 128, 32, 1),
    ("decode", 51, 256, None, None, 1),
    ("encode", 17, 128, None, None, 3),
    ("encode", 51, 128, None, None, 1),
    ("encode", 17, 256, None, None, 1),
    ("encode", 17, 256, 128, 32, 1),
    ("tile_error", 17, 256, [128, 128], [32, 64], 1),
    ("tile_error", 17, 256, [192], [64], 1),
]
QUICK_CASES = [c for c in DEFAULT_CASES if c[2] == 128] + [("tile_error", 17, 128, [64], [16], 1)]


def table_worker(spec: dict) -> dict:
    import torch

    from opensora_sdk.models import VideoAutoencoder
    from opensora_sdk.models.vae_tiling import SpatialTiling

    torch.set_num_threads(spec["threads"])
    torch.manual_seed(0)
    model = VideoAutoencoder().eval()
    frames, size = spec["frames"], spec["size"]
    tiling = SpatialTiling(spec["tile"], spec["overlap"]) if isinstance(spec["tile"], int) else None
    t, h, w = model.latent_size(frames, size, size)
    gen = torch.Generator().manual_seed(1)
    latent = torch.randn(1, 4, t, h, w, generator=gen)
    video = torch.rand(1, 3, frames, size, size, generator=gen) * 2 - 1
    base = _rss_mb()
    result = {**spec, "rss_before_mb": base}
    with torch.inference_mode():
        if spec["op"] == "tile_error":
            ref = model.decode(latent, frames)
            peak = (ref.max() - ref.min()).item()
            result["rows"] = []
            for tile, overlap in zip(spec["tile"], spec["overlap"]):
                tiled = model.decode(latent, frames, tiling=SpatialTiling(tile, overlap))
                diff = (tiled - ref).double()
                rmse = diff.pow(2).mean().sqrt().item()
                result["rows"].append(dict(
                    tile=tile, overlap=overlap, max_abs_err=diff.abs().max().item(), rmse=rmse,
                    output_range=peak, psnr_db=20 * math.log10(peak / rmse) if rmse else math.inf,
                ))
            return result
        times = []
        for _ in range(spec["repeats"]):
            start = time.perf_counter()
            if spec["op"] == "decode":
                model.decode(latent, frames, tiling=tiling)
            else:
                model.encode(video, generator=gen, tiling=tiling)
            times.append(time.perf_counter() - start)
    result.update(median_s=statistics.median(times), times_s=times, peak_rss_mb=_rss_mb())
    result["working_set_mb"] = result["peak_rss_mb"] - base
    return result


def run_case(case, threads: int) -> dict:
    op, frames, size, tile, overlap, repeats = case
    spec = dict(op=op, frames=frames, size=size, tile=tile, overlap=overlap, repeats=repeats, threads=threads)
    out = subprocess.run(
        [sys.executable, __file__, "--table-worker", json.dumps(spec)], capture_output=True, text=True, check=False
    )
    if out.returncode:
        raise RuntimeError(f"case {case} failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def table(args) -> None:
    """The former benchmark: decode / encode / tiling per size, one process per case."""
    cases = QUICK_CASES if args.quick else DEFAULT_CASES
    print(f"full-size v1.2 VAE, random weights, CPU float32, {args.threads} threads, batch 1, one process per case, "
          f"{args.jobs} at a time")
    print(f"{'op':<7}{'frames':>7}{'size':>6}  {'tiling':<10}{'median s':>10}{'runs':>5}"
          f"{'peak RSS MB':>13}{'before MB':>11}{'working MB':>12}")
    errors = []
    with ThreadPoolExecutor(args.jobs) as pool:
        for r in pool.map(lambda case: run_case(case, args.threads), cases):  # in case order
            if r["op"] == "tile_error":
                errors += [{**r, **row} for row in r["rows"]]
                continue
            tiling = f"{r['tile']}/{r['overlap']}" if r["tile"] else "off"
            print(f"{r['op']:<7}{r['frames']:>7}{r['size']:>6}  {tiling:<10}{r['median_s']:>10.2f}{r['repeats']:>5}"
                  f"{r['peak_rss_mb']:>13.0f}{r['rss_before_mb']:>11.0f}{r['working_set_mb']:>12.0f}", flush=True)
    if errors:
        print("\ntiling error of decode against untiled decode (same weights, same latent)")
        print(f"{'frames':>7}{'size':>6}  {'tile/overlap px':<16}{'max abs err':>12}{'rmse':>10}"
              f"{'out range':>10}{'PSNR dB':>9}")
        for r in errors:
            tiling = f"{r['tile']}/{r['overlap']}"
            print(f"{r['frames']:>7}{r['size']:>6}  {tiling:<16}{r['max_abs_err']:>12.4f}{r['rmse']:>10.4f}"
                  f"{r['output_range']:>10.3f}{r['psnr_db']:>9.2f}")




def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", choices=sorted(MODELS), help="compare one model only")
    parser.add_argument("--rounds", type=int, default=None,
                        help="interleaved timed rounds per model (default: 5 for builtin, 2 for v1.2)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads (default: torch's, the cores; on a machine busy with other work, 1 "
                             "gives steadier figures)")
    parser.add_argument("--table", action="store_true", help="the per-size decode/encode/tiling table instead")
    parser.add_argument("--quick", action="store_true", help="with --table: 128x128 cases only")
    parser.add_argument("--jobs", type=int, default=1, help="with --table: cases run at the same time")
    parser.add_argument("--table-worker", help=argparse.SUPPRESS)
    parser.add_argument("--memory-worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.table_worker:
        print(json.dumps(table_worker(json.loads(args.table_worker))))
        return
    if args.memory_worker:
        print(json.dumps(memory_worker(json.loads(args.memory_worker))))
        return
    import torch

    threads = args.threads or torch.get_num_threads()
    if args.table:
        args.threads = threads
        table(args)
        return
    from opensora_sdk.models.vae import cpu_has_fast_bf16

    native = "native (AMX / AVX512-BF16)" if cpu_has_fast_bf16() else "emulated (no AMX / AVX512-BF16: slow)"
    print(f"torch {torch.__version__}, CPU capability {torch.backends.cpu.get_cpu_capability()}, bfloat16 {native}, "
          f"{threads} threads; speed-up and differences against the plain float32 decode")
    for name in [args.only] if args.only else list(MODELS):
        compare(name, args.rounds, threads)


if __name__ == "__main__":
    main()
