"""Stand-ins for the few core ComfyUI nodes the pack's workflows use, for headless runs.

Same ids, inputs (in the same order), outputs and file naming as the core nodes at ComfyUI
v0.3.64, implemented with the SDK's video I/O, so `opensora workflow run` executes the
shipped workflows without a ComfyUI installation. Inside ComfyUI the real nodes are used.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from . import comfy_host as host
from .video import save_frames, workflow_metadata

_HIDDEN = {"prompt": "PROMPT", "extra_pnginfo": "EXTRA_PNGINFO"}


@dataclass
class HeadlessVideo:
    """What core VIDEO sockets carry here: float frames [N, H, W, 3] in [0, 1] and an fps."""

    images: torch.Tensor
    fps: float


def _input_file(name: str):
    path = host.input_directory() / name
    if not path.is_file():
        raise FileNotFoundError(f"input file {name!r} not found in the input folder {str(host.input_directory())!r}")
    return path


class LoadImage:
    RETURN_TYPES = ("IMAGE", "MASK")
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"image": ([], {"image_upload": True, "tooltip": "Image file in the input folder"})}}

    def load(self, image):
        from opensora_sdk.video_io import read_image

        frame = torch.from_numpy(read_image(_input_file(image)).copy()).float().div(255)[None]  # [1, H, W, 3]
        return frame, torch.zeros(1, *frame.shape[1:3])


class LoadVideo:
    RETURN_TYPES = ("VIDEO",)
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"file": ("COMBO", {"options": [], "video_upload": True, "tooltip": "Video file"})}}

    def load(self, file):
        from opensora_sdk.video_io import read_video

        frames, fps = read_video(_input_file(file))
        return (HeadlessVideo(torch.from_numpy(np.ascontiguousarray(frames)).float().div(255), float(fps)),)


class GetVideoComponents:
    RETURN_TYPES = ("IMAGE", "AUDIO", "FLOAT")
    FUNCTION = "split"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"video": ("VIDEO", {"tooltip": "The video to extract components from."})}}

    def split(self, video):
        return video.images, None, video.fps


class CreateVideo:
    RETURN_TYPES = ("VIDEO",)
    FUNCTION = "create"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"images": ("IMAGE", {"tooltip": "Frames"}),
                             "fps": ("FLOAT", {"default": 30.0, "min": 1.0, "max": 120.0, "tooltip": "Frame rate"})},
                "optional": {"audio": ("AUDIO", {"tooltip": "Ignored headless"})}}

    def create(self, images, fps, audio=None):
        return (HeadlessVideo(images, float(fps)),)


class SaveVideo:
    RETURN_TYPES = ()
    FUNCTION = "save"
    OUTPUT_NODE = True

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"video": ("VIDEO", {"tooltip": "Video"}),
                             "filename_prefix": ("STRING", {"default": "video/ComfyUI", "tooltip": "Prefix"}),
                             "format": (["auto", "mp4"], {"default": "auto", "tooltip": "Container"}),
                             "codec": (["auto", "h264"], {"default": "auto", "tooltip": "Codec"})},
                "hidden": dict(_HIDDEN)}

    def save(self, video, filename_prefix, format, codec, prompt=None, extra_pnginfo=None):
        meta = workflow_metadata(prompt, extra_pnginfo)
        entry = save_frames(video.images, video.fps, filename_prefix, "mp4", 23, meta)
        return {"ui": {"images": [entry], "animated": (True,)}}


class SaveImage:
    RETURN_TYPES = ()
    FUNCTION = "save"
    OUTPUT_NODE = True

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"images": ("IMAGE", {"tooltip": "Images"}),
                             "filename_prefix": ("STRING", {"default": "ComfyUI", "tooltip": "Prefix"})},
                "hidden": dict(_HIDDEN)}

    def save(self, images, filename_prefix, prompt=None, extra_pnginfo=None):
        meta = workflow_metadata(prompt, extra_pnginfo)
        return {"ui": {"images": [save_frames(img[None], 1.0, filename_prefix, "png", 0, meta) for img in images]}}


class PreviewImage:
    RETURN_TYPES = ()
    FUNCTION = "preview"
    OUTPUT_NODE = True

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"images": ("IMAGE", {"tooltip": "Images"})}, "hidden": dict(_HIDDEN)}

    def preview(self, images, prompt=None, extra_pnginfo=None):
        return {"ui": {"images": []}}


class SaveAnimatedWEBP:
    RETURN_TYPES = ()
    FUNCTION = "save"
    OUTPUT_NODE = True

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"images": ("IMAGE", {"tooltip": "Frames"}),
                             "filename_prefix": ("STRING", {"default": "ComfyUI", "tooltip": "Prefix"}),
                             "fps": ("FLOAT", {"default": 6.0, "min": 0.01, "max": 1000.0, "tooltip": "Frame rate"}),
                             "lossless": ("BOOLEAN", {"default": True, "tooltip": "Ignored headless"}),
                             "quality": ("INT", {"default": 80, "min": 0, "max": 100, "tooltip": "Ignored headless"}),
                             "method": (["default", "fastest", "slowest"], {"tooltip": "Ignored headless"})},
                "hidden": dict(_HIDDEN)}

    def save(self, images, filename_prefix, fps, lossless, quality, method, prompt=None, extra_pnginfo=None):
        entry = save_frames(images, fps, filename_prefix, "webp", 0, workflow_metadata(prompt, extra_pnginfo))
        return {"ui": {"images": [entry], "animated": (True,)}}


CORE_NODES = {cls.__name__: cls for cls in (
    LoadImage, LoadVideo, GetVideoComponents, CreateVideo, SaveVideo, SaveImage, PreviewImage, SaveAnimatedWEBP,
)}
