"""Long videos (loops) and saving videos with the workflow embedded.

OpenSoraLongVideo generates `loops` clips one after another; clip i starts from the last
`condition_frames` latent frames of clip i - 1 (decoded, then re-encoded, as the official
loop), and takes its prompt from the loop segments of the text ("|0|...|1|..."). Output: the
joined frames (the shared frames once) of each video (a batch gives a list, one IMAGE per
video) and the fps.

OpenSoraSaveVideo writes an IMAGE batch to ComfyUI's output folder as ComfyUI's own savers do:
"<prefix>_<counter:05>_.<ext>", the file written atomically, the graph stored in the file's
metadata under "prompt" and "workflow" (MP4/WebM container tags, WebP EXIF, PNG text), so
dropping the file into the editor restores the workflow. It saves one file per IMAGE it gets:
the decoders output one IMAGE per video of a batch, and ComfyUI runs the saver once for each.
"""

from __future__ import annotations

import json

import torch

from . import comfy_host as host
from .sampler import StepCounter, condition_inputs, node_models, plan_for_latent, sampling_inputs
from .types import CATEGORY, MODEL, TEXT, VAE, tip
from .vae import make_tiling, tiling_inputs, to_videos, validate_tile_size

FORMATS = ("mp4", "webm", "gif", "webp", "png")


def long_video(model, vae, text, latent, *, loops: int, condition_frames: int = 5, condition_edit: float = 0.0,
               seed: int, steps: int, cfg: float, timestep_warp: bool = True, tiling=None, conditions=None,
               align: int | None = None):
    """Frames [B, 3, total, H, W] in [-1, 1] (host) and fps: the SDK's loops, as `opensora generate --loop`."""
    from opensora_sdk.generation import CallProgress, iter_clips

    from .placement import placement
    from .sampler import guard

    if isinstance(condition_frames, int) and (condition_frames < 5 or condition_frames % 5):
        raise ValueError(f"condition_frames={condition_frames} is not allowed: use a multiple of 5 latent frames "
                         "(5, 10, ...; 5 latent frames = 17 video frames)")
    plan = plan_for_latent(model, text, latent, vae=vae, seed=seed, steps=steps, cfg=cfg, timestep_warp=timestep_warp,
                           conditions=conditions, align=align, loops=loops, condition_frames=condition_frames,
                           condition_edit=condition_edit)
    guard("OpenSoraLongVideo", model, plan, vae, decode=True, tiling=tiling)
    progress = CallProgress(steps * loops, StepCounter(steps * loops))
    embeddings = text.for_length(plan.text_tokens).embeddings
    clips = iter_clips(node_models(model, vae, tiling), placement(), plan, plan.samples, embeddings, progress)
    return torch.cat([part.cpu() for _, part in clips], dim=2), plan.fps


class OpenSoraLongVideo:
    DESCRIPTION = (
        "Long video: generates several clips, each continuing the last one's final frames, with one prompt per loop "
        "(|0|first|1|second in the text). Decodes as it goes and returns the joined frames."
    )
    CATEGORY = CATEGORY
    RETURN_TYPES = ("IMAGE", "FLOAT")
    RETURN_NAMES = ("images", "fps")
    OUTPUT_IS_LIST = (True, False)
    OUTPUT_TOOLTIPS = ("The frames of each video (a batch gives one IMAGE per video; the nodes after this one run "
                       "once per video)", "Frame rate")
    FUNCTION = "generate"

    @classmethod
    def INPUT_TYPES(cls):
        optional = condition_inputs()
        optional.pop("vae")
        return {
            "required": {
                "model": (MODEL, tip("STDiT3 from OpenSoraModelLoader")),
                "vae": (VAE, tip("VAE from OpenSoraVAELoader (decodes each clip and encodes its end for the next)")),
                "text": (TEXT, tip("Prompt embedding; loop i uses the last segment |k| with k <= i")),
                "latent": ("LATENT", tip("Size of ONE clip (OpenSoraEmptyLatentVideo); frames a multiple of 17")),
                "loops": ("INT", tip("Number of clips", default=2, min=1, max=64)),
                "condition_frames": ("INT", tip(
                    "Latent frames carried into the next clip, a multiple of 5 (5 = 17 video frames shared)",
                    default=5, min=5, max=115, step=5)),
                "condition_edit": ("FLOAT", tip(
                    "Edit ratio of the carried frames: 0 keeps them, higher lets the model repaint them",
                    default=0.0, min=0.0, max=1.0, step=0.05)),
                **sampling_inputs(),
                **tiling_inputs("VAE: decode and re-encode"),
            },
            "optional": optional,
        }

    @classmethod
    def VALIDATE_INPUTS(cls, tile_size):  # one input: ComfyUI repeats the message on every declared input
        return validate_tile_size(tile_size)

    def generate(self, model, vae, text, latent, loops, condition_frames, condition_edit, seed, steps, cfg,
                 timestep_warp, tile_size, tile_overlap, conditions=None, condition_align=0):
        frames, fps = long_video(
            model, vae, text, latent, loops=loops, condition_frames=condition_frames, condition_edit=condition_edit,
            seed=seed, steps=steps, cfg=cfg, timestep_warp=timestep_warp, tiling=make_tiling(tile_size, tile_overlap),
            conditions=conditions, align=condition_align,
        )
        return (to_videos(frames), fps)


def workflow_metadata(prompt, extra_pnginfo) -> dict[str, str]:
    """ComfyUI's file metadata: every extra_pnginfo key (the editor sends "workflow") and
    "prompt", JSON-encoded; empty when the server runs with --disable-metadata."""
    if host.metadata_disabled():
        return {}
    meta = {str(k): json.dumps(v) for k, v in (extra_pnginfo or {}).items()}
    if prompt is not None:
        meta["prompt"] = json.dumps(prompt)
    return meta


def save_frames(images: torch.Tensor, fps: float, prefix: str, fmt: str, crf: int, metadata: dict) -> dict:
    """Write IMAGE frames to the output folder; the ui entry of the file."""
    from opensora_sdk.video import Video

    if fmt not in FORMATS:
        raise ValueError(f"format={fmt!r} is not allowed: choose one of {list(FORMATS)}")
    if images.dim() != 4 or images.shape[-1] != 3 or images.shape[0] == 0:
        raise ValueError(f"images: expected an IMAGE batch [frames, H, W, 3], got {tuple(images.shape)}")
    if fmt == "png" and images.shape[0] != 1:
        raise ValueError(f"format=png holds one frame, got {images.shape[0]}; choose mp4, webm, gif or webp")
    video = Video.from_images(images, fps)
    folder, stem, counter, subfolder = host.save_path(prefix, video.width, video.height)
    name = f"{stem}_{counter:05}_.{fmt}"
    video.save(folder / name, metadata=metadata, crf=crf if fmt in ("mp4", "webm") else None)
    return {"filename": name, "subfolder": subfolder, "type": "output"}


class OpenSoraSaveVideo:
    DESCRIPTION = (
        "Saves frames as a video in ComfyUI's output folder with the workflow embedded (drop the file into the "
        "editor to get the graph back)."
    )
    CATEGORY = CATEGORY
    RETURN_TYPES = ()
    FUNCTION = "save"
    OUTPUT_NODE = True

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "images": ("IMAGE", tip("Frames [frames, H, W, 3] from OpenSoraVAEDecode or OpenSoraLongVideo")),
                "fps": ("FLOAT", tip("Frame rate (connect the decoder's fps)", default=24.0, min=0.01, max=240.0,
                                     step=1.0)),
                "filename_prefix": ("STRING", tip(
                    "File name prefix inside the output folder; may contain sub-folders (opensora/clip)",
                    default="opensora/video")),
                "format": (list(FORMATS), tip("mp4 (H.264), webm (VP9), gif, webp (animated) or png (one frame)",
                                              default="mp4")),
                "crf": ("INT", tip("Quality for mp4 (0-51) and webm (0-63): lower is better and larger; "
                                   "ignored by gif/webp/png", default=19, min=0, max=63)),
            },
            "hidden": {"prompt": "PROMPT", "extra_pnginfo": "EXTRA_PNGINFO"},
        }

    def save(self, images, fps, filename_prefix, format, crf, prompt=None, extra_pnginfo=None):
        if format == "mp4" and not 0 <= crf <= 51:  # the widget allows webm's 0..63
            raise ValueError(f"crf={crf} is not allowed for mp4: use 0..51 (0..63 is for webm)")
        entry = save_frames(images, fps, filename_prefix, format, crf, workflow_metadata(prompt, extra_pnginfo))
        return {"ui": {"images": [entry], "animated": (format not in ("png",),)}, "result": ()}


NODES = {
    "OpenSoraLongVideo": (OpenSoraLongVideo, "Open-Sora Long Video (loops)"),
    "OpenSoraSaveVideo": (OpenSoraSaveVideo, "Open-Sora Save Video"),
}
