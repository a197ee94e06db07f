"""The small pieces of STDiT3, smallest first: sinusoids, modulation, norms, embedders, RoPE,
the final layer.

Letters: B batch, T latent frames, S spatial tokens per frame, N = T*S tokens, C hidden size,
L text tokens, H heads, D head dim. Nothing here keeps a non-persistent buffer: frequency
tables are computed on the fly (they are tiny), so a model built on the meta device and
loaded with `assign=True` needs no re-initialisation step.

`quantize_bf16=True` arguments reproduce the official bf16 runs, whose frequency tables and
conditioning scalars were rounded to bfloat16 (spec section 1); they are off by default.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def bf16_round(x: torch.Tensor) -> torch.Tensor:
    """Round a float tensor to the nearest bfloat16 value, keeping its dtype (985.96 -> 984)."""
    return x.to(torch.bfloat16).to(x.dtype)


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoid of scalars t [B] -> [B, dim] in float32, **cosine first**: [cos(t*f), sin(t*f)].

    f_k = exp(-ln(max_period) * k / (dim/2)), k = 0 .. dim/2 - 1.
    """
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t[:, None].float() * freqs[None]  # [B, half]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)  # [B, 2*half]
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


def t2i_modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN-single modulation: x * (1 + scale) + shift (shapes broadcast)."""
    return x * (1 + scale) + shift


class RMSNorm(nn.Module):
    """Llama RMSNorm: variance in float32, cast back to the input dtype, then times weight."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(dtype)


class MLP(nn.Module):
    """fc1 -> GELU(tanh) -> fc2 (the timm `Mlp` layout, no dropout)."""

    def __init__(self, in_features: int, hidden_features: int, out_features: int | None = None):
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden_features)
        self.fc2 = nn.Linear(hidden_features, out_features or in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class DropPath(nn.Module):
    """Stochastic depth per sample (identity at p = 0 or in eval mode)."""

    def __init__(self, p: float = 0.0):
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.p == 0.0 or not self.training:
            return x
        keep = 1.0 - self.p
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        return x * mask / keep


# --------------------------------------------------------------------------------------------
# Conditioning embedders
# --------------------------------------------------------------------------------------------


class TimestepEmbedder(nn.Module):
    """Timestep t [B] -> [B, C]: sinusoid(256, cos first) -> Linear -> SiLU -> Linear."""

    def __init__(self, hidden_size: int, frequency_embedding_size: int = 256):
        super().__init__()
        self.frequency_embedding_size = frequency_embedding_size
        self.mlp = nn.Sequential(
            nn.Linear(frequency_embedding_size, hidden_size),
            nn.SiLU(),
            nn.Linear(hidden_size, hidden_size),
        )

    def forward(self, t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        freq = timestep_embedding(t, self.frequency_embedding_size).to(dtype)  # [B, 256]
        return self.mlp(freq)  # [B, C]


class SizeEmbedder(TimestepEmbedder):
    """Scalars s [b] or [b, d] (fps: d = 1) -> [B, d*C], rows tiled from b up to B."""

    def forward(self, s: torch.Tensor, batch: int) -> torch.Tensor:
        if s.ndim == 1:
            s = s[:, None]  # [b, d]
        if s.shape[0] != batch:
            s = s.repeat(batch // s.shape[0], 1)  # [B, d]
        b, d = s.shape
        freq = timestep_embedding(s.reshape(-1), self.frequency_embedding_size)  # [B*d, 256]
        emb = self.mlp(freq.to(self.mlp[0].weight.dtype))  # [B*d, C]
        return emb.reshape(b, d * emb.shape[-1])  # [B, d*C]


class CaptionEmbedder(nn.Module):
    """Text features [B, 1, L, C_text] -> [B, 1, L, C] through an MLP (fc1, GELU-tanh, fc2).

    `y_embedding` [L, C_text] is the null caption (a persistent buffer loaded from the
    checkpoint). In training, each row is replaced by it with probability `uncond_prob`
    (classifier-free guidance dropout); the text mask is left unchanged, so the null caption
    is cut to that row's valid length, as at inference.
    """

    def __init__(self, in_channels: int, hidden_size: int, uncond_prob: float, token_num: int):
        super().__init__()
        self.y_proj = MLP(in_channels, hidden_size, hidden_size)
        self.register_buffer("y_embedding", torch.randn(token_num, in_channels) / in_channels**0.5)
        self.uncond_prob = uncond_prob

    def forward(
        self,
        caption: torch.Tensor,
        *,
        train: bool,
        force_drop_ids: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """`force_drop_ids` [B] (1 = use the null caption) overrides the random draw, in any
        mode; otherwise rows are dropped only when `train` is true, drawing from `generator`."""
        if force_drop_ids is not None:
            drop = force_drop_ids.to(caption.device) == 1  # [B]
        elif train and self.uncond_prob > 0:
            drop = torch.rand(caption.shape[0], generator=generator, device=_rng_device(generator, caption))
            drop = drop.to(caption.device) < self.uncond_prob  # [B]
        else:
            drop = None
        if drop is not None:
            null = self.y_embedding.to(caption.dtype)  # [L, C_text]
            caption = torch.where(drop[:, None, None, None], null, caption)  # [B, 1, L, C_text]
        return self.y_proj(caption)  # [B, 1, L, C]


def _rng_device(generator: torch.Generator | None, like: torch.Tensor) -> torch.device:
    return generator.device if generator is not None else like.device


class PatchEmbed3D(nn.Module):
    """Latent [B, C_in, T, H, W] -> tokens [B, T_p*H_p*W_p, C] (frame-major, then row-major).

    T, H and W are zero-padded at the end up to multiples of the patch size first.
    """

    def __init__(self, patch_size: tuple[int, int, int], in_chans: int, embed_dim: int):
        super().__init__()
        self.patch_size = tuple(patch_size)
        self.proj = nn.Conv3d(in_chans, embed_dim, kernel_size=self.patch_size, stride=self.patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pt, ph, pw = self.patch_size
        _, _, t, h, w = x.shape
        x = F.pad(x, (0, -w % pw, 0, -h % ph, 0, -t % pt))  # [B, C_in, T_p*pt, H_p*ph, W_p*pw]
        x = self.proj(x)  # [B, C, T_p, H_p, W_p]
        return x.flatten(2).transpose(1, 2)  # [B, N, C]


class PositionEmbedding2D(nn.Module):
    """Fixed 2D sin-cos embedding of a h x w patch grid -> [1, h*w, dim] (same for every frame).

    Coordinates are rescaled: r_i = i / scale * base_size / h, c_j = j / scale * base_size / w.
    Token i*w + j gets [sin(c_j f), cos(c_j f), sin(r_i f), cos(r_i f)]: the **first half
    encodes the column**. f_k = 1 / 10000^(2k / (dim/2)).
    """

    def __init__(self, dim: int):
        super().__init__()
        if dim % 4:
            raise ValueError(f"PositionEmbedding2D needs dim divisible by 4, got {dim}")
        self.dim = dim

    def forward(
        self,
        h: int,
        w: int,
        *,
        scale: float,
        base_size: int,
        device: torch.device,
        dtype: torch.dtype,
        quantize_bf16: bool = False,
    ) -> torch.Tensor:
        half = self.dim // 2
        inv_freq = 1.0 / (10000 ** (torch.arange(0, half, 2, device=device).float() / half))  # [dim/4]
        if quantize_bf16:
            inv_freq = bf16_round(inv_freq)
        rows = torch.arange(h, device=device) / scale * (base_size / h)  # [h]
        cols = torch.arange(w, device=device) / scale * (base_size / w)  # [w]
        rows = rows[:, None].expand(h, w).reshape(-1)  # [S]
        cols = cols[None, :].expand(h, w).reshape(-1)  # [S]

        def sincos(pos):
            out = pos[:, None] * inv_freq[None]  # [S, dim/4]
            return torch.cat([torch.sin(out), torch.cos(out)], dim=-1)  # [S, dim/2]

        return torch.cat([sincos(cols), sincos(rows)], dim=-1)[None].to(dtype)  # [1, S, dim]


# --------------------------------------------------------------------------------------------
# Rotary position embedding (temporal self-attention)
# --------------------------------------------------------------------------------------------


def rope_frequencies(dim: int, theta: float = 10000.0) -> torch.Tensor:
    """[dim/2] frequencies theta^(-2i/dim), i = 0 .. dim/2 - 1."""
    return 1.0 / (theta ** (torch.arange(0, dim, 2)[: dim // 2].float() / dim))


class RotaryEmbedding(nn.Module):
    """RoPE on the sequence axis (-2) with **interleaved pairs** (2i, 2i+1), all dims rotated.

    `freqs` [dim/2] is a frozen parameter (it is in the official state dict). It stays
    float32 whatever the model is cast to (`.to(dtype)`, `.half()`): angles are pos * freqs
    in float32; with `quantize_bf16` the table, the positions and the angles are rounded to
    bfloat16 as in the official bf16 runs.
    """

    def __init__(self, dim: int, theta: float = 10000.0):
        super().__init__()
        self.freqs = nn.Parameter(rope_frequencies(dim, theta), requires_grad=False)
        self.theta = theta

    def reset_parameters(self) -> None:
        with torch.no_grad():
            self.freqs.copy_(rope_frequencies(2 * self.freqs.shape[0], self.theta))

    def _apply(self, fn, recurse=True):  # every cast and move goes through here
        super()._apply(fn, recurse)
        if self.freqs.is_floating_point() and self.freqs.dtype != torch.float32:
            self.freqs.data = self.freqs.data.float()
        return self

    def cos_sin(self, seq_len: int, *, device: torch.device, quantize_bf16: bool = False):
        """cos, sin of the angles, each [seq_len, dim] in float32 (frequencies repeated twice)."""
        pos = torch.arange(seq_len, device=device, dtype=torch.float32)  # [N]
        if quantize_bf16:
            angles = pos.bfloat16()[:, None] * self.freqs.detach().bfloat16()[None]  # [N, dim/2] bf16
        else:
            angles = pos[:, None] * self.freqs.detach().float()[None]  # [N, dim/2]
        angles = angles.float().repeat_interleave(2, dim=-1)  # [N, dim]
        return angles.cos(), angles.sin()

    @staticmethod
    def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """x [..., N, dim] -> x*cos + rotate_half(x)*sin, with rotate_half(a, b) = (-b, a)."""
        pairs = x.unflatten(-1, (-1, 2))  # [..., N, dim/2, 2]
        rotated = torch.stack((-pairs[..., 1], pairs[..., 0]), dim=-1).flatten(-2)  # [..., N, dim]
        return x * cos.to(x.dtype) + rotated * sin.to(x.dtype)


# --------------------------------------------------------------------------------------------
# Final layer
# --------------------------------------------------------------------------------------------


class T2IFinalLayer(nn.Module):
    """Tokens [B, N, C] -> [B, N, prod(patch) * C_out], modulated by t [B, C] (not t_mlp).

    With `x_mask`, condition frames (False) use the t=0 vector t0. Official quirk kept on
    purpose (the checkpoint was trained with it): that branch normalises the already
    modulated tensor again, x0 = LN(x1) * (1 + scale0) + shift0.
    """

    def __init__(self, hidden_size: int, num_patch: int, out_channels: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, num_patch * out_channels)
        self.scale_shift_table = nn.Parameter(torch.randn(2, hidden_size) / hidden_size**0.5)

    def forward(self, x, t, x_mask=None, t0=None, T: int | None = None, S: int | None = None):
        shift, scale = (self.scale_shift_table[None] + t[:, None]).chunk(2, dim=1)  # [B, 1, C] each
        x1 = t2i_modulate(self.norm_final(x), shift, scale)  # [B, N, C]
        if x_mask is not None:
            shift0, scale0 = (self.scale_shift_table[None] + t0[:, None]).chunk(2, dim=1)
            x0 = t2i_modulate(self.norm_final(x1), shift0, scale0)  # the double-norm quirk
            keep = x_mask[:, :, None, None]  # [B, T, 1, 1]
            x1 = torch.where(keep, x1.unflatten(1, (T, S)), x0.unflatten(1, (T, S))).flatten(1, 2)
        return self.linear(x1)  # [B, N, prod(patch) * C_out]


# --------------------------------------------------------------------------------------------
# Pieces shared by the transformer families (added for STDiT2; STDiT3 keeps its own methods)
# --------------------------------------------------------------------------------------------


def modulation_table(
    table: torch.Tensor,
    t_mlp: torch.Tensor,
    x_mask: torch.Tensor | None = None,
    t0_mlp: torch.Tensor | None = None,
) -> tuple[torch.Tensor, ...]:
    """adaLN-single rows: table [K, C] + t_mlp [B, K*C] -> K tensors [B, T or 1, 1, C].

    With `x_mask` [B, T] (False = conditioning frame), each frame takes its rows from
    `t0_mlp` (the t = 0 vector) where the mask is False; the rows then broadcast over
    tokens viewed as [B, T, S, C].
    """
    K, C = table.shape
    B = t_mlp.shape[0]
    rows = (table[None] + t_mlp.view(B, K, C))[:, :, None, None]  # [B, K, 1, 1, C]
    if x_mask is not None:
        rows0 = (table[None] + t0_mlp.view(B, K, C))[:, :, None, None]
        rows = torch.where(x_mask[:, None, :, None, None], rows, rows0)  # [B, K, T, 1, C]
    return rows.unbind(1)


def pack_text_tokens(y: torch.Tensor, mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Projected text y [B, L, C] and mask [B', L] -> (tokens [B, L', C], valid [B, L'] or None).

    `mask` rows (nonzero = token) are tiled to B when B' divides B (under CFG the null half
    reuses the prompts' masks). The valid tokens of each row move to the front in their
    order and rows are padded to the longest one, L' = max valid count; `valid` marks real
    tokens for the attention key mask (None when all are real). This is the official
    "select the valid tokens, attend per row" cross-attention input without packing rows.
    """
    if mask is None:
        return y, None
    B = y.shape[0]
    valid = mask.to(y.device).repeat(B // mask.shape[0], 1) != 0  # [B, L]
    lens = valid.sum(1)  # [B]
    longest = int(lens.max())
    order = torch.argsort((~valid).to(torch.int32), dim=1, stable=True)[:, :longest]  # valid first
    y = y.gather(1, order[..., None].expand(-1, -1, y.shape[-1]))  # [B, L', C]
    valid = torch.arange(longest, device=y.device)[None] < lens[:, None]  # [B, L']
    return y, None if bool(valid.all()) else valid


def unpatchify(
    x: torch.Tensor, patch_size: tuple[int, int, int], T: int, Hp: int, Wp: int, size: tuple[int, int, int]
) -> torch.Tensor:
    """Tokens [B, T*Hp*Wp, (pt ph pw C_out)] -> [B, C_out, T0, H0, W0], cropping the padding
    PatchEmbed3D added (`size` = (T0, H0, W0), the latent size before patching)."""
    pt, ph, pw = patch_size
    B = x.shape[0]
    x = x.view(B, T, Hp, Wp, pt, ph, pw, -1).permute(0, 7, 1, 4, 2, 5, 3, 6)
    x = x.reshape(B, -1, T * pt, Hp * ph, Wp * pw)  # [B, C_out, T*pt, Hp*ph, Wp*pw]
    return x[:, :, : size[0], : size[1], : size[2]]


# --------------------------------------------------------------------------------------------
# Fixed-size sin-cos tables (added for STDiT, v1.0; spec section 9.2)
# --------------------------------------------------------------------------------------------


def sincos_1d(dim: int, pos: torch.Tensor) -> torch.Tensor:
    """Positions pos [P] -> [P, dim] = [sin(pos f), cos(pos f)], f_k = 1/10000^(k/(dim/2)).

    Computed in float64 (the official tables are numpy float64, cast to float32 once).
    """
    if dim % 2:
        raise ValueError(f"sin-cos tables need an even dim, got {dim}")
    omega = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64) / (dim // 2))  # [dim/2]
    out = pos.double()[:, None] * omega[None]  # [P, dim/2]
    return torch.cat([torch.sin(out), torch.cos(out)], dim=1)  # [P, dim]


def sincos_table_1d(dim: int, length: int, *, scale: float = 1.0) -> torch.Tensor:
    """v1.0 temporal table [1, length, dim] (float32, CPU): positions arange(length) / scale."""
    pos = torch.arange(length, dtype=torch.float64) / scale  # [T]
    return sincos_1d(dim, pos).float()[None]


def sincos_table_2d(dim: int, grid: tuple[int, int], *, scale: float = 1.0) -> torch.Tensor:
    """v1.0 spatial table [1, h*w, dim] (float32, CPU) of a fixed h x w patch grid.

    Row r_i = i / scale, column c_j = j / scale (no `base_size` rescaling, unlike the
    v1.2 `PositionEmbedding2D`); token i*w + j gets [sincos_1d(c_j) (dim/2), sincos_1d(r_i)
    (dim/2)]: the **first half encodes the column**, as in v1.2.
    """
    if dim % 4:
        raise ValueError(f"2D sin-cos tables need dim divisible by 4, got {dim}")
    h, w = grid
    rows = (torch.arange(h, dtype=torch.float32) / scale)[:, None].expand(h, w).reshape(-1)  # [S]
    cols = (torch.arange(w, dtype=torch.float32) / scale)[None, :].expand(h, w).reshape(-1)  # [S]
    return torch.cat([sincos_1d(dim // 2, cols), sincos_1d(dim // 2, rows)], dim=1).float()[None]  # [1, S, dim]
