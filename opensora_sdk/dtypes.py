"""Dtype names: a torch dtype or a name ("fp32", "bf16", "fp16", "float32", ...) -> the torch dtype.

torch is imported at module level: the command line imports this module only inside the
functions that run a model, never while parsing (`opensora --help` stays torch-free).
"""

from __future__ import annotations

import torch

DTYPES = {
    "fp32": torch.float32,
    "float32": torch.float32,
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp16": torch.float16,
    "float16": torch.float16,
}


def parse_dtype(value, field: str = "dtype", *, allow_none: bool = False) -> torch.dtype | None:
    """torch.float32 / bfloat16 / float16, given as a dtype or a name ("fp32", "bf16", ...).

    `field` names the argument in the ValueError; `allow_none` lets None through (e.g.
    `vae_dtype=None`: the VAE follows the pipeline's dtype).
    """
    if (value is None and allow_none) or (isinstance(value, torch.dtype) and value in DTYPES.values()):
        return value
    if isinstance(value, str) and value.lower() in DTYPES:
        return DTYPES[value.lower()]
    raise ValueError(
        f"{field}={value!r} is not allowed: choose torch.float32, torch.bfloat16, torch.float16 "
        f"or one of {sorted(DTYPES)}" + (", or None" if allow_none else "")
    )


__all__ = ["DTYPES", "parse_dtype"]
