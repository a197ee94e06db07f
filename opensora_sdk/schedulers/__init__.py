"""Noise schedules and samplers: pure functions of tensors."""

from opensora_sdk.schedulers.dpm_solver import (
    DPMSolver,
    NoiseScheduleVP,
    sample_dpm_solver,
)
from opensora_sdk.schedulers.iddpm import (
    IDDPM,
    DiffusionTables,
    guided_output,
    sample_iddpm,
    space_timesteps,
)
from opensora_sdk.schedulers.rflow import (
    RectifiedFlow,
    add_noise,
    euler_step,
    guided_velocity,
    mean_flat,
    sampling_timesteps,
    timestep_transform,
)

__all__ = [
    "IDDPM",
    "DPMSolver",
    "DiffusionTables",
    "NoiseScheduleVP",
    "RectifiedFlow",
    "add_noise",
    "euler_step",
    "guided_output",
    "guided_velocity",
    "mean_flat",
    "sample_dpm_solver",
    "sample_iddpm",
    "sampling_timesteps",
    "space_timesteps",
    "timestep_transform",
]
