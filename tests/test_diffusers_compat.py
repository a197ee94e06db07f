"""diffusers habits on OpenSoraPipeline: aliases give our results, outputs in diffusers' layouts."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from PIL import Image

from opensora_sdk import OpenSoraPipeline, Video, export_to_video
from opensora_sdk.diffusers_compat import VideoPipelineOutput
from opensora_sdk.video_io import read_metadata, read_video

STEPS = 2
SMALL = {"height": 32, "width": 32, "num_frames": 1}  # one frame: fast on a busy CPU
FAST = {**SMALL, "num_steps": STEPS}


@pytest.fixture(scope="module")
def pipe():
    torch.set_num_threads(2)
    return OpenSoraPipeline.from_preset(device="cpu", progress=False)


# ---- aliases ---------------------------------------------------------------------------------


def test_torch_dtype_is_dtype():
    p = OpenSoraPipeline.from_preset(device="cpu", progress=False, torch_dtype=torch.bfloat16)
    assert p.dtype == torch.bfloat16
    q = OpenSoraPipeline.from_pretrained(p.transformer, p.vae, p.text_encoder, device="cpu", torch_dtype=torch.float16)
    assert q.dtype == torch.float16


def test_num_inference_steps_is_num_steps(pipe):
    ours = pipe("a cat", num_steps=3, seed=1, **SMALL)
    theirs = pipe("a cat", num_inference_steps=3, seed=1, **SMALL)
    assert np.array_equal(ours.frames, theirs.frames)
    assert pipe.plan("a cat", num_steps=3).num_steps == 3
    with pytest.raises(ValueError, match="num_inference_steps is an alias"):
        pipe("a cat", num_steps=2, num_inference_steps=3)


def test_generator_seeds_like_seed(pipe):
    ours = pipe(["a cat", "a dog"], seed=7, **FAST)
    theirs = pipe(["a cat", "a dog"], generator=torch.Generator().manual_seed(7), **FAST)
    assert [v.metadata["seed"] for v in theirs] == ["7", "8"]  # one generator: seed + k
    for a, b in zip(ours, theirs):
        assert np.array_equal(a.frames, b.frames)
    # a list: video k takes generator k's initial_seed()
    gens = [torch.Generator().manual_seed(5), torch.Generator().manual_seed(11)]
    listed = pipe(["a cat", "a dog"], generator=gens, **FAST)
    assert [v.metadata["seed"] for v in listed] == ["5", "11"]
    assert np.array_equal(listed[1].frames, pipe("a dog", seed=11, **FAST).frames)
    assert gens[0].initial_seed() == 5  # read, not advanced


def test_generator_errors(pipe):
    with pytest.raises(ValueError, match="seed or generator, not both"):
        pipe("a cat", seed=1, generator=torch.Generator().manual_seed(1))
    with pytest.raises(ValueError, match="one per video"):
        pipe(["a", "b"], generator=[torch.Generator().manual_seed(1)], **FAST)
    with pytest.raises(TypeError, match="torch.Generator"):
        pipe("a", generator=[3], **FAST)


def test_num_videos_per_prompt_repeats_prompts(pipe):
    videos = pipe(["a cat", "a dog"], num_videos_per_prompt=2, seed=1, **FAST)
    assert [v.metadata["title"] for v in videos] == ["a cat", "a cat", "a dog", "a dog"]
    assert [v.metadata["seed"] for v in videos] == ["1", "2", "3", "4"]
    assert np.array_equal(videos[2].frames, pipe("a dog", seed=3, **FAST).frames)
    assert isinstance(pipe("a cat", num_videos_per_prompt=2, seed=1, **FAST), list)
    with pytest.raises(ValueError, match="num_videos_per_prompt"):
        pipe("a cat", num_videos_per_prompt=0)


# ---- output types ----------------------------------------------------------------------------


def test_default_output_is_our_video(pipe):
    assert isinstance(pipe("a cat", seed=0, **FAST), Video)


def test_output_types_layouts(pipe):
    kw = {"seed": 2, "num_steps": STEPS, "height": 32, "width": 48, "num_frames": 17}  # distinct F, H, W
    ours = pipe(["a cat", "a dog"], **kw)
    F, H, W = ours[0].num_frames, ours[0].height, ours[0].width

    out = pipe(["a cat", "a dog"], output_type="np", **kw)
    assert isinstance(out, VideoPipelineOutput)
    assert out.frames.shape == (2, F, H, W, 3) and out.frames.dtype == np.float32
    assert 0 <= out.frames.min() and out.frames.max() <= 1
    for k in range(2):
        assert np.array_equal(out.frames[k], ours[k].frames / np.float32(255))
        assert out.videos[k].fps == ours[k].fps and out.videos[k].metadata == ours[k].metadata

    pt = pipe(["a cat", "a dog"], output_type="pt", **kw).frames
    assert isinstance(pt, torch.Tensor) and pt.dtype == torch.float32 and pt.shape == (2, F, 3, H, W)
    assert torch.equal(pt.permute(0, 1, 3, 4, 2), torch.from_numpy(out.frames))

    pil = pipe(["a cat", "a dog"], output_type="pil", **kw).frames
    assert len(pil) == 2 and len(pil[1]) == F and isinstance(pil[1][0], Image.Image)
    assert pil[1][0].size == (W, H) and np.array_equal(np.asarray(pil[1][4]), ours[1].frames[4])

    one = pipe("a cat", output_type="np", **kw)  # a str prompt is still a batch of one
    assert one.frames.shape == (1, F, H, W, 3) and np.array_equal(one.frames[0], out.frames[0])

    with pytest.raises(ValueError, match="output_type='mp4'.*'np'"):
        pipe("a cat", output_type="mp4")


def test_latent_output_is_the_final_latent_undecoded(pipe):
    kept = []
    decoded = pipe(["a cat", "a dog"], seed=4, callback=lambda s, n, z, x0: kept.append(z.clone()), **FAST)
    out = pipe(["a cat", "a dog"], seed=4, output_type="latent", **FAST)
    plan = pipe.plan(["a cat", "a dog"], **FAST)
    assert out.videos is None
    assert tuple(out.frames.shape) == (2, *plan.latent_shape[1:])
    assert torch.equal(out.frames[:1], kept[STEPS - 1]) and torch.equal(out.frames[1:], kept[2 * STEPS - 1])
    again = Video.from_tensor(pipe.vae.decode(out.frames[:1], plan.num_frames), decoded[0].fps)
    assert np.array_equal(again.frames, decoded[0].frames)


def test_latent_output_of_a_long_video_is_the_last_loops(pipe):
    kw = {"seed": 6, "num_steps": STEPS, "height": 32, "width": 32, "num_frames": 34, "loop": 2}
    kept = []
    pipe("a cat", callback=lambda s, n, z, x0: kept.append(z.clone()), **kw)
    out = pipe("a cat", output_type="latent", **kw)
    assert len(kept) == 2 * STEPS and torch.equal(out.frames, kept[-1])


# ---- callback_on_step_end ---------------------------------------------------------------------


def test_callback_on_step_end_sees_every_step(pipe):
    seen, ours = [], []

    def on_step_end(p, step, timestep, kwargs):
        assert p is pipe and set(kwargs) == {"latents"}
        seen.append((step, float(timestep), kwargs["latents"].shape))
        return kwargs

    plain = pipe(["a cat", "a dog"], seed=3, num_steps=3, **SMALL)
    video = pipe(["a cat", "a dog"], seed=3, num_steps=3, **SMALL, callback_on_step_end=on_step_end,
                 callback=lambda step, total, z, x0: ours.append((step, total)))  # fmt: skip
    timesteps = pipe.plan("a cat", num_steps=3, **SMALL).timesteps
    assert [s for s, _, _ in seen] == [0, 1, 2, 0, 1, 2]  # per clip, as diffusers' loop index
    assert [t for _, t, _ in seen] == pytest.approx(list(timesteps) * 2)
    assert ours == [(i, 6) for i in range(6)]  # ours counts over the call, and still runs
    assert all(np.array_equal(a.frames, b.frames) for a, b in zip(plain, video))  # returned as is: no change


def test_callback_on_step_end_modification_takes_effect(pipe):
    def zero_last(p, step, timestep, kwargs):
        return {"latents": torch.zeros_like(kwargs["latents"])} if step == STEPS - 1 else {}

    zeroed = pipe("a cat", seed=5, output_type="latent", callback_on_step_end=zero_last, **FAST)
    assert not zeroed.frames.any()
    plain = pipe("a cat", seed=5, **FAST)
    changed = pipe("a cat", seed=5, callback_on_step_end=zero_last, **FAST)
    assert not np.array_equal(plain.frames, changed.frames)

    def scale_first(p, step, timestep, kwargs):  # a change mid-way carries through the next steps
        return {"latents": kwargs["latents"] * 2} if step == 0 else kwargs

    assert not np.array_equal(plain.frames, pipe("a cat", seed=5, callback_on_step_end=scale_first, **FAST).frames)


def test_callback_on_step_end_errors(pipe):
    with pytest.raises(ValueError, match=r"\['prompt_embeds'\].*allowed: \['latents'\]"):
        pipe("a cat", callback_on_step_end=lambda *a: {}, callback_on_step_end_tensor_inputs=["prompt_embeds"])
    with pytest.raises(ValueError, match="expected a tensor of shape"):
        pipe("a cat", callback_on_step_end=lambda p, i, t, kw: {"latents": torch.zeros(3)}, **FAST)


# ---- unknown arguments -----------------------------------------------------------------------


def test_unknown_keyword_names_itself_and_the_accepted_ones(pipe):
    with pytest.raises(TypeError) as err:
        pipe("a cat", num_inference_step=2)
    msg = str(err.value)
    assert "'num_inference_step'" in msg and "did you mean 'num_inference_steps'" in msg
    assert "num_steps" in msg and "generator" in msg and "output_type" in msg
    assert "plan" not in msg and "generation" not in msg
    with pytest.raises(TypeError, match="'return_dict'.*output_type"):
        pipe("a cat", return_dict=False)


# ---- export_to_video -------------------------------------------------------------------------


def smooth_frames(n=9, h=32, w=48) -> np.ndarray:
    """uint8 [n, h, w, 3] gradients that move: codecs keep them nearly exactly."""
    y, x = np.mgrid[0:h, 0:w]
    frames = [np.stack([(x * 4 + 8 * t) % 256, y * 6, np.full_like(x, 40 + 10 * t)], -1) for t in range(n)]
    return np.stack(frames).astype(np.uint8)


def assert_close_video(path, frames, fps):
    back, back_fps = read_video(path)
    assert back.shape == frames.shape and back_fps == pytest.approx(fps)
    assert np.abs(back.astype(float) - frames).mean() < 3


def test_export_to_video_round_trips(tmp_path):
    frames = smooth_frames()
    pil = [Image.fromarray(f) for f in frames]
    assert export_to_video(pil, str(tmp_path / "pil.mp4"), fps=8) == str(tmp_path / "pil.mp4")
    assert_close_video(tmp_path / "pil.mp4", frames, 8)

    export_to_video(list(frames.astype(np.float32) / 255), tmp_path / "float.mp4", fps=12)  # diffusers' np frames
    assert_close_video(tmp_path / "float.mp4", frames, 12)

    pt = torch.from_numpy(frames).permute(0, 3, 1, 2).float() / 255  # output_type="pt" layout [F, 3, H, W]
    export_to_video(pt, tmp_path / "pt.webm", fps=8)
    assert_close_video(tmp_path / "pt.webm", frames, 8)

    video = Video(frames, fps=6, metadata={"seed": "9"})
    export_to_video(video, tmp_path / "ours.mp4")  # fps: the Video's own
    assert_close_video(tmp_path / "ours.mp4", frames, 6)
    assert read_metadata(tmp_path / "ours.mp4")["seed"] == "9"

    path = export_to_video(frames)  # no path: a temporary .mp4, diffusers' fps 10
    try:
        assert path.endswith(".mp4")
        assert_close_video(path, frames, 10)
    finally:
        os.remove(path)


def test_export_to_video_from_pipeline_np_output(pipe, tmp_path):
    out = pipe("a cat", seed=1, output_type="np", **FAST)
    export_to_video(out.frames[0], tmp_path / "a.mp4", fps=8)
    back, _ = read_video(tmp_path / "a.mp4")
    assert back.shape == out.videos[0].frames.shape


def test_export_to_video_single_frame_trap(pipe):
    video = pipe("a cat", seed=1, **FAST)
    with pytest.raises(ValueError, match=r"single frame \[32, 32, 3\].*video\.frames.*output_type='np'"):
        export_to_video(video.frames[0], fps=8)
    with pytest.raises(ValueError, match="batch of 1 videos"):
        export_to_video(pipe("a cat", seed=1, output_type="np", **FAST).frames)
    with pytest.raises(TypeError, match="frames\\[0\\]"):
        export_to_video([video, video])
