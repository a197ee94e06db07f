"""`Video`: the result type of generation, and what the CLI and the ComfyUI nodes save or pass on.

A `Video` holds its frames as a numpy ``uint8`` array ``[N, H, W, 3]`` (RGB), an fps and a
dict of string metadata. numpy (not torch) because the frames are an I/O value: encoders,
Pillow and most user code take numpy, and uint8 is the exact form a video file stores. The
two float views the rest of the SDK needs are one call away:

* ``to_float()``: torch float32 ``[N, H, W, 3]`` in [0, 1], ComfyUI's IMAGE layout;
* ``to_tensor()``: torch float32 ``[3, N, H, W]`` in [-1, 1], the VAE's pixel layout.

``Video.from_tensor`` converts decoded pixels with the official rounding (spec 6.5): clamp to
[-1, 1], map to [0, 1], ``x * 255 + 0.5``, clamp to [0, 255], truncate to uint8.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch

from opensora_sdk.video_io import (
    DEFAULT_FPS,
    _as_frames,
    _check_fps,
    read_metadata,
    read_video,
    write_video,
)


def _quantize(x: torch.Tensor) -> np.ndarray:
    """float32 in [0, 1] (any shape) -> uint8 with the official ``x * 255 + 0.5`` rounding."""
    return x.mul(255).add_(0.5).clamp_(0, 255).to(torch.uint8).numpy()


def _finite_float(x, name: str) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        x = torch.as_tensor(np.asarray(x))
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {x.dtype}")
    x = x.detach().to("cpu", torch.float32)
    bad = int((~torch.isfinite(x)).sum())
    if bad:
        raise ValueError(f"{name} has {bad} NaN or infinite values; cannot convert them to pixels")
    return x


class Video:
    """Frames ``[N, H, W, 3]`` uint8 RGB (numpy), ``fps`` (float) and string ``metadata``.

    The constructor takes uint8 numpy or torch frames ``[N, H, W, 3]`` (or one ``[H, W, 3]``
    image) and keeps a numpy view without copying when the input is already contiguous.
    """

    def __init__(self, frames, fps: float = DEFAULT_FPS, metadata: Mapping[str, str] | None = None):
        self.frames: np.ndarray = _as_frames(frames)  # [N, H, W, 3] uint8
        self.fps: float = _check_fps(fps)
        self.metadata: dict[str, str] = dict(metadata or {})

    # ---- constructors --------------------------------------------------------------------

    @classmethod
    def from_tensor(
        cls, x: torch.Tensor, fps: float = DEFAULT_FPS, metadata: Mapping[str, str] | None = None
    ) -> Video:
        """Model pixels ``[3, N, H, W]`` (or ``[1, 3, N, H, W]``) in [-1, 1] -> Video.

        The official save rounding, computed in float32 (a bf16 input is upcast first; the
        official scripts ran it in the tensor's own dtype). For a batch, convert each sample:
        ``[Video.from_tensor(v, fps) for v in x]``.
        """
        x = _finite_float(x, "x")
        if x.ndim == 5:
            if x.shape[0] != 1:
                raise ValueError(
                    f"x has batch size {x.shape[0]}; Video holds one sample: use "
                    "[Video.from_tensor(v, fps) for v in x]"
                )
            x = x[0]
        if x.ndim != 4 or x.shape[0] != 3:
            raise ValueError(f"x must have shape [3, N, H, W] or [1, 3, N, H, W], got {tuple(x.shape)}")
        x = x.clamp(-1, 1).sub(-1).div(2)  # [0, 1], as torchvision's normalize=True, range (-1, 1)
        return cls(_quantize(x.permute(1, 2, 3, 0)), fps, metadata)  # [N, H, W, 3]

    @classmethod
    def from_images(
        cls, images, fps: float = DEFAULT_FPS, metadata: Mapping[str, str] | None = None
    ) -> Video:
        """ComfyUI IMAGE ``[N, H, W, 3]`` float in [0, 1] (or ``[H, W, 3]``) -> Video.

        Values are clamped to [0, 1] and rounded as ``x * 255 + 0.5``, the inverse of
        ``to_float`` for every uint8 value.
        """
        x = _finite_float(images, "images")
        if x.ndim == 3:
            x = x[None]
        if x.ndim != 4 or x.shape[-1] != 3:
            raise ValueError(f"images must have shape [N, H, W, 3], got {tuple(x.shape)}")
        return cls(_quantize(x.clamp(0, 1)), fps, metadata)

    @classmethod
    def from_file(cls, path: str | os.PathLike, *, max_frames: int | None = None) -> Video:
        """Read frames, fps and metadata from a file (see ``read_video`` / ``read_metadata``)."""
        frames, fps = read_video(path, max_frames=max_frames)
        return cls(frames, fps, read_metadata(path))

    # ---- sizes ---------------------------------------------------------------------------

    @property
    def num_frames(self) -> int:
        return int(self.frames.shape[0])

    @property
    def height(self) -> int:
        return int(self.frames.shape[1])

    @property
    def width(self) -> int:
        return int(self.frames.shape[2])

    @property
    def duration(self) -> float:
        """Seconds: ``num_frames / fps``."""
        return self.num_frames / self.fps

    @property
    def default_suffix(self) -> str:
        """The official choice: ``.png`` for one frame, ``.mp4`` otherwise."""
        return ".png" if self.num_frames == 1 else ".mp4"

    def __len__(self) -> int:
        return self.num_frames

    def __getitem__(self, index: int | slice) -> Video:
        """A frame (as a one-frame Video) or a slice of frames; fps and metadata are kept."""
        if isinstance(index, (int, np.integer)):
            if not -self.num_frames <= index < self.num_frames:
                raise IndexError(f"frame index {index} out of range for {self.num_frames} frames")
            index = slice(int(index) % self.num_frames, int(index) % self.num_frames + 1)
        if not isinstance(index, slice):
            raise TypeError(f"index must be an int or a slice, got {type(index).__name__}")
        frames = self.frames[index]
        if len(frames) == 0:
            raise IndexError(f"slice {index} selects no frames of {self.num_frames}")
        return Video(frames, self.fps, self.metadata)

    def __repr__(self) -> str:
        return (
            f"Video(num_frames={self.num_frames}, height={self.height}, width={self.width}, "
            f"fps={self.fps:g}, metadata_keys={sorted(self.metadata)})"
        )

    # ---- conversions ---------------------------------------------------------------------

    def to_float(self) -> torch.Tensor:
        """float32 ``[N, H, W, 3]`` in [0, 1] (ComfyUI IMAGE)."""
        return torch.from_numpy(self.frames).float().div_(255)

    def to_tensor(self) -> torch.Tensor:
        """float32 ``[3, N, H, W]`` in [-1, 1]: ``(x / 255 - 0.5) / 0.5`` (the official normalise)."""
        return self.to_float().permute(3, 0, 1, 2).sub(0.5).div(0.5)

    # ---- saving --------------------------------------------------------------------------

    def save(
        self,
        path: str | os.PathLike,
        *,
        metadata: Mapping[str, str] | None = None,
        crf: int | None = None,
    ) -> Path:
        """Write to ``.mp4``, ``.webm``, ``.gif``, ``.webp`` or ``.png`` (one frame) atomically.

        ``metadata`` (default: ``self.metadata``) is stored as string tags; see ``write_video``
        for formats, odd sizes in MP4 (padded by edge replication) and ``crf``. Returns the path.
        """
        meta = self.metadata if metadata is None else metadata
        return write_video(self.frames, path, self.fps, metadata=meta, crf=crf)
