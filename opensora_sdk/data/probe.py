"""Per-file work run in worker processes: decode a video or image and measure it.

Kept light (PyAV, Pillow, numpy; no torch) so spawned workers start fast.
"""

from __future__ import annotations

import math
import os

IMG_FPS = math.nan  # official: images get fps NaN in the meta file


def probe(path: str) -> dict:
    """The info columns of one file, decoding every frame as the official `--info` does.

    num_frames = decoded frame count, fps = the stream's average rate, duration =
    num_frames / fps (images: 1 frame, fps NaN, duration 0). Raises on unreadable files.
    """
    from opensora_sdk.data.table import is_image

    if not os.path.isfile(path):
        raise FileNotFoundError("file not found")
    if is_image(path):
        from PIL import Image

        with Image.open(path) as image:
            image.load()
            width, height = image.size
        return _info(1, height, width, math.nan)
    import av

    with av.open(path) as container:
        if not container.streams.video:
            raise ValueError("no video stream")
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        rate = stream.average_rate or stream.guessed_rate
        fps = float(rate) if rate else math.nan
        n, height, width = 0, stream.codec_context.height, stream.codec_context.width
        for frame in container.decode(stream):
            if n == 0:
                height, width = frame.height, frame.width
                if round((frame.rotation or 0) / 90) % 2:  # displayed turned by 90 degrees
                    height, width = width, height
            n += 1
    if n == 0:
        raise ValueError("no frame could be decoded")
    return _info(n, height, width, fps)


def _info(n: int, height: int, width: int, fps: float) -> dict:
    return {
        "num_frames": n,
        "height": height,
        "width": width,
        "aspect_ratio": height / width if width else math.nan,
        "fps": fps,
        "resolution": height * width,
        "duration": (n / fps) if fps and not math.isnan(fps) else 0.0,
    }


def safe_probe(path: str) -> tuple[dict | None, str]:
    """(info, "") or (None, reason): never raises for a bad file."""
    try:
        return probe(path), ""
    except Exception as err:  # noqa: BLE001 - any decoder failure is a reason, not a crash
        return None, f"{type(err).__name__}: {err}"
