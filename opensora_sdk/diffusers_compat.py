"""Habits from diffusers' video pipelines, as aliases of the SDK's own names.

`OpenSoraPipeline` accepts the names a diffusers user types first and maps each onto ours;
nothing here is a second generation path (decoded outputs come from `OpenSoraPipeline.generate`,
latents from the same `opensora_sdk.generation` steps without the last decode):

    diffusers                                   opensora-sdk
    from_pretrained(..., torch_dtype=)          dtype=
    num_inference_steps=                        num_steps=
    generator=torch.Generator / [one per video] seed= (sample k: generator k's initial_seed())
    num_videos_per_prompt=n                     each prompt repeated n times in a row
    output_type="np" | "pil" | "pt" | "latent"  a `VideoPipelineOutput` (None: our `Video`s)
    callback_on_step_end=fn(pipe, i, t, kw)     composes with callback(step, total, latent, x0)
    diffusers.utils.export_to_video             opensora_sdk.export_to_video (our atomic save)

Layouts follow diffusers' `VideoProcessor.postprocess_video` (CogVideoX, LTX, Mochi ...):
"np" float32 [B, F, H, W, 3] in [0, 1]; "pt" float32 [B, F, 3, H, W] in [0, 1]; "pil" a list
(per video) of lists of PIL images; so `.frames[0]` is the first video in every case.
"""

from __future__ import annotations

import difflib
import inspect
import os
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from opensora_sdk.video import Video

OUTPUT_TYPES = ("np", "pil", "pt", "latent")  # None (the default) returns our Video objects
TENSOR_INPUTS = ("latents",)  # what callback_on_step_end may ask for in callback_kwargs
DIFFUSERS_NAMES = (
    "num_inference_steps", "generator", "num_videos_per_prompt", "output_type", "callback_on_step_end",
    "callback_on_step_end_tensor_inputs",
)  # fmt: skip

# diffusers arguments we do not take, with what to do instead
_HINTS = {
    "return_dict": "results are objects: `.frames` with output_type=..., our Video(s) without",
    "latents": "the starting noise comes from seed / generator",
    "prompt_embeds": "pass the text as prompt (T5 encodes it once per call; from_pretrained(..., text_cache=True or "
                     "a folder) keeps the embeddings between calls)",
    "negative_prompt_embeds": "pass the text as negative_prompt",
    "max_sequence_length": "the text length is the model's (transformer.config.model_max_length)",
    "callback_steps": "use callback_on_step_end (every step) or callback",
    "timesteps": "the schedule is the model family's: set num_inference_steps and timestep_warp",
    "sigmas": "the schedule is the model family's: set num_inference_steps and timestep_warp",
    "frame_rate": "use fps",
    "image": "use conditions=[ImageCondition(image)] (opensora_sdk.ImageCondition)",
    "video": "use conditions=[VideoCondition(video)] (opensora_sdk.VideoCondition)",
}


@dataclass
class VideoPipelineOutput:
    """What `pipe(..., output_type=...)` returns, as diffusers' `*PipelineOutput`.

    frames: the batch in diffusers' layout for `output_type` (see the module docstring);
        "latent": the final latents [B, C, T', h, w] float32 on the pipeline's device (of the
        last loop when `loop` > 1), not decoded.
    videos: our `Video` per sample (fps and metadata: seed, prompt, settings), or None for
        "latent".
    """

    frames: Any
    videos: list[Video] | None = None


# --------------------------------------------------------------------------------------------
# Arguments
# --------------------------------------------------------------------------------------------


def check_call(call, unknown: Mapping[str, Any], output_type, callback_on_step_end, tensor_inputs) -> None:
    """Reject, before any work, what `call` (the `__call__` function) does not take: unknown
    keyword arguments (TypeError listing the accepted ones), an unknown `output_type`, and
    callback tensor inputs other than `TENSOR_INPUTS`."""
    if unknown:
        params = [p.name for p in inspect.signature(call).parameters.values()
                  if p.name != "self" and p.kind is not inspect.Parameter.VAR_KEYWORD]  # fmt: skip
        name = min(unknown)
        hint = _HINTS.get(name)
        close = difflib.get_close_matches(name, params, n=1)
        hint = hint or (f"did you mean {close[0]!r}?" if close else None)
        ours = [p for p in params if p not in DIFFUSERS_NAMES]
        raise TypeError(
            f"OpenSoraPipeline() got an unexpected keyword argument {name!r}"
            + (f" ({hint})" if hint else "")
            + f". Accepted: {', '.join(ours)}; diffusers names: {', '.join(DIFFUSERS_NAMES)}"
        )
    if output_type is not None and output_type not in OUTPUT_TYPES:
        raise ValueError(
            f"output_type={output_type!r} is not supported: use one of {list(OUTPUT_TYPES)}, or None (the "
            "default) for our Video objects"
        )
    if callback_on_step_end is not None and not callable(callback_on_step_end):
        raise TypeError(f"callback_on_step_end must be callable, got {type(callback_on_step_end).__name__}")
    wanted = _tensor_inputs(callback_on_step_end, tensor_inputs)
    bad = [k for k in wanted if k not in TENSOR_INPUTS]
    if bad:
        raise ValueError(
            f"callback_on_step_end_tensor_inputs {bad} are not available; allowed: {list(TENSOR_INPUTS)} "
            "(the latent after each step)"
        )


def alias(name: str, value, alias_name: str, alias_value):
    """`value`, or `alias_value` when only the alias is given; both given and different: ValueError."""
    if alias_value is None:
        return value
    if value is not None and value != alias_value:
        raise ValueError(f"{name}={value!r} and {alias_name}={alias_value!r} disagree: {alias_name} is an alias, give one")
    return alias_value


def repeat_per_prompt(n, prompt, conditions, reference_path, mask_strategy):
    """`num_videos_per_prompt=n`: every prompt, and any per-prompt list (reference_path,
    mask_strategy, one conditions list per prompt), repeated n times in a row (p0, p0, p1, p1
    for n=2, as diffusers). n=1 returns the arguments unchanged."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"num_videos_per_prompt={n!r} is not allowed: expected an integer >= 1")
    if n == 1:
        return prompt, conditions, reference_path, mask_strategy

    def rep(values):
        return [v for v in values for _ in range(n)]

    prompt = rep([prompt] if isinstance(prompt, str) else list(prompt))
    if conditions and all(isinstance(c, (list, tuple)) for c in conditions):
        conditions = rep(conditions)
    reference_path = rep(reference_path) if isinstance(reference_path, (list, tuple)) else reference_path
    mask_strategy = rep(mask_strategy) if isinstance(mask_strategy, (list, tuple)) else mask_strategy
    return prompt, conditions, reference_path, mask_strategy


def _generators(generator) -> list[torch.Generator]:
    gens = [generator] if isinstance(generator, torch.Generator) else list(generator)
    for k, g in enumerate(gens):
        if not isinstance(g, torch.Generator):
            raise TypeError(f"generator[{k}] is {type(g).__name__}; expected a torch.Generator")
    if not gens:
        raise ValueError("generator is an empty list: give a torch.Generator or one per video")
    return gens


def _initial_seed(g: torch.Generator, k: int, num_samples: int) -> int:
    seed = g.initial_seed()
    if seed >= 2**63 - num_samples:
        raise ValueError(
            f"generator {k} has initial_seed() {seed}, above the seeds this SDK takes (< 2**63 - "
            f"{num_samples}); seed it with manual_seed(n) for a smaller n, or pass seed=n"
        )
    return seed


def generator_seed(seed: int | None, generator) -> int | None:
    """The base seed for planning: `seed`, or generator 0's `initial_seed()`. Giving both is
    a ValueError. The generators are only read, never advanced."""
    if generator is None:
        return seed
    if seed is not None:
        raise ValueError(
            "give seed or generator, not both: generator=torch.Generator().manual_seed(n) is the same as seed=n"
        )
    return _initial_seed(_generators(generator)[0], 0, 1)


def seed_samples(plan, generator):
    """`plan` with sample k seeded by `generator[k].initial_seed()` when `generator` is a list
    (one per video, after `num_videos_per_prompt`); a single generator (or none) keeps the
    plan's seed + k."""
    if generator is None or isinstance(generator, torch.Generator):
        return plan
    gens = _generators(generator)
    if len(gens) != plan.num_samples:
        raise ValueError(
            f"generator is a list of {len(gens)} generators for {plan.num_samples} videos (prompts x "
            "num_videos_per_prompt): give one per video, or a single generator (video k then gets its seed + k)"
        )
    return plan.with_seeds([_initial_seed(g, k, 1) for k, g in enumerate(gens)])


# --------------------------------------------------------------------------------------------
# callback_on_step_end
# --------------------------------------------------------------------------------------------


def _tensor_inputs(callback_on_step_end, tensor_inputs) -> list[str]:
    """diffusers' `PipelineCallback` objects name their own tensor inputs."""
    own = getattr(callback_on_step_end, "tensor_inputs", None)
    names = own if own is not None else tensor_inputs
    return [names] if isinstance(names, str) else list(names or ())


def step_end_callback(pipe, plan, callback: Callable | None, callback_on_step_end, tensor_inputs) -> Callable | None:
    """Our `callback(step, total, latent, denoised)` that also calls diffusers'
    `callback_on_step_end(pipe, step, timestep, callback_kwargs) -> dict` after every step.

    `step` is the index in the current clip's schedule (0 .. num_steps - 1; it restarts for
    every batch and loop) and `timestep` its time as a 0-d float32 tensor (model time, 1000 =
    noise); callback_kwargs = {"latents": the latent [B, C, T', h, w] after the step}. A
    "latents" tensor in the returned dict that is not the one passed is copied into the
    running latent, so the rest of sampling (and the output) uses it. `callback` then runs
    with the (possibly modified) latent and may still stop sampling by returning False.
    """
    if callback_on_step_end is None:
        return callback
    wanted = _tensor_inputs(callback_on_step_end, tensor_inputs)
    timesteps = plan.timesteps

    def both(index: int, total: int, latent: torch.Tensor, denoised: torch.Tensor):
        step = index % plan.num_steps  # every clip runs num_steps steps
        t = torch.tensor(timesteps[step], dtype=torch.float32, device=latent.device)
        out = callback_on_step_end(pipe, step, t, {k: latent for k in wanted})
        if out is not None:
            if not isinstance(out, Mapping):
                raise TypeError(f"callback_on_step_end must return a dict (or None), got {type(out).__name__}")
            new = out.get("latents", latent)
            if new is not latent:
                if not isinstance(new, torch.Tensor) or new.shape != latent.shape:
                    got = tuple(new.shape) if isinstance(new, torch.Tensor) else type(new).__name__
                    raise ValueError(
                        f"callback_on_step_end returned latents {got}; expected a tensor of shape {tuple(latent.shape)}"
                    )
                latent.copy_(new)
        return None if callback is None else callback(index, total, latent, denoised)

    return both


# --------------------------------------------------------------------------------------------
# Outputs
# --------------------------------------------------------------------------------------------


def to_output(videos: list[Video], output_type: str) -> VideoPipelineOutput:
    """Decoded videos -> diffusers' layout for "np", "pt" or "pil" (all from the uint8 frames,
    so "np" equals `video.frames / 255`)."""
    if output_type == "pil":
        from PIL import Image

        return VideoPipelineOutput([[Image.fromarray(f) for f in v.frames] for v in videos], videos)
    frames = np.stack([v.frames for v in videos]).astype(np.float32) / 255  # [B, F, H, W, 3]
    if output_type == "pt":
        frames = torch.from_numpy(frames).permute(0, 1, 4, 2, 3)  # [B, F, 3, H, W]
    return VideoPipelineOutput(frames, videos)


def generate_latents(pipe, plan, *, callback: Callable | None = None, progress: bool | None = None) -> torch.Tensor:
    """`pipe.generate(plan)` without the final decode (`generation.generate_latents`)."""
    return pipe.generate(plan, callback=callback, progress=progress, latents_only=True)


def _trap(shape) -> ValueError:
    return ValueError(
        f"export_to_video got a single frame {list(shape)} ([H, W, 3]), not a video. OpenSoraPipeline returns "
        "our Video by default, whose .frames is [F, H, W, 3], so video.frames[0] is its first frame: pass "
        "video.frames or the Video itself (or call video.save(path)); or call pipe(..., output_type='np') "
        "and pass .frames[0], as with diffusers"
    )


def _frames_of(video_frames) -> tuple[np.ndarray, float | None]:
    """(uint8 [F, H, W, 3], fps or None) from any accepted input."""
    if isinstance(video_frames, Video):
        return video_frames.frames, video_frames.fps
    if isinstance(video_frames, VideoPipelineOutput):
        raise TypeError("export_to_video got a whole pipeline output: pass one video, output.frames[0]")
    if isinstance(video_frames, (list, tuple)):
        if not video_frames:
            raise ValueError("export_to_video got an empty list of frames")
        first = video_frames[0]
        if isinstance(first, (Video, list, tuple)):
            raise TypeError(
                f"export_to_video got a list of {len(video_frames)} videos: pass one of them (e.g. frames[0])"
            )
        if hasattr(first, "convert") and hasattr(first, "size"):  # PIL images
            video_frames = np.stack([np.asarray(im.convert("RGB")) for im in video_frames])
        else:
            video_frames = np.stack([f.detach().cpu().numpy() if isinstance(f, torch.Tensor) else np.asarray(f)
                                     for f in video_frames])  # fmt: skip
    if isinstance(video_frames, torch.Tensor):
        x = video_frames.detach().cpu()
        if x.ndim == 4 and x.shape[-1] != 3 and x.shape[1] == 3:
            x = x.permute(0, 2, 3, 1)  # [F, 3, H, W] (output_type="pt") -> [F, H, W, 3]
        video_frames = x.float().numpy() if x.dtype == torch.bfloat16 else x.numpy()
    if not isinstance(video_frames, np.ndarray):
        raise TypeError(
            "export_to_video takes a list of PIL images, a list or array of frames [F, H, W, 3], a torch "
            f"tensor or a Video; got {type(video_frames).__name__}"
        )
    x = video_frames
    if x.ndim == 3 and x.shape[-1] == 3:
        raise _trap(x.shape)
    if x.ndim == 5:
        raise ValueError(f"export_to_video got a batch of {x.shape[0]} videos {list(x.shape)}: pass one, frames[0]")
    if x.ndim != 4 or x.shape[-1] != 3:
        raise ValueError(f"export_to_video needs frames [F, H, W, 3] (RGB), got shape {list(x.shape)}")
    if x.dtype == np.uint8:
        return x, None
    if np.issubdtype(x.dtype, np.floating):
        return Video.from_images(x).frames, None  # [0, 1], clamped, rounded as x * 255 + 0.5
    raise TypeError(f"export_to_video needs uint8 frames (0..255) or float frames in [0, 1], got dtype {x.dtype}")


def export_to_video(video_frames, output_video_path: str | os.PathLike | None = None, fps: float | None = None) -> str:
    """Write frames to a video file: diffusers' `export_to_video`, through our atomic `Video.save`.

    video_frames: a list of PIL images; a list or array of frames [F, H, W, 3], uint8 or float
        in [0, 1] (rounded as `x * 255 + 0.5`, where diffusers truncates); a torch tensor
        [F, H, W, 3] or [F, 3, H, W] (output_type="pt"); or our `Video` (its metadata is kept).
        One frame [H, W, 3] is a ValueError (see below).
    output_video_path: .mp4 (default), .webm, .gif, .webp; None: a new temporary .mp4 file.
    fps: frames per second; None: the Video's own fps, else 10 (diffusers' default).
    Returns the path as a str.

    The classic trap: `pipe(...).frames[0]` on our default output (a `Video`) is the first
    frame, not the first video; pass `video.frames`, or use `output_type="np"` and `.frames[0]`.
    """
    frames, own_fps = _frames_of(video_frames)
    if output_video_path is None:
        handle, output_video_path = tempfile.mkstemp(suffix=".mp4")
        os.close(handle)
    fps = fps if fps is not None else own_fps if own_fps is not None else 10
    metadata = video_frames.metadata if isinstance(video_frames, Video) else None
    return str(Video(frames, fps, metadata).save(output_video_path))


__all__ = [
    "OUTPUT_TYPES",
    "TENSOR_INPUTS",
    "VideoPipelineOutput",
    "alias",
    "check_call",
    "export_to_video",
    "generate_latents",
    "generator_seed",
    "repeat_per_prompt",
    "seed_samples",
    "step_end_callback",
    "to_output",
]
