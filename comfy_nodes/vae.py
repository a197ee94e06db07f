"""VAE nodes: latents -> IMAGE frames + fps, IMAGE frames -> latents.

The VAE moves to ComfyUI's device only while it encodes or decodes and goes back to the VAE
offload device afterwards. Spatial tiling (tile size and overlap in pixels, 0 = off) bounds
the decoder's memory per frame at the cost of faint seams.
"""

from __future__ import annotations

import torch

from . import comfy_host as host
from .latent import latent_geometry
from .types import CATEGORY, VAE, tip


def make_tiling(tile_size: int, tile_overlap: int):
    """SpatialTiling or None (tile_size 0); ValueError naming the field otherwise."""
    from opensora_sdk.models.vae_tiling import SpatialTiling

    if tile_size == 0:
        return None
    if tile_size % 8 or tile_overlap % 8 or tile_size < 64 or not 0 <= tile_overlap < tile_size:
        raise ValueError(
            f"tile_size={tile_size}, tile_overlap={tile_overlap} are not allowed: tile_size 0 (off) or a multiple of "
            "8 >= 64, tile_overlap a multiple of 8 smaller than tile_size"
        )
    return SpatialTiling(tile_size, tile_overlap)


def validate_tiling(tile_size, tile_overlap):
    """VALIDATE_INPUTS helper: True, or the error message (linked inputs arrive as None)."""
    if tile_size is None or tile_overlap is None:
        return True
    try:
        make_tiling(tile_size, tile_overlap)
    except ValueError as err:
        return str(err)
    return True


def to_images(pixels: torch.Tensor) -> torch.Tensor:
    """Decoded pixels [B, 3, N, H, W] in about [-1, 1] -> IMAGE [B*N, H, W, 3] in [0, 1] (CPU)."""
    x = pixels.float().clamp(-1, 1).add(1).div(2)
    return x.permute(0, 2, 3, 4, 1).reshape(-1, *x.shape[3:], 3).to(host.intermediate_device())


def check_latent_for_vae(latent: dict, loaded) -> None:
    samples = latent["samples"]
    channels = loaded.vae.latent_channels
    if samples.dim() != 5 or samples.shape[1] != channels:
        raise ValueError(
            f"samples: shape {tuple(samples.shape)} is not an Open-Sora latent [batch, {channels}, frames, h, w]; "
            "connect OpenSoraSampler or OpenSoraVAEEncode"
        )


class OpenSoraVAEDecode:
    DESCRIPTION = "Decodes Open-Sora latents into video frames (IMAGE batch) and returns the frame rate."
    CATEGORY = CATEGORY
    RETURN_TYPES = ("IMAGE", "FLOAT")
    RETURN_NAMES = ("images", "fps")
    OUTPUT_TOOLTIPS = ("Frames [frames, H, W, 3]; several videos are joined one after another",
                       "Frame rate for CreateVideo / SaveAnimatedWEBP / OpenSoraSaveVideo")
    FUNCTION = "decode"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "vae": (VAE, tip("VAE from OpenSoraVAELoader")),
            "samples": ("LATENT", tip("Latents from OpenSoraSampler")),
            "tile_size": ("INT", tip("Decode each frame in tiles of this many pixels (less memory); 0 = off",
                                     default=0, min=0, max=4096, step=8)),
            "tile_overlap": ("INT", tip("Overlap between tiles in pixels (blended)", default=64, min=0, max=1024,
                                        step=8)),
        }}

    @classmethod
    def VALIDATE_INPUTS(cls, tile_size, tile_overlap):
        return validate_tiling(tile_size, tile_overlap)

    def decode(self, vae, samples, tile_size, tile_overlap):
        from opensora_sdk.generation import Models, decode_clip

        from .placement import placement

        tiling = make_tiling(tile_size, tile_overlap)
        check_latent_for_vae(samples, vae)
        _, _, num_frames, fps = latent_geometry(samples)
        pixels = decode_clip(Models(None, vae.vae, vae_tiling=tiling), placement(), samples["samples"], num_frames)
        return (to_images(pixels), fps)


class OpenSoraVAEEncode:
    DESCRIPTION = "Encodes video frames (an IMAGE batch) into Open-Sora latents (the posterior mean)."
    CATEGORY = CATEGORY
    RETURN_TYPES = ("LATENT",)
    RETURN_NAMES = ("latent",)
    FUNCTION = "encode"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "vae": (VAE, tip("VAE from OpenSoraVAELoader")),
            "images": ("IMAGE", tip("Frames [frames, H, W, 3]; H and W are cropped to multiples of 8")),
            "fps": ("FLOAT", tip("Frame rate stored with the latent", default=24.0, min=1.0, max=120.0, step=1.0)),
            "tile_size": ("INT", tip("Encode each frame in tiles of this many pixels; 0 = off",
                                     default=0, min=0, max=4096, step=8)),
            "tile_overlap": ("INT", tip("Overlap between tiles in pixels", default=64, min=0, max=1024, step=8)),
        }}

    @classmethod
    def VALIDATE_INPUTS(cls, tile_size, tile_overlap):
        return validate_tiling(tile_size, tile_overlap)

    def encode(self, vae, images, fps, tile_size, tile_overlap):
        from .conditioning import frames_to_pixels
        from .placement import placement

        tiling = make_tiling(tile_size, tile_overlap)
        pixels = frames_to_pixels(images)  # [3, F, H, W]
        H, W = pixels.shape[2] // 8 * 8, pixels.shape[3] // 8 * 8
        if H == 0 or W == 0:
            raise ValueError(f"images: {pixels.shape[2]}x{pixels.shape[3]} pixels is smaller than one 8x8 latent")
        pixels = pixels[:, :, :H, :W]
        with torch.no_grad(), placement().use(vae.vae, "vae") as model:
            z = model.encode(pixels[None].to(model.device, model.dtype), sample=False, tiling=tiling).float()
        latent = {"samples": z.to(host.intermediate_device()), "num_frames": pixels.shape[1], "height": H,
                  "width": W, "fps": float(fps)}
        return (latent,)


NODES = {
    "OpenSoraVAEDecode": (OpenSoraVAEDecode, "Open-Sora VAE Decode"),
    "OpenSoraVAEEncode": (OpenSoraVAEEncode, "Open-Sora VAE Encode"),
}
