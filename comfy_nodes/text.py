"""OpenSoraTextEncode: prompt (+ scores, camera motion) and negative prompt -> OPENSORA_TEXT.

The prompt goes through the official processing (`opensora_sdk.text.process_prompt`): loop
segments "|0|first clip|1|second clip", the score suffixes, caption cleaning. T5 runs on
ComfyUI's text-encoder device and leaves it right after encoding.
"""

from __future__ import annotations

from . import comfy_host as host
from .types import CATEGORY, TEXT, TEXT_ENCODER, TextEmbeds, tip

NONE = "none"


def camera_choices() -> list[str]:
    from opensora_sdk.text import CAMERA_MOTIONS

    return [NONE, *CAMERA_MOTIONS]


def encode_texts(loaded, texts: list[str]) -> dict:
    """{text: (y [1, 1, L, C], mask [1, L])} on ComfyUI's intermediate device, through the SDK's
    `encode_texts` (T5 on ComfyUI's text-encoder device, back on its offload device after)."""
    from opensora_sdk.generation import encode_texts as sdk_encode_texts

    from .placement import placement

    embeddings = sdk_encode_texts(loaded.encoder, placement(), texts)
    out = host.intermediate_device()
    return {t: (y.to(out), mask.to(out)) for t, (y, mask) in embeddings.items()}


def encode_prompt(loaded, prompt: str, negative_prompt: str = "", aesthetic_score: float = 6.5,
                  motion_score: float = -1.0, camera_motion: str = NONE) -> TextEmbeds:
    from opensora_sdk.plan import plan_prompts

    prompts = plan_prompts(
        prompt, negative_prompt=negative_prompt,
        aesthetic_score=None if aesthetic_score < 0 else float(aesthetic_score),
        motion_score=None if motion_score < 0 else float(motion_score),
        camera_motion=None if camera_motion == NONE else camera_motion,
    )  # fmt: skip
    processed, negative = prompts.processed[0], prompts.negative
    if processed.reference_path is not None or processed.mask_strategy is not None:
        raise ValueError(
            "prompt: inline JSON options (reference_path / mask_strategy) are not read by the nodes; remove them "
            "and connect OpenSoraImageCondition / OpenSoraVideoCondition to the sampler instead"
        )
    texts = [s.text for s in processed.segments] + ([negative] if negative is not None else [])
    embeddings = encode_texts(loaded, texts)
    return TextEmbeds(prompt, processed.segments, embeddings, negative)


class OpenSoraTextEncode:
    DESCRIPTION = (
        "Encodes a prompt with T5 the way Open-Sora v1.2 was trained: the aesthetic score, motion score and "
        "camera motion are appended to the text. Loop prompts for long videos: |0|first clip|2|from loop 2 on."
    )
    CATEGORY = CATEGORY
    RETURN_TYPES = (TEXT,)
    RETURN_NAMES = ("text",)
    FUNCTION = "encode"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "text_encoder": (TEXT_ENCODER, tip("T5 from OpenSoraTextEncoderLoader")),
            "prompt": ("STRING", tip(
                "What the video shows. For long videos, one text per loop: |0|a cat sleeps|1|the cat wakes up",
                multiline=True, dynamicPrompts=True, default="a red panda eating bamboo in a forest")),
            "negative_prompt": ("STRING", tip(
                "Replaces the model's null caption in guidance; empty = the official unconditional branch",
                multiline=True, dynamicPrompts=True, default="")),
            "aesthetic_score": ("FLOAT", tip(
                "Appended as 'aesthetic score: X.' (official default 6.5); -1 leaves it out",
                default=6.5, min=-1.0, max=10.0, step=0.1)),
            "motion_score": ("FLOAT", tip(
                "Appended as 'motion score: X.' (more motion when higher, e.g. 5-30); -1 leaves it out",
                default=-1.0, min=-1.0, max=100.0, step=0.5)),
            "camera_motion": (camera_choices(), tip("Appended as 'camera motion: X.'; none leaves it out",
                                                   default=NONE)),
        }}

    def encode(self, text_encoder, prompt, negative_prompt, aesthetic_score, motion_score, camera_motion):
        return (encode_prompt(text_encoder, prompt, negative_prompt, aesthetic_score, motion_score, camera_motion),)


NODES = {"OpenSoraTextEncode": (OpenSoraTextEncode, "Open-Sora Text Encode")}
