"""The v1.2 temporal VAE: causal 3D convolutions that compress time x4 (4 -> 4 channels).

It runs on the spatial latents [B, 4, T, h, w] of the 2D autoencoder and never changes h or
w. Key names follow the official `VAE_Temporal` (convolutions are wrapped, so their weights
are `*.conv.weight`). Math only.

Time rules (spec section 3.2):
* every convolution pads time on the left only (the past), with zeros;
* `encode` prepends (4 - T mod 4) mod 4 zero frames, then halves time twice: T' = ceil(T/4);
* `decode(z, num_frames)` makes 4*T' frames and drops the *first* (4 - N mod 4) mod 4.
GroupNorm statistics span (group, T, H, W), so every latent frame depends on the whole input
clip: the "causal" VAE is causal in its convolutions only.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from opensora_sdk.configs import TemporalVAEConfig
from opensora_sdk.models import vae_fast
from opensora_sdk.models.vae_spatial import DiagonalGaussian


def time_padding(num_frames: int, factor: int) -> int:
    """Frames prepended before encoding (and dropped after decoding) so `factor` divides N."""
    return (factor - num_frames % factor) % factor


class CausalConv3d(nn.Module):
    """Conv3d that pads time on the left only and H/W symmetrically, both with zeros.

    Time padding is dilation*(k_t - 1) + (1 - stride_t), so with stride 1 frame t sees frames
    <= t, and with stride 2 an even length L maps to L/2.
    """

    def __init__(self, cin: int, cout: int, kernel_size: int, *, time_stride: int = 1, bias: bool = True):
        super().__init__()
        k = kernel_size
        pad_t = (k - 1) + (1 - time_stride)
        self.padding = (k // 2, k // 2, k // 2, k // 2, pad_t, 0)  # (W, W, H, H, T_front, T_back)
        self.conv = nn.Conv3d(cin, cout, k, stride=(time_stride, 1, 1), bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, self.padding))


class ResBlock(nn.Module):
    """GroupNorm -> SiLU -> causal conv3x3x3 (no bias), twice, plus the (1x1x1-projected) input."""

    def __init__(self, cin: int, cout: int, groups: int):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, cin)
        self.conv1 = CausalConv3d(cin, cout, 3, bias=False)
        self.norm2 = nn.GroupNorm(groups, cout)
        self.conv2 = CausalConv3d(cout, cout, 3, bias=False)
        self.conv3 = CausalConv3d(cin, cout, 1, bias=False) if cin != cout else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        if self.conv3 is not None:
            x = self.conv3(x)
        return x + h


def _res_stack(cin: int, cout: int, n: int, groups: int) -> nn.ModuleList:
    return nn.ModuleList(ResBlock(cin if i == 0 else cout, cout, groups) for i in range(n))


class Encoder(nn.Module):
    """[B, 4, T, h, w] -> moments [B, 2*latent_embed_dim, T/4, h, w] (T a multiple of 4)."""

    def __init__(self, config: TemporalVAEConfig):
        super().__init__()
        f, mult, n, groups = config.filters, config.channel_multipliers, config.num_res_blocks, config.num_groups
        self.conv_in = CausalConv3d(config.in_out_channels, f, 3, bias=False)
        widths = [f * m for m in mult]
        cin = [f] + widths[:-1]  # level i takes the width of level i-1
        self.block_res_blocks = nn.ModuleList(_res_stack(cin[i], widths[i], n, groups) for i in range(len(mult)))
        # conv_blocks[i] follows level i (not after the last level); Identity where time stays
        self.conv_blocks = nn.ModuleList(
            CausalConv3d(widths[i], widths[i], 3, time_stride=2) if config.temporal_downsample[i] else nn.Identity()
            for i in range(len(mult) - 1)
        )
        self.res_blocks = _res_stack(widths[-1], widths[-1], n, groups)
        self.norm1 = nn.GroupNorm(groups, widths[-1])
        self.conv2 = CausalConv3d(widths[-1], 2 * config.latent_embed_dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv_in(x)  # [B, f, T, h, w]
        for i, blocks in enumerate(self.block_res_blocks):
            for block in blocks:
                x = block(x)
            if i < len(self.conv_blocks):
                x = self.conv_blocks[i](x)  # T -> T/2 where temporal_downsample[i]
        for block in self.res_blocks:
            x = block(x)
        return self.conv2(F.silu(self.norm1(x)))  # [B, 2*latent, T/4, h, w]


class Decoder(nn.Module):
    """[B, latent_embed_dim, T', h, w] -> [B, 4, 4*T', h, w]."""

    def __init__(self, config: TemporalVAEConfig):
        super().__init__()
        f, mult, n, groups = config.filters, config.channel_multipliers, config.num_res_blocks, config.num_groups
        self.temporal_upsample = config.temporal_downsample
        widths = [f * m for m in mult]
        self.conv1 = CausalConv3d(config.latent_embed_dim, widths[-1], 3)
        self.res_blocks = _res_stack(widths[-1], widths[-1], n, groups)
        # Level i takes the width of level i+1 (the previous one in decoding order).
        cin = widths[1:] + widths[-1:]
        self.block_res_blocks = nn.ModuleList(_res_stack(cin[i], widths[i], n, groups) for i in range(len(mult)))
        # conv_blocks[i-1] follows level i > 0: a conv to 2x channels, then depth-to-time
        self.conv_blocks = nn.ModuleList(
            CausalConv3d(widths[i], 2 * widths[i], 3) if config.temporal_downsample[i - 1] else nn.Identity()
            for i in range(1, len(mult))
        )
        self.norm1 = nn.GroupNorm(groups, widths[0])
        self.conv_out = CausalConv3d(widths[0], config.in_out_channels, 3)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = self.conv1(z)  # [B, F, T', h, w]
        for block in self.res_blocks:
            x = block(x)
        for i in reversed(range(len(self.block_res_blocks))):
            for block in self.block_res_blocks[i]:
                x = block(x)
            if i > 0 and self.temporal_upsample[i - 1]:
                x = self.conv_blocks[i - 1](x)  # [B, 2C, T, h, w]
                x = rearrange(x, "B (C t) T H W -> B C (T t) H W", t=2)  # [B, C, 2T, h, w]
        return self.conv_out(F.silu(self.norm1(x)))  # [B, 4, 4*T', h, w]


class TemporalVAE(nn.Module):
    """The causal temporal VAE (`VAE_Temporal_SD` of the v1.2 release). `fast_decode` (default
    True; `set_fast_decode`) runs `decode` through vae_fast.py when no gradient is needed."""

    fast_decode: bool = True

    def __init__(self, config: TemporalVAEConfig | None = None):
        super().__init__()
        self.config = config = config or TemporalVAEConfig()
        self.time_downsample_factor = config.time_downsample_factor
        self.encoder = Encoder(config)
        self.quant_conv = CausalConv3d(2 * config.latent_embed_dim, 2 * config.embed_dim, 1)
        self.post_quant_conv = CausalConv3d(config.embed_dim, config.latent_embed_dim, 1)
        self.decoder = Decoder(config)

    @property
    def dtype(self) -> torch.dtype:
        return self.quant_conv.conv.weight.dtype

    def encode(self, x: torch.Tensor) -> DiagonalGaussian:
        """[B, 4, T, h, w] -> posterior over [B, 4, ceil(T/4), h, w]."""
        pad = time_padding(x.shape[2], self.time_downsample_factor)
        x = F.pad(x, (0, 0, 0, 0, pad, 0))  # zero frames in front: [B, 4, T+pad, h, w]
        moments = self.quant_conv(self.encoder(x)).to(x.dtype)
        return DiagonalGaussian(moments)

    def decode(self, z: torch.Tensor, num_frames: int) -> torch.Tensor:
        """[B, 4, T', h, w] -> [B, 4, 4*T' - pad, h, w], pad = (4 - N mod 4) mod 4 dropped in front."""
        z = self.post_quant_conv(z)
        if self.fast_decode and not vae_fast.needs_grad(self.decoder, z):
            x = vae_fast.decode_temporal(self.decoder, z)  # [B, 4, 4*T', h, w]
        else:
            x = self.decoder(z)
        return x[:, :, time_padding(num_frames, self.time_downsample_factor) :]

    def set_fast_decode(self, enabled: bool = True) -> TemporalVAE:
        """Decode through vae_fast.py (True, the default) or the plain `Decoder.forward`."""
        self.fast_decode = bool(enabled)
        return self
