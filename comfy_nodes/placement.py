"""ComfyUI's memory management as an SDK `Placement`.

Models compute on ComfyUI's device (T5 on its text-encoder device), wait on ComfyUI's
offload devices between uses, never stay resident after a node ran, and ComfyUI is asked to
free memory (unloading its own models) before one of ours moves in. Outside ComfyUI (tests,
`opensora workflow run`) the same calls fall back to the SDK defaults (see comfy_host).
"""

from __future__ import annotations

from opensora_sdk.placement import Placement, normalize_device

from . import comfy_host as host

_OFFLOAD_KIND = {"transformer": "unet", "vae": "vae", "text_encoder": "text_encoder"}


class ComfyPlacement(Placement):
    def __init__(self):
        super().__init__(host.torch_device(), offload="model")

    def compute_device(self, kind: str):
        return normalize_device(host.text_encoder_device()) if kind == "text_encoder" else self.device

    def home(self, kind: str):
        return normalize_device(host.offload_device(_OFFLOAD_KIND[kind]))

    def keeps(self, kind: str) -> bool:
        return False

    def make_room(self, num_bytes: int, device) -> None:
        host.make_room(num_bytes, device)

    def release(self) -> None:
        host.soft_empty_cache()


def placement() -> ComfyPlacement:
    """The placement of one node run (ComfyUI's devices can change between runs)."""
    return ComfyPlacement()
