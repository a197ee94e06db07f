"""STDiT3 with its tokens sharded over a process group (sequence parallelism, spec section 8).

`STDiT3.set_sequence_parallel_group(group, mode)` attaches a `SequenceParallel` to a model;
its forward then runs the block stack and the final layer on this rank's shard, and gathers
the (32-channel) final-layer output, so every rank returns the full prediction. Every rank of
the group must call the model with the same inputs.

Shapes: global B T S C, N = T*S; P ranks; padded S_pad = P*ceil(S/P) (T_pad likewise), the
local shard holds S_l = S_pad/P spatial positions (or T_l = T_pad/P frames), M = T*S_l local
tokens.

Modes
  "ulysses" (DeepSpeed-Ulysses, as officially): tokens [B, T, S_l, C] throughout. Spatial
      attention: qkv [B*T, S_l, 3, H, D] --all_to_all--> [B*T, S_pad, 3, H/P, D] (all tokens,
      H/P heads) -> attention with a key mask over the S padding -> [B*T, S_pad, H/P, D]
      --all_to_all--> [B*T, S_l, H, D] -> proj. Temporal attention, cross-attention (token-wise:
      right for any batch, unlike the official sharded cross-attention) and the MLP run on
      the shard. Needs H divisible by P.
  "allgather_kv": as "ulysses" but spatial attention keeps all heads: each rank's queries
      attend to the keys/values of every rank (all-gather, backward reduce-scatter). Right for
      any head count; sends 2C*S_l*(P-1) per rank and layer instead of 4C*S_l*(P-1)/P.
  "dsp" (Dynamic Sequence Parallelism, VideoSys): spatial blocks hold whole frames
      [B, T_l, S, C] (spatial attention local), temporal blocks hold whole time series
      [B, T_pad, S_l, C] (temporal attention local, key mask over the T padding); one
      all_to_all of the C-wide activation switches between them: 2C per block pair instead of
      Ulysses' 4C per spatial block. Any head count.
  "auto": "ulysses" when P divides H, else "allgather_kv".

Padding (S or T not divisible by P): zero tokens are appended, masked as keys wherever they
could be attended to, and dropped on the gather; no real token depends on them, so outputs
and gradients are those of the unpadded model.

Gradients: shard "down", gather "up" (spec 8), so the ranks' parameter gradients average to
the single-process gradient (DDP's all-reduce does it; else `distributed.average_gradients`).
"""

from __future__ import annotations

import torch

from opensora_sdk.distributed import (
    all_gather,
    all_to_all,
    gather_forward_split_backward,
    group_size,
    split_forward_gather_backward,
)
from opensora_sdk.models.attention import attention

MODES = ("auto", "ulysses", "allgather_kv", "dsp")


def _pad_to(x: torch.Tensor, dim: int, size: int) -> torch.Tensor:
    """Zero-pad `dim` of x at the end up to `size`."""
    extra = size - x.shape[dim]
    if extra == 0:
        return x
    shape = list(x.shape)
    shape[dim] = extra
    return torch.cat([x, x.new_zeros(shape)], dim)


def _key_mask(real: int, padded: int, device) -> torch.Tensor | None:
    """[padded] bool, True for the first `real` positions; None when nothing is padded."""
    return None if real == padded else torch.arange(padded, device=device) < real


class SequenceParallel:
    """How STDiT3 shards its tokens over `group` (see the module docstring for the modes)."""

    def __init__(self, group, num_heads: int, mode: str = "auto"):
        if mode not in MODES:
            raise ValueError(f"sequence-parallel mode={mode!r} is not known; choose one of {list(MODES)}")
        P = group_size(group)
        if mode == "auto":
            mode = "ulysses" if num_heads % P == 0 else "allgather_kv"
        if mode == "ulysses" and num_heads % P:
            raise ValueError(
                f"mode='ulysses' needs num_heads={num_heads} divisible by the {P} ranks of the group; "
                f"use mode='allgather_kv' or 'dsp' (any head count), or a group size dividing {num_heads}"
            )
        self.group, self.size, self.mode, self.num_heads = group, P, mode, num_heads

    def __deepcopy__(self, memo):  # a model copy shares the process group
        return self

    def __repr__(self) -> str:
        return f"SequenceParallel(size={self.size}, mode={self.mode!r})"

    # ---- the model's token path ---------------------------------------------------------------

    def forward_tokens(self, model, x, t, y, y_valid, t_mlp, T, S, x_mask=None, t0=None, t0_mlp=None, rope=None,
                       text_kv=None):
        """Tokens [B, N, C] after patch + position embedding -> final-layer output [B, N, K].
        text_kv: the text's per-block keys and values (`STDiT3.text_keys_values`; the text is
        not sharded, so they are the same on every rank) or None."""
        kv = [(None, None)] * len(model.spatial_blocks) if text_kv is None else text_kv
        if self.mode == "dsp":
            return self._forward_dsp(model, x, t, y, y_valid, t_mlp, T, S, x_mask, t0, t0_mlp, kv)
        B, N, C = x.shape
        P, g = self.size, self.group
        S_pad = -(-S // P) * P
        S_l = S_pad // P
        x = _pad_to(x.view(B, T, S, C), 2, S_pad)  # [B, T, S_pad, C]
        x = split_forward_gather_backward(x, 2, g, "down").flatten(1, 2)  # [B, M, C], M = T*S_l
        shard = _Shard(self, spatial_keys=_key_mask(S, S_pad, x.device))
        for spatial, temporal, (kv_s, kv_t) in zip(model.spatial_blocks, model.temporal_blocks, kv):
            x = model._call_block(spatial, x, y, y_valid, t_mlp, T, S_l, x_mask, t0_mlp, None, shard, kv_s)
            x = model._call_block(temporal, x, y, y_valid, t_mlp, T, S_l, x_mask, t0_mlp, rope, shard, kv_t)
        x = model.final_layer(x, t, x_mask, t0, T, S_l)  # [B, M, K]
        x = gather_forward_split_backward(x.unflatten(1, (T, S_l)), 2, g, "up")  # [B, T, S_pad, K]
        return x[:, :, :S].flatten(1, 2)  # [B, N, K]

    def _forward_dsp(self, model, x, t, y, y_valid, t_mlp, T, S, x_mask, t0, t0_mlp, kv):
        B, N, C = x.shape
        P, g = self.size, self.group
        T_pad, S_pad = -(-T // P) * P, -(-S // P) * P
        T_l, S_l = T_pad // P, S_pad // P
        x = _pad_to(x.view(B, T, S, C), 1, T_pad)  # [B, T_pad, S, C]
        x = split_forward_gather_backward(x, 1, g, "down")  # [B, T_l, S, C]: whole frames
        mask_pad = mask_loc = None
        if x_mask is not None:
            mask_pad = _pad_to(x_mask, 1, T_pad)  # [B, T_pad] (padded frames: False, never seen)
            mask_loc = mask_pad.chunk(P, 1)[self.rank]  # [B, T_l]
        rope = model.rope.cos_sin(T_pad, device=x.device, quantize_bf16=model.official_bf16_quantization)
        shard = _Shard(self, frame_keys=_key_mask(T, T_pad, x.device))
        for spatial, temporal, (kv_s, kv_t) in zip(model.spatial_blocks, model.temporal_blocks, kv):
            x = x.flatten(1, 2)  # [B, T_l*S, C]
            x = model._call_block(spatial, x, y, y_valid, t_mlp, T_l, S, mask_loc, t0_mlp, None, None, kv_s)
            x = _pad_to(x.view(B, T_l, S, C), 2, S_pad)  # [B, T_l, S_pad, C]
            x = all_to_all(x, g, scatter_dim=2, gather_dim=1).flatten(1, 2)  # [B, T_pad*S_l, C]: whole series
            x = model._call_block(temporal, x, y, y_valid, t_mlp, T_pad, S_l, mask_pad, t0_mlp, rope, shard, kv_t)
            x = all_to_all(x.view(B, T_pad, S_l, C), g, scatter_dim=1, gather_dim=2)  # [B, T_l, S_pad, C]
            x = x[:, :, :S]  # [B, T_l, S, C]
        x = model.final_layer(x.flatten(1, 2), t, mask_loc, t0, T_l, S)  # [B, T_l*S, K]
        x = gather_forward_split_backward(x.unflatten(1, (T_l, S)), 1, g, "up")  # [B, T_pad, S, K]
        return x[:, :T].flatten(1, 2)  # [B, N, K]

    @property
    def rank(self) -> int:
        from opensora_sdk.distributed import group_rank

        return group_rank(self.group)


class _Shard:
    """Per-forward facts a block needs: the SP plan and key masks over padded positions."""

    def __init__(self, sp: SequenceParallel, *, spatial_keys=None, frame_keys=None):
        self.sp, self.spatial_keys, self.frame_keys = sp, spatial_keys, frame_keys

    def spatial_attention(self, attn, h: torch.Tensor) -> torch.Tensor:
        """attn (a `SelfAttention`) over all S of each frame for the local shard h [B, T, S_l, C]."""
        B, T, S_l, C = h.shape
        H, D, g = attn.num_heads, C // attn.num_heads, self.sp.group
        qkv = attn.qkv(h.reshape(B * T, S_l, C)).view(B * T, S_l, 3, H, D)
        keys = None if self.spatial_keys is None else self.spatial_keys.expand(B * T, -1)  # [B*T, S_pad]
        if self.sp.mode == "ulysses":
            qkv = all_to_all(qkv, g, scatter_dim=3, gather_dim=1)  # [B*T, S_pad, 3, H/P, D]
            q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # [B*T, H/P, S_pad, D]
            q, k = attn.q_norm(q), attn.k_norm(k)
            out = attention(q, k, v, key_padding_mask=keys, backend=attn.attention_backend)  # [B*T, H/P, S_pad, D]
            out = all_to_all(out.transpose(1, 2), g, scatter_dim=1, gather_dim=2)  # [B*T, S_l, H, D]
        else:  # allgather_kv
            q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # [B*T, H, S_l, D]
            q, k = attn.q_norm(q), attn.k_norm(k)
            kv = all_gather(torch.stack([k, v]), 3, g)  # [2, B*T, H, S_pad, D]
            out = attention(q, kv[0], kv[1], key_padding_mask=keys, backend=attn.attention_backend)
            out = out.transpose(1, 2)  # [B*T, S_l, H, D]
        return attn.proj(out.reshape(B * T, S_l, C)).view(B, T, S_l, C)

    def temporal_attention(self, attn, h: torch.Tensor, rope) -> torch.Tensor:
        """attn over the T frames of each local position, h [B, T, S_l, C]; padded frames masked."""
        B, T, S, C = h.shape
        keys = None if self.frame_keys is None else self.frame_keys.expand(B * S, -1)  # [B*S, T]
        out = attn(h.transpose(1, 2).reshape(B * S, T, C), rope, key_padding_mask=keys)  # [B*S, T, C]
        return out.view(B, S, T, C).transpose(1, 2)


__all__ = ["MODES", "SequenceParallel"]
