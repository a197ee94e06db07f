"""The Open-Sora v1.2 node pack for ComfyUI: thin nodes over `opensora_sdk`.

    OpenSoraModelLoader / OpenSoraVAELoader / OpenSoraTextEncoderLoader -> models
    OpenSoraLoraLoader: model -> model with a LoRA adapter (chain to stack)
    OpenSoraTextEncode -> OPENSORA_TEXT        OpenSoraEmptyLatentVideo -> LATENT
    OpenSoraPromptRefine: an LLM rewrites a prompt (STRING -> STRING)
    OpenSoraImageCondition / OpenSoraVideoCondition -> OPENSORA_CONDITIONS
    OpenSoraSampler -> LATENT -> OpenSoraVAEDecode -> IMAGE + fps -> OpenSoraSaveVideo
    OpenSoraLongVideo (loops) -> IMAGE + fps;  OpenSoraVAEEncode: IMAGE -> LATENT

Importing the pack is cheap and needs no running ComfyUI: ComfyUI modules are imported when
a node runs (see comfy_host), no model folder is listed and nothing is downloaded. When the
pack is a clone whose SDK is not installed (`pip install -r requirements.txt` installs only
the dependencies), the clone's root is added to sys.path so `opensora_sdk` imports from it.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import sys

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _make_sdk_importable() -> None:
    spec = importlib.util.find_spec("opensora_sdk")
    if spec is None:
        if os.path.isdir(os.path.join(_ROOT, "opensora_sdk")):
            sys.path.append(_ROOT)
        return
    origin = os.path.dirname(os.path.dirname(os.path.abspath(spec.origin or "")))
    same = os.path.normcase(os.path.realpath(origin)) == os.path.normcase(os.path.realpath(_ROOT))  # a symlinked pack
    if os.path.isdir(os.path.join(_ROOT, "opensora_sdk")) and not same:
        logging.getLogger(__name__).warning(
            "Open-Sora nodes: using the installed opensora_sdk from %s, not the copy in %s", origin, _ROOT
        )


_make_sdk_importable()

from . import comfy_host, conditioning, latent, loaders, lora, refine, sampler, text, vae, video  # noqa: E402

_MODULES = (loaders, lora, text, refine, conditioning, latent, sampler, vae, video)

NODE_CLASS_MAPPINGS: dict = {}
NODE_DISPLAY_NAME_MAPPINGS: dict = {}
for _module in _MODULES:
    for _node_id, (_cls, _label) in _module.NODES.items():
        NODE_CLASS_MAPPINGS[_node_id] = _cls
        NODE_DISPLAY_NAME_MAPPINGS[_node_id] = _label

comfy_host.register_model_folder()

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
