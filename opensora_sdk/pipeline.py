"""`OpenSoraPipeline`: text (and references) in, `Video` out.

A thin composition of the SDK's pieces (see DESIGN.md): prompts are processed
(`opensora_sdk.text`) and encoded by T5; references are encoded by the VAE and pasted into
the starting noise by the mask strategy (`opensora_sdk.conditioning`); `opensora_sdk.sampling`
integrates the rectified flow with STDiT3; the VAE decodes. Long videos loop that, each loop
conditioned on the end of the previous one. Every argument is checked first by
`opensora_sdk.plan.plan_generation`, which `opensora info` also uses.

Model selection: `PRESETS` maps a name to a `ModelPreset` (hub ids / folders, or configs for
random weights, and the model's own generation defaults). Adding a preset is one entry there.
`BUILTIN_PRESET` ("builtin": the tiny model trained on synthetic shapes that ships inside the
package, `opensora_sdk/builtin/tiny/`) is the default of `from_preset`, `opensora generate`
and the ComfyUI loaders.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch

from opensora_sdk.configs import (
    OFFICIAL_REPOS,
    STDIT3_PRESETS,
    VAE_PRESETS,
    STDiT3Config,
    VideoAutoencoderConfig,
    read_config_json,
    video_autoencoder_config_from_official,
)
from opensora_sdk.plan import (
    DEFAULT_ALIGN,
    DEFAULT_MAX_LATENT_FRAMES,
    GenerationPlan,
    ModelFacts,
    SamplePlan,
    plan_generation,
)
from opensora_sdk.schedulers.rflow import RectifiedFlow
from opensora_sdk.video import Video

HOST = torch.device("cpu")
OFFLOAD_CHOICES = (None, "model")
_UNSET = object()


# --------------------------------------------------------------------------------------------
# Presets
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelPreset:
    """Where the three models come from.

    Each of `transformer`, `vae`, `text_encoder` is a source (a local folder, a weight file
    or a hub repo id) or an architecture to build with random weights: an `STDiT3Config`, a
    `VideoAutoencoderConfig`, and a dict of T5 config fields (used with the built-in tiny
    tokenizer, see `tiny_t5_config`).

    `defaults`: the model's own generation defaults, used when a call leaves them out (keys of
    `OFFICIAL_DEFAULTS` plus `height` and `width`, e.g. a small model's native size); the
    others are the official ones (see `generation_defaults`).
    """

    description: str
    transformer: str | STDiT3Config
    vae: str | VideoAutoencoderConfig
    text_encoder: str | dict
    max_latent_frames: int | None = DEFAULT_MAX_LATENT_FRAMES
    defaults: Mapping[str, Any] = field(default_factory=dict)


# The official inference defaults (spec 6.1), used where a preset gives none.
OFFICIAL_DEFAULTS: dict[str, Any] = {
    "resolution": "240p", "aspect_ratio": "9:16", "num_frames": "4s", "fps": 24, "num_steps": 30, "guidance_scale": 7.0,
}  # fmt: skip
DEFAULT_KEYS = (*OFFICIAL_DEFAULTS, "height", "width")

# The built-in model's files, inside the package (written by training/recipes/tiny_builtin.py).
BUILTIN_DIR = Path(__file__).resolve().parent / "builtin" / "tiny"


PRESETS: dict[str, ModelPreset] = {
    "v1.2": ModelPreset(
        "the released Open-Sora v1.2 weights (STDiT3-XL/2, VAE v1.2, T5-XXL)",
        OFFICIAL_REPOS["stdit3"], OFFICIAL_REPOS["vae"], OFFICIAL_REPOS["text_encoder"],
    ),
    "tiny-random": ModelPreset(
        "tiny random weights (STDiT3 hidden 64, the tiny VAE, a 2-layer T5): runs offline in "
        "seconds and draws noise; for tests and wiring checks",
        STDIT3_PRESETS["STDiT3-tiny"], VAE_PRESETS["OpenSoraVAE_V1_2-tiny"], {"d_model": 32},
    ),
    "builtin": ModelPreset(
        "the built-in tiny model (STDiT3 hidden 128 x 4, a tiny v1.2 VAE, a 2-layer T5 with random weights) "
        "trained from scratch on synthetic moving shapes by training/recipes/tiny_builtin.py; ships with "
        "the package, runs offline on a CPU; 64x64, 17 frames at 8 fps (2.1 s, one VAE chunk)",
        str(BUILTIN_DIR / "transformer"), str(BUILTIN_DIR / "vae"), str(BUILTIN_DIR / "text_encoder"),
        # trained on 17-frame clips; 34 frames (two chunks) lets loops and extensions carry one
        # chunk over, beyond its training length
        max_latent_frames=10,
        defaults={"height": 64, "width": 64, "num_frames": 17, "fps": 8, "num_steps": 20, "guidance_scale": 5.0},
    ),
}


# The built-in default model: what `from_preset()`, `opensora generate` without model options
# and the ComfyUI nodes and workflows ("(built-in)") load. Changing the built-in model is this line.
BUILTIN_PRESET = "builtin"


def builtin_preset() -> str:
    """The name of the built-in default preset (`BUILTIN_PRESET`)."""
    return BUILTIN_PRESET


def get_preset(name: str) -> ModelPreset:
    if name not in PRESETS:
        raise ValueError(f"preset={name!r} is not known; choose one of {sorted(PRESETS)}")
    return PRESETS[name]


def generation_defaults(defaults: Mapping[str, Any] | None = None, **given) -> dict[str, Any]:
    """Fill the size, length, frame rate, steps and guidance a call left out (None) from a
    model's `defaults`, then from `OFFICIAL_DEFAULTS`.

    `given` holds resolution, aspect_ratio, height, width, num_frames, fps, num_steps and
    guidance_scale. The size is the model's native height x width only when none of
    resolution, aspect_ratio, height and width is given; otherwise the given ones, with the
    official resolution / aspect ratio for a missing one.
    """
    defaults = dict(defaults or {})
    unknown = sorted(set(defaults) - set(DEFAULT_KEYS))
    if unknown:
        raise ValueError(f"generation defaults {unknown} are not known; allowed: {list(DEFAULT_KEYS)}")
    out = dict(given)
    size_keys = ("resolution", "aspect_ratio", "height", "width")
    if all(given.get(k) is None for k in size_keys) and defaults.get("height") is not None:
        out["height"], out["width"] = defaults["height"], defaults["width"]
    for key in OFFICIAL_DEFAULTS:
        if out.get(key) is None and (key not in size_keys or out.get("height") is None):
            out[key] = defaults.get(key, OFFICIAL_DEFAULTS[key])
    return out


@dataclass
class ModelConfigs:
    """The architectures a generation would use, found without loading weights (for `info`)."""

    transformer: STDiT3Config
    vae: VideoAutoencoderConfig
    text_encoder: dict  # T5 config fields
    sources: dict[str, str]
    notes: list[str]
    max_latent_frames: int | None = DEFAULT_MAX_LATENT_FRAMES

    @property
    def facts(self) -> ModelFacts:
        return ModelFacts.from_configs(self.transformer, self.vae, self.max_latent_frames)


def model_configs(preset: str | None = None, *, model=None, vae=None, text_encoder=None) -> ModelConfigs:
    """Configs of a preset (default "v1.2") with optional per-component sources replaced.

    A local folder's config.json is read; a hub id or a bare weight file is assumed to have
    the v1.2 architecture (said in `notes`), since looking further would mean downloading.
    """
    from opensora_sdk.estimates import T5_XXL_CONFIG
    from opensora_sdk.models.text_encoder import tiny_t5_config

    p = get_preset(preset or "v1.2")
    chosen = {"transformer": model or p.transformer, "vae": vae or p.vae, "text_encoder": text_encoder or p.text_encoder}
    defaults = {"transformer": STDiT3Config(), "vae": VideoAutoencoderConfig(), "text_encoder": dict(T5_XXL_CONFIG)}
    out, sources, notes = {}, {}, []
    for kind, src in chosen.items():
        if not isinstance(src, (str, os.PathLike)):
            out[kind] = copy.deepcopy(src) if kind != "text_encoder" else tiny_t5_config(**src).to_dict()
            sources[kind] = f"random weights ({type(src).__name__})"
            continue
        sources[kind] = os.fspath(src)
        config_file = Path(src).expanduser() / "config.json"
        if not config_file.is_file():
            out[kind] = defaults[kind]
            notes.append(f"{kind} {os.fspath(src)!r}: no local config.json; assuming the v1.2 architecture")
        elif kind == "transformer":
            out[kind] = read_config_json(STDiT3Config, config_file)
        elif kind == "vae":
            out[kind] = video_autoencoder_config_from_official(json.loads(config_file.read_text("utf-8")))
        else:
            out[kind] = json.loads(config_file.read_text("utf-8"))
    return ModelConfigs(out["transformer"], out["vae"], out["text_encoder"], sources, notes, p.max_latent_frames)


# --------------------------------------------------------------------------------------------
# Devices
# --------------------------------------------------------------------------------------------


def default_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else HOST


def default_dtype(device: torch.device) -> torch.dtype:
    """bfloat16 on accelerators (the official inference dtype), float32 on the CPU."""
    return torch.float32 if device.type == "cpu" else torch.bfloat16


def _normalize_device(device) -> torch.device:
    device = torch.device(device)
    if device.type != "cpu" and device.index is None:
        device = torch.empty(0, device=device).device  # "cuda" -> "cuda:0", as tensors report it
    return device


def _module_device(module: torch.nn.Module) -> torch.device:
    return next(module.parameters()).device


def _cast(module: torch.nn.Module, dtype: torch.dtype) -> None:
    """Cast weights, keeping STDiT3's RoPE table and a float16 VAE's spatial decoder in float32."""
    module.to(dtype)
    rope = getattr(module, "rope", None)
    if rope is not None:
        rope.freqs.data = rope.freqs.data.float()
    config = getattr(module, "config", None)
    if dtype == torch.float16 and isinstance(config, VideoAutoencoderConfig) and config.vae_2d.force_upcast:
        module.spatial.decoder.float()
        module.spatial.post_quant_conv.float()


# --------------------------------------------------------------------------------------------
# The pipeline
# --------------------------------------------------------------------------------------------


class OpenSoraPipeline:
    """Open-Sora v1.2 text/image/video-to-video generation.

    Memory policy (arguments, not hidden state):

    * Weights wait on the host and each model moves to `device` only when it is first used:
      T5 to encode, the VAE to encode references or decode, STDiT3 to sample.
    * T5 leaves `device` right after encoding, always (`offload_after_encode`); all prompts of
      a call, every loop included, are encoded in one pass before sampling starts.
    * `offload=None` (default): STDiT3 and the VAE stay on `device` once used (fastest).
      `offload="model"`: each goes back to the host after every use, so only one large
      model is on the device at a time (peak = the larger of STDiT3 + activations and
      VAE + decode working set), at the cost of host-device copies per loop.
    * The VAE decodes chunk by chunk (17 frames, `micro_batch_size` frames per 2D call);
      `vae_tiling=SpatialTiling(...)` also tiles each frame (less memory, slight seams).
    * Prompts run in batches of `batch_size` (default 1).
    `opensora info` prints an estimate for a plan (see `opensora_sdk.estimates`).

    Randomness: sample k of a call uses its own `torch.Generator` on `device` seeded with
    seed + k, for its starting noise (drawn per loop), its re-noising draws and its reference
    encodings, so a sample does not depend on its batch. `seed=None` draws a random seed; the
    seed of each video is in `video.metadata["seed"]`.

    Several processes (`sp_group`, a torch.distributed group, see `opensora_sdk.distributed`):
    every rank of the group runs the same call with the same seed; STDiT3's tokens are
    sharded over the ranks, every rank encodes the text, and the VAE decode is split by
    temporal chunks; every rank returns the same videos (save them on rank 0).
    """

    def __init__(
        self,
        transformer,
        vae,
        text_encoder,
        scheduler: RectifiedFlow | None = None,
        *,
        defaults: Mapping[str, Any] | None = None,
        device=None,
        dtype: torch.dtype | None = None,
        offload: str | None = None,
        vae_tiling=None,
        align: int | None = DEFAULT_ALIGN,
        max_latent_frames: int | None = DEFAULT_MAX_LATENT_FRAMES,
        progress: bool = True,
        sources: dict[str, str] | None = None,
        sp_group=None,
    ):
        if offload not in OFFLOAD_CHOICES:
            raise ValueError(f"offload={offload!r} is not allowed: choose one of {list(OFFLOAD_CHOICES)}")
        caption, text_dim = transformer.config.caption_channels, text_encoder.output_dim
        if caption != text_dim:
            raise ValueError(f"STDiT3 caption_channels={caption} must equal the text encoder's output dim {text_dim}")
        if text_encoder.model_max_length != transformer.config.model_max_length:
            raise ValueError(
                f"text encoder model_max_length={text_encoder.model_max_length} must equal STDiT3 "
                f"model_max_length={transformer.config.model_max_length} (the null caption has that many tokens)"
            )
        self.transformer = transformer.eval().requires_grad_(False)
        self.vae = vae.eval().requires_grad_(False)
        self.text_encoder = text_encoder
        self.scheduler = scheduler or RectifiedFlow()
        self.offload = offload
        self.vae_tiling = vae_tiling
        self.align = align
        self.max_latent_frames = max_latent_frames
        self.progress = progress
        self.sources = dict(sources or {})
        generation_defaults(defaults)  # raises on an unknown key
        self.defaults = dict(defaults or {})  # the model's own size / length / steps / guidance
        self.sp_group = sp_group  # sequence parallelism: shard STDiT3 over these processes
        self.transformer.set_sequence_parallel_group(sp_group)
        self.device = HOST
        self.dtype = self.transformer.x_embedder.proj.weight.dtype
        self.to(device if device is not None else default_device(), dtype)

    # ---- construction ------------------------------------------------------------------------

    @classmethod
    def from_pretrained(
        cls,
        model=OFFICIAL_REPOS["stdit3"],
        vae=OFFICIAL_REPOS["vae"],
        text_encoder=OFFICIAL_REPOS["text_encoder"],
        *,
        dtype: torch.dtype | None = None,
        text_encoder_dtype: torch.dtype = torch.float32,
        device=None,
        local_files_only: bool | None = None,
        **kwargs,
    ) -> OpenSoraPipeline:
        """Load STDiT3, the VAE and T5 from folders, weight files or hub ids (v1.2 by default).

        Each may also be an already built model object. Weights load on the host in `dtype`
        (default: bfloat16 on an accelerator, float32 on the CPU; T5 in float32, as officially)
        and move to `device` (default: CUDA when available) when first used. Other keyword
        arguments go to the constructor (offload, vae_tiling, align, scheduler, progress, ...).
        """
        from opensora_sdk.models import STDiT3, T5TextEncoder, VideoAutoencoder

        device = torch.device(device) if device is not None else default_device()
        dtype = dtype or default_dtype(device)
        sources = {"transformer": model, "vae": vae, "text_encoder": text_encoder}
        if not isinstance(model, torch.nn.Module):
            model = STDiT3.from_pretrained(model, dtype=dtype, device=HOST, local_files_only=local_files_only)
        if not isinstance(vae, torch.nn.Module):
            vae = VideoAutoencoder.from_pretrained(vae, dtype=dtype, device=HOST, local_files_only=local_files_only)
        if not isinstance(text_encoder, T5TextEncoder):
            text_encoder = T5TextEncoder.from_pretrained(
                text_encoder, model_max_length=model.config.model_max_length, dtype=text_encoder_dtype,
                device=HOST, local_files_only=local_files_only,
            )
        sources = {k: os.fspath(v) if isinstance(v, (str, os.PathLike)) else type(v).__name__ for k, v in sources.items()}
        return cls(model, vae, text_encoder, device=device, dtype=dtype, sources=sources, **kwargs)

    @classmethod
    def from_preset(
        cls,
        name: str | None = None,
        *,
        seed: int = 0,
        dtype: torch.dtype | None = None,
        device=None,
        local_files_only: bool | None = None,
        **kwargs,
    ) -> OpenSoraPipeline:
        """A pipeline from `PRESETS[name]` (default `BUILTIN_PRESET`, the built-in tiny model);
        components given as configs get random weights drawn from `seed` (the global torch RNG
        is left untouched). The preset's `defaults` become the pipeline's."""
        from opensora_sdk.models import STDiT3, T5TextEncoder, VideoAutoencoder
        from opensora_sdk.models.text_encoder import tiny_t5_config

        name = name or BUILTIN_PRESET
        p = get_preset(name)
        device = torch.device(device) if device is not None else default_device()
        dtype = dtype or default_dtype(device)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = STDiT3(copy.deepcopy(p.transformer)) if isinstance(p.transformer, STDiT3Config) else p.transformer
            vae = VideoAutoencoder(copy.deepcopy(p.vae)) if isinstance(p.vae, VideoAutoencoderConfig) else p.vae
            te = p.text_encoder
            if isinstance(te, dict):
                length = (model.config if isinstance(model, torch.nn.Module) else p.transformer).model_max_length
                te = T5TextEncoder.from_config(tiny_t5_config(**te), model_max_length=length)
        kwargs.setdefault("max_latent_frames", p.max_latent_frames)
        kwargs.setdefault("defaults", p.defaults)
        pipe = cls.from_pretrained(model, vae, te, dtype=dtype, device=device, local_files_only=local_files_only, **kwargs)
        pipe.sources = {k: (v if isinstance(v, str) else f"random weights (seed {seed})") for k, v in dataclasses.asdict(p).items()
                        if k in ("transformer", "vae", "text_encoder")}
        pipe.sources["preset"] = name
        return pipe

    def to(self, device=None, dtype: torch.dtype | None = None) -> OpenSoraPipeline:
        """Set the device (models move there when used; any model resident elsewhere goes back
        to the host now) and/or cast STDiT3 and the VAE to `dtype` (T5 keeps its dtype)."""
        if dtype is not None:
            for module in (self.transformer, self.vae):
                _cast(module, dtype)
            self.dtype = dtype
        if device is not None:
            self.device = _normalize_device(device)
            for module in (self.transformer, self.vae):
                if _module_device(module) not in (HOST, self.device):
                    module.to(HOST)
        return self

    @contextmanager
    def on_device(self, module: torch.nn.Module):
        """`module` on the device for the block; back to the host after it if offload="model"."""
        if _module_device(module) != self.device:
            module.to(self.device)
        try:
            yield module
        finally:
            if self.offload == "model" and self.device != HOST:
                module.to(HOST)
                if self.device.type == "cuda":
                    torch.cuda.empty_cache()

    # ---- planning ----------------------------------------------------------------------------

    @property
    def facts(self) -> ModelFacts:
        return ModelFacts.from_configs(self.transformer.config, self.vae.config, self.max_latent_frames)

    def plan(self, prompt, *, align=_UNSET, **kwargs) -> GenerationPlan:
        """Resolve and check a call's arguments without running any model (see `__call__`);
        size, length, frame rate, steps and guidance left out (None) come from `self.defaults`."""
        align = self.align if align is _UNSET else align
        kwargs.update(generation_defaults(self.defaults, **{k: kwargs.pop(k, None) for k in DEFAULT_KEYS}))
        return plan_generation(self.facts, prompt, align=align, scheduler=self.scheduler, **kwargs)

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
        aesthetic_score: float | None = 6.5,
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
        progress: bool | None = None,
    ) -> Video | list[Video]:
        """Generate a video per prompt; a str prompt gives a `Video`, a list a list of them.

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
                chunk; default 5 as the v1.2 inference config; a last-frame image, frame -1,
                then lands on the last chunk's first latent). None places them exactly.
            batch_size: prompts sampled together (same size and length).
            progress: tqdm bar over steps (default: the pipeline's `progress`).
        """
        plan = self.plan(
            prompt, negative_prompt=negative_prompt, resolution=resolution, aspect_ratio=aspect_ratio,
            num_frames=num_frames, fps=fps, num_steps=num_steps, guidance_scale=guidance_scale,
            aesthetic_score=aesthetic_score, motion_score=motion_score, camera_motion=camera_motion,
            conditions=conditions, reference_path=reference_path, mask_strategy=mask_strategy, seed=seed,
            height=height, width=width, loop=loop, condition_frame_length=condition_frame_length,
            condition_frame_edit=condition_frame_edit, align=align, batch_size=batch_size,
        )
        videos = self.generate(plan, callback=callback, progress=progress)
        return videos[0] if isinstance(prompt, str) else videos

    def generate(self, plan: GenerationPlan, *, callback: Callable | None = None, progress: bool | None = None) -> list[Video]:
        """Run a plan made by `plan()`: one `Video` per sample, in order."""
        from opensora_sdk.generation import run_plan

        return run_plan(self, plan, callback=callback, progress=self.progress if progress is None else progress)

    # ---- stages (used by run_plan) -----------------------------------------------------------

    def encode_texts(self, texts: Sequence[str]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """{text: (y [1, 1, L, C], mask [1, L])} on the device; T5 leaves the device afterwards."""
        te = self.text_encoder
        te.offload_after_encode, te.offload_device = True, HOST
        if te.device != self.device:
            if not te.is_offloaded:
                te.model.to(self.device)
            te.device = self.device
        unique = list(dict.fromkeys(texts))
        y, mask = te.encode(unique)
        te.offload()
        return {t: (y[i : i + 1], mask[i : i + 1]) for i, t in enumerate(unique)}

    def null_embedding(self, batch: int) -> torch.Tensor:
        """The model's null caption [batch, 1, L, C] (official unconditional rows)."""
        table = self.transformer.y_embedder.y_embedding
        return table.to(self.device)[None, None].expand(batch, 1, *table.shape)

    def vae_encode(self, pixels: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        """pixels [1, 3, F, H, W] in [-1, 1] -> latent [1, C, T', h, w] (sampled posterior)."""
        with self.on_device(self.vae):
            x = pixels.to(self.device, self.vae.dtype)
            return self.vae.encode(x, generator=generator, tiling=self.vae_tiling).float()

    def vae_decode(self, latent: torch.Tensor, num_frames: int) -> torch.Tensor:
        with self.on_device(self.vae):
            if self.sp_group is not None:  # temporal chunks spread over the ranks, then gathered
                from opensora_sdk.distributed import vae_decode_split

                return vae_decode_split(self.vae, latent, num_frames, self.sp_group, tiling=self.vae_tiling)
            return self.vae.decode(latent, num_frames, tiling=self.vae_tiling)

    def transformer_fn(self, batch: int, uncond_mask: torch.Tensor | None):
        """STDiT3 as the sampler's model_fn; `uncond_mask` (a negative prompt's) masks the
        unconditional half instead of the prompt's mask."""
        model = self.transformer

        def fn(x, t, *, y, mask, x_mask=None, **kwargs):
            if uncond_mask is not None and x.shape[0] == 2 * batch:
                mask = torch.cat([mask[:batch], uncond_mask], 0)
            return model(x, t, y=y, mask=mask, x_mask=x_mask, **kwargs)

        return fn

    def __repr__(self) -> str:
        c = self.transformer.config
        return (
            f"OpenSoraPipeline(transformer=STDiT3(hidden {c.hidden_size}, depth {c.depth}), device={self.device}, "
            f"dtype={self.dtype}, offload={self.offload!r}, sources={self.sources})"
        )


__all__ = [
    "BUILTIN_DIR",
    "BUILTIN_PRESET",
    "OFFICIAL_DEFAULTS",
    "ModelConfigs",
    "ModelPreset",
    "OpenSoraPipeline",
    "PRESETS",
    "SamplePlan",
    "builtin_preset",
    "default_device",
    "default_dtype",
    "generation_defaults",
    "get_preset",
    "model_configs",
]
