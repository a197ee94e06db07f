"""Exponential moving average of the trainable weights, kept on the side in float32 (spec 7.6).

    ema = decay * ema + (1 - decay) * theta        (decay 0.99 officially, every optimizer step)

computed as `ema.lerp_(theta, 1 - decay)` (the same value up to rounding). The shadow starts
equal to the model. Frozen parameters (requires_grad False) and names listed in `skip`
(officially `pos_embed`, a fixed table that STDiT3 recomputes instead of storing) are not
averaged: `full_state_dict` takes them, and every buffer, from the model as they are, so the
result is a complete state dict that `STDiT3.from_pretrained` loads.

Sharded parameters (FSDP2 DTensors) work unchanged: the shadow of a DTensor is a DTensor with
the same sharding, and `full_state_dict` gathers it (a collective: call it on every rank).
"""

from __future__ import annotations

from typing import Iterable, Mapping

import torch
from torch import nn


def _full(t: torch.Tensor) -> torch.Tensor:
    """A plain CPU tensor from a tensor or a DTensor (gathered)."""
    if hasattr(t, "full_tensor"):
        t = t.full_tensor()
    return t.detach().cpu()


class EMA:
    def __init__(self, model: nn.Module, decay: float = 0.99, skip: Iterable[str] = ("pos_embed",)):
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"ema decay={decay!r} is not allowed: expected a number in [0, 1] (official 0.99)")
        self.decay = float(decay)
        self.skip = tuple(skip)
        with torch.no_grad():
            self.shadow: dict[str, torch.Tensor] = {
                name: p.detach().float().clone()
                for name, p in model.named_parameters()
                if p.requires_grad and not self._skipped(name)
            }

    def _skipped(self, name: str) -> bool:
        return any(name == s or name.startswith(s + ".") for s in self.skip)

    @torch.no_grad()
    def update(self, model: nn.Module, decay: float | None = None) -> None:
        """One EMA step from the model's current (master, float32) weights."""
        weight = 1.0 - (self.decay if decay is None else decay)
        params = dict(model.named_parameters())
        for name, shadow in self.shadow.items():
            shadow.lerp_(params[name].detach().to(shadow.dtype), weight)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The averaged tensors only (shards stay shards), for resuming."""
        return dict(self.shadow)

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        missing = sorted(set(self.shadow) - set(state))
        unexpected = sorted(set(state) - set(self.shadow))
        if missing or unexpected:
            raise ValueError(f"EMA state does not match the model: missing {missing[:5]}, unexpected {unexpected[:5]}")
        with torch.no_grad():
            for name, shadow in self.shadow.items():
                value = state[name]
                if hasattr(shadow, "full_tensor") and not hasattr(value, "full_tensor"):
                    shadow.copy_(_redistribute_like(value, shadow))
                else:
                    shadow.copy_(value.to(shadow.device, shadow.dtype))

    def full_state_dict(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """A complete float32 CPU state dict: EMA tensors where averaged, else the model's.

        `model` is the unwrapped model. Collective under FSDP2 (gathers DTensors).
        """
        out = {}
        for name, tensor in model.state_dict().items():
            source = self.shadow.get(name, tensor)
            value = _full(source)
            out[name] = value.float() if value.is_floating_point() else value
        return out

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        """Write the averaged weights into `model` (e.g. to sample with the EMA)."""
        params = dict(model.named_parameters())
        for name, shadow in self.shadow.items():
            params[name].copy_(shadow.to(params[name].dtype))


def _redistribute_like(full: torch.Tensor, like) -> torch.Tensor:
    """Shard a full tensor like DTensor `like` (resuming a sharded EMA from a full save)."""
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(full.to(like.device, like.dtype), like.device_mesh, like.placements)
