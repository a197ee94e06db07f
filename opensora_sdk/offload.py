"""Block swap: run a stack of blocks on a device that holds only some of them.

`BlockSwap(blocks, device, resident=N)` keeps the first N blocks (in execution order) on
`device` and streams the others from host memory: just before a streamed block runs, its
weights are on the device; just after, they are dropped there (the host copy, pinned for
CUDA, is kept, so nothing is copied back); while block i runs, the next streamed block is
already being copied on a side CUDA stream (`CudaMover`: the copy waits for nothing, the
compute stream waits for the copy's event, and the freed memory is reused only after the
compute that read it). At most N + 2 blocks are on the device at once. On a CPU, or with
`prefetch=False` (sequential offload: each block moved in just before use), copies are
synchronous (`SyncMover`). The weights are the same tensors wherever they are, so the output
equals the plain path's bit for bit.

The swap hooks into the blocks' forward calls (`register_forward_pre_hook`), installed by
`attach()` and removed by `detach()`; `enter()` / `leave()` also move the rest of the model
(embedders, final layer, resident blocks) to the device and everything back home. The
placement (`opensora_sdk.placement.Placement`, `block_swap=N` / `offload="sequential"`)
does this around every use of the transformer; `transformer_blocks(model)` gives the
execution order of an Open-Sora transformer, `text_encoder_blocks(t5)` of T5's blocks.

A mover is any object with `load(block)` (start bringing the block's weights to the device),
`wait(block)` (the weights are usable now) and `unload(block)` (drop the device copy); tests
pass a fake one that records where each block is.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Sequence

import torch
from torch import nn

HOST = torch.device("cpu")


def _tensors(module: nn.Module) -> list[torch.Tensor]:
    return list(module.parameters()) + list(module.buffers())


def streamed_tensors(block: nn.Module) -> list[torch.Tensor]:
    """The tensors of `block` that stream: those of its submodules. The block's own parameters
    (STDiT3's `scale_shift_table`, 6 x C values) stay on the device with the model's other
    small layers, so code that reads them outside the block's forward (a step cache computing
    the first block's modulation) finds them there."""
    seen, out = set(), []
    for child in block.children():
        for t in _tensors(child):
            if id(t) not in seen:
                seen.add(id(t))
                out.append(t)
    return out


def move_module(module: nn.Module, device: torch.device, *, skip: Sequence[nn.Module] = (), non_blocking=False) -> None:
    """Point every parameter and buffer of `module` outside the subtrees `skip` at `device`
    (`.data` replaced: the same Parameter objects, so hooks and optimisers keep them)."""
    skipped = {id(t) for m in skip for t in _tensors(m)}
    for tensor in _tensors(module):
        if id(tensor) not in skipped and tensor.device != device:
            tensor.data = tensor.data.to(device, non_blocking=non_blocking)


def _same(tensor: torch.Tensor, host: torch.Tensor) -> bool:
    return tensor.device == host.device and tensor.data_ptr() == host.data_ptr()


class SyncMover:
    """Copies on the current stream: `load` moves the block's tensors to `device`, `unload`
    points them back at their host copies (kept; pinned when `pin` and the device is CUDA)."""

    def __init__(self, device, pin: bool | None = None):
        self.device = torch.device(device)
        self.pin = self.device.type == "cuda" if pin is None else pin
        self._host: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = {}

    def _host_copies(self, block: nn.Module) -> list[tuple[torch.Tensor, torch.Tensor]]:
        pairs = []
        for tensor in streamed_tensors(block):
            data = tensor.data
            if data.device != HOST:  # on the device already (e.g. left there by a `.to`): one copy home
                data = data.to(HOST)
            if self.pin and not data.is_pinned():
                try:
                    data = data.pin_memory()
                except RuntimeError:  # page-locked memory refused: plain copies move slower
                    pass
            tensor.data = data
            pairs.append((tensor, data))
        return pairs

    def _copy(self, block: nn.Module) -> None:
        pairs = self._host.get(id(block))
        if pairs is None or len(pairs) != len(streamed_tensors(block)) or any(not _same(t, h) for t, h in pairs):
            pairs = self._host[id(block)] = self._host_copies(block)  # new or changed layers (e.g. LoRA)
        for tensor, host in pairs:
            tensor.data = host.to(self.device, non_blocking=host.is_pinned())

    def load(self, block: nn.Module) -> None:
        if self.device != HOST:
            self._copy(block)

    def wait(self, block: nn.Module) -> None:
        pass

    def unload(self, block: nn.Module) -> None:
        if self.device == HOST:
            return
        for tensor, host in self._host.get(id(block), ()):
            tensor.data = host

    def release(self) -> None:
        """Forget the host copies (after the blocks went home for good)."""
        self._host.clear()


class CudaMover(SyncMover):
    """`SyncMover` with the copies on a side stream, overlapping the compute of earlier blocks."""

    def __init__(self, device, pin: bool | None = None):
        super().__init__(device, pin)
        self.stream = torch.cuda.Stream(self.device)
        self._events: dict[int, torch.cuda.Event] = {}

    def load(self, block: nn.Module) -> None:
        with torch.cuda.stream(self.stream):
            self._copy(block)
            event = torch.cuda.Event()
            event.record(self.stream)
        self._events[id(block)] = event

    def wait(self, block: nn.Module) -> None:
        event = self._events.pop(id(block), None)
        if event is None:
            return
        compute = torch.cuda.current_stream(self.device)
        compute.wait_event(event)
        for tensor, _ in self._host.get(id(block), ()):
            tensor.data.record_stream(compute)  # not reused by the side stream before compute read it


def default_mover(device, prefetch: bool = True):
    device = torch.device(device)
    return CudaMover(device) if device.type == "cuda" and prefetch else SyncMover(device)


class BlockSwap:
    """Stream `blocks` (in execution order) through `device`, keeping the first `resident`
    there (see the module docstring). `prefetch`: copy the next streamed block while the
    current one runs (needs CUDA to overlap; elsewhere it changes only the order of copies)."""

    def __init__(self, blocks: Sequence[nn.Module], device, resident: int, *, mover=None, prefetch: bool = True):
        blocks = list(blocks)
        check_block_swap(resident, len(blocks))
        self.blocks = blocks
        self.device = torch.device(device)
        self.resident = resident
        self.prefetch = prefetch
        self.mover = mover if mover is not None else default_mover(self.device, prefetch)
        self.streamed = list(range(resident, len(blocks)))
        self.loaded: set[int] = set()  # streamed blocks whose weights are (being) copied to the device
        self.running: int | None = None  # the block whose forward is under way
        self.borrowed: set[int] = set()  # streamed blocks loaded for a submodule called outside their forward
        self._handles = []

    # ---- hooks -------------------------------------------------------------------------------

    def attach(self) -> BlockSwap:
        if any(getattr(b, "_compiled_call_impl", None) is not None for b in self.blocks):
            raise ValueError("block swap and sequential offload hook every block, which torch.compile'd blocks do "
                             "not run: use either compile or block swap / sequential offload")
        if not self._handles:
            for i, block in enumerate(self.blocks):
                self._handles.append(block.register_forward_pre_hook(lambda _m, _a, i=i: self.before(i)))
                self._handles.append(block.register_forward_hook(lambda _m, _a, _o, i=i: self.after(i)))
            for i in self.streamed:  # a submodule called outside its block's forward (reused text K/V)
                for sub in self.blocks[i].modules():
                    if sub is not self.blocks[i] and _owns_tensors(sub):
                        self._handles.append(sub.register_forward_pre_hook(lambda _m, _a, i=i: self.borrow(i)))
                        self._handles.append(sub.register_forward_hook(lambda _m, _a, _o, i=i: self.give_back(i)))
        return self

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        for i in list(self.loaded):
            self._unload(i)

    def borrow(self, i: int) -> None:
        """A submodule of streamed block i is about to run: outside the block's forward, the
        block comes to the device for it (and leaves after, `give_back`)."""
        if self.running == i:
            return
        if i not in self.loaded:
            self._load(i)
            self.borrowed.add(i)
        self.mover.wait(self.blocks[i])

    def give_back(self, i: int) -> None:
        if i in self.borrowed and self.running != i:
            self.borrowed.discard(i)
            self._unload(i)

    def before(self, i: int) -> None:
        """Block i is about to run."""
        self.running = i
        self.borrowed.discard(i)  # its own forward keeps it until `after`
        if i == 0 and self.streamed and self.prefetch:  # a forward starts: the first streamed block
            self._load(self.streamed[0])
        if i < self.resident:
            return
        self._load(i)
        self.mover.wait(self.blocks[i])
        if self.prefetch and i + 1 < len(self.blocks):
            self._load(i + 1)

    def after(self, i: int) -> None:
        """Block i has run: a streamed block leaves the device."""
        self.running = None
        if i >= self.resident:
            self._unload(i)

    def _load(self, i: int) -> None:
        if i not in self.loaded:
            self.mover.load(self.blocks[i])
            self.loaded.add(i)

    def _unload(self, i: int) -> None:
        self.mover.unload(self.blocks[i])
        self.loaded.discard(i)

    # ---- the whole model ---------------------------------------------------------------------

    def enter(self, model: nn.Module) -> None:
        """`model` (holding the blocks) ready to run on the device: everything but the streamed
        blocks' submodules moved there, the hooks attached."""
        streamed = [sub for i in self.streamed for sub in self.blocks[i].children()]
        move_module(model, self.device, skip=streamed)
        for sub in streamed:  # a streamed block waits on the host between uses
            move_module(sub, HOST)
        self.attach()

    def leave(self, model: nn.Module, home=HOST) -> None:
        """Hooks removed, every weight of `model` on `home`."""
        self.detach()
        move_module(model, torch.device(home))
        self.mover.release()


def _owns_tensors(module: nn.Module) -> bool:
    return any(True for _ in module.parameters(recurse=False)) or any(True for _ in module.buffers(recurse=False))


def check_block_swap(blocks_on_device, total: int, name: str = "block_swap") -> None:
    """`blocks_on_device` must be an integer in [0, total]."""
    if isinstance(blocks_on_device, bool) or not isinstance(blocks_on_device, int) or not 0 <= blocks_on_device <= total:
        raise ValueError(
            f"{name}={blocks_on_device!r} is not allowed: the number of transformer blocks kept on the device must be "
            f"an integer from 0 to {total} (this transformer's blocks)"
        )


def block_count(transformer_config) -> int:
    """Blocks a forward of the transformer `transformer_config` describes runs: STDiT3 a spatial
    and a temporal block per depth, STDiT2 / STDiT one block per depth."""
    per_depth = 2 if type(transformer_config).__name__ == "STDiT3Config" else 1
    return per_depth * transformer_config.depth


def check_block_swap_value(blocks_on_device, name: str = "block_swap") -> None:
    """The model-independent half of `check_block_swap` (before any model is loaded)."""
    if isinstance(blocks_on_device, bool) or not isinstance(blocks_on_device, int) or blocks_on_device < 0:
        raise ValueError(
            f"{name}={blocks_on_device!r} is not allowed: the number of transformer blocks kept on the device must be "
            "an integer >= 0"
        )


def transformer_blocks(model: nn.Module) -> list[nn.Module]:
    """The blocks of an Open-Sora transformer in the order a forward runs them: STDiT3 alternates
    spatial and temporal blocks (spatial 0, temporal 0, spatial 1, ...); STDiT2 / STDiT have one
    `blocks` list."""
    if hasattr(model, "spatial_blocks") and hasattr(model, "temporal_blocks"):
        return [b for pair in zip(model.spatial_blocks, model.temporal_blocks) for b in pair]
    if hasattr(model, "blocks"):
        return list(model.blocks)
    raise ValueError(f"{type(model).__name__} has no transformer blocks to swap")


@contextmanager
def streamed_text_encoder(text_encoder, device, home=HOST) -> Iterator:
    """A `T5TextEncoder` encoding on `device` with its blocks streamed one at a time from the
    host (sequential offload; the token embedding and final norm sit on `device` meanwhile).
    Afterwards every weight is on `home` and the encoder counts as offloaded, as after
    `T5TextEncoder.on_device`."""
    device, model = torch.device(device), text_encoder.model
    swap = BlockSwap(text_encoder_blocks(model), device, 0, prefetch=device.type == "cuda")
    move_module(model, HOST)  # weights that sat elsewhere come home first
    text_encoder.device, text_encoder._offloaded = device, False  # encode runs here, moving nothing itself
    try:
        swap.enter(model)
        yield text_encoder
    finally:
        swap.leave(model, home)
        text_encoder._offloaded = True


def text_encoder_blocks(model: nn.Module) -> list[nn.Module]:
    """The blocks of a transformers T5 encoder (`encoder.block`)."""
    try:
        return list(model.encoder.block)
    except AttributeError:
        raise ValueError(f"{type(model).__name__} is not a T5 encoder: no encoder.block to stream") from None


__all__ = [
    "BlockSwap", "CudaMover", "SyncMover", "block_count", "check_block_swap", "check_block_swap_value", "default_mover",
    "move_module", "streamed_tensors", "text_encoder_blocks", "transformer_blocks",
]  # fmt: skip
