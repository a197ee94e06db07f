"""A synthetic video dataset: coloured shapes moving over plain, gridded backgrounds.

Each clip shows one shape (circle, square, triangle, ...) of one colour on a background of
another colour with a faint grid. The shape moves left, right, up or down at a constant speed,
or stays still; a camera-like pan or tilt shifts the whole scene (grid and shape together).
The caption names shape, colour, direction and background, e.g.
"a red circle moving left on a blue background" ("a still red circle on a blue background"
when it does not move). The camera motion is not in the caption: it is the `camera` column,
in the official camera-motion words ("pan left", "tilt up", "static"), ready for the
" camera motion: ..." suffix (spec 6.4).

`generate_dataset` writes real H.264 mp4 files (PyAV) and a CSV with the official columns
(path, text, num_frames, height, width, aspect_ratio, fps, resolution, aes, flow) plus the
attributes (shape, color, direction, background, camera, speed) for later evaluation. Paths are
relative to the CSV's folder. Everything is drawn from `numpy.random.default_rng([seed, i])`,
so a seed gives the same clips and captions on every machine.

    python -m opensora_sdk.training.synthetic --out data/shapes --num 1000 --size 64 --frames 51

Columns `aes` and `flow`: `flow` is the on-screen motion in pixels per frame rescaled to a
256-pixel frame (0 for still clips), a stand-in for the official optical-flow score; `aes` is
a placeholder drawn in [4.5, 6.5] (synthetic clips have no aesthetic quality to measure).

`SyntheticStyle` narrows what is drawn (shapes, colours, backgrounds, sizes, travel, and a
"checker" background texture instead of the thin grid); `generate_dataset(exclude=...)` skips
clips for which a predicate on the `ClipSpec` is true (held-out attribute combinations).
"""

from __future__ import annotations

import argparse
import csv
import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

SHAPES = ("circle", "square", "triangle", "diamond", "star", "ring", "hexagon")
COLORS = {
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (40, 80, 220),
    "yellow": (240, 220, 40),
    "purple": (140, 60, 200),
    "orange": (245, 140, 30),
    "white": (245, 245, 245),
    "black": (15, 15, 15),
    "pink": (245, 130, 190),
    "cyan": (40, 210, 220),
}
BACKGROUNDS = ("black", "white", "gray", "blue", "green", "yellow", "purple", "red")
BACKGROUND_RGB = {**COLORS, "gray": (128, 128, 128)}
DIRECTIONS = ("left", "right", "up", "down")
# Official camera-motion words; the scene moves opposite to the camera.
CAMERAS = {"pan left": (1, 0), "pan right": (-1, 0), "tilt up": (0, 1), "tilt down": (0, -1)}
CSV_COLUMNS = (
    "path", "text", "num_frames", "height", "width", "aspect_ratio", "fps", "resolution", "aes", "flow",
    "shape", "color", "direction", "background", "camera", "speed",
)  # fmt: skip
_UNIT = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1), "none": (0, 0)}
_SUPERSAMPLE = 2
TEXTURES = ("grid", "checker")


@dataclass(frozen=True)
class SyntheticStyle:
    """What `sample_clip` draws from (uniformly). The defaults are the original dataset's.

    `radius`: shape radius as a share of the shorter side; `travel`: distance crossed by a
    moving shape as a share of the room it has, over the clip, or over `scene_frames` frames
    when that is longer (the shape then stays inside for all of them, and a clip is the head
    of such a scene, slower than a clip of its own length: room to continue its motion); `texture`: "grid" (thin lines every `grid`
    pixels) or "checker" (tiles of `grid` pixels, alternately `texture_strength` levels
    brighter or darker than the background: smooth enough for a tiny autoencoder, and still
    showing camera pans).
    """

    shapes: tuple = SHAPES
    colors: tuple = tuple(COLORS)
    backgrounds: tuple = BACKGROUNDS
    directions: tuple = DIRECTIONS
    radius: tuple = (0.12, 0.2)
    travel: tuple = (0.35, 0.7)
    texture: str = "grid"
    texture_strength: float = 16.0
    scene_frames: int | None = None

    def __post_init__(self):
        choices = (("shapes", SHAPES), ("colors", tuple(COLORS)), ("backgrounds", BACKGROUNDS), ("directions", DIRECTIONS))
        for name, allowed in choices:
            values = tuple(getattr(self, name))
            if not values or any(v not in allowed for v in values):
                raise ValueError(f"SyntheticStyle.{name}={values!r} is not allowed: choose from {list(allowed)}")
            object.__setattr__(self, name, values)
        for name in ("radius", "travel"):
            low, high = (float(v) for v in getattr(self, name))
            if not 0 < low <= high <= 1:
                raise ValueError(f"SyntheticStyle.{name}={getattr(self, name)!r} is not allowed: expected 0 < low <= high <= 1")
            object.__setattr__(self, name, (low, high))
        if self.scene_frames is not None and (isinstance(self.scene_frames, bool) or not isinstance(self.scene_frames, int)
                                              or self.scene_frames < 2):  # fmt: skip
            raise ValueError(f"SyntheticStyle.scene_frames={self.scene_frames!r} is not allowed: expected an integer >= 2 or None")
        if self.texture not in TEXTURES:
            raise ValueError(f"SyntheticStyle.texture={self.texture!r} is not allowed: choose one of {list(TEXTURES)}")
        if not any(c != b for b in self.backgrounds for c in self.colors):
            raise ValueError("SyntheticStyle: every colour equals every background; a shape needs a colour unlike its background")


@dataclass(frozen=True)
class ClipSpec:
    """Everything that defines one clip. Positions and speeds are in pixels (per frame)."""

    shape: str
    color: str
    background: str
    direction: str  # left | right | up | down | none
    speed: float  # object speed in the scene, px/frame (0 when still)
    camera: str  # static | pan left | pan right | tilt up | tilt down
    camera_speed: float  # px/frame the scene shifts on screen (0 when static)
    x: float  # shape centre at frame 0 (screen pixels)
    y: float
    radius: float
    grid: int  # grid spacing in pixels
    texture: str = "grid"  # grid | checker (see SyntheticStyle)
    texture_strength: float = 16.0


def sample_clip(
    rng: np.random.Generator,
    height: int,
    width: int,
    num_frames: int,
    *,
    static_fraction: float = 0.1,
    camera_fraction: float = 0.25,
    style: SyntheticStyle | None = None,
) -> ClipSpec:
    """Draw a clip whose shape stays fully inside the frame for all `num_frames` frames (all
    `style.scene_frames`, when that is more: the clip is then the head of a longer scene)."""
    style = style or SyntheticStyle()
    shape = style.shapes[rng.integers(len(style.shapes))]
    backgrounds = [b for b in style.backgrounds if any(c != b for c in style.colors)]
    background = backgrounds[rng.integers(len(backgrounds))]
    colors = [c for c in style.colors if c != background]
    color = colors[rng.integers(len(colors))]
    side = min(height, width)
    radius = float(rng.uniform(*style.radius) * side)
    still = rng.random() < static_fraction
    camera = "static"
    if rng.random() < camera_fraction:
        camera = list(CAMERAS)[rng.integers(len(CAMERAS))]
    direction = "none" if still else style.directions[rng.integers(len(style.directions))]
    steps = max(max(num_frames, style.scene_frames or 0) - 1, 1)  # frames over which the travel is spread
    # travel budget on screen: the shape must stay inside with a 1-pixel margin
    room_x, room_y = width - 2 * radius - 2, height - 2 * radius - 2
    cam = CAMERAS.get(camera, (0, 0))
    obj = _UNIT[direction]
    speed = cam_speed = 0.0
    if not still:
        room = room_x if obj[0] else room_y
        speed = float(rng.uniform(*style.travel) * room / steps)
    if camera != "static":
        cam_speed = float(rng.uniform(0.15, 0.3) * min(room_x, room_y) / steps)
    vx, vy = obj[0] * speed + cam[0] * cam_speed, obj[1] * speed + cam[1] * cam_speed
    if abs(vx) * steps > room_x or abs(vy) * steps > room_y:  # opposite motions never exceed; same ones might
        scale = min(room_x / max(abs(vx) * steps, 1e-9), room_y / max(abs(vy) * steps, 1e-9), 1.0)
        speed, cam_speed, vx, vy = speed * scale, cam_speed * scale, vx * scale, vy * scale
    x = _start(rng, width, radius, vx * steps)
    y = _start(rng, height, radius, vy * steps)
    grid = int(rng.integers(max(4, side // 8), max(5, side // 4) + 1))
    return ClipSpec(shape, color, background, direction, speed, camera, cam_speed, x, y, radius, grid,
                    style.texture, float(style.texture_strength))  # fmt: skip


def _start(rng, size: int, radius: float, travel: float) -> float:
    low, high = radius + 1, size - radius - 1
    low, high = (low - travel, high) if travel < 0 else (low, high - travel)
    return float(rng.uniform(low, max(low, high)))


def caption(spec: ClipSpec) -> str:
    if spec.direction == "none":
        return f"a still {spec.color} {spec.shape} on a {spec.background} background"
    return f"a {spec.color} {spec.shape} moving {spec.direction} on a {spec.background} background"


def flow_score(spec: ClipSpec, width: int) -> float:
    """On-screen motion (px/frame), the larger of shape and scene motion, for a 256-px frame."""
    cam = CAMERAS.get(spec.camera, (0, 0))
    obj = _UNIT[spec.direction]
    vx = obj[0] * spec.speed + cam[0] * spec.camera_speed
    vy = obj[1] * spec.speed + cam[1] * spec.camera_speed
    return round(max(math.hypot(vx, vy), spec.camera_speed) * 256 / width, 1)


# --------------------------------------------------------------------------------------------
# Rendering
# --------------------------------------------------------------------------------------------


def _shape_mask(shape: str, dx: np.ndarray, dy: np.ndarray, r: float) -> np.ndarray:
    """Boolean mask of `shape` with centre offsets dx, dy (y grows downwards) and radius r."""
    dist = np.hypot(dx, dy)
    if shape == "circle":
        return dist <= r
    if shape == "ring":
        return (dist <= r) & (dist >= 0.55 * r)
    if shape == "square":
        return (np.abs(dx) <= 0.8 * r) & (np.abs(dy) <= 0.8 * r)
    if shape == "diamond":
        return np.abs(dx) + np.abs(dy) <= r
    if shape == "hexagon":
        return np.maximum(np.abs(dx) * math.cos(math.pi / 6) + np.abs(dy) * 0.5, np.abs(dy)) <= 0.85 * r
    if shape == "triangle":  # apex up, base at 0.7 r below the centre
        inside_base = dy <= 0.7 * r
        return inside_base & (np.abs(dx) <= (dy + r) * 0.9 / 1.7)
    if shape == "star":  # five points
        theta = np.arctan2(dy, dx) + math.pi / 2
        edge = r * (0.5 + 0.5 * np.abs(np.cos(2.5 * theta)) ** 3)
        return dist <= edge
    raise ValueError(f"shape {shape!r} is not one of {list(SHAPES)}")


def render_clip(spec: ClipSpec, height: int, width: int, num_frames: int) -> np.ndarray:
    """uint8 frames [N, H, W, 3] of `spec` (2x supersampled, so edges are anti-aliased)."""
    ss = _SUPERSAMPLE
    yy, xx = np.mgrid[0 : height * ss, 0 : width * ss].astype(np.float32)
    yy, xx = (yy + 0.5) / ss, (xx + 0.5) / ss  # pixel-centre coordinates
    bg = np.asarray(BACKGROUND_RGB[spec.background], np.float32)
    line = bg * 0.75 + (60.0 if bg.mean() < 128 else 0.0)  # faint grid, visible on dark and light
    fg = np.asarray(COLORS[spec.color], np.float32)
    cam = CAMERAS.get(spec.camera, (0, 0))
    obj = _UNIT[spec.direction]
    frames = np.empty((num_frames, height, width, 3), np.uint8)
    for i in range(num_frames):
        sx, sy = cam[0] * spec.camera_speed * i, cam[1] * spec.camera_speed * i  # scene shift
        if spec.texture == "checker":  # tiles alternately brighter / darker than the background
            odd = (np.floor((xx - sx) / spec.grid) + np.floor((yy - sy) / spec.grid)) % 2 == 1
            delta = np.where(odd, spec.texture_strength, -spec.texture_strength).astype(np.float32)
            img = np.clip(bg + delta[..., None], 0, 255)
        else:
            gx, gy = (xx - sx) % spec.grid, (yy - sy) % spec.grid
            on_grid = (gx < 1.0) | (gy < 1.0)
            img = np.where(on_grid[..., None], line, bg)
        cx = spec.x + obj[0] * spec.speed * i + sx
        cy = spec.y + obj[1] * spec.speed * i + sy
        inside = _shape_mask(spec.shape, xx - cx, yy - cy, spec.radius)
        img = np.where(inside[..., None], fg, img)  # [H*ss, W*ss, 3]
        img = img.reshape(height, ss, width, ss, 3).mean(axis=(1, 3))
        frames[i] = np.clip(np.rint(img), 0, 255).astype(np.uint8)
    return frames


# --------------------------------------------------------------------------------------------
# Dataset on disk
# --------------------------------------------------------------------------------------------


def _size(size) -> tuple[int, int]:
    if isinstance(size, int):
        size = (size, size)
    h, w = (int(v) for v in size)
    if h < 16 or w < 16 or h % 2 or w % 2:
        raise ValueError(f"size={size!r} is not allowed: height and width must be even and >= 16 (H.264 yuv420p)")
    return h, w


def generate_dataset(
    out: str | os.PathLike,
    num: int,
    *,
    size: int | tuple[int, int] = 64,
    num_frames: int = 51,
    fps: float = 24.0,
    seed: int = 0,
    static_fraction: float = 0.1,
    camera_fraction: float = 0.25,
    image_fraction: float = 0.0,
    crf: int = 18,
    csv_name: str = "data.csv",
    style: SyntheticStyle | None = None,
    exclude: Callable[[ClipSpec], bool] | None = None,
    max_redraws: int = 1000,
    windows: Sequence[Window] = (),
) -> Path:
    """Write `num` clips under `out/videos/` (or PNG stills under `out/images/`) and `out/<csv_name>`.

    `image_fraction` of the rows are single PNG frames (num_frames 1, fps 120), which the
    training dataset reads as one-frame videos. `style` narrows the draws (`SyntheticStyle`);
    a clip for which `exclude(spec)` is true is drawn again from the same row's RNG (at most
    `max_redraws` times), e.g. to hold attribute combinations out of a training set.

    `windows` (`Window`): instead of the whole clip, each video row gives one row per window,
    a part of its `num_frames`-frame scene (under `out/<window name>/`, with the window's
    frame_mask in a `frame_mask` column); still rows stay as they are. Returns the CSV path.
    """
    from opensora_sdk.video_io import IMG_FPS, write_video

    if isinstance(num, bool) or not isinstance(num, int) or num < 1:
        raise ValueError(f"num={num!r} is not allowed: expected an integer >= 1")
    if isinstance(num_frames, bool) or not isinstance(num_frames, int) or num_frames < 2:
        raise ValueError(f"num_frames={num_frames!r} is not allowed: expected an integer >= 2")
    for name, value in (("static_fraction", static_fraction), ("camera_fraction", camera_fraction),
                        ("image_fraction", image_fraction)):
        if not 0.0 <= float(value) <= 1.0:
            raise ValueError(f"{name}={value!r} is not allowed: expected a number in [0, 1]")
    for w in windows:
        w.check(num_frames)
    height, width = _size(size)
    out = Path(out)
    rows = []
    for i in range(num):
        rng = np.random.default_rng([seed, i])
        image = rng.random() < image_fraction
        n = 1 if image else num_frames
        for _ in range(max_redraws):
            spec = sample_clip(rng, height, width, max(n, 2), static_fraction=static_fraction,
                               camera_fraction=0.0 if image else camera_fraction, style=style)  # fmt: skip
            if image:
                spec = ClipSpec(**{**asdict(spec), "direction": "none", "speed": 0.0})
            if exclude is None or not exclude(spec):
                break
        else:
            raise ValueError(f"row {i}: every one of {max_redraws} draws was excluded; exclude() leaves (almost) nothing")
        frames = render_clip(spec, height, width, n)
        aes = round(float(rng.uniform(4.5, 6.5)), 1)
        parts = [("images" if image else "videos", 0, n, "")]
        if windows and not image:
            parts = [(w.name, w.first_frame(rng), w.num_frames, w.frame_mask) for w in windows]
        for folder, start, count, frame_mask in parts:
            still = count == 1
            rel = Path(folder, f"{i:06d}.png" if still else f"{i:06d}.mp4")
            (out / rel.parent).mkdir(parents=True, exist_ok=True)
            if still:
                write_video(frames[start : start + 1], out / rel, fps=IMG_FPS)
            else:
                write_video(frames[start : start + count], out / rel, fps=fps, crf=crf)
            rows.append({
                "path": rel.as_posix(), "text": caption(spec), "num_frames": count, "height": height, "width": width,
                "aspect_ratio": round(height / width, 4), "fps": IMG_FPS if still else fps,
                "resolution": height * width, "aes": aes,
                "flow": 0.0 if still else flow_score(spec, width), "shape": spec.shape, "color": spec.color,
                "direction": spec.direction, "background": spec.background, "camera": spec.camera,
                "speed": round(spec.speed, 4), **({"frame_mask": frame_mask} if windows else {}),
            })  # fmt: skip
    return write_csv(rows, out / csv_name)


@dataclass(frozen=True)
class Window:
    """A part of every video clip of a dataset, written as its own row (`generate_dataset`).

    `start`: its first frame in the scene, or a (low, high) range drawn per clip (high
    exclusive); `num_frames` 1 writes a PNG still (fps 120, as the training dataset reads
    images); `frame_mask`: the frame-mask type the rows are trained with ("": drawn by the
    configured ratios, `opensora_sdk.training.masks`); `name`: the folder of its files.
    """

    name: str
    start: int | tuple[int, int]
    num_frames: int
    frame_mask: str = ""

    def check(self, scene_frames: int) -> None:
        from opensora_sdk.training.masks import check_mask_type

        low, high = self.start if isinstance(self.start, tuple) else (self.start, self.start + 1)
        if not self.name or "/" in self.name or not 0 <= low < high or self.num_frames < 1 or high - 1 + self.num_frames > scene_frames:
            raise ValueError(f"{self!r} is not allowed: expected a folder name, 0 <= start and start + num_frames <= "
                             f"the {scene_frames} frames of a clip")  # fmt: skip
        if self.frame_mask:
            check_mask_type(self.frame_mask)

    def first_frame(self, rng: np.random.Generator) -> int:
        return int(rng.integers(*self.start)) if isinstance(self.start, tuple) else int(self.start)


def write_csv(rows: list[dict], path: str | os.PathLike, columns=None) -> Path:
    """Write rows to a CSV through `write_file_atomic` (never half-written)."""
    from opensora_sdk.loading import write_file_atomic

    columns = list(columns or (rows[0].keys() if rows else CSV_COLUMNS))

    def write(tmp: Path) -> None:
        with open(tmp, "w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=columns)
            writer.writeheader()
            writer.writerows(rows)

    return write_file_atomic(path, write)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description="Write a synthetic moving-shapes video dataset (mp4 + CSV).")
    p.add_argument("--out", required=True, help="output folder (videos/, images/, data.csv)")
    p.add_argument("--num", type=int, default=100, help="number of clips")
    p.add_argument("--size", default="64", help="frame size: 64 or HxW such as 48x64 (even numbers)")
    p.add_argument("--frames", type=int, default=51, help="frames per clip")
    p.add_argument("--fps", type=float, default=24.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--static-fraction", type=float, default=0.1, help="share of clips whose shape stays still")
    p.add_argument("--camera-fraction", type=float, default=0.25, help="share of clips with a pan or tilt")
    p.add_argument("--image-fraction", type=float, default=0.0, help="share of rows written as PNG stills")
    p.add_argument("--crf", type=int, default=18, help="H.264 quality (0..51, lower is better)")
    args = p.parse_args(argv)
    size = tuple(int(v) for v in args.size.lower().split("x")) if "x" in args.size.lower() else int(args.size)
    path = generate_dataset(
        args.out, args.num, size=size, num_frames=args.frames, fps=args.fps, seed=args.seed,
        static_fraction=args.static_fraction, camera_fraction=args.camera_fraction,
        image_fraction=args.image_fraction, crf=args.crf,
    )  # fmt: skip
    print(f"wrote {args.num} rows to {path}")


if __name__ == "__main__":
    main()
