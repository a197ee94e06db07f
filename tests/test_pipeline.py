"""OpenSoraPipeline end to end on the tiny-random preset (64x64, few steps, CPU)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from opensora_sdk import ImageCondition, OpenSoraPipeline, Video, VideoCondition
from opensora_sdk.sampling import SamplingInterrupted

SIZE = dict(height=64, width=64, num_steps=2, progress=False)


@pytest.fixture(scope="module")
def pipe():
    torch.set_num_threads(2)
    return OpenSoraPipeline.from_preset("tiny-random", seed=0, device="cpu")


def record(target, name, monkeypatch):
    """Wrap target.name so every call's result is appended to the returned list."""
    calls, original = [], getattr(target, name)

    def wrapper(*args, **kwargs):
        out = original(*args, **kwargs)
        calls.append(out)
        return out

    monkeypatch.setattr(target, name, wrapper)
    return calls


def final_latents(steps_per_loop):
    """A callback keeping the latent after the last step of every loop."""
    kept = []

    def callback(step, total, latent, denoised):
        if (step + 1) % steps_per_loop == 0:
            kept.append(latent.clone())

    return kept, callback


def image(seed, h=64, w=64):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(3, h, w, generator=g) * 2 - 1


# ---- text to video ------------------------------------------------------------------------------


def test_text_to_video_shape_fps_metadata(pipe):
    video = pipe("a red panda eating bamboo", num_frames=17, fps=12, seed=3, **SIZE)
    assert isinstance(video, Video)
    assert video.frames.shape == (17, 64, 64, 3) and video.frames.dtype == np.uint8
    assert video.fps == 12 and video.metadata["seed"] == "3"
    params = json.loads(video.metadata["opensora"])
    assert params["processed_prompts"] == ["a red panda eating bamboo aesthetic score: 6.5."]
    assert video.frames.std() > 1  # not a constant image
    assert pipe.text_encoder.is_offloaded  # T5 leaves after encoding


@pytest.mark.parametrize("frames, latent_t", [(1, 1), (8, 2), (20, 6)])
def test_frame_counts(pipe, frames, latent_t):
    plan = pipe.plan("a cat", num_frames=frames, height=64, width=64)
    assert plan.latent_size == (latent_t, 8, 8) and plan.model_fps == (120 if frames == 1 else 24)
    video = pipe("a cat", num_frames=frames, seed=0, **SIZE)
    assert video.num_frames == frames and video.default_suffix == (".png" if frames == 1 else ".mp4")


def test_sizes_from_table_and_explicit(pipe):
    plan = pipe.plan("a cat", resolution="144p", aspect_ratio="9:16", num_frames="2s")
    assert (plan.height, plan.width, plan.num_frames) == (144, 256, 51)
    assert plan.latent_size == (15, 18, 32) and plan.video_tokens == 15 * 9 * 16
    assert pipe.plan("a cat", resolution="240p", aspect_ratio="16:9").latent_size[1:] == (53, 30)
    with pytest.warns(UserWarning, match="rounded to 64x72"):
        plan = pipe.plan("a cat", height=60, width=70)
    assert (plan.height, plan.width) == (64, 72) and "rounded" in plan.notes[0]
    assert pipe("a cat", num_frames=5, seed=0, **{**SIZE, "width": 48}).frames.shape == (5, 64, 48, 3)


def test_a_size_away_from_the_models_native_size_is_noted():
    builtin = OpenSoraPipeline.from_preset(device="cpu", progress=False)
    assert builtin.plan("a cat").notes == [] and builtin.plan("a cat", height=64, width=64).notes == []
    with pytest.warns(UserWarning, match="makes 64x64 videos"):
        plan = builtin.plan("a cat", resolution="144p")
    assert plan.notes == ["this model makes 64x64 videos (its native size); at 144x256 they may not look right"]
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # v1.2-like models have no native size: no note
        assert OpenSoraPipeline.from_preset("tiny-random", device="cpu").plan("a cat", resolution="144p").notes == []


def test_short_clips_are_denoised(pipe):
    """2..16 frames: the official warp gives t = 0 (no denoising); the default must not."""
    plan = pipe.plan("a cat", num_frames=8, height=64, width=64, num_steps=4)
    assert all(t > 0 for t in plan.timesteps) and plan.timesteps[0] == 1000
    kept, callback = final_latents(4)
    pipe("a cat", num_frames=8, seed=5, callback=callback, **{**SIZE, "num_steps": 4})
    noise = torch.randn((1, 4, 2, 8, 8), generator=torch.Generator().manual_seed(5))
    assert (kept[0] - noise).abs().mean() > 0.1


def test_seed_reproducibility_and_random_seed(pipe):
    a = pipe("a cat", num_frames=5, seed=11, **SIZE)
    b = pipe("a cat", num_frames=5, seed=11, **SIZE)
    c = pipe("a cat", num_frames=5, seed=12, **SIZE)
    assert np.array_equal(a.frames, b.frames) and not np.array_equal(a.frames, c.frames)
    d = pipe("a cat", num_frames=5, seed=None, **SIZE)
    again = pipe("a cat", num_frames=5, seed=int(d.metadata["seed"]), **SIZE)
    assert np.array_equal(d.frames, again.frames)


def test_batch_of_prompts_uses_seed_plus_index(pipe):
    videos = pipe(["a cat", "a dog"], num_frames=5, seed=20, batch_size=2, **SIZE)
    assert [v.metadata["seed"] for v in videos] == ["20", "21"]
    alone = pipe("a dog", num_frames=5, seed=21, **SIZE)
    assert np.abs(videos[1].frames.astype(int) - alone.frames.astype(int)).max() <= 1


def test_negative_prompt_changes_the_output(pipe):
    plain = pipe("a cat", num_frames=5, seed=1, **SIZE)
    negative = pipe("a cat", num_frames=5, seed=1, negative_prompt="blurry, low quality", **SIZE)
    assert not np.array_equal(plain.frames, negative.frames)
    assert json.loads(negative.metadata["opensora"])["negative_prompt"] == "blurry, low quality"
    blank = pipe("a cat", num_frames=5, seed=1, negative_prompt="  ", **SIZE)  # white space: the null caption
    assert np.array_equal(plain.frames, blank.frames)


def test_guidance_one_runs_the_conditional_branch_only(pipe, monkeypatch):
    rows = []
    forward = pipe.transformer.forward
    monkeypatch.setattr(pipe.transformer, "forward", lambda x, *a, **k: rows.append(x.shape[0]) or forward(x, *a, **k))
    pipe(["a cat", "a dog"], num_frames=5, seed=1, batch_size=2, guidance_scale=1, **SIZE)
    pipe("a cat", num_frames=5, seed=1, **SIZE)
    assert rows == [2, 2, 2, 2]  # 2 prompts without guidance, then 1 prompt with it


def test_callback_counts_steps_and_interrupts_before_decoding(pipe, monkeypatch):
    seen = []
    pipe("a cat", num_frames=5, seed=0, callback=lambda *a: seen.append(a[:2]), **{**SIZE, "num_steps": 3})
    assert seen == [(0, 3), (1, 3), (2, 3)]
    decodes = record(pipe.vae, "decode", monkeypatch)
    with pytest.raises(SamplingInterrupted) as stop:
        pipe("a cat", num_frames=5, seed=0, callback=lambda step, *a: step < 1, **{**SIZE, "num_steps": 3})
    assert stop.value.step == 1 and stop.value.latent.shape == (1, 4, 2, 8, 8)
    assert decodes == []


# ---- conditioning -------------------------------------------------------------------------------


def test_image_to_video_keeps_the_reference_latent(pipe, monkeypatch):
    encodes = record(pipe.vae, "encode", monkeypatch)
    kept, callback = final_latents(2)
    video = pipe("a cat", conditions=[ImageCondition(image(1))], num_frames=17, seed=2, callback=callback, **SIZE)
    assert len(encodes) == 1 and encodes[0].shape == (1, 4, 1, 8, 8)
    assert torch.equal(kept[0][:, :, 0], encodes[0][:, :, 0])
    assert video.num_frames == 17


def test_image_to_video_first_frame_is_the_decoded_reference(pipe, monkeypatch):
    """Pixels: with random weights the temporal VAE's GroupNorm mixes all frames of a chunk, so
    this check uses a local stand-in VAE (8x8 average pool / nearest upsampling, latent j of a
    chunk <-> its pixel frames) to follow the reference from latent to decoded frame."""
    import torch.nn.functional as F

    def encode(x, sample=True, generator=None, **kw):  # [1, 3, F, H, W] -> [1, 4, T', h, w]
        T = pipe.vae.latent_size(x.shape[2], None, None)[0]
        idx = [min(j // 5 * 17 + 4 * (j % 5), x.shape[2] - 1) for j in range(T)]
        pooled = F.avg_pool2d(x[0, :, idx].transpose(0, 1), 8)  # [T', 3, h, w]
        return torch.cat([pooled, torch.zeros_like(pooled[:, :1])], 1).transpose(0, 1)[None]

    def decode(z, num_frames, **kw):  # [B, 4, T', h, w] -> [B, 3, N, H, W]
        idx = [n // 17 * 5 + -(-(n % 17) // 4) for n in range(num_frames)]
        frames = z[:, :3, idx]  # [B, 3, N, h, w]
        return F.interpolate(frames.flatten(1, 2), scale_factor=8, mode="nearest").unflatten(1, (3, num_frames))

    monkeypatch.setattr(pipe.vae, "encode", encode)
    monkeypatch.setattr(pipe.vae, "decode", decode)
    ref = image(1)
    video = pipe("a cat", conditions=[ImageCondition(ref)], num_frames=17, seed=2, **SIZE)
    expected = Video.from_tensor(decode(encode(ref[:, None][None]), 1)[0]).frames[0]
    assert np.abs(video.frames[0].astype(int) - expected.astype(int)).max() <= 1
    assert np.abs(video.frames[-1].astype(int) - expected.astype(int)).mean() > 10


def test_image_reference_forms_agree(pipe, tmp_path):
    """Typed condition, reference_path + mask_strategy, and inline JSON give the same video."""
    from PIL import Image

    path = tmp_path / "ref.png"
    Image.fromarray(((image(4).permute(1, 2, 0) + 1) * 127.5).byte().numpy()).save(path)
    typed = pipe("a cat", conditions=[ImageCondition(str(path))], num_frames=5, seed=3, **SIZE)
    listed = pipe("a cat", reference_path=str(path), mask_strategy="0", num_frames=5, seed=3, **SIZE)
    inline = pipe('a cat {"reference_path": "%s", "mask_strategy": "0"}' % path, num_frames=5, seed=3, **SIZE)
    assert np.array_equal(typed.frames, listed.frames) and np.array_equal(typed.frames, inline.frames)
    assert pipe.plan("a cat", reference_path=str(path), num_frames=5).samples[0].mask_strategy == "0"


def test_typed_and_string_references_resize_to_the_same_latents(pipe, tmp_path, monkeypatch):
    """A 5-frame 100x150 clip and an 80x120 image (non-trivial pixels, neither at the output
    size) conditioning a 64x64 video: given as files (the official string form) or as tensors
    (typed conditions, as ComfyUI passes them), the VAE sees the same pixels and the videos are
    identical; both go through the one official resize-crop."""
    from PIL import Image

    from opensora_sdk.video_io import read_video_pixels, resize_crop

    yy, xx = torch.meshgrid(torch.linspace(0, 1, 100), torch.linspace(0, 1, 150), indexing="ij")
    clip = torch.stack([(xx * (1 + f) * 255) % 256 for f in range(5)])  # [5, 100, 150] stripes moving
    clip = torch.stack([clip, (yy * 255).expand_as(clip), (clip + yy * 90) % 256], -1).byte().numpy()
    Video(clip, 8).save(tmp_path / "clip.mp4")
    pixels = (torch.rand(80, 120, 3, generator=torch.Generator().manual_seed(3)) * 255).byte().numpy()
    Image.fromarray(pixels).save(tmp_path / "image.png")
    encodes = []
    original = pipe.vae.encode

    def spy(x, *args, **kwargs):
        encodes.append(x.detach().clone())
        return original(x, *args, **kwargs)

    monkeypatch.setattr(pipe.vae, "encode", spy)
    common = dict(num_frames=17, seed=8, align=None, **SIZE)
    by_path = pipe("a cat", reference_path=f"{tmp_path / 'image.png'};{tmp_path / 'clip.mp4'}",
                   mask_strategy="0,0,0,0,1;0,1,0,1,2", **common)
    image_px = torch.from_numpy(pixels).permute(2, 0, 1).float() / 127.5 - 1  # [3, 80, 120]
    typed = pipe("a cat", conditions=[ImageCondition(image_px), VideoCondition(read_video_pixels(tmp_path / "clip.mp4"),
                 target_start=1, length=2)], **common)
    assert len(encodes) == 4 and encodes[0].shape == (1, 3, 1, 64, 64) and encodes[1].shape == (1, 3, 5, 64, 64)
    assert torch.equal(encodes[0], encodes[2]) and torch.equal(encodes[1], encodes[3])
    assert np.array_equal(by_path.frames, typed.frames)
    # the pixels are the official resize: PIL bicubic for the image, bilinear for the clip
    torch.testing.assert_close(encodes[0][0], resize_crop(pixels, 64, 64, mode="bicubic"), rtol=0, atol=0)
    assert float(encodes[1].std()) > 0.2  # not a constant clip


def test_t5_leaves_the_device_when_encoding_fails(pipe, monkeypatch):
    """The placement gives T5 back even when its forward raises (spy on its on_device block)."""
    te = pipe.text_encoder
    events = []
    original = te.on_device

    def spy(device, home="cpu"):
        events.append(("enter", str(device)))
        block = original(device, home)

        class Watched:
            def __enter__(self):
                return block.__enter__()

            def __exit__(self, *exc):
                out = block.__exit__(*exc)
                events.append(("exit", te.is_offloaded, exc[0].__name__ if exc[0] else None))
                return out

        return Watched()

    def broken(*args, **kwargs):
        raise RuntimeError("T5 ran out of memory")

    monkeypatch.setattr(te, "on_device", spy)
    monkeypatch.setattr(te.model, "forward", broken)
    with pytest.raises(RuntimeError, match="T5 ran out of memory"):
        pipe("a prompt never seen before", num_frames=5, seed=1, **SIZE)
    assert events == [("enter", "cpu"), ("exit", True, "RuntimeError")]


def test_first_and_last_frame(pipe, monkeypatch):
    encodes = record(pipe.vae, "encode", monkeypatch)
    kept, callback = final_latents(2)
    conds = [ImageCondition(image(5)), ImageCondition(image(6), frame=-1)]
    pipe("a cat", conditions=conds, num_frames=17, seed=4, align=None, callback=callback, **SIZE)
    assert torch.equal(kept[0][:, :, 0], encodes[0][:, :, 0])
    assert torch.equal(kept[0][:, :, 4], encodes[1][:, :, 0])
    # typed conditions are exact by default: frame -1 is the last latent frame whatever the clip length
    assert pipe.plan("a cat", conditions=conds, num_frames=17, height=64, width=64).align is None
    # with the official align=5 the last-frame image of a 5-latent clip snaps onto frame 0
    with pytest.warns(UserWarning, match=r"groups 0 and 1 both start at latent frame 0 of loop 0 after align=5"):
        plan = pipe.plan("a cat", conditions=conds, num_frames=17, height=64, width=64, align=5)
    assert any("both start at latent frame 0" in n for n in plan.notes)


def test_video_extension_and_editing(pipe, monkeypatch):
    clip = torch.rand(3, 34, 64, 64, generator=torch.Generator().manual_seed(7)) * 2 - 1
    encodes = record(pipe.vae, "encode", monkeypatch)
    kept, callback = final_latents(2)
    cond = VideoCondition(clip, ref_start=-5, target_start=0, length=5)
    pipe("a cat", conditions=[cond], num_frames=34, seed=5, callback=callback, **SIZE)
    assert encodes[0].shape == (1, 4, 10, 8, 8)
    assert torch.equal(kept[0][:, :, :5], encodes[0][:, :, 5:])
    assert not torch.equal(kept[0][:, :, 5:], encodes[0][:, :, :5])
    kept.clear()
    pipe("a cat", conditions=[VideoCondition(clip, edit_ratio=0.5)], num_frames=34, seed=5, callback=callback, **SIZE)
    edited = kept[0]
    assert edited.shape == encodes[1].shape and not torch.equal(edited, encodes[1])


def test_two_loops_are_one_continuous_video(pipe, monkeypatch):
    encodes = record(pipe.vae, "encode", monkeypatch)
    decodes = record(pipe.vae, "decode", monkeypatch)
    kept, callback = final_latents(2)
    prompt = "|0|a cat walks|1|a cat sleeps"
    video = pipe(prompt, num_frames=34, loop=2, seed=6, callback=callback, **SIZE)
    assert video.num_frames == 2 * 34 - 17
    carried = encodes[0]  # loop 0's clip, re-encoded: [1, 4, 10, 8, 8]
    assert carried.shape == (1, 4, 10, 8, 8)
    assert torch.equal(kept[1][:, :, :5], carried[:, :, 5:])  # loop 1 starts with loop 0's tail
    assert np.array_equal(video.frames[:34], Video.from_tensor(decodes[0][0]).frames)
    assert np.array_equal(video.frames[34:], Video.from_tensor(decodes[1][0, :, 17:]).frames)
    plan = pipe.plan(prompt, num_frames=34, loop=2)
    assert plan.samples[0].loop_prompts == ("a cat walks aesthetic score: 6.5.", "a cat sleeps aesthetic score: 6.5.")


# ---- bad input fails before any model runs --------------------------------------------------------


@pytest.fixture
def no_models(pipe, monkeypatch):
    def ran(*args, **kwargs):
        raise AssertionError("a model ran before the input was checked")

    monkeypatch.setattr(pipe.transformer, "forward", ran)
    monkeypatch.setattr(pipe.vae, "encode", ran)
    monkeypatch.setattr(pipe.vae, "decode", ran)
    monkeypatch.setattr(pipe.text_encoder, "encode", ran)
    return pipe


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(resolution="250p"), ValueError, r"resolution '250p' is not one of"),
        (dict(aspect_ratio="5:7"), ValueError, r"aspect_ratio '5:7' has no entry at resolution '240p'"),
        (dict(num_frames="32s"), ValueError, r"needs 240 latent frames; this model takes at most 120 per clip \(408"),
        (dict(num_frames=0), ValueError, r"num_frames 0 must be a positive integer"),
        (dict(reference_path="missing.png"), FileNotFoundError, r"reference_path\[0\]='missing.png': file not found"),
        (dict(conditions=[ImageCondition("gone.jpg")]), FileNotFoundError, r"conditions\[0\]='gone.jpg'"),
        (dict(camera_motion="spin"), ValueError, r"camera_motion='spin' is not allowed: choose one of"),
        (dict(prompt="   "), ValueError, r"prompt='   ' is empty"),
        (dict(loop=2, num_frames=40), ValueError, r"num_frames=40 with loop=2 .*allowed: 34, 51"),
        (dict(loop=2, num_frames=34, condition_frame_length=4), ValueError, r"multiple of 5"),
        (dict(mask_strategy="0,x"), ValueError, r"field ref_id must be an integer, got 'x'"),
        (dict(mask_strategy="0,0,0,30"), ValueError, r"ref_id=0 but the prompt has 0 reference"),
        (dict(seed=-1), ValueError, r"seed=-1 is not allowed"),
        (dict(prompt=["a", "b"], mask_strategy=["0"] * 3), ValueError, r"mask_strategy has 3 entries for 2 prompt"),
        (dict(guidance_scale=float("nan")), ValueError, r"guidance_scale=nan is not allowed"),
    ],
)
def test_bad_input_fails_before_model_work(no_models, kwargs, error, match):
    kwargs = {"prompt": "a cat", "num_frames": 17, **kwargs}
    with pytest.raises(error, match=match):
        no_models(**kwargs, progress=False)


def test_mask_strategy_target_outside_latent(no_models, tmp_path):
    from PIL import Image

    path = tmp_path / "a.png"
    Image.new("RGB", (64, 64)).save(path)
    with pytest.raises(ValueError, match=r"field target_start=30 is outside the 5 latent frames"):
        no_models("a cat", reference_path=str(path), mask_strategy="0,0,0,30", num_frames=17, progress=False)


# ---- construction -----------------------------------------------------------------------------------


def test_preset_is_deterministic_and_leaves_the_global_rng(pipe):
    state = torch.random.get_rng_state()
    other = OpenSoraPipeline.from_preset("tiny-random", seed=0, device="cpu")
    assert torch.equal(torch.random.get_rng_state(), state)
    for a, b in zip(pipe.transformer.state_dict().values(), other.transformer.state_dict().values()):
        assert torch.equal(a, b)
    assert pipe.sources["preset"] == "tiny-random"
    with pytest.raises(ValueError, match=r"preset='huge' is not known; choose one of"):
        OpenSoraPipeline.from_preset("huge")
    with pytest.raises(ValueError, match=r"offload='all' is not allowed"):
        OpenSoraPipeline.from_preset(offload="all", device="cpu")


def test_from_pretrained_round_trip_and_offload_option(pipe, tmp_path):
    pipe.transformer.save_pretrained(tmp_path / "stdit3")
    pipe.vae.save_pretrained(tmp_path / "vae")
    loaded = OpenSoraPipeline.from_pretrained(
        tmp_path / "stdit3", tmp_path / "vae", pipe.text_encoder, device="cpu", offload="model"
    )
    assert loaded.offload == "model" and loaded.sources["transformer"] == str(tmp_path / "stdit3")
    a = pipe("a cat", num_frames=5, seed=9, **SIZE)
    b = loaded("a cat", num_frames=5, seed=9, **SIZE)
    assert np.array_equal(a.frames, b.frames)


def test_t5_parameter_formula_matches_the_model(pipe):
    from opensora_sdk.estimates import T5_XXL_CONFIG, t5_encoder_parameters

    model = pipe.text_encoder.model
    counted = sum(p.numel() for p in model.parameters())
    assert t5_encoder_parameters(model.config.to_dict()) == counted
    assert abs(t5_encoder_parameters(T5_XXL_CONFIG) - 4.762e9) < 1e7
