"""The fast decode of the VAE decoders: the same math as `Decoder.forward` in vae_spatial.py
and vae_temporal.py, arranged so that a CPU spends its time in the convolutions.

2D decoder (per frame, the larger part of a decode):

* Channels-last activations (NHWC): oneDNN convolutions read and write them directly, and
  in bfloat16 they run on the AMX / AVX512-BF16 kernels (twice as fast as NCHW there).
* Nearest x2 upsampling followed by a 3x3 convolution is one 2x2 convolution with 4x the
  output channels on the low-resolution map, interleaved afterwards (sub-pixel form): an
  output pixel of the 3x3 kernel over the upsampled map sees only 2x2 distinct input pixels,
  so the taps that land on the same pixel are summed into one weight. 4/9 of the
  multiply-adds, and the upsampled map is never built.
* Frames go through in sub-batches whose widest activation stays under
  `FRAME_BUDGET_BYTES` (GroupNorm is per frame, so this changes no value): blocks that large
  are mapped afresh (and page-faulted in) by the allocator on every allocation, smaller ones
  are reused.

Temporal decoder (causal 3D convolutions at latent resolution):

* Causal time padding is written once: GroupNorm -> SiLU writes straight into a buffer whose
  first frames are the zero padding, and the convolution pads H and W itself, so no padded
  copy of an activation is made.
* Nothing is carried between temporal chunks: each chunk of 5 latents starts from zero
  padding and its own GroupNorm statistics (as officially), so no frame is decoded twice.

Both: SiLU and the residual adds work in place (x + h and h + x are the same float sum).

Results equal the plain decoders up to float rounding (the summed sub-pixel weights and
oneDNN's order of accumulation): the tests hold them to 1e-5 on tiny configs. In-place
SiLU cannot be differentiated, so callers use this only when no gradient is needed.
Math only.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

# Widest activation of one 2D sub-batch, in bytes: glibc serves blocks up to 32 MiB from its
# reusable heap; larger ones are mapped, and page-faulted in, on every allocation.
FRAME_BUDGET_BYTES = 24 << 20


def needs_grad(module: nn.Module, x: torch.Tensor) -> bool:
    """Whether a call of `module` on `x` would be recorded for backward (then: the plain path)."""
    return torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in module.parameters()))


def _silu_norm(norm: nn.GroupNorm, x: torch.Tensor) -> torch.Tensor:
    return F.silu(norm(x), inplace=True)


# --------------------------------------------------------------------------------------------
# 2D decoder
# --------------------------------------------------------------------------------------------


def _resnet_2d(block, x: torch.Tensor) -> torch.Tensor:
    """`ResnetBlock2D.forward`."""
    h = block.conv1(_silu_norm(block.norm1, x))
    h = block.conv2(_silu_norm(block.norm2, h))
    if block.conv_shortcut is not None:
        x = block.conv_shortcut(x)
    return h.add_(x)


def _attention_2d(attn, x: torch.Tensor) -> torch.Tensor:
    """`Attention.forward` (one head over the H*W positions) on a channels-last map."""
    B, C, H, W = x.shape
    h = attn.group_norm(x).permute(0, 2, 3, 1).reshape(B, H * W, C)  # [B, HW, C]
    q, k, v = (proj(h).unsqueeze(1) for proj in (attn.to_q, attn.to_k, attn.to_v))  # [B, 1, HW, C]
    h = F.scaled_dot_product_attention(q, k, v).squeeze(1)  # [B, HW, C]
    h = attn.to_out[0](h).reshape(B, H, W, C).permute(0, 3, 1, 2)  # [B, C, H, W], channels-last
    return h.add_(x)


def subpixel_weight(weight: torch.Tensor, bias: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The 3x3 weight [C_out, C, 3, 3] of a conv applied after nearest x2 -> the 2x2 weight
    [4*C_out, C, 2, 2] (and bias [4*C_out]) of the same map on the low-resolution input;
    output phase (a, b) (row 2i+a, column 2j+b) is block 2a+b of the output channels.

    Row 2i+a of the 3x3 conv over the upsampled map reads input rows (i-1, i) with taps
    (w0, w1 + w2) when a = 0, and rows (i, i+1) with taps (w0 + w1, w2) when a = 1; columns
    likewise. Taps are summed in float32 (also for a bfloat16 weight).
    """
    w0, w1, w2 = weight.float().unbind(2)  # rows, [C_out, C, 3] each
    phases = []
    for wr in (torch.stack([w0, w1 + w2], 2), torch.stack([w0 + w1, w2], 2)):  # [C_out, C, 2, 3]
        c0, c1, c2 = wr.unbind(3)
        phases += [torch.stack([c0, c1 + c2], 3), torch.stack([c0 + c1, c2], 3)]  # [C_out, C, 2, 2]
    return torch.cat(phases).to(weight.dtype), (None if bias is None else bias.repeat(4))


def upsample_conv_2d(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """conv(nearest_x2(x)) for a 3x3 conv with padding 1: x [B, C, H, W] (channels-last)
    -> [B, C_out, 2H, 2W] (channels-last)."""
    B, _, H, W = x.shape
    C = conv.out_channels
    weight, bias = subpixel_weight(conv.weight, conv.bias)
    y = F.conv2d(x, weight, bias, padding=1)  # [B, 4C, H+1, W+1]: phase (a, b) starts at row a, column b
    y = y.permute(0, 2, 3, 1)  # [B, H+1, W+1, 4C] (a view of the channels-last result)
    out = y.new_empty(B, H, 2, W, 2, C)  # memory of [B, 2H, 2W, C]
    for a in (0, 1):
        for b in (0, 1):
            p = 2 * a + b
            out[:, :, a, :, b] = y[:, a : a + H, b : b + W, p * C : (p + 1) * C]
    return out.view(B, 2 * H, 2 * W, C).permute(0, 3, 1, 2)  # [B, C, 2H, 2W]


def _decode_2d_batch(decoder, z: torch.Tensor) -> torch.Tensor:
    x = decoder.conv_in(z.contiguous(memory_format=torch.channels_last))  # [B, C, h, w]
    mid = decoder.mid_block
    x = _resnet_2d(mid.resnets[0], x)
    x = _attention_2d(mid.attentions[0], x)
    x = _resnet_2d(mid.resnets[1], x)
    for block in decoder.up_blocks:
        for resnet in block.resnets:
            x = _resnet_2d(resnet, x)
        if block.upsamplers is not None:
            x = upsample_conv_2d(block.upsamplers[0].conv, x)  # [B, C, 2h, 2w]
    return decoder.conv_out(_silu_norm(decoder.conv_norm_out, x)).contiguous()  # [B, 3, 8h, 8w]


def decode_2d(decoder, z: torch.Tensor) -> torch.Tensor:
    """`Decoder.forward` of vae_spatial.py: z [B, latent, h, w] -> [B, 3, 8h, 8w]."""
    B, _, h, w = z.shape
    up = 2 ** sum(block.upsamplers is not None for block in decoder.up_blocks)
    widest = decoder.conv_norm_out.num_channels * (up * h) * (up * w) * z.element_size()  # bytes per frame
    step = max(1, min(B, FRAME_BUDGET_BYTES // widest))
    if step == B:
        return _decode_2d_batch(decoder, z)
    return torch.cat([_decode_2d_batch(decoder, z[i : i + step]) for i in range(0, B, step)])


# --------------------------------------------------------------------------------------------
# Temporal (causal 3D) decoder
# --------------------------------------------------------------------------------------------


def _causal_conv(conv, x: torch.Tensor, *, padded: bool = False) -> torch.Tensor:
    """`CausalConv3d.forward`; `padded`: x already starts with the conv's zero frames."""
    pad_t = conv.padding[4]
    if pad_t and not padded:
        x = F.pad(x, (0, 0, 0, 0, pad_t, 0))  # zero frames in front, H and W left to the conv
    c = conv.conv
    k = c.kernel_size[1] // 2
    return F.conv3d(x, c.weight, c.bias, stride=c.stride, padding=(0, k, k))


def _silu_norm_padded(norm: nn.GroupNorm, x: torch.Tensor, pad_t: int) -> torch.Tensor:
    """SiLU(GroupNorm(x)) of x [B, C, T, h, w] after `pad_t` zero frames: [B, C, pad_t + T, h, w]."""
    h = norm(x)
    if not pad_t:
        return F.silu(h, inplace=True)
    B, C, T, H, W = h.shape
    out = h.new_empty(B, C, pad_t + T, H, W)
    out[:, :, :pad_t].zero_()
    torch._C._nn.silu(h, out=out[:, :, pad_t:])
    return out


def _resblock_3d(block, x: torch.Tensor) -> torch.Tensor:
    """`ResBlock.forward` of vae_temporal.py."""
    h = _causal_conv(block.conv1, _silu_norm_padded(block.norm1, x, block.conv1.padding[4]), padded=True)
    h = _causal_conv(block.conv2, _silu_norm_padded(block.norm2, h, block.conv2.padding[4]), padded=True)
    if block.conv3 is not None:
        x = _causal_conv(block.conv3, x)
    return h.add_(x)


def decode_temporal(decoder, z: torch.Tensor) -> torch.Tensor:
    """`Decoder.forward` of vae_temporal.py: z [B, latent_embed_dim, T', h, w] -> [B, 4, 4T', h, w]."""
    x = _causal_conv(decoder.conv1, z)  # [B, F, T', h, w]
    for block in decoder.res_blocks:
        x = _resblock_3d(block, x)
    for i in reversed(range(len(decoder.block_res_blocks))):
        for block in decoder.block_res_blocks[i]:
            x = _resblock_3d(block, x)
        if i > 0 and decoder.temporal_upsample[i - 1]:
            x = _causal_conv(decoder.conv_blocks[i - 1], x)  # [B, 2C, T, h, w], channel 2c + t
            B, C2, T, H, W = x.shape
            x = x.view(B, C2 // 2, 2, T, H, W).transpose(2, 3).reshape(B, C2 // 2, 2 * T, H, W)  # [B, C, 2T, h, w]
    h = _silu_norm_padded(decoder.norm1, x, decoder.conv_out.padding[4])
    return _causal_conv(decoder.conv_out, h, padded=True)  # [B, 4, 4T', h, w]


__all__ = ["FRAME_BUDGET_BYTES", "decode_2d", "decode_temporal", "needs_grad", "subpixel_weight", "upsample_conv_2d"]
