"""Conditioning on references: the mask-strategy mini-language, typed conditions, long-video loops.

A mask strategy is a `;`-separated list of groups `loop,ref_id,ref_start,target_start,length,
edit_ratio` (missing trailing fields take the defaults 0,0,0,0,1,0). Each group of the current
loop pastes `length` latent frames of reference `ref_id`, from `ref_start`, into the latent at
`target_start`, and sets the frame mask there to `edit_ratio` (0 = kept fixed, r in (0, 1) =
kept until t <= r*1000 then regenerated, 1 = ordinary generation). **All indices are latent
frames**; negative starts count from the end. One latent frame is about 4 pixel frames and a
17-frame pixel chunk gives 5 latent frames.

Typed conditions (`ImageCondition`, `VideoCondition`) are written into that same language by
`conditions_to_strategy`, so both forms go through `parse_mask_strategy` and
`apply_mask_strategy`. `encode_conditions` turns typed conditions into reference latents with
a caller-given `encode_fn` (the VAE lives in the pipeline, not here).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable, NamedTuple, Sequence, Union

import torch
from torch import Tensor

MASK_DEFAULT = ("0", "0", "0", "0", "1", "0")
FIELDS = ("loop", "ref_id", "ref_start", "target_start", "length", "edit_ratio")
PIXEL_FRAMES_PER_CHUNK = 17  # pixel frames per 5 latent frames (temporal VAE chunk)
LATENT_FRAMES_PER_CHUNK = 5


class MaskGroup(NamedTuple):
    """One parsed group; compares equal to the official list [loop, ref_id, ..., edit_ratio]."""

    loop: int = 0
    ref_id: int = 0
    ref_start: int = 0
    target_start: int = 0
    length: int = 1
    edit_ratio: float = 0.0

    def __str__(self) -> str:
        return ",".join(str(v) for v in self)


# --------------------------------------------------------------------------------------------
# The string language
# --------------------------------------------------------------------------------------------


def parse_mask_strategy(text: str | None) -> list[MaskGroup]:
    """Parse a mask-strategy string into groups ("" or None -> []).

    Raises ValueError naming the group and the field for malformed input: more than 6
    fields, an empty group or field, a non-integer index, a negative loop / ref_id, a length
    below 1, or an edit_ratio outside [0, 1].
    """
    if text is None or text.strip() == "":
        return []
    groups = []
    for g, part in enumerate(text.split(";")):
        where = f"mask_strategy group {g} ({part!r})"
        fields = part.split(",")
        if part.strip() == "":
            raise ValueError(f"{where} is empty; write groups as {','.join(FIELDS)}")
        if len(fields) > 6:
            raise ValueError(f"{where} has {len(fields)} fields; at most 6: {','.join(FIELDS)}")
        fields = fields + list(MASK_DEFAULT[len(fields) :])
        values = []
        for name, raw in zip(FIELDS, fields):
            try:
                values.append(float(raw) if name == "edit_ratio" else int(raw))
            except ValueError:
                kind = "a number" if name == "edit_ratio" else "an integer"
                raise ValueError(f"{where}: field {name} must be {kind}, got {raw!r}") from None
        group = MaskGroup(*values)
        for name in ("loop", "ref_id"):
            if getattr(group, name) < 0:
                raise ValueError(f"{where}: field {name} must be >= 0, got {getattr(group, name)}")
        if group.length < 1:
            raise ValueError(f"{where}: field length must be >= 1 latent frame, got {group.length}")
        if not 0.0 <= group.edit_ratio <= 1.0:
            raise ValueError(f"{where}: field edit_ratio must be in [0, 1], got {group.edit_ratio}")
        groups.append(group)
    return groups


def format_mask_strategy(groups: Sequence[MaskGroup | Sequence]) -> str:
    """The string form of groups (inverse of `parse_mask_strategy`)."""
    return ";".join(str(MaskGroup(*g)) for g in groups)


def find_nearest_point(value: int, point: int, max_value: int) -> int:
    """Snap `value` to a multiple of `point`: down, or up when past the half-way mark and the
    next multiple stays below the last full block (q < max_value // point - 1)."""
    t = value // point
    if value % point > point / 2 and t < max_value // point - 1:
        t += 1
    return t * point


def _resolve_start(value: int, size: int, where: str, name: str, what: str) -> int:
    if not -size <= value < size:
        raise ValueError(
            f"{where}: field {name}={value} is outside the {size} latent frames of {what} "
            f"(allowed {-size}..{size - 1})"
        )
    return value + size if value < 0 else value


def _apply(z: Tensor, refs, strategies: Sequence[str | None], loop_i: int, align: int | None) -> Tensor:
    """Write references into z (in place) and return the frame mask [B, T] float32."""
    B, C, T = z.shape[:3]
    masks = []
    for b, text in enumerate(strategies):
        mask = torch.ones(T, dtype=torch.float, device=z.device)
        sample_refs = list(refs[b]) if b < len(refs) and refs[b] is not None else []
        for g, grp in enumerate(parse_mask_strategy(text)):
            if grp.loop != loop_i:
                continue
            where = f"sample {b}, mask_strategy group {g} ({str(grp)!r})"
            if grp.ref_id >= len(sample_refs):
                raise ValueError(
                    f"{where}: field ref_id={grp.ref_id} but sample {b} has {len(sample_refs)} "
                    f"reference(s) (allowed 0..{len(sample_refs) - 1})"
                )
            ref = sample_refs[grp.ref_id]  # [C, T_ref, H, W]
            if ref.dim() != 4 or ref.shape[0] != C or ref.shape[2:] != z.shape[3:]:
                raise ValueError(
                    f"{where}: reference {grp.ref_id} has shape {tuple(ref.shape)}; expected "
                    f"[{C}, T_ref, {z.shape[3]}, {z.shape[4]}] latents"
                )
            t_ref = ref.shape[1]
            ref_start = _resolve_start(grp.ref_start, t_ref, where, "ref_start", f"reference {grp.ref_id}")
            target = _resolve_start(grp.target_start, T, where, "target_start", "the output latent")
            if align is not None:
                ref_start = find_nearest_point(ref_start, align, t_ref)
                target = find_nearest_point(target, align, T)
            n = min(grp.length, T - target, t_ref - ref_start)
            z[b, :, target : target + n] = ref[:, ref_start : ref_start + n]
            mask[target : target + n] = grp.edit_ratio
        masks.append(mask)
    return torch.stack(masks)


def apply_mask_strategy(
    z: Tensor,
    refs: Sequence[Sequence[Tensor] | None],
    strategies: Sequence[str | None],
    loop_i: int = 0,
    align: int | None = None,
) -> tuple[Tensor, Tensor]:
    """Paste reference latents into a copy of z and build the frame mask.

    Args:
        z: [B, C, T, H, W] latent (usually the initial noise). Not modified.
        refs: per sample, a list of reference latents [C, T_ref, H, W] (or None / []).
        strategies: per sample, a mask-strategy string ("" or None = no conditioning).
        loop_i: the current loop; groups of other loops are skipped.
        align: if set (the official config uses 5), both starts are snapped with
            `find_nearest_point(start, align, length)` after resolving negative values;
            note that this moves a last-frame condition (-1) onto a multiple of `align`.
    Returns:
        (z_out [B, C, T, H, W], mask [B, T] float32: 1 = generate, else the edit ratio).
        The mask is all ones where nothing applies (the sampler then behaves as unmasked).
    Raises:
        ValueError naming the sample, the group and the field for an unknown ref_id, a start
        outside the reference or the latent, or a reference of the wrong shape.
    """
    if len(strategies) != z.shape[0]:
        raise ValueError(
            f"strategies has {len(strategies)} entries; z has batch {z.shape[0]} (one string per sample)"
        )
    if len(refs) not in (0, z.shape[0]):
        raise ValueError(f"refs has {len(refs)} entries; z has batch {z.shape[0]} (one list per sample)")
    z = z.clone()
    return z, _apply(z, refs, strategies, loop_i, align)


def apply_mask_strategy_official(z: Tensor, refs, strategies, loop_i: int, align: int | None = None):
    """The official calling convention: writes into z in place and returns the mask [B, T],
    or None for an empty strategy list. Invalid groups raise ValueError (see
    `apply_mask_strategy`) where the official code would fail or silently skip them."""
    if len(strategies) == 0:
        return None
    return _apply(z, refs, strategies, loop_i, align)


# --------------------------------------------------------------------------------------------
# Typed conditions
# --------------------------------------------------------------------------------------------

PathLike = Union[str, os.PathLike]


@dataclass
class ImageCondition:
    """One image pinned to one latent frame of the output.

    image: pixels [3, H, W] or [3, 1, H, W] in [-1, 1], a PIL image, or a path.
    frame: latent frame index of the output (0 = first; negative counts from the end, -1 =
        the last latent frame). Latent frame k covers about pixel frames 4k-3..4k of its
        17-frame chunk; an image always fills exactly one latent frame.
    edit_ratio: 0 keeps the frame fixed; r in (0, 1) regenerates it once t <= r * 1000.
    loop: the loop (long-video generation) in which the condition applies.
    fit: how an image of another aspect ratio meets the output (`opensora_sdk.fit`): "crop"
        (cover + centre crop, the official way), "pad" (all of it, black borders) or
        "stretch" (all of it, distorted).
    """

    image: Union[Tensor, "PIL.Image.Image", PathLike]  # noqa: F821
    frame: int = 0
    edit_ratio: float = 0.0
    loop: int = 0
    fit: str = "crop"


@dataclass
class VideoCondition:
    """A span of a reference video placed into the output, for extension and editing.

    video: pixels [3, F, H, W] in [-1, 1], or a path (read by `read_video`).
    ref_start: first latent frame taken from the reference's latents (negative: from its end;
        -5 = the last 5 latent frames, i.e. the last 17 pixel frames).
    target_start: latent frame of the output where the span starts (negative: from the end).
    length: latent frames to copy; None = up to the end of the reference, but leaving at least
        one VAE chunk of the output (5 latent frames) to generate. Clipped to what fits.
    edit_ratio, loop, fit: as for `ImageCondition`.

    Extension: VideoCondition(clip, ref_start=-5, target_start=0, length=5) on an output of
    more than 5 latent frames (34 frames or more): its first chunk continues the clip.
    Editing: VideoCondition(clip, edit_ratio=0.4).
    """

    video: Union[Tensor, PathLike]
    ref_start: int = 0
    target_start: int = 0
    length: int | None = None
    edit_ratio: float = 0.0
    loop: int = 0
    fit: str = "crop"


Condition = Union[ImageCondition, VideoCondition]


def default_span(available: int, output_frames: int | None, target: int) -> int:
    """The latent frames a `VideoCondition` with length=None copies: what the reference has
    from `ref_start` on, but never the whole output: at least one VAE chunk (5 latent frames;
    1 frame for outputs of one chunk or less) after `target` is left to generate."""
    if output_frames is None:
        return available
    target = target % output_frames
    free = LATENT_FRAMES_PER_CHUNK if output_frames > LATENT_FRAMES_PER_CHUNK else 1
    return max(1, min(available, output_frames - target - free))


def conditions_to_groups(
    conditions: Sequence[Condition],
    ref_latent_frames: Sequence[int] | None = None,
    output_frames: int | None = None,
) -> list[MaskGroup]:
    """The mask-strategy groups of typed conditions; condition k uses reference k.

    ref_latent_frames: the latent length of each reference; needed only to resolve a
    `VideoCondition.length` of None (see `default_span`; `output_frames`, the latent frames
    of the output, caps it). Without it such a length stays None (enough for planning
    checks, which read loop, ref_id and target_start only).
    """
    groups = []
    for k, c in enumerate(conditions):
        if isinstance(c, ImageCondition):
            groups.append(MaskGroup(c.loop, k, 0, c.frame, 1, float(c.edit_ratio)))
        elif isinstance(c, VideoCondition):
            length = c.length
            if length is None and ref_latent_frames is not None:
                t_ref = ref_latent_frames[k]
                start = _resolve_start(c.ref_start, t_ref, f"conditions[{k}]", "ref_start", f"reference {k}")
                length = default_span(t_ref - start, output_frames, c.target_start)
            groups.append(MaskGroup(c.loop, k, c.ref_start, c.target_start, length, float(c.edit_ratio)))
        else:
            raise TypeError(f"conditions[{k}] is {type(c).__name__}; expected ImageCondition or VideoCondition")
    return groups


def conditions_to_strategy(
    conditions: Sequence[Condition], ref_latent_frames: Sequence[int] | None = None, output_frames: int | None = None
) -> str:
    """The mask-strategy string of typed conditions (see `conditions_to_groups`)."""
    groups = conditions_to_groups(conditions, ref_latent_frames, output_frames)
    for k, g in enumerate(groups):
        if g.length is None:
            raise ValueError(f"conditions[{k}]: length=None needs ref_latent_frames to resolve it")
    text = format_mask_strategy(groups)
    parse_mask_strategy(text)  # same validation as a user-written string
    return text


def _check_pixels(x: Tensor, what: str) -> Tensor:
    if x.dim() != 4 or x.shape[0] != 3:
        raise ValueError(f"{what}: expected pixels [3, F, H, W] (or [3, H, W] for an image), got {tuple(x.shape)}")
    lo, hi = float(x.min()), float(x.max())
    if lo < -1.01 or hi > 1.01:
        raise ValueError(f"{what}: pixels must be in [-1, 1], got [{lo:.3g}, {hi:.3g}] (from uint8: x / 127.5 - 1)")
    return x


def condition_pixels(
    condition: Condition, height: int, width: int, read_video: Callable[[PathLike], Tensor] | None = None
) -> Tensor:
    """The condition's pixels as [3, F, height, width] float32 in [-1, 1] (F = 1 for images).

    Every route goes through the one official resize (`opensora_sdk.fit.fit_pixels`, "crop"
    being `video_io.resize_crop`'s cover + centre crop): images with PIL bicubic, videos with
    bilinear interpolation. A tensor that needs resizing is taken as 8-bit pixels (quantised
    to the 256 levels a file holds), so a clip passed as a tensor and the same clip passed as
    a file give the same pixels; a tensor already at (height, width) is used as it is (the
    resize is the identity there). `read_video(path)` reads a video path as pixels
    [3, F, H, W] in [-1, 1] (e.g. `video_io.read_video_pixels`).
    """
    from opensora_sdk.fit import fit_pixels
    from opensora_sdk.video_io import load_reference, read_image

    if isinstance(condition, ImageCondition):
        img = condition.image
        if not isinstance(img, Tensor):  # a path or a PIL image: the official image path
            if condition.fit == "crop":
                x = load_reference(img, height, width)
                if x.shape[1] != 1:
                    raise ValueError(f"ImageCondition.image={img!r} is a video; use VideoCondition for videos")
                return x
            import numpy as np

            arr = read_image(img) if isinstance(img, (str, os.PathLike)) else np.asarray(img.convert("RGB"))
            img = torch.from_numpy(np.array(arr)).permute(2, 0, 1).float().div(255).sub(0.5).div(0.5)
        x = img.unsqueeze(1) if img.dim() == 3 else img
        if x.dim() != 4 or x.shape[1] != 1:
            raise ValueError(f"ImageCondition.image: expected [3, H, W] or [3, 1, H, W], got {tuple(img.shape)}")
        return fit_pixels(_check_pixels(x, "ImageCondition.image"), height, width, condition.fit, "bicubic")
    if isinstance(condition, VideoCondition):
        video = condition.video
        if not isinstance(video, Tensor):
            if read_video is None:
                raise ValueError(f"VideoCondition.video is a path ({video!r}); pass read_video to load it")
            video = read_video(video)
        return fit_pixels(_check_pixels(video, "VideoCondition.video"), height, width, condition.fit, "bilinear")
    raise TypeError(f"expected ImageCondition or VideoCondition, got {type(condition).__name__}")


def encode_conditions(
    conditions: Sequence[Condition],
    encode_fn: Callable[[Tensor], Tensor],
    *,
    height: int,
    width: int,
    read_video: Callable[[PathLike], Tensor] | None = None,
    output_frames: int | None = None,
) -> tuple[list[Tensor], str]:
    """References and mask strategy of one sample from typed conditions.

    encode_fn: pixels [1, 3, F, H, W] in [-1, 1] (float32, CPU) -> latents [1, C, T_ref, h, w]
        (the pipeline's VAE encode, moving and casting as it needs).
    output_frames: latent frames of the output (caps a VideoCondition's default length).
    Returns: (references [C, T_ref, h, w] in condition order, mask-strategy string); feed them
    to `apply_mask_strategy(z, [refs], [strategy], loop_i, align)`.
    """
    refs = []
    for c in conditions:
        latent = encode_fn(condition_pixels(c, height, width, read_video).unsqueeze(0))
        if latent.dim() != 5 or latent.shape[0] != 1:
            raise ValueError(f"encode_fn must return [1, C, T, h, w] latents, got {tuple(latent.shape)}")
        refs.append(latent[0])
    return refs, conditions_to_strategy(conditions, [r.shape[1] for r in refs], output_frames)


# --------------------------------------------------------------------------------------------
# Long videos: loop i conditions on the last latent frames of loop i - 1
# --------------------------------------------------------------------------------------------


def condition_pixel_frames(condition_frame_length: int) -> int:
    """Pixel frames shared by consecutive loops: c // 5 * 17 (c latent frames, a multiple of 5)."""
    c = condition_frame_length
    if isinstance(c, bool) or not isinstance(c, int) or c < LATENT_FRAMES_PER_CHUNK or c % LATENT_FRAMES_PER_CHUNK:
        raise ValueError(f"condition_frame_length must be a positive multiple of 5 latent frames, got {c!r}")
    return c // LATENT_FRAMES_PER_CHUNK * PIXEL_FRAMES_PER_CHUNK


def loop_condition_group(
    loop_i: int, ref_id: int, condition_frame_length: int = 5, edit_ratio: float = 0.0, chunk: int = 5
) -> str:
    """The group the official loop appends: f"{loop_i},{ref_id},-{c},0,{c},{edit_ratio}".
    `chunk`: latent frames per VAE chunk (5 for the v1.2 VAE; 1 for the per-frame SD VAE),
    which c must be a multiple of."""
    c = condition_frame_length
    if chunk == LATENT_FRAMES_PER_CHUNK:
        condition_pixel_frames(c)
    elif isinstance(c, bool) or not isinstance(c, int) or c < chunk or c % chunk:
        raise ValueError(f"condition_frame_length must be a positive multiple of {chunk} latent frames, got {c!r}")
    return f"{loop_i},{ref_id},-{c},0,{c},{edit_ratio}"


def append_loop_reference(
    refs: Sequence[Tensor] | None,
    strategy: str | None,
    generated: Tensor,
    loop_i: int,
    condition_frame_length: int = 5,
    edit_ratio: float = 0.0,
    chunk: int = 5,
) -> tuple[list[Tensor], str]:
    """Add the re-encoded previous clip `generated` [C, T, h, w] as a new reference of one
    sample and append the group that copies its last c latent frames to the start of loop i.
    Returns new (refs, strategy); the inputs are not modified."""
    new_refs = list(refs or []) + [generated]
    group = loop_condition_group(loop_i, len(new_refs) - 1, condition_frame_length, edit_ratio, chunk)
    return new_refs, group if not strategy else f"{strategy};{group}"


def looped_num_frames(num_frames: int, loops: int, condition_frame_length: int = 5) -> int:
    """Pixel frames of a looped video: L * N - (L - 1) * (c // 5 * 17)."""
    overlap = condition_pixel_frames(condition_frame_length)
    if loops < 1:
        raise ValueError(f"loops must be >= 1, got {loops}")
    if loops > 1 and overlap >= num_frames:
        raise ValueError(
            f"condition_frame_length={condition_frame_length} ({overlap} pixel frames) must be shorter "
            f"than num_frames={num_frames}"
        )
    return loops * num_frames - (loops - 1) * overlap


def concat_loop_videos(videos: Sequence[Tensor], condition_frame_length: int = 5, time_dim: int = -3) -> Tensor:
    """Concatenate the decoded clips of all loops along time, dropping the first c // 5 * 17
    pixel frames of every clip after the first (they repeat the previous clip's end).

    videos: per loop, [..., F, H, W] pixels (e.g. [C, F, H, W] or [B, C, F, H, W]).
    """
    if len(videos) == 0:
        raise ValueError("videos is empty")
    overlap = condition_pixel_frames(condition_frame_length)
    for i, v in enumerate(videos[1:], start=1):
        if v.shape[time_dim] <= overlap:
            raise ValueError(
                f"videos[{i}] has {v.shape[time_dim]} frames; it needs more than the {overlap} overlap frames"
            )
    parts = [videos[0]] + [v.narrow(time_dim, overlap, v.shape[time_dim] - overlap) for v in videos[1:]]
    return torch.cat(parts, dim=time_dim)


__all__ = [
    "Condition",
    "ImageCondition",
    "MaskGroup",
    "VideoCondition",
    "append_loop_reference",
    "apply_mask_strategy",
    "apply_mask_strategy_official",
    "concat_loop_videos",
    "condition_pixel_frames",
    "condition_pixels",
    "conditions_to_groups",
    "conditions_to_strategy",
    "default_span",
    "encode_conditions",
    "find_nearest_point",
    "format_mask_strategy",
    "loop_condition_group",
    "looped_num_frames",
    "parse_mask_strategy",
]
