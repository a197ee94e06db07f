"""Sequence parallelism: bytes each rank sends per step against the model's activations, and
wall time per step, for 1 process and P processes (gloo on the CPU, or torchrun on GPUs).

    python benchmarks/bench_distributed.py --nproc 2 --latent 8x32x32 --hidden 256 --heads 8 --depth 4
    torchrun --nproc_per_node 8 benchmarks/bench_distributed.py --torchrun --hidden 1152 --heads 16 \
        --depth 28 --latent 30x90x160 --dtype bfloat16

Without --torchrun the script spawns the processes itself (localhost, gloo), first one
process (the reference), then --nproc. Each process uses --threads CPU threads, so on a
machine with fewer cores than nproc*threads the P-process times are not a speed-up measure.

Bytes are those the collectives of `opensora_sdk.distributed` send from one rank (ring /
pairwise algorithms: all-to-all (P-1)/P of its input, all-gather (P-1) x its chunk), counted
over one forward ("sample" step, no grad) and one forward + backward ("train" step). The
activation unit is one block's token tensor, B*N*C elements in the model dtype.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import sys
import time

import torch
import torch.multiprocessing as mp

from opensora_sdk import distributed
from opensora_sdk.configs import STDiT3Config
from opensora_sdk.models import STDiT3


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--nproc", type=int, default=2, help="processes of the parallel run (spawned here)")
    p.add_argument("--torchrun", action="store_true", help="run inside torchrun instead of spawning")
    p.add_argument("--modes", default="ulysses,allgather_kv,dsp", help="comma-separated SP modes")
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--depth", type=int, default=4)
    p.add_argument("--batch", type=int, default=2, help="2 = one prompt under classifier-free guidance")
    p.add_argument("--latent", default="8x32x32", help="latent T x H x W (patch 1x2x2: S = H*W/4)")
    p.add_argument("--text-len", type=int, default=32)
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads per process")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--no-train", action="store_true", help="time forward only")
    p.add_argument("--json", default=None, help="also write the results here")
    return p.parse_args(argv)


def build(args, device):
    cfg = STDiT3Config(hidden_size=args.hidden, depth=args.depth, num_heads=args.heads, caption_channels=64,
                       model_max_length=args.text_len)  # fmt: skip
    torch.manual_seed(0)
    model = STDiT3(cfg).to(device, getattr(torch, args.dtype))
    T, H, W = (int(v) for v in args.latent.lower().split("x"))
    B = args.batch
    g = torch.Generator().manual_seed(1)
    inputs = dict(x=torch.randn(B, 4, T, H, W, generator=g), timestep=torch.full((B,), 500.0),
                  y=torch.randn(B, 1, args.text_len, 64, generator=g), mask=torch.ones(B, args.text_len, dtype=torch.long),
                  fps=torch.full((B,), 24.0), height=torch.full((B,), 8.0 * H), width=torch.full((B,), 8.0 * W))  # fmt: skip
    inputs = {k: v.to(device) for k, v in inputs.items()}
    return model, inputs, B * T * (H // 2) * (W // 2) * args.hidden * model.x_embedder.proj.weight.element_size()


def timed(fn, runs: int, group, device) -> tuple[float, float]:
    """(median seconds, bytes sent in the last run)."""
    fn()  # warm-up
    times = []
    for _ in range(runs):
        if group is not None:
            torch.distributed.barrier(group)
        if device.type == "cuda":
            torch.cuda.synchronize()
        with distributed.count_communication() as sent:
            start = time.perf_counter()
            fn()
            if device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
    return statistics.median(times), sent.total


def bench(args, info) -> list[dict]:
    torch.set_num_threads(args.threads)
    model, inputs, activation = build(args, info.device)
    modes = args.modes.split(",") if info.world_size > 1 else ["none"]
    rows = []
    for mode in modes:
        model.set_sequence_parallel_group(info.group if mode != "none" else None, mode if mode != "none" else "auto")

        def sample_step():
            with torch.no_grad():
                model(**inputs)

        def train_step():
            model.zero_grad(set_to_none=True)
            model(**inputs).square().mean().backward()

        row = {"processes": info.world_size, "mode": mode, "activation_bytes": activation}
        row["sample_s"], row["sample_bytes"] = timed(sample_step, args.runs, info.group, info.device)
        if not args.no_train:
            row["train_s"], row["train_bytes"] = timed(train_step, args.runs, info.group, info.device)
        rows.append(row)
    return rows


def report(rows: list[dict]) -> None:
    print(f"{'procs':>5} {'mode':>12} {'sample s':>9} {'sent MiB':>9} {'x act':>6} {'train s':>9} {'sent MiB':>9} {'x act':>6}")
    for r in rows:
        act = r["activation_bytes"]
        line = f"{r['processes']:>5} {r['mode']:>12} {r['sample_s']:>9.4f} {r['sample_bytes'] / 2**20:>9.2f} {r['sample_bytes'] / act:>6.2f}"
        if "train_s" in r:
            line += f" {r['train_s']:>9.4f} {r['train_bytes'] / 2**20:>9.2f} {r['train_bytes'] / act:>6.2f}"
        print(line)
    print(f"activation unit (B*N*C): {rows[0]['activation_bytes'] / 2**20:.2f} MiB")


def _spawned(rank: int, world: int, port: int, args, queue) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    info = distributed.init_from_env()
    rows = bench(args, info)
    if rank == 0:
        queue.put(rows)
    distributed.shutdown()


def spawn(args, world: int) -> list[dict]:
    if world == 1:
        return bench(args, distributed.ProcessInfo())
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    queue = mp.get_context("spawn").SimpleQueue()
    mp.spawn(_spawned, args=(world, port, args, queue), nprocs=world, join=True)
    return queue.get()


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.torchrun:
        info = distributed.init_from_env()
        rows = bench(args, info)
        distributed.shutdown()
        if not info.is_main:
            return
    else:
        rows = spawn(args, 1) + spawn(args, args.nproc)
    print(f"STDiT3 hidden {args.hidden}, heads {args.heads}, depth {args.depth}; batch {args.batch}, latent {args.latent}; "
          f"{args.dtype}; {args.threads} thread(s) per process; {os.cpu_count()} CPUs visible")  # fmt: skip
    report(rows)
    if args.json:
        from opensora_sdk.loading import write_json_atomic

        write_json_atomic(rows, args.json)


if __name__ == "__main__":
    sys.exit(main())
