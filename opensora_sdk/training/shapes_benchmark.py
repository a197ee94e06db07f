"""The built-in tiny model's data and its quality measures that need no human.

Data: `BUILTIN_STYLE` narrows the synthetic moving-shapes generator (`synthetic.py`) to six
colours, three shapes, four directions and three backgrounds with a soft checker texture
(camera pans stay visible, and a tiny autoencoder can reproduce it), in scenes of 153 frames
at 24 fps (51 at the model's 8 fps: two loops of 34 frames that share 17) over which a moving
shape crosses 80-100% of the room it has, so a clip of the model's 17 or 34 frames is part of
a scene with room to go on (extension, loops). `held_out_triples`
holds some colour x shape x direction combinations out of training: colour i with shape j
never moves in direction (i + j) mod 4. Every single value, and every pair of values, still
appears in training; the quality benchmark asks for the held-out triples.

Measures, by simple image analysis of uint8 frames [N, H, W, 3]:

* background colour: the mean of the frame border over all frames (the checker tiles
  average out);
* object pixels: those farther than `OBJECT_DISTANCE` (RGB) from the background colour;
* colour: the palette colour nearest to the median object pixel;
* shape: the fill ratio of the object's bounding box (square ~1.0, circle ~0.79, triangle
  ~0.5), the median over the frames where an object is found;
* direction: the centroid's displacement from the first quarter of the frames to the last
  quarter, on the dominant axis (at least `MIN_TRAVEL` of the frame size, else "none");
* first-frame PSNR (image-to-video): the generated first frame against the conditioning image.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from opensora_sdk.training.synthetic import COLORS, ClipSpec, SyntheticStyle, caption, render_clip, sample_clip

BUILTIN_STYLE = SyntheticStyle(
    shapes=("circle", "square", "triangle"),
    colors=("red", "green", "blue", "yellow", "white", "purple"),
    backgrounds=("black", "gray", "white"),
    directions=("left", "right", "up", "down"),
    radius=(0.15, 0.19),
    travel=(0.8, 1.0),
    texture="checker",
    texture_strength=16.0,
    scene_frames=153,
)
CLIP_FPS = 24.0  # frame rate of the built-in model's training clips (a model at 8 fps reads every 3rd frame)
OBJECT_DISTANCE = 60.0  # RGB distance from the background colour that marks object pixels
MIN_PIXELS = 12  # fewer object pixels than this in a frame: no object in that frame
MIN_TRAVEL = 0.08  # shortest displacement (share of the frame size) that counts as motion
SHAPE_FILL = (("triangle", 0.0), ("circle", 0.64), ("square", 0.89))  # fill ratio lower bounds


def held_out_triples(style: SyntheticStyle = BUILTIN_STYLE) -> list[tuple[str, str, str]]:
    """(colour, shape, direction) combinations never shown in training: colour i, shape j and
    direction (i + j) mod len(directions)."""
    dirs = style.directions
    return [(c, s, dirs[(i + j) % len(dirs)]) for i, c in enumerate(style.colors) for j, s in enumerate(style.shapes)]


def is_held_out(spec: ClipSpec, style: SyntheticStyle = BUILTIN_STYLE) -> bool:
    """True for a clip whose colour, shape and direction form a held-out triple."""
    return (spec.color, spec.shape, spec.direction) in set(held_out_triples(style))


@dataclass(frozen=True)
class Case:
    """One benchmark prompt: the caption (no score suffixes) and the attributes to find."""

    prompt: str
    color: str
    shape: str
    direction: str
    background: str


def held_out_cases(style: SyntheticStyle = BUILTIN_STYLE, per_triple: int = 1) -> list[Case]:
    """Prompts for the held-out triples, each on `per_triple` backgrounds (rotating through the
    backgrounds, skipping the one equal to the colour)."""
    cases = []
    for k, (color, shape, direction) in enumerate(held_out_triples(style)):
        backgrounds = [b for b in style.backgrounds if b != color]
        for r in range(per_triple):
            bg = backgrounds[(k + r) % len(backgrounds)]
            spec = ClipSpec(shape, color, bg, direction, 1.0, "static", 0.0, 0.0, 0.0, 1.0, 8)
            cases.append(Case(caption(spec), color, shape, direction, bg))
    return cases


def seen_cases(style: SyntheticStyle = BUILTIN_STYLE, count: int = 18) -> list[Case]:
    """Prompts for `count` triples that training did show (for comparison with the held-out ones)."""
    held = set(held_out_triples(style))
    triples = [(c, s, d) for c in style.colors for s in style.shapes for d in style.directions if (c, s, d) not in held]
    picks = [triples[(k * 7) % len(triples)] for k in range(count)]  # spread over the list
    cases = []
    for k, (color, shape, direction) in enumerate(picks):
        backgrounds = [b for b in style.backgrounds if b != color]
        bg = backgrounds[k % len(backgrounds)]
        spec = ClipSpec(shape, color, bg, direction, 1.0, "static", 0.0, 0.0, 0.0, 1.0, 8)
        cases.append(Case(caption(spec), color, shape, direction, bg))
    return cases


def case_style(case: Case, style: SyntheticStyle = BUILTIN_STYLE) -> SyntheticStyle:
    """`style` narrowed to the case's shape, colour, background and direction."""
    return SyntheticStyle(shapes=(case.shape,), colors=(case.color,), backgrounds=(case.background,),
                          directions=(case.direction,), radius=style.radius, travel=style.travel,
                          texture=style.texture, texture_strength=style.texture_strength,
                          scene_frames=style.scene_frames)  # fmt: skip


def first_frame(case: Case, height: int, width: int, num_frames: int, seed: int, style: SyntheticStyle = BUILTIN_STYLE):
    """A conditioning image for `case`: frame 0 of a clip drawn with its attributes (static camera).
    Returns (uint8 [H, W, 3], the clip's `ClipSpec`)."""
    only = case_style(case, style)
    spec = sample_clip(np.random.default_rng([seed, 7]), height, width, num_frames, static_fraction=0.0,
                       camera_fraction=0.0, style=only)  # fmt: skip
    return render_clip(spec, height, width, 1)[0], spec


def rendered_clip(case: Case, height: int, width: int, num_frames: int, seed: int, frame_interval: int = 1,
                  style: SyntheticStyle = BUILTIN_STYLE) -> np.ndarray:  # fmt: skip
    """uint8 [num_frames, H, W, 3]: a clip with `case`'s attributes (static camera) drawn as the
    training clips are, every `frame_interval`-th frame of (num_frames - 1) * frame_interval + 1."""
    only = case_style(case, style)
    n = (num_frames - 1) * frame_interval + 1
    spec = sample_clip(np.random.default_rng([seed, 11]), height, width, n, static_fraction=0.0,
                       camera_fraction=0.0, style=only)  # fmt: skip
    return render_clip(spec, height, width, n)[::frame_interval]


# --------------------------------------------------------------------------------------------
# Image analysis
# --------------------------------------------------------------------------------------------


def background_color(frames: np.ndarray) -> np.ndarray:
    """Mean RGB of the 2-pixel frame border over all frames [N, H, W, 3] -> [3] float."""
    f = frames.astype(np.float32)
    border = np.concatenate([f[:, :2].reshape(-1, 3), f[:, -2:].reshape(-1, 3),
                             f[:, :, :2].reshape(-1, 3), f[:, :, -2:].reshape(-1, 3)])  # fmt: skip
    return border.mean(0)


def object_masks(frames: np.ndarray, background: np.ndarray | None = None) -> np.ndarray:
    """Boolean [N, H, W]: pixels farther than OBJECT_DISTANCE from the background colour."""
    bg = background_color(frames) if background is None else background
    return np.linalg.norm(frames.astype(np.float32) - bg, axis=-1) > OBJECT_DISTANCE


def nearest_color(rgb, palette=None) -> str:
    palette = palette or BUILTIN_STYLE.colors
    return min(palette, key=lambda name: float(np.linalg.norm(np.asarray(COLORS[name], np.float32) - rgb)))


def fill_ratio(mask: np.ndarray) -> float:
    ys, xs = np.nonzero(mask)
    box = (ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1)
    return float(len(ys) / box)


def shape_of_fill(ratio: float) -> str:
    return [name for name, low in SHAPE_FILL if ratio >= low][-1]


def direction_of_track(track: np.ndarray, height: int, width: int) -> str:
    """Centroids [n, 2] (x, y; NaN rows where no object) -> left/right/up/down or none."""
    valid = track[~np.isnan(track[:, 0])]
    if len(valid) < 4:
        return "none"
    q = max(1, len(valid) // 4)
    dx, dy = valid[-q:].mean(0) - valid[:q].mean(0)
    if abs(dx) >= abs(dy):
        return "none" if abs(dx) < MIN_TRAVEL * width else ("right" if dx > 0 else "left")
    return "none" if abs(dy) < MIN_TRAVEL * height else ("down" if dy > 0 else "up")


def analyse_clip(frames: np.ndarray, palette=None) -> dict:
    """uint8 frames [N, H, W, 3] -> {"color", "shape", "direction", "fill", "found"}.

    `found` is the share of frames with an object (at least MIN_PIXELS object pixels).
    """
    frames = np.asarray(frames)
    N, H, W, _ = frames.shape
    masks = object_masks(frames)
    counts = masks.reshape(N, -1).sum(1)
    present = counts >= MIN_PIXELS
    track = np.full((N, 2), np.nan)
    fills = []
    for i in np.nonzero(present)[0]:
        ys, xs = np.nonzero(masks[i])
        track[i] = xs.mean(), ys.mean()
        fills.append(fill_ratio(masks[i]))
    if not present.any():
        return {"color": "none", "shape": "none", "direction": "none", "fill": math.nan, "found": 0.0}
    pixels = frames[masks & present[:, None, None]].astype(np.float32)  # [P, 3]
    fill = float(np.median(fills))
    return {
        "color": nearest_color(np.median(pixels, axis=0), palette),
        "shape": shape_of_fill(fill),
        "direction": direction_of_track(track, H, W),
        "fill": fill,
        "found": float(present.mean()),
    }


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """PSNR in dB of two uint8 images (peak 255)."""
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return math.inf if mse == 0 else 10 * math.log10(255.0**2 / mse)


# --------------------------------------------------------------------------------------------
# Generation + measurement (a pipeline in, figures out)
# --------------------------------------------------------------------------------------------


def evaluate(pipe, cases: list[Case], *, image_to_video: bool = False, seed: int = 0, batch_size: int = 6,
             **call_kwargs) -> list[dict]:  # fmt: skip
    """Generate each case (text-to-video, or image-to-video from `first_frame`) with the
    pipeline's defaults (size, length, steps, guidance, aes 6.5) unless `call_kwargs` say
    otherwise; case k uses seed + k. Returns one dict per case: the expected and found
    attributes, and for image-to-video the first-frame PSNR."""
    import torch

    from opensora_sdk.conditioning import ImageCondition

    plan = pipe.plan(cases[0].prompt, **call_kwargs)
    H, W, N = plan.height, plan.width, plan.total_frames
    results = []
    for start in range(0, len(cases), batch_size):
        chunk = cases[start : start + batch_size]
        conditions, images = (), []
        if image_to_video:
            images = [first_frame(c, H, W, N, seed + start + k)[0] for k, c in enumerate(chunk)]
            conditions = [[ImageCondition(torch.from_numpy(im).permute(2, 0, 1).float().div(127.5).sub(1))] for im in images]
        videos = pipe([c.prompt for c in chunk], conditions=conditions, seed=seed + start, batch_size=len(chunk),
                      progress=False, **call_kwargs)  # fmt: skip
        for k, (case, video) in enumerate(zip(chunk, videos)):
            row = _result(case, analyse_clip(video.frames))
            if image_to_video:
                row["first_frame_psnr_db"] = psnr(video.frames[0], images[k])
            results.append(row)
    return results


def evaluate_still(pipe, cases: list[Case], *, seed: int = 0, batch_size: int = 6, **call_kwargs) -> list[dict]:
    """Text-to-image: each case as one frame (num_frames=1); colour and shape measured, the
    direction not (want_direction None: left out of the accuracy)."""
    results = []
    for start in range(0, len(cases), batch_size):
        chunk = cases[start : start + batch_size]
        videos = pipe([c.prompt for c in chunk], num_frames=1, seed=seed + start, batch_size=len(chunk),
                      progress=False, **call_kwargs)  # fmt: skip
        for case, video in zip(chunk, videos):
            row = _result(case, analyse_clip(video.frames))
            row["want_direction"] = None
            results.append(row)
    return results


def evaluate_continuation(pipe, cases: list[Case], *, how: str, seed: int = 0, num_frames: int | None = None,
                          **call_kwargs) -> list[dict]:  # fmt: skip
    """Does a video's second part keep the prompted colour and motion? Only the frames after
    the first part are measured.

    how="extension": the case's rendered clip (one VAE chunk: 17 frames at the model's rate)
        continued to `num_frames` (default: the model's loop length, 34 frames for the
        built-in one) with `VideoCondition(clip, ref_start=-5, length=5)`; measured: the
        frames after the clip.
    how="loop": two loops of text-to-video (the second conditioned on the end of the first);
        measured: the frames the second loop added.
    """
    import torch

    from opensora_sdk.conditioning import VideoCondition

    if how not in ("extension", "loop"):
        raise ValueError(f"how={how!r} must be 'extension' or 'loop'")
    results = []
    for k, case in enumerate(cases):
        if how == "extension":
            plan = pipe.plan(case.prompt, loop=2, **call_kwargs)  # the loop length: a clip that carries a chunk over
            frames_out = num_frames or plan.num_frames
            chunk_frames = plan.overlap_frames  # one VAE chunk: 17 frames for the v1.2 VAE
            clip = rendered_clip(case, plan.height, plan.width, chunk_frames, seed + k,
                                 max(1, round(CLIP_FPS / plan.fps)))  # fmt: skip
            pixels = torch.from_numpy(clip).permute(3, 0, 1, 2).float().div(127.5).sub(1)  # [3, F, H, W]
            video = pipe(case.prompt, num_frames=frames_out, seed=seed + k, progress=False,
                         conditions=[VideoCondition(pixels, ref_start=-5, length=5)], **call_kwargs)  # fmt: skip
            second = video.frames[chunk_frames:]
        else:
            video = pipe(case.prompt, loop=2, seed=seed + k, progress=False, **call_kwargs)
            plan = pipe.plan(case.prompt, loop=2, **call_kwargs)
            second = video.frames[plan.num_frames :]
        results.append(_result(case, analyse_clip(second)))
    return results


ATTRIBUTES = ("color", "shape", "direction")


def evaluate_reconstructions(vae, cases: list[Case], *, height: int, width: int, num_frames: int,
                             frame_interval: int = 1, seed: int = 0) -> list[dict]:  # fmt: skip
    """The ceiling the VAE sets: each case's `rendered_clip` encoded and decoded by `vae` (a
    `VideoAutoencoder`, posterior means), then measured like a generated clip."""
    import torch

    results = []
    for k, case in enumerate(cases):
        clip = rendered_clip(case, height, width, num_frames, seed + k, frame_interval)
        x = torch.from_numpy(clip).permute(3, 0, 1, 2)[None].float().div(127.5).sub(1)  # [1, 3, N, H, W]
        with torch.no_grad():
            y = vae.decode(vae.encode(x.to(vae.device, vae.dtype), sample=False), num_frames=num_frames)
        frames = y[0].float().clamp(-1, 1).add(1).mul(127.5).round().byte().permute(1, 2, 3, 0).cpu().numpy()
        results.append(_result(case, analyse_clip(frames)))
    return results


def _result(case: Case, found: dict) -> dict:
    """One result row: the case's attributes (want_*) and what the analysis found (got_*)."""
    return {"prompt": case.prompt, "background": case.background, **{f"want_{a}": getattr(case, a) for a in ATTRIBUTES},
            **{f"got_{a}": found[a] for a in ATTRIBUTES}, "fill": found["fill"], "found": found["found"]}  # fmt: skip


def summarize(results: list[dict]) -> dict:
    """Accuracy per attribute (and first-frame PSNR mean / min where measured); rows whose
    want_<attribute> is None do not count for that attribute."""
    out = {"cases": len(results)}
    for a in ATTRIBUTES:
        hits = [r[f"want_{a}"] == r[f"got_{a}"] for r in results if r[f"want_{a}"] is not None]
        out[f"{a}_accuracy"] = float(np.mean(hits)) if hits else math.nan
    values = [r["first_frame_psnr_db"] for r in results if "first_frame_psnr_db" in r]
    if values:
        out["first_frame_psnr_db_mean"] = float(np.mean(values))
        out["first_frame_psnr_db_min"] = float(np.min(values))
    return out
