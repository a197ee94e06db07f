"""OpenSoraLoraLoader: a LoRA adapter on an Open-Sora diffusion model (model in, model out).

Adapters are listed from ComfyUI's `loras` folder (models/loras, and any extra_model_paths
entry for it); "(built-in)" is the adapter that ships with the pack for the built-in model
(`opensora_sdk/builtin/lora/big.safetensors`: "big" shapes). Files in this SDK's format and the
PEFT / diffusers and kohya layouts load (see `opensora_sdk.lora`).

The model that comes out is a new `LoadedModel` around a copy of the transformer that shares
its weights (no extra memory for them): the adapter wraps layers of the copy only, so the
model on the input, and every other branch of the graph that uses it, is unchanged. Chaining
two loaders stacks both adapters, each with its own strength. An adapter that does not fit
the model (another family or size), a damaged file or one that is not a LoRA fails with the
file's name and what is wrong.
"""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path

from . import comfy_host as host
from .types import BUILTIN, CATEGORY, MODEL, LoadedModel, tip

FOLDER = "loras"
BUILTIN_LORA = Path(__file__).resolve().parents[1] / "opensora_sdk" / "builtin" / "lora" / "big.safetensors"


def lora_choices() -> list[str]:
    return [BUILTIN] + host.list_model_files(FOLDER)


def resolve_lora(choice: str) -> Path:
    if choice == BUILTIN:
        return BUILTIN_LORA
    for root in host.model_folders(FOLDER):
        path = root / choice
        if path.is_file():
            return path
    where = ", ".join(str(r) for r in host.model_folders(FOLDER)) or "no folder registered for loras"
    raise FileNotFoundError(f"LoRA {choice!r} not found in the loras folders ({where}); pick another entry")


def shared_copy(transformer):
    """A copy of the module tree that shares every parameter and buffer with `transformer`."""
    memo = {id(t): t for t in list(transformer.parameters()) + list(transformer.buffers())}
    return copy.deepcopy(transformer, memo)


def apply_lora(model: LoadedModel, choice: str, strength: float) -> LoadedModel:
    from opensora_sdk import lora

    path = resolve_lora(choice)
    adapter = lora.read_lora(path)  # LoraError (a ValueError) for damaged or non-LoRA files
    transformer = shared_copy(model.transformer)
    name = lora.apply_lora(transformer, adapter, scale=float(strength))
    return dataclasses.replace(model, transformer=transformer, source=f"{model.source} + LoRA {name} ({path}, {strength:g})")


class OpenSoraLoraLoader:
    DESCRIPTION = (
        "Applies a LoRA adapter to an Open-Sora diffusion model. The model going out is a copy sharing the weights; "
        "the model coming in is unchanged. Chain several to stack adapters."
    )
    CATEGORY = f"{CATEGORY}/loaders"
    RETURN_TYPES = (MODEL,)
    RETURN_NAMES = ("model",)
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "lora_name": (lora_choices(), tip(
                "(built-in): the adapter that ships with the pack for the built-in model ('big' shapes: try 'a big red "
                "circle moving left on a black background'). Otherwise a .safetensors file from models/loras (this SDK's "
                "format, PEFT / diffusers or kohya layouts)", default=BUILTIN)),
            "model": (MODEL, tip("The diffusion model the adapter was trained for")),
            "strength": ("FLOAT", tip("Scale of the adapter: 0 = the model as it is, 1 = as trained; negative values "
                                      "push the other way", default=1.0, min=-10.0, max=10.0, step=0.05)),
        }}

    def load(self, lora_name, model, strength):
        return (apply_lora(model, lora_name, strength),)


NODES = {"OpenSoraLoraLoader": (OpenSoraLoraLoader, "Open-Sora Load LoRA")}
