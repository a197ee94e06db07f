"""Writes the example inputs of the workflows (run from anywhere; output is deterministic).

    python workflows/inputs/make_inputs.py

opensora_example.png   96x64 still: sky, sun, hills (image-to-video, first frame)
opensora_example_end.png  the same scene at dusk (first + last frame)
opensora_example.mp4   34 frames, 96x64, 24 fps: the sun rising (video extension)
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
H, W = 64, 96


def scene(t: float, dusk: bool = False) -> np.ndarray:
    """uint8 [H, W, 3]: a sky gradient, a sun at height t in [0, 1], green hills."""
    y, x = np.mgrid[0:H, 0:W].astype(np.float32)
    top, bottom = (np.array([40, 30, 90]), np.array([250, 120, 60])) if dusk else (
        np.array([60, 120, 230]), np.array([190, 220, 250]))
    img = top + (bottom - top) * (y / (H - 1))[..., None]
    cx, cy = 30 + 40 * t, 48 - 30 * t
    sun = (x - cx) ** 2 + (y - cy) ** 2 < 64
    img[sun] = [255, 200, 60] if dusk else [255, 240, 120]
    hills = y > 46 + 6 * np.sin(x / 9.0)
    img[hills] = [30, 90, 40] if dusk else [60, 160, 70]
    return np.clip(img, 0, 255).astype(np.uint8)


def main() -> None:
    from PIL import Image

    from opensora_sdk.video_io import write_video

    Image.fromarray(scene(0.2)).save(HERE / "opensora_example.png", optimize=True)
    Image.fromarray(scene(0.9, dusk=True)).save(HERE / "opensora_example_end.png", optimize=True)
    frames = np.stack([scene(i / 33) for i in range(34)])
    write_video(frames, HERE / "opensora_example.mp4", 24.0, crf=28)


if __name__ == "__main__":
    main()
