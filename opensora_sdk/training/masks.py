"""Frame-mask augmentation (spec 7.4): which latent frames are clean conditioning frames.

A mask is [T'] bool over latent frames, True = generate (noised, in the loss), False = clean
condition (kept at x0, modulated with t = 0, left out of the loss). Per sample one type is
drawn against the cumulative ratios in config order; the remainder is "identity" (no
conditioning). Types (q = T' // 4, quarter types need T' >= 4):

    identity           nothing conditioned
    quarter_random     k ~ U{1..q} consecutive frames at a random position
    quarter_head       the first k
    quarter_tail       the last k
    quarter_head_tail  the first k and the last k (same k)
    image_random       one random frame
    image_head         frame 0
    image_tail         the last frame
    image_head_tail    the first and the last frame
    intepolate         every 2nd frame from a random start 0 or 1 (official spelling;
                       "interpolate" is accepted as the same key)
    (v1.1 spelled every key with a "mask_" prefix and identity "mask_no"; both are accepted)
    random             r ~ U(0.1, 0.9); a frame is generated iff rand > r; if none is,
                       the last frame is
    chunk_head         (ours, not official) the first CHUNK_LATENTS = 5 latent frames, one
                       17-frame chunk of the v1.2 VAE: what a long video's next loop is given
                       (`loop` carries the previous clip's last chunk); needs T' > 5

A CSV row may name its own type (the dataset's optional `frame_mask` column, e.g. the later
windows of a long scene that only make sense as continuations): `get_masks(x, kinds)` then
builds that type for the row instead of drawing one.

For T' <= 1 every mask is all True. One guard the official code lacks: a mask with no
generated frame (image_head_tail at T' = 2) becomes all True, because the loss averages over
generated frames and would divide by zero.

Draws come from the generator's own `random.Random(seed)`, so a run's masks are reproducible
and resumable (`state_dict` / `load_state_dict`).
"""

from __future__ import annotations

import random
from typing import Mapping

import torch

MASK_TYPES = (
    "identity",
    "quarter_random",
    "quarter_head",
    "quarter_tail",
    "quarter_head_tail",
    "image_random",
    "image_head",
    "image_tail",
    "image_head_tail",
    "intepolate",
    "random",
    "chunk_head",
)
CHUNK_LATENTS = 5  # latent frames of one 17-frame chunk of the v1.2 VAE
# v1.1 spelled the keys with a "mask_" prefix and called identity "mask_no" (spec 9.1).
_ALIASES = {"interpolate": "intepolate", "mask_no": "identity", **{f"mask_{k}": k for k in MASK_TYPES if k != "identity"}}


def _stage(random_, intepolate, quarter, image_random, image_head, image_tail, image_head_tail):
    return {
        "random": random_,
        "intepolate": intepolate,
        "quarter_random": quarter,
        "quarter_head": quarter,
        "quarter_tail": quarter,
        "quarter_head_tail": quarter,
        "image_random": image_random,
        "image_head": image_head,
        "image_tail": image_tail,
        "image_head_tail": image_head_tail,
    }


# The official ratios of the v1.2 training configs (identity = 1 - sum).
MASK_RATIO_PRESETS: dict[str, dict[str, float]] = {
    "stage1": _stage(0.05, 0.005, 0.005, 0.025, 0.05, 0.025, 0.025),  # identity 0.80
    "stage2": _stage(0.05, 0.005, 0.005, 0.025, 0.05, 0.025, 0.025),  # identity 0.80
    "stage3": _stage(0.01, 0.002, 0.002, 0.0, 0.22, 0.005, 0.005),  # identity 0.75
    "adapt": {"random": 0.2},
    # v1.1 training (spec 9.1): mask_no 0.75 first, then the quarter and image types.
    "v1.1": {
        "identity": 0.75,
        "quarter_random": 0.025, "quarter_head": 0.025, "quarter_tail": 0.025, "quarter_head_tail": 0.05,
        "image_random": 0.025, "image_head": 0.025, "image_tail": 0.025, "image_head_tail": 0.05,
    },  # fmt: skip
}


def check_mask_type(kind: str) -> str:
    """A mask type name (or an alias) -> its canonical name; ValueError naming the allowed ones."""
    name = _ALIASES.get(kind, kind)
    if name not in MASK_TYPES:
        raise ValueError(f"mask type {kind!r} is unknown; allowed: {list(MASK_TYPES)}")
    return name


def resolve_mask_ratios(value) -> dict[str, float] | None:
    """A preset name, a {type: ratio} mapping, or None (no masking) -> checked ratios or None."""
    if value is None:
        return None
    if isinstance(value, str):
        if value not in MASK_RATIO_PRESETS:
            raise ValueError(f"mask_ratios={value!r} is not allowed: use a preset {sorted(MASK_RATIO_PRESETS)}, a mapping or null")
        return dict(MASK_RATIO_PRESETS[value])
    if not isinstance(value, Mapping):
        raise ValueError(f"mask_ratios={value!r} is not allowed: use a preset {sorted(MASK_RATIO_PRESETS)}, a mapping or null")
    ratios = {}
    for key, ratio in value.items():
        name = _ALIASES.get(key, key)
        if name not in MASK_TYPES:
            raise ValueError(f"mask_ratios: type {key!r} is unknown; allowed: {list(MASK_TYPES)}")
        if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0.0 <= ratio <= 1.0:
            raise ValueError(f"mask_ratios[{key!r}]={ratio!r} is not allowed: expected a number in [0, 1]")
        ratios[name] = float(ratio)
    total = sum(ratios.values())
    if total > 1.0 + 1e-9:
        raise ValueError(f"mask_ratios sum to {total:.4f} > 1: {ratios}; the remainder (identity) cannot be negative")
    return ratios


class MaskGenerator:
    """Draws frame masks with the given ratios (a preset name or a mapping). See module docstring."""

    def __init__(self, mask_ratios, seed: int = 0):
        self.mask_ratios = resolve_mask_ratios(mask_ratios) or {}
        self.rng = random.Random(seed)

    def choose(self) -> str:
        """One mask type, by a uniform draw against the cumulative ratios in config order."""
        u = self.rng.random()
        cumulative = 0.0
        for name, ratio in self.mask_ratios.items():
            cumulative += ratio
            if u < cumulative:
                return name
        return "identity"

    def make_mask(self, kind: str, num_frames: int) -> torch.Tensor:
        """The [num_frames] bool mask of type `kind` (True = generate)."""
        kind = check_mask_type(kind)
        T, rng = num_frames, self.rng
        mask = torch.ones(T, dtype=torch.bool)
        if T <= 1 or kind == "identity":
            return mask
        q = T // 4
        if kind.startswith("quarter"):
            if T < 4:
                return mask
            k = rng.randint(1, q)
            if kind == "quarter_random":
                start = rng.randint(0, T - k)
                mask[start : start + k] = False
            if kind in ("quarter_head", "quarter_head_tail"):
                mask[:k] = False
            if kind in ("quarter_tail", "quarter_head_tail"):
                mask[-k:] = False
        elif kind == "image_random":
            mask[rng.randint(0, T - 1)] = False
        elif kind == "image_head":
            mask[0] = False
        elif kind == "image_tail":
            mask[-1] = False
        elif kind == "image_head_tail":
            mask[0] = mask[-1] = False
        elif kind == "intepolate":
            mask[rng.randint(0, 1) :: 2] = False
        elif kind == "chunk_head":
            if T > CHUNK_LATENTS:
                mask[:CHUNK_LATENTS] = False
        elif kind == "random":
            r = rng.uniform(0.1, 0.9)
            mask = torch.tensor([rng.random() > r for _ in range(T)], dtype=torch.bool)
            if not bool(mask.any()):
                mask[-1] = True
        if not bool(mask.any()):  # nothing left to generate: the loss would be 0/0
            mask[:] = True
        return mask

    def get_mask(self, num_frames: int) -> torch.Tensor:
        return self.make_mask(self.choose(), num_frames)

    def get_masks(self, x: torch.Tensor, kinds=None) -> torch.Tensor:
        """Masks [B, T'] bool for latents x [B, C, T', H, W], on x's device. `kinds`: per
        sample a mask type its data row names, or "" / None to draw one by the ratios."""
        kinds = kinds if kinds is not None else [None] * x.shape[0]
        if len(kinds) != x.shape[0]:
            raise ValueError(f"get_masks: {len(kinds)} mask kinds for a batch of {x.shape[0]}")
        T = x.shape[2]
        return torch.stack([self.make_mask(k, T) if k else self.get_mask(T) for k in kinds]).to(x.device)

    def state_dict(self) -> dict:
        version, internal, gauss = self.rng.getstate()
        return {"version": version, "internal": list(internal), "gauss": gauss}

    def load_state_dict(self, state: Mapping) -> None:
        self.rng.setstate((state["version"], tuple(state["internal"]), state["gauss"]))
