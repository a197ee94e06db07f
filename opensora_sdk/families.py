"""Model families: what differs between Open-Sora v1.2, v1.1 and v1.0, as data.

The generation orchestration (`opensora_sdk.generation`) and planning (`opensora_sdk.plan`)
take a `ModelFamily` and never ask which family they run. A family says:

    defaults       its official inference defaults (spec 6.1, 9.1, 9.2), one table (v1.1 and
                   v1.0 were not trained with score suffixes: no aesthetic score)
    scheduler      make_scheduler(num_steps, timestep_warp) and the sampling loop `sample`
    model_inputs   the conditioning tensors its transformer takes besides x, t, y, mask
    frame_interval the output plays at fps / frame_interval (v1.1 and v1.0 feed the model
                   24 fps and save their 3x subsampled clips at 8 fps)

    family  transformer  scheduler                  VAE                    text
    v1.2    STDiT3       rectified flow, 30 steps   3D VAE (17 -> 5)       T5-XXL, 300 tokens
    v1.1    STDiT2       IDDPM, 100 steps (f32)     SD VAE per frame       T5-XXL, 200 tokens
    v1.0    STDiT        IDDPM, 100 steps (f64)     SD VAE per frame       T5-XXL, 120 tokens

Every `sample` adapter has one signature: (model_fn, z, scheduler, *, size=(H, W, N), y,
y_null, y_mask, guidance_scale, frame_mask, model_kwargs, noise_sampler, callback) -> z.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping

import torch

# --------------------------------------------------------------------------------------------
# v1.2: rectified flow
# --------------------------------------------------------------------------------------------


def _rectified_flow(num_steps: int, timestep_warp: bool = True):
    from opensora_sdk.schedulers.rflow import RectifiedFlow

    return RectifiedFlow(num_sampling_steps=num_steps, use_timestep_transform=timestep_warp)


def _rectified_flow_timesteps(scheduler, height: int, width: int, num_frames: int) -> tuple[float, ...]:
    return tuple(float(t[0]) for t in scheduler.timesteps(1, height=height, width=width, num_frames=num_frames))


def _rectified_flow_sample(model_fn, z, scheduler, *, size, noise_sampler, **kwargs):
    from opensora_sdk.sampling import sample

    H, W, N = size
    timesteps = scheduler.timesteps(z.shape[0], height=H, width=W, num_frames=N, device=z.device)
    return sample(model_fn, z, timesteps, num_timesteps=scheduler.num_timesteps, noise_sampler=noise_sampler, **kwargs)


def _stdit3_inputs(plan, batch: int, device) -> dict[str, torch.Tensor]:
    """STDiT3 is conditioned on the model fps and the output size, each [B]."""
    return {
        "fps": torch.full((batch,), float(plan.model_fps), device=device),
        "height": torch.full((batch,), float(plan.height), device=device),
        "width": torch.full((batch,), float(plan.width), device=device),
    }


# --------------------------------------------------------------------------------------------
# v1.1 and v1.0: IDDPM
# --------------------------------------------------------------------------------------------


def _iddpm(table_dtype: torch.dtype):
    def make(num_steps: int, timestep_warp: bool = True):  # IDDPM has no warp: the flag is unused
        from opensora_sdk.schedulers.iddpm import IDDPM

        return IDDPM(num_sampling_steps=num_steps, table_dtype=table_dtype)

    return make


def _iddpm_timesteps(scheduler, height: int, width: int, num_frames: int) -> tuple[float, ...]:
    """The original timesteps the model sees, first step first (tau_{K-1} .. tau_0)."""
    return tuple(float(t) for t in scheduler.tables.timestep_map.flip(0))


def _iddpm_sample(model_fn, z, scheduler, *, size, frame_mask, **kwargs):
    from opensora_sdk.schedulers.iddpm import sample_iddpm

    return sample_iddpm(model_fn, z, scheduler, frame_mask=frame_mask, **kwargs)


def _stdit2_inputs(plan, batch: int, device) -> dict[str, torch.Tensor]:
    """STDiT2 (spec 9.1): pixel frames, size, ar = H / W and the model fps, each [B]."""
    full = lambda v: torch.full((batch,), float(v), device=device)  # noqa: E731
    return {"num_frames": full(plan.num_frames), "height": full(plan.height), "width": full(plan.width),
            "ar": full(plan.height / plan.width), "fps": full(plan.model_fps)}  # fmt: skip


def _no_inputs(plan, batch: int, device) -> dict[str, torch.Tensor]:
    """STDiT (v1.0) takes nothing besides x, t, y and mask."""
    return {}


# --------------------------------------------------------------------------------------------
# The records
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelFamily:
    """What differs between Open-Sora generations (see the module docstring)."""

    name: str
    defaults: Mapping[str, Any]
    max_latent_frames: int | None
    make_scheduler: Callable[..., Any]
    timesteps: Callable[..., tuple]  # (scheduler, H, W, N) -> the model-time schedule of one sample
    sample: Callable[..., torch.Tensor]
    model_inputs: Callable[..., dict]
    frame_interval: int = 1
    conditioning: bool = True  # references / frame masks supported (v1.0: no)
    loops: bool = True


V1_2 = ModelFamily(
    name="v1.2",
    defaults={
        "resolution": "240p", "aspect_ratio": "9:16", "num_frames": "4s", "fps": 24, "num_steps": 30,
        "guidance_scale": 7.0, "align": 5, "aesthetic_score": 6.5,
    },  # fmt: skip
    max_latent_frames=120,  # 408 frames ("16s"), the longest v1.2 training clips
    make_scheduler=_rectified_flow,
    timesteps=_rectified_flow_timesteps,
    sample=_rectified_flow_sample,
    model_inputs=_stdit3_inputs,
)

# v1.1 inference config (spec 9.1): 16 frames of 240x426, fps 24 fed to the model, saved at
# 24 // 3 = 8; IDDPM 100 steps, cfg 7; mask strategies without align; loops as inference-long.
V1_1 = ModelFamily(
    name="v1.1",
    defaults={
        "resolution": "240p", "aspect_ratio": "9:16", "num_frames": 16, "fps": 24, "num_steps": 100,
        "guidance_scale": 7.0, "align": None, "aesthetic_score": None,
    },  # fmt: skip
    max_latent_frames=None,
    make_scheduler=_iddpm(torch.float32),
    timesteps=_iddpm_timesteps,
    sample=_iddpm_sample,
    model_inputs=_stdit2_inputs,
    frame_interval=3,
)

# v1.0 (spec 9.2): fixed-size checkpoints (16x256x256 by default), IDDPM 100 steps with
# float64 tables, cfg 7 on channels 0-2, saved at 8 fps; no conditioning, no loops.
V1_0 = ModelFamily(
    name="v1.0",
    defaults={
        "resolution": None, "aspect_ratio": None, "num_frames": 16, "fps": 24, "num_steps": 100,
        "guidance_scale": 7.0, "align": None, "aesthetic_score": None,
    },  # fmt: skip
    max_latent_frames=None,
    make_scheduler=_iddpm(torch.float64),
    timesteps=_iddpm_timesteps,
    sample=_iddpm_sample,
    model_inputs=_no_inputs,
    frame_interval=3,
    conditioning=False,
    loops=False,
)

FAMILIES: dict[str, ModelFamily] = {f.name: f for f in (V1_2, V1_1, V1_0)}

# The family of each transformer class / config `model_type`.
FAMILY_OF_MODEL_TYPE = {"STDiT3": "v1.2", "stdit2": "v1.1", "STDiT2": "v1.1", "stdit": "v1.0", "STDiT": "v1.0"}


def family_of(transformer_or_config) -> ModelFamily:
    """The family of an STDiT3 / STDiT2 / STDiT model or config."""
    config = getattr(transformer_or_config, "config", transformer_or_config)
    kind = getattr(config, "model_type", None) or type(config).__name__.removesuffix("Config")
    name = FAMILY_OF_MODEL_TYPE.get(kind)
    if name is None:
        raise ValueError(f"{type(config).__name__} is not an Open-Sora transformer (STDiT3, STDiT2 or STDiT)")
    return FAMILIES[name]


__all__ = ["FAMILIES", "ModelFamily", "V1_0", "V1_1", "V1_2", "family_of"]
