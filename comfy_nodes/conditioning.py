"""Reference conditions: images and videos pinned to latent frames of the output.

Each node adds one condition to an optional incoming list, so first + last frame, or a video
plus a closing image, are chains of two nodes. The pixels are kept as given and fitted to the
output size (`opensora_sdk.fit`) when the sampler encodes them with the VAE.

Positions are **latent frames** (one latent frame is about 4 video frames; 17 video frames
make 5 latent frames): 0 is the first, -1 the last. An image of another aspect ratio than the
output is fitted as its `fit` widget says: crop (cover + centre crop, the official way and the
default), pad (all of it, on black borders) or stretch (all of it, distorted). Edit ratio 0 keeps the reference fixed;
r in (0, 1) lets the model repaint it in the last r of the sampling (editing).
"""

from __future__ import annotations

from .types import CATEGORY, CONDITIONS, ConditionList, tip


def image_to_pixels(image, index: int = 0):
    """IMAGE [B, H, W, 3] in [0, 1] -> [3, H, W] in [-1, 1] (image `index` of the batch)."""
    if image.dim() != 4 or image.shape[-1] != 3:
        raise ValueError(f"image: expected an IMAGE [batch, height, width, 3], got shape {tuple(image.shape)}")
    if not -image.shape[0] <= index < image.shape[0]:
        raise ValueError(f"batch_index={index} is outside the {image.shape[0]} image(s) of the batch")
    return image[index].float().permute(2, 0, 1).mul(2).sub(1).clamp(-1, 1)


def frames_to_pixels(images):
    """IMAGE batch [F, H, W, 3] in [0, 1] -> video pixels [3, F, H, W] in [-1, 1]."""
    if images.dim() != 4 or images.shape[-1] != 3:
        raise ValueError(f"images: expected an IMAGE batch [frames, height, width, 3], got {tuple(images.shape)}")
    return images.float().permute(3, 0, 1, 2).mul(2).sub(1).clamp(-1, 1)


def _common_inputs() -> dict:
    return {
        "edit_ratio": ("FLOAT", tip(
            "0 keeps the reference fixed; r in (0, 1] lets the model repaint it during the last r of sampling",
            default=0.0, min=0.0, max=1.0, step=0.05)),
        "loop": ("INT", tip("The loop of a long video (OpenSoraLongVideo) this applies to; 0 = the first clip",
                            default=0, min=0, max=64)),
    }


_OPTIONAL = {"conditions": (CONDITIONS, tip("Conditions to add this one to (chain nodes for several)"))}


def fit_choices() -> list[str]:
    from opensora_sdk.fit import FITS

    return list(FITS)


class OpenSoraImageCondition:
    DESCRIPTION = (
        "Pins an image to one latent frame of the output: frame 0 = image-to-video, frame -1 = ends on the "
        "image; chain two for first + last frame."
    )
    CATEGORY = f"{CATEGORY}/conditioning"
    RETURN_TYPES = (CONDITIONS,)
    RETURN_NAMES = ("conditions",)
    FUNCTION = "add"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "image": ("IMAGE", tip("The reference image; resized to the output as `fit` says")),
                "frame": ("INT", tip("Latent frame of the output (0 first, -1 last; 1 latent frame ~ 4 video frames)",
                                     default=0, min=-1024, max=1024)),
                "batch_index": ("INT", tip("Which image of the batch to use", default=0, min=0, max=4095)),
                **_common_inputs(),
            },
            "optional": {
                **_OPTIONAL,
                # the last widget, so saved workflows keep their widget order; optional, so older API prompts
                # without it still run (with today's behaviour, crop)
                "fit": (fit_choices(), tip(
                    "When the image's aspect ratio differs from the output's: crop (cover and centre-crop, as "
                    "officially), pad (keep all of it, black borders) or stretch (keep all of it, distorted)",
                    default="crop")),
            },
        }

    def add(self, image, frame, batch_index, edit_ratio, loop, conditions=None, fit="crop"):
        from opensora_sdk.conditioning import ImageCondition

        if fit not in fit_choices():
            raise ValueError(f"fit={fit!r} is not allowed: choose one of {fit_choices()}")
        condition = ImageCondition(image_to_pixels(image, batch_index), frame=frame, edit_ratio=edit_ratio, loop=loop,
                                   fit=fit)
        return ((conditions or ConditionList()).plus(condition),)


class OpenSoraVideoCondition:
    DESCRIPTION = (
        "Places frames of a video into the output: extension (its last latent frames at the start), or editing "
        "(the whole clip with an edit ratio > 0)."
    )
    CATEGORY = f"{CATEGORY}/conditioning"
    RETURN_TYPES = (CONDITIONS,)
    RETURN_NAMES = ("conditions",)
    FUNCTION = "add"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "images": ("IMAGE", tip("The reference video as an IMAGE batch (one image per frame)")),
                "ref_start": ("INT", tip(
                    "First latent frame taken from the reference (negative counts from its end: -5 = its last 17 "
                    "video frames)", default=-5, min=-1024, max=1024)),
                "target_start": ("INT", tip("Latent frame of the output where the frames go (negative: from the end)",
                                            default=0, min=-1024, max=1024)),
                "length": ("INT", tip("Latent frames to copy; 0 = up to the end of the reference",
                                      default=5, min=0, max=1024)),
                **_common_inputs(),
            },
            "optional": dict(_OPTIONAL),
        }

    def add(self, images, ref_start, target_start, length, edit_ratio, loop, conditions=None):
        from opensora_sdk.conditioning import VideoCondition

        condition = VideoCondition(
            frames_to_pixels(images), ref_start=ref_start, target_start=target_start,
            length=length or None, edit_ratio=edit_ratio, loop=loop,
        )
        return ((conditions or ConditionList()).plus(condition),)


NODES = {
    "OpenSoraImageCondition": (OpenSoraImageCondition, "Open-Sora Image Condition"),
    "OpenSoraVideoCondition": (OpenSoraVideoCondition, "Open-Sora Video Condition"),
}
