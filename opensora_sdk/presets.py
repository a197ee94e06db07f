"""Model families, presets and generation defaults: what a front end fills in at the edge.

A `ModelFamily` is the data the generation orchestration (`opensora_sdk.generation`) needs
about one generation of Open-Sora: its scheduler, its sampling loop, its defaults table, its
clip-length limit and its conditioning alignment. Only v1.2 ships today; adding a family is
one record here and the models it names.

A `ModelPreset` says where the three models come from (folders, files, hub ids, or configs
for random weights) and which defaults of its family it overrides (e.g. the built-in model's
native 64x64). `resolve_defaults` is the one place where a call's missing size, length, frame
rate, steps, guidance and align are filled in: from the preset, then from the family table.
Everything below it (`plan_generation`, the orchestration) takes required arguments only.
"""

from __future__ import annotations

import copy
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

from opensora_sdk.configs import (
    OFFICIAL_REPOS,
    STDIT3_PRESETS,
    VAE_PRESETS,
    STDiT3Config,
    VideoAutoencoderConfig,
    read_config_json,
    video_autoencoder_config_from_official,
)

# --------------------------------------------------------------------------------------------
# Families
# --------------------------------------------------------------------------------------------


def _rectified_flow(num_steps: int, timestep_warp: bool = True):
    from opensora_sdk.schedulers.rflow import RectifiedFlow

    return RectifiedFlow(num_sampling_steps=num_steps, use_timestep_transform=timestep_warp)


def _rectified_flow_sample(*args, **kwargs):
    from opensora_sdk.sampling import sample

    return sample(*args, **kwargs)


@dataclass(frozen=True)
class ModelFamily:
    """What differs between Open-Sora generations, as data for the orchestration.

    defaults: the official inference defaults (spec 6.1) of the family: resolution,
        aspect_ratio, num_frames, fps, num_steps, guidance_scale, align.
    max_latent_frames: the longest clip one loop may have (None: no limit).
    make_scheduler(num_steps, timestep_warp) -> a scheduler with `timesteps(B, height=, width=,
        num_frames=, device=)` and `num_timesteps`.
    sample: the sampling loop, `opensora_sdk.sampling.sample`'s signature.
    """

    name: str
    defaults: Mapping[str, Any]
    max_latent_frames: int | None
    make_scheduler: Callable[..., Any]
    sample: Callable[..., Any]


V1_2 = ModelFamily(
    name="v1.2",
    defaults={
        "resolution": "240p", "aspect_ratio": "9:16", "num_frames": "4s", "fps": 24, "num_steps": 30,
        "guidance_scale": 7.0, "align": 5,
    },  # fmt: skip
    max_latent_frames=120,  # 408 frames ("16s"), the longest v1.2 training clips
    make_scheduler=_rectified_flow,
    sample=_rectified_flow_sample,
)
FAMILIES: dict[str, ModelFamily] = {"v1.2": V1_2}

SIZE_KEYS = ("resolution", "aspect_ratio", "height", "width")
# the family table's keys, a model's native size, and the clip length it loops with by default
DEFAULT_KEYS = (*V1_2.defaults, "height", "width", "loop_num_frames")


def check_defaults(defaults: Mapping[str, Any] | None) -> None:
    unknown = sorted(set(defaults or {}) - set(DEFAULT_KEYS))
    if unknown:
        raise ValueError(f"generation defaults {unknown} are not known; allowed: {list(DEFAULT_KEYS)}")


# --------------------------------------------------------------------------------------------
# Presets
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelPreset:
    """Where the three models come from, and the defaults this model changes.

    Each of `transformer`, `vae`, `text_encoder` is a source (a local folder, a weight file
    or a hub repo id) or an architecture to build with random weights: an `STDiT3Config`, a
    `VideoAutoencoderConfig`, and a dict of T5 config fields (used with the built-in tiny
    tokenizer, see `tiny_t5_config`).

    `defaults`: keys of `DEFAULT_KEYS` (the family's table plus `height` and `width`, a small
    model's native size) that replace the family's; `max_latent_frames` replaces the family's
    clip-length limit when given.
    """

    description: str
    transformer: str | STDiT3Config
    vae: str | VideoAutoencoderConfig
    text_encoder: str | dict
    family: ModelFamily = V1_2
    max_latent_frames: int | None = None
    defaults: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        check_defaults(self.defaults)

    @property
    def latent_frame_limit(self) -> int | None:
        return self.max_latent_frames if self.max_latent_frames is not None else self.family.max_latent_frames


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
        defaults={"height": 64, "width": 64, "num_frames": 17, "loop_num_frames": 34, "fps": 8, "num_steps": 20,
                  "guidance_scale": 5.0},
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


# --------------------------------------------------------------------------------------------
# Defaults, resolved once at the edge
# --------------------------------------------------------------------------------------------


def resolve_defaults(
    defaults: Mapping[str, Any] | None = None, family: ModelFamily = V1_2, *, loop: int = 1, **given
) -> dict[str, Any]:
    """Fill what a call left out (None) from a model's `defaults`, then from its family's table.

    `given` holds any of resolution, aspect_ratio, height, width, num_frames, fps, num_steps,
    guidance_scale and align. The size is the model's native height x width only when none of
    resolution, aspect_ratio, height and width is given; otherwise the given ones, with the
    family's resolution / aspect ratio for a missing one. `align` is the one key where None is
    a value (place conditions exactly): leave it out of `given` to get the default. With
    `loop` > 1 a missing num_frames is the model's `loop_num_frames` when it has one (a clip
    long enough to carry a chunk over).
    """
    check_defaults(defaults)
    defaults = dict(defaults or {})
    out = {k: v for k, v in given.items() if k != "loop_num_frames"}
    if loop > 1 and given.get("num_frames") is None and defaults.get("loop_num_frames") is not None:
        out["num_frames"] = defaults["loop_num_frames"]
    if all(given.get(k) is None for k in SIZE_KEYS) and defaults.get("height") is not None:
        out["height"], out["width"] = defaults["height"], defaults["width"]
    for key, value in family.defaults.items():
        if key == "align":
            if "align" not in given:
                out["align"] = defaults.get("align", value)
        elif out.get(key) is None and (key not in SIZE_KEYS or out.get("height") is None):
            out[key] = defaults.get(key, value)
    return out


# --------------------------------------------------------------------------------------------
# Architectures without weights (for `opensora info` and planning before loading)
# --------------------------------------------------------------------------------------------


@dataclass
class ModelConfigs:
    """The architectures a generation would use, found without loading weights (for `info`)."""

    transformer: STDiT3Config
    vae: VideoAutoencoderConfig
    text_encoder: dict  # T5 config fields
    sources: dict[str, str]
    notes: list[str]
    max_latent_frames: int | None = V1_2.max_latent_frames

    @property
    def facts(self):
        from opensora_sdk.plan import ModelFacts

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
    fallback = {"transformer": STDiT3Config(), "vae": VideoAutoencoderConfig(), "text_encoder": dict(T5_XXL_CONFIG)}
    out, sources, notes = {}, {}, []
    for kind, src in chosen.items():
        if not isinstance(src, (str, os.PathLike)):
            out[kind] = copy.deepcopy(src) if kind != "text_encoder" else tiny_t5_config(**src).to_dict()
            sources[kind] = f"random weights ({type(src).__name__})"
            continue
        sources[kind] = os.fspath(src)
        config_file = Path(src).expanduser() / "config.json"
        if not config_file.is_file():
            out[kind] = fallback[kind]
            notes.append(f"{kind} {os.fspath(src)!r}: no local config.json; assuming the v1.2 architecture")
        elif kind == "transformer":
            out[kind] = read_config_json(STDiT3Config, config_file)
        elif kind == "vae":
            out[kind] = video_autoencoder_config_from_official(json.loads(config_file.read_text("utf-8")))
        else:
            out[kind] = json.loads(config_file.read_text("utf-8"))
    return ModelConfigs(out["transformer"], out["vae"], out["text_encoder"], sources, notes, p.latent_frame_limit)


__all__ = [
    "BUILTIN_DIR",
    "BUILTIN_PRESET",
    "DEFAULT_KEYS",
    "FAMILIES",
    "ModelConfigs",
    "ModelFamily",
    "ModelPreset",
    "PRESETS",
    "V1_2",
    "builtin_preset",
    "get_preset",
    "model_configs",
    "resolve_defaults",
]
