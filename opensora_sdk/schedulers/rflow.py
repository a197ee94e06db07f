"""Rectified flow (the v1.2 "RFLOW" scheduler): schedules, the timestep warp, the training loss.

Time convention: model time t lies in [0, num_timesteps] (1000 = pure noise, 0 = data) and
s = t / num_timesteps in [0, 1]. The forward process is x_t = (1 - s) * x0 + s * eps and the
model predicts the velocity v = x0 - eps, so an Euler step from t_i to t_{i+1} is
z <- z + v * (t_i - t_{i+1}) / num_timesteps.

Everything here is a pure function of tensors (plus the caller's `torch.Generator` where a
draw is needed). The scheduler never encodes text and never owns a model: the sampling loop
lives in `opensora_sdk.sampling`, and the training loss takes any `model_fn(x, t, **kwargs)`.

Two official numerics are reproduced on request only:

* ``official_bf16=True``: the official inference feeds height, width and num_frames to the warp
  as bfloat16 tensors, so H*W, the space ratio and the final ratio are bf16-rounded
  (720p/102 frames gives r = 10.25 instead of 10.2698). The default computes in float32.
* ``degenerate_warp="official"``: the official warp uses floor(N / 17) * 5 as the frame term
  and checks ``num_frames[0] == 1`` only, so for 2..16 pixel frames (or a batch whose first
  element is a video and another an image) the ratio is 0: t' = 0 for t < 1000 and NaN at
  t = 1000, and the sampler returns its input undenoised. The default ``"clamp"`` uses
  max(1, floor(N / 17) * 5) per sample (a short clip is warped like an image, which is also
  what the official code does for N = 1); ``"raise"`` rejects such frame counts.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Literal, Sequence

import torch
from torch import Tensor

DegenerateWarp = Literal["clamp", "raise", "official"]
_DEGENERATE_CHOICES = ("clamp", "raise", "official")
_SAMPLE_METHODS = ("uniform", "logit-normal")


# --------------------------------------------------------------------------------------------
# Pure functions: schedule, warp, forward process, masked mean
# --------------------------------------------------------------------------------------------


def sampling_timesteps(
    num_sampling_steps: int, num_timesteps: int = 1000, use_discrete_timesteps: bool = False
) -> list[float]:
    """The un-warped sampling schedule t_i = (1 - i / K) * num_timesteps, i = 0..K-1.

    1000 is the first value; 0 is not included (the last Euler step goes from t_{K-1} to 0).
    With `use_discrete_timesteps` each value is rounded to an integer.
    """
    if int(num_sampling_steps) != num_sampling_steps or num_sampling_steps < 1:
        raise ValueError(f"num_sampling_steps must be a positive integer, got {num_sampling_steps!r}")
    ts = [(1.0 - i / num_sampling_steps) * num_timesteps for i in range(int(num_sampling_steps))]
    if use_discrete_timesteps:
        ts = [float(int(round(t))) for t in ts]
    return ts


def _as_batch(value, like: Tensor, dtype: torch.dtype, name: str) -> Tensor:
    """A [B] tensor of `dtype` from a number or a [B] / [1] tensor."""
    if value is None:
        raise ValueError(f"{name} is required for the timestep warp (got None)")
    v = torch.as_tensor(value, device=like.device)
    if v.dim() == 0:
        v = v.expand(like.shape[0])
    if v.dim() != 1 or v.shape[0] not in (1, like.shape[0]):
        raise ValueError(f"{name} must be a number or a tensor of shape [{like.shape[0]}], got {tuple(v.shape)}")
    return v.to(dtype).expand(like.shape[0])


def timestep_transform(
    t: Tensor,
    height,
    width,
    num_frames,
    *,
    scale: float = 1.0,
    base_resolution: int = 512 * 512,
    base_num_frames: int = 1,
    num_timesteps: int = 1000,
    official_bf16: bool = False,
    degenerate_warp: DegenerateWarp = "clamp",
) -> Tensor:
    """Warp model timesteps towards noise for large / long outputs (spec 5.1 step 2).

    s = t / num_timesteps; r = sqrt(H*W / base_resolution) * sqrt(F / base_num_frames) * scale
    with the frame term F = floor(N / 17) * 5 (N pixel frames; 1 for images);
    s' = r*s / (1 + (r - 1)*s); returns t' = s' * num_timesteps.

    Args:
        t: [B] float timesteps in [0, num_timesteps].
        height, width, num_frames: pixel sizes, numbers or [B] tensors (num_frames in pixel
            frames, not latent frames).
        official_bf16: do the size arithmetic in bfloat16, as the official bf16 inference does.
        degenerate_warp: "clamp" (default) uses max(1, F) per sample; "raise" raises a
            ValueError for 1 < N < 17; "official" reproduces the reference exactly
            (F = 1 only when num_frames[0] == 1, else floor(N/17)*5, which is 0 for N < 17:
            t' = 0, and NaN at t = 1000).
    Returns:
        [B] float32 warped timesteps (float32 even in bf16 mode: r is bf16, t is not).
    """
    if degenerate_warp not in _DEGENERATE_CHOICES:
        raise ValueError(f"degenerate_warp must be one of {_DEGENERATE_CHOICES}, got {degenerate_warp!r}")
    t = torch.as_tensor(t, dtype=torch.float32)
    if t.dim() == 0:
        t = t.reshape(1)
    dtype = torch.bfloat16 if official_bf16 else torch.float32
    h = _as_batch(height, t, dtype, "height")
    w = _as_batch(width, t, dtype, "width")
    nf = _as_batch(num_frames, t, dtype, "num_frames")

    s = t / num_timesteps
    ratio_space = (h * w / base_resolution).sqrt()
    if degenerate_warp == "official":
        frames = torch.ones_like(nf) if nf[0] == 1 else nf // 17 * 5
    else:
        if degenerate_warp == "raise":
            bad = [int(n) for n in nf.tolist() if 1 < n < 17]
            if bad:
                raise ValueError(
                    f"num_frames={bad} makes the timestep warp degenerate (floor(N/17)*5 == 0): "
                    "use 1 frame or at least 17, or degenerate_warp='clamp'"
                )
        frames = torch.clamp(nf // 17 * 5, min=1)
    ratio_time = (frames / base_num_frames).sqrt()
    ratio = ratio_space * ratio_time * scale
    new_s = ratio * s / (1 + (ratio - 1) * s)
    return new_s * num_timesteps


def add_noise(x0: Tensor, noise: Tensor, t: Tensor, num_timesteps: int = 1000) -> Tensor:
    """Forward process x_t = (1 - s) * x0 + s * noise with s = t / num_timesteps.

    x0, noise: [B, C, T, H, W]; t: [B]. Computed as a * x0 + (1 - a) * noise with
    a = 1 - s, the reference's operation order (bitwise parity).
    """
    a = 1 - t.float() / num_timesteps
    a = a.reshape(-1, *([1] * (x0.dim() - 1)))
    return a * x0 + (1 - a) * noise


def mean_flat(x: Tensor, mask: Tensor | None = None) -> Tensor:
    """Per-sample mean of x [B, C, T, H, W] -> [B].

    With a frame mask [B, T] (True = counted), the mean runs over the True frames only:
    sum over those frames of all C*H*W values / (#True * C*H*W).
    """
    if mask is None:
        return x.mean(dim=list(range(1, x.dim())))
    if x.dim() != 5 or mask.shape != (x.shape[0], x.shape[2]):
        raise ValueError(
            f"mask must be [B, T] = [{x.shape[0]}, {x.shape[2]}] for x {tuple(x.shape)}, got {tuple(mask.shape)}"
        )
    per_frame = x.transpose(1, 2).flatten(2)  # [B, T, C*H*W]
    denom = mask.sum(dim=1) * per_frame.shape[-1]  # [B]
    return (per_frame * mask.unsqueeze(2)).sum(dim=1).sum(dim=1) / denom


# --------------------------------------------------------------------------------------------
# The scheduler object: settings + the functions above
# --------------------------------------------------------------------------------------------


@dataclass
class RectifiedFlow:
    """Settings of the rectified-flow scheduler, with the official field names.

    Defaults are those of the v1.2 inference and training configs (30 steps, timestep warp
    on, logit-normal training times); note that the official class's own constructor
    defaults are 10 steps, no warp and uniform training times. The guidance scale is not a
    scheduler setting here (the official class carries `cfg_scale`): the sampler takes it,
    and its default lives in the family's defaults table (`opensora_sdk.presets`).

    `official_bf16` and `degenerate_warp` select the reference numerics described in the
    module docstring; the defaults (float32, "clamp") never return an undenoised latent.
    """

    num_sampling_steps: int = 30
    num_timesteps: int = 1000
    use_discrete_timesteps: bool = False
    use_timestep_transform: bool = True
    transform_scale: float = 1.0
    sample_method: str = "logit-normal"  # training: "uniform" | "logit-normal"
    loc: float = 0.0  # logit-normal location
    scale: float = 1.0  # logit-normal scale
    official_bf16: bool = False
    degenerate_warp: DegenerateWarp = "clamp"

    def __post_init__(self):
        if self.sample_method not in _SAMPLE_METHODS:
            raise ValueError(f"sample_method must be one of {_SAMPLE_METHODS}, got {self.sample_method!r}")
        if self.degenerate_warp not in _DEGENERATE_CHOICES:
            raise ValueError(f"degenerate_warp must be one of {_DEGENERATE_CHOICES}, got {self.degenerate_warp!r}")
        if self.num_timesteps <= 0:
            raise ValueError(f"num_timesteps must be positive, got {self.num_timesteps}")

    # ---- warp --------------------------------------------------------------------------------

    def timestep_transform(self, t: Tensor, height, width, num_frames) -> Tensor:
        """`timestep_transform` with this scheduler's scale, bf16 and degenerate settings. [B] -> [B]."""
        return timestep_transform(
            t,
            height,
            width,
            num_frames,
            scale=self.transform_scale,
            num_timesteps=self.num_timesteps,
            official_bf16=self.official_bf16,
            degenerate_warp=self.degenerate_warp,
        )

    # ---- inference ---------------------------------------------------------------------------

    def timesteps(
        self,
        batch_size: int,
        *,
        height=None,
        width=None,
        num_frames=None,
        device: torch.device | str | None = None,
    ) -> list[Tensor]:
        """The K sampling timesteps, each a float32 tensor [batch_size], warped if enabled.

        height, width, num_frames (pixel units, numbers or [B] tensors) are needed only when
        `use_timestep_transform` is on. Pass the result to `opensora_sdk.sampling.sample`.
        """
        base = sampling_timesteps(self.num_sampling_steps, self.num_timesteps, self.use_discrete_timesteps)
        out = [torch.tensor([t] * batch_size, device=device) for t in base]
        if self.use_timestep_transform:
            out = [self.timestep_transform(t, height, width, num_frames) for t in out]
        return out

    def add_noise(self, x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        """x_t = (1 - t/num_timesteps) * x0 + t/num_timesteps * noise; x0, noise [B,C,T,H,W], t [B]."""
        return add_noise(x0, noise, t, self.num_timesteps)

    # ---- training ----------------------------------------------------------------------------

    def sample_training_timesteps(
        self,
        batch: int,
        *,
        method: str | None = None,
        generator: torch.Generator | None = None,
        device: torch.device | str | None = None,
        height=None,
        width=None,
        num_frames=None,
    ) -> Tensor:
        """Draw [batch] training timesteps in [0, num_timesteps) (spec 5.2 step 1).

        "uniform": U(0,1) * num_timesteps (`use_discrete_timesteps`: randint(0, num_timesteps));
        "logit-normal": sigmoid(loc + scale * N(0,1)) * num_timesteps. Then, with
        `use_timestep_transform`, the warp with the batch's height/width/num_frames.
        """
        method = self.sample_method if method is None else method
        if method not in _SAMPLE_METHODS:
            raise ValueError(f"method must be one of {_SAMPLE_METHODS}, got {method!r}")
        if self.use_discrete_timesteps:
            t = torch.randint(0, self.num_timesteps, (batch,), generator=generator, device=device).float()
        elif method == "uniform":
            t = torch.rand((batch,), generator=generator, device=device) * self.num_timesteps
        else:
            z = torch.randn((batch,), generator=generator, device=device)
            t = torch.sigmoid(self.loc + self.scale * z) * self.num_timesteps
        if self.use_timestep_transform:
            t = self.timestep_transform(t, height, width, num_frames)
        return t

    def training_loss(
        self,
        model_fn: Callable[..., Tensor],
        x0: Tensor,
        model_kwargs: dict | None = None,
        mask: Tensor | None = None,
        *,
        generator: torch.Generator | None = None,
        t: Tensor | None = None,
        noise: Tensor | None = None,
    ) -> Tensor:
        """Per-sample rectified-flow loss [B] (spec 5.2); take `.mean()` for the batch loss.

        Args:
            model_fn: `model_fn(x_t [B,C,T,H,W], t [B], **model_kwargs) -> [B, C', T, H, W]`
                with C' >= C; the first C channels are the velocity.
            x0: clean latents [B, C, T, H, W].
            model_kwargs: passed to the model; its height/width/num_frames feed the warp when
                `t` is drawn here.
            mask: [B, T] bool, True = generated frame. False frames stay clean (x0), are
                passed to the model as `x_mask=mask` (t = 0 modulation) and are left out of
                the loss.
            generator: source of the t draw (when `t` is None), then of the noise.
            t, noise: fixed values instead of draws ([B] and [B,C,T,H,W]).
        """
        kwargs = dict(model_kwargs or {})
        if t is None:
            t = self.sample_training_timesteps(
                x0.shape[0],
                generator=generator,
                device=x0.device,
                height=kwargs.get("height"),
                width=kwargs.get("width"),
                num_frames=kwargs.get("num_frames"),
            )
        if noise is None:
            noise = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
        if noise.shape != x0.shape:
            raise ValueError(f"noise shape {tuple(noise.shape)} must equal x0 shape {tuple(x0.shape)}")
        x_t = self.add_noise(x0, noise, t)
        if mask is not None:
            mask = mask.bool()
            x_t0 = self.add_noise(x0, noise, torch.zeros_like(t))
            x_t = torch.where(mask[:, None, :, None, None], x_t, x_t0)
            kwargs["x_mask"] = mask
        velocity = model_fn(x_t, t, **kwargs)[:, : x0.shape[1]]
        target = x0 - noise
        return mean_flat((velocity - target).pow(2), mask=mask)


def euler_step(z: Tensor, v: Tensor, t: Tensor, t_next: Tensor | None, num_timesteps: int = 1000) -> Tensor:
    """One Euler step z + v * (t - t_next) / num_timesteps (t_next None means 0).

    z, v: [B, C, T, H, W]; t, t_next: [B] float32, the warped, unquantised timesteps.
    """
    dt = t if t_next is None else t - t_next
    dt = dt / num_timesteps
    return z + v * dt.reshape(-1, *([1] * (z.dim() - 1)))


def guided_velocity(pred_cond: Tensor, pred_uncond: Tensor, guidance_scale: float) -> Tensor:
    """Classifier-free guidance v = uncond + g * (cond - uncond), all channels guided."""
    return pred_uncond + guidance_scale * (pred_cond - pred_uncond)


__all__: Sequence[str] = [
    "RectifiedFlow",
    "add_noise",
    "euler_step",
    "guided_velocity",
    "mean_flat",
    "sampling_timesteps",
    "timestep_transform",
]
