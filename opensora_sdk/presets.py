"""Presets and generation defaults: what a front end fills in at the edge.

The model families (v1.2, v1.1, v1.0: scheduler, sampling loop, defaults table, clip-length
limit) are records in `opensora_sdk.families`.

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
from typing import Any, Mapping

from opensora_sdk.configs import (
    OFFICIAL_REPOS,
    STDIT2_PRESETS,
    STDIT3_PRESETS,
    STDIT_PRESETS,
    VAE_PRESETS,
    AutoencoderKLConfig,
    STDiT3Config,
    VideoAutoencoderConfig,
)
from opensora_sdk.families import FAMILIES, V1_0, V1_1, V1_2, ModelFamily  # noqa: F401  (FAMILIES re-exported)

SD_VAE = "stabilityai/sd-vae-ft-ema"  # the per-frame VAE of v1.1 and v1.0
TINY_SD_VAE = AutoencoderKLConfig(block_out_channels=(4, 8, 16, 16), norm_num_groups=2, sample_size=64)

SIZE_KEYS = ("resolution", "aspect_ratio", "height", "width")
# the family table's keys, a model's native size, and the clip length it loops with by default
DEFAULT_KEYS = (*V1_2.defaults, "height", "width", "loop_num_frames")
NULLABLE_KEYS = ("align", "aesthetic_score")  # None is a value here (exact placement; no suffix)


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
    transformer: str | Any  # a source, or an STDiT3Config / STDiT2Config / STDiTConfig
    vae: str | Any  # a source, or a VideoAutoencoderConfig / AutoencoderKLConfig (per-frame SD VAE)
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
        # trained on stills, 17 and 34 frames (two chunks: loops and extensions carry one over)
        max_latent_frames=10,
        # no timestep warp: trained without it (use_timestep_transform false); at 64x64 the
        # official warp would put all but two of 20 steps at low noise (a still: r = 0.125)
        defaults={"height": 64, "width": 64, "num_frames": 17, "loop_num_frames": 34, "fps": 8, "num_steps": 20,
                  "guidance_scale": 5.0, "timestep_warp": False},
    ),
    # ---- Open-Sora 1.1 (spec 9.1): STDiT2, the SD VAE per frame, T5-XXL with 200 tokens --------
    "v1.1": ModelPreset(
        "the released Open-Sora v1.1 weights, stage 3 (STDiT2-XL/2, SD VAE, T5-XXL); any size, 16 frames by default",
        "hpcai-tech/OpenSora-STDiT-v2-stage3", SD_VAE, OFFICIAL_REPOS["text_encoder"], family=V1_1,
    ),
    "v1.1-stage2": ModelPreset(
        "the released Open-Sora v1.1 weights, stage 2 (STDiT2-XL/2, SD VAE, T5-XXL)",
        "hpcai-tech/OpenSora-STDiT-v2-stage2", SD_VAE, OFFICIAL_REPOS["text_encoder"], family=V1_1,
    ),
    "tiny-random-v1.1": ModelPreset(
        "tiny random weights of the v1.1 architecture (STDiT2 hidden 72, a tiny SD VAE, a 2-layer T5); for tests",
        STDIT2_PRESETS["STDiT2-tiny"], TINY_SD_VAE, {"d_model": 32}, family=V1_1,
        defaults={"height": 64, "width": 64, "num_frames": 8},
    ),
    # ---- Open-Sora 1.0 (spec 9.2): STDiT at a fixed size, files of hpcai-tech/Open-Sora ---------
    "v1.0": ModelPreset(
        "the released Open-Sora v1.0 weights, 16 frames of 256x256 (OpenSora-v1-16x256x256.pth)",
        "hpcai-tech/Open-Sora/OpenSora-v1-16x256x256.pth", SD_VAE, OFFICIAL_REPOS["text_encoder"], family=V1_0,
        defaults={"height": 256, "width": 256},
    ),
    "v1.0-hq-256": ModelPreset(
        "Open-Sora v1.0, high-quality fine-tune, 16 frames of 256x256 (OpenSora-v1-HQ-16x256x256.pth)",
        "hpcai-tech/Open-Sora/OpenSora-v1-HQ-16x256x256.pth", SD_VAE, OFFICIAL_REPOS["text_encoder"], family=V1_0,
        defaults={"height": 256, "width": 256},
    ),
    "v1.0-hq-512": ModelPreset(
        "Open-Sora v1.0, high-quality fine-tune, 16 frames of 512x512 (OpenSora-v1-HQ-16x512x512.pth)",
        "hpcai-tech/Open-Sora/OpenSora-v1-HQ-16x512x512.pth", SD_VAE, OFFICIAL_REPOS["text_encoder"], family=V1_0,
        defaults={"height": 512, "width": 512},
    ),
    "tiny-random-v1.0": ModelPreset(
        "tiny random weights of the v1.0 architecture (STDiT hidden 64, fixed 4 frames of 64x64); for tests",
        STDIT_PRESETS["STDiT-tiny"], TINY_SD_VAE, {"d_model": 32}, family=V1_0,
        defaults={"height": 64, "width": 64, "num_frames": 4},
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
    defaults: Mapping[str, Any] | None = None, family: ModelFamily = V1_2, *, loop: int = 1,
    sampler: str | None = None, **given,
) -> dict[str, Any]:
    """Fill what a call left out (None) from a model's `defaults`, then from its family's table.

    `given` holds any of resolution, aspect_ratio, height, width, num_frames, fps, num_steps,
    guidance_scale, timestep_warp and align. The size is the model's native height x width only when none of
    resolution, aspect_ratio, height and width is given; otherwise the given ones, with the
    family's resolution / aspect ratio for a missing one. For `NULLABLE_KEYS` (align: place
    conditions exactly; aesthetic_score: no score suffix) None is a value: leave such a key
    out of `given` to get the default. With
    `loop` > 1 a missing num_frames is the model's `loop_num_frames` when it has one (a clip
    long enough to carry a chunk over). A `sampler` other than the family's default brings its
    own step count (DPM-Solver: 20) when num_steps is missing. `native_size` is the model's
    own (height, width) or None: the plan notes a size away from it.
    """
    check_defaults(defaults)
    method = family.sampler(sampler)
    defaults = dict(defaults or {})
    out = {k: v for k, v in given.items() if k != "loop_num_frames"}
    if loop > 1 and given.get("num_frames") is None and defaults.get("loop_num_frames") is not None:
        out["num_frames"] = defaults["loop_num_frames"]
    if all(given.get(k) is None for k in SIZE_KEYS) and defaults.get("height") is not None:
        out["height"], out["width"] = defaults["height"], defaults["width"]
    for key, value in family.defaults.items():
        if key in NULLABLE_KEYS:
            if key not in given:
                out[key] = defaults.get(key, value)
        elif out.get(key) is None and (key not in SIZE_KEYS or out.get("height") is None):
            out[key] = defaults.get(key, value)
    if given.get("num_steps") is None and method is not family.sampler():
        out["num_steps"] = method.num_steps
    for key in SIZE_KEYS:
        out.setdefault(key, None)
    out["native_size"] = (defaults["height"], defaults["width"]) if defaults.get("height") is not None else None
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

    A local folder's config.json is read, a bare local weight file's architecture is inferred
    from its tensor shapes (headers only); a hub id that is not in the local cache is assumed
    to have the preset's architecture (said in `notes`), since looking further would mean
    downloading.
    """
    from opensora_sdk.estimates import T5_XXL_CONFIG
    from opensora_sdk.loading import CheckpointError
    from opensora_sdk.models.auto import transformer_config, vae_config
    from opensora_sdk.models.t5_file import tiny_t5_config

    p = get_preset(preset or "v1.2")
    chosen = {"transformer": model or p.transformer, "vae": vae or p.vae, "text_encoder": text_encoder or p.text_encoder}
    readers = {"transformer": transformer_config, "vae": vae_config}
    out, sources, notes = {}, {}, []
    for kind, src in chosen.items():
        if not isinstance(src, (str, os.PathLike)):
            out[kind] = copy.deepcopy(src) if kind != "text_encoder" else tiny_t5_config(**src).to_dict()
            sources[kind] = f"random weights ({type(src).__name__})"
            continue
        sources[kind] = os.fspath(src)
        local = Path(src).expanduser().exists()
        if kind == "text_encoder":
            config_file = Path(src).expanduser() / "config.json"
            if config_file.is_file():
                out[kind] = json.loads(config_file.read_text("utf-8"))
            else:
                out[kind] = dict(T5_XXL_CONFIG)
                notes.append(f"text_encoder {os.fspath(src)!r}: no local config.json; assuming T5-XXL")
            continue
        try:
            out[kind] = readers[kind](src, local_files_only=True)
        except CheckpointError:
            if local:
                raise
            out[kind] = _PRESET_ARCHITECTURES[p.family.name][kind](p)
            notes.append(f"{kind} {os.fspath(src)!r}: not in the local cache; assuming the {p.family.name} architecture")
    return ModelConfigs(out["transformer"], out["vae"], out["text_encoder"], sources, notes, p.latent_frame_limit)


def _v10_config(p: ModelPreset):
    """The STDiT config of a v1.0 preset's checkpoint file (16x256x256 or 16x512x512)."""
    from opensora_sdk.configs import STDIT_CHECKPOINTS

    return copy.deepcopy(STDIT_PRESETS[STDIT_CHECKPOINTS.get(Path(str(p.transformer)).name, "STDiT-XL/2")])


# The architecture a preset's hub models have, for planning before they are downloaded.
_PRESET_ARCHITECTURES = {
    "v1.2": {"transformer": lambda p: STDiT3Config(), "vae": lambda p: VideoAutoencoderConfig()},
    "v1.1": {"transformer": lambda p: copy.deepcopy(STDIT2_PRESETS["STDiT2-XL/2"]), "vae": lambda p: AutoencoderKLConfig()},
    "v1.0": {"transformer": _v10_config, "vae": lambda p: AutoencoderKLConfig()},
}


# --------------------------------------------------------------------------------------------
# generation.json: what a trained model folder says about generating with it
# --------------------------------------------------------------------------------------------

GENERATION_FILE = "generation.json"


def generation_card(model) -> dict | None:
    """What the folder of transformer weights `model` (or the folder of a weight file) records
    for generating with it, or None: `generation.json` beside its config.json (written by
    training/train.py into every checkpoint's model/ and ema/ folders):

        {"vae": "<folder, file or hub id>", "text_encoder": "...", "family": "v1.2",
         "defaults": {"height": 64, "width": 64, "num_frames": 17, "fps": 8, ...},
         "max_latent_frames": 10 or null}

    Relative vae / text_encoder paths are relative to the folder holding generation.json.
    The built-in model's transformer folder answers with the built-in preset's card."""
    if not isinstance(model, (str, os.PathLike)):
        return None
    path = Path(model).expanduser()
    folder = path if path.is_dir() else path.parent
    file = folder / GENERATION_FILE
    if file.is_file():
        try:
            card = json.loads(file.read_text("utf-8"))
        except (OSError, ValueError) as err:
            raise ValueError(f"{file}: cannot be read as JSON ({err})") from None
        if not isinstance(card, dict):
            raise ValueError(f"{file}: expected a JSON object")
        check_defaults(card.get("defaults"))
        for key in ("vae", "text_encoder"):
            value = card.get(key)
            if isinstance(value, str) and value and not Path(value).is_absolute() and (folder / value).exists():
                card[key] = str((folder / value).resolve())
        return card
    if path.exists() and folder.resolve() == (BUILTIN_DIR / "transformer").resolve():
        p = get_preset("builtin")
        return {"vae": p.vae, "text_encoder": p.text_encoder, "family": p.family.name, "defaults": dict(p.defaults),
                "max_latent_frames": p.max_latent_frames}
    return None


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
    "generation_card",
    "get_preset",
    "model_configs",
    "resolve_defaults",
]
