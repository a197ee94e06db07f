"""Training throughput and peak memory: the tiny CPU recipe, and one STDiT3 training step.

    # the tiny recipe end to end (synthetic clips -> features -> training), as a subprocess:
    python benchmarks/bench_training.py tiny --num 128 --steps 100 --work outputs/bench_tiny

    # one XL/2 training step on precomputed-feature inputs (no VAE, no T5), with and without
    # gradient checkpointing, each variant in its own process (peak RSS is per process):
    python benchmarks/bench_training.py step --preset STDiT3-XL/2 --latent 2x18x32 --batch 1 \
        --grad-ckpt both --no-optimizer

A "step" is the trainer's: rectified-flow loss (logit-normal t, warp, a frame mask), backward,
gradient clipping and, unless --no-optimizer, AdamW and the EMA update (these add 12 bytes per
parameter: Adam's two moments and the fp32 EMA; 13.2 GiB for XL/2). Peak memory is the
process's `ru_maxrss` on CPU and `torch.cuda.max_memory_allocated` on CUDA. Times are medians
over --steps steps after --warmup.
"""

from __future__ import annotations

import argparse
import csv
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]


def rss_mib() -> float:
    scale = 1 if sys.platform == "darwin" else 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / 2**20


def bench_tiny(args) -> None:
    from opensora_sdk.training import synthetic

    work = Path(args.work)
    data = work / "data" / "data.csv"
    if not data.exists():
        t = time.perf_counter()
        synthetic.generate_dataset(data.parent, args.num, size=64, num_frames=51, seed=0)
        print(f"synthetic data: {args.num} clips 64x64x51 in {time.perf_counter() - t:.1f} s")
    out = work / "run"
    cmd = [sys.executable, str(REPO / "training" / "train.py"), "--config", str(REPO / "training" / "configs" / "tiny_cpu.yaml"),
           "--output-dir", str(out), "--max-steps", str(args.steps), "--set", f"data.csv={data}",
           "--set", f"features.dir={work / 'features'}", "--set", "log_every=10", "--set", f"ckpt_every={args.steps}"]  # fmt: skip
    if args.threads:
        cmd += ["--set", f"cpu_threads={args.threads}"]
    t = time.perf_counter()
    subprocess.run(cmd, check=True, cwd=REPO)
    wall = time.perf_counter() - t
    with open(out / "logs" / "train_log.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    summary = json.loads((out / "summary.json").read_text())
    steady = rows[len(rows) // 2 :]  # after warm-up
    sps = statistics.mean(float(r["samples_per_s"]) for r in steady)
    tps = statistics.mean(float(r["tokens_per_s"]) for r in steady)
    train_s = float(rows[-1]["elapsed_s"])
    print(json.dumps({
        "mode": "tiny", "steps": args.steps, "samples_per_s": round(sps, 1), "tokens_per_s": round(tps, 0),
        "train_s": train_s, "process_wall_s": round(wall, 1), "peak_rss_mib": summary["peak_mem_mib"],
        "final_loss": round(summary["last_loss"], 4), "threads": args.threads or torch.get_num_threads(),
    }, indent=2))  # fmt: skip


def bench_step(args) -> None:
    if args.grad_ckpt == "both":
        for value in ("off", "on"):
            cmd = [sys.executable, __file__, *[a for a in sys.argv[1:] if a != "both"]]
            cmd[cmd.index("--grad-ckpt") + 1 : cmd.index("--grad-ckpt") + 1] = [value]
            subprocess.run(cmd, check=True)
        return
    from opensora_sdk.configs import STDIT3_PRESETS, preset
    from opensora_sdk.models.stdit3 import STDiT3
    from opensora_sdk.schedulers.rflow import RectifiedFlow
    from opensora_sdk.training.ema import EMA
    from opensora_sdk.training.masks import MaskGenerator

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    T, H, W = (int(v) for v in args.latent.lower().split("x"))
    cfg = preset(args.preset, STDIT3_PRESETS)
    torch.manual_seed(0)
    with torch.device("meta"):
        model = STDiT3(cfg)
    model.to_empty(device=device)
    model.initialize_weights()
    model.enable_gradient_checkpointing(args.grad_ckpt == "on")
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = ema = None
    if not args.no_optimizer:
        optimizer = torch.optim.AdamW(params, lr=1e-4, eps=1e-15, weight_decay=0.0, fused=args.fused or None)
        ema = EMA(model)
    rss_model = rss_mib()
    B, L = args.batch, cfg.model_max_length
    x0 = torch.randn(B, cfg.in_channels, T, H, W, device=device)
    y = torch.randn(B, 1, L, cfg.caption_channels, device=device)
    mask = torch.zeros(B, L, dtype=torch.long, device=device)
    mask[:, : args.text_len] = 1
    frames = max(1, (T // 5) * 17 + (T % 5) * 4)  # pixel frames giving T latent frames (approx.)
    kwargs = dict(y=y, mask=mask, fps=torch.full((B,), 24.0, device=device), height=torch.full((B,), H * 8.0, device=device),
                  width=torch.full((B,), W * 8.0, device=device), num_frames=torch.full((B,), float(frames), device=device))  # fmt: skip
    scheduler, masks = RectifiedFlow(), MaskGenerator("stage1", seed=0)
    gen = torch.Generator(device).manual_seed(0)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.mixed_precision == "bf16")
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for i in range(args.warmup + args.steps):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t = time.perf_counter()
        with autocast:
            loss = scheduler.training_loss(model, x0, {**kwargs, "generator": gen}, mask=masks.get_masks(x0), generator=gen).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        if optimizer is not None:
            optimizer.step()
            ema.update(model)
        for p in params:
            p.grad = None
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if i >= args.warmup:
            times.append(time.perf_counter() - t)
    result = {
        "mode": "step", "preset": args.preset, "latent": [T, H, W], "batch": B, "tokens": B * T * -(-H // 2) * -(-W // 2),
        "grad_ckpt": args.grad_ckpt, "optimizer_and_ema": not args.no_optimizer, "fused": args.fused, "mixed_precision": args.mixed_precision,
        "device": str(device), "threads": torch.get_num_threads(), "s_per_step": round(statistics.median(times), 3),
        "params_m": round(sum(p.numel() for p in params) / 1e6, 1),
    }  # fmt: skip
    if device.type == "cuda":
        result["peak_cuda_mib"] = round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
        result["gpu"] = torch.cuda.get_device_name(device)
    else:
        result["rss_after_build_mib"] = round(rss_model, 1)
        result["peak_rss_mib"] = round(rss_mib(), 1)
    print(json.dumps(result))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="mode", required=True)
    tiny = sub.add_parser("tiny", help="the tiny recipe end to end on synthetic data")
    tiny.add_argument("--num", type=int, default=128, help="synthetic clips (64x64, 51 frames)")
    tiny.add_argument("--steps", type=int, default=100)
    tiny.add_argument("--work", default="outputs/bench_tiny", help="folder for data, features and the run")
    tiny.add_argument("--threads", type=int, default=None)
    step = sub.add_parser("step", help="one STDiT3 training step on feature-style inputs")
    step.add_argument("--preset", default="STDiT3-XL/2")
    step.add_argument("--latent", default="2x18x32", help="latent T x H x W (144p 16:9 is 18x32)")
    step.add_argument("--batch", type=int, default=1)
    step.add_argument("--text-len", type=int, default=100, help="valid text tokens per caption")
    step.add_argument("--grad-ckpt", default="off", choices=["off", "on", "both"])
    step.add_argument("--no-optimizer", action="store_true", help="skip AdamW + EMA (saves 12 bytes/parameter)")
    step.add_argument("--fused", action="store_true", help="fused AdamW (CUDA)")
    step.add_argument("--mixed-precision", default="no", choices=["no", "bf16"])
    step.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    step.add_argument("--steps", type=int, default=2)
    step.add_argument("--warmup", type=int, default=1)
    step.add_argument("--threads", type=int, default=None)
    args = p.parse_args(argv)
    bench_tiny(args) if args.mode == "tiny" else bench_step(args)


if __name__ == "__main__":
    main()
