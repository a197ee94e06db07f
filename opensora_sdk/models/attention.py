"""One attention function with a choice of kernel.

Layout: q [B, H, Nq, D], k and v [B, H, Nk, D] (the `scaled_dot_product_attention` layout),
output [B, H, Nq, D]. `key_padding_mask` [B, Nk] is boolean, True where a key is real; each
query row then attends only to the real keys of its batch row (the text tokens of its own
caption). Every backend computes softmax(q k^T / sqrt(D)) v with that mask; they differ only
in kernels and rounding.

* "sdpa" (default): `torch.nn.functional.scaled_dot_product_attention`; PyTorch picks a fused
  kernel (flash, memory-efficient or the CPU flash kernel), so no float32 score matrix of the
  full sequence is built by us.
* "flash": the `flash-attn` package (CUDA, fp16/bf16); padded keys are removed and the
  variable-length kernel is used.
* "xformers": `xformers.ops.memory_efficient_attention`, with a block-diagonal mask over
  packed keys exactly like the official cross-attention.

Optional packages are imported inside the function, only when asked for. Asking for one that
is not installed is an error, never a silent fallback to another kernel.
"""

from __future__ import annotations

import importlib.util

import torch
import torch.nn.functional as F

BACKENDS = ("sdpa", "flash", "xformers")
_PACKAGES = {"flash": "flash_attn", "xformers": "xformers"}
_PIP_NAMES = {"flash": "flash-attn", "xformers": "xformers"}


def available_backends() -> list[str]:
    """Backends whose package is installed (cheap: nothing is imported)."""
    return ["sdpa"] + [b for b, pkg in _PACKAGES.items() if importlib.util.find_spec(pkg) is not None]


def check_backend(backend: str) -> None:
    """Raise a clear error if `backend` is unknown or its package is not installed."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown attention backend {backend!r}; choose one of {list(BACKENDS)}")
    if backend != "sdpa" and importlib.util.find_spec(_PACKAGES[backend]) is None:
        raise ImportError(
            f"attention backend {backend!r} needs the {_PIP_NAMES[backend]!r} package, which is not "
            f"installed. Install it (`pip install {_PIP_NAMES[backend]}`) or use backend='sdpa'; "
            f"installed backends: {available_backends()}"
        )


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    key_padding_mask: torch.Tensor | None = None,
    backend: str = "sdpa",
) -> torch.Tensor:
    """softmax(q k^T / sqrt(D)) v over [B, H, N, D] tensors; see the module docstring."""
    check_backend(backend)
    if backend == "sdpa":
        mask = None if key_padding_mask is None else key_padding_mask[:, None, None, :]  # [B, 1, 1, Nk]
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    half = q.dtype in (torch.float16, torch.bfloat16)
    if not q.is_cuda or (backend == "flash" and not half):
        raise ValueError(
            f"attention backend {backend!r} runs on CUDA tensors"
            + (" in float16/bfloat16" if backend == "flash" else "")
            + f"; got {q.dtype} on {q.device}. Use backend='sdpa' here."
        )
    if backend == "flash":
        return _flash(q, k, v, key_padding_mask)
    return _xformers(q, k, v, key_padding_mask)


def _flash(q, k, v, key_padding_mask):
    from flash_attn import flash_attn_func, flash_attn_varlen_func

    B, H, Nq, D = q.shape
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # [B, N, H, D]
    if key_padding_mask is None:
        return flash_attn_func(q, k, v).transpose(1, 2)  # [B, H, Nq, D]
    lens = key_padding_mask.sum(1, dtype=torch.int32)  # [B]
    cu_k = F.pad(lens.cumsum(0, dtype=torch.int32), (1, 0))  # [B+1]
    cu_q = torch.arange(0, (B + 1) * Nq, Nq, dtype=torch.int32, device=q.device)  # [B+1]
    out = flash_attn_varlen_func(
        q.reshape(B * Nq, H, D),
        k[key_padding_mask],  # [sum(lens), H, D]
        v[key_padding_mask],
        cu_q,
        cu_k,
        Nq,
        int(lens.max()),
    )  # [B*Nq, H, D]
    return out.view(B, Nq, H, D).transpose(1, 2)


def _xformers(q, k, v, key_padding_mask):
    import xformers.ops as xops

    B, H, Nq, D = q.shape
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # [B, N, H, D]
    if key_padding_mask is None:
        return xops.memory_efficient_attention(q, k, v).transpose(1, 2)
    lens = key_padding_mask.sum(1).tolist()
    bias = xops.fmha.BlockDiagonalMask.from_seqlens(q_seqlen=[Nq] * B, kv_seqlen=lens)
    out = xops.memory_efficient_attention(
        q.reshape(1, B * Nq, H, D),
        k[key_padding_mask][None],  # [1, sum(lens), H, D]
        v[key_padding_mask][None],
        attn_bias=bias,
    )  # [1, B*Nq, H, D]
    return out.view(B, Nq, H, D).transpose(1, 2)
