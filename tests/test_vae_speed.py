"""The fast VAE decode (models/vae_fast.py) against the plain decoders, and the bfloat16 VAE."""

import math

import pytest
import torch
import torch.nn.functional as F

from opensora_sdk.models import vae_fast
from opensora_sdk.models.auto import load_vae
from opensora_sdk.dtypes import parse_dtype
from opensora_sdk.presets import BUILTIN_DIR
from opensora_sdk.video import Video

FAST_TOL = 1e-5  # fast against plain, float32: float rounding only


@pytest.fixture(scope="module")
def builtin():
    """The built-in tiny VAE (it ships with the package), float32."""
    return load_vae(str(BUILTIN_DIR / "vae"), dtype=torch.float32, device="cpu").eval()


def _decode(model, latent, frames, *, fast: bool):
    model.set_fast_decode(fast)
    try:
        with torch.no_grad():
            return model.decode(latent, frames)
    finally:
        model.set_fast_decode(True)


def test_fast_decode_equals_plain_over_several_chunks_and_odd_sizes(builtin, monkeypatch):
    # 40 frames = chunks of 17 + 17 + 6 (latent 5 + 5 + 2), a 3 x 5 latent (24 x 40 pixels)
    latent = torch.randn(1, 4, 12, 3, 5, generator=torch.Generator().manual_seed(0))
    plain = _decode(builtin, latent, 40, fast=False)
    fast = _decode(builtin, latent, 40, fast=True)
    assert fast.shape == plain.shape == (1, 3, 40, 24, 40)
    assert plain.abs().max() > 0.5 and plain.std() > 0.05  # a real picture, not a constant
    torch.testing.assert_close(fast, plain, atol=FAST_TOL, rtol=0)
    # frames in sub-batches of 3 (the budget of three 24 x 40 frames): the same values
    widest = builtin.spatial.decoder.conv_norm_out.num_channels * 24 * 40 * 4
    monkeypatch.setattr(vae_fast, "FRAME_BUDGET_BYTES", 3 * widest)
    torch.testing.assert_close(_decode(builtin, latent, 40, fast=True), plain, atol=FAST_TOL, rtol=0)


def test_switch_reaches_both_stages(builtin):
    assert builtin.set_fast_decode(False) is builtin
    assert not builtin.spatial.fast_decode and not builtin.temporal_vae.fast_decode
    builtin.set_fast_decode(True)
    assert builtin.spatial.fast_decode and builtin.temporal_vae.fast_decode


@pytest.mark.parametrize("bias", [True, False])
def test_subpixel_upsample_conv_equals_nearest_then_conv(bias):
    g = torch.Generator().manual_seed(1)
    conv = torch.nn.Conv2d(6, 5, 3, padding=1, bias=bias)
    x = torch.randn(2, 6, 7, 9, generator=g)
    with torch.no_grad():
        want = conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))  # [2, 5, 14, 18]
        for layout in (torch.contiguous_format, torch.channels_last):
            got = vae_fast.upsample_conv_2d(conv, x.contiguous(memory_format=layout))
            assert got.shape == want.shape
            torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


def test_fast_temporal_decode_equals_plain(builtin):
    tv = builtin.temporal_vae
    z = torch.randn(1, 4, 3, 6, 5, generator=torch.Generator().manual_seed(2))  # 3 latent frames -> 12 frames
    with torch.no_grad():
        zq = tv.post_quant_conv(z)
        torch.testing.assert_close(vae_fast.decode_temporal(tv.decoder, zq), tv.decoder(zq), atol=1e-6, rtol=0)


def test_gradients_take_the_plain_path(builtin):
    """In-place SiLU cannot be differentiated: with a gradient needed, decode runs the plain decoders."""
    latent = torch.randn(1, 4, 2, 2, 3, generator=torch.Generator().manual_seed(3), requires_grad=True)
    out = builtin.decode(latent, 5)  # [1, 3, 5, 16, 24]
    out.square().mean().backward()
    assert latent.grad is not None and latent.grad.abs().sum() > 0
    torch.testing.assert_close(out.detach(), _decode(builtin, latent.detach(), 5, fast=True), atol=FAST_TOL, rtol=0)


# --------------------------------------------------------------------------------------------
# bfloat16
# --------------------------------------------------------------------------------------------

BF16_MAX_ABS, BF16_MEAN_ABS, BF16_PSNR_DB = 0.15, 5e-3, 45.0  # measured here: 0.066, 2.3e-3, 51.8 dB


def test_bf16_decode_stays_close_to_float32(builtin):
    import copy

    latent = torch.randn(1, 4, 5, 4, 6, generator=torch.Generator().manual_seed(4))  # 17 frames of 32 x 48
    ref = _decode(builtin, latent, 17, fast=False)
    model16 = copy.deepcopy(builtin).to(torch.bfloat16)
    out = _decode(model16, latent, 17, fast=True)
    assert out.dtype == torch.bfloat16
    diff = (out.float() - ref).abs()
    frames = [Video.from_tensor(x[0]).frames.astype("float64") for x in (out, ref)]
    psnr = 10 * math.log10(255**2 / ((frames[0] - frames[1]) ** 2).mean())
    assert diff.max() < BF16_MAX_ABS and diff.mean() < BF16_MEAN_ABS and psnr > BF16_PSNR_DB, (diff.max(), psnr)
    # the fast path in bfloat16 is as close as the plain path in bfloat16
    plain16 = _decode(model16, latent, 17, fast=False)
    assert diff.mean() < 1.5 * (plain16.float() - ref).abs().mean()


def test_vae_dtype_is_checked_and_named():
    assert parse_dtype(None, "vae_dtype", allow_none=True) is None
    assert parse_dtype("bf16", "vae_dtype", allow_none=True) is torch.bfloat16
    assert parse_dtype(torch.float32, "vae_dtype", allow_none=True) is torch.float32
    with pytest.raises(ValueError, match=r"vae_dtype='int8' is not allowed: choose torch.float32"):
        parse_dtype("int8", "vae_dtype", allow_none=True)


def test_pipeline_vae_dtype_casts_only_the_vae():
    from opensora_sdk.pipeline import OpenSoraPipeline

    pipe = OpenSoraPipeline.from_preset(device="cpu", vae_dtype=torch.bfloat16, progress=False)
    assert pipe.vae.dtype == torch.bfloat16 and pipe.dtype == torch.float32
    pipe.to(dtype=torch.float32)  # a later cast keeps the VAE's own dtype
    assert pipe.vae.dtype == torch.bfloat16
    video = pipe("a red ball", num_frames=5, height=32, width=48, num_steps=2, seed=0)
    assert video.frames.shape == (5, 32, 48, 3) and video.frames.std() > 1


def test_cli_vae_dtype_flag():
    from opensora_sdk.cli import build_parser

    args = build_parser().parse_args(["generate", "--prompt", "a cat", "--vae-dtype", "bf16"])
    assert args.vae_dtype == "bf16"
    assert build_parser().parse_args(["generate", "--prompt", "a cat"]).vae_dtype is None
