"""opensora-sdk: Open-Sora v1.2 as a pure-Python SDK.

The public names live in the sub-packages: `opensora_sdk.models` (STDiT3, the video VAE,
the T5 text encoder), `opensora_sdk.schedulers` (rectified flow), and the pipeline.
"""

from opensora_sdk.configs import STDiT3Config, VideoAutoencoderConfig

__version__ = "0.1.0"

__all__ = ["STDiT3Config", "VideoAutoencoderConfig", "__version__"]
