"""Learning-rate factor per optimizer step: linear warm-up, constant, then an optional linear decay.

    factor(k) = (k + 1) / (warmup + 1)                  k < warmup            (official warm-up)
              = 1                                        warmup <= k < start
              = (max_steps - k) / decay_steps            start <= k            start = max_steps - decay_steps

The decay ("warmup-stable-decay") touches only the last `decay_steps` steps, so a run that
stopped in its constant phase and resumes with a larger `max_steps` follows exactly the
schedule of one run with that `max_steps`. decay_steps = 0 keeps the official constant rate.
"""

from __future__ import annotations


def lr_factor(step: int, *, warmup_steps: int, max_steps: int, decay_steps: int = 0) -> float:
    """The multiplier of the base learning rate at optimizer step `step` (0-based)."""
    factor = min(1.0, (step + 1) / (warmup_steps + 1)) if warmup_steps else 1.0
    if decay_steps:
        factor = min(factor, max(0.0, (max_steps - step) / decay_steps))
    return factor
