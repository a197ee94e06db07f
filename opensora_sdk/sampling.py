"""The visible sampling loop: rectified flow with classifier-free guidance and frame masks.

One function, `sample`, in the k-diffusion style: a model function, the starting latent, the
schedule, extra arguments, a callback. It reproduces the official v1.2 RFLOW loop (spec 5.1):

    for each step i with timesteps t (= schedule[i], [B]):
        if frame_mask:                                   # [B, T]: 1 generate, e < 1 condition
            x0 = z; x_noise = add_noise(x0, randn, t)    # one draw per step
            upper = frame_mask * 1000 >= t               # [B, T] frames active at this t
            z = where(upper & ~noise_added, x_noise, x0) # newly active frames noised to t
            noise_added = upper
        pred = model([z; z], [t; t], y=[y; y_null], mask=[m; m], x_mask=[upper; upper])[:, :C]
        v = uncond + g * (cond - uncond)
        z = z + v * (t_i - t_{i+1}) / 1000               # fp32, warped, unquantised
        if frame_mask: z = where(upper, z, x0)           # inactive frames back to their clean values

Distribution (sequence parallelism) is the model's business: `model_fn` may be a
sequence-parallel model, the loop does not change.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import Tensor

from opensora_sdk.schedulers.rflow import add_noise, euler_step, guided_velocity

ModelFn = Callable[..., Tensor]
NoiseSampler = Callable[[int, Tensor], Tensor]
Callback = Callable[[int, int, Tensor, Tensor], "bool | None"]


class SamplingInterrupted(Exception):
    """Raised by `sample` when the callback asks to stop (returns False) or raises it itself.

    Attributes: `step` (index of the last completed step, -1 if none) and `latent`
    (the latent after that step, [B, C, T, H, W]).
    """

    def __init__(self, step: int = -1, latent: Tensor | None = None, message: str | None = None):
        super().__init__(message or f"sampling stopped by the callback after step {step}")
        self.step = step
        self.latent = latent


def _bcast(x: Tensor, ndim: int) -> Tensor:
    """[B] or [B, T] -> broadcastable against [B, C, T, H, W]."""
    if x.dim() == 1:
        return x.reshape(-1, *([1] * (ndim - 1)))
    return x[:, None, :, None, None]


def _cfg_kwargs(kwargs: dict, batch: int) -> dict:
    """Repeat per-sample tensors (first dim == batch) for the [cond; uncond] batch."""
    out = {}
    for key, value in kwargs.items():
        if isinstance(value, Tensor) and value.dim() > 0 and value.shape[0] == batch:
            value = torch.cat([value, value], 0)
        out[key] = value
    return out


def sample(
    model_fn: ModelFn,
    z: Tensor,
    timesteps: Sequence[Tensor],
    *,
    y: Tensor,
    y_null: Tensor | None = None,
    y_mask: Tensor | None = None,
    guidance_scale: float = 7.0,
    frame_mask: Tensor | None = None,
    model_kwargs: dict | None = None,
    num_timesteps: int = 1000,
    generator: torch.Generator | None = None,
    noise_sampler: NoiseSampler | None = None,
    callback: Callback | None = None,
) -> Tensor:
    """Integrate the rectified-flow ODE from noise to data.

    Args:
        model_fn: `model_fn(x, t, *, y, mask, x_mask, **model_kwargs) -> [N, C', T, H, W]`
            with x [N, C, T, H, W], t [N] float32 (unquantised; the model may quantise),
            C' >= C (the first C channels are the velocity). N = 2B with CFG, else B.
        z: [B, C, T, H, W] starting latent: noise with reference latents already pasted in
            (see `opensora_sdk.conditioning.apply_mask_strategy`). Not modified.
        timesteps: K tensors [B] (e.g. `RectifiedFlow.timesteps(...)`), decreasing,
            in model time [0, num_timesteps]; the last step integrates down to 0.
        y: [B, 1, L, D] prompt embedding.
        y_null: [B, 1, L, D] unconditional embedding (the model's null caption). With it, the
            model runs on [cond; uncond] in one batch of 2B; None disables guidance.
        y_mask: [B, L] text mask, used for both halves (the null half is masked with the
            prompt's own mask, as in the reference). None = all tokens.
        guidance_scale: g in v = uncond + g * (cond - uncond), applied to all C channels.
        frame_mask: [B, T] float, 1 = generate, e in [0, 1) = condition frame with edit ratio
            e (kept clean until t <= e * num_timesteps, then noised once and regenerated).
            When given, each step draws one noise tensor like z. None = no conditioning, no
            draws, x_mask None.
        model_kwargs: more model arguments (height, width, num_frames, fps, ar ...). Tensors
            whose first dimension is B are repeated to 2B under guidance; others pass as is.
        generator: source of every random draw (the per-step re-noising).
        noise_sampler: `noise_sampler(step, like) -> tensor like `like``, replacing the
            default `torch.randn(like.shape, generator=generator)` draw (e.g. to replay
            recorded noise).
        callback: `callback(step, total, latent, denoised)` after each step with the latent
            [B, C, T, H, W] after the step and the predicted clean latent
            x0_hat = x_t + s * v (s = t / num_timesteps; condition frames at their clean
            values). Return False (or raise `SamplingInterrupted`) to stop: `sample` then
            raises `SamplingInterrupted` carrying the step and the latent.
    Returns:
        [B, C, T, H, W] float32 latent at t = 0.
    """
    if z.dim() != 5:
        raise ValueError(f"z must be [B, C, T, H, W], got shape {tuple(z.shape)}")
    B, C, T = z.shape[:3]
    if len(timesteps) == 0:
        raise ValueError("timesteps is empty: give at least one step")
    for i, t in enumerate(timesteps):
        if t.shape != (B,):
            raise ValueError(f"timesteps[{i}] must have shape [{B}], got {tuple(t.shape)}")
    if y.shape[0] != B:
        raise ValueError(f"y must have batch {B} like z, got shape {tuple(y.shape)}")
    if y_null is not None and y_null.shape != y.shape:
        raise ValueError(f"y_null shape {tuple(y_null.shape)} must equal y shape {tuple(y.shape)}")
    if frame_mask is not None and frame_mask.shape != (B, T):
        raise ValueError(f"frame_mask must be [B, T] = [{B}, {T}], got {tuple(frame_mask.shape)}")

    cfg = y_null is not None
    kwargs = dict(model_kwargs or {})
    for reserved in ("y", "mask", "x_mask"):
        if reserved in kwargs:
            raise ValueError(f"model_kwargs must not contain {reserved!r}: pass it as an argument of sample()")
    if cfg:
        kwargs = _cfg_kwargs(kwargs, B)
        kwargs["y"] = torch.cat([y, y_null], 0)
        kwargs["mask"] = None if y_mask is None else torch.cat([y_mask, y_mask], 0)
    else:
        kwargs["y"] = y
        kwargs["mask"] = y_mask

    def draw(step: int, like: Tensor) -> Tensor:
        if noise_sampler is not None:
            return noise_sampler(step, like)
        return torch.randn(like.shape, generator=generator, dtype=like.dtype, device=like.device)

    noise_added = None if frame_mask is None else frame_mask == 1  # [B, T] bool
    total = len(timesteps)
    for i, t in enumerate(timesteps):
        upper = x0 = None
        if frame_mask is not None:
            mask_t = frame_mask * num_timesteps
            x0 = z.clone()
            x_noise = add_noise(x0, draw(i, x0), t, num_timesteps)
            upper = mask_t >= t.unsqueeze(1)  # [B, T]
            z = torch.where(_bcast(upper & ~noise_added, 5), x_noise, x0)
            noise_added = upper

        if cfg:
            x_mask = None if upper is None else upper.repeat(2, 1)
            out = model_fn(torch.cat([z, z], 0), torch.cat([t, t], 0), x_mask=x_mask, **kwargs)
            pred_cond, pred_uncond = out[:, :C].chunk(2, dim=0)
            v = guided_velocity(pred_cond, pred_uncond, guidance_scale)
        else:
            v = model_fn(z, t, x_mask=upper, **kwargs)[:, :C]

        z_t = z
        z = euler_step(z, v, t, timesteps[i + 1] if i + 1 < total else None, num_timesteps)
        if frame_mask is not None:
            z = torch.where(_bcast(upper, 5), z, x0)

        if callback is not None:
            denoised = z_t + v * _bcast(t / num_timesteps, 5)
            if upper is not None:
                denoised = torch.where(_bcast(upper, 5), denoised, x0)
            try:
                keep_going = callback(i, total, z, denoised)
            except SamplingInterrupted as stop:
                raise SamplingInterrupted(i, z, str(stop) or None) from stop
            if keep_going is False:
                raise SamplingInterrupted(i, z)
    return z


__all__ = ["SamplingInterrupted", "sample"]
