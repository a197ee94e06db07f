"""Running a `GenerationPlan`: batches, loops, references, sampling and decoding.

    encode every prompt text of the call (T5 once, then it leaves the device)
    for each batch of samples:
        references -> VAE latents (per sample, its own generator)
        for loop i:
            i > 0: the previous clip, decoded, is re-encoded and appended as a reference with
                   the group "i,<ref>,-c,0,c,<edit>" (its last c latents start this clip)
            z = noise per sample -> apply_mask_strategy(z, refs, strategies, i, align)
            z = sample(STDiT3, z, warped timesteps, CFG) -> clip = VAE.decode(z)
            keep the clip's frames (after the first loop without its first c/5*17 frames)

The previous clip is clamped to [-1, 1] before it is re-encoded (the pixels the video shows;
the official loop re-encodes the unclamped decoder output). A frame mask that is all ones
(nothing conditioned) is not passed to the sampler: the official loop takes the mask path
anyway, but there it changes nothing but one unused noise draw per step.
"""

from __future__ import annotations

import json
from typing import Callable

import numpy as np
import torch

from opensora_sdk.conditioning import append_loop_reference, apply_mask_strategy, encode_conditions
from opensora_sdk.plan import GenerationPlan, SamplePlan
from opensora_sdk.sampling import SamplingInterrupted, sample
from opensora_sdk.video import Video


class _Steps:
    """Counts steps over the whole call, drives the progress bar and the user's callback."""

    def __init__(self, total: int, callback: Callable | None, progress: bool):
        from tqdm.auto import tqdm

        self.total, self.done, self.user = total, 0, callback
        self.bar = tqdm(total=total, desc="sampling", unit="step", disable=not progress)

    def __call__(self, step: int, total: int, latent: torch.Tensor, denoised: torch.Tensor):
        index = self.done
        self.done += 1
        self.bar.update(1)
        if self.user is None:
            return None
        try:
            return self.user(index, self.total, latent, denoised)
        except SamplingInterrupted as stop:
            raise SamplingInterrupted(index, latent, str(stop) or None) from stop

    def close(self) -> None:
        self.bar.close()


def run_plan(pipe, plan: GenerationPlan, *, callback: Callable | None = None, progress: bool = True) -> list[Video]:
    """Generate every sample of `plan` with the models of `pipe` (an `OpenSoraPipeline`)."""
    texts = [t for s in plan.samples for t in s.loop_prompts]
    if plan.negative_prompt is not None:
        texts.append(plan.negative_prompt)
    steps = _Steps(len(plan.batches()) * plan.loop * plan.num_steps, callback, progress)
    videos: list[Video] = []
    try:
        with torch.no_grad():
            embeddings = pipe.encode_texts(texts)
            for batch in plan.batches():
                videos += _run_batch(pipe, plan, batch, embeddings, steps)
    except SamplingInterrupted as stop:
        if stop.step != steps.done - 1:  # raised inside sample(): report the call-wide step
            raise SamplingInterrupted(steps.done - 1, stop.latent) from stop
        raise
    finally:
        steps.close()
    return videos


def _run_batch(pipe, plan: GenerationPlan, batch: list[SamplePlan], embeddings, steps: _Steps) -> list[Video]:
    device, B = pipe.device, len(batch)
    C, (T, h, w) = plan.latent_channels, plan.latent_size
    H, W, N = plan.height, plan.width, plan.num_frames
    gens = [torch.Generator(device).manual_seed(s.seed) for s in batch]
    refs, strategies = zip(*[_references(pipe, plan, s, g) for s, g in zip(batch, gens)]) if B else ((), ())
    refs, strategies = list(refs), list(strategies)

    uncond_mask = y_null = None
    if plan.negative_prompt is not None:
        y_neg, uncond_mask = embeddings[plan.negative_prompt]
        y_null, uncond_mask = y_neg.expand(B, -1, -1, -1), uncond_mask.expand(B, -1)
    model_fn = pipe.transformer_fn(B, uncond_mask)
    scheduler = _with_steps(pipe.scheduler, plan.num_steps)
    model_kwargs = {
        "fps": torch.full((B,), float(plan.model_fps), device=device),
        "height": torch.full((B,), float(H), device=device),
        "width": torch.full((B,), float(W), device=device),
    }

    def renoise(step: int, like: torch.Tensor) -> torch.Tensor:
        return torch.cat([_randn(like[b : b + 1].shape, g, like) for b, g in enumerate(gens)])

    frames: list[list[np.ndarray]] = [[] for _ in batch]
    clip = None
    for i in range(plan.loop):
        if i > 0:
            for b in range(B):
                latent = pipe.vae_encode(clip[b : b + 1].clamp(-1, 1), gens[b])[0]  # [C, T', h, w]
                refs[b], strategies[b] = append_loop_reference(
                    refs[b], strategies[b], latent, i, plan.condition_frame_length, plan.condition_frame_edit
                )
        like = torch.empty(0, device=device)
        z = torch.cat([_randn((1, C, T, h, w), g, like) for g in gens])  # [B, C, T', h, w]
        z, mask = apply_mask_strategy(z, refs, strategies, loop_i=i, align=plan.align)
        frame_mask = None if bool((mask == 1).all()) else mask

        y = torch.cat([embeddings[s.loop_prompts[i]][0] for s in batch])  # [B, 1, L, C]
        y_mask = torch.cat([embeddings[s.loop_prompts[i]][1] for s in batch])  # [B, L]
        cfg = plan.guidance_scale != 1
        null = None
        if cfg:
            null = y_null if y_null is not None else pipe.null_embedding(B)
            null = null.to(y.dtype)
        timesteps = scheduler.timesteps(B, height=H, width=W, num_frames=N, device=device)
        with pipe.on_device(pipe.transformer):
            latents = sample(
                model_fn, z, timesteps, y=y, y_null=null, y_mask=y_mask, guidance_scale=plan.guidance_scale,
                frame_mask=frame_mask, model_kwargs=model_kwargs, num_timesteps=scheduler.num_timesteps,
                noise_sampler=renoise, callback=steps,
            )
        clip = pipe.vae_decode(latents, N)  # [B, 3, N, H, W]
        skip = plan.overlap_frames if i > 0 else 0
        for b in range(B):
            frames[b].append(Video.from_tensor(clip[b, :, skip:]).frames)
    return [
        Video(np.concatenate(f) if len(f) > 1 else f[0], plan.fps, _metadata(plan, s))
        for s, f in zip(batch, frames)
    ]


def _randn(shape, generator: torch.Generator, like: torch.Tensor) -> torch.Tensor:
    return torch.randn(shape, generator=generator, device=like.device, dtype=torch.float32)


def _with_steps(scheduler, num_steps: int):
    import dataclasses

    if scheduler.num_sampling_steps == num_steps:
        return scheduler
    return dataclasses.replace(scheduler, num_sampling_steps=num_steps)


def _references(pipe, plan: GenerationPlan, s: SamplePlan, gen: torch.Generator) -> tuple[list, str]:
    """Reference latents [C, T_ref, h, w] of one sample and its mask strategy."""
    from opensora_sdk.video_io import load_reference

    H, W = plan.height, plan.width
    if s.conditions:
        return encode_conditions(
            s.conditions, lambda px: pipe.vae_encode(px, gen), height=H, width=W,
            read_video=lambda path: load_reference(path, H, W),
        )
    refs = [pipe.vae_encode(load_reference(src, H, W)[None], gen)[0] for src in s.references]
    return refs, s.mask_strategy


def _metadata(plan: GenerationPlan, s: SamplePlan) -> dict[str, str]:
    from opensora_sdk import __version__

    params = {
        "prompt": s.prompt,
        "processed_prompts": list(s.loop_prompts),
        "negative_prompt": plan.negative_prompt,
        "seed": s.seed,
        "height": plan.height,
        "width": plan.width,
        "num_frames": plan.num_frames,
        "loop": plan.loop,
        "fps": plan.fps,
        "num_steps": plan.num_steps,
        "guidance_scale": plan.guidance_scale,
        "mask_strategy": s.mask_strategy,
        "generator": f"opensora-sdk {__version__}",
    }
    return {"title": s.prompt, "seed": str(s.seed), "opensora": json.dumps(params, ensure_ascii=False)}


__all__ = ["run_plan"]
