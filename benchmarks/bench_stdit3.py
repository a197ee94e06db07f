"""STDiT3 forward time and peak memory with random weights.

    python benchmarks/bench_stdit3.py --preset STDiT3-XL/2 --batch 2 --latent 5x16x16 \
        --text-len 300 --runs 3

Run it as its own process: peak host memory is the process's `ru_maxrss` high-water mark,
so the figure printed for the forward is the growth of that mark over the built model. On
CUDA the peak is `torch.cuda.max_memory_allocated` during the timed runs.
"""

from __future__ import annotations

import argparse
import resource
import statistics
import sys
import time

import torch

from opensora_sdk.configs import STDIT3_PRESETS, preset
from opensora_sdk.models import STDiT3


def maxrss_mib() -> float:
    scale = 1 if sys.platform == "darwin" else 1024  # bytes on macOS, KiB on Linux
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / 2**20


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="STDiT3-XL/2", choices=sorted(STDIT3_PRESETS))
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--latent", default="5x16x16", help="latent T x H x W")
    p.add_argument("--text-len", type=int, default=300, help="valid text tokens per row")
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--attention", default="sdpa", choices=["sdpa", "flash", "xformers"])
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    T, H, W = (int(v) for v in args.latent.lower().split("x"))
    cfg = preset(args.preset, STDIT3_PRESETS)
    if not 1 <= args.text_len <= cfg.model_max_length:
        raise SystemExit(f"--text-len must be in 1..{cfg.model_max_length}, got {args.text_len}")
    rss_start = maxrss_mib()

    with torch.device("meta"):
        model = STDiT3(cfg)
    model.to_empty(device=device)
    model.initialize_weights()
    model.to(dtype).eval()
    model.set_attention_backend(args.attention)
    rss_model = maxrss_mib()

    g = torch.Generator(device="cpu").manual_seed(0)
    B, L = args.batch, cfg.model_max_length
    mask = torch.zeros(B, L, dtype=torch.long)
    mask[:, : args.text_len] = 1
    inputs = dict(
        x=torch.randn(B, cfg.in_channels, T, H, W, generator=g),
        timestep=torch.rand(B, generator=g) * 1000,
        y=torch.randn(B, 1, L, cfg.caption_channels, generator=g),
        mask=mask,
        fps=torch.full((B,), 24.0),
        height=torch.full((B,), H * 8.0),
        width=torch.full((B,), W * 8.0),
    )
    inputs = {k: v.to(device) for k, v in inputs.items()}

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    times = []
    with torch.inference_mode():
        for _ in range(args.warmup):
            model(**inputs)
        sync()
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        for _ in range(args.runs):
            start = time.perf_counter()
            out = model(**inputs)
            sync()
            times.append(time.perf_counter() - start)
    rss_end = maxrss_mib()

    tokens = -(-T // cfg.patch_size[0]) * -(-H // cfg.patch_size[1]) * -(-W // cfg.patch_size[2])
    params = sum(p.numel() for p in model.parameters())
    print(f"preset {args.preset} ({params / 1e9:.3f} B params), {args.dtype} on {device}"
          + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else f", {torch.get_num_threads()} threads"))
    print(f"input x {list(inputs['x'].shape)}, {tokens} tokens/sample, text {args.text_len}/{L}, "
          f"attention {args.attention}, output {list(out.shape)}")
    print(f"forward: median {statistics.median(times):.3f} s over {args.runs} runs "
          f"(min {min(times):.3f}, max {max(times):.3f}; {args.warmup} warm-up)")
    print(f"host peak RSS: {rss_model:.0f} MiB after building the model "
          f"(+{rss_model - rss_start:.0f}), forward adds {rss_end - rss_model:.0f} MiB")
    if device.type == "cuda":
        weights = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20
        print(f"GPU peak allocated during forward: {torch.cuda.max_memory_allocated(device) / 2**20:.0f} MiB "
              f"(weights {weights:.0f} MiB)")


if __name__ == "__main__":
    main()
