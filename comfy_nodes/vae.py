"""VAE nodes: latents -> IMAGE frames + fps, IMAGE frames -> latents.

The VAE moves to ComfyUI's device only while it encodes or decodes and goes back to the VAE
offload device afterwards. Spatial tiling (tile size and overlap in pixels, 0 = off) bounds
the decoder's memory per frame at the cost of faint seams.

Both nodes show their progress (per temporal chunk, micro-batch of frames or tile) on
ComfyUI's bar and stop there on an interrupt; the resource guard refuses a size the machine
cannot take before the VAE runs. A batch of latents decodes to a list of IMAGE batches, one
per video, so savers downstream (OpenSoraSaveVideo, CreateVideo + SaveVideo) run once per
video and write one file each.
"""

from __future__ import annotations

import torch

from . import comfy_host as host
from .latent import latent_geometry
from .types import CATEGORY, VAE, tip


MAX_TILE = 4096


def tile_size_problem(tile_size) -> str | None:
    """What is wrong with a tile_size on its own, or None."""
    if tile_size != 0 and (tile_size % 8 or not 64 <= tile_size <= MAX_TILE):
        return (f"tile_size={tile_size} is not allowed: 0 (off) or a multiple of 8 from 64 to {MAX_TILE} pixels "
                "(256 or 512 are good choices)")
    return None


def make_tiling(tile_size: int, tile_overlap: int):
    """SpatialTiling or None (tile_size 0); ValueError naming the one field to change otherwise."""
    from opensora_sdk.models.vae_tiling import SpatialTiling

    problem = tile_size_problem(tile_size)
    if problem:
        raise ValueError(problem)
    if tile_size == 0:
        return None
    if tile_overlap % 8 or not 0 <= tile_overlap < tile_size:
        raise ValueError(
            f"tile_overlap={tile_overlap} is not allowed with tile_size={tile_size}: a multiple of 8 smaller than "
            "tile_size (64 is a good choice)"
        )
    return SpatialTiling(tile_size, tile_overlap)


def validate_tile_size(tile_size):
    """VALIDATE_INPUTS of the nodes with tiling: it declares tile_size alone, so ComfyUI attaches
    the error to that widget only (tile_overlap, which depends on it, is checked at run time)."""
    if tile_size is None:  # linked: checked when the node runs
        return True
    return tile_size_problem(tile_size) or True


def tiling_inputs(what: str) -> dict:
    return {
        "tile_size": ("INT", tip(f"{what} each frame in tiles of this many pixels (less memory, faint seams); "
                                 "0 = off", default=0, min=0, max=MAX_TILE, step=8)),
        "tile_overlap": ("INT", tip("Overlap between tiles in pixels (blended); smaller than tile_size", default=64,
                                    min=0, max=1024, step=8)),
    }


def to_images(pixels: torch.Tensor) -> torch.Tensor:
    """Decoded pixels [B, 3, N, H, W] in about [-1, 1] -> IMAGE [B*N, H, W, 3] in [0, 1] (CPU)."""
    x = pixels.float().clamp(-1, 1).add(1).div(2)
    return x.permute(0, 2, 3, 4, 1).reshape(-1, *x.shape[3:], 3).to(host.intermediate_device())


def to_videos(pixels: torch.Tensor) -> list[torch.Tensor]:
    """Decoded pixels [B, 3, N, H, W] -> one IMAGE [N, H, W, 3] per video (an output list)."""
    return [to_images(pixels[b : b + 1]) for b in range(pixels.shape[0])]


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
    OUTPUT_IS_LIST = (True, False)
    OUTPUT_TOOLTIPS = ("Frames [frames, H, W, 3] of each video: a batch gives one IMAGE per video, and the nodes "
                       "after this one run once per video",
                       "Frame rate for CreateVideo / SaveAnimatedWEBP / OpenSoraSaveVideo")
    FUNCTION = "decode"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "vae": (VAE, tip("VAE from OpenSoraVAELoader")),
            "samples": ("LATENT", tip("Latents from OpenSoraSampler")),
            **tiling_inputs("Decode"),
        }}

    @classmethod
    def VALIDATE_INPUTS(cls, tile_size):
        return validate_tile_size(tile_size)

    def decode(self, vae, samples, tile_size, tile_overlap):
        from opensora_sdk.generation import Models, decode_clip

        from . import guard
        from .placement import placement

        tiling = make_tiling(tile_size, tile_overlap)
        check_latent_for_vae(samples, vae)
        H, W, num_frames, fps = latent_geometry(samples)
        z = samples["samples"]
        f = getattr(vae.vae, "spatial_factor", 8)
        guard.check_vae("OpenSoraVAEDecode", vae, batch=z.shape[0], num_frames=num_frames, height=z.shape[3] * f,
                        width=z.shape[4] * f, tiling=tiling, encode=False)
        models = Models(None, vae.vae, vae_tiling=tiling, hooks=host.node_hooks())
        pixels = decode_clip(models, placement(), z, num_frames)
        return (to_videos(pixels), fps)


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
            **tiling_inputs("Encode"),
        }}

    @classmethod
    def VALIDATE_INPUTS(cls, tile_size):
        return validate_tile_size(tile_size)

    def encode(self, vae, images, fps, tile_size, tile_overlap):
        from . import guard
        from .conditioning import frames_to_pixels
        from .placement import placement

        tiling = make_tiling(tile_size, tile_overlap)
        pixels = frames_to_pixels(images)  # [3, F, H, W]
        H, W = pixels.shape[2] // 8 * 8, pixels.shape[3] // 8 * 8
        if H == 0 or W == 0:
            raise ValueError(f"images: {pixels.shape[2]}x{pixels.shape[3]} pixels is smaller than one 8x8 latent")
        pixels = pixels[:, :, :H, :W]
        guard.check_vae("OpenSoraVAEEncode", vae, batch=1, num_frames=pixels.shape[1], height=H, width=W,
                        tiling=tiling, encode=True)
        progress = host.VaeProgress().stage_fn("encoding")
        with torch.no_grad(), placement().use(vae.vae, "vae") as model:
            z = model.encode(pixels[None].to(model.device, model.dtype), sample=False, tiling=tiling,
                             progress=progress).float()
        latent = {"samples": z.to(host.intermediate_device()), "num_frames": pixels.shape[1], "height": H,
                  "width": W, "fps": float(fps)}
        return (latent,)


NODES = {
    "OpenSoraVAEDecode": (OpenSoraVAEDecode, "Open-Sora VAE Decode"),
    "OpenSoraVAEEncode": (OpenSoraVAEEncode, "Open-Sora VAE Encode"),
}
