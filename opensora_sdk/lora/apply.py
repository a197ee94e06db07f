"""Applying LoRA adapters to an Open-Sora transformer in place with peft: the model's layer
names, the base-weight fingerprint, checking that an adapter fits, then loading, scaling,
fusing and unloading. Reading and writing adapter files is `opensora_sdk.lora.files`.

An adapter adds ``scale * alpha / r * B(A(x))`` to the output of some of the transformer's
linear layers (A: [r, in], B: [out, r]). Applying one wraps those `nn.Linear` modules in place
(peft's LoRA layers, `peft.inject_adapter_in_model`), so the model object stays the same and
every front end (pipeline, CLI, ComfyUI nodes, app) that runs it gets the adapter. Several
adapters can be loaded at once, each with its own scale; they can be fused into the weights
and unfused again, and unloaded (the wrappers are replaced by the original layers).
"""

from __future__ import annotations

import hashlib
import os
import re
import warnings
from pathlib import Path
from typing import Mapping, Sequence

import torch
from torch import nn

from opensora_sdk.lora.files import (
    FORMAT,
    LoraAdapter,
    LoraError,
    LoraWarning,
    adapter_tensors,
    lora_metadata,
    save_lora,
)

# Layer-name patterns (regular expressions matched against the end of a module name).
TARGET_GROUPS = {
    "attention": [r"attn\.qkv", r"attn\.proj", r"attn_temp\.qkv", r"attn_temp\.proj"],
    "cross_attention": [r"cross_attn\.q_linear", r"cross_attn\.kv_linear", r"cross_attn\.proj"],
    "mlp": [r"mlp\.fc1", r"mlp\.fc2"],
}
DEFAULT_TARGETS = [p for group in TARGET_GROUPS.values() for p in group]
STATE_ATTR = "_opensora_lora"  # on the transformer: {name: {"scale", "source", "metadata"}}, fused list


def require_peft():
    try:
        import peft
    except ImportError:
        raise ImportError('LoRA adapters need peft: pip install peft (or pip install -e ".[lora]")') from None
    return peft


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
        detail = f"; it was trained for {meta.get('base_model_type')} {trained}" if trained else ""
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
    from opensora_sdk.fp8 import fp8_layers

    if fp8_layers(transformer):
        raise LoraError("a LoRA cannot be applied to fp8 weights: load the model without fp8, apply the LoRA "
                        "(fuse it to keep it), then convert to fp8")  # fmt: skip
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


def set_adapters(
    transformer: nn.Module, names: str | Sequence[str], weights: float | Sequence[float] | None = None
) -> None:
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
# Saving a loaded adapter (in this SDK's format, see `opensora_sdk.lora.files`)
# --------------------------------------------------------------------------------------------


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
