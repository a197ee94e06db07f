"""The pipeline's LoRA methods, under diffusers' names (`load_lora_weights`, `set_adapters`,
`fuse_lora`, ...): thin calls into `opensora_sdk.lora`, whose peft layers wrap the transformer
in place. `OpenSoraPipeline` inherits them.
"""

from __future__ import annotations


class LoraLoaderMixin:
    """LoRA adapters on `self.transformer` (of family `self.family`)."""


    def load_lora_weights(self, path, adapter_name: str | None = None, scale: float = 1.0) -> str:
        """Add a LoRA adapter (this SDK's .safetensors, or the PEFT / diffusers / kohya layouts)
        to the transformer, active with `scale` alongside the adapters already loaded; returns
        its name (default: the file's stem). A file that is not a LoRA, is damaged, or was made
        for another family or model size, or a pipeline with fp8 weights (`load_lora_weights`,
        `fuse_lora`, `unload_lora_weights`, then `enable_fp8()`), raises `LoraError` and changes
        nothing; one trained on other weights of the same architecture warns (`LoraWarning`)."""
        from opensora_sdk import lora

        return lora.apply_lora(self.transformer, lora.read_lora(path), adapter_name, scale, family=self.family.name)

    def set_adapters(self, adapter_names, adapter_weights=None) -> None:
        """Use only `adapter_names` (a name or a list), with `adapter_weights` (one number, a
        list, or None: 1.0 each); other loaded adapters stay loaded, inactive."""
        from opensora_sdk import lora

        lora.set_adapters(self.transformer, adapter_names, adapter_weights)

    def get_active_adapters(self) -> dict[str, float]:
        """{name: scale} of the active adapters."""
        from opensora_sdk import lora

        return {n: a["scale"] for n, a in lora.list_adapters(self.transformer).items() if a["active"]}

    def fuse_lora(self) -> None:
        """Add the active adapters into the transformer's weights (no cost per step);
        `unfuse_lora` takes them out again."""
        from opensora_sdk import lora

        lora.fuse_lora(self.transformer)

    def unfuse_lora(self) -> None:
        from opensora_sdk import lora

        lora.unfuse_lora(self.transformer)

    def unload_lora_weights(self, adapter_names=None) -> None:
        """Remove the adapters (all, or `adapter_names`); all removed, the transformer has its
        original layers again. Adapters fused before stay in the weights."""
        from opensora_sdk import lora

        lora.unload_lora(self.transformer, [adapter_names] if isinstance(adapter_names, str) else adapter_names)
