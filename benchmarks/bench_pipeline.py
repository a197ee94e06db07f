"""Benchmark the whole pipeline on CPU: seconds per sampling step, peak memory, time shares.

The models have random weights (seed 0) and these architectures:

* STDiT3: hidden 384, depth 8, 6 heads (the XL/2 topology, 1/3 the width, 2/7 the depth),
  caption_channels 256, 300 text tokens;
* T5: the v1.1 layout with d_model 256, 4 layers, 4 heads x 64, d_ff 1024, built-in tiny
  tokenizer;
* VAE: the **full-size** v1.2 VAE (the real decoder cost), decoding at small sizes.

Each case runs in a fresh subprocess and times one `pipe(...)` call as a user's first call
(no warm-up run: first-call kernel setup is included). It reports: the call split into text
encoding (prompt processing + T5), sampling (noise, references, all steps) and decoding
(VAE decode + conversion to uint8 frames) with their shares, seconds per sampling step (median
over steps, CFG batch of 2), and the process's peak resident memory (ru_maxrss) next to its
memory after the models were built.

    python benchmarks/bench_pipeline.py            # 17x128x128 and 34x192x192, 6 steps
    python benchmarks/bench_pipeline.py --steps 10 --threads 2
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

# (frames, height, width)
CASES = [(17, 128, 128), (34, 192, 192)]


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def build_pipeline():
    import torch

    from opensora_sdk.configs import STDiT3Config, VideoAutoencoderConfig
    from opensora_sdk.models import STDiT3, T5TextEncoder, VideoAutoencoder
    from opensora_sdk.models.t5_file import tiny_t5_config
    from opensora_sdk.pipeline import OpenSoraPipeline

    torch.manual_seed(0)
    t5 = tiny_t5_config(d_model=256, num_layers=4, num_heads=4, d_kv=64, d_ff=1024)
    model = STDiT3(STDiT3Config(hidden_size=384, depth=8, num_heads=6, caption_channels=256, model_max_length=300))
    vae = VideoAutoencoder(VideoAutoencoderConfig())
    text = T5TextEncoder.from_config(t5, model_max_length=300)
    return OpenSoraPipeline(model, vae, text, device="cpu", dtype=torch.float32, progress=False)


def worker(spec: dict) -> dict:
    import torch

    torch.set_num_threads(spec["threads"])
    pipe = build_pipeline()
    base = _rss_mb()
    frames, height, width, steps = spec["frames"], spec["height"], spec["width"], spec["steps"]
    from opensora_sdk import generation

    marks: dict[str, float] = {}
    encode_texts, decode_clip = generation.encode_texts, generation.decode_clip

    def text_then_mark(*a, **k):
        out = encode_texts(*a, **k)
        marks["text_end"] = time.perf_counter()
        return out

    def mark_then_decode(*a, **k):
        marks["decode_start"] = time.perf_counter()
        return decode_clip(*a, **k)

    # the stages of the one generation path (this worker process only)
    generation.encode_texts, generation.decode_clip = text_then_mark, mark_then_decode
    stamps: list[float] = []
    start = time.perf_counter()
    pipe(
        "a red panda eating bamboo in the snow", num_frames=frames, height=height, width=width, num_steps=steps,
        seed=0, callback=lambda *a: stamps.append(time.perf_counter()),
    )
    end = time.perf_counter()
    step_times = [b - a for a, b in zip([marks["text_end"], *stamps], stamps)]
    plan = pipe.plan("x", num_frames=frames, height=height, width=width)
    return dict(
        **spec,
        latent=list(plan.latent_shape),
        tokens=plan.video_tokens,
        total_s=end - start,
        text_s=marks["text_end"] - start,
        sampling_s=marks["decode_start"] - marks["text_end"],
        decode_s=end - marks["decode_start"],
        step_s=statistics.median(step_times),
        rss_models_mb=base,
        peak_rss_mb=_rss_mb(),
    )


def run_case(case, steps: int, threads: int) -> dict:
    frames, height, width = case
    spec = dict(frames=frames, height=height, width=width, steps=steps, threads=threads)
    out = subprocess.run([sys.executable, __file__, "--worker", json.dumps(spec)], capture_output=True, text=True)
    if out.returncode:
        raise RuntimeError(f"case {case} failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=6, help="sampling steps per call")
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return
    print(f"STDiT3 hidden 384 depth 8, T5 d_model 256 x 4 layers, full-size v1.2 VAE; random weights; CPU float32, "
          f"{args.threads} threads; guidance on (batch 2 per step); {args.steps} steps")
    print(f"{'frames x H x W':<16}{'latent [B,C,T,h,w]':<20}{'tokens':>7}{'s/step':>8}{'text s':>8}{'sample s':>9}"
          f"{'decode s':>9}{'total s':>8}  {'shares text/sample/decode':<26}{'peak MB':>8}{'models MB':>10}")
    for case in CASES:
        r = run_case(case, args.steps, args.threads)
        shares = "/".join(f"{100 * r[k] / r['total_s']:.0f}%" for k in ("text_s", "sampling_s", "decode_s"))
        print(f"{'x'.join(map(str, case)):<16}{str(r['latent']):<20}{r['tokens']:>7}{r['step_s']:>8.3f}"
              f"{r['text_s']:>8.3f}{r['sampling_s']:>9.2f}{r['decode_s']:>9.2f}{r['total_s']:>8.2f}  {shares:<26}"
              f"{r['peak_rss_mb']:>8.0f}{r['rss_models_mb']:>10.0f}", flush=True)


if __name__ == "__main__":
    main()
