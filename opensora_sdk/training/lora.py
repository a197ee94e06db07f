"""The trainer's side of LoRA (`lora:` in a training config, see training/README.md).

    lora:
      rank: 16                 # 0: off, the whole transformer trains
      alpha: 16                # scale alpha / rank (null: = rank)
      dropout: 0.0
      target_modules: [attention, cross_attention, mlp]   # groups, or regexes of layer names
      base_dtype: bf16         # optional: frozen weights in bf16 (with mixed_precision: bf16)

`add_adapter` freezes the transformer and wraps the chosen linear layers with a fresh adapter
named "default" (peft, in place; A random, B zero, so step 0 is the base model). Only the
adapter's weights train, are averaged by the EMA and sit in the optimizer. Checkpoints hold
the adapter as files in the SDK's format (`opensora_sdk.lora`) instead of model/ and ema/:

    step-N/adapter.safetensors       the trained weights (resuming reads them)
    step-N/adapter_ema.safetensors   their EMA (what to generate with)

Groups: attention = self-attention qkv / proj (spatial and temporal blocks; STDiT2 / STDiT
attn_temp too), cross_attention = q_linear / kv_linear / proj, mlp = fc1 / fc2.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Mapping

import torch
from torch import nn

from opensora_sdk import lora as sdk_lora

logger = logging.getLogger(__name__)
ADAPTER_NAME = "default"
ADAPTER_FILE = "adapter.safetensors"
EMA_FILE = "adapter_ema.safetensors"
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def target_patterns(targets: list[str]) -> list[str]:
    """Group names expanded into their regexes; other entries are regexes already."""
    out = []
    for t in targets:
        out += sdk_lora.TARGET_GROUPS.get(t, [t])
    return out


def add_adapter(model: nn.Module, section) -> dict:
    """Freeze `model` and add a trainable adapter per `section` (a LoraSection). Returns facts
    for the adapter files: fingerprint of the base weights, targeted layer names, parameters."""
    fingerprint = sdk_lora.base_fingerprint(model)
    names = sdk_lora.target_names(model, target_patterns(section.target_modules))
    if not names:
        raise ValueError(f"lora.target_modules={section.target_modules!r} matches no linear layer of {type(model).__name__}; "
                         f"groups: {sorted(sdk_lora.TARGET_GROUPS)}, or regexes such as 'cross_attn\\.kv_linear'")  # fmt: skip
    model.requires_grad_(False)
    if section.base_dtype not in (None, "fp32"):
        model.to(DTYPES[section.base_dtype])  # the model keeps its own float32 parts (see its .to)
    alpha = float(section.alpha if section.alpha is not None else section.rank)
    sdk_lora.inject(model, {n: (section.rank, alpha) for n in names}, ADAPTER_NAME, dropout=section.dropout)
    trainable = 0
    for name, p in model.named_parameters():
        if f".lora_A.{ADAPTER_NAME}." in name or f".lora_B.{ADAPTER_NAME}." in name:
            p.data = p.data.float()  # adapter weights (and so their optimizer state) in float32
            p.requires_grad_(True)
            trainable += p.numel()
    return {"fingerprint": fingerprint, "layers": names, "parameters": trainable, "alpha": alpha}


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter's parameters by their names in the model (peft names), on the CPU."""
    return {n: p.detach().cpu() for n, p in model.named_parameters() if ".lora_" in n}


def metadata(model: nn.Module, section, info: dict, *, steps: int, base_model: str | None) -> dict[str, str]:
    return sdk_lora.lora_metadata(model, rank=section.rank, alpha=info["alpha"], target_modules=section.target_modules,
                                  fingerprint=info["fingerprint"], dropout=section.dropout, steps=steps,
                                  base_model=base_model)  # fmt: skip


def write_adapters(folder: Path, model: nn.Module, raw: Mapping[str, torch.Tensor], ema: Mapping[str, torch.Tensor],
                   meta: dict[str, str], save_dtype: str = "fp32") -> None:  # fmt: skip
    """adapter.safetensors (raw) and adapter_ema.safetensors (EMA) into a checkpoint folder."""
    dtype = DTYPES[save_dtype] if save_dtype != "fp32" else None
    sdk_lora.save_lora(folder / ADAPTER_FILE, sdk_lora.adapter_tensors(model, ADAPTER_NAME, raw), meta, dtype)
    sdk_lora.save_lora(folder / EMA_FILE, sdk_lora.adapter_tensors(model, ADAPTER_NAME, ema), {**meta, "ema": "true"}, dtype)


def _to_peft_names(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """"transformer.X.lora_A.weight" -> "X.lora_A.default.weight"."""
    out = {}
    for key, value in tensors.items():
        name = key.removeprefix(sdk_lora.KEY_PREFIX)
        for part in (".lora_A.weight", ".lora_B.weight"):
            if name.endswith(part):
                name = name[: -len(part)] + part.replace(".weight", f".{ADAPTER_NAME}.weight")
        out[name] = value.float()
    return out


def read_checkpoint(folder: Path) -> tuple[dict, dict]:
    """(raw, EMA) adapter states of a LoRA checkpoint, by the model's parameter names."""
    from safetensors.torch import load_file

    missing = [n for n in (ADAPTER_FILE, EMA_FILE) if not (folder / n).is_file()]
    if missing:
        raise FileNotFoundError(f"{folder} has no {' / '.join(missing)}: not a checkpoint of a LoRA run (lora.rank > 0)")
    return _to_peft_names(load_file(str(folder / ADAPTER_FILE))), _to_peft_names(load_file(str(folder / EMA_FILE)))


def load_into(model: nn.Module, state: Mapping[str, torch.Tensor]) -> None:
    """Copy an adapter state (peft names) into `model`; every adapter parameter must be given."""
    params = dict(model.named_parameters())
    wanted = {n for n in params if ".lora_" in n}
    missing, unexpected = sorted(wanted - set(state)), sorted(set(state) - wanted)
    if missing or unexpected:
        raise ValueError(f"adapter checkpoint does not fit the run's lora section: missing {missing[:3]}, unexpected {unexpected[:3]}")
    with torch.no_grad():
        for n in wanted:
            params[n].copy_(state[n].to(params[n].dtype))


def make_optimizer(params, optim):
    """AdamW with the config's settings, or bitsandbytes' 8-bit AdamW (`optim.name: adamw8bit`)."""
    kwargs = dict(lr=optim.lr, betas=optim.betas, eps=optim.eps, weight_decay=optim.weight_decay)
    if optim.name == "adamw8bit":
        try:
            import bitsandbytes as bnb
        except ImportError:
            raise ImportError("optim.name: adamw8bit needs bitsandbytes (pip install bitsandbytes; CUDA GPUs); "
                              "or set optim.name: adamw") from None  # fmt: skip
        return bnb.optim.AdamW8bit(params, **kwargs)
    return torch.optim.AdamW(params, fused=optim.fused or None, **kwargs)


__all__ = ["ADAPTER_FILE", "ADAPTER_NAME", "EMA_FILE", "add_adapter", "load_into", "make_optimizer", "metadata",
           "read_checkpoint", "target_patterns", "trainable_state", "write_adapters"]  # fmt: skip
