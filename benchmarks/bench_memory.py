"""Memory modes side by side on one STDiT3 config: weights, forward time, error against bf16.

    python benchmarks/bench_memory.py                      # a mid-size config (hidden 384 x 4) on the CPU
    python benchmarks/bench_memory.py --hidden 1152 --depth 28 --heads 16 --device cuda

Variants, run interleaved (variant after variant within each round) so that a loaded machine
slows them alike; the table prints medians and ratios to bf16:

    fp32 / bf16                plain weights
    fp8 / fp8 per-tensor       `opensora_sdk.fp8`: float8 e4m3 weights, bf16 compute
    block swap N               bf16, N blocks resident, the others streamed (`opensora_sdk.offload`)
    sequential                 bf16, every block moved in just before it runs, no prefetch

Errors: max |out - out_bf16| / max |out_bf16| and the RMS ratio, for the tiny config and the
chosen one. Weights on the device: measured bytes of the model (fp32 / bf16 / fp8); for block
swap and sequential the formula of `opensora_sdk.estimates.device_weight_bytes` (tests check
it against a forward), and on CUDA the measured peak of allocated memory during the forward.
On the CPU, block swap and sequential run the hook path with no copies (device = host): the
figures show their overhead and that the output is unchanged (bitwise), not transfer costs.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch

from opensora_sdk import estimates, fp8
from opensora_sdk.configs import STDIT3_PRESETS, preset
from opensora_sdk.models import STDiT3
from opensora_sdk.offload import BlockSwap, move_module, transformer_blocks


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--hidden", type=int, default=384)
    p.add_argument("--depth", type=int, default=4)
    p.add_argument("--heads", type=int, default=6)
    p.add_argument("--latent", default="3x12x12", help="latent T x H x W")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--block-swap", default="0,4", help="resident block counts to time, comma separated")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (1: steadier timings on a shared machine)")
    return p.parse_args(argv)


def random_model(cfg, seed=0) -> STDiT3:
    torch.manual_seed(seed)
    model = STDiT3(cfg).eval()
    with torch.no_grad():  # break the zero init of the temporal blocks' outputs
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.02)
    return model.requires_grad_(False)


def inputs_for(cfg, B, T, H, W, device):
    g = torch.Generator().manual_seed(1)
    L = cfg.model_max_length
    mask = torch.zeros(B, L, dtype=torch.long)
    mask[:, : max(1, L // 2)] = 1
    return dict(x=torch.randn(B, cfg.in_channels, T, H, W, generator=g).to(device),
                timestep=torch.linspace(900.0, 100.0, B).to(device),
                y=torch.randn(B, 1, L, cfg.caption_channels, generator=g).to(device), mask=mask.to(device),
                fps=24.0, height=8.0 * H, width=8.0 * W)


def errors(out, ref) -> tuple[float, float]:
    diff = (out.float() - ref.float())
    return (diff.abs().max() / ref.abs().max()).item(), (diff.pow(2).mean().sqrt() / ref.pow(2).mean().sqrt()).item()


def fp8_error_table(cfg, B, T, H, W) -> list[str]:
    model = random_model(cfg).to(torch.bfloat16)
    inp = inputs_for(cfg, B, T, H, W, "cpu")
    with torch.no_grad():
        ref = model(**inp)
        lines = []
        for per_channel in (True, False):
            q = copy.deepcopy(model)
            fp8.quantize_transformer_fp8(q, per_channel=per_channel)
            mx, rms = errors(q(**inp), ref)
            kind = "per-channel" if per_channel else "per-tensor"
            lines.append(f"  hidden {cfg.hidden_size} x depth {cfg.depth}, {kind:<11}: max {mx:.4f}, RMS {rms:.4f}")
    return lines


def main(argv=None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    T, H, W = (int(v) for v in args.latent.lower().split("x"))
    cfg = preset("STDiT3-tiny", STDIT3_PRESETS)
    cfg.hidden_size, cfg.depth, cfg.num_heads = args.hidden, args.depth, args.heads
    base = random_model(cfg)
    inp = inputs_for(cfg, args.batch, T, H, W, device)
    split = estimates.transformer_weight_split(cfg)
    nblocks = len(transformer_blocks(base))

    variants = {}  # name -> (model, setup, teardown, device weight bytes)
    fp32 = base.to(device)
    bf16 = copy.deepcopy(base).to(device, torch.bfloat16)
    variants["fp32"] = (fp32, None, None, fp8.weight_bytes(fp32))
    variants["bf16"] = (bf16, None, None, fp8.weight_bytes(bf16))
    for per_channel, name in ((True, "fp8"), (False, "fp8 per-tensor")):
        q = copy.deepcopy(bf16)
        fp8.quantize_transformer_fp8(q, per_channel=per_channel)
        variants[name] = (q, None, None, fp8.weight_bytes(q))
    for n in (int(v) for v in args.block_swap.split(",") if v.strip()):
        n = min(n, nblocks)
        model = copy.deepcopy(bf16)
        swap = BlockSwap(transformer_blocks(model), device, n)
        variants[f"block swap {n}"] = (model, (lambda m=model, s=swap: s.enter(m)), (lambda m=model, s=swap: s.detach()),
                                       estimates.device_weight_bytes(split, 2, blocks_on_device=n))
    model = copy.deepcopy(bf16)
    swap = BlockSwap(transformer_blocks(model), device, 0, prefetch=False)
    variants["sequential"] = (model, (lambda m=model, s=swap: s.enter(m)), (lambda m=model, s=swap: s.detach()),
                              estimates.device_weight_bytes(split, 2, blocks_on_device=-1))

    times = {k: [] for k in variants}
    peaks, outs = {}, {}
    with torch.no_grad():
        for name, (model, setup, teardown, _) in variants.items():  # warm-up, outputs
            if setup:
                setup()
            outs[name] = model(**inp)
            if teardown:
                teardown()
        for _ in range(args.runs):
            for name, (model, setup, teardown, _) in variants.items():
                if setup:
                    setup()
                if device.type == "cuda":
                    torch.cuda.synchronize()
                    torch.cuda.reset_peak_memory_stats()
                t0 = time.perf_counter()
                model(**inp)
                if device.type == "cuda":
                    torch.cuda.synchronize()
                    peaks[name] = torch.cuda.max_memory_allocated()
                times[name].append(time.perf_counter() - t0)
                if teardown:
                    teardown()
    for name, (model, *_rest) in variants.items():
        if "swap" in name or name == "sequential":
            move_module(model, torch.device("cpu"))

    ref = outs["bf16"]
    print(f"STDiT3 hidden {cfg.hidden_size} x depth {cfg.depth} ({nblocks} blocks), batch {args.batch}, latent "
          f"{T}x{H}x{W}, {args.runs} interleaved runs on {device}")
    head = f"{'variant':<16} {'weights':>10} {'ratio':>6} {'median s':>9} {'ratio':>6} {'max err':>8} {'RMS err':>8}"
    print(head + ("  peak alloc" if peaks else ""))
    wb, tb = variants["bf16"][3], statistics.median(times["bf16"])
    for name, (*_m, weights) in variants.items():
        t = statistics.median(times[name])
        mx, rms = errors(outs[name], ref)
        same = " (bitwise = bf16)" if name not in ("fp32", "bf16") and torch.equal(outs[name], ref) else ""
        peak = f"  {peaks[name] / 2**20:9.1f} MiB" if name in peaks else ""
        print(f"{name:<16} {weights / 2**20:7.2f} MiB {weights / wb:6.2f} {t:9.4f} {t / tb:6.2f} {mx:8.4f} {rms:8.4f}"
              f"{peak}{same}")
    print("fp8 against bf16, one forward (error / output magnitude):")
    tiny = preset("STDiT3-tiny", STDIT3_PRESETS)
    for line in fp8_error_table(tiny, 2, 3, 8, 8) + fp8_error_table(cfg, args.batch, T, H, W):
        print(line)


if __name__ == "__main__":
    main()
