"""Socket types of the pack and the objects that travel on them.

Pack objects get pack-private type names, so they cannot be wired into core nodes that expect
ComfyUI's own MODEL / VAE / CLIP objects. Core types are used only for core values: IMAGE
([frames, H, W, 3] float in [0, 1]), LATENT (a dict with "samples" [B, 4, T, h, w]), FLOAT.
"""

from __future__ import annotations

from dataclasses import dataclass, field

MODEL = "OPENSORA_MODEL"
VAE = "OPENSORA_VAE"
TEXT_ENCODER = "OPENSORA_T5"
TEXT = "OPENSORA_TEXT"
CONDITIONS = "OPENSORA_CONDITIONS"

CATEGORY = "OpenSora"
BUILTIN = "(built-in)"
DTYPES = ("auto", "fp32", "bf16", "fp16")


def tip(text: str, **options) -> dict:
    """Widget options with a tooltip (every input has one)."""
    return {"tooltip": text, **options}


@dataclass
class LoadedModel:
    """The transformer (STDiT3, STDiT2 or STDiT) with where it came from; it waits on the
    offload device between uses."""

    transformer: object  # opensora_sdk.models.STDiT3 / STDiT2 / STDiT
    source: str
    dtype: object  # torch.dtype
    max_latent_frames: int | None = 120
    timestep_warp: bool = True  # the model samples with v1.2's timestep warp (False: trained without it)


@dataclass
class LoadedVAE:
    vae: object  # opensora_sdk.models.VideoAutoencoder, or FrameAutoencoder (v1.1 / v1.0)
    source: str
    dtype: object


@dataclass
class LoadedTextEncoder:
    encoder: object  # opensora_sdk.models.T5TextEncoder
    source: str


@dataclass
class TextEmbeds:
    """The output of OpenSoraTextEncode.

    segments: the processed prompt's loop segments (opensora_sdk.text.PromptSegment; one for a
    plain prompt); embeddings maps each processed text (the negative prompt's too) to
    (y [1, 1, L, C], mask [1, L]) on the CPU; negative_text is the processed negative prompt,
    or None.
    """

    prompt: str
    segments: tuple
    embeddings: dict
    negative_text: str | None = None

    @property
    def negative(self) -> tuple | None:
        return None if self.negative_text is None else self.embeddings[self.negative_text]

    def text_for_loop(self, i: int) -> str:
        from opensora_sdk.text import prompt_for_loop

        return prompt_for_loop(self.segments, i)

    def for_loop(self, i: int) -> tuple:
        return self.embeddings[self.text_for_loop(i)]

    def for_length(self, tokens: int) -> TextEmbeds:
        """The embeddings cut to `tokens` tokens (a model with a shorter text length, e.g. v1.1's
        200 after a 300-token encode). Exact: T5 attends to the real tokens only, so a prompt
        whose tokens (and end token) all fit gives the same rows; a longer one is an error."""
        import dataclasses

        out = {}
        for text, (y, mask) in self.embeddings.items():
            if y.shape[-2] > tokens and bool(mask[..., tokens:].any()):
                raise ValueError(
                    f"the prompt {text[:60]!r} has {int(mask.sum())} tokens; the diffusion model reads {tokens}: shorten "
                    f"it, or set the text encoder loader's max_length to {tokens} (it then truncates as officially)"
                )
            out[text] = (y[..., :tokens, :], mask[..., :tokens])
        return dataclasses.replace(self, embeddings=out)


@dataclass
class ConditionList:
    """Typed conditions (opensora_sdk.conditioning.ImageCondition / VideoCondition) with
    their pixels as tensors [3, F, H, W] in [-1, 1]; fitted to the output (their `fit`:
    crop, pad or stretch) when the sampler encodes them."""

    items: list = field(default_factory=list)

    def plus(self, condition) -> ConditionList:
        return ConditionList(self.items + [condition])
