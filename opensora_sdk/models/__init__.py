"""The networks of Open-Sora v1.2: math only; files and devices are handled in loading.py."""

from opensora_sdk.models.stdit3 import STDiT3
from opensora_sdk.models.stdit2 import STDiT2
from opensora_sdk.models.stdit import STDiT
from opensora_sdk.models.vae import VideoAutoencoder
from opensora_sdk.models.vae_spatial import AutoencoderKL
from opensora_sdk.models.text_encoder import T5TextEncoder
