"""Open-Sora 1.1 and 1.0 through the one generation path: tiny random-weight checkpoints written
in the official formats (the v1.1 Hugging Face folder, the v1.0 .pth, a diffusers SD VAE folder,
a T5 folder), recognised without a flag by the SDK and the CLI, with their families' numerics
(IDDPM, per-frame VAE, frame interval) and clear errors for what a family cannot do."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from opensora_sdk import cli
from opensora_sdk.pipeline import OpenSoraPipeline

COMMON = dict(num_steps=3, seed=5, progress=False)


@pytest.fixture(scope="module")
def v11():
    return OpenSoraPipeline.from_preset("tiny-random-v1.1", device="cpu", progress=False)


@pytest.fixture(scope="module")
def v10():
    return OpenSoraPipeline.from_preset("tiny-random-v1.0", device="cpu", progress=False)


@pytest.fixture(scope="module")
def official_files(v11, v10, tmp_path_factory):
    """The tiny models as a user downloads the released ones: a v1.1 HF folder, a v1.0 .pth,
    the SD VAE as a diffusers folder and T5 as a transformers folder."""
    root = tmp_path_factory.mktemp("official")
    v11.transformer.save_pretrained(root / "stdit2")
    # the official .pth is a plain state dict; a tiny architecture's head count cannot be read
    # from the shapes, so its config.json sits beside it (the released sizes need none)
    v10.transformer.save_pretrained(root / "v10")
    (root / "v10" / "model.safetensors").unlink()
    torch.save(dict(v10.transformer.state_dict()), root / "v10" / "OpenSora-v1-tiny.pth")
    v11.vae.save_pretrained(root / "sd-vae")
    v11.text_encoder.model.save_pretrained(str(root / "t5"))
    v11.text_encoder.tokenizer.save_pretrained(str(root / "t5"))
    return root


def test_the_families_generate_with_their_own_numerics(v11, v10):
    video = v11("a red panda", **COMMON)
    assert v11.family.name == "v1.1" and video.frames.shape == (8, 64, 64, 3)
    assert video.fps == 8.0  # 24 fps fed to the model, saved at 24 / 3 (spec 9.1)
    plan = v11.plan("a red panda", num_steps=10)
    assert type(plan.scheduler).__name__ == "IDDPM" and plan.scheduler.table_dtype == torch.float32
    assert plan.timesteps[0] == 999 and plan.timesteps[-1] == 0 and len(plan.timesteps) == 10
    assert plan.samples[0].loop_prompts[0] == "a red panda"  # no aesthetic score suffix for v1.1
    assert v10.family.name == "v1.0" and v10.plan("a cat").scheduler.table_dtype == torch.float64
    assert v10("a cat", **COMMON).frames.shape == (4, 64, 64, 3)


def test_v11_conditioning_uses_video_frames_as_latent_frames(v11, monkeypatch):
    """The SD VAE has no temporal compression: a 3-frame clip is 3 latent frames, and the
    condition frames are kept through the IDDPM chain."""
    clip = torch.rand(3, 3, 64, 64, generator=torch.Generator().manual_seed(1)) * 2 - 1
    from opensora_sdk import VideoCondition

    kept = []
    video = v11("a boat", conditions=[VideoCondition(clip, length=3)], num_frames=8,
                callback=lambda i, n, latent, x0: kept.append(latent.clone()), **COMMON)
    assert video.num_frames == 8 and len(kept) == 3
    encoded = v11.vae.encode(clip[None], sample=False)
    assert encoded.shape == (1, 4, 3, 8, 8)
    # loops carry latent frames = video frames
    looped = v11("|0|a boat|1|a boat at night", num_frames=8, loop=2, condition_frame_length=2, **COMMON)
    assert looped.num_frames == 2 * 8 - 2


def test_v10_is_fixed_size_and_takes_no_references(v10):
    with pytest.raises(ValueError, match=r"this checkpoint generates 4x64x64 .* got 4x128x128"):
        v10.plan("a cat", height=128, width=128)
    with pytest.raises(ValueError, match="take no references"):
        v10.plan("a cat", reference_path="x.png")
    with pytest.raises(ValueError, match=r"loop=2 is not allowed"):
        v10.plan("a cat", loop=2)


def test_official_formats_load_and_the_cli_recognises_the_family(official_files, v11, v10, tmp_path, capsys):
    root = official_files
    config = json.loads((root / "stdit2" / "config.json").read_text())
    assert config["model_type"] == "stdit2"
    loaded = OpenSoraPipeline.from_pretrained(root / "stdit2", root / "sd-vae", root / "t5", device="cpu", progress=False)
    assert loaded.family.name == "v1.1" and type(loaded.vae).__name__ == "FrameAutoencoder"
    a, b = loaded("a cat", height=64, width=64, num_frames=8, **COMMON), v11("a cat", **COMMON)
    assert np.array_equal(a.frames, b.frames)
    # the CLI: no --preset, the family comes from the files
    args = ["generate", "--prompt", "a cat", "--model", str(root / "stdit2"), "--vae", str(root / "sd-vae"),
            "--text-encoder", str(root / "t5"), "--image-size", "64", "64", "--num-frames", "8",
            "--num-sampling-steps", "2", "--save-dir", str(tmp_path), "--quiet"]  # fmt: skip
    assert cli.main(args) == 0
    assert (tmp_path / "sample_0000.mp4").is_file()
    # v1.0 from a .pth: size and length come from the checkpoint
    args10 = ["generate", "--prompt", "a cat", "--model", str(root / "v10" / "OpenSora-v1-tiny.pth"), "--vae",
              str(root / "sd-vae"), "--text-encoder", str(root / "t5"), "--num-sampling-steps", "2",
              "--save-dir", str(tmp_path / "v10"), "--quiet"]  # fmt: skip
    assert cli.main(args10) == 0
    from opensora_sdk.video_io import read_video

    frames, fps = read_video(tmp_path / "v10" / "sample_0000.mp4")
    assert frames.shape == (4, 64, 64, 3) and fps == 8.0
    capsys.readouterr()
    # a named preset that contradicts the file, and a wrong size for v1.0: one clear line each
    assert cli.main(["info", "--prompt", "a cat", "--preset", "v1.2", "--model", str(root / "stdit2")]) == 2
    assert "is an Open-Sora v1.1 transformer but --preset v1.2" in capsys.readouterr().err
    assert cli.main(args10[:-1] + ["--image-size", "128", "128"]) == 2
    assert "this checkpoint generates 4x64x64" in capsys.readouterr().err


def test_a_pth_with_missing_keys_names_them(official_files, tmp_path):
    from opensora_sdk.loading import CheckpointError
    from opensora_sdk.models.auto import load_transformer

    state = torch.load(official_files / "v10" / "OpenSora-v1-tiny.pth", weights_only=True)
    del state["final_layer.linear.weight"]
    torch.save(state, tmp_path / "broken.pth")
    (tmp_path / "config.json").write_text((official_files / "v10" / "config.json").read_text())
    with pytest.raises(CheckpointError, match=r"broken.pth.*does not fit STDiT[\s\S]*missing[\s\S]*final_layer.linear.weight"):
        load_transformer(tmp_path / "broken.pth")


def test_dpm_solver_is_a_sampler_choice_for_v10_and_v11(v10, v11, tmp_path, capsys):
    """`sampler="dpm-solver"` runs the spec 5.4 solver through the one generation path: 20 model
    calls by default, the reference's [uncond; cond] order restored around the model (a
    negative prompt masks the unconditional half), no references; v1.2 refuses it."""
    from opensora_sdk.families import DPM_SOLVER
    from opensora_sdk.schedulers.dpm_solver import DPMSolver, sample_dpm_solver

    plan = v10.plan("a cat", sampler="dpm-solver", seed=1)
    assert plan.sampler == "dpm-solver" and plan.num_steps == 20 and len(plan.timesteps) == 20
    assert plan.timesteps[0] == pytest.approx(999.0) and "dpm-solver, 20 steps" in plan.summary()
    assert v10.plan("a cat", sampler="dpm-solver", num_steps=7).num_steps == 7
    assert v10.plan("a cat").sampler == "iddpm" and v10.plan("a cat").num_steps == 100
    calls = []
    video = v10("a cat", sampler="dpm-solver", num_steps=4, seed=3, progress=False,
                callback=lambda i, n, latent, x0: calls.append(n))
    assert video.frames.shape == (4, 64, 64, 3) and calls == [4] * 4
    assert not np.array_equal(video.frames, v10("a cat", num_steps=4, seed=3, progress=False).frames)

    # the adapter equals the solver called in the reference's order, with a model whose rows
    # depend on their text (so a wrong half order would show)
    g = torch.Generator().manual_seed(0)
    z, y, y_null = torch.randn(2, 4, 3, 4, 4, generator=g), torch.randn(2, 1, 5, 8, generator=g), torch.zeros(2, 1, 5, 8)
    w = torch.randn(8, generator=g)

    def model(x, t, *, y, mask, x_mask=None):  # eps = 0.3 x + text feature per row, learned-sigma channels
        eps = 0.3 * x + (y[:, 0] @ w).mean(-1)[:, None, None, None, None] * (1 + t[:, None, None, None, None] / 1000)
        return torch.cat([eps, eps], 1)

    solver = DPMSolver(num_sampling_steps=5)
    ours = DPM_SOLVER.sample(model, z, solver, size=(32, 32, 3), frame_mask=None, noise_sampler=None, y=y,
                             y_null=y_null, y_mask=None, guidance_scale=4.0, model_kwargs={}, callback=None)
    ref = sample_dpm_solver(model, z, solver, y=y, y_null=y_null, guidance_scale=4.0)
    assert torch.allclose(ours, ref, atol=1e-6, rtol=0) and not torch.allclose(ref, z)

    with pytest.raises(ValueError, match="sampler='dpm-solver' takes no references"):
        v11.plan("a boat", sampler="dpm-solver", reference_path="x.png")
    with pytest.raises(ValueError, match=r"sampler='dpm-solver' is not allowed for Open-Sora v1.2 models: expected one of 'rflow'"):
        OpenSoraPipeline.from_preset("tiny-random", device="cpu", progress=False).plan("a cat", sampler="dpm-solver")
    capsys.readouterr()
    assert cli.main(["generate", "--prompt", "a cat", "--preset", "tiny-random", "--sampler", "dpm-solver",
                     "--save-dir", str(tmp_path)]) == 2  # fmt: skip
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "sampler='dpm-solver' is not allowed for Open-Sora v1.2" in err[0]
    assert not list(tmp_path.iterdir())
