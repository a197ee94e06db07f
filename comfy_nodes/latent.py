"""OpenSoraEmptyLatentVideo: the size and length of a generation, as an empty LATENT.

LATENT layout: {"samples": zeros [B, 4, T, h, w], "num_frames": N, "height": H, "width": W,
"fps": fps}. T, h, w follow the connected VAE (the v1.2 VAE without one: 17 video frames ->
5 latent frames, 8x8 pixels per latent; the per-frame SD VAE of v1.1/v1.0: one latent frame
per video frame). H and W are the size the model is conditioned on: table sizes are kept as the
official tables give them (240p 9:16 is 240x426) and decoded to multiples of 8 (424).

Limits here are generic (what any Open-Sora model could take): the limits of the loaded model
(frames per clip, a fixed size) are checked by the sampler, which knows the model, and what
the machine can do by the resource guard (`comfy_nodes.guard`). Errors name one input each:
ComfyUI checks every widget's options and range on its own and attaches the error to that
widget; the rules that involve two widgets (an aspect ratio the resolution's table lacks, a
custom size that is not a multiple of 8) are checked when the node runs, with one message
naming the one input to change (a VALIDATE_INPUTS would repeat its message on every input it
declares).
"""

from __future__ import annotations

from .types import CATEGORY, VAE, tip

CUSTOM = "custom"
MAX_SIDE = 8192
MAX_FRAMES = 408  # "16s", the longest v1.2 clip (120 latent frames); longer videos loop


def resolution_choices() -> list[str]:
    from opensora_sdk.sizes import RESOLUTIONS

    return [CUSTOM, *RESOLUTIONS]


def aspect_choices() -> list[str]:
    from opensora_sdk.sizes import ASPECT_RATIO_MAP

    return list(ASPECT_RATIO_MAP)


def duration_choices() -> list[str]:
    from opensora_sdk.sizes import NUM_FRAMES_MAP

    return [CUSTOM, *[k for k in NUM_FRAMES_MAP if k.endswith("s") and NUM_FRAMES_MAP[k] <= MAX_FRAMES]]


def resolve_size(resolution: str, aspect_ratio: str, duration: str, width: int, height: int,
                 num_frames: int) -> tuple[int, int, int]:
    """(height, width, num_frames) from the widgets; ValueError naming the field otherwise."""
    from opensora_sdk.sizes import get_image_size, parse_num_frames

    if resolution == CUSTOM:
        for name, value in (("width", width), ("height", height)):
            if not isinstance(value, int) or not 8 <= value <= MAX_SIDE or value % 8:
                raise ValueError(
                    f"{name}={value!r} is not allowed: with resolution=custom give a multiple of 8 between 8 and "
                    f"{MAX_SIDE} (the VAE works on 8x8 pixel blocks)"
                )
        h, w = height, width
    else:
        if resolution not in resolution_choices():
            raise ValueError(f"resolution={resolution!r} is not allowed: choose one of {resolution_choices()}")
        try:
            h, w = get_image_size(resolution, aspect_ratio)
        except ValueError as err:
            raise ValueError(f"aspect_ratio={aspect_ratio!r}: {err}") from None
    if duration == CUSTOM:
        if not isinstance(num_frames, int) or not 1 <= num_frames <= MAX_FRAMES:
            raise ValueError(
                f"num_frames={num_frames!r} is not allowed: with duration=custom give 1..{MAX_FRAMES} frames per "
                "clip (1 = an image); longer videos: OpenSoraLongVideo"
            )
        n = num_frames
    else:
        if duration not in duration_choices():
            raise ValueError(f"duration={duration!r} is not allowed: choose one of {duration_choices()}")
        n = parse_num_frames(duration)
    return h, w, n


def empty_latent(height: int, width: int, num_frames: int, fps: float, batch_size: int = 1, vae=None,
                 resolution: str | None = None, aspect_ratio: str | None = None) -> dict:
    """An empty LATENT with the geometry of `vae` (a LoadedVAE; None: the v1.2 VAE's)."""
    import torch

    from opensora_sdk.configs import VideoAutoencoderConfig
    from opensora_sdk.plan import ModelFacts
    from opensora_sdk.presets import V1_2

    config = vae.vae.config if vae is not None else VideoAutoencoderConfig()
    facts = ModelFacts(**ModelFacts.vae_geometry(config), max_latent_frames=V1_2.max_latent_frames)
    T, h, w = facts.latent_size(num_frames, height, width)
    samples = torch.zeros(batch_size, facts.latent_channels, T, h, w)
    latent = {"samples": samples, "num_frames": num_frames, "height": height, "width": width, "fps": float(fps)}
    if resolution is not None:  # a table size: the model is conditioned on the table's exact size
        latent.update(resolution=resolution, aspect_ratio=aspect_ratio)
    return latent


def latent_geometry(latent: dict) -> tuple[int, int, int, float]:
    """(height, width, num_frames, fps) of a LATENT, from our extras or from its shape."""
    from opensora_sdk.models.vae import frames_for_latent_length

    samples = latent["samples"]
    if samples.dim() != 5:
        raise ValueError(
            f"latent: expected a video LATENT [batch, 4, frames, h, w], got shape {tuple(samples.shape)}; "
            "use OpenSoraEmptyLatentVideo or OpenSoraVAEEncode"
        )
    _, _, T, h, w = samples.shape
    if "num_frames" in latent:
        return int(latent["height"]), int(latent["width"]), int(latent["num_frames"]), float(latent.get("fps", 24.0))
    frames = frames_for_latent_length(T)
    if frames is None:
        raise ValueError(f"latent: {T} latent frames match no video length of the v1.2 VAE")
    return h * 8, w * 8, frames[1], 24.0


class OpenSoraEmptyLatentVideo:
    DESCRIPTION = (
        "The size and length of the video: an official resolution + aspect ratio + duration, or custom "
        "width/height/frames. Aspect ratios are H:W as in the official tables (9:16 = landscape)."
    )
    CATEGORY = f"{CATEGORY}/latent"
    RETURN_TYPES = ("LATENT", "INT", "INT", "INT")
    RETURN_NAMES = ("latent", "width", "height", "num_frames")
    FUNCTION = "create"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "resolution": (resolution_choices(), tip(
                "Official size table (240p = about 240x426), or custom to use width and height", default="240p")),
            "aspect_ratio": (aspect_choices(), tip(
                "H:W as in the official tables: 9:16 is landscape (240p: 426 wide, 240 high), 16:9 portrait, 1:1 "
                "square; ignored for custom", default="9:16")),
            "duration": (duration_choices(), tip(
                "Frames per clip: 2s = 51, 4s = 102, 8s = 204, 16s = 408; custom uses num_frames", default="2s")),
            "width": ("INT", tip("Width in pixels when resolution is custom (multiple of 8)",
                                 default=424, min=8, max=MAX_SIDE, step=8)),
            "height": ("INT", tip("Height in pixels when resolution is custom (multiple of 8)",
                                  default=240, min=8, max=MAX_SIDE, step=8)),
            "num_frames": ("INT", tip(
                "Frames when duration is custom: 1 = an image; 17 video frames make 5 latent frames",
                default=51, min=1, max=MAX_FRAMES)),
            "fps": ("FLOAT", tip("Frame rate of the video (the model is conditioned on it)",
                                 default=24.0, min=1.0, max=120.0, step=1.0)),
            "batch_size": ("INT", tip("Videos per run; sample k uses seed + k", default=1, min=1, max=64)),
        }, "optional": {
            "vae": (VAE, tip("The VAE the video will be decoded with: the latent takes its geometry (channels, "
                             "frames per latent frame, pixels per latent); without it, the v1.2 VAE's")),
        }}

    def create(self, resolution, aspect_ratio, duration, width, height, num_frames, fps, batch_size, vae=None):
        h, w, n = resolve_size(resolution, aspect_ratio, duration, width, height, num_frames)
        table = (resolution, aspect_ratio) if resolution != CUSTOM else (None, None)
        return (empty_latent(h, w, n, fps, batch_size, vae, *table), w, h, n)


NODES = {"OpenSoraEmptyLatentVideo": (OpenSoraEmptyLatentVideo, "Open-Sora Empty Latent Video")}
