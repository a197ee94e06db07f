"""What planning needs to know about the models: `ModelFacts`, numbers from the model configs
(or the loaded models) that fix latent sizes and token counts. No weights are needed, so
`opensora info` plans without loading anything."""

from __future__ import annotations

from dataclasses import dataclass

from opensora_sdk.conditioning import condition_pixel_frames
from opensora_sdk.families import V1_2


@dataclass(frozen=True)
class ModelFacts:
    """Numbers from the model configs that fix sizes and token counts (no weights needed)."""

    latent_channels: int = 4
    micro_frame_size: int | None = 17  # VAE pixel frames per temporal chunk
    time_factor: int = 4  # VAE temporal compression
    space_factor: int = 8  # VAE spatial compression
    patch_size: tuple = (1, 2, 2)  # STDiT3 (t, h, w)
    text_max_length: int = 300  # T5 tokens = STDiT3 model_max_length
    max_latent_frames: int | None = V1_2.max_latent_frames
    fixed_latent_size: tuple | None = None  # (T', h, w) of a fixed-size model (v1.0), else None

    def carried_frames(self, condition_frame_length: int) -> int:
        """Video frames shared by consecutive loops that carry `condition_frame_length` latent
        frames: whole 17-frame chunks for the v1.2 VAE (a multiple of 5 latents), else the
        latents times the temporal factor (1 for the per-frame SD VAE)."""
        if self.micro_frame_size:
            return condition_pixel_frames(condition_frame_length)
        c = condition_frame_length
        if isinstance(c, bool) or not isinstance(c, int) or c < 1:
            raise ValueError(f"condition_frame_length must be a positive number of latent frames, got {c!r}")
        return c * self.time_factor

    def latent_size(self, num_frames: int, height: int, width: int) -> tuple[int, int, int]:
        from opensora_sdk.models.vae import latent_size

        return latent_size(
            num_frames, height, width,
            micro_frame_size=self.micro_frame_size, time_factor=self.time_factor, space_factor=self.space_factor,
        )

    def video_tokens(self, T: int, h: int, w: int) -> int:
        """Transformer tokens of a latent [T, h, w]: patches, each dimension rounded up."""
        pt, ph, pw = self.patch_size
        return -(-T // pt) * -(-h // ph) * -(-w // pw)

    def longest_clip(self) -> int:
        """The most pixel frames whose latent fits `max_latent_frames` (which must be set)."""
        n = 1
        while self.latent_size(n + 1, None, None)[0] <= self.max_latent_frames:
            n += 1
        return n

    @classmethod
    def from_configs(cls, transformer, vae, max_latent_frames: int | None = V1_2.max_latent_frames) -> ModelFacts:
        """From a transformer config (`STDiT3Config`, `STDiT2Config`, `STDiTConfig`) and a VAE
        config (`VideoAutoencoderConfig`, or the per-frame SD VAE's `AutoencoderKLConfig`)."""
        geometry = cls.vae_geometry(vae)
        fixed = getattr(transformer, "input_size", None)
        fixed = tuple(fixed) if getattr(transformer, "model_type", "") == "stdit" and fixed else None
        return cls(
            **geometry, patch_size=tuple(transformer.patch_size), text_max_length=transformer.model_max_length,
            max_latent_frames=max_latent_frames, fixed_latent_size=fixed,
        )

    @staticmethod
    def vae_geometry(vae) -> dict:
        """latent_channels, micro_frame_size, time_factor, space_factor of a VAE config."""
        if hasattr(vae, "vae_temporal"):  # the v1.2 video VAE
            return dict(
                latent_channels=vae.vae_temporal.embed_dim, micro_frame_size=vae.micro_frame_size,
                time_factor=vae.vae_temporal.time_downsample_factor,
                space_factor=2 ** (len(vae.vae_2d.block_out_channels) - 1),
            )
        return dict(latent_channels=vae.latent_channels, micro_frame_size=None, time_factor=1,  # one per frame
                    space_factor=2 ** (len(vae.block_out_channels) - 1))

    @classmethod
    def from_models(cls, transformer, vae, max_latent_frames: int | None = V1_2.max_latent_frames) -> ModelFacts:
        """From loaded models (a transformer and a VAE): the geometry they really have."""
        return cls.from_configs(transformer.config, vae.config, max_latent_frames)


__all__ = ["ModelFacts"]
