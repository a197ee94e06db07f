"""The networks of Open-Sora v1.2: math only; files and devices are handled in loading.py."""

from opensora_sdk.models.stdit3 import STDiT3
# vae
from opensora_sdk.models.text_encoder import T5TextEncoder
