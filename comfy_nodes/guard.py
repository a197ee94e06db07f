"""The resource guard: a node refuses work the machine cannot do, before any model runs.

Two checks, made by the sampler, long-video, VAE decode and VAE encode nodes:

* **Memory.** The estimated peak of the work (`opensora_sdk.estimates.estimate_peak`: the
  weights that still have to move to the device, one sampling step's activations, the VAE's
  working set and its output) against what the device has. CUDA: the free memory plus
  PyTorch's reusable cache (inside ComfyUI after asking it to unload its own models, as the
  placement does before a move); MPS: the recommended working set minus what is allocated;
  CPU: MemAvailable from /proc/meminfo (psutil where there is no /proc; the weights are
  already in memory and count 0). OPENSORA_MAX_MEMORY_GB caps the figure on any device
  (share a machine, or let a CPU run use less than all of it). Unknown: no memory check.

* **Work between two interrupt checks.** The nodes check for an interrupt before every
  transformer block and after every VAE unit (temporal chunk, micro-batch of frames, tile),
  so the longest the server cannot be stopped is one such unit. Spatial attention over S
  tokens per frame costs 4 S^2 C FLOPs per frame and row (Q K^T and A V), quadratic in the
  frame's area: an 8192x8192 frame has S = 262144 tokens, about 6e14 FLOPs in one block of
  the 1152-wide v1.2 model under guidance. The VAE's 2D decoder has the same problem in its
  middle attention over the (H/8 x W/8) latent pixels of a frame. A unit is refused when it
  would take longer than OPENSORA_MAX_UNIT_SECONDS (default 60 s) at the device's
  throughput: on a CPU the matrix-multiply rate measured once per process in the model's
  dtype (a 1024 x 1024 product; attention and convolutions run slower, so the estimate is
  optimistic), on CUDA 400 TFLOP/s in bf16/fp16 and 50 in fp32, on other accelerators 20
  (optimistic for current GPUs). OPENSORA_DEVICE_TFLOPS sets the rate instead.

A refusal is a `ResourceLimitError` that says what was asked, what it needs, and what fits:
the largest size at the same aspect ratio and the most frames at the same size that pass
both checks, and the other knobs (batch_size, cfg 1, tile_size on the VAE nodes).
"""

from __future__ import annotations

import logging
import math
import os
import re
import time
from dataclasses import dataclass, replace

import torch

from . import comfy_host as host

log = logging.getLogger(__name__)

MAX_UNIT_SECONDS = 60.0
TFLOPS = {"cuda": 400.0, "cuda-fp32": 50.0, "other": 20.0}  # accelerators; a CPU is measured
GIB = 2**30
_measured: dict = {}


class ResourceLimitError(ValueError):
    """The run needs more memory, or longer uninterruptible work, than this machine allows."""


# --------------------------------------------------------------------------------------------
# What the device has
# --------------------------------------------------------------------------------------------


def _env_float(name: str) -> float | None:
    text = os.environ.get(name, "").strip()
    if not text:
        return None
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"{name}={text!r} is not a number") from None
    if not value > 0:
        raise ValueError(f"{name}={text!r} must be positive")
    return value


def _meminfo_available() -> int | None:
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                m = re.match(r"MemAvailable:\s+(\d+)\s+kB", line)
                if m:
                    return int(m.group(1)) * 1024
    except OSError:
        pass
    try:
        import psutil
    except ImportError:
        return None
    return int(psutil.virtual_memory().available)


def available_memory(device: torch.device) -> tuple[int | None, str]:
    """(bytes the work may use on `device`, where the figure comes from); None when unknown."""
    free, source = None, ""
    if device.type == "cuda":
        free_now, _ = torch.cuda.mem_get_info(device)
        free = free_now + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        source = f"free on {device}"
    elif device.type == "cpu":
        free, source = _meminfo_available(), "available RAM"
    elif device.type == "mps":
        try:
            free = int(torch.mps.recommended_max_memory() - torch.mps.driver_allocated_memory())
            source = "MPS working set"
        except (AttributeError, RuntimeError):
            free = None
    cap = _env_float("OPENSORA_MAX_MEMORY_GB")
    if cap is not None and (free is None or cap * GIB < free):
        free, source = int(cap * GIB), "OPENSORA_MAX_MEMORY_GB"
    return free, source


def cpu_flops(dtype: torch.dtype) -> float:
    """FLOP/s of a 1024 x 1024 matrix product on this CPU in `dtype` (best of 3, once per process)."""
    if dtype not in _measured:
        n = 1024
        with torch.no_grad():
            a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
            a @ b  # warm-up
            best = math.inf
            for _ in range(3):
                start = time.perf_counter()
                a @ b
                best = min(best, time.perf_counter() - start)
        _measured[dtype] = 2 * n**3 / max(best, 1e-9)
    return _measured[dtype]


def device_flops(device: torch.device, dtype: torch.dtype) -> tuple[float, str]:
    """(FLOP/s assumed for the time bound, how it was chosen)."""
    override = _env_float("OPENSORA_DEVICE_TFLOPS")
    if override is not None:
        return override * 1e12, f"{override:g} TFLOP/s (OPENSORA_DEVICE_TFLOPS)"
    if device.type == "cpu":
        rate = cpu_flops(dtype)
        return rate, f"{rate / 1e9:,.0f} GFLOP/s (this CPU's matrix products, measured)"
    key = "cuda" if device.type == "cuda" else "other"
    if key == "cuda" and dtype == torch.float32:
        key = "cuda-fp32"
    return TFLOPS[key] * 1e12, f"an optimistic {TFLOPS[key]:g} TFLOP/s"


def max_unit_seconds() -> float:
    value = _env_float("OPENSORA_MAX_UNIT_SECONDS")
    return MAX_UNIT_SECONDS if value is None else value


def bytes_to_move(module, device: torch.device) -> int:
    """Bytes of `module` that are not on `device` yet (0 for every weight on a CPU run)."""
    if module is None or device.type == "cpu":
        return 0
    return sum(t.numel() * t.element_size() for t in (*module.parameters(), *module.buffers()) if t.device != device)


def _dtype(module) -> torch.dtype:
    return next(module.parameters()).dtype


# --------------------------------------------------------------------------------------------
# Work per uninterruptible unit (FLOPs)
# --------------------------------------------------------------------------------------------


def transformer_unit_flops(config, rows: int, T: int, S: int, text_tokens: int) -> int:
    """FLOPs of the largest block call: STDiT3 runs spatial and temporal blocks separately,
    STDiT2 / STDiT have both attentions in one block. Linear layers per token: q k v o,
    cross-attention q o, the MLP (2 x mlp_ratio); attention 4 x length^2 x C per sequence."""
    C = config.hidden_size
    N = T * S
    linear = rows * N * 2 * C * C * (6 + 2 * getattr(config, "mlp_ratio", 4.0))
    cross = rows * N * 4 * text_tokens * C
    spatial = rows * T * 4 * S * S * C
    temporal = rows * S * 4 * T * T * C
    if getattr(config, "model_type", "") == "STDiT3":
        return int(linear + cross + max(spatial, temporal))
    return int(linear + cross + spatial + temporal)


def kl_decoder_flops(vae_config, h: int, w: int) -> int:
    """FLOPs of the 2D KL decoder for one frame of h x w latents: 3x3 convolutions at every
    level, and the middle block's attention over the h*w latent pixels (quadratic). The
    encoder costs about the same for the same frame."""
    kl = getattr(vae_config, "vae_2d", vae_config)
    channels = tuple(reversed(kl.block_out_channels))
    resnets = getattr(kl, "layers_per_block", 2) + 1
    p = h * w
    conv = lambda c_in, c_out, pixels: 2 * 9 * c_in * c_out * pixels  # noqa: E731
    c0 = channels[0]
    flops = conv(kl.latent_channels, c0, p)
    flops += 4 * conv(c0, c0, p) + 8 * c0 * c0 * p + 4 * p * p * c0  # two resnets, attention
    for k, c in enumerate(channels):
        pixels = p * 4**k
        flops += resnets * 2 * conv(c, c, pixels)
        if k < len(channels) - 1:
            flops += conv(c, c, pixels * 4)
    return int(flops + conv(channels[-1], 3, p * 4 ** (len(channels) - 1)))


# --------------------------------------------------------------------------------------------
# The checks
# --------------------------------------------------------------------------------------------


@dataclass
class Verdict:
    problems: list[str]
    peak: int
    unit_seconds: float


def _frames(n: int) -> str:
    return f"{n} frame" if n == 1 else f"{n} frames"


def _fmt(nbytes: float) -> str:
    return f"{nbytes / GIB:.1f} GiB" if nbytes >= GIB / 10 else f"{nbytes / 2**20:.0f} MiB"


def _judge(peak: int, what: str, unit_flops: float, unit: str, device, dtype, free_source) -> Verdict:
    free, source = free_source
    problems = []
    if free is not None and peak > free:
        problems.append(f"{what} needs about {_fmt(peak)} but {_fmt(free)} is {source}")
    rate, rate_text = device_flops(device, dtype)
    seconds = unit_flops / rate
    bound = max_unit_seconds()
    if seconds > bound:
        problems.append(
            f"{unit} would compute {unit_flops:.1e} FLOPs without a chance to stop: about {seconds:,.0f} s on {device} "
            f"at {rate_text}, over the {bound:g} s bound (OPENSORA_MAX_UNIT_SECONDS)"
        )
    return Verdict(problems, peak, seconds)


def _largest(passes, hi: int) -> int:
    """The largest k in 1..hi with passes(k) (passes monotone: true up to some k), or 0."""
    lo = 0
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if passes(mid):
            lo = mid
        else:
            hi = mid - 1
    return lo


def _refuse(node: str, asked: str, problems: list[str], fits: list[str]) -> None:
    hint = "; ".join(fits) if fits else "nothing smaller fits either: free memory or use a larger device"
    raise ResourceLimitError(
        f"{node}: refused before any model work: {asked}: " + "; ".join(problems) + f". What fits: {hint}."
    )


def check_generation(node: str, model, vae, plan, facts, *, decode: bool = False, encode: bool = False,
                     tiling=None) -> None:
    """Sampler / long video: the sampling step (and the VAE work of `decode` / `encode`)."""
    device = _device()
    transformer = model.transformer
    dtype = _dtype(transformer)
    vae_model = vae.vae if vae is not None else None
    vae_config = vae_model.config if vae_model is not None else None
    weights = {"transformer": bytes_to_move(transformer, device), "vae": bytes_to_move(vae_model, device)}
    phases = ("sampling",) + (("decoding",) if decode and vae_model is not None else ()) + (
        ("encoding",) if encode and vae_model is not None else ())
    config = transformer.config
    B = plan.latent_shape[0]
    rows = 2 * B if plan.guidance_scale != 1 else B

    def verdict(p, free_source) -> Verdict:
        from opensora_sdk.estimates import estimate_peak

        from opensora_sdk.estimates import vae_decode_bytes

        T = -(-p.latent_size[0] // config.patch_size[0])
        S = p.video_tokens // max(T, 1)
        vae_cfg = vae_config or _default_vae_config(facts)
        if tiling is None:
            peak = estimate_peak(p, config, vae_cfg, dtype=dtype, weights=weights, phases=phases)
        else:  # the VAE phases work on one tile at a time (plus the blended output)
            peak = estimate_peak(p, config, vae_cfg, dtype=dtype, weights=weights, phases=("sampling",))
        flops = transformer_unit_flops(config, rows, T, S, p.text_tokens)
        unit = f"one transformer block ({S} tokens per frame x {T} latent frames, {rows} rows)"
        if len(phases) > 1:
            _, h, w = p.latent_size
            f = facts.space_factor
            th, tw = _tile_latents(h, w, tiling, vae_model)
            micro = min(getattr(vae_model, "micro_batch_size", None) or getattr(vae_config, "micro_batch_size", 4)
                        or B * p.num_frames, B * p.num_frames)
            if tiling is not None:
                working, _ = vae_decode_bytes(vae_cfg, B, p.num_frames, th * f, tw * f, dtype)
                _, clip = vae_decode_bytes(vae_cfg, B, p.num_frames, p.height, p.width, dtype)
                blended = micro * 3 * p.height * p.width * 4 * 2
                peak = max(peak, weights["vae"] + working + blended + (clip if decode else 0))
            vae_flops = micro * kl_decoder_flops(vae_config, th, tw)
            if vae_flops > flops:
                flops, unit = vae_flops, f"one VAE micro-batch ({micro} frames of {tw * f}x{th * f} pixels)"
        return _judge(peak, "sampling" if len(phases) == 1 else "this generation", flops, unit, device, dtype,
                      free_source)

    free_source = available_memory(device)
    first = verdict(plan, free_source)
    if first.problems and device.type != "cpu" and free_source[0] is not None and first.peak > free_source[0]:
        host.make_room(first.peak, device)  # ComfyUI unloads its own models, then we look again
        free_source = available_memory(device)
        first = verdict(plan, free_source)
    _log(node, first, free_source)
    if not first.problems:
        return
    asked = f"{plan.width}x{plan.height} (W x H), {_frames(plan.num_frames)}, batch {B}"
    fits = []
    if facts.fixed_latent_size is None:
        def at(height, width, frames):
            T, h, w = facts.latent_size(frames, height, width)
            return replace(plan, height=height, width=width, num_frames=frames, latent_size=(T, h, w),
                           video_tokens=facts.video_tokens(T, h, w))

        step = facts.space_factor * facts.patch_size[1]
        k = _largest(lambda k: not verdict(at(*_scaled(plan, k, step), plan.num_frames), free_source).problems,
                     max(plan.height // step, 1) - (1 if plan.height // step > 1 else 0))
        if k:
            h, w = _scaled(plan, k, step)
            fits.append(f"{w}x{h} at {_frames(plan.num_frames)}")
        if plan.num_frames > 1:
            n = _largest(lambda n: not verdict(at(plan.height, plan.width, n), free_source).problems,
                         plan.num_frames - 1)
            if n:
                fits.append(f"{_frames(n)} at {plan.width}x{plan.height}")
    if B > 1:
        fits.append("batch_size 1 (each video of the batch is in the step at once)")
    if plan.guidance_scale != 1:
        fits.append("cfg 1 (no guidance: half the rows per step)")
    if decode and tiling is None and vae_model is not None:
        fits.append("tile_size 256 for the VAE")
    _refuse(node, asked, first.problems, fits)


def check_vae(node: str, vae, *, batch: int, num_frames: int, height: int, width: int, tiling, encode: bool) -> None:
    """VAE decode / encode of `batch` videos of `num_frames` frames of height x width pixels."""
    from opensora_sdk.estimates import vae_decode_bytes

    device = _device()
    model = vae.vae
    dtype = model.dtype
    config = model.config
    move = bytes_to_move(model, device)
    f = getattr(model, "spatial_factor", 8)
    micro = min(getattr(model, "micro_batch_size", None) or getattr(config, "micro_batch_size", 4)
                or batch * num_frames, batch * num_frames)

    def verdict(frames: int, tile, free_source) -> Verdict:
        th, tw = _tile_latents(height // f, width // f, tile, model)
        working, _ = vae_decode_bytes(config, batch, frames, th * f, tw * f, dtype)
        _, clip = vae_decode_bytes(config, batch, frames, height, width, dtype)
        if tile is not None:  # the blended output of one micro-batch, float32
            working += micro * 3 * height * width * 4 * 2
        peak = move + working + (0 if encode else clip)
        flops = micro * kl_decoder_flops(config, th, tw)
        unit = f"one VAE micro-batch ({micro} frames of {tw * f}x{th * f} pixels)"
        return _judge(peak, "encoding" if encode else "decoding", flops, unit, device, dtype, free_source)

    free_source = available_memory(device)
    first = verdict(num_frames, tiling, free_source)
    if first.problems and device.type != "cpu" and free_source[0] is not None and first.peak > free_source[0]:
        host.make_room(first.peak, device)
        free_source = available_memory(device)
        first = verdict(num_frames, tiling, free_source)
    _log(node, first, free_source)
    if not first.problems:
        return
    from opensora_sdk.models.vae_tiling import SpatialTiling

    fits = []
    for size in (512, 256, 128):
        candidate = SpatialTiling(size, min(64, size // 4))
        if (tiling is None or size < tiling.tile_size) and not verdict(num_frames, candidate, free_source).problems:
            fits.append(f"tile_size {size} with tile_overlap {candidate.overlap}")
            break
    if not encode and num_frames > 1:
        n = _largest(lambda n: not verdict(n, tiling, free_source).problems, num_frames - 1)
        if n:
            fits.append(f"at most {_frames(n)} at this size")
    _refuse(node, f"{batch} x {_frames(num_frames)} of {width}x{height} (W x H)", first.problems, fits)


def _device() -> torch.device:
    """ComfyUI's compute device as tensors name it ("cuda" -> "cuda:0")."""
    from opensora_sdk.placement import normalize_device

    return normalize_device(host.torch_device())


def _default_vae_config(facts):
    from opensora_sdk.configs import AutoencoderKLConfig, VideoAutoencoderConfig

    return VideoAutoencoderConfig() if facts.micro_frame_size else AutoencoderKLConfig()


def _tile_latents(h: int, w: int, tiling, vae_model) -> tuple[int, int]:
    """The latent size one decoder call sees: the frame, or one tile of it."""
    if tiling is None:
        return h, w
    f = getattr(vae_model, "spatial_factor", 8)
    return min(h, tiling.tile_size // f), min(w, tiling.tile_size // f)


def _scaled(plan, k: int, step: int) -> tuple[int, int]:
    """(height, width) with height k * step and the plan's aspect ratio (multiples of step)."""
    height = k * step
    return height, max(step, round(plan.width * height / plan.height / step) * step)


def _log(node: str, verdict: Verdict, free_source) -> None:
    free, source = free_source
    room = "unknown" if free is None else f"{_fmt(free)} {source}"
    log.info("%s: estimated peak %s (%s); longest uninterruptible unit about %.1f s", node, _fmt(verdict.peak), room,
             verdict.unit_seconds)
