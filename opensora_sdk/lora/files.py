"""The LoRA file format: reading adapter files (ours and the common community layouts) into
memory, their header metadata, and saving them. Checking an adapter against a model and
applying it are in `opensora_sdk.lora.apply`.

File format (one ``.safetensors`` file; ``save_lora`` writes it atomically)::

    transformer.<module>.lora_A.weight    [r, in]    "down"
    transformer.<module>.lora_B.weight    [out, r]   "up"

``<module>`` is the layer's name in the transformer, e.g. ``spatial_blocks.0.attn.qkv``
(STDiT3), ``blocks.3.cross_attn.kv_linear`` (STDiT2 / STDiT). The header metadata (strings):

    format            "opensora-lora"          format_version  "1"
    base_family       "v1.2" | "v1.1" | "v1.0" base_model_type "STDiT3" | "STDiT2" | "STDiT"
    base_config       JSON: hidden_size, depth, num_heads, caption_channels, ...
    base_fingerprint  16 hex digits of `base_fingerprint` (the weights it was trained on)
    base_model        where those weights came from (informational)
    rank, alpha       the scale of a module is alpha / (its rank)
    target_modules    JSON list of the name patterns it was trained with
    dropout, steps    training facts (informational)

Community layouts that are read too (names are mapped onto the model's layers; prefixes
``transformer.``, ``base_model.model.``, ``diffusion_model.``, ``model.diffusion_model.``,
``lora_unet_``, ``lora_transformer_`` are stripped):

    PEFT / diffusers  <module>.lora_A[.<adapter>].weight / .lora_B[...].weight; alpha from a
                      ``<module>.alpha`` tensor, the file's metadata (lora_alpha) or the
                      adapter_config.json beside it, else alpha = r (scale 1)
    kohya / ComfyUI   <module>.lora_down.weight / .lora_up.weight / .alpha, with the module
                      path written with dots or with underscores (lora_unet_spatial_blocks_0_attn_qkv)
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

import torch
from torch import nn

FORMAT = "opensora-lora"
FORMAT_VERSION = "1"
KEY_PREFIX = "transformer."
COMMUNITY_PREFIXES = ("base_model.model.", "model.diffusion_model.", "diffusion_model.", "transformer.",
                      "lora_unet_", "lora_transformer_", "unet.", "model.")  # fmt: skip
_PAIRS = {"lora_A": "lora_B", "lora_down": "lora_up"}


class LoraError(ValueError):
    """An adapter that cannot be read or does not fit the model; nothing was changed."""


class LoraWarning(UserWarning):
    """An adapter that fits the model's shapes but was trained on other weights."""


# --------------------------------------------------------------------------------------------
# The adapter in memory
# --------------------------------------------------------------------------------------------


@dataclass
class LoraModule:
    down: torch.Tensor  # A [r, in]
    up: torch.Tensor  # B [out, r]
    alpha: float

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])


@dataclass
class LoraAdapter:
    """An adapter read from a file: its layers by module name, its metadata, where it came from."""

    modules: dict[str, LoraModule]
    metadata: dict[str, str] = field(default_factory=dict)
    source: str = ""
    layout: str = FORMAT  # FORMAT, "peft" or "kohya"

    @property
    def rank(self) -> int:
        return max(m.rank for m in self.modules.values())

    @property
    def name(self) -> str:
        return Path(self.source).stem if self.source else "adapter"

    def describe(self) -> str:
        base = self.metadata.get("base_model_type")
        return f"LoRA {self.source!r}" + (
            f" (trained for {base} {self.metadata.get('base_family', '')})" if base else ""
        )


# --------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------


def _safetensors_file(path: Path) -> Path:
    if path.is_dir():
        for name in ("adapter_model.safetensors", "adapter.safetensors", "pytorch_lora_weights.safetensors"):
            if (path / name).is_file():
                return path / name
        files = sorted(path.glob("*.safetensors"))
        if len(files) == 1:
            return files[0]
        raise LoraError(f"LoRA folder {str(path)!r} has {len(files)} .safetensors files; name the file")
    return path


def read_lora(path: str | os.PathLike) -> LoraAdapter:
    """Read an adapter file (or a PEFT folder with adapter_model.safetensors) into memory.
    Module names are as found (prefixes stripped); `match_modules` maps them onto a model."""
    from safetensors import SafetensorError, safe_open

    given = Path(path).expanduser()
    if not given.exists():
        raise LoraError(f"LoRA {str(path)!r}: file not found")
    file = _safetensors_file(given)
    try:
        with safe_open(str(file), framework="pt") as f:
            metadata = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, RuntimeError, ValueError) as err:
        raise LoraError(
            f"LoRA {str(path)!r} cannot be read: it is damaged or not a .safetensors file ({err})"
        ) from None
    config = _peft_config(file)
    return parse_lora(tensors, metadata, source=str(path), peft_config=config)


def _peft_config(file: Path) -> dict:
    config_file = file.parent / "adapter_config.json"
    if file.name == "adapter_model.safetensors" and config_file.is_file():
        try:
            return json.loads(config_file.read_text(encoding="utf-8"))
        except (OSError, ValueError) as err:  # without it alpha would silently be r: another scale
            raise LoraError(f"{str(config_file)!r} cannot be read ({err}): it holds the adapter's lora_alpha; "
                            "repair or remove it (without it alpha = r)") from None
    return {}


def _split_key(key: str) -> tuple[str, str, str] | None:
    """'a.b.lora_A.default.weight' -> ('a.b', 'lora_A', 'weight'); alpha keys -> (module, 'alpha', '')."""
    m = re.match(r"^(.*?)[._](lora_A|lora_B|lora_down|lora_up)(?:\.[^.]+)?\.weight$", key)
    if m:
        return m.group(1), m.group(2), "weight"
    if key.endswith(".alpha"):
        return key[: -len(".alpha")], "alpha", ""
    return None


def _strip_prefixes(name: str) -> str:
    for prefix in COMMUNITY_PREFIXES:
        if name.startswith(prefix):
            name = name[len(prefix) :]
    return name


def parse_lora(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None, *, source: str = "",
               peft_config: Mapping | None = None) -> LoraAdapter:  # fmt: skip
    """An adapter from its tensors (any supported layout)."""
    metadata = dict(metadata or {})
    peft_config = dict(peft_config or {})
    parts: dict[str, dict[str, torch.Tensor]] = {}
    layouts = set()
    for key, tensor in tensors.items():
        split = _split_key(key)
        if split is None:
            continue
        module, kind, _ = split
        parts.setdefault(_strip_prefixes(module), {})[kind] = tensor
        if kind != "alpha":
            layouts.add("kohya" if kind in ("lora_down", "lora_up") else "peft")
    if not any(set(p) - {"alpha"} for p in parts.values()):
        sample = ", ".join(list(tensors)[:3]) or "none"
        raise LoraError(
            f"LoRA {source!r} holds no LoRA tensors ({len(tensors)} tensors, e.g. {sample}); expected keys ending in "
            "lora_A.weight / lora_B.weight or lora_down.weight / lora_up.weight: is this a full model rather than an adapter?"
        )
    layout = FORMAT if metadata.get("format") == FORMAT else ("kohya" if "kohya" in layouts else "peft")
    default_alpha = metadata.get("alpha") or metadata.get("lora_alpha") or metadata.get("ss_network_alpha")
    modules = {}
    for module, found in sorted(parts.items()):
        kinds = set(found) - {"alpha"}
        down_key = "lora_A" if "lora_A" in kinds else "lora_down"
        up_key = _PAIRS[down_key]
        if kinds != {down_key, up_key}:
            raise LoraError(
                f"LoRA {source!r}: module {module!r} has {sorted(kinds)}; expected both {down_key} and {up_key}"
            )
        down, up = found[down_key], found[up_key]
        if down.ndim == 4 and down.shape[2:] == (1, 1):  # 1x1 conv layout of some trainers
            down, up = down[:, :, 0, 0], up[:, :, 0, 0]
        if down.ndim != 2 or up.ndim != 2 or down.shape[0] != up.shape[1]:
            raise LoraError(f"LoRA {source!r}: module {module!r} has {down_key} {tuple(down.shape)} and {up_key} "
                            f"{tuple(up.shape)}; expected [r, in] and [out, r]")  # fmt: skip
        rank = int(down.shape[0])
        if "alpha" in found:
            alpha = float(found["alpha"].float().reshape(-1)[0])
        elif peft_config:
            alpha = float(
                _pattern_value(peft_config.get("alpha_pattern") or {}, module, peft_config.get("lora_alpha", rank))
            )
        elif default_alpha is not None:
            alpha = float(default_alpha)
        else:
            alpha = float(rank)
        modules[module] = LoraModule(down.contiguous(), up.contiguous(), alpha)
    return LoraAdapter(modules, metadata, source, layout)


def _pattern_value(patterns: Mapping, module: str, default):
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def read_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The header metadata of an adapter file (reads no tensors); LoraError when unreadable."""
    from safetensors import SafetensorError, safe_open

    given = Path(path).expanduser()
    if not given.exists():
        raise LoraError(f"LoRA {str(path)!r}: file not found")
    try:
        with safe_open(str(_safetensors_file(given)), framework="pt") as f:
            return dict(f.metadata() or {})
    except (SafetensorError, OSError, RuntimeError, ValueError) as err:
        raise LoraError(
            f"LoRA {str(path)!r} cannot be read: it is damaged or not a .safetensors file ({err})"
        ) from None


# --------------------------------------------------------------------------------------------
# Saving (training side and conversions)
# --------------------------------------------------------------------------------------------


def adapter_tensors(transformer: nn.Module, adapter_name: str = "default", state_dict: Mapping | None = None) -> dict:
    """{"transformer.<module>.lora_A.weight": ..., ...} of one adapter, as float32 CPU tensors.
    `state_dict`: take the values from it (peft names, e.g. a gathered or EMA state) instead of
    the model."""
    out = {}
    source = state_dict if state_dict is not None else {n: p for n, p in transformer.named_parameters()}
    pattern = re.compile(rf"^(.*)\.(lora_A|lora_B)\.{re.escape(adapter_name)}\.weight$")
    for key, value in source.items():
        m = pattern.match(key)
        if m:
            t = value.full_tensor() if hasattr(value, "full_tensor") else value
            out[f"{KEY_PREFIX}{m.group(1)}.{m.group(2)}.weight"] = t.detach().float().cpu().contiguous()
    return out


def lora_metadata(transformer: nn.Module, *, rank: int, alpha: float, target_modules: Sequence[str], fingerprint: str,
                  dropout: float = 0.0, steps: int | None = None, base_model: str | None = None, **extra) -> dict[str, str]:  # fmt: skip
    """The header of an adapter file for this model (see the module docstring)."""
    from opensora_sdk.configs import config_to_dict
    from opensora_sdk.families import family_of

    c = config_to_dict(transformer.config)
    keep = ("hidden_size", "depth", "num_heads", "caption_channels", "model_max_length", "patch_size", "in_channels")
    meta = {
        "format": FORMAT, "format_version": FORMAT_VERSION, "base_family": family_of(transformer).name,
        "base_model_type": type(transformer).__name__, "base_config": json.dumps({k: c[k] for k in keep if k in c}),
        "base_fingerprint": fingerprint, "rank": str(int(rank)), "alpha": repr(float(alpha)),
        "target_modules": json.dumps(list(target_modules)), "dropout": repr(float(dropout)),
    }  # fmt: skip
    if steps is not None:
        meta["steps"] = str(int(steps))
    if base_model:
        meta["base_model"] = str(base_model)
    meta.update({k: v if isinstance(v, str) else json.dumps(v) for k, v in extra.items()})
    return meta


def save_lora(path: str | os.PathLike, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str],
              dtype: torch.dtype | None = None) -> Path:  # fmt: skip
    """Write an adapter file atomically (temp file, fsync, rename). `dtype`: e.g. float16 to halve it."""
    from opensora_sdk.loading import save_safetensors_atomic

    if not tensors:
        raise LoraError(f"save_lora {str(path)!r}: no adapter tensors to save")
    data = {k: (v.to(dtype) if dtype is not None else v).contiguous() for k, v in tensors.items()}
    save_safetensors_atomic(data, path, metadata={str(k): str(v) for k, v in metadata.items()})
    return Path(path)
