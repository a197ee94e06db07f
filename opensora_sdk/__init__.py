"""opensora-sdk: Open-Sora v1.2 as a pure-Python SDK.

    from opensora_sdk import OpenSoraPipeline
    pipe = OpenSoraPipeline.from_pretrained()          # hpcai-tech/OpenSora-STDiT-v3, VAE v1.2, T5-XXL
    pipe("a red panda eating bamboo", num_frames="4s").save("panda.mp4")

The public names below are imported on first use, so `import opensora_sdk` stays cheap
(torch is loaded only when a model, the pipeline or a tensor type is needed). The models
live in `opensora_sdk.models`, the schedulers in `opensora_sdk.schedulers`.
"""

from opensora_sdk.configs import STDiT3Config, VideoAutoencoderConfig

__version__ = "0.1.0"

_LAZY = {
    "OpenSoraPipeline": "opensora_sdk.pipeline",
    "Video": "opensora_sdk.video",
    "ImageCondition": "opensora_sdk.conditioning",
    "VideoCondition": "opensora_sdk.conditioning",
    "RectifiedFlow": "opensora_sdk.schedulers.rflow",
    "export_to_video": "opensora_sdk.diffusers_compat",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'opensora_sdk' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + list(_LAZY))


__all__ = [
    "ImageCondition",
    "OpenSoraPipeline",
    "RectifiedFlow",
    "STDiT3Config",
    "Video",
    "VideoAutoencoderConfig",
    "VideoCondition",
    "__version__",
    "export_to_video",
]
