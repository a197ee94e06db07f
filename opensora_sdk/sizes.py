"""Output sizes: the resolution / aspect-ratio tables, frame-count shorthands and fps.

Aspect-ratio names are **H:W** and table keys are H/W: "9:16" is landscape (240p: 240x426)
and "16:9" is portrait (426x240). The tables are the official ones, value for value:

* "144p" .. "1080p", "2k", "4k": 17 ratios each, the only valid `--aspect-ratio` names.
* "256", "512", "1024", "2048", "2880": PixArt bucket tables with 40 keys from 0.25 to 4.0.
  Their keys are written "0.5" instead of "0.50", so the official `get_image_size` finds only
  "12:25" there; `get_image_size` here matches keys by value and says which names exist;
  `get_image_size_official` keeps the official failure.

Table sizes are kept even when not multiples of 8 (240p "9:16" is 240x426) because the model
and the timestep warp are conditioned on those numbers; the VAE floors each side to a
multiple of 8 (426 -> 53 latent columns -> 424 decoded pixels). Explicit sizes given by the
user are rounded to multiples of 8 instead, so what is decoded is what was asked for; the
transformer pads odd latent sides to its 2x2 patches itself, so 16 is not required.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Mapping

IMG_FPS = 120  # the fps conditioning value the official code uses for single images

NUM_FRAMES_MAP = {
    "1x": 51, "2x": 102, "4x": 204, "8x": 408, "16x": 816,
    "2s": 51, "4s": 102, "8s": 204, "16s": 408, "32s": 816,
}  # fmt: skip

ASPECT_RATIO_MAP = {
    "3:8": "0.38", "9:21": "0.43", "12:25": "0.48", "1:2": "0.50", "9:17": "0.53", "27:50": "0.54",
    "9:16": "0.56", "5:8": "0.62", "2:3": "0.67", "3:4": "0.75", "1:1": "1.00", "4:3": "1.33",
    "3:2": "1.50", "16:9": "1.78", "17:9": "1.89", "2:1": "2.00", "50:27": "2.08",
}  # fmt: skip

# resolution -> (pixel budget, ((H/W key, H, W), ...)) in the official key order.
_TABLES = {
    "144p": (36864, (
        ("0.38", 117, 312), ("0.43", 125, 291), ("0.48", 133, 277), ("0.50", 135, 270), ("0.53", 139, 262),
        ("0.54", 141, 260), ("0.56", 144, 256), ("0.62", 151, 241), ("0.67", 156, 234), ("0.75", 166, 221),
        ("1.00", 192, 192), ("1.33", 221, 165), ("1.50", 235, 156), ("1.78", 256, 144), ("1.89", 263, 139),
        ("2.00", 271, 135), ("2.08", 277, 132),
    )),
    "240p": (102240, (
        ("0.38", 196, 522), ("0.43", 210, 490), ("0.48", 222, 462), ("0.50", 226, 452), ("0.53", 232, 438),
        ("0.54", 236, 436), ("0.56", 240, 426), ("0.62", 252, 404), ("0.67", 262, 393), ("0.75", 276, 368),
        ("1.00", 320, 320), ("1.33", 370, 278), ("1.50", 392, 262), ("1.78", 426, 240), ("1.89", 440, 232),
        ("2.00", 452, 226), ("2.08", 462, 222),
    )),
    "360p": (230400, (
        ("0.38", 294, 784), ("0.43", 314, 732), ("0.48", 332, 692), ("0.50", 340, 680), ("0.53", 350, 662),
        ("0.54", 352, 652), ("0.56", 360, 640), ("0.62", 380, 608), ("0.67", 392, 588), ("0.75", 416, 554),
        ("1.00", 480, 480), ("1.33", 554, 416), ("1.50", 588, 392), ("1.78", 640, 360), ("1.89", 660, 350),
        ("2.00", 678, 340), ("2.08", 692, 332),
    )),
    "480p": (409920, (
        ("0.38", 392, 1046), ("0.43", 420, 980), ("0.48", 444, 925), ("0.50", 452, 904), ("0.53", 466, 880),
        ("0.54", 470, 870), ("0.56", 480, 854), ("0.62", 506, 810), ("0.67", 522, 784), ("0.75", 554, 738),
        ("1.00", 640, 640), ("1.33", 740, 555), ("1.50", 784, 522), ("1.78", 854, 480), ("1.89", 880, 466),
        ("2.00", 906, 454), ("2.08", 924, 444),
    )),
    "720p": (921600, (
        ("0.38", 588, 1568), ("0.43", 628, 1466), ("0.48", 666, 1388), ("0.50", 678, 1356), ("0.53", 698, 1318),
        ("0.54", 706, 1306), ("0.56", 720, 1280), ("0.62", 758, 1212), ("0.67", 784, 1176), ("0.75", 832, 1110),
        ("1.00", 960, 960), ("1.33", 1108, 832), ("1.50", 1176, 784), ("1.78", 1280, 720), ("1.89", 1320, 698),
        ("2.00", 1358, 680), ("2.08", 1386, 666),
    )),
    "1080p": (2073600, (
        ("0.38", 882, 2352), ("0.43", 942, 2198), ("0.48", 998, 2080), ("0.50", 1018, 2036), ("0.53", 1048, 1980),
        ("0.54", 1058, 1958), ("0.56", 1080, 1920), ("0.62", 1138, 1820), ("0.67", 1176, 1764), ("0.75", 1248, 1664),
        ("1.00", 1440, 1440), ("1.33", 1662, 1246), ("1.50", 1764, 1176), ("1.78", 1920, 1080), ("1.89", 1980, 1048),
        ("2.00", 2036, 1018), ("2.08", 2078, 998),
    )),
    "2k": (3686400, (
        ("0.38", 1176, 3136), ("0.43", 1256, 2930), ("0.48", 1330, 2770), ("0.50", 1358, 2716), ("0.53", 1398, 2640),
        ("0.54", 1412, 2612), ("0.56", 1440, 2560), ("0.62", 1518, 2428), ("0.67", 1568, 2352), ("0.75", 1662, 2216),
        ("1.00", 1920, 1920), ("1.33", 2218, 1664), ("1.50", 2352, 1568), ("1.78", 2560, 1440), ("1.89", 2638, 1396),
        ("2.00", 2716, 1358), ("2.08", 2772, 1330),
    )),
    "4k": (8294400, (
        ("0.38", 1764, 4704), ("0.43", 1886, 4400), ("0.48", 1996, 4158), ("0.50", 2036, 4072), ("0.53", 2096, 3960),
        ("0.54", 2118, 3918), ("0.62", 2276, 3642), ("0.56", 2160, 3840), ("0.67", 2352, 3528), ("0.75", 2494, 3326),
        ("1.00", 2880, 2880), ("1.33", 3326, 2494), ("1.50", 3528, 2352), ("1.78", 3840, 2160), ("1.89", 3958, 2096),
        ("2.00", 4072, 2036), ("2.08", 4156, 1994),
    )),
    "256": (65536, (
        ("0.25", 128, 512), ("0.26", 128, 496), ("0.27", 128, 480), ("0.28", 128, 464), ("0.32", 144, 448),
        ("0.33", 144, 432), ("0.35", 144, 416), ("0.4", 160, 400), ("0.42", 160, 384), ("0.48", 176, 368),
        ("0.5", 176, 352), ("0.52", 176, 336), ("0.57", 192, 336), ("0.6", 192, 320), ("0.68", 208, 304),
        ("0.72", 208, 288), ("0.78", 224, 288), ("0.82", 224, 272), ("0.88", 240, 272), ("0.94", 240, 256),
        ("1.0", 256, 256), ("1.07", 256, 240), ("1.13", 272, 240), ("1.21", 272, 224), ("1.29", 288, 224),
        ("1.38", 288, 208), ("1.46", 304, 208), ("1.67", 320, 192), ("1.75", 336, 192), ("2.0", 352, 176),
        ("2.09", 368, 176), ("2.4", 384, 160), ("2.5", 400, 160), ("2.89", 416, 144), ("3.0", 432, 144),
        ("3.11", 448, 144), ("3.62", 464, 128), ("3.75", 480, 128), ("3.88", 496, 128), ("4.0", 512, 128),
    )),
    "2880": (8294400, (
        ("0.25", 1408, 5760), ("0.26", 1408, 5568), ("0.27", 1408, 5376), ("0.28", 1408, 5184), ("0.32", 1600, 4992),
        ("0.33", 1600, 4800), ("0.34", 1600, 4672), ("0.4", 1792, 4480), ("0.42", 1792, 4288), ("0.47", 1920, 4096),
        ("0.49", 1920, 3904), ("0.51", 1920, 3776), ("0.55", 2112, 3840), ("0.59", 2112, 3584), ("0.68", 2304, 3392),
        ("0.72", 2304, 3200), ("0.78", 2496, 3200), ("0.83", 2496, 3008), ("0.89", 2688, 3008), ("0.93", 2688, 2880),
        ("1.0", 2880, 2880), ("1.07", 2880, 2688), ("1.12", 3008, 2688), ("1.21", 3008, 2496), ("1.28", 3200, 2496),
        ("1.39", 3200, 2304), ("1.47", 3392, 2304), ("1.7", 3584, 2112), ("1.82", 3840, 2112), ("2.03", 3904, 1920),
        ("2.13", 4096, 1920), ("2.39", 4288, 1792), ("2.5", 4480, 1792), ("2.92", 4672, 1600), ("3.0", 4800, 1600),
        ("3.12", 4992, 1600), ("3.68", 5184, 1408), ("3.82", 5376, 1408), ("3.95", 5568, 1408), ("4.0", 5760, 1408),
    )),
}  # fmt: skip
# "512", "1024" and "2048" are exactly 2x, 4x and 8x the "256" entries.
for _name, _mult, _pixels in (("512", 2, 262144), ("1024", 4, 1048576), ("2048", 8, 4194304)):
    _TABLES[_name] = (_pixels, tuple((k, h * _mult, w * _mult) for k, h, w in _TABLES["256"][1]))

_ORDER = ("144p", "256", "240p", "360p", "512", "480p", "720p", "1024", "1080p", "2k", "2048", "2880", "4k")

#: resolution -> {"num_pixels": int, "table": {H/W key: (H, W)}}, in the official order.
ASPECT_RATIOS: dict[str, dict] = {
    name: {"num_pixels": _TABLES[name][0], "table": {k: (h, w) for k, h, w in _TABLES[name][1]}}
    for name in _ORDER
}
RESOLUTIONS = tuple(ASPECT_RATIOS)


class AspectRatioNotFound(ValueError, AssertionError):
    """The official lookup failure (an AssertionError there); also a ValueError here."""


def _check_resolution(resolution: str) -> dict:
    if resolution not in ASPECT_RATIOS:
        raise ValueError(f"resolution {resolution!r} is not one of {list(RESOLUTIONS)}")
    return ASPECT_RATIOS[resolution]


def get_num_pixels(resolution: str) -> int:
    """Pixel budget of a resolution name ("240p" -> 102240)."""
    return _check_resolution(resolution)["num_pixels"]


def get_ar(ratio: str) -> float:
    """H/W of an "H:W" name ("9:16" -> 0.5625)."""
    try:
        h, w = (float(x) for x in ratio.split(":"))
        return h / w
    except (ValueError, ZeroDivisionError, AttributeError):
        raise ValueError(f"aspect ratio {ratio!r} must be 'H:W' with positive numbers, e.g. '9:16'") from None


def _key_for(table: Mapping[str, tuple], aspect_ratio: str) -> str | None:
    """The table key for a ratio name or key, matching keys by value ("0.50" == "0.5")."""
    value = ASPECT_RATIO_MAP.get(aspect_ratio, aspect_ratio)
    if value in table:
        return value
    try:
        target = round(float(value), 2)
    except ValueError:
        return None
    return next((k for k in table if round(float(k), 2) == target), None)


def aspect_ratio_names(resolution: str) -> list[str]:
    """The "H:W" names that `get_image_size` resolves at `resolution`."""
    table = _check_resolution(resolution)["table"]
    return [name for name in ASPECT_RATIO_MAP if _key_for(table, name) is not None]


def get_image_size(resolution: str, aspect_ratio: str) -> tuple[int, int]:
    """(H, W) for a resolution name and an "H:W" ratio name (or a table key such as "0.57").

    Raises ValueError naming the valid resolutions, or the ratio names and keys of the table.
    """
    table = _check_resolution(resolution)["table"]
    key = _key_for(table, aspect_ratio)
    if key is None:
        raise ValueError(
            f"aspect_ratio {aspect_ratio!r} has no entry at resolution {resolution!r}; "
            f"valid names (H:W): {aspect_ratio_names(resolution)}; table keys (H/W): {list(table)}"
        )
    return table[key]


def get_image_size_official(resolution: str, aspect_ratio: str) -> tuple[int, int]:
    """The official lookup, failures included: only exact key strings resolve."""
    key = ASPECT_RATIO_MAP[aspect_ratio]
    table = ASPECT_RATIOS[resolution]["table"]
    if key not in table:
        raise AspectRatioNotFound(f"Aspect ratio {aspect_ratio} not found for resolution {resolution}")
    return table[key]


def get_closest_ratio(height: float, width: float, ratios: str | Mapping[str, object]) -> str:
    """The key of `ratios` (a table, or a resolution name) closest to H/W; first key on ties."""
    if isinstance(ratios, str):
        ratios = _check_resolution(ratios)["table"]
    if height <= 0 or width <= 0:
        raise ValueError(f"height and width must be positive, got {height}x{width}")
    ar = height / width
    return min(ratios, key=lambda k: abs(float(k) - ar))


def get_h_w(a: float, ts: int, eps: float = 1e-4) -> tuple[int, int]:
    """Even-ish (H, W) with H/W ~ a and H*W ~ ts: each side rounded up when that is even, else down."""
    h = (ts * a) ** 0.5 + eps
    h = math.ceil(h) if math.ceil(h) % 2 == 0 else math.floor(h)
    w = h / a + eps
    w = math.ceil(w) if math.ceil(w) % 2 == 0 else math.floor(w)
    return h, w


def get_aspect_ratios_dict(ts: int, ratios: Mapping[str, str] = ASPECT_RATIO_MAP) -> dict[str, tuple[int, int]]:
    """A size table for any pixel budget: {f"{H/W:.2f}": get_h_w(H/W, ts)} over the ratio names."""
    out = {}
    for name in ratios:
        a = get_ar(name)
        out[f"{a:.2f}"] = get_h_w(a, ts)
    return out


def parse_num_frames(value: int | str) -> int:
    """Pixel frame count from 51, "51", or a shorthand ("2s"/"1x" -> 51, "4s"/"2x" -> 102 ...)."""
    if isinstance(value, str):
        text = value.strip()
        if text in NUM_FRAMES_MAP:
            return NUM_FRAMES_MAP[text]
        if text.isdigit():
            value = int(text)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(
            f"num_frames {value!r} must be a positive integer or one of {list(NUM_FRAMES_MAP)}"
        )
    return value


def model_fps(num_frames: int, fps: int = 24) -> int:
    """The fps value the model is conditioned on: IMG_FPS (120) for one frame, else `fps`."""
    return IMG_FPS if num_frames == 1 else fps


@dataclass(frozen=True)
class ImageSize:
    """A chosen output size. `note` says how an explicit request was changed (None if not)."""

    height: int
    width: int
    note: str | None = None


def _round_to(value: int, multiple: int, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer number of pixels, got {value!r}")
    return max(multiple, (value + multiple // 2) // multiple * multiple)


def resolve_image_size(
    resolution: str | None = "240p",
    aspect_ratio: str | None = "9:16",
    *,
    height: int | None = None,
    width: int | None = None,
    multiple: int = 8,
) -> ImageSize:
    """The output (H, W): explicit height and width win, else the table entry (a resolution or
    aspect ratio given with them must still name a table entry).

    Explicit sizes are rounded to the nearest multiple of `multiple` (8: the VAE's spatial
    factor; ties round up); when that changes them a UserWarning is issued and
    `ImageSize.note` says so. Table sizes are returned unchanged (see the module docstring).
    """
    if (height is None) != (width is None):
        raise ValueError(f"give both height and width or neither, got height={height!r} width={width!r}")
    if height is not None:
        if resolution is not None:  # the explicit size wins, but a wrong name is still an error
            _check_resolution(resolution)
            if aspect_ratio is not None:
                get_image_size(resolution, aspect_ratio)
        h, w = _round_to(height, multiple, "height"), _round_to(width, multiple, "width")
        note = None
        if (h, w) != (height, width):
            note = f"size {height}x{width} rounded to {h}x{w} (multiples of {multiple} for the VAE)"
            warnings.warn(note, UserWarning, stacklevel=2)
        return ImageSize(h, w, note)
    if resolution is None or aspect_ratio is None:
        raise ValueError("give height and width, or a resolution and an aspect_ratio")
    h, w = get_image_size(resolution, aspect_ratio)
    return ImageSize(h, w)


__all__ = [
    "ASPECT_RATIOS",
    "ASPECT_RATIO_MAP",
    "AspectRatioNotFound",
    "IMG_FPS",
    "ImageSize",
    "NUM_FRAMES_MAP",
    "RESOLUTIONS",
    "aspect_ratio_names",
    "get_ar",
    "get_aspect_ratios_dict",
    "get_closest_ratio",
    "get_h_w",
    "get_image_size",
    "get_image_size_official",
    "get_num_pixels",
    "model_fps",
    "parse_num_frames",
    "resolve_image_size",
]
