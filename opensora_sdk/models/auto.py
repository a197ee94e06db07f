"""Which model a checkpoint holds: the transformer of v1.2 / v1.1 / v1.0, the v1.2 video VAE or
the per-frame SD VAE, recognised from its config.json (read as data) or its tensor names
(safetensors headers; a .pth is read with `torch.load(weights_only=True)`), then loaded by
that class's own `from_pretrained` (strict keys).

    transformer    config.json model_type "STDiT3" | "stdit2" | "stdit", else the keys
                   (`stdit2.detect_stdit_family`)
    vae            config.json model_type "VideoAutoencoderPipeline" or `temporal_vae.*` keys:
                   `VideoAutoencoder`; a diffusers "AutoencoderKL": `FrameAutoencoder`
"""

from __future__ import annotations

import json
import os

import torch

from opensora_sdk.loading import CheckpointError, read_shapes, resolve_checkpoint

TRANSFORMER_FAMILIES = {"STDiT3": "v1.2", "STDiT2": "v1.1", "STDiT": "v1.0"}
_MODEL_TYPES = {"STDiT3": "STDiT3", "stdit2": "STDiT2", "STDiT2": "STDiT2", "stdit": "STDiT", "STDiT": "STDiT"}


def _config(resolved) -> dict:
    if resolved.config_file is None:
        return {}
    try:
        return json.loads(resolved.config_file.read_text("utf-8"))
    except (OSError, ValueError) as err:  # guessing from the keys instead could pick another architecture
        raise CheckpointError(f"{str(resolved.config_file)!r} cannot be read as JSON ({err}); repair or remove it") from None


def _keys(resolved) -> set[str]:
    return set(read_shapes(resolved.weight_files[0])) if resolved.weight_files else set()


def transformer_kind(source, *, local_files_only: bool | None = None) -> str:
    """"STDiT3", "STDiT2" or "STDiT" for a transformer checkpoint (folder, file or hub id)."""
    from opensora_sdk.models.stdit2 import detect_stdit_family

    resolved = resolve_checkpoint(source, local_files_only=local_files_only)
    kind = _MODEL_TYPES.get(str(_config(resolved).get("model_type")))
    if kind is None:
        kind = detect_stdit_family(_keys(resolved))
    if kind is None:
        raise CheckpointError(
            f"{os.fspath(source)!r} is not an Open-Sora transformer: its keys are neither STDiT3 (v1.2), STDiT2 "
            "(v1.1) nor STDiT (v1.0); pick the diffusion model's checkpoint"
        )
    return kind


def vae_kind(source, *, local_files_only: bool | None = None) -> str:
    """"VideoAutoencoder" (v1.2) or "FrameAutoencoder" (the SD VAE of v1.1 / v1.0)."""
    resolved = resolve_checkpoint(source, local_files_only=local_files_only)
    config = _config(resolved)
    if config.get("model_type") == "VideoAutoencoderPipeline" or "vae_temporal" in config:
        return "VideoAutoencoder"
    if config.get("_class_name") == "AutoencoderKL":
        return "FrameAutoencoder"
    keys = _keys(resolved)
    if any(k.startswith("temporal_vae.") for k in keys):
        return "VideoAutoencoder"
    if any(k.startswith(("encoder.", "decoder.")) for k in keys):
        return "FrameAutoencoder"
    raise CheckpointError(
        f"{os.fspath(source)!r} is not an Open-Sora VAE: neither the v1.2 video VAE (temporal_vae.* keys) nor an SD "
        "VAE (encoder.* / decoder.* keys, e.g. stabilityai/sd-vae-ft-ema)"
    )


def transformer_config(source, *, local_files_only: bool | None = None):
    """The architecture of a transformer checkpoint without loading its weights: its
    config.json when it has one, else inferred from the tensor shapes (headers only)."""
    from opensora_sdk.configs import STDiT3Config, STDiTConfig, config_from_dict
    from opensora_sdk.models import stdit, stdit2, stdit3

    resolved = resolve_checkpoint(source, local_files_only=local_files_only)
    kind = transformer_kind(source, local_files_only=local_files_only)
    data = _config(resolved)
    if data:
        if kind == "STDiT2":
            return stdit2.config_from_official(data)
        if kind == "STDiT3":
            return config_from_dict(STDiT3Config, data)
        return config_from_dict(STDiTConfig, data, ignore=set(STDiTConfig.ignored_keys))
    shapes = read_shapes(resolved.weight_files[0])
    if kind == "STDiT":
        return stdit.infer_config(shapes, source=os.fspath(source))
    return (stdit2 if kind == "STDiT2" else stdit3).infer_config(shapes)


def vae_config(source, *, local_files_only: bool | None = None):
    """`VideoAutoencoderConfig` (v1.2) or `AutoencoderKLConfig` (per-frame SD VAE), without weights."""
    from opensora_sdk.configs import AutoencoderKLConfig, VideoAutoencoderConfig, video_autoencoder_config_from_official
    from opensora_sdk.models.vae_spatial import autoencoder_kl_config_from_diffusers

    resolved = resolve_checkpoint(source, local_files_only=local_files_only)
    kind = vae_kind(source, local_files_only=local_files_only)
    data = _config(resolved)
    if kind == "VideoAutoencoder":
        return video_autoencoder_config_from_official(data) if data else VideoAutoencoderConfig()
    return autoencoder_kl_config_from_diffusers(data) if data else AutoencoderKLConfig()


def load_transformer(source, *, family: str | None = None, dtype=None, device=None,
                     local_files_only: bool | None = None) -> torch.nn.Module:
    """The transformer of any family; `family` ("v1.2", "v1.1", "v1.0"), when given, must match."""
    from opensora_sdk.models.stdit import STDiT
    from opensora_sdk.models.stdit2 import STDiT2
    from opensora_sdk.models.stdit3 import STDiT3

    kind = transformer_kind(source, local_files_only=local_files_only)
    found = TRANSFORMER_FAMILIES[kind]
    if family is not None and family != found:
        raise ValueError(
            f"{os.fspath(source)!r} holds an {kind} (Open-Sora {found}) but the preset is for Open-Sora {family}; "
            f"leave the preset out or pick the {found} one"
        )
    cls = {"STDiT3": STDiT3, "STDiT2": STDiT2, "STDiT": STDiT}[kind]
    return cls.from_pretrained(source, dtype=dtype, device=device, local_files_only=local_files_only)


def load_vae(source, *, dtype=None, device=None, local_files_only: bool | None = None) -> torch.nn.Module:
    from opensora_sdk.models.vae import VideoAutoencoder
    from opensora_sdk.models.vae_frames import FrameAutoencoder

    cls = {"VideoAutoencoder": VideoAutoencoder, "FrameAutoencoder": FrameAutoencoder}[
        vae_kind(source, local_files_only=local_files_only)
    ]
    return cls.from_pretrained(source, dtype=dtype, device=device, local_files_only=local_files_only)


def build_transformer(config) -> torch.nn.Module:
    """A transformer with fresh weights from its config (STDiT3Config, STDiT2Config, STDiTConfig)."""
    from opensora_sdk.models.stdit import STDiT
    from opensora_sdk.models.stdit2 import STDiT2
    from opensora_sdk.models.stdit3 import STDiT3

    return {"STDiT3": STDiT3, "stdit2": STDiT2, "stdit": STDiT}[config.model_type](config)


def build_vae(config) -> torch.nn.Module:
    """A VAE with fresh weights: `VideoAutoencoderConfig` (v1.2) or `AutoencoderKLConfig` (per frame)."""
    from opensora_sdk.models.vae import VideoAutoencoder
    from opensora_sdk.models.vae_frames import FrameAutoencoder

    return VideoAutoencoder(config) if hasattr(config, "vae_temporal") else FrameAutoencoder(config)


__all__ = [
    "build_transformer",
    "build_vae",
    "load_transformer",
    "load_vae",
    "transformer_config",
    "transformer_kind",
    "vae_config",
    "vae_kind",
]
