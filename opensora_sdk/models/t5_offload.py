"""T5's weights between encodes: offload to a kept (pinned) host copy, onload, `on_device`.

`HostCopyOffload` is the memory half of `T5TextEncoder` (a mixin). It uses the encoder's
`model`, `device`, `offload_device`, `_offloaded`, `_host_copy`, `offload_count` and
`onload_count`, which `T5TextEncoder.__init__` sets.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch


class HostCopyOffload:
    """Offloading for a frozen model: the weights wait in a host copy made once and reused."""

    @property
    def is_offloaded(self) -> bool:
        return self._offloaded

    def _weights(self) -> list[tuple[str, torch.Tensor]]:
        # named_* skip repeats, so the tied shared / embed_tokens table appears once
        return list(self.model.named_parameters()) + list(self.model.named_buffers())

    def offload(self) -> None:
        """Free the weights on `device`; they wait in a host copy on `offload_device`.

        T5 is frozen, so the host copy is made once (pinned when the accelerator is CUDA)
        and kept: later offloads only drop the accelerator's tensors (no transfer), and
        `onload` copies them back. The price is host memory for one copy of the weights
        while T5 is resident too. Offloading to the device T5 runs on changes nothing.
        """
        if self._offloaded:
            return
        weights = self._weights()
        if not all(_is_on(t, self.offload_device) for _, t in weights):
            if not self._host_copy_fits(weights):
                self._host_copy = {name: self._to_host(t) for name, t in weights}
            for name, tensor in weights:
                tensor.data = self._host_copy[name]
            _empty_cache(self.device)
        self._offloaded = True
        self.offload_count += 1

    def onload(self) -> None:
        """Bring the weights back to `device` (a no-op when they are there)."""
        if not self._offloaded:
            return
        self._move_weights(self.device)
        self._offloaded = False
        self.onload_count += 1

    @contextmanager
    def on_device(self, device: torch.device | str, home: torch.device | str = "cpu"):
        """T5 runs on `device` inside the block; its weights wait on `home` after it.

        On entry the weights move to `device` from wherever they are (the kept host copy, or
        resident on another device); `encode` inside the block returns its tensors on `device`.
        On leaving, also when the block raises, the weights go back to the host copy on `home`
        (made once, pinned for CUDA, and reused: later exits copy nothing) and the
        accelerator's cache is emptied. A different `home` than before drops the old copy.
        Afterwards `is_offloaded` is True and `device` stays `device`.

            with text_encoder.on_device("cuda"):
                y, mask = text_encoder.encode(prompts)
        """
        device, home = torch.device(device), torch.device(home)
        if home != self.offload_device:
            self._host_copy, self.offload_device = None, home
        was_offloaded = self._offloaded
        self.device, self._offloaded = device, False  # from here on, the exit puts every weight home
        try:
            if device != home:
                self._adopt_host_copy()
            self._move_weights(device)
            self.onload_count += was_offloaded
            yield self
        finally:
            self.offload()
            _empty_cache(device)

    def _move_weights(self, device: torch.device) -> None:
        for _, tensor in self._weights():
            if not _is_on(tensor, device):
                tensor.data = tensor.data.to(device, non_blocking=device.type == "cuda" and tensor.is_pinned())

    def _adopt_host_copy(self) -> None:
        """When the weights sit on `offload_device` with no host copy yet, make them the host
        copy (pinned in place for CUDA), so that leaving `device` later copies nothing back."""
        weights = self._weights()
        if self._host_copy_fits(weights) or not all(_is_on(t, self.offload_device) for _, t in weights):
            return
        self._host_copy = {}
        for name, tensor in weights:
            self._host_copy[name] = tensor.data = self._to_host(tensor)

    def _host_copy_fits(self, weights) -> bool:
        """Whether the kept host copy still matches the weights (a `model.to(dtype)` voids it)."""
        copy = self._host_copy
        return copy is not None and all(
            name in copy and copy[name].shape == t.shape and copy[name].dtype == t.dtype for name, t in weights
        )

    def _to_host(self, tensor: torch.Tensor) -> torch.Tensor:
        pin = self.device.type == "cuda" and self.offload_device.type == "cpu"
        if pin:
            try:
                return torch.empty_like(tensor, device="cpu", pin_memory=True).copy_(tensor)
            except RuntimeError:  # page-locked memory refused: a plain copy moves slower
                pass
        if _is_on(tensor, self.offload_device):
            return tensor.detach()  # already there: frozen weights need no second copy
        return tensor.detach().to(self.offload_device, copy=True)


def _is_on(tensor: torch.Tensor, device: torch.device) -> bool:
    """Whether `tensor` lives on `device` ("cuda" means the current CUDA device; "cpu:0" is
    another device than "cpu", as the tests use it to stand in for an accelerator)."""
    here = tensor.device
    if here.type != device.type:
        return False
    if device.index is None:
        return device.type != "cuda" or here.index == torch.cuda.current_device()
    return here.index == device.index


def _empty_cache(device: torch.device) -> None:
    """Return the accelerator's freed blocks to the driver (no-op on the CPU)."""
    if device.type == "cuda" and torch.cuda.is_available():
        torch.cuda.empty_cache()
    elif device.type == "mps" and torch.backends.mps.is_available():
        torch.mps.empty_cache()
