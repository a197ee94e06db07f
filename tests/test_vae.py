"""The v1.2 video VAE: key layout, latent sizes, golden parity, loading and saving."""

import json

import pytest
import torch

from opensora_sdk.configs import VAE_PRESETS, preset
from opensora_sdk.loading import CheckpointError, load_tensors_into, save_safetensors_atomic
from opensora_sdk.models import AutoencoderKL, VideoAutoencoder
from opensora_sdk.models.vae import frames_for_latent_length, latent_size

TOL = 1e-4  # float32 parity with the official code (reference README)


def tiny_model(golden) -> VideoAutoencoder:
    with torch.device("meta"):
        model = VideoAutoencoder(preset("OpenSoraVAE_V1_2-tiny", VAE_PRESETS))
    report = load_tensors_into(model, golden("vae_tiny_weights").with_prefix("sd.").items())
    assert report.ok
    return model.eval()


@pytest.fixture(scope="module")
def tiny(golden):
    return tiny_model(golden)


def _recorded_noise(bundle):
    """noise_fn that hands out the bundle's draws in order and checks each requested shape."""
    draws = [bundle[k] for k in sorted(k for k in bundle.tensors if k.startswith("noise."))]
    asked = []

    def noise_fn(shape):
        noise = draws[len(asked)]
        assert tuple(noise.shape) == tuple(shape), f"draw {len(asked)}: asked {shape}, recorded {noise.shape}"
        asked.append(shape)
        return noise

    return noise_fn, asked, draws


# --------------------------------------------------------------------------------------------
# Layout and sizes
# --------------------------------------------------------------------------------------------


def test_full_size_state_dict_equals_schema(reference):
    schema = json.loads((reference / "vae-v1.2.schema.json").read_text())
    with torch.device("meta"):
        model = VideoAutoencoder()
    sd = model.state_dict()
    assert list(sd) == list(schema)  # keys and order
    assert {k: list(v.shape) for k, v in sd.items()} == {k: v["shape"] for k, v in schema.items()}
    assert sum(p.numel() for p in model.parameters()) == 393_341_007
    # every buffer is persistent, so a meta build + assign-load needs no re-initialisation
    assert {n for n, _ in model.named_buffers()} == {"scale", "shift"} <= set(sd)


def test_latent_size_matches_official_table(golden, reference):
    rows = json.loads((reference / "golden" / "latent_size.json").read_text())["rows"]
    with torch.device("meta"):
        model = VideoAutoencoder()
    assert len(rows) == 272
    for row in rows:
        n, h, w = row["input_size"]
        got = latent_size(n, h, w, micro_frame_size=row["micro_frame_size"])
        assert list(got) == row["latent_size"], row
        if row["micro_frame_size"] == 17:
            assert list(model.latent_size(n, h, w)) == row["latent_size"]


def test_frames_for_latent_length_inverts_latent_size():
    assert frames_for_latent_length(5) == (17, 17)
    assert frames_for_latent_length(6) == (18, 21)
    assert frames_for_latent_length(1) == (1, 4)
    assert frames_for_latent_length(3, micro_frame_size=None) == (9, 12)
    for t in range(1, 40):
        lo, hi = frames_for_latent_length(t)
        assert all(latent_size(n, None, None)[0] == t for n in range(lo, hi + 1))
        assert latent_size(lo - 1, None, None)[0] != t and latent_size(hi + 1, None, None)[0] != t


# --------------------------------------------------------------------------------------------
# Golden parity (float32, 1e-4)
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["vae_tiny_encode_f1", "vae_tiny_encode_f17"])
def test_encode_sampled_with_recorded_noise(tiny, golden, name):
    bundle = golden(name)
    noise_fn, asked, draws = _recorded_noise(bundle)
    with torch.no_grad():
        z = tiny.encode(bundle["in.x"], noise_fn=noise_fn)
    assert len(asked) == len(draws)  # every recorded draw used, in the official order
    torch.testing.assert_close(z, bundle["out.z"], atol=TOL, rtol=0)


@pytest.mark.parametrize("name,seed", [("vae_tiny_encode_f1", 3001), ("vae_tiny_encode_f17", 3017)])
def test_encode_generator_draws_in_official_order(tiny, golden, name, seed):
    # The official call was torch.manual_seed(seed); encode(x): a CPU generator with the same
    # seed must give the same draws, so the same sampled latent.
    bundle = golden(name)
    with torch.no_grad():
        z = tiny.encode(bundle["in.x"], generator=torch.Generator().manual_seed(seed))
        again = tiny.encode(bundle["in.x"], generator=torch.Generator().manual_seed(seed))
        other = tiny.encode(bundle["in.x"], generator=torch.Generator().manual_seed(seed + 1))
    torch.testing.assert_close(z, bundle["out.z"], atol=TOL, rtol=0)
    assert torch.equal(z, again) and not torch.allclose(z, other)


@pytest.mark.parametrize("name", ["vae_tiny_encode_f1", "vae_tiny_encode_f17"])
def test_encode_mode_and_spatial_latents(tiny, golden, name):
    bundle = golden(name)
    with torch.no_grad():
        z_mode = tiny.encode(bundle["in.x"], sample=False)
        zeros = tiny.encode(bundle["in.x"], noise_fn=torch.zeros)  # the golden's "draws replaced by zeros"
        x_z = tiny.encode_spatial(bundle["in.x"], sample=False)
    torch.testing.assert_close(z_mode, bundle["out.z_mode"], atol=TOL, rtol=0)
    torch.testing.assert_close(zeros, bundle["out.z_mode"], atol=TOL, rtol=0)
    torch.testing.assert_close(x_z, bundle["mid.x_z_mode"], atol=TOL, rtol=0)


@pytest.mark.parametrize("name,frames", [("vae_tiny_decode_f1", 1), ("vae_tiny_decode_f17", 17)])
def test_decode_matches_golden(tiny, golden, name, frames):
    bundle = golden(name)
    with torch.no_grad():
        x = tiny.decode(bundle["in.z"], num_frames=frames)
        x_z = tiny.decode_temporal(bundle["in.z"], num_frames=frames)
    assert x.shape == bundle["out.x"].shape
    torch.testing.assert_close(x, bundle["out.x"], atol=TOL, rtol=0)
    torch.testing.assert_close(x_z, bundle["mid.x_z"], atol=TOL, rtol=0)
    assert x.abs().max() > 1  # not clamped


def test_micro_batch_size_does_not_change_results(golden):
    bundle = golden("vae_tiny_decode_f17")
    results = []
    for mbs in (1, 3, None):
        model = tiny_model(golden)
        model.config.micro_batch_size = mbs
        with torch.no_grad():
            results.append(model.decode(bundle["in.z"], num_frames=17))
    for x in results:
        torch.testing.assert_close(x, bundle["out.x"], atol=TOL, rtol=0)


def test_whole_video_temporal_stage_without_micro_frames(golden):
    model = tiny_model(golden)
    model.config.micro_frame_size = None
    x = torch.rand(1, 3, 22, 16, 16) * 2 - 1
    with torch.no_grad():
        z = model.encode(x, sample=False)
        assert z.shape == (1, 4, 6, 2, 2)  # ceil(22 / 4), one chunk
        assert model.decode(z, num_frames=22).shape == (1, 3, 22, 16, 16)
        # up to 17 frames a single chunk is what micro_frame_size=17 computes too
        chunked = tiny_model(golden)
        short = x[:, :, :13]
        torch.testing.assert_close(model.encode(short, sample=False), chunked.encode(short, sample=False))


def test_encode_decode_long_video_in_chunks(tiny):
    x = torch.rand(2, 3, 40, 16, 24) * 2 - 1  # 17 + 17 + 6 frames
    with torch.no_grad():
        z = tiny.encode(x, sample=False)
        assert z.shape == (2, 4, 12, 2, 3)  # 5 + 5 + ceil(6 / 4)
        # chunks are independent: the second chunk's latents only see frames 17..33
        z_mid = tiny.encode(x[:, :, 17:34], sample=False)
        torch.testing.assert_close(z[:, :, 5:10], z_mid, atol=1e-5, rtol=0)
        out = tiny.decode(z, num_frames=40)
        assert out.shape == x.shape
        torch.testing.assert_close(out[:, :, 17:34], tiny.decode(z_mid, num_frames=17), atol=1e-5, rtol=0)


# --------------------------------------------------------------------------------------------
# Loading and saving
# --------------------------------------------------------------------------------------------


def _assert_same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


def test_save_pretrained_round_trip(tiny, tmp_path):
    tiny.save_pretrained(tmp_path / "vae")
    config = json.loads((tmp_path / "vae" / "config.json").read_text())
    assert config["model_type"] == "VideoAutoencoderPipeline" and config["vae_temporal"]["filters"] == 4
    loaded = VideoAutoencoder.from_pretrained(tmp_path / "vae")
    assert loaded.config == tiny.config
    _assert_same_weights(loaded, tiny)
    assert not any(p.requires_grad and p.is_meta for p in loaded.parameters())


def test_official_config_layout_and_hub_id(tiny, tmp_path, monkeypatch):
    folder = tmp_path / "OpenSora-VAE-v1.2"
    save_safetensors_atomic(tiny.state_dict(), folder / "model.safetensors")
    official = {  # the published config.json, with the tiny widths added
        "architectures": ["VideoAutoencoderPipeline"], "model_type": "VideoAutoencoderPipeline",
        "cal_loss": False, "freeze_vae_2d": False, "from_pretrained": None, "micro_frame_size": 17,
        "shift": [-0.1, 0.34, 0.27, 0.98], "scale": [3.85, 2.32, 2.33, 3.06], "torch_dtype": "float32",
        "vae_2d": {"type": "VideoAutoencoderKL", "from_pretrained": "PixArt-alpha/pixart_sigma_sdxlvae_T5_diffusers",
                   "subfolder": "vae", "micro_batch_size": 4,
                   "block_out_channels": [4, 8, 16, 16], "norm_num_groups": 2},
        "vae_temporal": {"type": "VAE_Temporal_SD", "from_pretrained": None, "filters": 4, "num_groups": 2},
    }
    (folder / "config.json").write_text(json.dumps(official))
    import opensora_sdk.loading as loading

    hub = {"hpcai-tech/OpenSora-VAE-v1.2": folder}
    monkeypatch.setattr(loading, "_download", lambda repo, *args: hub[repo])
    loaded = VideoAutoencoder.from_pretrained("hpcai-tech/OpenSora-VAE-v1.2", dtype=torch.bfloat16)
    assert loaded.config.micro_batch_size == 4 and loaded.config.vae_2d.norm_num_groups == 2
    assert loaded.dtype == torch.bfloat16 and loaded.scale.dtype == torch.bfloat16


def test_single_file_infers_the_preset(tiny, tmp_path):
    sd = tiny.state_dict()
    # DDP-prefixed keys, no config.json next to the file
    save_safetensors_atomic({f"module.{k}": v for k, v in sd.items()}, tmp_path / "vae.safetensors")
    loaded = VideoAutoencoder.from_pretrained(tmp_path / "vae.safetensors")
    assert loaded.config.vae_temporal.filters == 4
    _assert_same_weights(loaded, tiny)
    torch.save(sd, tmp_path / "vae.pth")
    _assert_same_weights(VideoAutoencoder.from_pretrained(tmp_path / "vae.pth"), tiny)


def test_strict_loading_reports_bad_checkpoints(tiny, tmp_path):
    sd = dict(tiny.state_dict())
    sd["extra.weight"] = torch.zeros(1)
    del sd["shift"]
    save_safetensors_atomic(sd, tmp_path / "bad.safetensors")
    with pytest.raises(CheckpointError, match="shift"):
        VideoAutoencoder.from_pretrained(tmp_path / "bad.safetensors", config=tiny.config)
    odd = {"temporal_vae.encoder.conv_in.conv.weight": torch.zeros(7, 4, 3, 3, 3)}
    save_safetensors_atomic(odd, tmp_path / "odd.safetensors")
    with pytest.raises(CheckpointError, match="config="):
        VideoAutoencoder.from_pretrained(tmp_path / "odd.safetensors")


def test_autoencoder_kl_diffusers_folder_with_legacy_attention_names(tiny, tmp_path):
    kl = tiny.spatial
    legacy = {}
    for k, v in kl.state_dict().items():
        for new, old in (("to_q", "query"), ("to_k", "key"), ("to_v", "value"), ("to_out.0", "proj_attn")):
            if f".attentions.0.{new}." in k:
                k, v = k.replace(new, old), v[:, :, None, None] if v.ndim == 2 else v  # old 1x1-conv shapes
        legacy[k] = v
    assert "encoder.mid_block.attentions.0.query.weight" in legacy
    save_safetensors_atomic(legacy, tmp_path / "diffusion_pytorch_model.safetensors")
    config = {"_class_name": "AutoencoderKL", "_diffusers_version": "0.20.0", "block_out_channels": [4, 8, 16, 16],
              "norm_num_groups": 2, "sample_size": 64, "scaling_factor": 0.18215, "latents_mean": None}
    (tmp_path / "config.json").write_text(json.dumps(config))
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # diffusers bookkeeping keys are not "unknown"
        loaded = AutoencoderKL.from_pretrained(tmp_path)
    _assert_same_weights(loaded, kl)
    loaded.save_pretrained(tmp_path / "again")
    _assert_same_weights(AutoencoderKL.from_pretrained(tmp_path / "again"), kl)


def test_autoencoder_kl_alone(tiny):
    kl = tiny.spatial
    x = torch.rand(2, 3, 36, 44) * 2 - 1  # not multiples of 8: floor(H/8) latents
    with torch.no_grad():
        posterior = kl.encode(x)
        assert posterior.mean.shape == (2, 4, 4, 5)
        a = posterior.sample(torch.Generator().manual_seed(0))
        b = posterior.sample(torch.Generator().manual_seed(0))
        assert torch.equal(a, b) and not torch.equal(a, posterior.mode())
        assert kl.decode(posterior.mode()).shape == (2, 3, 32, 40)
        assert kl(x).shape == (2, 3, 32, 40)
