"""Video and image files: decode, encode (atomically), and turn references into model tensors.

Layouts used throughout:

* frames: numpy ``uint8`` RGB ``[N, H, W, 3]`` (an image is ``[H, W, 3]``);
* model pixels: torch ``float32`` ``[3, N, H, W]`` in ``[-1, 1]``, i.e. ``(x / 255 - 0.5) / 0.5``.

Reading uses PyAV for containers (mp4, mov, mkv, webm, avi, ...) and Pillow for images and
animated GIF / WebP. Writing supports ``.mp4`` (H.264, yuv420p), ``.webm`` (VP9, yuv420p),
``.gif`` and ``.webp`` (animated, Pillow) and ``.png`` (one frame). Every write goes to a
hidden temporary file in the destination folder and is moved into place with ``os.replace``;
on any error the temporary file is removed, so a path either holds a complete file or is
left as it was.

String metadata is stored where ComfyUI puts its ``prompt`` / ``workflow`` JSON, so files open
in its editor: MP4 container tags (``movflags=use_metadata_tags``), PNG text chunks, WebP EXIF
(``prompt`` in tag 0x0110, other keys in 0x010F, 0x010E, 0x010D as ``"key:value"``), WebM
Matroska tags (the muxer upper-cases names; they read back lower-cased) and, for GIF, one
comment holding a JSON object.
"""

from __future__ import annotations

import json
import os
import random
import secrets
from collections.abc import Mapping, Sequence
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps, UnidentifiedImageError

DEFAULT_FPS = 24.0  # used when a file states no frame rate (the official loader's default)
IMG_FPS = 120.0  # the fps the official code gives still images
VIDEO_SUFFIXES = (".mp4", ".avi", ".mov", ".mkv", ".m4v", ".webm", ".gif")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
SAVE_SUFFIXES = (".mp4", ".webm", ".gif", ".webp", ".png")
RESIZE_MODES = ("bilinear", "bicubic")

_PILLOW_SUFFIXES = IMAGE_SUFFIXES + (".gif",)
_MUXER_TAGS = frozenset({"major_brand", "minor_version", "compatible_brands", "encoder"})
_WEBP_TAGS = (0x0110, 0x010F, 0x010E, 0x010D)  # prompt first, as ComfyUI's SaveAnimatedWEBP
_DEFAULT_CRF = {".mp4": 23, ".webm": 32}  # libx264's own default; a mid VP9 quality
_CRF_RANGE = {".mp4": (0, 51), ".webm": (0, 63)}
_WEBP_QUALITY = 90
_RESIZE_CHUNK = 16  # frames resized at a time (bounds float32 memory on long references)


class VideoReadError(ValueError):
    """A file exists but cannot be decoded (corrupt, truncated, no video stream)."""


# --------------------------------------------------------------------------------------------
# Small checks
# --------------------------------------------------------------------------------------------


def _existing_file(path: str | os.PathLike) -> Path:
    path = Path(os.fspath(path))
    if not path.exists():
        raise FileNotFoundError(f"file not found: {str(path)!r}")
    if path.is_dir():
        raise IsADirectoryError(f"expected a video or image file, got the folder {str(path)!r}")
    return path


def _as_frames(frames, name: str = "frames") -> np.ndarray:
    """numpy or torch uint8 [N, H, W, 3] (or [H, W, 3]) -> contiguous numpy [N, H, W, 3]."""
    if isinstance(frames, torch.Tensor):
        frames = frames.detach().cpu().numpy()
    if not isinstance(frames, np.ndarray):
        raise TypeError(f"{name} must be a numpy array or torch tensor, got {type(frames).__name__}")
    if frames.dtype != np.uint8:
        raise TypeError(
            f"{name} must be uint8 RGB (0..255), got dtype {frames.dtype}; convert float images "
            "in [0, 1] with Video.from_images or [-1, 1] tensors with Video.from_tensor"
        )
    if frames.ndim == 3:
        frames = frames[None]
    if frames.ndim != 4 or frames.shape[-1] != 3 or 0 in frames.shape:
        raise ValueError(f"{name} must have shape [N, H, W, 3] with N, H, W >= 1, got {tuple(frames.shape)}")
    return np.ascontiguousarray(frames)


def _positive_int(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def _check_fps(fps) -> float:
    try:
        value = float(fps)
    except (TypeError, ValueError):
        value = float("nan")
    if not np.isfinite(value) or value <= 0:
        raise ValueError(f"fps must be a positive finite number, got {fps!r}")
    return value


def _check_metadata(metadata: Mapping[str, str] | None, suffix: str) -> dict[str, str]:
    if metadata is None:
        return {}
    if not isinstance(metadata, Mapping):
        raise TypeError(f"metadata must be a dict of str -> str, got {type(metadata).__name__}")
    for key, value in metadata.items():
        if not isinstance(key, str) or not key or len(key) > 79 or not key.isascii():
            raise ValueError(f"metadata key {key!r}: keys must be ASCII strings of 1..79 characters")
        if any(c in key for c in ":=\n\r\t\0"):
            raise ValueError(f"metadata key {key!r}: keys may not contain ':', '=' or control characters")
        if not isinstance(value, str):
            raise TypeError(
                f"metadata[{key!r}] must be a str, got {type(value).__name__}; "
                "serialise structured values first, e.g. json.dumps(workflow)"
            )
    if suffix == ".webp" and len(metadata) > len(_WEBP_TAGS):
        raise ValueError(
            f"metadata has {len(metadata)} keys; a .webp file holds at most {len(_WEBP_TAGS)} "
            "(the EXIF tags ComfyUI uses); use .mp4, .webm, .png or .gif for more"
        )
    return dict(metadata)


# --------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------


def check_writable(path: str | os.PathLike, *, num_frames: int | None = None) -> Path:
    """Raise now if ``path`` cannot be saved to; call it before expensive work.

    Checks the extension (one of ``SAVE_SUFFIXES``), that a ``.png`` gets exactly one frame
    when ``num_frames`` is given, and that the folder exists and accepts a new file (a probe
    file is created and removed). Returns the path as a ``Path``.
    """
    path = Path(os.fspath(path))
    suffix = path.suffix.lower()
    if suffix not in SAVE_SUFFIXES:
        raise ValueError(
            f"cannot save {str(path)!r}: extension {suffix or '(none)'!r} is not supported; "
            f"use one of {', '.join(SAVE_SUFFIXES)}"
        )
    if num_frames is not None and suffix == ".png" and num_frames != 1:
        raise ValueError(
            f"cannot save {num_frames} frames to {str(path)!r}: .png holds one frame; use .mp4, "
            ".webm, .gif or .webp, or save single frames (video[i].save('frame_0000.png'))"
        )
    folder = path.parent
    if not folder.exists():
        raise FileNotFoundError(f"cannot save {str(path)!r}: folder {str(folder)!r} does not exist")
    if not folder.is_dir():
        raise NotADirectoryError(f"cannot save {str(path)!r}: {str(folder)!r} is not a folder")
    if path.is_dir():
        raise IsADirectoryError(f"cannot save {str(path)!r}: a folder with that name exists")
    try:
        probe = _new_temp_file(path)
    except OSError as err:
        raise PermissionError(
            f"cannot save {str(path)!r}: folder {str(folder)!r} is not writable ({err.strerror or err})"
        ) from err
    probe.unlink()
    return path


def _new_temp_file(path: Path) -> Path:
    """Create an empty hidden file beside ``path`` (normal permissions, umask applied)."""
    while True:
        tmp = path.with_name(f".{path.stem}.{secrets.token_hex(4)}.tmp{path.suffix}")
        try:
            os.close(os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
            return tmp
        except FileExistsError:
            continue


def write_video(
    frames,
    path: str | os.PathLike,
    fps: float,
    *,
    metadata: Mapping[str, str] | None = None,
    crf: int | None = None,
) -> Path:
    """Encode ``frames`` (uint8 ``[N, H, W, 3]``) to ``path``; the format follows the extension.

    * ``.mp4``: H.264 (libx264), yuv420p, ``crf`` 0..51 (default 23, libx264's default, which
      the official scripts also got), macroblock-tree rate control off so that the same frames
      always give the same file. yuv420p needs even sizes: an odd height or width is
      padded by repeating the last row / column, so the file is up to one pixel larger and no
      pixel is lost.
    * ``.webm``: VP9, yuv420p, ``crf`` 0..63 (default 32), any size.
    * ``.gif`` / ``.webp``: animated, Pillow (GIF: 256-colour palette per frame; WebP: lossy,
      quality 90). Frame delays are whole milliseconds (GIF: 10 ms units), spread so the total
      duration stays N / fps. Encoders may merge identical consecutive frames into one longer
      frame, so frame count can drop while playback timing stays the same.
    * ``.png``: a single frame; more frames raise ``ValueError`` naming the alternatives.

    The file appears complete or not at all (temporary file + ``os.replace``).
    """
    frames = _as_frames(frames)
    fps = _check_fps(fps)
    path = check_writable(path, num_frames=len(frames))
    suffix = path.suffix.lower()
    metadata = _check_metadata(metadata, suffix)
    if crf is not None:
        if suffix not in _CRF_RANGE:
            raise ValueError(f"crf applies to .mp4 and .webm only, got crf={crf!r} for {str(path)!r}")
        low, high = _CRF_RANGE[suffix]
        if isinstance(crf, bool) or not isinstance(crf, int) or not low <= crf <= high:
            raise ValueError(f"crf for {suffix} must be an integer in [{low}, {high}], got {crf!r}")
    tmp = _new_temp_file(path)
    try:
        if suffix in (".mp4", ".webm"):
            _write_av(frames, tmp, suffix, fps, metadata, _DEFAULT_CRF[suffix] if crf is None else crf)
        else:
            _write_pillow(frames, tmp, suffix, fps, metadata)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def _write_av(frames: np.ndarray, tmp: Path, suffix: str, fps: float, metadata, crf: int) -> None:
    if suffix == ".mp4":
        container_format, codec = "mp4", "libx264"
        # use_metadata_tags keeps arbitrary keys (as ComfyUI); faststart puts the index first
        options = {"movflags": "use_metadata_tags+faststart"}
        # mbtree off: with it this x264 gave a different file for the same frames from one save
        # to the next (its lookahead's propagation varied); without it every save is the same
        codec_options = {"crf": str(crf), "x264-params": "mbtree=0"}
        pad_h, pad_w = frames.shape[1] % 2, frames.shape[2] % 2
        if pad_h or pad_w:  # yuv420p needs even sizes; replicate the edge, lose nothing
            frames = np.pad(frames, ((0, 0), (0, pad_h), (0, pad_w), (0, 0)), mode="edge")
    else:
        container_format, codec, options = "webm", "libvpx-vp9", {}
        codec_options = {"crf": str(crf), "b": "0", "deadline": "good", "cpu-used": "4", "row-mt": "1"}
    rate = Fraction(fps).limit_denominator(1001)
    with av.open(str(tmp), mode="w", format=container_format, options=options) as container:
        container.metadata.update(metadata)
        stream = container.add_stream(codec, rate=rate, options=codec_options)
        stream.height, stream.width = frames.shape[1:3]
        stream.pix_fmt = "yuv420p"
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def _durations_ms(num_frames: int, fps: float, unit: int) -> list[int]:
    """Per-frame delays in multiples of ``unit`` ms whose running sum tracks i * 1000 / fps."""
    ends = [round((i + 1) * 1000.0 / fps / unit) * unit for i in range(num_frames)]
    durations = np.diff([0] + ends).tolist()
    return [max(int(d), unit) for d in durations]


def _write_pillow(frames: np.ndarray, tmp: Path, suffix: str, fps: float, metadata) -> None:
    images = [Image.fromarray(frame) for frame in frames]
    if suffix == ".png":
        from PIL.PngImagePlugin import PngInfo

        info = PngInfo()
        for key, value in metadata.items():
            info.add_text(key, value)  # tEXt, or iTXt for non-Latin-1 text
        images[0].save(tmp, format="PNG", pnginfo=info)
        return
    extra = {}
    if suffix == ".gif":
        fmt, durations = "GIF", _durations_ms(len(images), fps, unit=10)
        if metadata:
            extra["comment"] = json.dumps(metadata)
    else:
        fmt, durations = "WEBP", _durations_ms(len(images), fps, unit=1)
        extra.update(quality=_WEBP_QUALITY, method=4)
        if metadata:
            exif = Image.Exif()
            keys = sorted(metadata, key=lambda k: k != "prompt")
            tags = _WEBP_TAGS if "prompt" in metadata else _WEBP_TAGS[1:] + _WEBP_TAGS[:1]
            for tag, key in zip(tags, keys):
                exif[tag] = f"{key}:{metadata[key]}".encode()  # raw UTF-8 (str would become '?')
            extra["exif"] = exif
    images[0].save(
        tmp, format=fmt, save_all=True, append_images=images[1:], duration=durations, loop=0, **extra
    )


# --------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------


def read_video(
    path: str | os.PathLike,
    *,
    frame_indices: Sequence[int] | np.ndarray | None = None,
    max_frames: int | None = None,
) -> tuple[np.ndarray, float]:
    """Decode a video (or animated GIF / WebP, or a still image) -> (uint8 ``[N, H, W, 3]``, fps).

    * fps is the stream's average rate (24 if the file gives none), as the official loader;
      GIF / WebP: N·1000 / total delay in ms; still images: 120 (the official image fps).
    * Frames come in decode order with no duplication or dropping, so a variable-frame-rate
      file yields its real frames and fps is their average rate.
    * A rotation in the stream's display matrix is applied (multiples of 90 degrees); the
      official loader ignores it, which only matters for files that carry one (phones).
    * ``frame_indices`` keeps those frames, in the given order (repeats allowed); decoding stops
      after the largest. ``max_frames`` keeps the first frames only. Give at most one of them.

    Missing file: ``FileNotFoundError``. Undecodable file: ``VideoReadError`` (a ``ValueError``).
    """
    path = _existing_file(path)
    if frame_indices is not None and max_frames is not None:
        raise ValueError("give frame_indices or max_frames, not both")
    if max_frames is not None:
        max_frames = _positive_int(max_frames, "max_frames")
    wanted = None
    if frame_indices is not None:
        wanted = [int(i) for i in np.asarray(frame_indices).reshape(-1)]
        if not wanted or min(wanted) < 0:
            raise ValueError(f"frame_indices must be a non-empty list of indices >= 0, got {frame_indices!r}")
    stop = max(wanted) + 1 if wanted is not None else max_frames

    if path.suffix.lower() in _PILLOW_SUFFIXES:
        decoded, fps = _read_pillow_frames(path, stop)
    else:
        decoded, fps = _read_av_frames(path, stop)
    if not decoded:
        raise VideoReadError(f"no frames could be decoded from {str(path)!r}")
    if wanted is not None:
        if max(wanted) >= len(decoded):
            raise ValueError(
                f"frame_indices: index {max(wanted)} is out of range for {str(path)!r}, "
                f"which has {len(decoded)} frames (valid: 0..{len(decoded) - 1})"
            )
        decoded = [decoded[i] for i in wanted]
    return np.stack(decoded), fps


def _read_av_frames(path: Path, stop: int | None) -> tuple[list[np.ndarray], float]:
    frames: list[np.ndarray] = []
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise VideoReadError(f"{str(path)!r} has no video stream")
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"
            rate = stream.average_rate or stream.guessed_rate
            fps = float(rate) if rate else DEFAULT_FPS
            size = None
            for frame in container.decode(stream):
                size = size or (frame.width, frame.height)  # keep one size if the stream changes
                array = frame.to_ndarray(format="rgb24", width=size[0], height=size[1])
                quarter_turns = round((frame.rotation or 0) / 90) % 4
                frames.append(np.ascontiguousarray(np.rot90(array, quarter_turns)) if quarter_turns else array)
                if stop is not None and len(frames) >= stop:
                    break
    except av.FFmpegError as err:
        raise VideoReadError(f"cannot decode {str(path)!r}: {err}") from err
    return frames, fps


def _read_pillow_frames(path: Path, stop: int | None) -> tuple[list[np.ndarray], float]:
    frames: list[np.ndarray] = []
    total_ms = 0
    try:
        with Image.open(path) as image:
            count = getattr(image, "n_frames", 1)
            for index in range(count if stop is None else min(count, stop)):
                image.seek(index)
                image.load()
                total_ms += image.info.get("duration") or 0
                source = ImageOps.exif_transpose(image) if count == 1 else image
                frames.append(np.asarray(source.convert("RGB")))
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        raise VideoReadError(f"cannot decode {str(path)!r}: {err}") from err
    if count == 1:
        return frames, IMG_FPS
    return frames, (len(frames) * 1000.0 / total_ms if total_ms > 0 else DEFAULT_FPS)


def read_image(path: str | os.PathLike) -> np.ndarray:
    """One image (the first frame of an animation) -> uint8 ``[H, W, 3]`` RGB.

    Like the official PIL loader (``convert("RGB")``, alpha dropped), plus the EXIF orientation
    of photos, which the official loader ignores.
    """
    path = _existing_file(path)
    frames, _ = _read_pillow_frames(path, stop=1)
    return frames[0]


def read_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The string metadata written by ``write_video`` (or by ComfyUI) as ``{key: value}``.

    Muxer-written MP4 tags (major_brand, minor_version, compatible_brands, encoder) are left
    out. WebM keys come back lower-cased. A GIF comment that is not our JSON object is
    returned as ``{"comment": text}``.
    """
    path = _existing_file(path)
    suffix = path.suffix.lower()
    try:
        if suffix in _PILLOW_SUFFIXES:
            with Image.open(path) as image:
                if suffix == ".png":
                    return {str(k): str(v) for k, v in getattr(image, "text", {}).items()}
                if suffix == ".gif":
                    return _gif_comment(image.info.get("comment"))
                if suffix == ".webp":
                    return _webp_exif(image.getexif())
                return {}
        with av.open(str(path)) as container:
            tags = {k: v for k, v in container.metadata.items() if k.lower() not in _MUXER_TAGS}
            if container.format.name.startswith("matroska"):
                tags = {k.lower(): v for k, v in tags.items()}
            return tags
    except (UnidentifiedImageError, OSError, av.FFmpegError) as err:
        raise VideoReadError(f"cannot read metadata of {str(path)!r}: {err}") from err


def _gif_comment(comment) -> dict[str, str]:
    if not comment:
        return {}
    text = comment.decode("utf-8", "replace") if isinstance(comment, bytes) else str(comment)
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        return {"comment": text}
    if isinstance(value, dict) and all(isinstance(v, str) for v in value.values()):
        return value
    return {"comment": text}


def _webp_exif(exif) -> dict[str, str]:
    out = {}
    for tag in _WEBP_TAGS:
        value = exif.get(tag)
        if isinstance(value, bytes):
            value = value.decode("utf-8", "replace")
        elif isinstance(value, str):  # Pillow decodes ASCII tags as Latin-1; undo it for UTF-8
            try:
                value = value.encode("latin-1").decode("utf-8")
            except (UnicodeEncodeError, UnicodeDecodeError):
                pass
        if isinstance(value, str) and ":" in value:
            key, _, text = value.partition(":")
            out[key.strip("\0")] = text.rstrip("\0")
    return out


# --------------------------------------------------------------------------------------------
# Model inputs: resize-to-cover + centre crop, references, temporal crop
# --------------------------------------------------------------------------------------------


def _cover_size(h: int, w: int, height: int, width: int) -> tuple[int, int]:
    """The official resize target: scale so (height, width) is covered, round() the other side."""
    rh, rw = height / h, width / w
    if rh > rw:
        return height, round(w * rh)
    return round(h * rw), width


def resize_crop(frames, height: int, width: int, mode: str = "bilinear") -> torch.Tensor:
    """uint8 frames ``[N, H, W, 3]`` (or ``[H, W, 3]``) -> float32 ``[3, N, height, width]`` in [-1, 1].

    Resize so that (height, width) is covered (scale = max(height/H, width/W), the other side
    ``round()``-ed), centre crop, normalise ``(x / 255 - 0.5) / 0.5``. The two modes are the
    official video and image transforms exactly, including their different crop offsets:

    * ``"bilinear"`` (videos, ``video_transforms.ResizeCrop``): torch ``interpolate``
      (align_corners=False, no antialias) on ``x / 255``; offset ``int(round(excess) / 2)``,
      i.e. floor(excess / 2).
    * ``"bicubic"`` (images, ``resize_crop_to_fill``): PIL bicubic on the uint8 image; offset
      ``int(round(excess / 2))``, Python's half-to-even rounding (excess 1 -> 0, 3 -> 2, 5 -> 2).
    """
    frames = _as_frames(frames)
    height, width = _positive_int(height, "height"), _positive_int(width, "width")
    if mode not in RESIZE_MODES:
        raise ValueError(f"mode must be one of {RESIZE_MODES}, got {mode!r}")
    n, h, w, _ = frames.shape
    sh, sw = _cover_size(h, w, height, width)
    out = torch.empty(3, n, height, width, dtype=torch.float32)  # [3, N, H, W]
    if mode == "bilinear":
        top, left = int(round(sh - height) / 2.0), int(round(sw - width) / 2.0)
        for start in range(0, n, _RESIZE_CHUNK):
            x = torch.from_numpy(frames[start : start + _RESIZE_CHUNK]).permute(0, 3, 1, 2)  # [n,3,h,w]
            x = F.interpolate(x.float() / 255.0, size=(sh, sw), mode="bilinear", align_corners=False)
            x = x[:, :, top : top + height, left : left + width]  # [n, 3, height, width]
            out[:, start : start + len(x)] = x.permute(1, 0, 2, 3).sub(0.5).div(0.5)
    else:
        top, left = int(round((sh - height) / 2.0)), int(round((sw - width) / 2.0))
        for index, frame in enumerate(frames):
            image = Image.fromarray(frame).resize((sw, sh), Image.Resampling.BICUBIC)
            crop = np.asarray(image)[top : top + height, left : left + width]  # [height, width, 3]
            x = torch.from_numpy(np.array(crop)).permute(2, 0, 1).float().div(255)  # copy: PIL arrays are read-only
            out[:, index] = x.sub(0.5).div(0.5)
    return out


def read_video_pixels(path: str | os.PathLike) -> torch.Tensor:
    """A video file's frames as model pixels ``[3, N, H, W]`` float32 in [-1, 1], at its own size
    (normalised as `resize_crop` does, so both give the same values at the same size)."""
    frames, _ = read_video(path)
    return torch.from_numpy(frames).permute(3, 0, 1, 2).float().div(255).sub(0.5).div(0.5)


def load_reference(source, height: int, width: int) -> torch.Tensor:
    """A conditioning reference -> float32 ``[3, F, height, width]`` in [-1, 1] (spec 6.5).

    ``source`` may be a path, a PIL image, a uint8 array / tensor (``[H, W, 3]`` = an image,
    ``[N, H, W, 3]`` = video frames) or a ``Video``. Images take the official image path
    (PIL bicubic, F = 1); videos take all their frames through the official video path
    (bilinear). Paths are classified by extension: ``VIDEO_SUFFIXES`` (the official .mp4 .avi
    .mov .mkv plus .m4v .webm .gif) are videos, ``IMAGE_SUFFIXES`` are images (an animated
    .webp gives its first frame, as officially).
    """
    if isinstance(source, (str, os.PathLike)):
        suffix = Path(os.fspath(source)).suffix.lower()
        if suffix in VIDEO_SUFFIXES:
            frames, _ = read_video(source)
            return resize_crop(frames, height, width, mode="bilinear")
        if suffix in IMAGE_SUFFIXES:
            return resize_crop(read_image(source), height, width, mode="bicubic")
        raise ValueError(
            f"reference {str(source)!r}: extension {suffix or '(none)'!r} is not supported; "
            f"videos: {', '.join(VIDEO_SUFFIXES)}; images: {', '.join(IMAGE_SUFFIXES)}"
        )
    if isinstance(source, Image.Image):
        return resize_crop(np.asarray(source.convert("RGB")), height, width, mode="bicubic")
    if isinstance(source, (np.ndarray, torch.Tensor)):
        mode = "bicubic" if source.ndim == 3 else "bilinear"
        return resize_crop(source, height, width, mode=mode)
    if hasattr(source, "frames") and hasattr(source, "fps"):  # a Video
        return resize_crop(source.frames, height, width, mode="bilinear")
    raise TypeError(
        "reference must be a path, PIL image, uint8 array/tensor [H,W,3] or [N,H,W,3], or a "
        f"Video; got {type(source).__name__}"
    )


def temporal_crop_indices(
    num_source_frames: int,
    num_frames: int,
    frame_interval: int = 1,
    rng: random.Random | np.random.Generator | np.random.RandomState | torch.Generator | None = None,
) -> np.ndarray:
    """Frame indices of the official training crop (``TemporalRandomCrop``, spec 7.2).

    window = num_frames * frame_interval; begin ~ U{0 .. max(0, F - window - 1)} (both ends
    included); end = min(begin + window, F); indices = linspace(begin, end - 1, num_frames)
    cast to int64 (so a short source repeats frames). ``rng`` draws ``begin``: a
    ``random.Random`` (``randint``, as the official code with the global ``random`` module,
    which ``None`` uses), a numpy ``Generator`` / ``RandomState`` or a ``torch.Generator``.
    """
    total = _positive_int(num_source_frames, "num_source_frames")
    num_frames = _positive_int(num_frames, "num_frames")
    window = num_frames * _positive_int(frame_interval, "frame_interval")
    rand_end = max(0, total - window - 1)
    if rng is None or isinstance(rng, random.Random):
        begin = (rng or random).randint(0, rand_end)
    elif isinstance(rng, np.random.Generator):
        begin = int(rng.integers(0, rand_end, endpoint=True))
    elif isinstance(rng, np.random.RandomState):
        begin = int(rng.randint(0, rand_end + 1))
    elif isinstance(rng, torch.Generator):
        begin = int(torch.randint(rand_end + 1, (1,), generator=rng).item())
    else:
        raise TypeError(
            "rng must be None, random.Random, numpy Generator/RandomState or torch.Generator, "
            f"got {type(rng).__name__}"
        )
    end = min(begin + window, total)
    return np.linspace(begin, end - 1, num_frames).astype(np.int64)
