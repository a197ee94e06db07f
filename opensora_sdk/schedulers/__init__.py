"""Noise schedules and samplers: pure functions of tensors."""

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
    "RectifiedFlow",
    "add_noise",
    "euler_step",
    "guided_velocity",
    "mean_flat",
    "sampling_timesteps",
    "timestep_transform",
]
