"""The networks of Open-Sora v1.2: math only; files and devices are handled in loading.py."""

# stdit3
# vae
# text_encoder
