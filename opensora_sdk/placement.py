"""Placement: where each model computes and where it waits between uses.

The orchestration asks a `Placement` for a model before each stage and gives it back after
(`with placement.use(model, kind): ...`); the model goes home even when the stage raises.
Kinds are "transformer", "vae" and "text_encoder". The default policy:

* every model computes on `device`; weights wait on the host (`HOST`);
* T5 leaves `device` right after encoding, always (the official code keeps a 19 GB T5
  resident); its host copy is kept, so the way back costs one copy (see `T5TextEncoder`);
* `offload=None`: STDiT3 and the VAE stay on `device` once used (fastest);
  `offload="model"`: each goes home after every use, one large model on the device at a time;
  `offload="sequential"` (the smallest cards): as "model", and STDiT3's and T5's blocks come
  to the device one at a time, just before each runs (`opensora_sdk.offload`);
* `block_swap=N`: STDiT3's first N blocks (execution order: spatial 0, temporal 0, spatial 1,
  ...) and its small layers sit on `device`; the other blocks stream from pinned host memory,
  each copied while the block before it computes (`opensora_sdk.offload.BlockSwap`). T5, which
  moves to the device once per call anyway, then streams all its blocks the same way (the same
  bytes copied, two blocks on the device instead of 24). Combines with `offload=None` (the
  resident part stays between uses) or "model".

The diffusers names map onto this one policy (see `OpenSoraPipeline`):
`enable_model_cpu_offload()` is offload="model", `enable_sequential_cpu_offload()` is
offload="sequential", `enable_block_swap(n)` is block_swap=n.

ComfyUI's node pack subclasses it (`comfy_nodes.placement.ComfyPlacement`) to take the
devices from ComfyUI's model management, free memory before a move and never keep a model.
Dtype is not placement: models apply their own precision rules in `.to()` (STDiT3 keeps its
RoPE table in float32, a float16 VAE keeps its spatial decoder in float32).
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch

HOST = torch.device("cpu")
KINDS = ("transformer", "vae", "text_encoder")
OFFLOAD_CHOICES = (None, "model", "sequential")


def default_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else HOST


def default_dtype(device: torch.device) -> torch.dtype:
    """bfloat16 on accelerators (the official inference dtype), float32 on the CPU."""
    return torch.float32 if torch.device(device).type == "cpu" else torch.bfloat16


def check_device(device, name: str = "device") -> torch.device:
    """`device` as a torch.device that exists on this machine; ValueError naming it otherwise."""
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"{name} {device!r} is not a device: use cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            why = "this torch has no CUDA support" if torch.version.cuda is None else "no CUDA GPU is visible"
            raise ValueError(f"{name} {str(device)!r}: CUDA is not available ({why}); use cpu or auto")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"{name} {str(device)!r}: only {torch.cuda.device_count()} CUDA device(s) are visible")
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"{name} {str(device)!r}: Apple MPS is not available on this machine; use cpu or auto")
    elif device.type not in ("cpu", "cuda", "mps"):
        raise ValueError(f"{name} {str(device)!r}: only cpu, cuda and mps devices are supported")
    return device


def normalize_device(device) -> torch.device:
    """"cuda" -> "cuda:0", as tensors report it (so device comparisons hold)."""
    device = torch.device(device)
    if device.type != "cpu" and device.index is None:
        device = torch.empty(0, device=device).device
    return device


def module_device(module: torch.nn.Module) -> torch.device:
    return next(module.parameters()).device


def _check_kind(kind: str) -> None:
    if kind not in KINDS:
        raise ValueError(f"kind={kind!r} is not allowed: choose one of {list(KINDS)}")


class Placement:
    """The SDK's memory policy (see the module docstring). `device`: where models compute."""

    def __init__(self, device=None, offload: str | None = None, block_swap: int | None = None):
        if offload not in OFFLOAD_CHOICES:
            raise ValueError(f"offload={offload!r} is not allowed: choose one of {list(OFFLOAD_CHOICES)}")
        if block_swap is not None:
            from opensora_sdk.offload import check_block_swap_value

            check_block_swap_value(block_swap)
            if offload == "sequential":
                raise ValueError("block_swap and offload='sequential' exclude each other: sequential offload "
                                 "already streams every block (block_swap=0 with the model leaving after use)")
        self.device = normalize_device(check_device(device) if device is not None else default_device())
        self.offload = offload
        self.block_swap = block_swap
        self._swaps: dict[int, object] = {}  # id(transformer) -> its BlockSwap

    # ---- the policy (override these) ---------------------------------------------------------

    def compute_device(self, kind: str) -> torch.device:
        return self.device

    def home(self, kind: str) -> torch.device:
        """Where a model of `kind` waits between uses."""
        return HOST

    def keeps(self, kind: str) -> bool:
        """Whether a model of `kind` stays on its compute device after a use."""
        return kind != "text_encoder" and self.offload is None

    def streamed_blocks(self, kind: str) -> int | None:
        """Blocks of a model of `kind` kept on the device while the others stream (None: the
        whole model moves)."""
        if kind == "transformer" and self.block_swap is not None:
            return self.block_swap
        if kind == "text_encoder" and self.block_swap is not None:
            return 0  # T5 comes to the device once per call anyway: streamed, it needs 2 blocks there
        if kind in ("transformer", "text_encoder") and self.offload == "sequential":
            return 0
        return None

    def make_room(self, num_bytes: int, device: torch.device) -> None:
        """Called before `num_bytes` of weights move to `device` (ComfyUI frees its models)."""

    def release(self) -> None:
        """Called after weights left an accelerator."""
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    # ---- moving models -----------------------------------------------------------------------

    @contextmanager
    def use(self, model, kind: str) -> Iterator:
        """`model` (a torch module, or a `T5TextEncoder` for kind "text_encoder") on its compute
        device inside the block; home afterwards, also on error, unless the policy keeps it."""
        _check_kind(kind)
        device = self.compute_device(kind)
        if self.streamed_blocks(kind) is not None:
            with self._streamed(model, kind, device) as streamed:
                yield streamed
            return
        if kind == "text_encoder":
            self.make_room(_bytes(model.model), device)
            try:
                with model.on_device(device, home=self.home(kind)):
                    yield model
            finally:
                self.release()
            return
        if module_device(model) != device:
            self.make_room(_bytes(model), device)
            model.to(device)
        try:
            yield model
        finally:
            if not self.keeps(kind):
                if module_device(model) != self.home(kind):
                    model.to(self.home(kind))
                self.release()

    @contextmanager
    def _streamed(self, model, kind: str, device: torch.device) -> Iterator:
        """A model whose blocks stream through `device` (block swap, sequential offload)."""
        from opensora_sdk import offload

        if kind == "text_encoder":
            try:
                with offload.streamed_text_encoder(model, device, home=self.home(kind)) as te:
                    yield te
            finally:
                self.release()
            return
        swap = self._swaps.get(id(model))
        if swap is None or swap.device != device:
            resident = self.streamed_blocks(kind)
            swap = offload.BlockSwap(offload.transformer_blocks(model), device, resident,
                                     prefetch=self.offload != "sequential")
            self._swaps = {id(model): swap}
        streamed = sum(t.numel() * t.element_size() for i in swap.streamed
                       for t in offload.streamed_tensors(swap.blocks[i]))
        self.make_room(_bytes(model) - streamed, device)
        swap.enter(model)
        try:
            yield model
        finally:
            if self.keeps(kind):
                swap.detach()
            else:
                swap.leave(model, self.home(kind))
                self.release()

    def __repr__(self) -> str:
        swap = "" if self.block_swap is None else f", block_swap={self.block_swap}"
        return f"{type(self).__name__}(device={self.device}, offload={self.offload!r}{swap})"


def _bytes(module: torch.nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in list(module.parameters()) + list(module.buffers()))


__all__ = ["HOST", "OFFLOAD_CHOICES", "Placement", "check_device", "default_device", "default_dtype", "module_device", "normalize_device"]
