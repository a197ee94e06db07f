"""Video / image I/O: real files written and read back, references, crops, the Video type."""

from __future__ import annotations

import os
import random

import av
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from opensora_sdk import video_io
from opensora_sdk.video import Video
from opensora_sdk.video_io import (
    VideoReadError,
    check_writable,
    load_reference,
    read_image,
    read_metadata,
    read_video,
    resize_crop,
    temporal_crop_indices,
    write_video,
)


def moving_gradient(n=10, h=48, w=64) -> np.ndarray:
    """Smooth colour ramps that shift every frame (codec-friendly, frames all differ)."""
    yy, xx = np.mgrid[0:h, 0:w]
    frames = [
        np.stack([(xx * 3 + 9 * i) % 256, (yy * 4) % 256, np.full_like(xx, 40 + 10 * i)], -1)
        for i in range(n)
    ]
    return np.stack(frames).astype(np.uint8)


def listing(folder) -> list[str]:
    return sorted(os.listdir(folder))


# --------------------------------------------------------------------------------------------
# Round trips
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "suffix, fps, max_mae",
    [
        (".mp4", 24.0, 5.0),
        (".mp4", 24000 / 1001, 5.0),
        (".webm", 24.0, 5.0),
        (".gif", 24.0, 6.0),
        (".webp", 12.0, 5.0),
    ],
)
def test_round_trip_video_formats(tmp_path, suffix, fps, max_mae):
    frames = moving_gradient()
    path = Video(frames, fps).save(tmp_path / f"clip{suffix}")
    assert listing(tmp_path) == [f"clip{suffix}"]  # no temporary files left behind

    decoded, read_fps = read_video(path)
    assert decoded.dtype == np.uint8 and decoded.shape == frames.shape
    assert read_fps == pytest.approx(fps, rel=0.01)
    mae = np.abs(decoded.astype(np.float64) - frames).mean()
    assert mae < max_mae, f"{suffix}: mean abs error {mae:.2f}"


def test_png_is_lossless_single_frame(tmp_path):
    frames = moving_gradient(n=1, h=33, w=21)
    Video(frames).save(tmp_path / "still.png")
    assert np.array_equal(read_image(tmp_path / "still.png"), frames[0])
    decoded, fps = read_video(tmp_path / "still.png")
    assert np.array_equal(decoded, frames) and fps == video_io.IMG_FPS


@pytest.mark.parametrize("suffix", [".mp4", ".webm", ".gif", ".webp", ".png"])
def test_metadata_round_trip(tmp_path, suffix):
    workflow = '{"nodes": [{"id": 1, "type": "OpenSoraSampler"}], "note": "über ✓"}'
    metadata = {"workflow": workflow, "prompt": '{"1": {"inputs": {}}}', "title": "a cat"}
    frames = moving_gradient(n=1 if suffix == ".png" else 4)
    path = Video(frames, 8, metadata).save(tmp_path / f"m{suffix}")
    assert read_metadata(path) == metadata
    assert Video.from_file(path).metadata == metadata


def test_webm_metadata_keys_read_back_lower_case(tmp_path):
    path = write_video(moving_gradient(n=2), tmp_path / "k.webm", 8, metadata={"MyKey": "v"})
    assert read_metadata(path) == {"mykey": "v"}


def test_webp_metadata_uses_comfyui_exif_tags(tmp_path):
    path = write_video(moving_gradient(n=2), tmp_path / "c.webp", 8, metadata={"workflow": "{}", "prompt": "{}"})
    with Image.open(path) as image:
        exif = image.getexif()
        assert exif[0x0110] == "prompt:{}" and exif[0x010F] == "workflow:{}"
    with pytest.raises(ValueError, match="at most 4"):
        write_video(moving_gradient(n=2), tmp_path / "d.webp", 8, metadata={str(i): "x" for i in range(5)})


def test_metadata_values_must_be_strings(tmp_path):
    with pytest.raises(TypeError, match="json.dumps"):
        Video(moving_gradient(n=2)).save(tmp_path / "x.mp4", metadata={"workflow": {"a": 1}})
    with pytest.raises(ValueError, match="key 'a:b'"):
        Video(moving_gradient(n=2)).save(tmp_path / "x.mp4", metadata={"a:b": "1"})
    assert listing(tmp_path) == []


def test_odd_sizes(tmp_path):
    frames = moving_gradient(n=3, h=47, w=63)
    mp4, _ = read_video(write_video(frames, tmp_path / "odd.mp4", 24))
    assert mp4.shape == (3, 48, 64, 3)  # padded to even by repeating the last row / column
    assert np.abs(mp4[:, :47, :63].astype(float) - frames).mean() < 5
    assert np.abs(mp4[:, 47].astype(float) - mp4[:, 46]).mean() < 4
    assert np.abs(mp4[:, :, 63].astype(float) - mp4[:, :, 62]).mean() < 4
    webm, _ = read_video(write_video(frames, tmp_path / "odd.webm", 24))
    assert webm.shape == frames.shape  # VP9 stores odd sizes as they are


# --------------------------------------------------------------------------------------------
# Atomic writes and early errors
# --------------------------------------------------------------------------------------------


def test_failed_encode_leaves_no_file_and_keeps_old_one(tmp_path, monkeypatch):
    target = tmp_path / "out.mp4"
    target.write_bytes(b"previous result")
    real = av.VideoFrame.from_ndarray
    calls = []

    def failing(array, format):
        calls.append(1)
        if len(calls) == 5:  # mid-way: four frames are already in the temporary file
            raise RuntimeError("encoder exploded")
        return real(array, format=format)

    monkeypatch.setattr(av.VideoFrame, "from_ndarray", failing)
    with pytest.raises(RuntimeError, match="encoder exploded"):
        Video(moving_gradient(n=8)).save(target)
    assert listing(tmp_path) == ["out.mp4"]
    assert target.read_bytes() == b"previous result"


def test_failed_pillow_encode_leaves_no_file(tmp_path, monkeypatch):
    def failing(self, fp, *args, **kwargs):
        with open(fp, "wb") as handle:
            handle.write(b"GIF89a partial")
        raise OSError("disk full")

    monkeypatch.setattr(Image.Image, "save", failing)
    with pytest.raises(OSError, match="disk full"):
        Video(moving_gradient(n=3)).save(tmp_path / "anim.gif")
    assert listing(tmp_path) == []


def _no_encoding(monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("encoding started before the path was checked")

    monkeypatch.setattr(video_io, "_write_av", fail)
    monkeypatch.setattr(video_io, "_write_pillow", fail)


def test_missing_or_bad_folder_fails_before_encoding(tmp_path, monkeypatch):
    _no_encoding(monkeypatch)
    video = Video(moving_gradient(n=2))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        video.save(tmp_path / "missing" / "a.mp4")
    (tmp_path / "file").write_text("x")
    with pytest.raises(NotADirectoryError, match="is not a folder"):
        video.save(tmp_path / "file" / "a.mp4")
    (tmp_path / "dir.mp4").mkdir()
    with pytest.raises(IsADirectoryError):
        video.save(tmp_path / "dir.mp4")


def test_unwritable_folder(tmp_path, monkeypatch):
    _no_encoding(monkeypatch)

    def denied(path):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(video_io, "_new_temp_file", denied)
    with pytest.raises(PermissionError, match="is not writable"):
        Video(moving_gradient(n=2)).save(tmp_path / "a.mp4")


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="needs a non-root POSIX user")
def test_read_only_folder(tmp_path):
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o500)
    try:
        with pytest.raises(PermissionError, match="not writable"):
            check_writable(folder / "a.mp4")
    finally:
        folder.chmod(0o700)


def test_unknown_extension_and_png_frame_count(tmp_path, monkeypatch):
    _no_encoding(monkeypatch)
    with pytest.raises(ValueError, match=r"'\.avi' is not supported; use one of \.mp4, \.webm"):
        Video(moving_gradient(n=2)).save(tmp_path / "a.avi")
    with pytest.raises(ValueError, match=r"\.png holds one frame; use \.mp4"):
        Video(moving_gradient(n=2)).save(tmp_path / "a.png")
    with pytest.raises(ValueError, match="crf applies to .mp4 and .webm only"):
        Video(moving_gradient(n=2)).save(tmp_path / "a.gif", crf=20)
    with pytest.raises(ValueError, match=r"\[0, 51\], got 99"):
        Video(moving_gradient(n=2)).save(tmp_path / "a.mp4", crf=99)
    assert check_writable(tmp_path / "ok.MP4") == tmp_path / "ok.MP4"
    assert listing(tmp_path) == []


# --------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------


def test_missing_and_corrupt_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.mp4"):
        read_video(tmp_path / "nope.mp4")
    (tmp_path / "bad.mp4").write_bytes(os.urandom(2000))
    with pytest.raises(VideoReadError, match="bad.mp4"):
        read_video(tmp_path / "bad.mp4")
    Video(moving_gradient(n=1)).save(tmp_path / "ok.png")
    (tmp_path / "cut.png").write_bytes((tmp_path / "ok.png").read_bytes()[:60])
    with pytest.raises(VideoReadError, match="cut.png"):
        read_image(tmp_path / "cut.png")
    assert issubclass(VideoReadError, ValueError)


def test_frame_indices_and_max_frames(tmp_path):
    frames = np.stack([np.full((32, 32, 3), 20 * i, np.uint8) for i in range(8)])
    path = write_video(frames, tmp_path / "steps.mp4", 24, crf=0)
    picked, _ = read_video(path, frame_indices=[5, 0, 5, 7])
    assert np.abs(picked.mean(axis=(1, 2, 3)) - [100, 0, 100, 140]).max() < 2
    first, _ = read_video(path, max_frames=3)
    assert first.shape[0] == 3 and np.abs(first.mean(axis=(1, 2, 3)) - [0, 20, 40]).max() < 2
    with pytest.raises(ValueError, match="index 8 is out of range .* has 8 frames"):
        read_video(path, frame_indices=[8])
    with pytest.raises(ValueError, match="not both"):
        read_video(path, frame_indices=[0], max_frames=1)


def test_rotated_video_is_turned_upright(tmp_path):
    frame = np.zeros((32, 64, 3), np.uint8)
    frame[:8, :16] = 255  # white block, top-left
    path = str(tmp_path / "rot.mp4")
    with av.open(path, "w") as container:
        stream = container.add_stream("libx264", rate=24)
        stream.width, stream.height, stream.pix_fmt = 64, 32, "yuv420p"
        stream.set_display_rotation(90)  # display = frame turned 90 degrees counterclockwise
        for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
            container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    decoded, _ = read_video(path)
    assert decoded.shape == (1, 64, 32, 3)
    assert decoded[0, 52:, :6].mean() > 200 and decoded[0, :40].mean() < 30  # block now bottom-left


# --------------------------------------------------------------------------------------------
# Resize + crop, references
# --------------------------------------------------------------------------------------------


def column_ramp(h: int, w: int) -> np.ndarray:
    """Each pixel's value is 10 * its column index."""
    return np.repeat((np.arange(w) * 10).astype(np.uint8)[None, :, None], h, 0).repeat(3, 2)


@pytest.mark.parametrize("excess, video_left, image_left", [(1, 0, 0), (3, 1, 2), (4, 2, 2), (5, 2, 2)])
def test_crop_offsets_follow_each_official_path(excess, video_left, image_left):
    image = column_ramp(8, 8 + excess)  # height already matches: no scaling, only the crop
    for mode, left in (("bilinear", video_left), ("bicubic", image_left)):
        out = resize_crop(image, 8, 8, mode=mode)
        assert out.shape == (3, 1, 8, 8)
        expected = (torch.arange(left, left + 8) * 10 / 255.0 - 0.5) / 0.5
        torch.testing.assert_close(out[0, 0, 0], expected.float(), atol=1e-6, rtol=0)


def test_resize_crop_matches_reference_computations():
    frames = moving_gradient(n=3, h=30, w=40)
    out = resize_crop(frames, 64, 48, mode="bilinear")  # cover: scale 64/30 -> 64 x 85, crop width
    x = torch.from_numpy(frames).permute(0, 3, 1, 2).float() / 255.0
    x = F.interpolate(x, size=(64, 85), mode="bilinear", align_corners=False)[:, :, :, 18:66]
    torch.testing.assert_close(out, ((x - 0.5) / 0.5).permute(1, 0, 2, 3), atol=0, rtol=0)

    image = resize_crop(frames[0], 20, 20, mode="bicubic")  # cover: 20 x round(26.67) = 27
    pil = np.asarray(Image.fromarray(frames[0]).resize((27, 20), Image.Resampling.BICUBIC))[:, 4:24]
    expected = (torch.from_numpy(pil.copy()).permute(2, 0, 1).float() / 255 - 0.5) / 0.5
    torch.testing.assert_close(image[:, 0], expected, atol=0, rtol=0)
    with pytest.raises(ValueError, match="mode must be one of"):
        resize_crop(frames, 8, 8, mode="nearest")


def test_load_reference_sources(tmp_path):
    frames = moving_gradient(n=5, h=40, w=60)
    Video(frames[:1]).save(tmp_path / "ref.png")
    Video(frames).save(tmp_path / "ref.mp4")
    image_ref = load_reference(tmp_path / "ref.png", 32, 32)
    assert image_ref.shape == (3, 1, 32, 32)
    torch.testing.assert_close(image_ref, resize_crop(frames[0], 32, 32, mode="bicubic"))
    video_ref = load_reference(str(tmp_path / "ref.mp4"), 32, 48)
    assert video_ref.shape == (3, 5, 32, 48) and video_ref.min() >= -1 and video_ref.max() <= 1
    torch.testing.assert_close(load_reference(Video(frames), 16, 16), resize_crop(frames, 16, 16))
    small_image = resize_crop(frames[0], 16, 16, mode="bicubic")
    torch.testing.assert_close(load_reference(Image.fromarray(frames[0]), 16, 16), small_image)
    torch.testing.assert_close(load_reference(torch.from_numpy(frames[0]), 16, 16), small_image)
    with pytest.raises(ValueError, match="'.txt' is not supported"):
        load_reference(tmp_path / "notes.txt", 16, 16)


# --------------------------------------------------------------------------------------------
# Temporal crop
# --------------------------------------------------------------------------------------------


def test_temporal_crop_matches_official_formula():
    idx = temporal_crop_indices(100, 8, 3, random.Random(7))
    begin = random.Random(7).randint(0, 100 - 24 - 1)
    assert idx.tolist() == np.linspace(begin, begin + 23, 8).astype(int).tolist()
    assert idx.dtype == np.int64 and len(set(np.diff(idx))) <= 2


def test_temporal_crop_short_source_and_generators():
    assert temporal_crop_indices(5, 8, 2, np.random.default_rng(0)).tolist() == [0, 0, 1, 1, 2, 2, 3, 4]
    makers = (
        lambda: np.random.default_rng(3),
        lambda: np.random.RandomState(3),
        lambda: torch.Generator().manual_seed(3),
    )
    for make in makers:
        first = temporal_crop_indices(200, 16, 4, make())
        assert np.array_equal(first, temporal_crop_indices(200, 16, 4, make()))
        assert first[0] >= 0 and first[-1] < 200 and set(np.diff(first)) <= {4, 5}
    with pytest.raises(TypeError, match="rng must be"):
        temporal_crop_indices(10, 2, 1, rng=3)
    with pytest.raises(ValueError, match="frame_interval must be a positive integer, got 0"):
        temporal_crop_indices(10, 2, 0)


# --------------------------------------------------------------------------------------------
# The Video type
# --------------------------------------------------------------------------------------------


def test_from_tensor_uses_official_rounding():
    values = torch.tensor([-2.0, -1.0, -0.5, 0.0, 0.3, 0.999, 1.0, 3.0])
    x = values.view(1, 1, 1, 8).expand(3, 1, 1, 8)
    got = Video.from_tensor(x).frames[0, 0, :, 0]
    expected = ((values.clamp(-1, 1) + 1) / 2 * 255 + 0.5).clamp(0, 255).to(torch.uint8)
    assert got.tolist() == expected.tolist() == [0, 0, 64, 128, 166, 255, 255, 255]


def test_video_views_and_sizes():
    frames = moving_gradient(n=6, h=10, w=14)
    video = Video(torch.from_numpy(frames), fps=12, metadata={"a": "b"})
    assert (len(video), video.num_frames, video.height, video.width, video.duration) == (6, 6, 10, 14, 0.5)
    assert video.to_float().shape == (6, 10, 14, 3) and video.to_tensor().shape == (3, 6, 10, 14)
    assert np.array_equal(Video.from_tensor(video.to_tensor()[None]).frames, frames)
    assert np.array_equal(Video.from_images(video.to_float()).frames, frames)
    assert video[2].num_frames == 1 and video[2].default_suffix == ".png" and video.default_suffix == ".mp4"
    assert np.array_equal(video[-1].frames[0], frames[5]) and video[1:4].metadata == {"a": "b"}


def test_video_input_errors():
    with pytest.raises(ValueError, match="batch size 2"):
        Video.from_tensor(torch.zeros(2, 3, 1, 4, 4))
    pixels = torch.zeros(3, 1, 2, 2)
    pixels[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="1 NaN"):
        Video.from_tensor(pixels)
    with pytest.raises(TypeError, match="must be uint8"):
        Video(np.zeros((2, 4, 4, 3), np.float32))
    with pytest.raises(ValueError, match=r"\[N, H, W, 3\]"):
        Video(np.zeros((2, 4, 4, 4), np.uint8))
    with pytest.raises(ValueError, match="fps must be a positive finite number, got 0"):
        Video(np.zeros((1, 4, 4, 3), np.uint8), fps=0)


def test_the_same_frames_always_give_the_same_video(tmp_path):
    """Saving is deterministic: with x264's macroblock-tree rate control the same smooth frames
    gave a different mp4 in about half of the saves (decoded frames up to 48 levels apart). A
    WebM's bytes carry its muxing date, so its decoded frames are compared."""
    rng = np.random.default_rng(0)
    coarse = torch.from_numpy(rng.integers(0, 256, (34, 3, 8, 8)).astype(np.float32))
    smooth = torch.nn.functional.interpolate(coarse, size=(64, 64), mode="bicubic", align_corners=False)
    frames = smooth.clamp(0, 255).round().byte().permute(0, 2, 3, 1).contiguous().numpy()  # [34, 64, 64, 3]
    mp4 = set()
    for k in range(12):
        mp4.add((write_video(frames, tmp_path / f"{k}.mp4", fps=8)).read_bytes())
    assert len(mp4) == 1
    webm = {read_video(write_video(frames, tmp_path / f"{k}.webm", fps=8))[0].tobytes() for k in range(4)}
    assert len(webm) == 1
