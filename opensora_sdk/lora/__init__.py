"""LoRA adapters for the Open-Sora transformers: the file format, reading (ours and the common
community layouts), saving, and applying them in place with peft.

    files.py  the file format: reading (ours, PEFT / diffusers, kohya / ComfyUI), header
              metadata, saving (`read_lora`, `parse_lora`, `read_metadata`, `save_lora`, ...)
    apply.py  the model side with peft: layer names, the base fingerprint, checks, and loading,
              scaling, fusing and unloading adapters (`apply_lora`, `set_adapters`, ...)

Every public name of both is importable from here: ``from opensora_sdk import lora;
lora.apply_lora(transformer, lora.read_lora(path))``.

Failures are `LoraError` (a ValueError) naming the adapter and the model, raised before the
model is touched: a file that cannot be read, one without LoRA tensors, a family or shape
mismatch. A different base fingerprint (same architecture, other weights) is a `LoraWarning`.
"""

from opensora_sdk.lora.files import (
    COMMUNITY_PREFIXES,
    FORMAT,
    FORMAT_VERSION,
    KEY_PREFIX,
    LoraAdapter,
    LoraError,
    LoraModule,
    LoraWarning,
    adapter_tensors,
    lora_metadata,
    parse_lora,
    read_lora,
    read_metadata,
    save_lora,
)
from opensora_sdk.lora.apply import (
    DEFAULT_TARGETS,
    STATE_ATTR,
    TARGET_GROUPS,
    apply_lora,
    base_fingerprint,
    base_state,
    check_fingerprint,
    fuse_lora,
    inject,
    linear_layers,
    list_adapters,
    match_modules,
    require_peft,
    save_loaded_lora,
    set_adapters,
    target_names,
    unfuse_lora,
    unload_lora,
)

__all__ = [
    "DEFAULT_TARGETS", "FORMAT", "LoraAdapter", "LoraError", "LoraModule", "LoraWarning", "TARGET_GROUPS",
    "adapter_tensors", "apply_lora", "base_fingerprint", "fuse_lora", "inject", "linear_layers", "list_adapters",
    "lora_metadata", "match_modules", "parse_lora", "read_lora", "read_metadata", "save_loaded_lora", "save_lora",
    "set_adapters", "target_names", "unfuse_lora", "unload_lora",
    # also public before the split (e.g. lora.KEY_PREFIX in training/lora.py), now listed here too
    "COMMUNITY_PREFIXES", "FORMAT_VERSION", "KEY_PREFIX", "STATE_ATTR", "base_state", "check_fingerprint", "require_peft",
]  # fmt: skip
