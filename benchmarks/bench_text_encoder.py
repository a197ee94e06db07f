"""T5 text-encoder time and peak memory, without and with the embedding cache (cold / warm).

    python benchmarks/bench_text_encoder.py --d-model 512 --layers 8 --heads 8 --batch 8 \
        --max-length 300 --runs 3

A T5 v1.1-layout encoder with random weights and the built-in tiny tokenizer encodes a batch
of prompts. Phases: "no cache" (T5 every time), "cache cold" (T5 + writing the rows to a
folder cache), "cache warm, memory" (the in-memory LRU answers), "cache warm, disk" (a fresh
cache over the same folder: rows read from .safetensors files). Peak host memory is the
growth of the resident set over its value before each call, sampled every millisecond by a
thread (Linux /proc); on CUDA it is `torch.cuda.max_memory_allocated` during the call.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import threading
import time

import torch

from opensora_sdk.models.t5_file import load_tiny_tokenizer, tiny_t5_config
from opensora_sdk.models.text_cache import EmbeddingCache
from opensora_sdk.models.text_encoder import T5TextEncoder
from opensora_sdk.text import process_prompt

PROMPTS = [
    "a red circle moving left on a blue background",
    "a small green square bouncing up and down in the middle of a white room",
    "two yellow stars spinning slowly over a dark city at night with neon lights",
    "a large purple triangle falling from the top of the frame onto sand",
    "a black cat walking along a wooden table near a window on a rainy day",
    "an orange ball rolling across a green field under a bright sunny sky",
    "a white bird flying over the sea toward the mountains at sunset",
    "a blue cube rotating clockwise in front of a gray wall, soft light",
]


def rss_mib() -> float:
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    return pages * 4096 / 2**20


class PeakRSS:
    """Highest resident set (MiB) seen while the block runs, minus the value before it."""

    def __enter__(self):
        self.base = self.peak = rss_mib()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()
        return self

    def _watch(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_mib())
            time.sleep(0.001)

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_mib())
        self.growth = self.peak - self.base


def timed(encoder: T5TextEncoder, prompts: list[str], device: torch.device) -> tuple[float, float]:
    """(seconds, peak MiB) of one encode."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    with PeakRSS() as peak:
        start = time.perf_counter()
        out = encoder.encode(prompts)
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
    del out
    if device.type == "cuda":
        return seconds, (torch.cuda.max_memory_allocated() - base) / 2**20
    return seconds, peak.growth


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--d-model", type=int, default=512)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--d-ff", type=int, default=None, help="default: 2 x d_model (gated GELU)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--max-length", type=int, default=300)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(0)
    tokenizer = load_tiny_tokenizer()
    config = tiny_t5_config(
        vocab_size=len(tokenizer),
        d_model=args.d_model,
        num_layers=args.layers,
        num_heads=args.heads,
        d_kv=args.d_model // args.heads,
        d_ff=args.d_ff or 2 * args.d_model,
    )
    model_kw = dict(model_max_length=args.max_length, dtype=args.dtype, device=device)
    plain = T5TextEncoder.from_config(config, tokenizer, **model_kw)
    prompts = [process_prompt(PROMPTS[i % len(PROMPTS)] + f" {i // len(PROMPTS)}").text for i in range(args.batch)]
    tokens = int(plain.tokenize(prompts)["attention_mask"].sum())
    params = sum(p.numel() for p in plain.model.parameters())
    print(
        f"T5 encoder d_model={args.d_model} layers={args.layers} heads={args.heads} d_ff={config.d_ff} "
        f"({params / 1e6:.1f} M params, {args.dtype}, {device}, {torch.get_num_threads()} threads); "
        f"batch {args.batch}, max length {args.max_length}, {tokens} valid tokens"
    )
    y_mib = args.batch * args.max_length * args.d_model * plain.dtype.itemsize / 2**20
    print(f"output y: [{args.batch}, 1, {args.max_length}, {args.d_model}] = {y_mib:.1f} MiB")

    timed(plain, prompts, device)  # warm-up (allocator, kernels)
    rows = [("no cache", [timed(plain, prompts, device) for _ in range(args.runs)])]

    with tempfile.TemporaryDirectory() as folder:
        cached = T5TextEncoder(plain.model, tokenizer, model_max_length=args.max_length, device=device,
                               cache=EmbeddingCache(folder=folder))
        rows.append(("cache cold (T5 + write)", [timed(cached, prompts, device)]))
        rows.append(("cache warm, memory", [timed(cached, prompts, device) for _ in range(args.runs)]))
        disk = []
        for _ in range(args.runs):
            cached.cache = EmbeddingCache(folder=folder)  # empty memory: rows come from the files
            disk.append(timed(cached, prompts, device))
        rows.append(("cache warm, disk", disk))

    print(f"{'phase':<26}{'median s':>10}{'min s':>10}{'peak MiB':>10}")
    for name, results in rows:
        seconds = [s for s, _ in results]
        print(f"{name:<26}{statistics.median(seconds):>10.4f}{min(seconds):>10.4f}{max(m for _, m in results):>10.1f}")


if __name__ == "__main__":
    main()
