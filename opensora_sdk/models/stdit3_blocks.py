"""The building blocks of STDiT3 (spec 2.4.7): self-attention, cross-attention and the block.

Shapes: tokens [B, N, C] with N = T*S, frame-major, S spatial tokens per frame; text [B, L, C].
Under sequence parallelism (`stdit3_parallel`) T and S are this process's shard, and only
`STDiT3Block.spatial_attention` needs collectives (all-to-all over heads); temporal
attention, cross-attention and the MLP are token-wise or per spatial position.
"""

from __future__ import annotations

import torch
from torch import nn

from opensora_sdk.models.attention import attention
from opensora_sdk.models.layers import MLP, DropPath, RMSNorm, RotaryEmbedding, t2i_modulate


class SelfAttention(nn.Module):
    """Multi-head self-attention with RMS qk-norm (before RoPE). x [B', N', C] -> [B', N', C]."""

    def __init__(self, dim: int, num_heads: int, qk_norm: bool):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim)  # output (3, H, D): [q | k | v], head-major
        self.q_norm = RMSNorm(dim // num_heads) if qk_norm else nn.Identity()
        self.k_norm = RMSNorm(dim // num_heads) if qk_norm else nn.Identity()
        self.proj = nn.Linear(dim, dim)
        self.attention_backend = "sdpa"

    def forward(self, x: torch.Tensor, rope=None, key_padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        """x [B', N', C]; rope: (cos, sin) or None; key_padding_mask [B', N'] bool, True = real key."""
        B, N, C = x.shape
        qkv = self.qkv(x).view(B, N, 3, self.num_heads, C // self.num_heads)  # [B, N, 3, H, D]
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each [B, H, N, D]
        q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:
            q, k = RotaryEmbedding.rotate(q, *rope), RotaryEmbedding.rotate(k, *rope)
        out = attention(q, k, v, key_padding_mask=key_padding_mask, backend=self.attention_backend)  # [B, H, N, D]
        return self.proj(out.transpose(1, 2).reshape(B, N, C))


class CrossAttention(nn.Module):
    """Tokens x [B, N, C] attend to their own caption y [B, L, C] (keys where `y_valid`)."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.q_linear = nn.Linear(dim, dim)
        self.kv_linear = nn.Linear(dim, 2 * dim)  # output (2, H, D): [k | v]
        self.proj = nn.Linear(dim, dim)
        self.attention_backend = "sdpa"

    def forward(self, x: torch.Tensor, y: torch.Tensor, y_valid: torch.Tensor | None, kv=None) -> torch.Tensor:
        """kv: this layer's `text_kv(y)`, computed once per generation (see `stdit3_reuse`), or None."""
        B, N, C = x.shape
        H, D = self.num_heads, C // self.num_heads
        q = self.q_linear(x).view(B, N, H, D).transpose(1, 2)  # [B, H, N, D]
        k, v = self.text_kv(y) if kv is None else kv  # [B, H, L, D] each
        out = attention(q, k, v, key_padding_mask=y_valid, backend=self.attention_backend)  # [B, H, N, D]
        return self.proj(out.transpose(1, 2).reshape(B, N, C))

    def text_kv(self, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The text's keys and values, y [B, L, C] -> 2 x [B, H, L, D]."""
        B, L, C = y.shape
        H, D = self.num_heads, C // self.num_heads
        return self.kv_linear(y).view(B, L, 2, H, D).permute(2, 0, 3, 1, 4).unbind(0)


class STDiT3Block(nn.Module):
    """One spatial or temporal block, x [B, T*S, C] -> [B, T*S, C] (spec 2.4.7).

    adaLN-single modulated self-attention (over S within a frame, or over T at a position
    with RoPE), then un-normalised cross-attention to the text, then a modulated MLP. With
    `x_mask` [B, T], frames marked False (conditioning frames) use the t=0 modulation.
    """

    def __init__(self, hidden_size, num_heads, mlp_ratio=4.0, drop_path=0.0, qk_norm=True, temporal=False):
        super().__init__()
        self.temporal = temporal
        self.scale_shift_table = nn.Parameter(torch.randn(6, hidden_size) / hidden_size**0.5)
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attn = SelfAttention(hidden_size, num_heads, qk_norm)
        self.cross_attn = CrossAttention(hidden_size, num_heads)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.mlp = MLP(hidden_size, int(hidden_size * mlp_ratio))
        self.drop_path = DropPath(drop_path)
        self.attention_cache = None  # step-cache hook: a step_cache.PABState broadcasting attention; None = off

    def forward(self, x, y, y_valid, t_mlp, T: int, S: int, x_mask=None, t0_mlp=None, rope=None, sp=None, text_kv=None):
        """x [B, T*S, C] (a shard under sequence parallelism; `sp` then says how to attend);
        text_kv: the cross-attention's (k, v) of y when computed once per generation, or None."""
        B, N, C = x.shape
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.modulation(t_mlp, x_mask, t0_mlp)
        h = t2i_modulate(self.norm1(x).view(B, T, S, C), shift_msa, scale_msa)  # [B, T, S, C]
        if self.attention_cache is None:
            a = self.temporal_attention(h, rope, sp) if self.temporal else self.spatial_attention(h, sp)  # [B, T, S, C]
        else:  # step-cache hook (opensora_sdk.step_cache): attention outputs broadcast over steps
            a = self.attention_cache.attention(
                self,
                "temporal" if self.temporal else "spatial",
                lambda: self.temporal_attention(h, rope, sp) if self.temporal else self.spatial_attention(h, sp),
            )
        x = x + self.drop_path((gate_msa * a).reshape(B, N, C))
        if self.attention_cache is None:
            x = x + self.cross_attn(x, y, y_valid, text_kv)  # no norm, no modulation
        else:  # step-cache hook, as above
            x = x + self.attention_cache.attention(self, "cross", lambda: self.cross_attn(x, y, y_valid, text_kv))
        h = t2i_modulate(self.norm2(x).view(B, T, S, C), shift_mlp, scale_mlp)  # [B, T, S, C]
        return x + self.drop_path((gate_mlp * self.mlp(h)).reshape(B, N, C))

    def modulation(self, t_mlp, x_mask=None, t0_mlp=None) -> tuple[torch.Tensor, ...]:
        """Six [B, T or 1, 1, C] tensors: shift/scale/gate for attention, then for the MLP."""
        B, C = t_mlp.shape[0], self.scale_shift_table.shape[1]
        table = (self.scale_shift_table[None] + t_mlp.view(B, 6, C))[:, :, None, None]  # [B, 6, 1, 1, C]
        if x_mask is not None:
            table0 = (self.scale_shift_table[None] + t0_mlp.view(B, 6, C))[:, :, None, None]
            table = torch.where(x_mask[:, None, :, None, None], table, table0)  # [B, 6, T, 1, C]
        return table.unbind(1)

    def spatial_attention(self, h: torch.Tensor, sp=None) -> torch.Tensor:
        """Attention over the S tokens of each frame: [B, T, S, C] -> [B, T, S, C].

        The one place sequence parallelism needs collectives: with `sp`, h holds this rank's
        share of S and attention runs over every rank's tokens (see `stdit3_parallel`).
        """
        if sp is not None:
            return sp.spatial_attention(self.attn, h)
        B, T, S, C = h.shape
        return self.attn(h.reshape(B * T, S, C)).view(B, T, S, C)

    def temporal_attention(self, h: torch.Tensor, rope, sp=None) -> torch.Tensor:
        """Attention over the T frames at each spatial position, with RoPE: [B, T, S, C] -> same."""
        if sp is not None:  # local to the shard; masks frames padded for sharding
            return sp.temporal_attention(self.attn, h, rope)
        B, T, S, C = h.shape
        out = self.attn(h.transpose(1, 2).reshape(B * S, T, C), rope)  # [B*S, T, C]
        return out.view(B, S, T, C).transpose(1, 2)
