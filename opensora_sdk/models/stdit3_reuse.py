"""Exact reuse of the STDiT3 work that is the same at every step of one sampling loop.

A sampling loop calls the transformer K times with new latents x_t and timesteps t, but with
the same text, frame rate and size. What depends only on those is computed by the first call
and reused by the others (`StepConditions`):

    text        y_embedder(y) of the prompts and of the null rows (one CFG batch), the packing
                of the valid tokens (L' = the longest caption) and their key mask [B, L'],
                the mask checks (and their host syncs)
    per block   the text's cross-attention keys and values, 2 x [B, H, L', D] for every
                spatial and every temporal block
    size, fps   the fps embedding f [B, C]; the position table [1, S, C] (and the
                height / width it reads from the device); the RoPE cos / sin [T, D]
    t = 0       t0 = t_embedder(0) + f and t0_mlp = t_block(t0) [B, 6C], computed only when
                a frame mask has condition frames

The design is an explicit scope that the sampling loop opens once per clip:

    with transformer.step_invariants():
        for t in timesteps:
            v = transformer(x_t, t, y=y, mask=mask, fps=fps, height=height, width=width)

Inside the scope a forward looks its invariants up under a key made of the *identity* of its
y, mask, fps, height and width arguments (with the in-place version counter of each tensor),
the batch and latent size, the dtype and the device. A miss computes them with the model's own
code and replaces the entry (one entry: a loop has one text). The entry holds the key's
tensors, so their identities cannot pass to other tensors while it lives. Identity costs
nothing per step and needs no device sync; a caller that builds a new y for every step gets a
miss every step, which is correct, only not faster. The sampling loop builds its [cond; null]
batch once per clip, so every step after the first hits.

Rules that keep it exact and out of training:
  * reuse happens only inside a scope, with `set_step_reuse(True)` (the default), in eval
    mode, with autograd off (no_grad / inference_mode) and without `force_drop_ids`;
    anything else runs the plain path, which computes the same `StepConditions` per call;
  * the reused tensors are the ones the plain path would compute (same modules, same inputs,
    same shapes), so outputs are bitwise equal to the plain path;
  * the weights must not change inside a scope (apply LoRA, fuse, load between generations);
    the entry is dropped when the scope closes;
  * an inference tensor has no version counter: an in-place change to one inside a scope is
    not seen (the sampling loop never does that);
  * an x_mask that is all True marks no condition frame: it is the same (bitwise) as none,
    and the reuse path drops it, so the t = 0 branch runs only when it changes something.

Memory: the scope keeps the keys and values of every block, 2 * 2*depth * B * L' * C numbers
(STDiT3-XL/2 with B = 2 and 300 tokens: 310 MB in float32, 155 MB in bfloat16).

Sequence parallelism: the text is not sharded, so every rank keeps its own copy and reuses it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import Tensor


@dataclass
class StepConditions:
    """What an STDiT3 forward needs besides x and t (all step-invariant; see the module docstring).

    y [B, L', C] text tokens, y_valid [B, L'] bool key mask or None, f [B, C] fps embedding,
    pos [1, S, C] position table, rope (cos, sin) each [T, D], text_kv per depth
    ((k, v) spatial, (k, v) temporal) each [B, H, L', D] or None (the blocks compute them).
    `t0(...)` gives (t0 [B, C], t0_mlp [B, 6C]), computed at the first need and kept.
    """

    y: Tensor
    y_valid: Tensor | None
    f: Tensor
    pos: Tensor
    rope: tuple[Tensor, Tensor]
    text_kv: list | None = None
    _t0: tuple[Tensor, Tensor] | None = field(default=None, repr=False)

    def t0(self, compute: Callable[[], tuple[Tensor, Tensor]]) -> tuple[Tensor, Tensor]:
        if self._t0 is None:
            self._t0 = compute()
        return self._t0


def _identity(value: Any) -> tuple:
    """A key part: a tensor by identity and version, a number or None by value, else by repr."""
    if isinstance(value, Tensor):
        return (id(value), None if value.is_inference() else value._version)
    if value is None or isinstance(value, (int, float, bool)):
        return ("value", value)
    return ("repr", repr(value))


class StepInvariants:
    """The open scope of `STDiT3.step_invariants()`: one `StepConditions` entry and its key.

    `hits` and `misses` count the lookups (a loop of K steps: 1 miss, K - 1 hits).
    """

    def __init__(self):
        self.hits = 0
        self.misses = 0
        self._key: tuple | None = None
        self._held: tuple = ()  # the key's objects, so that their identities stay theirs
        self._entry: StepConditions | None = None

    def lookup(self, args: tuple, shape: tuple, compute: Callable[[], StepConditions]) -> StepConditions:
        """The entry for `args` (y, mask, fps, height, width) and `shape` (batch, latent size,
        dtype, device), from `compute()` on a miss."""
        key = (tuple(_identity(a) for a in args), shape)
        if self._entry is not None and key == self._key:
            self.hits += 1
            return self._entry
        self.misses += 1
        self._entry = None  # free the old entry before computing the new one
        self._entry, self._key, self._held = compute(), key, args
        return self._entry

    def clear(self) -> None:
        self._entry, self._key, self._held = None, None, ()

    def __repr__(self) -> str:
        return f"StepInvariants(hits={self.hits}, misses={self.misses})"


def reuse_allowed(model: torch.nn.Module, force_drop_ids) -> bool:
    """Whether a forward may reuse (see the rules in the module docstring)."""
    return not model.training and not torch.is_grad_enabled() and force_drop_ids is None


__all__ = ["StepConditions", "StepInvariants", "reuse_allowed"]
