"""Planning a generation: every user input resolved and checked before any model runs.

`plan_generation` turns processed prompts and settings into a `GenerationPlan`, a plain
dataclass with the output size, frame counts, latent shape, token counts, prompts per loop,
seeds, references and mask strategies, and the sampling schedule. It needs only
`ModelFacts` (numbers from the model configs or the loaded models), so `opensora info`
builds the same plan without loading weights, and a bad input (unknown resolution, too many
frames, a missing reference file, an unknown camera motion, an empty prompt, a malformed mask
strategy) fails here, before T5, the VAE or STDiT3 run.

Every argument is required: defaults are filled in once, at the edge, by
`opensora_sdk.presets.resolve_defaults`. The work is split by concern, each a function a
front end may call on its own (the ComfyUI nodes plan from a LATENT and encoded text):

    plan_prompts     prompts -> processed prompts (cleaning, score suffixes, loop segments)
    plan_size        size, frames, loops -> `SizePlan` (latent shape, tokens, overlap)
    plan_samples     references / conditions / mask strategies / seeds -> `SamplePlan`s
                     (in `opensora_sdk.plan_samples`)
    plan_schedule    steps, guidance, warp -> the scheduler and its timesteps

`ModelFacts` lives in `opensora_sdk.facts`.

Frame limits: one clip (one loop) may have at most `ModelFacts.max_latent_frames` latent
frames, 120 for v1.2: the 408-frame ("16s") clips of its longest training buckets. Longer
videos are made with `loop`: each loop adds N - overlap frames, and then N must be a
multiple of 17 (whole VAE chunks, so the carried-over latents are exactly the previous
clip's last chunks).
"""

from __future__ import annotations

import dataclasses
import math
import os
import warnings
from dataclasses import dataclass, field
from typing import Any, Sequence

from opensora_sdk.conditioning import ImageCondition, VideoCondition
from opensora_sdk.facts import ModelFacts
from opensora_sdk.families import V1_2, ModelFamily
from opensora_sdk.plan_samples import SamplePlan, check_reference_source, check_seed, draw_seed, plan_samples
from opensora_sdk.sizes import model_fps, parse_num_frames, resolve_image_size
from opensora_sdk.text import ProcessedPrompt, process_prompt

# --------------------------------------------------------------------------------------------
# The plan
# --------------------------------------------------------------------------------------------


@dataclass
class GenerationPlan:
    """Everything a generation will do, resolved from the user's arguments."""

    samples: list[SamplePlan]
    negative_prompt: str | None
    height: int
    width: int
    num_frames: int  # pixel frames per loop
    total_frames: int  # pixel frames of the output (loops joined, overlap dropped once)
    loop: int
    condition_frame_length: int  # latent frames carried from one loop to the next
    condition_frame_edit: float
    overlap_frames: int  # pixel frames shared by consecutive loops (0 for one loop)
    latent_channels: int
    latent_size: tuple[int, int, int]  # (T', h, w) of one loop
    video_tokens: int  # STDiT3 tokens per sample: T'_p * H_p * W_p
    text_tokens: int
    fps: float  # output frame rate
    model_fps: int  # the fps the model is conditioned on (120 for one frame)
    num_steps: int
    guidance_scale: float
    timesteps: tuple[float, ...]  # the (warped) sampling schedule
    align: int | None
    batch_size: int
    resolution: str | None = None
    aspect_ratio: str | None = None
    notes: list[str] = field(default_factory=list)
    scheduler: Any = None  # the family's scheduler with num_steps (e.g. a RectifiedFlow)
    family: str = V1_2.name
    sampler: str | None = None  # the family's sampling method (None: its default)
    cache: Any = None  # step caching: a step_cache.TeaCacheConfig / PABConfig, None = off (exact)
    latent_chunk: int = 5  # latent frames per VAE chunk (5 for the v1.2 VAE, 1 for the per-frame SD VAE)

    @property
    def num_samples(self) -> int:
        return len(self.samples)

    @property
    def seeds(self) -> list[int]:
        return [s.seed for s in self.samples]

    @property
    def latent_shape(self) -> tuple[int, int, int, int, int]:
        """[B, C, T', h, w] of one batch of one loop."""
        return (min(self.batch_size, self.num_samples), self.latent_channels, *self.latent_size)

    def with_seeds(self, seeds: Sequence[int]) -> GenerationPlan:
        """The same plan with sample k seeded `seeds[k]` (how ranks adopt rank 0's draw)."""
        samples = [dataclasses.replace(s, seed=int(v)) for s, v in zip(self.samples, seeds, strict=True)]
        return dataclasses.replace(self, samples=samples)

    def batches(self) -> list[list[SamplePlan]]:
        return [self.samples[i : i + self.batch_size] for i in range(0, self.num_samples, self.batch_size)]

    def summary(self) -> str:
        """A human-readable description (what `opensora info` prints)."""
        t, h, w = self.latent_size
        size = f"{self.height}x{self.width} (HxW)"
        if self.resolution and self.aspect_ratio:
            size += f" from resolution {self.resolution}, aspect ratio {self.aspect_ratio} (H:W)"
        frames = f"{self.num_frames}"
        if self.loop > 1:
            frames += (
                f" per loop x {self.loop} loops, {self.overlap_frames} shared -> {self.total_frames} in total"
            )
        lines = [
            f"size:           {size}",
            f"frames:         {frames} ({self.total_frames / self.fps:.2f} s at {self.fps:g} fps; model fps {self.model_fps})",
            f"latent:         [B, C, T', h, w] = {list(self.latent_shape)}",
            f"tokens:         {self.video_tokens} video tokens per sample ({t} x {self.video_tokens // max(t, 1)}), "
            f"{self.text_tokens} text tokens",
            f"sampling:       {self.sampler or 'default sampler'}, {self.num_steps} steps, guidance {self.guidance_scale:g}, "
            f"t = {self.timesteps[0]:.1f} .. {self.timesteps[-1]:.1f}",
            f"samples:        {self.num_samples} in batches of {self.batch_size}, seeds {self.seeds}",
        ]
        if self.cache is not None:
            lines.append(f"step cache:     {self.cache.spec} (approximate: skips or reuses transformer work)")
        for s in self.samples:
            for i, text in enumerate(s.loop_prompts if self.loop > 1 else s.loop_prompts[:1]):
                tag = f"prompt {s.index}" + (f" loop {i}" if self.loop > 1 else "")
                lines.append(f"{tag + ':':<15} {text}")
            if s.references or s.conditions:
                refs = [_describe(r) for r in (s.references or s.conditions)]
                lines.append(f"{'references:':<15} {refs} mask_strategy {s.mask_strategy!r}")
        if self.negative_prompt:
            lines.append(f"negative:       {self.negative_prompt}")
        lines += [f"note:           {n}" for n in self.notes]
        return "\n".join(lines)


def _describe(source) -> str:
    if isinstance(source, (str, os.PathLike)):
        return os.fspath(source)
    if isinstance(source, (ImageCondition, VideoCondition)):
        inner = source.image if isinstance(source, ImageCondition) else source.video
        return f"{type(source).__name__}({_describe(inner)})"
    return type(source).__name__


# --------------------------------------------------------------------------------------------
# Planning
# --------------------------------------------------------------------------------------------


def _positive_int(value, name: str, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name}={value!r} is not allowed: expected an integer >= {minimum}")
    return value


PROMPT_KEYS = ("negative_prompt", "aesthetic_score", "motion_score", "camera_motion")  # plan_prompts' options


@dataclass(frozen=True)
class PromptPlan:
    """The prompts of a call: as given, processed for the text encoder, and the processed
    negative prompt (None: the model's null caption)."""

    prompts: tuple[str, ...]
    processed: tuple[ProcessedPrompt, ...]
    negative: str | None


def plan_prompts(
    prompt: str | Sequence[str],
    *,
    negative_prompt: str | None,
    aesthetic_score: float | None,
    motion_score: float | None,
    camera_motion: str | None,
) -> PromptPlan:
    """Clean the prompts, append the score and camera suffixes, split loop segments. A negative
    prompt that is None, empty or only white space means the model's null caption."""
    prompts = [prompt] if isinstance(prompt, str) else list(prompt) if prompt is not None else []
    if not prompts:
        raise ValueError(f"prompt={prompt!r} is not allowed: give a non-empty string or a list of them")
    processed = []
    for k, p in enumerate(prompts):
        try:
            processed.append(process_prompt(p, aes=aesthetic_score, flow=motion_score, camera_motion=camera_motion))
        except ValueError as err:
            raise ValueError(f"prompt {k}: {err}" if len(prompts) > 1 else str(err)) from None
    negative = None
    if negative_prompt is not None and negative_prompt.strip():
        negative = process_prompt(negative_prompt, aes=None, flow=None, camera_motion=None).text
    return PromptPlan(tuple(prompts), tuple(processed), negative)


@dataclass(frozen=True)
class SizePlan:
    """Output size and length of a generation, and what they mean for the latent."""

    height: int
    width: int
    num_frames: int  # pixel frames per loop
    total_frames: int
    loop: int
    condition_frame_length: int
    overlap_frames: int
    latent_size: tuple[int, int, int]  # (T', h, w) of one loop
    video_tokens: int
    fps: float
    model_fps: int
    resolution: str | None
    aspect_ratio: str | None
    note: str | None = None


def plan_size(
    facts: ModelFacts,
    *,
    resolution: str | None,
    aspect_ratio: str | None,
    height: int | None,
    width: int | None,
    num_frames: int | str,
    fps: float,
    loop: int,
    condition_frame_length: int,
    frame_interval: int = 1,
) -> SizePlan:
    """Sizes, frame counts, the latent and token counts; loops checked against whole chunks.
    The video plays at fps / frame_interval (the model is conditioned on fps)."""
    loop = _positive_int(loop, "loop")
    if isinstance(fps, bool) or not isinstance(fps, (int, float)) or not fps > 0:
        raise ValueError(f"fps={fps!r} is not allowed: expected a positive number")
    size = resolve_image_size(resolution, aspect_ratio, height=height, width=width, multiple=facts.space_factor)
    H, W = size.height, size.width
    frames = parse_num_frames(num_frames)
    T, h, w = facts.latent_size(frames, H, W)
    if facts.fixed_latent_size is not None and (T, h, w) != tuple(facts.fixed_latent_size):
        ft, fh, fw = facts.fixed_latent_size
        f = facts.space_factor
        raise ValueError(
            f"this checkpoint generates {ft}x{fh * f}x{fw * f} (frames x H x W; latent {ft}x{fh}x{fw}) only; got "
            f"{frames}x{H}x{W}: use num_frames={ft}, height={fh * f}, width={fw * f}"
        )
    if facts.max_latent_frames is not None and T > facts.max_latent_frames:
        longest = facts.longest_clip()
        raise ValueError(
            f"num_frames={num_frames!r} ({frames} frames) needs {T} latent frames; this model takes at most "
            f"{facts.max_latent_frames} per clip ({longest} frames). For longer videos use loop=L: each "
            f"loop adds num_frames minus the {condition_frame_length // 5 * 17}-frame overlap"
        )
    overlap = 0
    if loop > 1:
        overlap = facts.carried_frames(condition_frame_length)
        chunk = facts.micro_frame_size or facts.time_factor
        if frames % chunk or overlap >= frames:
            raise ValueError(
                f"num_frames={frames} with loop={loop} and condition_frame_length={condition_frame_length}: each "
                f"clip must be whole {chunk}-frame VAE chunks and longer than the {overlap} frames it carries over; "
                f"allowed: {_loop_frame_choices(facts, overlap, chunk)}"
            )
    tokens = facts.video_tokens(T, h, w)
    return SizePlan(
        height=H, width=W, num_frames=frames, total_frames=loop * frames - (loop - 1) * overlap, loop=loop,
        condition_frame_length=condition_frame_length, overlap_frames=overlap, latent_size=(T, h, w),
        video_tokens=tokens, fps=float(fps) / frame_interval, model_fps=model_fps(frames, fps),
        resolution=None if height is not None else resolution,
        aspect_ratio=None if height is not None else aspect_ratio, note=size.note,
    )  # fmt: skip


def plan_schedule(
    family: ModelFamily, *, num_steps: int, guidance_scale: float, timestep_warp: bool, height: int, width: int,
    num_frames: int, sampler: str | None = None,
):
    """(scheduler, timesteps of one sample) of the family's sampler `sampler` (None: its default)."""
    method = family.sampler(sampler)
    num_steps = _positive_int(num_steps, "num_steps")
    if isinstance(guidance_scale, bool) or not isinstance(guidance_scale, (int, float)) or not math.isfinite(guidance_scale):
        raise ValueError(f"guidance_scale={guidance_scale!r} is not allowed: expected a finite number (1 = no guidance)")
    if not isinstance(timestep_warp, bool):
        raise ValueError(f"timestep_warp={timestep_warp!r} is not allowed: expected True or False (None: the model's default)")
    scheduler = method.make_scheduler(num_steps, timestep_warp)
    return scheduler, method.timesteps(scheduler, height, width, num_frames)


def plan_generation(
    facts: ModelFacts,
    prompts: PromptPlan,
    *,
    resolution: str | None,
    aspect_ratio: str | None,
    height: int | None,
    width: int | None,
    num_frames: int | str,
    fps: float,
    num_steps: int,
    guidance_scale: float,
    timestep_warp: bool,
    conditions,
    reference_path,
    mask_strategy,
    seed: int | None,
    loop: int,
    condition_frame_length: int,
    condition_frame_edit: float,
    align: int | None,
    batch_size: int,
    family: ModelFamily,
    sampler: str | None = None,
    cache=None,
    native_size: tuple[int, int] | None = None,
) -> GenerationPlan:
    """Resolve and check every argument; see `OpenSoraPipeline.__call__` for their meaning.
    `native_size`: the model's own (height, width), e.g. the built-in model's 64x64, the only
    size it was trained at; another size gets a note (and a warning).

    `prompts` comes from `plan_prompts` (or from a front end that processed the text when it
    encoded it). Raises ValueError / TypeError / FileNotFoundError naming the argument, the
    value and what is allowed.
    """
    batch_size = _positive_int(batch_size, "batch_size")
    if not isinstance(condition_frame_edit, (int, float)) or not 0.0 <= condition_frame_edit <= 1.0:
        raise ValueError(f"condition_frame_edit={condition_frame_edit!r} is not allowed: expected a number in [0, 1]")
    if align is not None:
        align = _positive_int(align, "align")
    check_seed(seed, len(prompts.prompts))
    if loop != 1 and not family.loops:
        raise ValueError(f"loop={loop!r} is not allowed: Open-Sora {family.name} models make single clips (loop=1)")
    if not family.conditioning and (reference_path or mask_strategy or conditions):
        raise ValueError(
            f"Open-Sora {family.name} models take no references (reference_path, mask_strategy, conditions): "
            "use a v1.1 or v1.2 model for image-to-video and extension"
        )
    if not family.sampler(sampler).frame_masks and (reference_path or mask_strategy or conditions):
        raise ValueError(
            f"sampler={sampler!r} takes no references (reference_path, mask_strategy, conditions): "
            f"use sampler={family.sampler().name!r} for image-to-video and extension"
        )
    size = plan_size(
        facts, resolution=resolution, aspect_ratio=aspect_ratio, height=height, width=width, num_frames=num_frames,
        fps=fps, loop=loop, condition_frame_length=condition_frame_length, frame_interval=family.frame_interval,
    )
    notes = [size.note] if size.note else []
    samples = plan_samples(
        prompts.prompts, prompts.processed, latent_frames=size.latent_size[0], loop=size.loop, conditions=conditions,
        reference_path=reference_path, mask_strategy=mask_strategy, seed=seed, align=align, notes=notes,
    )
    scheduler, timesteps = plan_schedule(
        family, num_steps=num_steps, guidance_scale=guidance_scale, timestep_warp=timestep_warp, height=size.height,
        width=size.width, num_frames=size.num_frames, sampler=sampler,
    )
    if native_size is not None and (size.height, size.width) != tuple(native_size):
        note = (f"this model makes {native_size[0]}x{native_size[1]} videos (its native size); at "
                f"{size.height}x{size.width} they may not look right")  # fmt: skip
        notes.append(note)
        warnings.warn(note, stacklevel=2)
    return GenerationPlan(
        samples=samples,
        negative_prompt=prompts.negative,
        height=size.height,
        width=size.width,
        num_frames=size.num_frames,
        total_frames=size.total_frames,
        loop=size.loop,
        condition_frame_length=condition_frame_length,
        condition_frame_edit=float(condition_frame_edit),
        overlap_frames=size.overlap_frames,
        latent_channels=facts.latent_channels,
        latent_size=size.latent_size,
        video_tokens=size.video_tokens,
        text_tokens=facts.text_max_length,
        fps=size.fps,
        model_fps=size.model_fps,
        num_steps=num_steps,
        guidance_scale=float(guidance_scale),
        timesteps=timesteps,
        align=align,
        batch_size=batch_size,
        resolution=size.resolution,
        aspect_ratio=size.aspect_ratio,
        notes=notes,
        scheduler=scheduler,
        family=family.name,
        sampler=family.sampler(sampler).name,
        cache=_step_cache(cache, family),
        latent_chunk=facts.latent_size(facts.micro_frame_size, None, None)[0] if facts.micro_frame_size else 1,
    )


def _step_cache(cache, family: ModelFamily):
    """`cache` (a string such as "teacache:0.1", a config or None) as a step_cache config;
    step caching hooks into STDiT3, so v1.2 models only."""
    from opensora_sdk.step_cache import parse_cache

    config = parse_cache(cache)
    if config is not None and family.name != V1_2.name:
        raise ValueError(f"cache={config.spec!r}: step caching is supported for v1.2 models only, not Open-Sora "
                         f"{family.name}; leave cache out")
    return config


def _loop_frame_choices(facts: ModelFacts, overlap: int, chunk: int) -> str:
    """The clip lengths a loop may have on this model, as text (a few, then "...")."""
    longest = facts.longest_clip() if facts.max_latent_frames is not None else None
    values = []
    n = (overlap // chunk + 1) * chunk
    while (longest is None or n <= longest) and len(values) < 6:
        values.append(n)
        n += chunk
    if not values:
        return (f"none: this model's clips hold at most {longest} frames; lower condition_frame_length "
                f"(a multiple of 5 latent frames, {chunk} video frames each)")
    more = longest is None or n <= longest
    return ", ".join(map(str, values)) + (", ..." if more else "") + " frames"


__all__ = [
    "GenerationPlan",
    "ModelFacts",
    "PromptPlan",
    "SamplePlan",
    "SizePlan",
    "check_reference_source",
    "draw_seed",
    "plan_generation",
    "plan_prompts",
    "plan_samples",
    "plan_schedule",
    "plan_size",
]
