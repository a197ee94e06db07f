"""`OpenSoraPipeline`: text (and references) in, `Video` out.

A thin adapter over the SDK's one generation path: `plan()` fills in what a call left out
from the model's defaults (`opensora_sdk.presets.resolve_defaults`) and checks everything
(`opensora_sdk.plan.plan_generation`, which `opensora info` also uses); `generate()` runs the
plan through `opensora_sdk.generation` with the pipeline's models and `Placement`. The CLI,
the web app and the ComfyUI nodes go through the same functions.

Model selection: `opensora_sdk.presets.PRESETS` maps a name to where the three models come
from and the model's own defaults; `from_preset()` (default: the built-in tiny model that
ships inside the package) and `from_pretrained()` (folders, files, hub ids) build a pipeline.
"""

from __future__ import annotations

import copy
import os
from typing import Any, Callable, Mapping, Sequence

import torch

from opensora_sdk.configs import OFFICIAL_REPOS
from opensora_sdk.families import ModelFamily, family_of
from opensora_sdk.pipeline_lora import LoraLoaderMixin
from opensora_sdk.pipeline_memory import MemoryMixin
from opensora_sdk.placement import HOST, Placement, default_device, default_dtype
from opensora_sdk.plan import PROMPT_KEYS, GenerationPlan, ModelFacts, plan_generation, plan_prompts
from opensora_sdk.presets import BUILTIN_PRESET, check_defaults, get_preset, resolve_defaults

_UNSET = object()


class OpenSoraPipeline(MemoryMixin, LoraLoaderMixin):
    """Open-Sora v1.2 text/image/video-to-video generation.

    Memory policy (arguments, not hidden state; see `opensora_sdk.placement.Placement`):

    * Weights wait on the host and each model moves to `device` only when it is first used:
      T5 to encode, the VAE to encode references or decode, STDiT3 to sample.
    * T5 leaves `device` right after encoding, always, also when encoding fails; all prompts
      of a call, every loop included, are encoded in one pass before sampling starts. T5 given
      as a folder or hub id is loaded at the first prompt that needs it; with `text_cache`
      (`from_pretrained`), prompts found there skip T5, which then never loads.
    * `offload=None` (default): STDiT3 and the VAE stay on `device` once used (fastest).
      `offload="model"`: each goes back to the host after every use, so only one large
      model is on the device at a time, at the cost of host-device copies per loop.
      `offload="sequential"`: also STDiT3's and T5's blocks come in one at a time (least memory).
    * `block_swap=N` (`enable_block_swap`): N transformer blocks stay on `device`, the others
      (and T5's) stream from pinned host memory while the previous block computes; same output.
    * `fp8=True` (or "per_tensor"; `enable_fp8`): the transformer's and T5's Linear weights
      stored as float8 e4m3 with per-channel scales, computed in `dtype` (`opensora_sdk.fp8`).
    * diffusers' names set the same policy: `enable_model_cpu_offload`,
      `enable_sequential_cpu_offload`, `enable_vae_tiling`, `enable_vae_slicing`
      (`opensora_sdk.pipeline_memory`); LoRA: `load_lora_weights` and the rest
      (`opensora_sdk.pipeline_lora`).
    * The VAE decodes chunk by chunk (17 frames, `micro_batch_size` frames per 2D call);
      `vae_tiling=SpatialTiling(...)` also tiles each frame (less memory, slight seams).
      `vae_dtype` (default: `dtype`) runs the VAE in its own dtype, e.g. `torch.bfloat16` on
      a CPU with AMX / AVX512-BF16: several times faster than float32 there, about 50 dB
      PSNR from it; on other CPUs bfloat16 is emulated and slower.
    * Prompts run in batches of `batch_size` (default 1).
    `opensora info` prints an estimate for a plan (see `opensora_sdk.estimates`).

    Randomness: sample k of a call uses its own `torch.Generator` on `device` seeded with
    seed + k, for its starting noise (drawn per loop), its re-noising draws and its reference
    encodings, so a sample does not depend on its batch. `seed=None` draws a random seed; the
    seed of each video is in `video.metadata["seed"]`.

    Several processes (`sp_group`, a torch.distributed group, see `opensora_sdk.distributed`):
    every rank of the group runs the same call; a seed drawn at random is rank 0's on every
    rank; STDiT3's tokens are sharded over the ranks, every rank encodes the text, and the
    VAE decode is split by temporal chunks; every rank returns the same videos (save them on
    rank 0). A failure on one rank ends the call on every rank.
    """

    def __init__(
        self,
        transformer,
        vae,
        text_encoder,
        *,
        family: ModelFamily | None = None,
        defaults: Mapping[str, Any] | None = None,
        device=None,
        dtype: torch.dtype | None = None,
        offload: str | None = None,
        vae_tiling=None,
        max_latent_frames: int | None = None,
        progress: bool = True,
        sources: dict[str, str] | None = None,
        sp_group=None,
        fp8: bool | str = False,
        block_swap: int | None = None,
        compile: bool = False,
        vae_dtype: torch.dtype | None = None,
    ):
        self.placement = Placement(device, offload, block_swap)  # checks offload first
        caption, text_dim = transformer.config.caption_channels, text_encoder.output_dim
        if caption != text_dim:
            raise ValueError(f"STDiT3 caption_channels={caption} must equal the text encoder's output dim {text_dim}")
        if text_encoder.model_max_length != transformer.config.model_max_length:
            raise ValueError(
                f"text encoder model_max_length={text_encoder.model_max_length} must equal STDiT3 "
                f"model_max_length={transformer.config.model_max_length} (the null caption has that many tokens)"
            )
        check_defaults(defaults)
        found = family_of(transformer)
        if family is not None and family.name != found.name:
            raise ValueError(f"family={family.name!r} but the transformer is an Open-Sora {found.name} model")
        family = found
        self.transformer = transformer.eval().requires_grad_(False)
        self.vae = vae.eval().requires_grad_(False)
        self.text_encoder = text_encoder
        self.family = family
        self.defaults = dict(defaults or {})  # the model's own size / length / steps / guidance
        self.vae_tiling = vae_tiling
        self.max_latent_frames = max_latent_frames if max_latent_frames is not None else family.max_latent_frames
        self.progress = progress
        self.sources = dict(sources or {})
        self.sp_group = sp_group  # sequence parallelism: shard the transformer over these processes
        if hasattr(self.transformer, "set_sequence_parallel_group"):
            self.transformer.set_sequence_parallel_group(sp_group)
        elif sp_group is not None:
            raise ValueError(f"sequence parallelism (sp_group) is not available for {type(transformer).__name__} "
                             f"(Open-Sora {family.name}); run it in one process per video")
        if block_swap is not None:
            self.enable_block_swap(block_swap)
        from opensora_sdk.dtypes import parse_dtype

        self.vae_dtype = parse_dtype(vae_dtype, "vae_dtype", allow_none=True)  # None: the VAE follows `dtype`
        self.to(dtype=dtype)
        if self.vae_dtype is not None:
            self.vae.to(self.vae_dtype)
        if fp8:
            self.enable_fp8(per_channel=fp8 if isinstance(fp8, str) else True)
        if compile:
            self.compile()

    # ---- construction ------------------------------------------------------------------------

    @classmethod
    def from_pretrained(
        cls,
        model=OFFICIAL_REPOS["stdit3"],
        vae=OFFICIAL_REPOS["vae"],
        text_encoder=OFFICIAL_REPOS["text_encoder"],
        *,
        dtype: torch.dtype | None = None,
        torch_dtype: torch.dtype | None = None,
        text_encoder_dtype: torch.dtype = torch.float32,
        device=None,
        local_files_only: bool | None = None,
        text_cache=None,
        **kwargs,
    ) -> OpenSoraPipeline:
        """Load the transformer, the VAE and T5 from folders, weight files or hub ids (v1.2 by
        default). The family is recognised from the transformer (STDiT3: v1.2, STDiT2: v1.1,
        STDiT: v1.0; `family=`, e.g. from a preset, must agree) and the VAE from its files (the
        v1.2 video VAE or the per-frame SD VAE).

        Each may also be an already built model object. Weights load on the host in `dtype`
        (or `torch_dtype`, diffusers' name; default: bfloat16 on an accelerator, float32 on the
        CPU; T5 in float32, as officially) and move to `device` (default: CUDA when available)
        when first used. T5 given as a folder or hub id is found and checked now and loaded when
        a prompt first needs it. `text_cache`: None, True (in memory), a folder or an
        `EmbeddingCache` (`models/text_cache.py`): prompts it holds skip T5, which a call whose
        prompts are all cached never loads. Other keyword arguments go to the constructor
        (offload, vae_tiling, defaults, progress, sp_group, ...).
        """
        from opensora_sdk.models import T5TextEncoder
        from opensora_sdk.models.auto import load_transformer, load_vae

        device = torch.device(device) if device is not None else default_device()
        dtype = dtype or torch_dtype or default_dtype(device)
        sources = {"transformer": model, "vae": vae, "text_encoder": text_encoder}
        family = kwargs.get("family")
        from opensora_sdk.fp8 import is_fp8_file, load_fp8_transformer

        if is_fp8_file(model):  # written by fp8.save_fp8: fp8 layers with their scales
            model = load_fp8_transformer(model, device=HOST).to(dtype)
        if not isinstance(model, torch.nn.Module):
            model = load_transformer(model, family=family.name if family else None, dtype=dtype, device=HOST,
                                     local_files_only=local_files_only)
        if not isinstance(vae, torch.nn.Module):
            vae = load_vae(vae, dtype=dtype, device=HOST, local_files_only=local_files_only)
        if not isinstance(text_encoder, T5TextEncoder):
            text_encoder = T5TextEncoder.from_pretrained(
                text_encoder, model_max_length=model.config.model_max_length, dtype=text_encoder_dtype,
                device=HOST, local_files_only=local_files_only, cache=text_cache, lazy=True,
            )
        elif text_cache is not None:
            from opensora_sdk.models.text_cache import as_cache

            text_encoder.cache = as_cache(text_cache)
        sources = {k: os.fspath(v) if isinstance(v, (str, os.PathLike)) else type(v).__name__ for k, v in sources.items()}
        return cls(model, vae, text_encoder, device=device, dtype=dtype, sources=sources, **kwargs)

    @classmethod
    def from_preset(
        cls,
        name: str | None = None,
        *,
        seed: int = 0,
        dtype: torch.dtype | None = None,
        torch_dtype: torch.dtype | None = None,
        device=None,
        local_files_only: bool | None = None,
        **kwargs,
    ) -> OpenSoraPipeline:
        """A pipeline from `PRESETS[name]` (default `BUILTIN_PRESET`, the built-in tiny model);
        components given as configs get random weights drawn from `seed` (the global torch RNG
        is left untouched). The preset's `defaults` become the pipeline's. `torch_dtype`: `dtype`."""
        from opensora_sdk.models import T5TextEncoder
        from opensora_sdk.models.auto import build_transformer, build_vae
        from opensora_sdk.models.t5_file import tiny_t5_config

        name = name or BUILTIN_PRESET
        p = get_preset(name)
        device = torch.device(device) if device is not None else default_device()
        dtype = dtype or torch_dtype or default_dtype(device)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = p.transformer if isinstance(p.transformer, str) else build_transformer(copy.deepcopy(p.transformer))
            vae = p.vae if isinstance(p.vae, str) else build_vae(copy.deepcopy(p.vae))
            te = p.text_encoder
            if isinstance(te, dict):
                length = (model.config if isinstance(model, torch.nn.Module) else p.transformer).model_max_length
                te = T5TextEncoder.from_config(tiny_t5_config(**te), model_max_length=length)
        kwargs.setdefault("max_latent_frames", p.latent_frame_limit)
        kwargs.setdefault("defaults", p.defaults)
        kwargs.setdefault("family", p.family)
        pipe = cls.from_pretrained(model, vae, te, dtype=dtype, device=device, local_files_only=local_files_only, **kwargs)
        pipe.sources = {k: (v if isinstance(v, str) else f"random weights (seed {seed})")
                        for k, v in (("transformer", p.transformer), ("vae", p.vae), ("text_encoder", p.text_encoder))}
        pipe.sources["preset"] = name
        return pipe

    # ---- placement ---------------------------------------------------------------------------

    @property
    def device(self) -> torch.device:
        return self.placement.device

    @property
    def offload(self) -> str | None:
        return self.placement.offload

    @property
    def dtype(self) -> torch.dtype:
        return self.transformer.x_embedder.proj.weight.dtype

    def compile(self) -> None:
        """Regional torch.compile of the transformer's blocks (`STDiT3.compile_blocks`; same
        output within float rounding). The first generation of each size compiles them."""
        if not hasattr(self.transformer, "compile_blocks"):
            raise ValueError(f"compile=True: regional compile is available for v1.2 models (STDiT3), not "
                             f"{type(self.transformer).__name__}; leave compile out")
        import sys

        self.transformer.compile_blocks()
        print("compile: the transformer blocks compile during the first generation of each size "
              "(slow once, faster after)", file=sys.stderr)

    def to(self, device=None, dtype: torch.dtype | None = None) -> OpenSoraPipeline:
        """Set the device (models move there when used; any model resident elsewhere goes back
        to the host now) and/or cast STDiT3 and the VAE to `dtype` (T5 keeps its dtype; each
        model keeps its own float32 parts, see their `.to()`)."""
        if dtype is not None:
            self.transformer.to(dtype)
            self.vae.to(getattr(self, "vae_dtype", None) or dtype)
        if device is not None:
            self.placement = Placement(device, self.placement.offload, getattr(self.placement, "block_swap", None))
            for module in (self.transformer, self.vae):
                if next(module.parameters()).device not in (HOST, self.placement.device):
                    module.to(HOST)
        return self

    def models(self):
        """The models as `opensora_sdk.generation` takes them."""
        from opensora_sdk.generation import Models

        return Models(self.transformer, self.vae, self.text_encoder, vae_tiling=self.vae_tiling, sp_group=self.sp_group)

    # ---- planning ----------------------------------------------------------------------------

    @property
    def facts(self) -> ModelFacts:
        return ModelFacts.from_models(self.transformer, self.vae, self.max_latent_frames)

    def plan(self, prompt, **kwargs) -> GenerationPlan:
        """Resolve and check a call's arguments without running any model (see `__call__`);
        size, length, frame rate, steps, guidance, align and the aesthetic score left out (None;
        for align and aesthetic_score: not given) come from the model's defaults, then from its
        family's table. Under sequence parallelism a random seed is rank 0's draw on every rank."""
        from opensora_sdk.presets import DEFAULT_KEYS, NULLABLE_KEYS

        given = {}
        for key in DEFAULT_KEYS:
            value = kwargs.pop(key, _UNSET)
            if value is not _UNSET and (value is not None or key in NULLABLE_KEYS):
                given[key] = value
        if "align" not in given and kwargs.get("conditions"):
            given["align"] = None  # typed conditions sit exactly where they say (frame -1: the last latent)
        loop = kwargs.get("loop", PLAN_DEFAULTS["loop"])
        loop = loop if isinstance(loop, int) else 1
        kwargs.update(resolve_defaults(self.defaults, self.family, loop=loop, sampler=kwargs.get("sampler"), **given))
        for key, value in PLAN_DEFAULTS.items():
            kwargs.setdefault(key, value)
        prompts = plan_prompts(prompt, **{k: kwargs.pop(k) for k in PROMPT_KEYS})
        plan = plan_generation(self.facts, prompts, family=self.family, **kwargs)
        return self.agree(plan)

    def agree(self, plan: GenerationPlan) -> GenerationPlan:
        """`plan` with rank 0's seeds on every rank of `sp_group` (identity without a group)."""
        if self.sp_group is None:
            return plan
        from opensora_sdk import distributed

        seeds = torch.tensor(plan.seeds, dtype=torch.int64)
        return plan.with_seeds(distributed.broadcast(seeds, self.sp_group).tolist())

    # ---- generation --------------------------------------------------------------------------

    def __call__(
        self,
        prompt: str | Sequence[str],
        negative_prompt: str | None = None,
        resolution: str | None = None,
        aspect_ratio: str | None = None,
        num_frames: int | str | None = None,
        fps: float | None = None,
        num_steps: int | None = None,
        guidance_scale: float | None = None,
        aesthetic_score=_UNSET,
        motion_score: float | None = None,
        camera_motion: str | None = None,
        conditions=(),
        seed: int | None = None,
        callback: Callable | None = None,
        height: int | None = None,
        width: int | None = None,
        loop: int = 1,
        condition_frame_length: int = 5,
        *,
        reference_path=None,
        mask_strategy=None,
        condition_frame_edit: float = 0.0,
        align=_UNSET,
        batch_size: int = 1,
        timestep_warp: bool | None = None,
        sampler: str | None = None,
        cache=None,
        progress: bool | None = None,
        num_inference_steps: int | None = None,
        generator: torch.Generator | Sequence[torch.Generator] | None = None,
        num_videos_per_prompt: int = 1,
        output_type: str | None = None,
        callback_on_step_end: Callable | None = None,
        callback_on_step_end_tensor_inputs: Sequence[str] = ("latents",),
        **unknown,
    ) -> Any:
        """Generate a video per prompt; a str prompt gives a `Video`, a list a list of them
        (with `output_type`: a `diffusers_compat.VideoPipelineOutput`, see below).

        Args:
            prompt: text; may carry loop segments ("|0|a cat|1|a dog": loop i uses the last
                segment starting at or before i) and inline JSON options
                ({"reference_path": "a.png", "mask_strategy": "0"}).
            negative_prompt: replaces the null caption in the unconditional branch of
                guidance, with its own text mask ("" or None: the model's null caption,
                masked with the prompt's mask, as officially).
            resolution, aspect_ratio: a size table entry ("240p", "9:16" = H:W, landscape);
                `height` and `width` (pixels, rounded to multiples of 8) override them. Left
                out (None): the model's native size where its preset has one (`defaults`,
                e.g. 64x64 for the built-in model), else 240p 9:16.
            num_frames: pixel frames per loop: an int or "2s"/"4s"/"8s"/"16s" (51..408), at
                most 408 ("16s", 120 latent frames) per loop for v1.2 (`max_latent_frames`).
                None: the preset's default, else "4s".
            fps: the frame rate of the output and of the model's conditioning (one frame: 120).
                None: the preset's default (8 for the built-in model), else 24.
            num_steps, guidance_scale: sampling steps; classifier-free guidance scale
                (1 runs the conditional branch only). None: the preset's defaults, else 30
                and 7.0.
            aesthetic_score, motion_score, camera_motion: appended as the training captions
                were ("aesthetic score: 6.5." ...); camera_motion one of `text.CAMERA_MOTIONS`.
                aesthetic_score left out: the family's (6.5 for v1.2; none for v1.1 and v1.0,
                which were not trained with it); None: no suffix.
            conditions: `ImageCondition` / `VideoCondition` objects for every prompt, or one
                list per prompt. Alternatively `reference_path` (per prompt; paths joined by
                ';') with `mask_strategy` (the official string language; default "0").
            seed: sample k uses seed + k; None draws a random seed (in video.metadata).
            callback: callback(step, total, latent, denoised) after every sampling step,
                counted over the whole call (all batches and loops); return False to stop
                (raises `SamplingInterrupted`).
            loop, condition_frame_length: long video: `loop` clips of num_frames (a multiple
                of 17), each conditioned on the previous clip's last `condition_frame_length`
                latent frames (multiple of 5) re-encoded by the VAE with edit ratio
                `condition_frame_edit`; output L*N - (L-1)*(c/5*17) frames.
            align: snap mask-strategy starts to multiples of this many latent frames (the VAE
                chunk; a last-frame image, frame -1, then lands on the last chunk's first
                latent). None places them exactly. Default: exact for typed `conditions`, the
                family's (5, as the v1.2 inference config) for the official string form.
            batch_size: prompts sampled together (same size and length).
            timestep_warp: shift the schedule toward high noise for large and long videos
                (v1.2's official inference: on); None = the model's default (v1.2: on; the
                built-in model, trained without it: off).
            sampler: the sampling method, None = the family's own (v1.2 "rflow", v1.1 and
                v1.0 "iddpm"); v1.1 and v1.0 also take "dpm-solver" (DPM-Solver++, 20 steps
                by default, no references).
            cache: step caching, a speed/quality dial (v1.2; off by default): "teacache:0.1"
                skips the transformer's blocks at steps whose input barely changed, "pab"
                reuses attention outputs over a few steps; or a `step_cache.TeaCacheConfig` /
                `PABConfig`. Threshold 0 gives the uncached video exactly. The counts of what
                was skipped: `generate(plan, timings=t)` puts them in `t.cache_stats`.
            progress: tqdm bar over steps (default: the pipeline's `progress`).

        diffusers names (aliases of ours; `opensora_sdk.diffusers_compat`):
            num_inference_steps: num_steps.
            generator: a torch.Generator: seed = its `initial_seed()` (sample k: seed + k); or
                a list, one per video: sample k seeded with generator k's `initial_seed()`.
                The generators are read, not advanced. Not together with `seed`.
            num_videos_per_prompt: each prompt (and per-prompt lists) repeated n times in a
                row; seeds still go seed + k over all videos.
            output_type: None (default): our `Video` (or list), as above. Otherwise a
                `VideoPipelineOutput(frames, videos)` in diffusers' layout, batched also for a
                str prompt: "np" float32 [B, F, H, W, 3] in [0, 1] (= video.frames / 255), "pt"
                float32 [B, F, 3, H, W] in [0, 1], "pil" a list (per video) of lists of PIL
                images, "latent" the final latents [B, C, T', h, w] (the last loop's) without
                decoding (videos None).
            callback_on_step_end: fn(pipe, step, timestep, callback_kwargs) -> dict after every
                sampling step, callback_kwargs = {"latents": the latent after the step}; a
                returned "latents" tensor replaces it in place. `step` restarts per clip (batch,
                loop); runs before `callback`. callback_on_step_end_tensor_inputs: ["latents"]
                (the only one available).
            Unknown keyword arguments raise a TypeError listing the accepted ones.
        """
        from opensora_sdk import diffusers_compat as compat

        compat.check_call(self.__call__, unknown, output_type, callback_on_step_end, callback_on_step_end_tensor_inputs)
        num_steps = compat.alias("num_steps", num_steps, "num_inference_steps", num_inference_steps)
        seed = compat.generator_seed(seed, generator)
        prompt, conditions, reference_path, mask_strategy = compat.repeat_per_prompt(
            num_videos_per_prompt, prompt, conditions, reference_path, mask_strategy
        )
        plan = self.plan(
            prompt, negative_prompt=negative_prompt, resolution=resolution, aspect_ratio=aspect_ratio,
            num_frames=num_frames, fps=fps, num_steps=num_steps, guidance_scale=guidance_scale,
            aesthetic_score=aesthetic_score, motion_score=motion_score, camera_motion=camera_motion,
            conditions=conditions, reference_path=reference_path, mask_strategy=mask_strategy, seed=seed,
            height=height, width=width, loop=loop, condition_frame_length=condition_frame_length,
            condition_frame_edit=condition_frame_edit, align=align, batch_size=batch_size,
            timestep_warp=timestep_warp, sampler=sampler, cache=cache,
        )
        plan = compat.seed_samples(plan, generator)
        callback = compat.step_end_callback(
            self, plan, callback, callback_on_step_end, callback_on_step_end_tensor_inputs
        )
        if output_type == "latent":
            return compat.VideoPipelineOutput(compat.generate_latents(self, plan, callback=callback, progress=progress))
        videos = self.generate(plan, callback=callback, progress=progress)
        if output_type is not None:
            return compat.to_output(videos, output_type)
        return videos[0] if isinstance(prompt, str) else videos

    def generate(
        self, plan: GenerationPlan, *, callback: Callable | None = None, progress: bool | None = None, timings=None,
        latents_only: bool = False,
    ):
        """Run a plan made by `plan()` (or by `plan_generation` for these models): one `Video`
        per sample, in order (`latents_only`: the undecoded latents [N, C, T', h, w] of every
        sample's last loop instead). `timings` (a `generation.Timings`) receives seconds per stage."""
        from opensora_sdk import generation

        plan = self.agree(plan)
        progress = self.progress if progress is None else progress
        models = self.models()
        if latents_only:
            run = lambda: generation.generate_latents(  # noqa: E731
                models, self.placement, plan, callback=callback, progress=progress, timings=timings
            )
        else:
            run = lambda: generation.generate(  # noqa: E731
                models, self.placement, plan, callback=callback, progress=progress, timings=timings
            )
        if self.sp_group is None:
            return run()
        from opensora_sdk import distributed

        with distributed.fail_together(self.sp_group):
            return run()

    def __repr__(self) -> str:
        c = self.transformer.config
        return (
            f"OpenSoraPipeline({self.family.name}: {type(self.transformer).__name__}(hidden {c.hidden_size}, depth "
            f"{c.depth}), device={self.device}, "
            f"dtype={self.dtype}, offload={self.offload!r}, sources={self.sources})"
        )


# What `plan()` uses for the arguments that are not in a family's defaults table.
PLAN_DEFAULTS: dict[str, Any] = {
    "negative_prompt": None, "motion_score": None, "camera_motion": None, "conditions": (),
    "reference_path": None, "mask_strategy": None, "seed": None, "loop": 1, "condition_frame_length": 5,
    "condition_frame_edit": 0.0, "batch_size": 1, "sampler": None,
    "cache": None,
}  # fmt: skip


__all__ = ["OpenSoraPipeline"]
