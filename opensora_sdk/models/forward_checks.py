"""Argument checks of the transformers' forward (STDiT3, STDiT2, STDiT), with their error messages.

Shapes: latents x [B, C_in, T, H, W]; timestep [B] or a scalar; x_mask [B, T_p]; text y
[B, 1, L, C_text] with mask [B', L]; fps [b]; height, width: pixel sizes (element 0 used).
`check_step_inputs` and `check_conditions` are STDiT3's (`STDiT3.forward`, `step_conditions`);
the parts they are made of serve STDiT2 and STDiT too.
"""

from __future__ import annotations

import torch

from opensora_sdk.models.layers import bf16_round


def check_latents(x, in_channels: int) -> None:
    """x must be a [B, in_channels, T, H, W] tensor."""
    if not isinstance(x, torch.Tensor) or x.ndim != 5 or x.shape[1] != in_channels:
        got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"x must be [B, {in_channels}, T, H, W] (in_channels={in_channels}), got {got}")


def check_timestep(timestep, x: torch.Tensor) -> torch.Tensor:
    """timestep [B] or a scalar, finite -> [B] float32 on x's device."""
    B = x.shape[0]
    timestep = torch.as_tensor(timestep, device=x.device).float()
    if timestep.ndim == 0 or timestep.shape == (1,):
        timestep = timestep.reshape(1).expand(B)
    if timestep.shape != (B,):
        raise ValueError(f"timestep must be [B]=[{B}] or a scalar, got shape {tuple(timestep.shape)}")
    if not bool(torch.isfinite(timestep).all()):
        raise ValueError(f"timestep must be finite, got {timestep.tolist()}")
    return timestep


def check_x_mask(x_mask, B: int, T: int) -> None:
    """x_mask: None or [B, T_p], one flag per latent frame (T_p = T / patch_size[0])."""
    if x_mask is not None and tuple(x_mask.shape) != (B, T):
        raise ValueError(f"x_mask must be [B, T_p] = [{B}, {T}] (one flag per latent frame), got {tuple(x_mask.shape)}")


def check_text(y, mask, B: int, caption_channels: int) -> None:
    """y [B, 1, L, caption_channels]; mask None or [B', L] with B' dividing B and a valid token per row."""
    if y.ndim != 4 or y.shape[0] != B or y.shape[-1] != caption_channels:
        raise ValueError(
            f"y must be [B, 1, L, caption_channels] = [{B}, 1, L, {caption_channels}] with the batch of x "
            f"(under CFG concatenate the null rows to both), got {tuple(y.shape)}"
        )
    if mask is not None:
        L = y.shape[2]
        if mask.ndim != 2 or mask.shape[1] != L or mask.shape[0] == 0 or B % mask.shape[0]:
            raise ValueError(f"mask must be [B', L] with L={L} text tokens and B' dividing B={B}, got {tuple(mask.shape)}")
        empty = (mask.repeat(B // mask.shape[0], 1) != 0).sum(1) == 0
        if bool(empty.any()):
            raise ValueError(
                f"mask rows {empty.nonzero().flatten().tolist()} have no valid text token; every caption "
                "needs at least one (T5 always emits the end-of-sequence token)"
            )


def check_step_inputs(model, x, timestep, x_mask):
    """STDiT3: validate x, timestep and x_mask; return timestep [B] float32."""
    cfg = model.config
    check_latents(x, cfg.in_channels)
    timestep = check_timestep(timestep, x)
    check_x_mask(x_mask, x.shape[0], -(-x.shape[2] // cfg.patch_size[0]))
    return bf16_round(timestep) if model.official_bf16_quantization else timestep


def check_conditions(model, x, y, mask, fps, height, width):
    """STDiT3: validate y, mask, fps, height, width; return (fps [b], height, width) as float32 / floats."""
    cfg = model.config
    B = x.shape[0]
    if not cfg.skip_y_embedder:
        check_text(y, mask, B, cfg.caption_channels)
    for name, value in (("fps", fps), ("height", height), ("width", width)):
        if value is None:
            raise ValueError(f"{name} is required (official pipelines always pass it; e.g. fps=24, pixel height/width)")
    fps = torch.as_tensor(fps, device=x.device).float().reshape(-1)
    if fps.numel() == 0 or B % fps.numel():
        raise ValueError(f"fps must be [b] with b dividing B={B}, got shape {tuple(fps.shape)}")
    height = torch.as_tensor(height).float().reshape(-1)[0]
    width = torch.as_tensor(width).float().reshape(-1)[0]
    if model.official_bf16_quantization:
        fps, height, width = (bf16_round(v) for v in (fps, height, width))
    return fps, height.item(), width.item()
