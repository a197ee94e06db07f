"""The video VAE at run time: memory structure, tiling, dtypes and argument checks."""

import warnings

import pytest
import torch
import torch.nn.functional as F

from opensora_sdk.configs import VAE_PRESETS, preset
from opensora_sdk.loading import load_tensors_into, save_safetensors_atomic
from opensora_sdk.models import VideoAutoencoder
from opensora_sdk.models.vae_tiling import SpatialTiling, blend_tiles, tile_starts, tiled_decode, tiled_encode


@pytest.fixture(scope="module")
def tiny(golden):
    with torch.device("meta"):
        model = VideoAutoencoder(preset("OpenSoraVAE_V1_2-tiny", VAE_PRESETS))
    load_tensors_into(model, golden("vae_tiny_weights").with_prefix("sd.").items())
    return model.eval()


def _video(frames, h=32, w=32, b=1):
    return torch.rand(b, 3, frames, h, w) * 2 - 1


# --------------------------------------------------------------------------------------------
# Memory: the largest activation does not grow with the number of frames
# --------------------------------------------------------------------------------------------


def _largest_activation(model, fn) -> int:
    """Run fn() and return the largest tensor any submodule (not the model itself) produced."""
    largest = [0]

    def hook(module, args, out):
        if isinstance(out, torch.Tensor):
            largest[0] = max(largest[0], out.numel())

    handles = [m.register_forward_hook(hook) for name, m in model.named_modules() if name]
    try:
        with torch.no_grad():
            fn()
    finally:
        for h in handles:
            h.remove()
    return largest[0]


def test_decode_working_set_is_one_chunk(tiny):
    z17 = torch.randn(1, 4, 5, 4, 4)
    z51 = torch.randn(1, 4, 15, 4, 4)
    small = _largest_activation(tiny, lambda: tiny.decode(z17, num_frames=17))
    large = _largest_activation(tiny, lambda: tiny.decode(z51, num_frames=51))
    assert small == large > 0
    # the widest per-frame activation times all 51 frames would be far larger
    assert large < 51 * 4 * 32 * 32


def test_encode_working_set_is_one_micro_batch(tiny):
    small = _largest_activation(tiny, lambda: tiny.encode(_video(17), sample=False))
    large = _largest_activation(tiny, lambda: tiny.encode(_video(51), sample=False))
    assert small == large > 0


def test_tiling_bounds_the_spatial_working_set(tiny):
    z = torch.randn(1, 4, 5, 16, 16)  # 128 x 128 pixels
    whole = _largest_activation(tiny, lambda: tiny.decode(z, num_frames=17))
    tiled = _largest_activation(tiny, lambda: tiny.decode(z, num_frames=17, tiling=SpatialTiling(64, 16)))
    assert tiled < whole


# --------------------------------------------------------------------------------------------
# Tiling
# --------------------------------------------------------------------------------------------


def test_tile_starts_cover_the_length():
    assert tile_starts(40, 64, 16) == [0]
    assert tile_starts(256, 128, 32) == [0, 64, 128]  # 3 tiles, the spare overlap shared evenly
    starts = tile_starts(203, 64, 16, align=8)
    assert all(s % 8 == 0 for s in starts) and starts[-1] + 64 <= 203 and starts[-1] + 64 > 203 - 8
    for align in (1, 8):
        for length in range(1, 300):
            s = tile_starts(length, 64, 16, align)
            assert s[0] == 0 and all(x % align == 0 for x in s)
            assert length - align < s[-1] + 64 <= max(length, 64)  # ends at the (aligned) end
            assert all(0 < b - a <= 48 for a, b in zip(s, s[1:]))  # neighbours overlap by >= 16
            assert len(s) == 1 or len(s) <= -(-(length - 64) // 48) + 2  # no needless tiles


def test_blending_is_exact_for_context_free_maps():
    # A map without spatial context gives identical tiles, so the blend must reproduce it.
    z = torch.randn(2, 4, 13, 21)
    up = lambda t: F.interpolate(t, scale_factor=8.0, mode="nearest") * 2 + 1  # noqa: E731
    torch.testing.assert_close(tiled_decode(up, z, SpatialTiling(48, 16)), up(z))
    x = torch.randn(2, 3, 100, 77)
    pool = lambda t: F.avg_pool2d(t, 8)  # noqa: E731 (floor, like the encoder)
    torch.testing.assert_close(tiled_encode(pool, x, SpatialTiling(32, 16)), pool(x))
    ramp = blend_tiles(lambda t: torch.ones_like(t), x, tile=32, overlap=8, align=1, out_size=lambda n: n)
    torch.testing.assert_close(ramp, torch.ones_like(x))


def test_one_tile_equals_untiled(tiny):
    z = torch.randn(1, 4, 5, 4, 4)
    x = _video(17)
    with torch.no_grad():
        ref_d, ref_e = tiny.decode(z, num_frames=17), tiny.encode(x, sample=False)
        torch.testing.assert_close(tiny.decode(z, num_frames=17, tiling=SpatialTiling(64, 16)), ref_d)
        torch.testing.assert_close(tiny.encode(x, sample=False, tiling=SpatialTiling(64, 16)), ref_e)


def test_tiled_decode_and_encode_stay_close(tiny):
    # Tiles normalise on their own, so with random weights the difference is visible; the
    # exact placement and blending are tested above with context-free maps.
    z = torch.randn(1, 4, 5, 12, 12)  # 96 x 96 pixels, 2 x 2 tiles of 80 px
    x = _video(5, 96, 96)
    tiling = SpatialTiling.in_latents(10, 4)
    assert tiling == SpatialTiling(80, 32)
    with torch.no_grad():
        ref, tiled = tiny.decode(z, num_frames=17), tiny.decode(z, num_frames=17, tiling=tiling)
        assert tiled.shape == ref.shape and not torch.equal(tiled, ref)
        assert (tiled - ref).norm() / ref.norm() < 0.2
        # sampled encode draws the same noise with or without tiles
        a = tiny.encode(x, generator=torch.Generator().manual_seed(0), tiling=tiling)
        b = tiny.encode(x, generator=torch.Generator().manual_seed(0))
        assert a.shape == b.shape and (a - b).norm() / b.norm() < 0.2


def test_tiling_arguments_are_checked():
    with pytest.raises(ValueError, match="overlap"):
        SpatialTiling(64, 64)
    with pytest.raises(ValueError, match="tile_size"):
        SpatialTiling(8, 0)
    with pytest.raises(ValueError, match="multiples"):
        tiled_decode(lambda t: t, torch.zeros(1, 4, 8, 8), SpatialTiling(60, 12))


# --------------------------------------------------------------------------------------------
# dtypes
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_file(tiny, tmp_path_factory):
    path = tmp_path_factory.mktemp("vae") / "model.safetensors"
    save_safetensors_atomic(tiny.state_dict(), path)
    return path


@pytest.mark.parametrize("dtype,tol", [(torch.bfloat16, 0.05), (torch.float16, 0.01)])
def test_half_precision_stays_close_to_float32(tiny, tiny_file, golden, dtype, tol):
    enc, dec = golden("vae_tiny_encode_f17"), golden("vae_tiny_decode_f17")
    model = VideoAutoencoder.from_pretrained(tiny_file, dtype=dtype)
    assert model.dtype == dtype
    # force_upcast: in float16 the spatial decoder keeps float32 weights
    upcast = dtype == torch.float16
    assert (model.spatial.decoder.conv_in.weight.dtype == torch.float32) == upcast
    assert model.spatial.encoder.conv_in.weight.dtype == dtype
    with torch.no_grad():
        z, x = model.encode(enc["in.x"], sample=False), model.decode(dec["in.z"], num_frames=17)
        zs = model.encode(enc["in.x"], generator=torch.Generator().manual_seed(0))
    assert z.dtype == x.dtype == zs.dtype == dtype and zs.isfinite().all()
    for got, want in ((z, enc["out.z_mode"]), (x, dec["out.x"])):
        assert (got.float() - want).norm() / want.norm() < tol


def test_half_cast_model_upcasts_its_spatial_decoder(tiny_file, golden):
    model = VideoAutoencoder.from_pretrained(tiny_file).half()  # the cast itself applies force_upcast
    assert model.spatial.decoder.conv_in.weight.dtype == torch.float32
    assert model.spatial.encoder.conv_in.weight.dtype == torch.float16
    dec = golden("vae_tiny_decode_f17")
    with torch.no_grad():
        x = model.decode(dec["in.z"], num_frames=17)
    assert model.spatial.decoder.conv_in.weight.dtype == torch.float32
    assert x.dtype == torch.float16 and (x.float() - dec["out.x"]).norm() / dec["out.x"].norm() < 0.01


# --------------------------------------------------------------------------------------------
# Bad input
# --------------------------------------------------------------------------------------------


def test_bad_video_is_rejected_clearly(tiny):
    with pytest.raises(ValueError, match=r"5D.*\[1, 3, 32, 32\].*unsqueeze"):
        tiny.encode(torch.zeros(1, 3, 32, 32))
    with pytest.raises(ValueError, match=r"4 channels.*expected 3"):
        tiny.encode(torch.zeros(1, 4, 1, 32, 32))
    with pytest.raises(ValueError, match="permute"):
        tiny.encode(torch.zeros(1, 1, 32, 32, 3))
    with pytest.raises(ValueError, match=r"uint8.*127\.5"):
        tiny.encode(torch.zeros(1, 3, 1, 32, 32, dtype=torch.uint8))
    with pytest.raises(ValueError, match="too small"):
        tiny.encode(torch.zeros(1, 3, 1, 4, 32))
    with pytest.raises(ValueError, match="either generator= or noise_fn="):
        tiny.encode(_video(1), generator=torch.Generator(), noise_fn=torch.zeros)
    with pytest.raises(ValueError, match=r"noise_fn returned.*\[1, 4, 4, 4\]"):
        tiny.encode(_video(1), noise_fn=lambda shape: torch.zeros(3))


def test_out_of_range_video_warns_but_encodes(tiny):
    with pytest.warns(UserWarning, match=r"255.*\[-1, 1\]|\[-1, 1\].*255"):
        z = tiny.encode(_video(1) * 127.5 + 127.5, sample=False)
    assert z.shape == (1, 4, 1, 4, 4)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tiny.encode(_video(1), sample=False)  # in range: silent


def test_bad_latent_is_rejected_clearly(tiny):
    z = torch.zeros(1, 4, 5, 4, 4)
    with pytest.raises(ValueError, match=r"latent has 5 frames.*num_frames=16 needs 4.*decodes to num_frames=17"):
        tiny.decode(z, num_frames=16)
    with pytest.raises(ValueError, match=r"latent has 6 frames.*num_frames=17 needs 5.*num_frames in 18\.\.21"):
        tiny.decode(torch.zeros(1, 4, 6, 4, 4), num_frames=17)
    with pytest.raises(ValueError, match=r"3 channels.*expected 4"):
        tiny.decode(torch.zeros(1, 3, 5, 4, 4), num_frames=17)
    with pytest.raises(ValueError, match="5D"):
        tiny.decode(torch.zeros(4, 5, 4, 4), num_frames=17)
    with pytest.raises(ValueError, match="positive int"):
        tiny.decode(z, num_frames=0)
