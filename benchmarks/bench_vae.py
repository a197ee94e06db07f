"""Benchmark the full-size v1.2 video VAE on CPU with random weights.

For each case a fresh subprocess builds the model (seed 0, so every case has the same
weights), runs the call `repeats` times and reports the median time and the process's peak
resident memory (resource.getrusage ru_maxrss) next to its resident memory before the first
call, so the numbers of one case do not leak into another. The tiling-error cases decode the
same latent with and without tiles and report the largest absolute difference and the PSNR
(peak = the untiled output's max - min; random weights give noise images, so this measures
the seams and per-tile normalisation, not image quality).

    python benchmarks/bench_vae.py            # the default cases (about 11 minutes on 2 free cores)
    python benchmarks/bench_vae.py --quick    # 128x128 only
    python benchmarks/bench_vae.py --jobs 4   # 4 cases at a time: needs 4 x --threads free cores
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

# (op, frames, size, tile, overlap, repeats); tile None = untiled. A tile_error case takes a
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


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def worker(spec: dict) -> dict:
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
        [sys.executable, __file__, "--worker", json.dumps(spec)], capture_output=True, text=True, check=False
    )
    if out.returncode:
        raise RuntimeError(f"case {case} failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="128x128 cases only")
    parser.add_argument("--threads", type=int, default=2, help="torch threads per case")
    parser.add_argument("--jobs", type=int, default=1, help="cases run at the same time (each its own process)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return
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


if __name__ == "__main__":
    main()
