"""Writes the example inputs of the workflows (deterministic; run from the repository root):

    python workflows/inputs/make_inputs.py

They look like the built-in model's training clips (a coloured shape on a plain background
with a faint checker, 64x64, 8 fps, crossing the frame in about 51 frames as in the model's
training scenes), so the workflows ask it for what it knows:

opensora_example.png       a red circle on the left of a black background (first frame)
opensora_example_end.png   the same circle 17 frames later (last frame of a 17-frame clip)
opensora_example.mp4       17 frames (8 fps) of the circle moving right, the first third of its
                           crossing (video extension: the model continues it)
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
SIZE, RADIUS, TILE = 64, 11.0, 8
RED, BACKGROUND, CHECKER = (220, 40, 40), (15, 15, 15), 16.0
START, CROSSING, CROSSING_FRAMES = 14.0, 36.0, 50  # x from 14 to 50 over 50 frame steps (0.72 px per frame)


def frame(cx: float, cy: float = 32.0) -> np.ndarray:
    """uint8 [64, 64, 3]: the red circle centred at (cx, cy), 2x supersampled edges."""
    ss = 2
    y, x = (np.mgrid[0 : SIZE * ss, 0 : SIZE * ss].astype(np.float32) + 0.5) / ss
    odd = (np.floor(x / TILE) + np.floor(y / TILE)) % 2 == 1
    img = np.clip(np.asarray(BACKGROUND, np.float32) + np.where(odd, CHECKER, -CHECKER)[..., None], 0, 255)
    inside = (x - cx) ** 2 + (y - cy) ** 2 <= RADIUS**2
    img = np.where(inside[..., None], np.asarray(RED, np.float32), img)
    img = img.reshape(SIZE, ss, SIZE, ss, 3).mean(axis=(1, 3))
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def main() -> None:
    from PIL import Image

    from opensora_sdk.video_io import write_video

    def x(i: int) -> float:
        return START + CROSSING * i / CROSSING_FRAMES

    Image.fromarray(frame(x(0))).save(HERE / "opensora_example.png")
    Image.fromarray(frame(x(16))).save(HERE / "opensora_example_end.png")
    frames = np.stack([frame(x(i)) for i in range(17)])  # the first 17 frames of the crossing
    write_video(frames, HERE / "opensora_example.mp4", 8.0, crf=20)


if __name__ == "__main__":
    main()
