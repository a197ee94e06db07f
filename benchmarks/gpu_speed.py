"""One GPU, one short run: 480p 4 s, 30 steps with guidance, on the real-size v1.2 architecture
with random weights (nothing is downloaded), for each speed switch side by side.

    python benchmarks/gpu_speed.py --json gpu_speed.json            # every variant
    python benchmarks/gpu_speed.py --variants plain,cached --steps 10 # a quicker look
    python benchmarks/gpu_speed.py --device cpu --tiny --steps 2       # does the script run (tests)

Variants (each on the same latent noise, text features and weights, bf16):

    plain     per-clip reuse on (the default path)
    no-reuse  the per-step path (`set_step_reuse(False)`): what reuse saves
    compiled  `compile_blocks()`; one warm-up generation first (compilation), not timed
    cached    step caching, `--cache` (default teacache:0.1 with the published v1.2 coefficients)
    fp8       Linear weights in float8 e4m3 (per-channel scales), computed in bf16

Per variant: wall time of the 30-step loop (CUDA-synchronised), the peak allocated memory of the
loop, transformer evaluations, and the achieved FLOP/s (the FLOPs of one transformer call,
counted by torch.utils.flop_counter, times the calls made, over the time). Then one VAE decode of
the result (plain fp32-free: bf16 weights) with its time and peak. The T5 encoder is not run:
random text features of its shape ([B, 1, 300, 4096]) stand in, so the figures are the
transformer's and the VAE's. Goals (one H100): under 20 s exact and under 10 s cached.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from opensora_sdk.configs import STDiT3Config, VideoAutoencoderConfig
from opensora_sdk.generation import guided_model
from opensora_sdk.models.stdit3 import STDiT3
from opensora_sdk.models.vae import VideoAutoencoder
from opensora_sdk.sampling import sample
from opensora_sdk.schedulers.rflow import RectifiedFlow
from opensora_sdk.sizes import get_image_size

VARIANTS = ("plain", "no-reuse", "compiled", "cached", "fp8")


def build(device: torch.device, dtype: torch.dtype, tiny: bool = False):
    """STDiT3-XL/2 and the v1.2 VAE with random weights (`tiny`: the test-size architectures)."""
    torch.manual_seed(0)
    if tiny:
        from opensora_sdk.presets import get_preset

        preset = get_preset("tiny-random")
        transformer_config, vae_config = preset.transformer, preset.vae
    else:
        transformer_config, vae_config = STDiT3Config(), VideoAutoencoderConfig()
    with torch.device(device):
        transformer = STDiT3(transformer_config).to(dtype).eval()
        vae = VideoAutoencoder(vae_config).to(dtype).eval()
    return transformer, vae


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()


def peak_gib(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None


def inputs(transformer, vae, resolution: str, aspect_ratio: str, num_frames: int, fps: int, device, dtype):
    H, W = get_image_size(resolution, aspect_ratio)
    T, h, w = vae.latent_size(num_frames, H, W)
    g = torch.Generator(device).manual_seed(1)
    z = torch.randn(1, vae.latent_channels, T, h, w, generator=g, device=device)
    cfg = transformer.config
    y = torch.randn(1, 1, cfg.model_max_length, cfg.caption_channels, generator=g, device=device).to(dtype)
    y_null = transformer.y_embedder.y_embedding[None, None].to(dtype)
    kwargs = {k: torch.full((1,), float(v), device=device) for k, v in (("fps", fps), ("height", H), ("width", W))}
    return (H, W), z, y, y_null, kwargs


def flops_per_call(transformer, z, y, y_null, kwargs) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    x = torch.cat([z, z]).to(y.dtype)
    t = torch.full((2,), 900.0, device=z.device)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        transformer(x, t, y=torch.cat([y, y_null]), mask=None, **{k: v.repeat(2) for k, v in kwargs.items()})
    return float(counter.get_total_flops())


def run_loop(transformer, z, y, y_null, kwargs, size, steps: int, guidance: float, cache=None,
             num_frames: int = 102) -> dict:  # fmt: skip
    from contextlib import nullcontext

    from opensora_sdk.step_cache import CacheStats, attach

    H, W = size
    rf = RectifiedFlow(num_sampling_steps=steps)
    timesteps = rf.timesteps(1, height=H, width=W, num_frames=num_frames, device=z.device)
    calls = [0]

    def counted(x, t, **kw):
        calls[0] += 1
        return guided_model(transformer, 1, None)(x, t, **kw)

    stats = CacheStats(cache.spec) if cache is not None else None
    caching = attach(transformer, cache, num_steps=steps, timesteps=[float(t[0]) for t in timesteps], stats=stats) \
        if cache is not None else nullcontext()  # fmt: skip
    synchronize(z.device)
    reset_peak(z.device)
    start = time.perf_counter()
    with torch.no_grad(), caching, transformer.step_invariants():
        out = sample(counted, z, timesteps, y=y, y_null=y_null, guidance_scale=guidance, model_kwargs=kwargs)
    synchronize(z.device)
    seconds = time.perf_counter() - start
    result = {"seconds": seconds, "peak_gib": peak_gib(z.device), "calls": calls[0]}
    if stats is not None:
        result["cache"] = stats.summary()
    return result, out


def _gib(value: float | None) -> str:
    return "n/a" if value is None else f"{value:5.1f} GiB"


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated subset of {','.join(VARIANTS)}")
    p.add_argument("--resolution", default="480p")
    p.add_argument("--aspect-ratio", default="9:16")
    p.add_argument("--num-frames", type=int, default=102, help="pixel frames (102 = 4 s at 24 fps)")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--guidance", type=float, default=7.0)
    p.add_argument("--cache", default="teacache:0.1", help="the cached variant's setting (see --cache of generate)")
    p.add_argument("--device", default="cuda", help="cuda (default); cpu only to check the script, with --tiny")
    p.add_argument("--tiny", action="store_true", help="test-size models instead of the real-size architecture")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("gpu_speed.py needs a CUDA GPU (or --device cpu --tiny to check the script)")
    variants = [v for v in args.variants.split(",") if v]
    unknown = set(variants) - set(VARIANTS)
    if unknown:
        raise SystemExit(f"--variants: unknown {sorted(unknown)}; choose from {', '.join(VARIANTS)}")
    from opensora_sdk.step_cache import parse_cache

    dtype = torch.bfloat16
    transformer, vae = build(device, dtype, args.tiny)
    size, z, y, y_null, kwargs = inputs(transformer, vae, args.resolution, args.aspect_ratio, args.num_frames, 24,
                                        device, dtype)  # fmt: skip
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    report = {"device": name, "torch": torch.__version__, "latent": list(z.shape),
              "size": list(size), "steps": args.steps, "guidance": args.guidance, "variants": {}}  # fmt: skip
    per_call = flops_per_call(transformer, z, y, y_null, kwargs)
    report["tflop_per_call"] = per_call / 1e12
    print(f"{report['device']}: latent {report['latent']} ({args.resolution} {args.aspect_ratio}, {args.num_frames} "
          f"frames), {args.steps} steps, guidance {args.guidance}; {per_call / 1e9:.1f} GFLOP per transformer call")
    latent = None
    for name in variants:
        cache = parse_cache(args.cache) if name == "cached" else None
        transformer.set_step_reuse(name != "no-reuse")
        if name == "compiled":
            transformer.compile_blocks()
            run_loop(transformer, z, y, y_null, kwargs, size, 2, args.guidance, num_frames=args.num_frames)  # compiles
        if name == "fp8":
            from opensora_sdk.fp8 import quantize_transformer_fp8

            quantize_transformer_fp8(transformer)  # last: it changes the weights in place
        result, out = run_loop(transformer, z, y, y_null, kwargs, size, args.steps, args.guidance, cache,
                               num_frames=args.num_frames)  # fmt: skip
        result["tflops"] = per_call * result["calls"] / result["seconds"] / 1e12
        if name == "cached":  # a skipped call costs nothing: count only the evaluated ones
            result["tflops"] = None
        if latent is None:
            latent = out
        else:
            result["max_abs_diff_vs_first"] = (out - latent).abs().max().item()
        report["variants"][name] = result
        flops = "" if result["tflops"] is None else f", {result['tflops']:.1f} TFLOP/s"
        print(f"{name:<9} {result['seconds']:7.2f} s  peak {_gib(result['peak_gib'])}  {result['calls']} calls{flops}"
              + (f"  ({result['cache']})" if "cache" in result else ""))
    reset_peak(device)
    synchronize(device)
    start = time.perf_counter()
    with torch.no_grad():
        vae.decode(latent.to(dtype), args.num_frames)
    synchronize(device)
    report["vae_decode"] = {"seconds": time.perf_counter() - start, "peak_gib": peak_gib(device)}
    print(f"VAE decode {report['vae_decode']['seconds']:.2f} s  peak {_gib(report['vae_decode']['peak_gib'])}")
    if args.json:
        tmp = Path(args.json).with_suffix(".tmp")
        tmp.write_text(json.dumps(report, indent=2) + "\n")
        tmp.replace(args.json)
    return report


if __name__ == "__main__":
    main()
