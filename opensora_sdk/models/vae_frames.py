"""The per-frame SD VAE of Open-Sora v1.1 and v1.0 (`stabilityai/sd-vae-ft-ema`, spec 9.1).

Each frame goes through the 2D KL autoencoder on its own, `micro_batch_size` frames at a time,
and its latent is scaled by 0.18215: video [B, 3, N, H, W] <-> latent [B, 4, N, H/8, W/8].
There is no temporal compression (one latent frame per video frame), so the v1.1 mask
strategies count latent frames = video frames. The interface is `VideoAutoencoder`'s
(`encode`, `decode`, `latent_size`, `from_pretrained`, `save_pretrained`, `dtype`, `device`),
so the generation path takes either, `progress(done, total)` included (after each micro-batch
of frames, or each tile of one when tiling; it may raise to stop).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from einops import rearrange
from torch import nn

from opensora_sdk.configs import AutoencoderKLConfig
from opensora_sdk.models.vae import ProgressFn, WorkCounter, tile_count
from opensora_sdk.models.vae_spatial import AutoencoderKL, DiagonalGaussian
from opensora_sdk.models.vae_tiling import SpatialTiling, tiled_decode, tiled_encode

SCALING_FACTOR = 0.18215
MICRO_BATCH_SIZE = 4  # the v1.1 config's micro_batch_size


class FrameAutoencoder(nn.Module):
    """The SD VAE applied frame by frame (v1.1 / v1.0). `config` is its `AutoencoderKLConfig`."""

    def __init__(self, config: AutoencoderKLConfig | None = None, micro_batch_size: int | None = MICRO_BATCH_SIZE):
        super().__init__()
        self.config = config or AutoencoderKLConfig()
        self.micro_batch_size = micro_batch_size
        self.kl = AutoencoderKL(self.config)

    def set_fast_decode(self, enabled: bool = True) -> FrameAutoencoder:
        """Decode through vae_fast.py (True, the default) or the plain decoder (False)."""
        self.kl.set_fast_decode(enabled)
        return self

    @property
    def dtype(self) -> torch.dtype:
        return self.kl.quant_conv.weight.dtype  # the encoder side (a float16 decoder stays float32)

    @property
    def device(self) -> torch.device:
        return self.kl.quant_conv.weight.device

    @property
    def spatial_factor(self) -> int:
        return 2 ** (len(self.config.block_out_channels) - 1)

    @property
    def latent_channels(self) -> int:
        return self.config.latent_channels

    def latent_size(self, num_frames, height, width) -> tuple:
        """(N, H/8, W/8): one latent frame per video frame."""
        f = self.spatial_factor
        return num_frames, None if height is None else height // f, None if width is None else width // f

    def _apply(self, fn, recurse=True):  # a float16 cast keeps the decoder in float32 (force_upcast)
        super()._apply(fn, recurse)
        if self.config.force_upcast and self.kl.post_quant_conv.weight.dtype == torch.float16:
            self.kl.decoder.float()
            self.kl.post_quant_conv.float()
        return self

    def _frames(self, x: torch.Tensor):
        """Yield micro-batches of frames [m, C, h, w] of x [B, C, N, h, w] in (B N) order."""
        B, _, N = x.shape[:3]
        step = self.micro_batch_size or B * N
        flat = rearrange(x, "B C N h w -> (B N) C h w")
        for i in range(0, B * N, step):
            yield flat[i : i + step]

    def _counter(self, shape, tiling, progress, latent: bool) -> WorkCounter:
        B, _, N, H, W = shape
        step = self.micro_batch_size or B * N
        tiles = tile_count(H, W, tiling, self.spatial_factor, latent=latent)
        return WorkCounter(progress, -(-B * N // step) * tiles)

    def encode(self, video: torch.Tensor, sample: bool = True, generator: torch.Generator | None = None, *,
               tiling: SpatialTiling | None = None, progress: ProgressFn | None = None) -> torch.Tensor:
        """video [B, 3, N, H, W] in [-1, 1] -> latent [B, 4, N, H/8, W/8] (x 0.18215); sampled
        from the posterior with `generator` unless `sample=False` (the means)."""
        if video.dim() != 5 or video.shape[1] != self.config.in_channels:
            raise ValueError(f"video must be [B, {self.config.in_channels}, N, H, W], got {tuple(video.shape)}")
        B = video.shape[0]
        counter = self._counter(video.shape, tiling, progress, latent=False)
        encode = self.kl.encode_moments if tiling is None else counter.counted(self.kl.encode_moments)
        out = []
        for batch in self._frames(video):
            batch = batch.to(self.device, self.dtype)
            moments = encode(batch) if tiling is None else tiled_encode(encode, batch, tiling, self.spatial_factor)
            if tiling is None:
                counter.tick()
            posterior = DiagonalGaussian(moments)
            out.append((posterior.sample(generator) if sample else posterior.mode()) * SCALING_FACTOR)
        return rearrange(torch.cat(out), "(B N) C h w -> B C N h w", B=B)

    def decode(self, latent: torch.Tensor, num_frames: int | None = None, *,
               tiling: SpatialTiling | None = None, progress: ProgressFn | None = None) -> torch.Tensor:
        """latent [B, 4, N, h, w] -> video [B, 3, N, 8h, 8w] (not clamped), in the model's dtype."""
        if latent.dim() != 5 or latent.shape[1] != self.config.latent_channels:
            raise ValueError(f"latent must be [B, {self.config.latent_channels}, N, h, w], got {tuple(latent.shape)}")
        if num_frames is not None and num_frames != latent.shape[2]:
            raise ValueError(
                f"num_frames={num_frames} but the latent has {latent.shape[2]} frames (this VAE has no temporal "
                "compression: one latent frame per video frame)"
            )
        B = latent.shape[0]
        counter = self._counter(latent.shape, tiling, progress, latent=True)
        decode = self.kl.decode if tiling is None else counter.counted(self.kl.decode)
        out = []
        for batch in self._frames(latent.to(self.device) / SCALING_FACTOR):
            out.append(decode(batch) if tiling is None else tiled_decode(decode, batch, tiling, self.spatial_factor))
            if tiling is None:
                counter.tick()
        return rearrange(torch.cat(out).to(self.dtype), "(B N) C h w -> B C N h w", B=B)

    @classmethod
    def from_pretrained(cls, source: str | os.PathLike, *, dtype: torch.dtype | None = None, device=None,
                        strict: bool = True, local_files_only: bool | None = None) -> FrameAutoencoder:
        """A diffusers AutoencoderKL folder or file, or a hub id (`stabilityai/sd-vae-ft-ema`)."""
        kl = AutoencoderKL.from_pretrained(source, dtype=None, device=device, strict=strict,
                                           local_files_only=local_files_only)
        model = cls(kl.config)
        model.kl = kl
        return model.to(dtype) if dtype is not None else model

    def save_pretrained(self, folder: str | os.PathLike) -> None:
        """The diffusers layout (config.json + diffusion_pytorch_model.safetensors), atomically."""
        self.kl.save_pretrained(Path(folder))


__all__ = ["FrameAutoencoder", "SCALING_FACTOR"]
