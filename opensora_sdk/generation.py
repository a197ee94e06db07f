"""The one generation orchestration: models + a placement + a resolved plan -> latents, videos.

Every front end (the pipeline and so the CLI and the app, the ComfyUI nodes including the
long-video node, the headless workflow runner) runs generation through these functions;
none re-implements a step. Each step of generation is exactly one function here:

    encode_texts        T5 once for every text of the call (`plan_texts`), then it leaves the
                        device; texts in the encoder's text cache skip T5
    start_batch         one generator per sample (seed + k); references -> VAE latents
    sample_clip         noise -> mask strategy -> the family's sampler with STDiT3 (CFG)
    decode_clip         latents -> pixels (chunked, optionally tiled, split over SP ranks)
    carry_over          loop i > 0: the previous clip re-encoded as the next loop's reference
    iter_clips          the loops of one batch, each clip's new frames as they are decoded
    generate            a whole plan -> one `Video` per sample (generate_latents: undecoded)

What differs between model families is data: the plan names its family (scheduler and
sampling loop, `opensora_sdk.presets.ModelFamily`), the latent geometry comes from the loaded
VAE, and where each model computes is the `Placement`'s business (`opensora_sdk.placement`).

Randomness: sample k of a plan has its own `torch.Generator` on the compute device seeded with
its seed, used for its reference encodings, then per loop for its starting noise and its
re-noising draws, so a sample does not depend on its batch or its front end.

Hooks (`Hooks`, carried by `Models`): `between_blocks()` runs before every transformer block
and `vae_progress(stage, done, total)` after every unit of VAE work (stage "encoding" or
"decoding"); either may raise to stop the work there. The ComfyUI nodes pass ComfyUI's
interrupt check and progress bar; `generate(progress=True)` shows tqdm bars for the VAE.

Loops: clip i > 0 starts from the last `condition_frame_length` latent frames of clip i - 1,
decoded, clamped to [-1, 1] (the pixels the video shows; the official loop re-encodes the
unclamped decoder output) and re-encoded, with the group "i,<ref>,-c,0,c,<edit>". A frame mask
that is all ones (nothing conditioned) is not passed to the sampler: the official loop takes
the mask path anyway, but there it changes nothing but one unused noise draw per step.
"""

from __future__ import annotations

import dataclasses
import json
import re
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Callable, Iterator, Sequence

import numpy as np
import torch

from opensora_sdk.conditioning import append_loop_reference, apply_mask_strategy, encode_conditions
from opensora_sdk.placement import Placement
from opensora_sdk.plan import GenerationPlan, SamplePlan
from opensora_sdk.families import FAMILIES
from opensora_sdk.sampling import SamplingInterrupted
from opensora_sdk.video import Video

Embeddings = dict  # {processed text: (y [1, 1, L, C], mask [1, L])}


@dataclass
class Hooks:
    """Calls a front end gets while work runs; each may raise to stop the work there.

    between_blocks(): before every transformer block (one step of a large video is minutes
    on a CPU), e.g. an interrupt check. vae_progress(stage, done, total): after each unit of
    VAE work (temporal chunk, micro-batch of frames, tile), stage "encoding" or "decoding".
    """

    between_blocks: Callable[[], None] | None = None
    vae_progress: Callable[[str, int, int], None] | None = None

    def vae(self, stage: str) -> Callable[[int, int], None] | None:
        """The VAE's progress(done, total) for `stage`, or None."""
        report = self.vae_progress
        return None if report is None else (lambda done, total: report(stage, done, total))


@dataclass
class Models:
    """The models of a generation and how they run.

    text_encoder may be None for front ends that encoded the text elsewhere (ComfyUI);
    vae_tiling (a `SpatialTiling`) bounds the VAE's working set; sp_group shards STDiT3 and
    splits the VAE decode over the processes of a torch.distributed group; hooks (`Hooks`)
    report progress and let a front end stop work between blocks and VAE units.
    """

    transformer: torch.nn.Module
    vae: torch.nn.Module | None
    text_encoder: object | None = None
    vae_tiling: object | None = None
    sp_group: object | None = None
    hooks: Hooks = field(default_factory=Hooks)


@dataclass
class BatchState:
    """The per-sample state of one batch across its loops."""

    generators: list[torch.Generator]
    references: list[list[torch.Tensor]]  # per sample: latents [C, T_ref, h, w] on the device
    strategies: list[str]  # per sample: mask-strategy string


# --------------------------------------------------------------------------------------------
# Progress over a whole call
# --------------------------------------------------------------------------------------------


class CallProgress:
    """Counts sampling steps over a whole call (all batches and loops), drives a tqdm bar and
    the caller's callback(step, total, latent, denoised) with call-wide step numbers."""

    def __init__(self, total: int, callback: Callable | None = None, progress: bool = False):
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


class VaeBars:
    """tqdm bars "encoding" / "decoding" fed by the VAE's progress, then the caller's
    vae_progress(stage, done, total)."""

    def __init__(self, user: Callable | None = None):
        self.user, self.bars = user, {}

    def __call__(self, stage: str, done: int, total: int) -> None:
        from tqdm.auto import tqdm

        bar = self.bars.get(stage)
        if bar is None or done < bar.n:
            bar = self.bars[stage] = tqdm(total=total, desc=stage, unit="part", leave=False)
        bar.total = total
        bar.update(done - bar.n)
        if done >= total:
            bar.close()
            del self.bars[stage]
        if self.user is not None:
            self.user(stage, done, total)


def with_progress_bars(models: Models, progress: bool) -> Models:
    """`models` whose VAE progress also drives tqdm bars (when `progress`)."""
    if not progress:
        return models
    hooks = dataclasses.replace(models.hooks, vae_progress=VaeBars(models.hooks.vae_progress))
    return dataclasses.replace(models, hooks=hooks)


@contextmanager
def block_callback(transformer: torch.nn.Module, fn: Callable[[], None] | None):
    """`fn()` before every block of `transformer` while inside: STDiT3's `set_block_callback`,
    or forward pre-hooks on the blocks of a model without it (STDiT2, STDiT: `blocks.<i>`)."""
    if fn is None:
        yield
    elif hasattr(transformer, "set_block_callback"):
        previous = transformer.set_block_callback(fn)
        try:
            yield
        finally:
            transformer.set_block_callback(previous)
    else:
        blocks = [m for name, m in transformer.named_modules() if re.fullmatch(r"(\w+_)?blocks\.\d+", name)]
        handles = [m.register_forward_pre_hook(lambda module, args: fn()) for m in blocks]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()


# --------------------------------------------------------------------------------------------
# The steps
# --------------------------------------------------------------------------------------------


def plan_texts(plan: GenerationPlan) -> list[str]:
    """Every text T5 encodes for `plan`: each sample's loop prompts, then the negative prompt."""
    texts = [t for s in plan.samples for t in s.loop_prompts]
    if plan.negative_prompt is not None:
        texts.append(plan.negative_prompt)
    return texts


def encode_texts(text_encoder, placement: Placement, texts: Sequence[str], timings=None) -> Embeddings:
    """{text: (y [1, 1, L, C], mask [1, L])} on the compute device, each distinct text once.
    Texts the encoder's cache holds skip T5; only when some are not cached does T5 come to the
    device (and load, if it is deferred), leaving it afterwards, also when encoding fails.
    `timings.texts` gets (texts from the cache, distinct texts) when the encoder has a cache."""
    unique = list(dict.fromkeys(texts))
    device = placement.compute_device("text_encoder")
    cached = text_encoder.lookup(unique, device)
    out = {t: (y[None, None].to(device), mask[None].to(device)) for t, (y, mask) in cached.items()}
    todo = [t for t in unique if t not in cached]
    if todo:
        with torch.no_grad(), placement.use(text_encoder, "text_encoder") as te:
            y, mask = te.encode(todo)
        out.update((t, (y[i : i + 1], mask[i : i + 1])) for i, t in enumerate(todo))
    if timings is not None and text_encoder.cache is not None:
        timings.texts = (len(cached), len(unique))
    return {t: out[t] for t in unique}


def null_caption(transformer, batch: int, device) -> torch.Tensor:
    """The model's null caption [batch, 1, L, C] (the official unconditional rows)."""
    table = transformer.y_embedder.y_embedding
    return table.to(device)[None, None].expand(batch, 1, *table.shape)


def guided_model(transformer, batch: int, uncond_mask: torch.Tensor | None):
    """STDiT3 as the sampler's model_fn; a negative prompt's mask `uncond_mask` masks the
    unconditional half instead of the prompt's mask."""

    joined = {}  # the [prompt; negative] mask, built once per mask the loop passes (same object each step)

    def fn(x, t, *, y, mask, x_mask=None, **kwargs):
        if uncond_mask is not None and x.shape[0] == 2 * batch:
            if joined.get("from") is not mask:
                joined.update({"from": mask, "mask": torch.cat([mask[:batch], uncond_mask], 0)})
            mask = joined["mask"]
        if x_mask is not None:  # STDiT (v1.0) takes no frame mask, and is never given one
            kwargs["x_mask"] = x_mask
        return transformer(x, t, y=y, mask=mask, **kwargs)

    return fn


def _vae_encode(vae, pixels: torch.Tensor, generator, tiling, progress=None) -> torch.Tensor:
    """pixels [1, 3, F, H, W] in [-1, 1] -> latent [1, C, T', h, w] float32 (sampled posterior)."""
    kwargs = {} if progress is None else {"progress": progress}
    return vae.encode(pixels.to(vae.device, vae.dtype), generator=generator, tiling=tiling, **kwargs).float()


def start_batch(models: Models, placement: Placement, plan: GenerationPlan, batch: Sequence[SamplePlan]) -> BatchState:
    """One generator per sample; its references encoded by the VAE (typed conditions or the
    official string form, both through the one official resize-crop)."""
    from opensora_sdk.video_io import load_reference, read_video_pixels

    H, W = plan.height, plan.width
    gens = [torch.Generator(placement.device).manual_seed(s.seed) for s in batch]
    refs: list[list[torch.Tensor]] = [[] for _ in batch]
    strategies = [s.mask_strategy for s in batch]
    if not any(s.conditions or s.references for s in batch):
        return BatchState(gens, refs, strategies)
    if models.vae is None:
        raise ValueError("conditions are given but no VAE: connect the VAE that encodes the references")
    with torch.no_grad(), placement.use(models.vae, "vae") as vae:
        for b, (s, g) in enumerate(zip(batch, gens)):
            progress = models.hooks.vae("encoding")
            encode = lambda px, g=g: _vae_encode(vae, px, g, models.vae_tiling, progress)  # noqa: E731
            if s.conditions:
                refs[b], strategies[b] = encode_conditions(
                    s.conditions, encode, height=H, width=W, read_video=read_video_pixels,
                    output_frames=plan.latent_size[0],
                )
            else:
                refs[b] = [encode(load_reference(src, H, W)[None])[0] for src in s.references]
    return BatchState(gens, refs, strategies)


def sample_clip(
    models: Models,
    placement: Placement,
    plan: GenerationPlan,
    batch: Sequence[SamplePlan],
    state: BatchState,
    embeddings: Embeddings,
    loop_i: int = 0,
    callback: Callable | None = None,
    *,
    cache_stats=None,
) -> torch.Tensor:
    """Sample loop `loop_i` of a batch -> latents [B, C, T', h, w] float32 on the device.

    With a step cache in the plan (`plan.cache`), a fresh cache state serves this clip only
    (`opensora_sdk.step_cache.attach`); `cache_stats` (a `step_cache.CacheStats`) counts what it saved."""
    device, B = placement.device, len(batch)
    C, (T, h, w) = plan.latent_channels, plan.latent_size
    H, W, N = plan.height, plan.width, plan.num_frames
    transformer = models.transformer

    def randn(shape, g):
        return torch.randn(shape, generator=g, device=device, dtype=torch.float32)

    def renoise(step: int, like: torch.Tensor) -> torch.Tensor:
        """Sample b's draw from its own generator; a chain of several rows per sample (IDDPM's
        [z; z] under guidance) draws them all and keeps the first, as the official loop does."""
        rows = like.shape[0] // B
        return torch.cat([randn((rows, *like.shape[1:]), g)[:1] for g in state.generators])

    z = torch.cat([randn((1, C, T, h, w), g) for g in state.generators])  # [B, C, T', h, w]
    z, mask = apply_mask_strategy(z, state.references, state.strategies, loop_i=loop_i, align=plan.align)
    frame_mask = None if bool((mask == 1).all()) else mask

    y = torch.cat([embeddings[s.loop_prompts[loop_i]][0] for s in batch]).to(device)  # [B, 1, L, C]
    y_mask = torch.cat([embeddings[s.loop_prompts[loop_i]][1] for s in batch]).to(device)  # [B, L]
    null = uncond_mask = None
    if plan.guidance_scale != 1:
        if plan.negative_prompt is not None:
            y_neg, m_neg = embeddings[plan.negative_prompt]
            null, uncond_mask = y_neg.to(device).expand(B, -1, -1, -1), m_neg.to(device).expand(B, -1)
        else:
            null = null_caption(transformer, B, device)
        null = null.to(y.dtype)
    family = FAMILIES[plan.family]
    stop_check = block_callback(transformer, models.hooks.between_blocks)
    cache = nullcontext()
    if plan.cache is not None:  # step caching: a new state per clip (nothing carried between loops or calls)
        from opensora_sdk.step_cache import attach

        cache = attach(transformer, plan.cache, num_steps=len(plan.timesteps), timesteps=plan.timesteps,
                       stats=cache_stats)
    # exact reuse of the text / size work across the steps of this clip (STDiT3; see stdit3_reuse)
    reuse = transformer.step_invariants() if hasattr(transformer, "step_invariants") else nullcontext()
    with torch.no_grad(), placement.use(transformer, "transformer"), stop_check, cache, reuse:
        return family.sampler(plan.sampler).sample(
            guided_model(transformer, B, uncond_mask), z, plan.scheduler, size=(H, W, N), y=y, y_null=null,
            y_mask=y_mask, guidance_scale=plan.guidance_scale, frame_mask=frame_mask,
            model_kwargs=family.model_inputs(plan, B, device), noise_sampler=renoise, callback=callback,
        )


def decode_clip(models: Models, placement: Placement, latents: torch.Tensor, num_frames: int) -> torch.Tensor:
    """latents [B, C, T', h, w] -> pixels [B, 3, num_frames, H, W] (about [-1, 1], the VAE's dtype)."""
    progress = models.hooks.vae("decoding")
    kwargs = {} if progress is None else {"progress": progress}  # per chunk under SP
    with torch.no_grad(), placement.use(models.vae, "vae") as vae:
        if models.sp_group is not None:  # temporal chunks spread over the ranks, then gathered
            from opensora_sdk.models.vae_parallel import vae_decode_split

            return vae_decode_split(vae, latents, num_frames, models.sp_group, tiling=models.vae_tiling, **kwargs)
        return vae.decode(latents, num_frames, tiling=models.vae_tiling, **kwargs)


def carry_over(
    models: Models, placement: Placement, plan: GenerationPlan, state: BatchState, clip: torch.Tensor, loop_i: int
) -> None:
    """Before loop `loop_i` > 0: the previous clip [B, 3, N, H, W], clamped and re-encoded,
    becomes each sample's newest reference, its last latents the start of this loop."""
    with torch.no_grad(), placement.use(models.vae, "vae") as vae:
        for b, g in enumerate(state.generators):
            progress = models.hooks.vae("encoding")
            latent = _vae_encode(vae, clip[b : b + 1].clamp(-1, 1), g, models.vae_tiling, progress)[0]  # [C, T', h, w]
            state.references[b], state.strategies[b] = append_loop_reference(
                state.references[b], state.strategies[b], latent, loop_i, plan.condition_frame_length,
                plan.condition_frame_edit, plan.latent_chunk,
            )


class Timings(dict):
    """Seconds spent per stage ("text", "references", "sampling", "decode"), summed over a call.
    With a step cache, `cache_stats` (a `step_cache.CacheStats`) counts what it skipped; with
    a text cache, `texts` is (texts found in it, distinct texts)."""

    cache_stats = None
    texts = None

    @contextmanager
    def stage(self, name: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            self[name] = self.get(name, 0.0) + time.perf_counter() - start


def iter_clips(
    models: Models,
    placement: Placement,
    plan: GenerationPlan,
    batch: Sequence[SamplePlan],
    embeddings: Embeddings,
    callback: Callable | None = None,
    timings: Timings | None = None,
    *,
    decode_last: bool = True,
) -> Iterator[tuple[torch.Tensor, torch.Tensor | None]]:
    """Every loop of one batch: yields (latents [B, C, T', h, w], the clip's new pixels
    [B, 3, n, H, W]): the first clip whole, later ones without the frames they share with the
    previous clip. With `decode_last=False` the last loop is not decoded (pixels None)."""
    timings = Timings() if timings is None else timings
    if plan.cache is not None and timings.cache_stats is None:
        from opensora_sdk.step_cache import CacheStats

        timings.cache_stats = CacheStats(plan.cache.spec)
    with timings.stage("references"):
        state = start_batch(models, placement, plan, batch)
    clip = None
    for i in range(plan.loop):
        if i > 0:
            with timings.stage("references"):
                carry_over(models, placement, plan, state, clip, i)
        with timings.stage("sampling"):
            latents = sample_clip(models, placement, plan, batch, state, embeddings, i, callback,
                                  cache_stats=timings.cache_stats)
        if i == plan.loop - 1 and not decode_last:
            yield latents, None
            return
        with timings.stage("decode"):
            clip = decode_clip(models, placement, latents, plan.num_frames)
        yield latents, clip[:, :, plan.overlap_frames if i > 0 else 0 :]


def _run(models, placement, plan, embeddings, callback, progress, timings, per_batch) -> list:
    """A whole call: its texts encoded once, `per_batch(batch, embeddings, steps, timings)`
    for each batch (its results concatenated), steps counted over the call."""
    timings = Timings() if timings is None else timings
    if embeddings is None:
        with timings.stage("text"):
            embeddings = encode_texts(models.text_encoder, placement, plan_texts(plan), timings)
    steps = CallProgress(len(plan.batches()) * plan.loop * plan.num_steps, callback, progress)
    out: list = []
    try:
        for batch in plan.batches():
            out += per_batch(batch, embeddings, steps, timings)
    except SamplingInterrupted as stop:
        if stop.step != steps.done - 1:  # raised inside the sampler: report the call-wide step
            raise SamplingInterrupted(steps.done - 1, stop.latent) from stop
        raise
    finally:
        steps.close()
    return out


def generate(
    models: Models,
    placement: Placement,
    plan: GenerationPlan,
    *,
    embeddings: Embeddings | None = None,
    callback: Callable | None = None,
    progress: bool = False,
    timings: Timings | None = None,
) -> list[Video]:
    """Generate every sample of `plan`: one `Video` per sample, in order.

    `embeddings` (from `encode_texts`) may be given; otherwise every text of the plan is
    encoded with `models.text_encoder` first. `callback(step, total, latent, denoised)` is
    called after every sampling step, counted over the whole call; returning False stops
    with `SamplingInterrupted` before anything is decoded further. `timings` (a `Timings`)
    receives the seconds spent per stage. With `progress`, tqdm bars show the sampling steps
    and the VAE's encoding / decoding.
    """
    models = with_progress_bars(models, progress)

    def videos(batch, embeddings, steps, timings) -> list[Video]:
        frames: list[list[np.ndarray]] = [[] for _ in batch]
        for _, part in iter_clips(models, placement, plan, batch, embeddings, steps, timings):
            for b in range(len(batch)):
                frames[b].append(Video.from_tensor(part[b]).frames)  # uint8 on the host, per loop
        return [Video(np.concatenate(f) if len(f) > 1 else f[0], plan.fps, video_metadata(plan, s))
                for s, f in zip(batch, frames)]

    return _run(models, placement, plan, embeddings, callback, progress, timings, videos)


def generate_latents(
    models: Models,
    placement: Placement,
    plan: GenerationPlan,
    *,
    embeddings: Embeddings | None = None,
    callback: Callable | None = None,
    progress: bool = False,
    timings: Timings | None = None,
) -> torch.Tensor:
    """`generate` without the final decode: the latents [N, C, T', h, w] of every sample after
    its last loop (earlier loops are decoded: the next loop needs their pixels). `timings`: as
    for `generate`."""
    models = with_progress_bars(models, progress)

    def latents(batch, embeddings, steps, timings) -> list[torch.Tensor]:
        *_, (last, _) = iter_clips(models, placement, plan, batch, embeddings, steps, timings, decode_last=False)
        return list(last)

    return torch.stack(_run(models, placement, plan, embeddings, callback, progress, timings, latents))


def video_metadata(plan: GenerationPlan, s: SamplePlan) -> dict[str, str]:
    """What a saved video records about how it was made (title, seed, every setting)."""
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
    if plan.cache is not None:  # an approximate video: say how it was made
        params["cache"] = plan.cache.spec
    return {"title": s.prompt, "seed": str(s.seed), "opensora": json.dumps(params, ensure_ascii=False)}


__all__ = [
    "BatchState",
    "CallProgress",
    "Hooks",
    "Models",
    "Timings",
    "VaeBars",
    "block_callback",
    "carry_over",
    "decode_clip",
    "encode_texts",
    "generate",
    "generate_latents",
    "guided_model",
    "iter_clips",
    "null_caption",
    "plan_texts",
    "sample_clip",
    "start_batch",
    "video_metadata",
    "with_progress_bars",
]
