"""The VAE decode spread over the ranks of a sequence-parallel group (sampling).

The v1.2 VAE decodes its latent in independent temporal chunks (5 latent frames -> at most
`micro_frame_size` = 17 pixel frames, see vae.py), so P ranks can decode about 1/P of the
chunks each and all-gather the pixels: every rank ends with the whole video, in about 1/P of
the decode time. Without a group, a plain `vae.decode`.
"""

from __future__ import annotations

import torch

from opensora_sdk import distributed


@torch.no_grad()
def vae_decode_split(vae, latent: torch.Tensor, num_frames: int, group, **decode_kwargs) -> torch.Tensor:
    """`vae.decode(latent, num_frames, **decode_kwargs)` with its temporal chunks spread
    round-robin over the ranks of `group` and all-gathered: [B, 3, num_frames, H, W] on every
    rank. `vae` is a `VideoAutoencoder`; without a group (or micro_frame_size None) a plain decode."""
    mfs = vae.config.micro_frame_size
    P, r = distributed.group_size(group), distributed.group_rank(group)
    if P == 1 or mfs is None:
        return vae.decode(latent, num_frames, **decode_kwargs)
    step = vae.latent_size(mfs, None, None)[0]  # latent frames per chunk
    chunks = [(i, k * mfs, min(mfs, num_frames - k * mfs)) for k, i in enumerate(range(0, latent.shape[2], step))]
    B, _, _, h, w = latent.shape
    f, C = vae.spatial_factor, vae.config.vae_2d.out_channels
    out = torch.empty(B, C, num_frames, h * f, w * f, dtype=vae.dtype, device=vae.device)
    for j in range(0, len(chunks), P):  # round j: rank q decodes chunk j + q
        pixels = out.new_zeros(B, C, mfs, h * f, w * f)
        if j + r < len(chunks):
            i, _, n = chunks[j + r]
            pixels[:, :, :n] = vae.decode(latent[:, :, i : i + step], n, **decode_kwargs)
        parts = distributed.all_gather(pixels[None], 0, group)  # [P, B, C, mfs, H, W]
        for q in range(min(P, len(chunks) - j)):
            _, t0, n = chunks[j + q]
            out[:, :, t0 : t0 + n] = parts[q, :, :, :n]
    return out


__all__ = ["vae_decode_split"]
