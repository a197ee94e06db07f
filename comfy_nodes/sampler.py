"""OpenSoraSampler: rectified-flow sampling of STDiT3, as `opensora generate` does it.

The noise, the re-noising draws and the reference encodings of sample k come from one
`torch.Generator` on the compute device seeded with seed + k, in the same order as
`opensora_sdk.generation`, so a graph and the CLI with the same seed and settings give the
same video on the same device. Every step updates ComfyUI's progress bar (with a latent
preview when the server has previews on) and checks for an interrupt.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from . import comfy_host as host
from .latent import latent_geometry
from .types import CATEGORY, CONDITIONS, MODEL, TEXT, VAE, tip

MAX_SEED = 2**63 - 1 - 4096  # seed + k must stay a valid generator seed for a batch


@dataclass
class Job:
    """One batch being sampled: sizes, generators, references, settings."""

    model: object  # LoadedModel
    text: object  # TextEmbeds
    device: torch.device
    height: int
    width: int
    num_frames: int
    fps: float
    shape: tuple  # (B, C, T, h, w)
    gens: list
    refs: list  # per sample, reference latents [C, T_ref, h, w] on the device
    strategies: list  # per sample, mask-strategy string
    steps: int
    cfg: float
    timestep_warp: bool
    align: int | None


def check_compatible(model, text, shape) -> None:
    """Clear errors for a latent or a text encoder that do not fit the model."""
    config = model.transformer.config
    B, C, T = shape[:3]
    if C != config.in_channels:
        raise ValueError(
            f"latent has {C} channels but the diffusion model takes {config.in_channels}; use "
            "OpenSoraEmptyLatentVideo or OpenSoraVAEEncode for Open-Sora latents"
        )
    if model.max_latent_frames is not None and T > model.max_latent_frames:
        raise ValueError(
            f"latent has {T} latent frames; this model takes at most {model.max_latent_frames} per clip (408 video "
            "frames for v1.2); make longer videos with OpenSoraLongVideo"
        )
    y, _ = text.for_loop(0)
    if tuple(y.shape[-2:]) != (config.model_max_length, config.caption_channels):
        raise ValueError(
            f"the text embedding is {tuple(y.shape[-2:])} (tokens, channels) but the diffusion model expects "
            f"({config.model_max_length}, {config.caption_channels}): load the text encoder that belongs to this "
            "model (and set its max_length to the model's)"
        )


def prepare(model, text, latent: dict, *, seed: int, steps: int, cfg: float, timestep_warp: bool = True,
            vae=None, conditions=None, align: int | None = 5) -> Job:
    """Sizes from the latent, one generator per sample, the conditions encoded with the VAE."""
    from opensora_sdk.conditioning import encode_conditions

    from .vae import encode_pixels, on_device

    shape = tuple(latent["samples"].shape)
    if len(shape) != 5:
        raise ValueError(f"latent: expected [batch, 4, frames, h, w], got shape {shape}; use OpenSoraEmptyLatentVideo")
    check_compatible(model, text, shape)
    H, W, N, fps = latent_geometry(latent)
    if vae is not None and tuple(vae.vae.latent_size(N, H, W)) != shape[2:]:
        raise ValueError(
            f"latent: {N} frames of {H}x{W} give latents {tuple(vae.vae.latent_size(N, H, W))} with this VAE, but the "
            f"latent is {shape[2:]}; make the latent with OpenSoraEmptyLatentVideo for this VAE"
        )
    device = torch.device(host.torch_device())
    if device.type != "cpu" and device.index is None:
        device = torch.empty(0, device=device).device
    B = shape[0]
    gens = [torch.Generator(device).manual_seed(seed + k) for k in range(B)]
    refs, strategies = [[] for _ in range(B)], ["" for _ in range(B)]
    items = list(conditions.items) if conditions is not None else []
    if items:
        if vae is None:
            raise ValueError("conditions are connected but vae is not: connect the VAE that encodes the references")
        with torch.no_grad(), on_device(vae, device) as model_vae:
            for b in range(B):
                refs[b], strategies[b] = encode_conditions(
                    items, lambda px: encode_pixels(model_vae, px, gens[b]), height=H, width=W
                )
    return Job(model, text, device, H, W, N, fps, shape, gens, refs, strategies, steps, cfg, timestep_warp,
               align or None)


class StepCounter:
    """Progress over all loops of a node run; interrupt check + preview every step."""

    def __init__(self, total: int):
        self.done = 0
        self.progress = host.Progress(total)
        self.previewer = host.previewer()

    def __call__(self, step, total, latent, denoised):
        host.check_interrupted()
        self.done += 1
        self.progress.update_absolute(self.done, host.preview_image(self.previewer, denoised))


def _model_fn(transformer, batch: int, uncond_mask):
    """STDiT3 as `sample`'s model_fn; a negative prompt's mask masks the unconditional half."""

    def fn(x, t, *, y, mask, x_mask=None, **kwargs):
        if uncond_mask is not None and x.shape[0] == 2 * batch:
            mask = torch.cat([mask[:batch], uncond_mask], 0)
        return transformer(x, t, y=y, mask=mask, x_mask=x_mask, **kwargs)

    return fn


def run_loop(job: Job, loop_i: int, counter: StepCounter | None = None) -> torch.Tensor:
    """Sample loop `loop_i` of the job -> latents [B, C, T, h, w] float32 on the device."""
    from opensora_sdk.conditioning import apply_mask_strategy
    from opensora_sdk.sampling import sample
    from opensora_sdk.schedulers.rflow import RectifiedFlow
    from opensora_sdk.sizes import model_fps

    device, (B, C, T, h, w) = job.device, job.shape
    transformer = job.model.transformer

    def randn(shape, g):
        return torch.randn(shape, generator=g, device=device, dtype=torch.float32)

    def renoise(step, x):
        return torch.cat([randn(x[b : b + 1].shape, g) for b, g in enumerate(job.gens)])

    z = torch.cat([randn((1, C, T, h, w), g) for g in job.gens])  # [B, C, T, h, w]
    z, mask = apply_mask_strategy(z, job.refs, job.strategies, loop_i=loop_i, align=job.align)
    frame_mask = None if bool((mask == 1).all()) else mask

    y, y_mask = (t.to(device) for t in job.text.for_loop(loop_i))
    y, y_mask = y.expand(B, -1, -1, -1), y_mask.expand(B, -1)
    null = uncond_mask = None
    if job.cfg != 1:
        if job.text.negative is not None:
            null, uncond_mask = (t.to(device) for t in job.text.negative)
            null, uncond_mask = null.expand(B, -1, -1, -1), uncond_mask.expand(B, -1)
        else:
            table = transformer.y_embedder.y_embedding
            null = table.to(device)[None, None].expand(B, 1, *table.shape)
        null = null.to(y.dtype)
    scheduler = RectifiedFlow(num_sampling_steps=job.steps, cfg_scale=job.cfg,
                              use_timestep_transform=job.timestep_warp)
    timesteps = scheduler.timesteps(B, height=job.height, width=job.width, num_frames=job.num_frames, device=device)
    model_kwargs = {
        "fps": torch.full((B,), float(model_fps(job.num_frames, job.fps)), device=device),
        "height": torch.full((B,), float(job.height), device=device),
        "width": torch.full((B,), float(job.width), device=device),
    }
    host.make_room(host.module_bytes(transformer), device)
    transformer.to(device)
    try:
        with torch.no_grad():
            return sample(
                _model_fn(transformer, B, uncond_mask), z, timesteps, y=y, y_null=null, y_mask=y_mask,
                guidance_scale=job.cfg, frame_mask=frame_mask, model_kwargs=model_kwargs,
                num_timesteps=scheduler.num_timesteps, noise_sampler=renoise, callback=counter,
            )
    finally:
        transformer.to(host.offload_device("unet"))
        host.soft_empty_cache()


def sampling_inputs() -> dict:
    """Inputs shared by OpenSoraSampler and OpenSoraLongVideo."""
    return {
        "seed": ("INT", tip("Sample k of the batch uses seed + k; the same seed as `opensora generate --seed` gives "
                            "the same video on the same device", default=42, min=0, max=MAX_SEED,
                            control_after_generate=True)),
        "steps": ("INT", tip("Rectified-flow steps (official: 30)", default=30, min=1, max=1000)),
        "cfg": ("FLOAT", tip("Classifier-free guidance scale (official: 7.0; 1 = no guidance, twice as fast)",
                             default=7.0, min=0.0, max=50.0, step=0.1, round=0.01)),
        "timestep_warp": ("BOOLEAN", tip(
            "Shift the schedule toward high noise for large and long videos (official: on)", default=True)),
    }


def condition_inputs() -> dict:
    return {
        "vae": (VAE, tip("VAE that encodes the references; needed when conditions are connected")),
        "conditions": (CONDITIONS, tip("Images / videos pinned to frames (OpenSoraImageCondition, ...)")),
        "condition_align": ("INT", tip(
            "Snap condition positions to multiples of this many latent frames (official: 5, one VAE chunk; "
            "frame -1 then lands on the last chunk's first latent); 0 places them exactly",
            default=5, min=0, max=64)),
    }


class OpenSoraSampler:
    DESCRIPTION = "Generates Open-Sora latents from text (and optional image/video conditions)."
    CATEGORY = CATEGORY
    RETURN_TYPES = ("LATENT",)
    RETURN_NAMES = ("samples",)
    FUNCTION = "sample"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": (MODEL, tip("STDiT3 from OpenSoraModelLoader")),
                "text": (TEXT, tip("Prompt embedding from OpenSoraTextEncode")),
                "latent": ("LATENT", tip("Size and length from OpenSoraEmptyLatentVideo (its values are ignored)")),
                **sampling_inputs(),
            },
            "optional": condition_inputs(),
        }

    def sample(self, model, text, latent, seed, steps, cfg, timestep_warp, vae=None, conditions=None,
               condition_align=5):
        job = prepare(model, text, latent, seed=seed, steps=steps, cfg=cfg, timestep_warp=timestep_warp,
                      vae=vae, conditions=conditions, align=condition_align)
        latents = run_loop(job, 0, StepCounter(steps))
        out = {k: v for k, v in latent.items() if k != "samples"}
        out.update(samples=latents.to(host.intermediate_device()), height=job.height, width=job.width,
                   num_frames=job.num_frames, fps=job.fps, seed=seed)
        return (out,)


NODES = {"OpenSoraSampler": (OpenSoraSampler, "Open-Sora Sampler")}
