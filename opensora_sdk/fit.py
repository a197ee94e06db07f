"""Fitting a reference image or video to the output size: crop, pad or stretch.

    crop     resize to cover the output, centre-crop the excess (the official transform,
             `video_io.resize_crop`; what conditioning does by default)
    pad      resize to fit inside the output, centre it on black (-1) borders: all of the
             reference is kept, the model sees bars where it does not reach
    stretch  resize to exactly the output size: all of it is kept, its aspect ratio is not

All three take pixels [3, F, H, W] in [-1, 1] and return [3, F, height, width] float32 in
[-1, 1], resampled as the official image path does (8-bit frames, PIL bicubic) for "pad" and
"stretch"; "crop" is `video_io.resize_crop` with the given `mode`.
"""

from __future__ import annotations

import numpy as np
import torch

FITS = ("crop", "pad", "stretch")


def _uint8_frames(x: torch.Tensor) -> np.ndarray:
    """pixels [3, F, H, W] in [-1, 1] -> uint8 frames [F, H, W, 3]."""
    u8 = ((x.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return u8.permute(1, 2, 3, 0).cpu().numpy()


def _bicubic(frames: np.ndarray, height: int, width: int) -> torch.Tensor:
    """uint8 frames [F, H, W, 3] -> [3, F, height, width] in [-1, 1], PIL bicubic per frame."""
    from PIL import Image

    out = torch.empty(3, len(frames), height, width, dtype=torch.float32)
    for i, frame in enumerate(frames):
        image = Image.fromarray(frame).resize((width, height), Image.Resampling.BICUBIC)
        out[:, i] = torch.from_numpy(np.array(image)).permute(2, 0, 1).float().div(127.5).sub(1)
    return out


def fit_pixels(pixels: torch.Tensor, height: int, width: int, fit: str = "crop", mode: str = "bicubic") -> torch.Tensor:
    """pixels [3, F, H, W] in [-1, 1] -> [3, F, height, width] fitted as `fit` says (see above)."""
    from opensora_sdk.video_io import resize_crop

    if fit not in FITS:
        raise ValueError(f"fit={fit!r} is not allowed: choose one of {list(FITS)}")
    if pixels.dim() != 4 or pixels.shape[0] != 3:
        raise ValueError(f"pixels: expected [3, frames, height, width], got {tuple(pixels.shape)}")
    H, W = pixels.shape[-2:]
    if (H, W) == (height, width):  # the resize is the identity: full precision is kept
        return pixels.float()
    frames = _uint8_frames(pixels)
    if fit == "crop":
        return resize_crop(frames, height, width, mode=mode)
    if fit == "stretch":
        return _bicubic(frames, height, width)
    scale = min(height / H, width / W)
    h, w = max(1, min(height, round(H * scale))), max(1, min(width, round(W * scale)))
    out = torch.full((3, pixels.shape[1], height, width), -1.0)
    top, left = (height - h) // 2, (width - w) // 2
    out[:, :, top : top + h, left : left + w] = _bicubic(frames, h, w)
    return out


__all__ = ["FITS", "fit_pixels"]
