"""LoRA adapters for the Open-Sora transformers: the file format, reading (ours and the common
community layouts), saving, and applying them in place with peft.

An adapter adds ``scale * alpha / r * B(A(x))`` to the output of some of the transformer's
linear layers (A: [r, in], B: [out, r]). Applying one wraps those `nn.Linear` modules in place
(peft's LoRA layers, `peft.inject_adapter_in_model`), so the model object stays the same and
every front end (pipeline, CLI, ComfyUI nodes, app) that runs it gets the adapter. Several
adapters can be loaded at once, each with its own scale; they can be fused into the weights
and unfused again, and unloaded (the wrappers are replaced by the original layers).

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

Failures are `LoraError` (a ValueError) naming the adapter and the model, raised before the
model is touched: a file that cannot be read, one without LoRA tensors, a family or shape
mismatch. A different base fingerprint (same architecture, other weights) is a `LoraWarning`.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

import torch
from torch import nn

FORMAT = "opensora-lora"
FORMAT_VERSION = "1"
KEY_PREFIX = "transformer."
# Layer-name patterns (regular expressions matched against the end of a module name).
TARGET_GROUPS = {
    "attention": [r"attn\.qkv", r"attn\.proj", r"attn_temp\.qkv", r"attn_temp\.proj"],
    "cross_attention": [r"cross_attn\.q_linear", r"cross_attn\.kv_linear", r"cross_attn\.proj"],
    "mlp": [r"mlp\.fc1", r"mlp\.fc2"],
}
DEFAULT_TARGETS = [p for group in TARGET_GROUPS.values() for p in group]
COMMUNITY_PREFIXES = ("base_model.model.", "model.diffusion_model.", "diffusion_model.", "transformer.",
                      "lora_unet_", "lora_transformer_", "unet.", "model.")  # fmt: skip
_PAIRS = {"lora_A": "lora_B", "lora_down": "lora_up"}
STATE_ATTR = "_opensora_lora"  # on the transformer: {name: {"scale", "source", "metadata"}}, fused list


class LoraError(ValueError):
    """An adapter that cannot be read or does not fit the model; nothing was changed."""


class LoraWarning(UserWarning):
    """An adapter that fits the model's shapes but was trained on other weights."""


def require_peft():
    try:
        import peft
    except ImportError:
        raise ImportError("LoRA adapters need peft: pip install peft (or pip install -e \".[lora]\")") from None
    return peft


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
        return f"LoRA {self.source!r}" + (f" (trained for {base} {self.metadata.get('base_family', '')})" if base else "")


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
        raise LoraError(f"LoRA {str(path)!r} cannot be read: it is damaged or not a .safetensors file ({err})") from None
    config = _peft_config(file)
    return parse_lora(tensors, metadata, source=str(path), peft_config=config)


def _peft_config(file: Path) -> dict:
    config_file = file.parent / "adapter_config.json"
    if file.name == "adapter_model.safetensors" and config_file.is_file():
        try:
            return json.loads(config_file.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {}
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
            raise LoraError(f"LoRA {source!r}: module {module!r} has {sorted(kinds)}; expected both {down_key} and {up_key}")
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
            alpha = float(_pattern_value(peft_config.get("alpha_pattern") or {}, module, peft_config.get("lora_alpha", rank)))
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
        raise LoraError(f"LoRA {str(path)!r} cannot be read: it is damaged or not a .safetensors file ({err})") from None


# --------------------------------------------------------------------------------------------
# The model side: layer names, fingerprint, checks
# --------------------------------------------------------------------------------------------


def linear_layers(transformer: nn.Module) -> dict[str, nn.Module]:
    """{module name: layer} of the transformer's linear layers (peft-wrapped ones by their own name)."""
    peft = _peft_or_none()
    out = {}
    for name, module in transformer.named_modules():
        if peft is not None and isinstance(module, peft.tuners.lora.LoraLayer):
            out[name] = module
        elif isinstance(module, nn.Linear) and ".lora_" not in f".{name}" and not name.endswith("base_layer"):
            out[name] = module
    return out


def _peft_or_none():
    try:
        import peft.tuners.lora  # noqa: F401
        import peft

        return peft
    except ImportError:
        return None


def _features(layer: nn.Module) -> tuple[int, int]:
    base = layer.get_base_layer() if hasattr(layer, "get_base_layer") else layer
    return int(base.in_features), int(base.out_features)


def target_names(transformer: nn.Module, patterns: Sequence[str] = DEFAULT_TARGETS) -> list[str]:
    """Names of the linear layers whose name ends with one of the regular expressions `patterns`."""
    compiled = [re.compile(rf"(^|.*\.)({p})$") for p in patterns]
    return [name for name in linear_layers(transformer) if any(c.match(name) for c in compiled)]


def base_state(transformer: nn.Module) -> dict[str, torch.Tensor]:
    """The transformer's own parameters by their plain names (adapter weights left out)."""
    out = {}
    for name, p in transformer.named_parameters():
        if ".lora_" in name:
            continue
        out[name.replace(".base_layer.", ".")] = p
    return out


@torch.no_grad()
def base_fingerprint(transformer: nn.Module) -> str:
    """16 hex digits identifying the base weights: names, shapes and the first 256 values of
    every parameter, rounded to bfloat16 (so float32, float16 and bfloat16 copies agree)."""
    h = hashlib.sha256()
    for name, p in sorted(base_state(transformer).items()):
        t = p.full_tensor() if hasattr(p, "full_tensor") else p
        head = t.detach().reshape(-1)[:256].to("cpu", torch.bfloat16).view(torch.int16)
        h.update(f"{name}{tuple(p.shape)}".encode())
        h.update(head.numpy().tobytes())
    return h.hexdigest()[:16]


def _model_words(transformer: nn.Module) -> str:
    c = transformer.config
    return f"{type(transformer).__name__} (hidden {c.hidden_size}, depth {c.depth})"


def match_modules(adapter: LoraAdapter, transformer: nn.Module, family: str | None = None) -> dict[str, str]:
    """{adapter module id: model layer name} after checking that the adapter fits the model;
    LoraError (naming the adapter and the model) when it does not. Nothing is changed."""
    from opensora_sdk.families import family_of

    model_family = family or family_of(transformer).name
    meta = adapter.metadata
    want = meta.get("base_family")
    if want and want != model_family:
        raise LoraError(f"{adapter.describe()} does not fit the model: it was trained for Open-Sora {want} "
                        f"({meta.get('base_model_type', '?')}) but the model is Open-Sora {model_family} {_model_words(transformer)}")  # fmt: skip
    layers = linear_layers(transformer)
    underscored = {name.replace(".", "_"): name for name in layers}
    mapping, unknown, wrong = {}, [], []
    for module, lora in adapter.modules.items():
        name = module if module in layers else underscored.get(module.replace(".", "_"))
        if name is None:
            unknown.append(module)
            continue
        fan_in, fan_out = _features(layers[name])
        if (lora.down.shape[1], lora.up.shape[0]) != (fan_in, fan_out):
            wrong.append(f"{name}: the model's layer is {fan_in} -> {fan_out}, the adapter's "
                         f"{lora.down.shape[1]} -> {lora.up.shape[0]}")  # fmt: skip
        mapping[module] = name
    if unknown or wrong:
        trained = meta.get("base_config")
        detail = (f"; it was trained for {meta.get('base_model_type')} {trained}" if trained else "")
        problems = (["layers the model does not have: " + ", ".join(unknown[:4]) + (" ..." if len(unknown) > 4 else "")]
                    if unknown else []) + (["shapes that differ: " + "; ".join(wrong[:3]) + (" ..." if len(wrong) > 3 else "")]
                                           if wrong else [])  # fmt: skip
        raise LoraError(f"{adapter.describe()} does not fit the model {_model_words(transformer)}, Open-Sora "
                        f"{model_family}: {' and '.join(problems)}{detail}")  # fmt: skip
    return mapping


def check_fingerprint(adapter: LoraAdapter, transformer: nn.Module) -> bool:
    """Warn (LoraWarning) when the adapter was trained on other base weights; True when they agree
    or the adapter does not say."""
    want = adapter.metadata.get("base_fingerprint")
    if not want:
        return True
    have = base_fingerprint(transformer)
    if have != want:
        warnings.warn(f"{adapter.describe()} was trained on base weights with fingerprint {want} "
                      f"({adapter.metadata.get('base_model', 'unknown source')}); this model's is {have}: same shapes, "
                      "other weights, so it may not behave as trained", LoraWarning, stacklevel=3)  # fmt: skip
        return False
    return True


# --------------------------------------------------------------------------------------------
# Applying, scaling, fusing, unloading (peft layers, in place)
# --------------------------------------------------------------------------------------------


def _state(transformer: nn.Module) -> dict:
    if not hasattr(transformer, STATE_ATTR):
        setattr(transformer, STATE_ATTR, {"adapters": {}, "fused": False})
    return getattr(transformer, STATE_ATTR)


def list_adapters(transformer: nn.Module) -> dict[str, dict]:
    """{adapter name: {"scale", "source", "active", "metadata"}} of the adapters on the model."""
    return {k: dict(v) for k, v in getattr(transformer, STATE_ATTR, {"adapters": {}})["adapters"].items()}


def inject(transformer: nn.Module, names_rank_alpha: Mapping[str, tuple[int, float]], adapter_name: str,
           dropout: float = 0.0) -> None:  # fmt: skip
    """Wrap the named linear layers with a LoRA of the given (rank, alpha) each (fresh weights:
    A random, B zero). The model keeps its train / eval mode."""
    peft = require_peft()
    ranks = {n: r for n, (r, _) in names_rank_alpha.items()}
    alphas = {n: a for n, (_, a) in names_rank_alpha.items()}
    r0 = max(set(ranks.values()), key=list(ranks.values()).count)
    a0 = max(set(alphas.values()), key=list(alphas.values()).count)
    config = peft.LoraConfig(
        r=r0, lora_alpha=a0, lora_dropout=float(dropout), target_modules=sorted(ranks),
        rank_pattern={re.escape(n): r for n, r in ranks.items() if r != r0},
        alpha_pattern={re.escape(n): a for n, a in alphas.items() if a != a0},
    )  # fmt: skip
    training = transformer.training
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*(already|[Mm]odel with).*")
        peft.inject_adapter_in_model(config, transformer, adapter_name=adapter_name)
    transformer.train(training)


def apply_lora(transformer: nn.Module, adapter: LoraAdapter, adapter_name: str | None = None, scale: float = 1.0, *,
               family: str | None = None) -> str:  # fmt: skip
    """Add `adapter` to the model under `adapter_name` (default: the file's stem) with `scale`;
    every loaded adapter stays active. Checks first (LoraError, nothing changed), then wraps
    the layers and copies the weights. Returns the adapter name."""
    state = _state(transformer)
    name = adapter_name or _free_name(adapter.name, state["adapters"])
    if name in state["adapters"]:
        raise LoraError(f"an adapter named {name!r} is already loaded ({state['adapters'][name]['source']}); "
                        "pass another adapter_name or unload it first")  # fmt: skip
    if not re.fullmatch(r"[A-Za-z0-9_\-]+", name):
        raise LoraError(f"adapter_name={name!r}: use letters, digits, '_' and '-'")
    if state["fused"]:
        raise LoraError("adapters are fused into the weights: unfuse_lora() before loading another")
    mapping = match_modules(adapter, transformer, family)
    check_fingerprint(adapter, transformer)
    require_peft()
    inject(transformer, {mapping[m]: (lora.rank, lora.alpha) for m, lora in adapter.modules.items()}, name)
    layers = linear_layers(transformer)
    with torch.no_grad():
        for module, lora in adapter.modules.items():
            layer = layers[mapping[module]]
            layer.lora_A[name].weight.copy_(lora.down.to(layer.lora_A[name].weight.dtype))
            layer.lora_B[name].weight.copy_(lora.up.to(layer.lora_B[name].weight.dtype))
    state["adapters"][name] = {"scale": float(scale), "source": adapter.source, "active": True,
                               "metadata": dict(adapter.metadata)}  # fmt: skip
    _activate(transformer)
    return name


def _free_name(stem: str, taken) -> str:
    base = re.sub(r"[^A-Za-z0-9_\-]", "_", stem) or "adapter"
    name, k = base, 1
    while name in taken:
        k += 1
        name = f"{base}_{k}"
    return name


def _lora_layers(transformer: nn.Module):
    peft = _peft_or_none()
    if peft is None:
        return []
    return [m for m in transformer.modules() if isinstance(m, peft.tuners.lora.LoraLayer)]


def _activate(transformer: nn.Module, trainable: bool = False) -> None:
    """Make the model's layers use the active adapters with their scales."""
    adapters = _state(transformer)["adapters"]
    active = [n for n, a in adapters.items() if a["active"]]
    for layer in _lora_layers(transformer):
        layer.set_adapter(active)
        for n in active:
            layer.set_scale(n, adapters[n]["scale"])
        for p in [*layer.lora_A.parameters(), *layer.lora_B.parameters()]:  # peft makes active ones trainable
            p.requires_grad_(trainable)


def set_adapters(transformer: nn.Module, names: str | Sequence[str], weights: float | Sequence[float] | None = None) -> None:
    """Use only `names`, with `weights` (one number for all, a list, or None: 1.0 each); the
    other loaded adapters stay loaded but inactive."""
    state = _state(transformer)
    names = [names] if isinstance(names, str) else list(names)
    if weights is None or isinstance(weights, (int, float)):
        weights = [1.0 if weights is None else float(weights)] * len(names)
    weights = list(weights)
    if len(weights) != len(names):
        raise ValueError(f"set_adapters: {len(names)} names but {len(weights)} weights")
    unknown = [n for n in names if n not in state["adapters"]]
    if unknown:
        raise ValueError(f"set_adapters: {unknown} are not loaded; loaded: {sorted(state['adapters'])}")
    if state["fused"]:
        raise ValueError("set_adapters: the adapters are fused into the weights; unfuse_lora() first")
    for n, a in state["adapters"].items():
        a["active"] = n in names
        if n in names:
            a["scale"] = float(weights[names.index(n)])
    _activate(transformer)


def fuse_lora(transformer: nn.Module) -> None:
    """Add the active adapters (at their scales) into the base weights: no extra cost per step.
    `unfuse_lora` subtracts them again."""
    state = _state(transformer)
    if state["fused"] or not state["adapters"]:
        return
    active = [n for n, a in state["adapters"].items() if a["active"]]
    for layer in _lora_layers(transformer):
        layer.merge(adapter_names=[n for n in active if n in layer.lora_A])
    state["fused"] = True


def unfuse_lora(transformer: nn.Module) -> None:
    state = _state(transformer)
    if not state["fused"]:
        return
    for layer in _lora_layers(transformer):
        layer.unmerge()
    state["fused"] = False


def unload_lora(transformer: nn.Module, names: Sequence[str] | None = None) -> None:
    """Remove adapters (all, or `names`). Removing all puts the original linear layers back;
    fused adapters stay in the weights (fuse then unload bakes them in)."""
    state = _state(transformer)
    names = list(state["adapters"]) if names is None else list(names)
    unknown = [n for n in names if n not in state["adapters"]]
    if unknown:
        raise ValueError(f"unload: {unknown} are not loaded; loaded: {sorted(state['adapters'])}")
    if len(names) == len(state["adapters"]):
        wrapped = {id(m) for m in _lora_layers(transformer)}
        for name, module in list(transformer.named_modules()):
            if id(module) in wrapped:
                parent_name, _, child = name.rpartition(".")
                parent = transformer.get_submodule(parent_name) if parent_name else transformer
                setattr(parent, child, module.get_base_layer())
        delattr(transformer, STATE_ATTR)
        return
    if state["fused"]:
        raise ValueError("unload of some adapters: they are fused into the weights; unfuse_lora() first")
    for layer in _lora_layers(transformer):
        for n in names:
            if n in layer.lora_A:
                layer.delete_adapter(n)
    for n in names:
        del state["adapters"][n]
    _activate(transformer)


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


def save_loaded_lora(path: str | os.PathLike, transformer: nn.Module, adapter_name: str, dtype=None) -> Path:
    """Write a loaded adapter (e.g. read from a community file) in this SDK's format."""
    state = _state(transformer)["adapters"].get(adapter_name)
    if state is None:
        raise ValueError(f"no adapter {adapter_name!r} is loaded")
    tensors = adapter_tensors(transformer, adapter_name)
    ranks = {v.shape[0] for k, v in tensors.items() if k.endswith("lora_A.weight")}
    layer = next(m for m in _lora_layers(transformer) if adapter_name in m.lora_A)
    meta = dict(state["metadata"]) if state["metadata"].get("format") == FORMAT else lora_metadata(
        transformer, rank=max(ranks), alpha=layer.lora_alpha[adapter_name], target_modules=[],
        fingerprint=base_fingerprint(transformer), base_model=None)  # fmt: skip
    return save_lora(path, tensors, meta, dtype)


__all__ = [
    "DEFAULT_TARGETS", "FORMAT", "LoraAdapter", "LoraError", "LoraModule", "LoraWarning", "TARGET_GROUPS",
    "adapter_tensors", "apply_lora", "base_fingerprint", "fuse_lora", "inject", "linear_layers", "list_adapters",
    "lora_metadata", "match_modules", "parse_lora", "read_lora", "read_metadata", "save_loaded_lora", "save_lora",
    "set_adapters", "target_names", "unfuse_lora", "unload_lora",
]  # fmt: skip
