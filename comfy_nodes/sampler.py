"""OpenSoraSampler: the SDK's generation path (`opensora_sdk.generation`) as a node.

The node only translates: the LATENT (size, length, fps), the encoded text and the widgets
become a `GenerationPlan` (`plan_for_latent`), and the SDK samples it with ComfyUI's
`Placement`. The noise, the re-noising draws and the reference encodings of sample k come
from one generator seeded with seed + k, as in `opensora generate`, so a graph and the CLI
with the same seed and settings give the same video on the same device. Every step updates
ComfyUI's progress bar (with a latent preview when the server has previews on); an interrupt
is checked before every transformer block and after every unit of VAE work.

Before any model runs, the request is checked against the loaded model's own limits (frames
per clip, a fixed-size model's size) and against the machine (`comfy_nodes.guard`).

Seeds: ComfyUI's seed widgets give 0..2^64-1; the SDK's generators take seeds below 2^63.
`generator_seed` maps a seed to seed mod (2^63 - 4096): every seed below that (all the seeds
`opensora generate --seed` takes for batches of up to 4096) is used as it is, so the graph and
the CLI agree; larger ones fold onto the same range, the same way every time.
"""

from __future__ import annotations

from . import comfy_host as host
from .latent import latent_geometry
from .types import CATEGORY, CONDITIONS, MODEL, TEXT, VAE, tip

MAX_SEED = 2**64 - 1  # ComfyUI's seed range
SEED_MODULUS = 2**63 - 4096  # seed + k (k < 4096) stays a valid generator seed for a batch


def generator_seed(seed: int) -> int:
    """The generator seed of a widget seed in 0..2^64-1 (see the module docstring)."""
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= MAX_SEED:
        raise ValueError(f"seed={seed!r} is not allowed: use an integer in 0..{MAX_SEED}")
    return seed % SEED_MODULUS


def vae_config_for(model, vae):
    """The VAE geometry of a run: the connected VAE's, else the model family's default VAE."""
    from opensora_sdk.configs import AutoencoderKLConfig, VideoAutoencoderConfig
    from opensora_sdk.families import V1_2, family_of

    if vae is not None:
        return vae.vae.config
    return VideoAutoencoderConfig() if family_of(model.transformer) is V1_2 else AutoencoderKLConfig()


def check_model_limits(model, facts, height: int, width: int, num_frames: int) -> None:
    """The loaded model's own limits, in the terms of the nodes (checked before any work)."""
    T, h, w = facts.latent_size(num_frames, height, width)
    if facts.fixed_latent_size is not None and (T, h, w) != tuple(facts.fixed_latent_size):
        ft, fh, fw = facts.fixed_latent_size
        f = facts.space_factor
        frames = ft if not facts.micro_frame_size else num_frames
        raise ValueError(
            f"latent: the diffusion model {model.source!r} makes {fw * f}x{fh * f} (W x H) videos of {frames} frames "
            f"only, the latent asks for {width}x{height}, {num_frames} frames: set OpenSoraEmptyLatentVideo to "
            f"resolution custom, width {fw * f}, height {fh * f}, duration custom, num_frames {frames}"
        )
    if facts.max_latent_frames is not None and T > facts.max_latent_frames:
        longest = facts.longest_clip()
        raise ValueError(
            f"latent: {num_frames} frames per clip is more than the diffusion model {model.source!r} takes: at most "
            f"{longest} frames ({facts.max_latent_frames} latent frames). Set OpenSoraEmptyLatentVideo's duration to "
            f"custom and num_frames to {longest} or fewer; for longer videos use OpenSoraLongVideo (clips of up to "
            f"{longest} frames, each continuing the last)"
        )


def check_compatible(model, text, shape) -> None:
    """Clear errors for a latent or a text encoder that do not fit the model."""
    config = model.transformer.config
    C = shape[1]
    if C != config.in_channels:
        raise ValueError(
            f"latent has {C} channels but the diffusion model takes {config.in_channels}; use "
            "OpenSoraEmptyLatentVideo or OpenSoraVAEEncode for Open-Sora latents"
        )
    y, _ = text.for_loop(0)
    if y.shape[-1] != config.caption_channels or y.shape[-2] < config.model_max_length:
        raise ValueError(
            f"the text embedding is {tuple(y.shape[-2:])} (tokens, channels) but the diffusion model expects "
            f"({config.model_max_length}, {config.caption_channels}): load the text encoder that belongs to this "
            "model (and set its max_length to the model's: 300 for v1.2, 200 for v1.1, 120 for v1.0)"
        )


def plan_for_latent(model, text, latent: dict, *, vae=None, seed: int, steps: int, cfg: float,
                    timestep_warp: bool = True, conditions=None, align: int | None = None, loops: int = 1,
                    condition_frames: int = 5, condition_edit: float = 0.0, cache=None):
    """The SDK plan of a node run: one sample per latent in the batch, all with the text.
    `cache`: a step-cache string ("none", "teacache:0.1", "pab", ...; see `opensora_sdk.step_cache`)."""
    from opensora_sdk.families import family_of
    from opensora_sdk.plan import ModelFacts, PromptPlan, plan_generation
    from opensora_sdk.text import ProcessedPrompt, merge_loop_prompt

    shape = tuple(latent["samples"].shape)
    if len(shape) != 5:
        raise ValueError(f"latent: expected [batch, 4, frames, h, w], got shape {tuple(shape)}; use OpenSoraEmptyLatentVideo")
    check_compatible(model, text, shape)
    family = family_of(model.transformer)
    H, W, N, fps = latent_geometry(latent)
    facts = ModelFacts.from_configs(model.transformer.config, vae_config_for(model, vae), model.max_latent_frames)
    check_model_limits(model, facts, H, W, N)
    B = shape[0]
    processed = ProcessedPrompt(merge_loop_prompt(text.segments), tuple(text.segments))
    size = ({"resolution": latent["resolution"], "aspect_ratio": latent["aspect_ratio"], "height": None, "width": None}
            if latent.get("resolution") else {"resolution": None, "aspect_ratio": None, "height": H, "width": W})
    items = list(conditions.items) if conditions is not None else []
    if items and vae is None:
        raise ValueError("conditions are connected but vae is not: connect the VAE that encodes the references")
    plan = plan_generation(
        facts, PromptPlan((text.prompt,) * B, (processed,) * B, text.negative_text), **size, num_frames=N, fps=fps,
        num_steps=steps, guidance_scale=cfg, timestep_warp=bool(timestep_warp and model.timestep_warp), conditions=items,
        reference_path=None,
        mask_strategy=None, seed=generator_seed(seed), loop=loops,
        condition_frame_length=condition_frames, condition_frame_edit=condition_edit, align=align or None,
        batch_size=B, family=family, cache=cache,
    )
    if tuple(plan.latent_size) != shape[2:]:
        raise ValueError(
            f"latent: {N} frames of {H}x{W} give latents {tuple(plan.latent_size)} with this VAE, but the latent is "
            f"{shape[2:]}; make the latent with OpenSoraEmptyLatentVideo for this VAE"
        )
    return plan


def guard(node: str, model, plan, vae=None, *, decode: bool = False, tiling=None) -> None:
    """The resource guard for a plan (before any model work); see `comfy_nodes.guard`."""
    from opensora_sdk.plan import ModelFacts

    from . import guard as resource_guard

    facts = ModelFacts.from_configs(model.transformer.config, vae_config_for(model, vae), model.max_latent_frames)
    encode = plan.loop > 1 or any(s.conditions or s.references for s in plan.samples)
    resource_guard.check_generation(node, model, vae, plan, facts, decode=decode, encode=encode, tiling=tiling)


class StepCounter:
    """ComfyUI's side of every step: interrupt check, progress bar and preview."""

    def __init__(self, total: int):
        self.progress = host.Progress(total)
        self.previewer = host.previewer()

    def __call__(self, step, total, latent, denoised):
        host.check_interrupted()
        self.progress.update_absolute(step + 1, host.preview_image(self.previewer, denoised))


def node_models(model, vae=None, tiling=None):
    from opensora_sdk.generation import Models

    return Models(model.transformer, vae.vae if vae is not None else None, vae_tiling=tiling, hooks=host.node_hooks())


def sampling_inputs() -> dict:
    """Inputs shared by OpenSoraSampler and OpenSoraLongVideo."""
    return {
        "seed": ("INT", tip("Sample k of the batch uses seed + k; the same seed as `opensora generate --seed` gives "
                            "the same video on the same device. Any seed in 0..2^64-1: seeds from 2^63-4096 up are "
                            "folded onto the generator's range (seed mod (2^63-4096))", default=42, min=0,
                            max=MAX_SEED, control_after_generate=True)),
        "steps": ("INT", tip("Rectified-flow steps (official: 30)", default=30, min=1, max=1000)),
        "cfg": ("FLOAT", tip("Classifier-free guidance scale (official: 7.0; 1 = no guidance, twice as fast)",
                             default=7.0, min=0.0, max=50.0, step=0.1, round=0.01)),
        "timestep_warp": ("BOOLEAN", tip(
            "On: the model's timestep warp, which shifts the schedule toward high noise for large and long videos "
            "(v1.2: on, as official; the built-in model has none: it was trained without one). Off: no warp",
            default=True)),
    }


def condition_inputs() -> dict:
    return {
        "vae": (VAE, tip("VAE that encodes the references; needed when conditions are connected")),
        "conditions": (CONDITIONS, tip("Images / videos pinned to frames (OpenSoraImageCondition, ...)")),
        "condition_align": ("INT", tip(
            "0 (default) places each condition exactly where it says (frame -1 = the last latent frame). Any other "
            "value snaps positions to multiples of that many latent frames, as the official string form does with 5 "
            "(one VAE chunk; frame -1 then lands on the last chunk's first latent)",
            default=0, min=0, max=64)),
    }


class OpenSoraSampler:
    DESCRIPTION = "Generates Open-Sora latents from text (and optional image/video conditions)."
    CATEGORY = CATEGORY
    RETURN_TYPES = ("LATENT",)
    RETURN_NAMES = ("samples",)
    FUNCTION = "sample"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": (MODEL, tip("STDiT3 from OpenSoraModelLoader")),
                "text": (TEXT, tip("Prompt embedding from OpenSoraTextEncode")),
                "latent": ("LATENT", tip("Size and length from OpenSoraEmptyLatentVideo (its values are ignored)")),
                **sampling_inputs(),
            },
            "optional": {
                **condition_inputs(),
                "cache": ("STRING", tip(
                    "Step caching, faster and approximate (v1.2 models): 'none' (default, exact), 'teacache:0.1' "
                    "skips the transformer at steps whose input barely changed (higher = faster, 0 = exact), "
                    "'pab' reuses attention outputs over a few steps mid-schedule (or 'pab:2,4,6': spatial, "
                    "temporal, cross intervals)", default="none")),
            },
        }

    def sample(self, model, text, latent, seed, steps, cfg, timestep_warp, vae=None, conditions=None,
               condition_align=0, cache="none"):
        from opensora_sdk.generation import CallProgress, sample_clip, start_batch

        from .placement import placement

        plan = plan_for_latent(model, text, latent, vae=vae, seed=seed, steps=steps, cfg=cfg,
                               timestep_warp=timestep_warp, conditions=conditions, align=condition_align,
                               cache=cache)
        guard("OpenSoraSampler", model, plan, vae)
        models, where = node_models(model, vae), placement()
        state = start_batch(models, where, plan, plan.samples)
        latents = sample_clip(models, where, plan, plan.samples, state, text.for_length(plan.text_tokens).embeddings,
                              0, CallProgress(steps, StepCounter(steps)))
        out = {k: v for k, v in latent.items() if k != "samples"}
        out.update(samples=latents.to(host.intermediate_device()), height=plan.height, width=plan.width,
                   num_frames=plan.num_frames, fps=plan.fps, seed=seed)
        return (out,)


NODES = {"OpenSoraSampler": (OpenSoraSampler, "Open-Sora Sampler")}
