"""Model families: what differs between Open-Sora v1.2, v1.1 and v1.0, as data.

The generation orchestration (`opensora_sdk.generation`) and planning (`opensora_sdk.plan`)
take a `ModelFamily` and never ask which family they run. A family says:

    defaults       its official inference defaults (spec 6.1, 9.1, 9.2), one table (v1.1 and
                   v1.0 were not trained with score suffixes: no aesthetic score)
    samplers       its sampling methods (`Sampler`: scheduler, timesteps, loop, default steps),
                   the first the official default; v1.0 and v1.1 also offer DPM-Solver++
    model_inputs   the conditioning tensors its transformer takes besides x, t, y, mask
    frame_interval the output plays at fps / frame_interval (v1.1 and v1.0 feed the model
                   24 fps and save their 3x subsampled clips at 8 fps)

    family  transformer  scheduler                  VAE                    text
    v1.2    STDiT3       rectified flow, 30 steps   3D VAE (17 -> 5)       T5-XXL, 300 tokens
    v1.1    STDiT2       IDDPM, 100 steps (f32)     SD VAE per frame       T5-XXL, 200 tokens
    v1.0    STDiT        IDDPM, 100 steps (f64)     SD VAE per frame       T5-XXL, 120 tokens

Every `Sampler.sample` adapter has one signature: (model_fn, z, scheduler, *, size=(H, W, N), y,
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
# v1.0 and v1.1: DPM-Solver++ (the fast sampler of the v1.0 demo, spec 5.4)
# --------------------------------------------------------------------------------------------


def _dpm_solver(num_steps: int, timestep_warp: bool = True):  # no warp either
    from opensora_sdk.schedulers.dpm_solver import DPMSolver

    return DPMSolver(num_sampling_steps=num_steps)


def _dpm_solver_timesteps(solver, height: int, width: int, num_frames: int) -> tuple[float, ...]:
    """The model times of the K model calls (the last state is not evaluated)."""
    return tuple(float(t) for t in solver.schedule.model_time(solver.timesteps()[:-1]))


def _dpm_solver_sample(model_fn, z, solver, *, size, frame_mask, noise_sampler, **kwargs):
    """DPM-Solver batches guidance as [uncond; cond]; the model functions of this package take
    [cond; uncond] (a negative prompt's mask goes with the second half), so the halves are
    swapped around the call. No frame masks (the plan refuses references) and no draws."""
    from opensora_sdk.schedulers.dpm_solver import sample_dpm_solver

    if frame_mask is not None:
        raise ValueError("the dpm-solver sampler takes no references: use sampler='iddpm'")
    B = z.shape[0]

    def swap(v):
        return torch.cat([v[B:], v[:B]], 0) if isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape[0] == 2 * B else v

    def cond_first(x, t, *, y, mask, x_mask=None, **kw):
        if x.shape[0] != 2 * B:
            return model_fn(x, t, y=y, mask=mask, x_mask=x_mask, **kw)
        out = model_fn(swap(x), swap(t), y=swap(y), mask=swap(mask), x_mask=x_mask, **{k: swap(v) for k, v in kw.items()})
        return swap(out)

    return sample_dpm_solver(cond_first, z, solver, **kwargs)


# --------------------------------------------------------------------------------------------
# The records
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Sampler:
    """One sampling method of a family.

    make_scheduler(num_steps, timestep_warp) -> the scheduler object the loop takes;
    timesteps(scheduler, H, W, N) -> the model times of one sample's calls, first first;
    sample(model_fn, z, scheduler, ...) -> the latent (the signature in the module docstring);
    num_steps: the step count when a call gives none (the family's table overrides it for
    the family's default sampler); frame_masks: whether references / extension work.
    """

    name: str
    make_scheduler: Callable[..., Any]
    timesteps: Callable[..., tuple]
    sample: Callable[..., torch.Tensor]
    num_steps: int
    frame_masks: bool = True


RECTIFIED_FLOW = Sampler("rflow", _rectified_flow, _rectified_flow_timesteps, _rectified_flow_sample, 30)
IDDPM_F32 = Sampler("iddpm", _iddpm(torch.float32), _iddpm_timesteps, _iddpm_sample, 100)
IDDPM_F64 = Sampler("iddpm", _iddpm(torch.float64), _iddpm_timesteps, _iddpm_sample, 100)
# 20 steps: DPM-Solver++(2M)'s usual count (the spec gives no official number for the demo)
DPM_SOLVER = Sampler("dpm-solver", _dpm_solver, _dpm_solver_timesteps, _dpm_solver_sample, 20, frame_masks=False)


@dataclass(frozen=True)
class ModelFamily:
    """What differs between Open-Sora generations (see the module docstring)."""

    name: str
    defaults: Mapping[str, Any]
    max_latent_frames: int | None
    samplers: tuple[Sampler, ...]  # the first is the default
    model_inputs: Callable[..., dict]
    frame_interval: int = 1
    conditioning: bool = True  # references / frame masks supported (v1.0: no)
    loops: bool = True

    def sampler(self, name: str | None = None) -> Sampler:
        """The sampler called `name` (None: the default); a name it lacks is a ValueError."""
        if name is None:
            return self.samplers[0]
        for s in self.samplers:
            if s.name == name:
                return s
        allowed = ", ".join(repr(s.name) for s in self.samplers)
        raise ValueError(f"sampler={name!r} is not allowed for Open-Sora {self.name} models: expected one of {allowed}")


V1_2 = ModelFamily(
    name="v1.2",
    defaults={
        "resolution": "240p", "aspect_ratio": "9:16", "num_frames": "4s", "fps": 24, "num_steps": 30,
        "guidance_scale": 7.0, "align": 5, "aesthetic_score": 6.5, "timestep_warp": True,
    },  # fmt: skip
    max_latent_frames=120,  # 408 frames ("16s"), the longest v1.2 training clips
    samplers=(RECTIFIED_FLOW,),
    model_inputs=_stdit3_inputs,
)

# v1.1 inference config (spec 9.1): 16 frames of 240x426, fps 24 fed to the model, saved at
# 24 // 3 = 8; IDDPM 100 steps, cfg 7; mask strategies without align; loops as inference-long.
V1_1 = ModelFamily(
    name="v1.1",
    defaults={
        "resolution": "240p", "aspect_ratio": "9:16", "num_frames": 16, "fps": 24, "num_steps": 100,
        "guidance_scale": 7.0, "align": None, "aesthetic_score": None, "timestep_warp": False,  # IDDPM: no warp
    },  # fmt: skip
    max_latent_frames=None,
    samplers=(IDDPM_F32, DPM_SOLVER),
    model_inputs=_stdit2_inputs,
    frame_interval=3,
)

# v1.0 (spec 9.2): fixed-size checkpoints (16x256x256 by default), IDDPM 100 steps with
# float64 tables, cfg 7 on channels 0-2, saved at 8 fps; no conditioning, no loops.
V1_0 = ModelFamily(
    name="v1.0",
    defaults={
        "resolution": None, "aspect_ratio": None, "num_frames": 16, "fps": 24, "num_steps": 100,
        "guidance_scale": 7.0, "align": None, "aesthetic_score": None, "timestep_warp": False,  # IDDPM: no warp
    },  # fmt: skip
    max_latent_frames=None,
    samplers=(IDDPM_F64, DPM_SOLVER),
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


__all__ = ["FAMILIES", "ModelFamily", "Sampler", "V1_0", "V1_1", "V1_2", "family_of"]
