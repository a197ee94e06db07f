"""Planning the samples of a call: references, typed conditions and mask strategies, seeds.

`plan_samples` gives one `SamplePlan` per prompt: its loop prompts, its seed (seed + k), its
references (the official string form: paths joined by ';', with a mask strategy) or typed
conditions. Every reference file is checked here, before any model loads: it exists, has a
supported extension and its first frame decodes. The groups are checked against the output's
latent frames: ref_id and target_start in range, notes for groups that never apply, collide
after `align`, or keep the whole output fixed.
"""

from __future__ import annotations

import os
import secrets
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from opensora_sdk.conditioning import (
    ImageCondition,
    VideoCondition,
    conditions_to_groups,
    find_nearest_point,
    parse_mask_strategy,
)
from opensora_sdk.text import ProcessedPrompt

_SEED_RANGE = 2**31


@dataclass
class SamplePlan:
    """One prompt of the call.

    references: the official string form's sources (paths, or PIL images / tensors / Videos)
        in `ref_id` order; `mask_strategy` their groups ("" = none).
    conditions: typed conditions (`ImageCondition`, `VideoCondition`); a sample uses either
        these or the string form. The loop-continuation references are added at run time.
    """

    index: int
    prompt: str
    loop_prompts: tuple[str, ...]
    seed: int
    references: tuple = ()
    mask_strategy: str = ""
    conditions: tuple = ()


def _per_prompt(value, n: int, name: str) -> list:
    """None / one value for every prompt / a list with one entry per prompt."""
    if value is None or isinstance(value, (str, os.PathLike)):
        return [value] * n
    if isinstance(value, (list, tuple)):
        if len(value) == n:
            return list(value)
        raise ValueError(
            f"{name} has {len(value)} entries for {n} prompt(s): give one entry per prompt (several "
            f"references of one prompt are joined with ';' or given as a nested list), or one string for all"
        )
    raise ValueError(f"{name}={value!r} is not allowed: expected a string, or a list with one entry per prompt")


def _split_references(entry, where: str) -> tuple:
    """One prompt's references: "a.png;b.mp4", a list of sources, one object, or None."""
    if entry is None or entry == "":
        return ()
    if isinstance(entry, (str, os.PathLike)):
        parts = [p.strip() for p in os.fspath(entry).split(";")]
        if any(not p for p in parts):
            raise ValueError(f"{where}={os.fspath(entry)!r} has an empty path between ';' separators")
        return tuple(parts)
    if isinstance(entry, (list, tuple)):
        return tuple(entry)
    return (entry,)


def check_reference_source(source, where: str) -> None:
    """A reference path must exist, have a readable extension and decode (its first frame is
    read, so a corrupt file fails here, before any model loads); objects pass through."""
    from opensora_sdk.video_io import IMAGE_SUFFIXES, VIDEO_SUFFIXES, read_image, read_video

    if not isinstance(source, (str, os.PathLike)):
        return
    text = os.fspath(source)
    if "://" in text:
        raise ValueError(f"{where}={text!r}: URLs are not downloaded; download the file and pass its path")
    path = Path(text)
    if not path.is_file():
        raise FileNotFoundError(f"{where}={text!r}: file not found" + (" (it is a folder)" if path.is_dir() else ""))
    if path.suffix.lower() not in VIDEO_SUFFIXES + IMAGE_SUFFIXES:
        raise ValueError(
            f"{where}={text!r}: extension {path.suffix or '(none)'!r} is not supported; videos: "
            f"{', '.join(VIDEO_SUFFIXES)}; images: {', '.join(IMAGE_SUFFIXES)}"
        )
    try:
        if path.suffix.lower() in VIDEO_SUFFIXES:
            read_video(path, max_frames=1)
        else:
            read_image(path)
    except (ValueError, OSError) as err:
        raise ValueError(f"{where}={text!r} cannot be decoded as {'a video' if path.suffix.lower() in VIDEO_SUFFIXES else 'an image'} ({err})") from None


def _conditions_per_prompt(conditions, n: int) -> list[tuple]:
    if conditions is None or len(conditions) == 0:
        return [()] * n
    conditions = list(conditions)
    if all(isinstance(c, (ImageCondition, VideoCondition)) for c in conditions):
        return [tuple(conditions)] * n
    if len(conditions) == n and all(isinstance(c, (list, tuple)) for c in conditions):
        for k, group in enumerate(conditions):
            for j, c in enumerate(group):
                if not isinstance(c, (ImageCondition, VideoCondition)):
                    raise TypeError(f"conditions[{k}][{j}] is {type(c).__name__}; expected ImageCondition or VideoCondition")
        return [tuple(c) for c in conditions]
    raise TypeError(
        "conditions must be a list of ImageCondition / VideoCondition (used for every prompt) or one "
        f"such list per prompt ({n} lists); got {[type(c).__name__ for c in conditions]}"
    )


def _warn(notes: list, message: str) -> None:
    notes.append(message)
    warnings.warn(message, UserWarning, stacklevel=4)


def _check_groups(groups, t_latent: int, n_refs: int, loop: int, align: int | None, where: str, notes: list) -> None:
    """ref_id and target_start of every group; a note for groups that never apply or collide."""
    starts: dict[tuple[int, int], int] = {}
    kept: set[int] = set()  # latent frames of loop 0 that conditions keep fixed
    for g, grp in enumerate(groups):
        what = f"{where} group {g} ({str(grp)!r})"
        if grp.ref_id >= n_refs:
            raise ValueError(
                f"{what}: field ref_id={grp.ref_id} but the prompt has {n_refs} reference(s)"
                + (f" (allowed 0..{n_refs - 1})" if n_refs else "; pass reference_path or conditions")
            )
        if not -t_latent <= grp.target_start < t_latent:
            raise ValueError(
                f"{what}: field target_start={grp.target_start} is outside the {t_latent} latent frames of "
                f"the output (allowed {-t_latent}..{t_latent - 1})"
            )
        if grp.loop >= loop:
            _warn(notes, f"{what} is for loop {grp.loop} but loop={loop}: it never applies")
            continue
        target = grp.target_start % t_latent
        if align is not None:
            target = find_nearest_point(target, align, t_latent)
        if grp.loop == 0 and grp.edit_ratio == 0 and grp.length is not None:
            kept.update(range(target, min(t_latent, target + grp.length)))
        key = (grp.loop, target)
        if key in starts:
            _warn(
                notes,
                f"{where} groups {starts[key]} and {g} both start at latent frame {target} of loop {grp.loop}"
                + (f" after align={align}; pass align=None to place them exactly" if align else "")
            )
        starts[key] = g
    if len(kept) == t_latent:
        _warn(notes, f"{where}: the conditions keep all {t_latent} latent frames of the output fixed, so nothing is "
                     "generated; make the output longer or copy fewer frames (length)")


def draw_seed() -> int:
    """A random base seed (what seed=None means)."""
    return secrets.randbelow(_SEED_RANGE)


def check_seed(seed, num_samples: int = 1) -> int | None:
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**63 - num_samples):
        raise ValueError(f"seed={seed!r} is not allowed: expected an integer >= 0 or None (random)")
    return seed


def plan_samples(
    prompts: Sequence[str],
    processed: Sequence[ProcessedPrompt],
    *,
    latent_frames: int,
    loop: int,
    conditions,
    reference_path,
    mask_strategy,
    seed: int | None,
    align: int | None,
    notes: list[str],
) -> list[SamplePlan]:
    """One `SamplePlan` per prompt: its loop prompts, seed (seed + k), references and groups."""
    n = len(prompts)
    seed = check_seed(seed, n)
    typed = _conditions_per_prompt(conditions, n)
    refs_in = _per_prompt(reference_path, n, "reference_path")
    ms_in = _per_prompt(mask_strategy, n, "mask_strategy")
    base = draw_seed() if seed is None else seed
    samples = []
    for k, pp in enumerate(processed):
        where = f"prompt {k}"
        refs = _split_references(pp.reference_path if pp.reference_path is not None else refs_in[k], "reference_path")
        ms = pp.mask_strategy if pp.mask_strategy is not None else ms_in[k]
        ms = "" if ms is None else str(ms).strip()
        if typed[k] and (refs or ms):
            raise ValueError(
                f"{where}: give typed conditions or reference_path/mask_strategy (also inline JSON), not both"
            )
        for j, r in enumerate(refs):
            check_reference_source(r, f"{where} reference_path[{j}]")
        if refs and not ms:
            ms = "0"
            notes.append(f"{where}: reference_path without mask_strategy; using '0' (reference 0 as the first frame)")
        for j, c in enumerate(typed[k]):
            source = c.image if isinstance(c, ImageCondition) else c.video
            check_reference_source(source, f"{where} conditions[{j}]")
        if typed[k]:
            groups, n_refs = conditions_to_groups(typed[k]), len(typed[k])
        else:
            groups, n_refs = parse_mask_strategy(ms), len(refs)
        _check_groups(groups, latent_frames, n_refs, loop, align, f"{where} mask_strategy", notes)
        samples.append(
            SamplePlan(
                index=k, prompt=prompts[k], loop_prompts=tuple(pp.for_loop(i) for i in range(loop)), seed=base + k,
                references=refs, mask_strategy=ms, conditions=typed[k],
            )
        )
    return samples


__all__ = ["SamplePlan", "check_reference_source", "check_seed", "draw_seed", "plan_samples"]
