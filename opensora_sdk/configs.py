"""Model configs as plain dataclasses, with the official field names, and named presets.

A config is data: it is read from and written to JSON (the `config.json` of a Hugging Face
folder) and never executed. Runtime choices (attention kernel, dtype, device, sequence
parallel group) are *not* config fields; they are arguments of the code that runs the model.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

C = TypeVar("C")

# Keys that transformers writes into every config.json; they carry no architecture.
_HF_BOOKKEEPING = {
    "architectures",
    "model_type",
    "torch_dtype",
    "dtype",
    "transformers_version",
    "_name_or_path",
    "_commit_hash",
    "auto_map",
}


def _tuple_fields(cls) -> set[str]:
    return {f.name for f in dataclasses.fields(cls) if "tuple" in str(f.type)}


def config_from_dict(cls: type[C], data: dict[str, Any], *, ignore: set[str] = frozenset()) -> C:
    """Build dataclass `cls` from a dict such as a parsed config.json.

    Bookkeeping keys of transformers and the keys in `ignore` are dropped silently; other
    unknown keys are dropped with one warning that names them (a newer release may add
    fields we do not use). Lists become tuples where the field is a tuple.
    """
    names = {f.name for f in dataclasses.fields(cls)}
    tuples = _tuple_fields(cls)
    kwargs, unknown = {}, []
    for key, value in data.items():
        if key in names:
            if key in tuples and isinstance(value, list):
                value = tuple(value)
            kwargs[key] = value
        elif key not in _HF_BOOKKEEPING and key not in ignore:
            unknown.append(key)
    if unknown:
        warnings.warn(f"{cls.__name__}: ignoring unknown config keys {sorted(unknown)}", stacklevel=2)
    return cls(**kwargs)


def config_to_dict(config) -> dict[str, Any]:
    out = dataclasses.asdict(config)
    return {k: list(v) if isinstance(v, tuple) else v for k, v in out.items()}


def read_config_json(cls: type[C], path: str | Path, **kw) -> C:
    with open(path, encoding="utf-8") as f:
        return config_from_dict(cls, json.load(f), **kw)


# --------------------------------------------------------------------------------------------
# STDiT3 (v1.2 diffusion transformer)
# --------------------------------------------------------------------------------------------


@dataclass
class STDiT3Config:
    """Architecture of STDiT3 (`model_type` "STDiT3"). Field names follow the official config.

    The official runtime switches `enable_flash_attn`, `enable_layernorm_kernel` and
    `enable_sequence_parallelism` are accepted when reading an official config.json and kept
    for round-tripping, but they do not change what the model computes: the attention kernel
    and the sequence-parallel group are chosen at run time.
    """

    input_size: tuple = (None, None, None)  # unused: the model takes any latent size
    input_sq_size: int = 512  # reference side length for the positional-embedding scale
    in_channels: int = 4
    patch_size: tuple = (1, 2, 2)  # (t, h, w)
    hidden_size: int = 1152
    depth: int = 28
    num_heads: int = 16
    mlp_ratio: float = 4.0
    class_dropout_prob: float = 0.1
    pred_sigma: bool = True
    drop_path: float = 0.0
    caption_channels: int = 4096
    model_max_length: int = 300
    qk_norm: bool = True
    enable_flash_attn: bool = False
    enable_layernorm_kernel: bool = False
    enable_sequence_parallelism: bool = False
    only_train_temporal: bool = False
    freeze_y_embedder: bool = False
    skip_y_embedder: bool = False

    model_type = "STDiT3"

    def __post_init__(self):
        self.patch_size = tuple(self.patch_size)
        self.input_size = tuple(self.input_size)
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"hidden_size={self.hidden_size} must be divisible by num_heads={self.num_heads}"
            )

    @property
    def out_channels(self) -> int:
        return self.in_channels * 2 if self.pred_sigma else self.in_channels

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads


# --------------------------------------------------------------------------------------------
# STDiT2 (v1.1 diffusion transformer)
# --------------------------------------------------------------------------------------------


@dataclass
class STDiT2Config:
    """Architecture of STDiT2, Open-Sora v1.1 (`model_type` "stdit2"; spec section 9.1).

    Field names and order follow the official `STDiT2Config`; the defaults are the released
    XL/2 model (`hpcai-tech/OpenSora-STDiT-v2-stage2/3`), so `STDiT2Config()` builds it.
    Two defaults differ from the official class on purpose:

    * `input_sq_size` 512: the official class default is 32, but the released config.json
      (and the v1.1 inference config) use 512, the value the weights were trained with.
    * `qk_norm_legacy` True: the v1.1 code applies RoPE *before* the RMS qk-norm (the v1.2
      branch calls that order `qk_norm_legacy=True`). The v1.1 config.json has no such field,
      so reading it must give True; False selects the v1.2 order (norm, then RoPE).

    `enable_flash_attn` / `enable_layernorm_kernel` are kept for round-tripping only (kernels
    are chosen at run time), `freeze` (a training switch) likewise: it is stored, and the
    trainer decides what is trainable. `input_size` is unused (any latent size works).
    """

    input_size: tuple = (None, None, None)  # unused: the model takes any latent size
    input_sq_size: int = 512  # reference side length of the positional-embedding scale
    in_channels: int = 4
    patch_size: tuple = (1, 2, 2)  # (t, h, w)
    hidden_size: int = 1152  # must be divisible by 3 (size embedders: 2 x C/3 + C/3)
    depth: int = 28  # blocks, each spatial + temporal attention
    num_heads: int = 16
    mlp_ratio: float = 4.0
    class_dropout_prob: float = 0.1
    pred_sigma: bool = True  # learned sigma: out_channels = 2 * in_channels
    drop_path: float = 0.0
    no_temporal_pos_emb: bool = False  # only False (the released value) is supported
    caption_channels: int = 4096
    model_max_length: int = 200  # text tokens; size of `y_embedding`
    freeze: str | None = None
    qk_norm: bool = True
    qk_norm_legacy: bool = True
    enable_flash_attn: bool = False
    enable_layernorm_kernel: bool = False

    model_type = "stdit2"

    def __post_init__(self):
        self.patch_size = tuple(self.patch_size)
        self.input_size = tuple(self.input_size)
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"hidden_size={self.hidden_size} must be divisible by num_heads={self.num_heads}"
            )
        if self.hidden_size % 3:
            raise ValueError(
                f"STDiT2 needs hidden_size divisible by 3 (the size and aspect-ratio embedders are "
                f"hidden_size/3 wide each), got {self.hidden_size}; e.g. 72 or 96 for tiny models"
            )

    @property
    def out_channels(self) -> int:
        return self.in_channels * 2 if self.pred_sigma else self.in_channels

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads


# --------------------------------------------------------------------------------------------
# STDiT (v1.0 diffusion transformer)
# --------------------------------------------------------------------------------------------


@dataclass
class STDiTConfig:
    """Architecture of STDiT, Open-Sora v1.0 (`model_type` "stdit"; spec section 9.2).

    Field names follow the official `STDiT` constructor (v1.0 spells `enable_flashattn`). The
    defaults are the released 16x256x256 XL/2 model (`OpenSora-v1-16x256x256.pth`,
    `OpenSora-v1-HQ-16x256x256.pth`), so `STDiTConfig()` builds it.

    v1.0 models have a **fixed size**: `input_size` is the latent (T, H, W) the model was
    trained at (SD VAE: pixels / (1, 8, 8)); the sin-cos tables are built for it once, with
    the grid divided by `space_scale` (spatial) and `time_scale` (temporal).

    `enable_flashattn`, `enable_layernorm_kernel` and `enable_sequence_parallelism` are kept
    for round-tripping only (kernels are chosen at run time), `freeze` (a training switch)
    likewise: it is stored and the trainer decides what is trainable. The official `dtype`
    argument is a run-time choice, not a field (see `ignored_keys`).
    """

    input_size: tuple = (16, 32, 32)  # latent (T, H, W); fixed
    in_channels: int = 4
    patch_size: tuple = (1, 2, 2)  # (t, h, w)
    hidden_size: int = 1152
    depth: int = 28  # blocks, each spatial + temporal attention
    num_heads: int = 16
    mlp_ratio: float = 4.0
    class_dropout_prob: float = 0.1
    pred_sigma: bool = True  # learned sigma: out_channels = 2 * in_channels
    drop_path: float = 0.0
    no_temporal_pos_emb: bool = False  # True: no temporal table is added (block 0)
    caption_channels: int = 4096
    model_max_length: int = 120  # text tokens; size of `y_embedding`
    space_scale: float = 0.5  # spatial grid = arange / space_scale (0.5 at 256px, 1.0 at 512px)
    time_scale: float = 1.0  # temporal grid = arange / time_scale
    freeze: str | None = None
    enable_flashattn: bool = False
    enable_layernorm_kernel: bool = False
    enable_sequence_parallelism: bool = False

    model_type = "stdit"
    ignored_keys = frozenset({"dtype"})  # official run-time keys dropped when reading a config

    def __post_init__(self):
        self.patch_size = tuple(self.patch_size)
        self.input_size = tuple(self.input_size)
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"hidden_size={self.hidden_size} must be divisible by num_heads={self.num_heads}"
            )
        if len(self.input_size) != 3 or any(
            not isinstance(n, int) or n <= 0 or n % p for n, p in zip(self.input_size, self.patch_size)
        ):
            raise ValueError(
                f"STDiT needs a fixed latent input_size (T, H, W) divisible by patch_size "
                f"{self.patch_size}, got {self.input_size}"
            )

    @property
    def out_channels(self) -> int:
        return self.in_channels * 2 if self.pred_sigma else self.in_channels

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def grid_size(self) -> tuple[int, int, int]:
        """Patches (T_p, H_p, W_p) of the fixed input size."""
        return tuple(n // p for n, p in zip(self.input_size, self.patch_size))


# --------------------------------------------------------------------------------------------
# VAE v1.2: spatial KL autoencoder + causal temporal VAE
# --------------------------------------------------------------------------------------------


@dataclass
class AutoencoderKLConfig:
    """The per-frame 2D KL autoencoder (diffusers `AutoencoderKL` field names)."""

    in_channels: int = 3
    out_channels: int = 3
    down_block_types: tuple = ("DownEncoderBlock2D",) * 4
    up_block_types: tuple = ("UpDecoderBlock2D",) * 4
    block_out_channels: tuple = (128, 256, 512, 512)
    layers_per_block: int = 2
    act_fn: str = "silu"
    latent_channels: int = 4
    norm_num_groups: int = 32
    sample_size: int = 1024
    scaling_factor: float = 0.18215
    force_upcast: bool = True

    def __post_init__(self):
        for name in ("down_block_types", "up_block_types", "block_out_channels"):
            setattr(self, name, tuple(getattr(self, name)))


@dataclass
class TemporalVAEConfig:
    """The causal-conv3d temporal VAE (`VAE_Temporal` constructor names)."""

    in_out_channels: int = 4
    latent_embed_dim: int = 4
    embed_dim: int = 4
    filters: int = 128
    num_res_blocks: int = 4
    channel_multipliers: tuple = (1, 2, 2, 4)
    temporal_downsample: tuple = (False, True, True)
    num_groups: int = 32

    def __post_init__(self):
        self.channel_multipliers = tuple(self.channel_multipliers)
        self.temporal_downsample = tuple(self.temporal_downsample)

    @property
    def time_downsample_factor(self) -> int:
        return 2 ** sum(bool(d) for d in self.temporal_downsample)


@dataclass
class VideoAutoencoderConfig:
    """The v1.2 video VAE pipeline (`model_type` "VideoAutoencoderPipeline").

    `spatial_scaling_factor` is the hard-coded 0.18215 of the official pipeline (not the
    0.13025 found in the SDXL VAE's own config). `shift`/`scale` normalise the temporal latent
    per channel: z = (z - shift) / scale.
    """

    vae_2d: AutoencoderKLConfig = field(default_factory=AutoencoderKLConfig)
    vae_temporal: TemporalVAEConfig = field(default_factory=TemporalVAEConfig)
    micro_batch_size: int = 4  # frames per spatial encode/decode call
    micro_frame_size: int = 17  # pixel frames per temporal chunk
    spatial_scaling_factor: float = 0.18215
    shift: tuple = (-0.10, 0.34, 0.27, 0.98)
    scale: tuple = (3.85, 2.32, 2.33, 3.06)

    model_type = "VideoAutoencoderPipeline"

    def __post_init__(self):
        if isinstance(self.vae_2d, dict):
            self.vae_2d = _autoencoder_kl_from_official(self.vae_2d)
        if isinstance(self.vae_temporal, dict):
            self.vae_temporal = _temporal_from_official(self.vae_temporal)
        self.shift = tuple(self.shift)
        self.scale = tuple(self.scale)


def _autoencoder_kl_from_official(d: dict) -> AutoencoderKLConfig:
    # The official config.json names a diffusers repo here ({type, from_pretrained, subfolder,
    # micro_batch_size}); its architecture is always the SDXL VAE, our default.
    arch = {k: v for k, v in d.items() if k in {f.name for f in dataclasses.fields(AutoencoderKLConfig)}}
    return AutoencoderKLConfig(**arch)


def _temporal_from_official(d: dict) -> TemporalVAEConfig:
    arch = {k: v for k, v in d.items() if k in {f.name for f in dataclasses.fields(TemporalVAEConfig)}}
    return TemporalVAEConfig(**arch)


def video_autoencoder_config_from_official(data: dict) -> VideoAutoencoderConfig:
    """Read the official `hpcai-tech/OpenSora-VAE-v1.2` config.json (or one we wrote)."""
    data = dict(data)
    vae_2d = data.pop("vae_2d", {}) or {}
    vae_temporal = data.pop("vae_temporal", {}) or {}
    if "micro_batch_size" in vae_2d and "micro_batch_size" not in data:
        data["micro_batch_size"] = vae_2d["micro_batch_size"]
    cfg = config_from_dict(
        VideoAutoencoderConfig, data, ignore={"cal_loss", "freeze_vae_2d", "from_pretrained"}
    )
    cfg.vae_2d = _autoencoder_kl_from_official(vae_2d)
    cfg.vae_temporal = _temporal_from_official(vae_temporal)
    return cfg


# --------------------------------------------------------------------------------------------
# Presets
# --------------------------------------------------------------------------------------------

STDIT3_PRESETS: dict[str, STDiT3Config] = {
    # The released model, hpcai-tech/OpenSora-STDiT-v3.
    "STDiT3-XL/2": STDiT3Config(),
    # Registered officially, no released weights.
    "STDiT3-3B/2": STDiT3Config(hidden_size=1872, num_heads=26),
    # For tests and CPU experiments: same topology, tiny widths.
    "STDiT3-tiny": STDiT3Config(
        hidden_size=64, depth=2, num_heads=4, caption_channels=32, model_max_length=16
    ),
}

STDIT2_PRESETS: dict[str, STDiT2Config] = {
    # The released v1.1 model, hpcai-tech/OpenSora-STDiT-v2-stage2 / -stage3.
    "STDiT2-XL/2": STDiT2Config(),
    # For tests and CPU experiments (the golden bundle stdit2_a's architecture): hidden 72,
    # since STDiT2 needs hidden_size divisible by 3.
    "STDiT2-tiny": STDiT2Config(
        hidden_size=72, depth=2, num_heads=4, caption_channels=32, model_max_length=16
    ),
}

STDIT_PRESETS: dict[str, STDiTConfig] = {
    # The released v1.0 model (hpcai-tech/Open-Sora): 16 frames at 256x256, latent 16x32x32.
    "STDiT-XL/2": STDiTConfig(),
    # The v1.0 checkpoints' configs by size (16x256x256 = STDiT-XL/2 above).
    "OpenSora-v1-16x256x256": STDiTConfig(),
    "OpenSora-v1-16x512x512": STDiTConfig(input_size=(16, 64, 64), space_scale=1.0),
    # For tests and CPU experiments (the golden bundle stdit_a's architecture).
    "STDiT-tiny": STDiTConfig(
        input_size=(4, 8, 8), hidden_size=64, depth=2, num_heads=4, caption_channels=32, model_max_length=16
    ),
}

# The released v1.0 files (hpcai-tech/Open-Sora) and the STDIT_PRESETS entry of each.
STDIT_CHECKPOINTS: dict[str, str] = {
    "OpenSora-v1-16x256x256.pth": "OpenSora-v1-16x256x256",
    "OpenSora-v1-HQ-16x256x256.pth": "OpenSora-v1-16x256x256",
    "OpenSora-v1-HQ-16x512x512.pth": "OpenSora-v1-16x512x512",
}

VAE_PRESETS: dict[str, VideoAutoencoderConfig] = {
    # hpcai-tech/OpenSora-VAE-v1.2
    "OpenSoraVAE_V1_2": VideoAutoencoderConfig(),
    # Same modules and keys, 32x fewer channels (the golden bundles' tiny VAE).
    "OpenSoraVAE_V1_2-tiny": VideoAutoencoderConfig(
        vae_2d=AutoencoderKLConfig(block_out_channels=(4, 8, 16, 16), norm_num_groups=2, sample_size=64),
        vae_temporal=TemporalVAEConfig(filters=4, num_groups=2),
    ),
}

# Text encoder used by each release: (hub id, max tokens).
TEXT_ENCODER_PRESETS: dict[str, tuple[str, int]] = {
    "v1.2": ("DeepFloyd/t5-v1_1-xxl", 300),
    "v1.1": ("DeepFloyd/t5-v1_1-xxl", 200),
    "v1.0": ("DeepFloyd/t5-v1_1-xxl", 120),
}

# Official v1.2 checkpoints on the Hugging Face hub.
OFFICIAL_REPOS = {
    "stdit3": "hpcai-tech/OpenSora-STDiT-v3",
    "vae": "hpcai-tech/OpenSora-VAE-v1.2",
    "text_encoder": "DeepFloyd/t5-v1_1-xxl",
}


def preset(name: str, table: dict[str, C]) -> C:
    """A fresh copy of preset `name` from `table`, with a clear error for unknown names."""
    if name not in table:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(table)}")
    return copy.deepcopy(table[name])
