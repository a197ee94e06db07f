"""What happens to generated videos on disk: the official file names and the watermark.

Names (spec 6.5, 2.3), for prompt number i (counted from `start_index`) and sample k of
`num_sample`:

    default           {save_dir}/{sample_name or "sample"}_{i:04d}{-k}.mp4
    --prompt-as-path  {save_dir}/{the prompt, sanitised}{-k}.mp4     (existing files are skipped)
    --output FILE     FILE for one video; {stem}_{n:04d}{suffix} beside it for several (n counts
                      every video of the run)

The ``-k`` suffix appears only when num_sample != 1; one-frame outputs are ``.png``.

Watermark (spec 5): an image overlaid on the top-left corner of every frame, scaled to 10%
of the video height with its aspect ratio kept, written beside the video as
``<name>_watermark.mp4`` (the original is kept). The official script runs the system ffmpeg
for this (``scale2ref=oh*mdar:ih*0.1`` + ``overlay``); here Pillow and numpy do the same, so no
ffmpeg binary is needed, and the logo's alpha channel is honoured.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Sequence

DEFAULT_SAVE_DIR = "./samples/samples/"  # the official script's
# The official logo location (relative to the working directory), used by `--watermark` alone.
OFFICIAL_WATERMARK = Path("assets/images/watermark/watermark.png")  # = cli_args.OFFICIAL_WATERMARK
WATERMARK_HEIGHT = 0.1  # of the video height
_NAME_BYTES = 180  # leaves room for "-k", "_watermark", the suffix and the atomic writer's temp name
_UNSAFE = re.compile(r'[\x00-\x1f\x7f<>:"/\\|?*]')


# --------------------------------------------------------------------------------------------
# Names
# --------------------------------------------------------------------------------------------


def prompt_file_name(prompt: str) -> str:
    """A prompt as a file name (without suffix), as `--prompt-as-path` uses it.

    Inline JSON options are dropped; characters no common file system allows in a name
    (``/ \\ : * ? " < > |`` and control characters) become ``_``; runs of white space become one
    space; leading dots and trailing dots and spaces are removed; the name is cut to 180 UTF-8
    bytes. Everything else (commas, apostrophes, non-Latin scripts, case) is kept, so a name
    still matches its prompt (VBench looks videos up by prompt)."""
    text = prompt.split("{", 1)[0] if "{" in prompt else prompt
    text = " ".join(_UNSAFE.sub("_", text).split())
    text = text.lstrip(".").rstrip(". ")
    encoded = text.encode("utf-8")[:_NAME_BYTES]
    text = encoded.decode("utf-8", "ignore").rstrip(". ")
    return text or "prompt"


def sample_file_names(
    prompts: Sequence[str],
    *,
    num_sample: int = 1,
    sample_name: str | None = None,
    start_index: int = 0,
    prompt_as_path: bool = False,
    suffix: str = ".mp4",
) -> list[str]:
    """File names of every sample, prompt by prompt, `num_sample` per prompt (sample k of
    prompt i is entry i * num_sample + k)."""
    names = []
    for i, prompt in enumerate(prompts):
        stem = prompt_file_name(prompt) if prompt_as_path else f"{sample_name or 'sample'}_{start_index + i:04d}"
        for k in range(num_sample):
            names.append(f"{stem}{f'-{k}' if num_sample != 1 else ''}{suffix}")
    return names


def output_paths(output: str | os.PathLike, count: int) -> list[Path]:
    """`--output FILE`: [FILE] for one video, FILE's stem + _0000, _0001, ... for several."""
    path = Path(output).expanduser()
    if count == 1:
        return [path]
    return [path.with_name(f"{path.stem}_{n:04d}{path.suffix}") for n in range(count)]


# --------------------------------------------------------------------------------------------
# Watermark
# --------------------------------------------------------------------------------------------


def _logo(image, video_height: int):
    """The logo as (rgb float [h, w, 3], alpha float [h, w, 1]) scaled to 10% of the video height."""
    import numpy as np
    from PIL import Image

    logo = image if isinstance(image, Image.Image) else Image.open(os.fspath(image))
    logo = logo.convert("RGBA")
    h = max(1, round(video_height * WATERMARK_HEIGHT))
    w = max(1, round(logo.width * h / logo.height))
    rgba = np.asarray(logo.resize((w, h), Image.BICUBIC), dtype=np.float32) / 255.0
    return rgba[..., :3], rgba[..., 3:]


def watermark_frames(frames, image):
    """uint8 frames [N, H, W, 3] with the logo (a path or PIL image) blended onto the top-left
    corner, 10% of H high (a logo wider than the video is cut at the right edge)."""
    import numpy as np

    H, W = frames.shape[1:3]
    rgb, alpha = _logo(image, H)
    h, w = rgb.shape[0], min(rgb.shape[1], W)
    rgb, alpha = rgb[:, :w], alpha[:, :w]
    out = frames.copy()
    region = out[:, :h, :w].astype(np.float32) / 255.0
    out[:, :h, :w] = np.clip((region * (1 - alpha) + rgb * alpha) * 255.0 + 0.5, 0, 255).astype(np.uint8)
    return out


def watermark_path(path: str | os.PathLike, tag: str = "_watermark") -> Path:
    """``x.mp4`` -> ``x_watermark.mp4`` (the official script's name; the demo's is _watermarked)."""
    path = Path(path)
    return path.with_name(f"{path.stem}{tag}{path.suffix}")


def add_watermark(
    video_path: str | os.PathLike, image: str | os.PathLike | None = None, output: str | os.PathLike | None = None
) -> Path:
    """Write a watermarked copy of a video file (default `watermark_path(video_path)`), keeping
    its frame rate and metadata; returns its path. `image` defaults to the official
    ``assets/images/watermark/watermark.png``."""
    from opensora_sdk.video import Video

    image = OFFICIAL_WATERMARK if image is None else Path(image)
    if not Path(image).is_file():
        raise FileNotFoundError(f"watermark image {os.fspath(image)!r} not found: give --watermark IMAGE")
    video = Video.from_file(video_path)
    marked = Video(watermark_frames(video.frames, image), video.fps, video.metadata)
    return marked.save(watermark_path(video_path) if output is None else output)


def check_watermark_image(image: str | os.PathLike) -> Path:
    """Raise now (before any model runs) if the watermark image cannot be read."""
    from PIL import Image, UnidentifiedImageError

    path = Path(image)
    if not path.is_file():
        raise FileNotFoundError(
            f"--watermark: image {os.fspath(image)!r} not found (the official logo is looked for at "
            f"{OFFICIAL_WATERMARK}; give --watermark PATH to use another image)"
        )
    try:
        with Image.open(path) as im:
            im.verify()
    except (UnidentifiedImageError, OSError) as err:
        raise ValueError(f"--watermark: {os.fspath(image)!r} is not a readable image ({err})") from None
    return path


__all__ = [
    "OFFICIAL_WATERMARK",
    "add_watermark",
    "check_watermark_image",
    "prompt_file_name",
    "sample_file_names",
    "watermark_frames",
    "watermark_path",
]
