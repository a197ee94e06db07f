"""Spatial tiling for the 2D autoencoder: overlapping tiles, blended with linear weights.

Tiling bounds the memory of the per-frame KL encoder/decoder (whose widest activations are
128 channels at full pixel resolution) by the tile size instead of the frame size. It is off
by default: each tile normalises with its own GroupNorm statistics and sees no context beyond
its border, so tiled results differ slightly from untiled ones (benchmarks/bench_vae.py
reports by how much).

Blending: every tile's output is weighted by a ramp that rises linearly over the overlap on
each side that borders another tile (1 elsewhere); the weighted tiles are summed and divided
by the summed weights, so two tiles overlapping by exactly `overlap` cross-fade linearly.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SpatialTiling:
    """Tile size and overlap, in **pixels** (multiples of the spatial factor, 8).

    Decoding cuts the latent into tiles of `tile_size/8` latents overlapping by `overlap/8`;
    encoding cuts each frame into `tile_size`-pixel tiles overlapping by `overlap` pixels.
    Use `SpatialTiling.in_latents(32, 8)` to give the sizes in latents instead. Frames no
    larger than a tile are processed whole. Typical values: 256/64 (less memory), 512/64.
    """

    tile_size: int = 256
    overlap: int = 64

    def __post_init__(self):
        for name in ("tile_size", "overlap"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool):
                raise ValueError(f"SpatialTiling.{name} must be an int number of pixels, got {value!r}")
        if self.tile_size < 16:
            raise ValueError(f"SpatialTiling.tile_size={self.tile_size} is too small; use at least 16 pixels")
        if not 0 <= self.overlap < self.tile_size:
            raise ValueError(
                f"SpatialTiling.overlap={self.overlap} must be >= 0 and smaller than tile_size={self.tile_size}"
            )

    @classmethod
    def in_latents(cls, tile_size: int, overlap: int, factor: int = 8) -> SpatialTiling:
        """Sizes given in latent units (1 latent = `factor` pixels)."""
        return cls(tile_size * factor, overlap * factor)

    def check_factor(self, factor: int) -> None:
        if self.tile_size % factor or self.overlap % factor:
            raise ValueError(
                f"SpatialTiling(tile_size={self.tile_size}, overlap={self.overlap}): both must be multiples "
                f"of the autoencoder's spatial factor {factor} (pixels per latent)"
            )


def tile_starts(length: int, tile: int, overlap: int, align: int = 1) -> list[int]:
    """Start offsets of the fewest tiles of size `tile` that cover [0, length) with neighbours
    overlapping by at least `overlap`, spread evenly (so the spare overlap is shared).

    Starts are multiples of `align`; the last tile ends at the end (rounded down to a multiple
    of `align` when the length is not aligned), so all tiles have full size. A length <= tile
    gives one tile.
    """
    if length <= tile:
        return [0]
    last = (length - tile) // align * align
    if last == 0:
        return [0]
    n = -(-last // (tile - overlap)) + 1  # tiles needed at the largest allowed stride
    while True:
        starts = [round(k * last / (n - 1) / align) * align for k in range(n)]
        if all(b - a <= tile - overlap for a, b in zip(starts, starts[1:])):
            return starts
        n += 1


def _ramp(size: int, ramp: int, rise: bool, fall: bool) -> torch.Tensor:
    """1D weights: linear rise over the first `ramp` entries (if `rise`), fall over the last."""
    w = torch.ones(size)
    ramp = min(ramp, size)
    if ramp > 0:
        up = torch.arange(1, ramp + 1, dtype=torch.float32) / (ramp + 1)  # (0, 1) exclusive
        if rise:
            w[:ramp] = torch.minimum(w[:ramp], up)
        if fall:
            w[size - ramp :] = torch.minimum(w[size - ramp :], up.flip(0))
    return w


def blend_tiles(
    fn: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    *,
    tile: int,
    overlap: int,
    align: int,
    out_size: Callable[[int], int],
) -> torch.Tensor:
    """Apply `fn` to overlapping tiles of x [..., H, W] and blend the outputs.

    `out_size(n)` is the output length of an input length n (x8 for a decoder, //8 for an
    encoder); tile starts are multiples of `align` so they map to whole output positions.
    """
    H, W = x.shape[-2:]
    ys, xs = tile_starts(H, tile, overlap, align), tile_starts(W, tile, overlap, align)
    Ho = out_size(ys[-1]) + out_size(min(tile, H))
    Wo = out_size(xs[-1]) + out_size(min(tile, W))
    ramp = out_size(overlap)
    out = weight = None
    for y0 in ys:
        for x0 in xs:
            piece = fn(x[..., y0 : y0 + tile, x0 : x0 + tile])  # [..., h_out, w_out]
            if out is None:
                out = torch.zeros(piece.shape[:-2] + (Ho, Wo), dtype=torch.float32, device=piece.device)
                weight = torch.zeros(Ho, Wo, dtype=torch.float32, device=piece.device)
            oy, ox = out_size(y0), out_size(x0)
            ph, pw = piece.shape[-2:]
            wy = _ramp(ph, ramp, rise=oy > 0, fall=oy + ph < Ho)
            wx = _ramp(pw, ramp, rise=ox > 0, fall=ox + pw < Wo)
            w = (wy[:, None] * wx[None, :]).to(piece.device)  # [ph, pw]
            out[..., oy : oy + ph, ox : ox + pw] += piece.float() * w
            weight[oy : oy + ph, ox : ox + pw] += w
    return (out / weight).to(piece.dtype)


def tiled_decode(decode: Callable, z: torch.Tensor, tiling: SpatialTiling, factor: int = 8) -> torch.Tensor:
    """decode(z) [B, C, h, w] -> [B, 3, h*factor, w*factor], tile by tile."""
    tiling.check_factor(factor)
    return blend_tiles(
        decode, z, tile=tiling.tile_size // factor, overlap=tiling.overlap // factor, align=1,
        out_size=lambda n: n * factor,
    )


def tiled_encode(encode: Callable, x: torch.Tensor, tiling: SpatialTiling, factor: int = 8) -> torch.Tensor:
    """encode(x) [B, 3, H, W] -> [B, C, H//factor, W//factor], tile by tile (tiles start on
    multiples of `factor` pixels; any last partial row/column of pixels is not seen)."""
    tiling.check_factor(factor)
    return blend_tiles(
        encode, x, tile=tiling.tile_size, overlap=tiling.overlap, align=factor, out_size=lambda n: n // factor,
    )
