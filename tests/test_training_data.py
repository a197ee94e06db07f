"""Training data: the synthetic generator, CSV reading, the video-text dataset, collation."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import torch

from opensora_sdk.training import synthetic
from opensora_sdk.training.dataset import VideoTextDataset, collate_samples, read_table
from opensora_sdk.video_io import read_image, read_video, temporal_crop_indices, write_video


def read_rows(path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> Path:
    """Eight 32x32 clips of 20 frames plus a few PNG stills, and their CSV."""
    out = tmp_path_factory.mktemp("shapes")
    return synthetic.generate_dataset(out, 8, size=32, num_frames=20, seed=3, image_fraction=0.25)


def write_table(path: Path, rows: list[dict]) -> Path:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


# --------------------------------------------------------------------------------------------
# Synthetic generator
# --------------------------------------------------------------------------------------------


def test_synthetic_files_decode_and_captions_match_attributes(shapes):
    rows = read_rows(shapes)
    assert list(rows[0]) == list(synthetic.CSV_COLUMNS)
    assert any(r["num_frames"] == "1" for r in rows) and any(r["num_frames"] == "20" for r in rows)
    for row in rows:
        path = shapes.parent / row["path"]
        n = int(row["num_frames"])
        frames = read_video(path)[0] if n > 1 else read_image(path)[None]
        assert frames.shape == (n, 32, 32, 3)
        if row["direction"] == "none":
            expected = f"a still {row['color']} {row['shape']} on a {row['background']} background"
        else:
            expected = f"a {row['color']} {row['shape']} moving {row['direction']} on a {row['background']} background"
        assert row["text"] == expected
        assert row["color"] != row["background"]
        assert row["camera"] in ("static", *synthetic.CAMERAS)
        assert float(row["flow"]) >= 0 and 4.5 <= float(row["aes"]) <= 6.5


def centroid(frame: np.ndarray, rgb) -> np.ndarray:
    close = np.abs(frame.astype(int) - np.asarray(rgb)).sum(-1) < 40
    ys, xs = np.nonzero(close)
    return np.array([xs.mean(), ys.mean()])


@pytest.mark.parametrize("direction, axis, sign", [("left", 0, -1), ("right", 0, 1), ("up", 1, -1), ("down", 1, 1)])
def test_synthetic_shape_moves_in_its_direction(direction, axis, sign):
    spec = synthetic.ClipSpec("square", "red", "black", direction, 1.0, "static", 0.0, 24.0, 24.0, 7.0, 8)
    frames = synthetic.render_clip(spec, 48, 48, 10)
    shift = centroid(frames[-1], synthetic.COLORS["red"]) - centroid(frames[0], synthetic.COLORS["red"])
    assert shift[axis] * sign == pytest.approx(9.0, abs=0.5)
    assert abs(shift[1 - axis]) < 0.5


def test_synthetic_camera_pan_moves_the_scene_the_other_way():
    still = synthetic.ClipSpec("circle", "yellow", "blue", "none", 0.0, "pan left", 1.0, 20.0, 24.0, 6.0, 8)
    frames = synthetic.render_clip(still, 48, 48, 6)
    shift = centroid(frames[-1], synthetic.COLORS["yellow"]) - centroid(frames[0], synthetic.COLORS["yellow"])
    assert shift[0] == pytest.approx(5.0, abs=0.5)  # camera pans left: the scene moves right
    grid0, grid5 = frames[0][30], frames[5][30]  # a row without the shape: the grid shifts too
    assert not np.array_equal(grid0, grid5) and np.array_equal(np.roll(grid0, 5, axis=0), grid5)


def test_synthetic_is_deterministic_by_seed(tmp_path):
    a = read_rows(synthetic.generate_dataset(tmp_path / "a", 4, size=16, num_frames=4, seed=7))
    b = read_rows(synthetic.generate_dataset(tmp_path / "b", 4, size=16, num_frames=4, seed=7))
    c = read_rows(synthetic.generate_dataset(tmp_path / "c", 4, size=16, num_frames=4, seed=8))
    assert a == b and a != c


def test_synthetic_cli(tmp_path):
    synthetic.main(["--out", str(tmp_path), "--num", "2", "--size", "16x32", "--frames", "3"])
    rows = read_rows(tmp_path / "data.csv")
    assert [(r["height"], r["width"], r["num_frames"]) for r in rows] == [("16", "32", "3")] * 2
    with pytest.raises(ValueError, match="size"):
        synthetic.generate_dataset(tmp_path, 1, size=15)


# --------------------------------------------------------------------------------------------
# Reading the table
# --------------------------------------------------------------------------------------------


def test_missing_required_columns_is_a_clear_error(tmp_path):
    path = write_table(tmp_path / "bad.csv", [{"path": "a.mp4", "text": "x", "num_frames": 3, "height": 32}])
    with pytest.raises(ValueError, match=r"lacks the required column\(s\) \['width'\]"):
        VideoTextDataset(path)


def test_bad_size_value_names_row_and_column(tmp_path):
    path = write_table(tmp_path / "bad.csv", [{"path": "a.mp4", "text": "x", "num_frames": "many", "height": 32, "width": 32}])
    with pytest.raises(ValueError, match=r"row 2: num_frames='many'"):
        VideoTextDataset(path)


def test_parquet_needs_pandas(tmp_path):
    try:
        import pandas  # noqa: F401
        import pyarrow  # noqa: F401
    except ImportError:  # pandas alone (a dependency of gradio) cannot read parquet either
        (tmp_path / "d.parquet").write_bytes(b"PAR1")
        with pytest.raises(ImportError, match="pandas and pyarrow"):
            read_table(tmp_path / "d.parquet")
    else:
        frame = pandas.DataFrame([{"path": "a.mp4", "text": "t", "num_frames": 3, "height": 8, "width": 8}])
        frame.to_parquet(tmp_path / "d.parquet")
        assert read_table(tmp_path / "d.parquet")[0]["text"] == "t"


# --------------------------------------------------------------------------------------------
# Samples
# --------------------------------------------------------------------------------------------


def test_video_sample_shape_fps_and_deterministic_crop(shapes):
    data = VideoTextDataset(shapes, frame_interval=2, seed=5)
    i = next(k for k, r in enumerate(data.rows) if r["num_frames"] == "20")
    a = data[f"{i}-4-16-24"]
    assert a["video"].shape == (3, 4, 16, 24) and a["video"].dtype == torch.float32
    assert (a["num_frames"], a["height"], a["width"], a["ar"]) == (4, 16, 24, 16 / 24)
    assert a["fps"] == 12.0  # floor(24 / frame_interval)
    assert float(a["video"].abs().max()) <= 1.0
    assert torch.equal(a["video"], data[f"{i}-4-16-24"]["video"])  # same seed, epoch, row
    frames, _ = read_video(data.path(i))
    expected = temporal_crop_indices(20, 4, 2, rng=np.random.default_rng([5, 0, i]))
    from opensora_sdk.video_io import resize_crop

    assert torch.equal(a["video"], resize_crop(frames[expected], 16, 24))


def test_image_is_a_one_frame_video_at_120_fps(shapes):
    data = VideoTextDataset(shapes)
    i = next(k for k, r in enumerate(data.rows) if r["num_frames"] == "1")
    sample = data[f"{i}-1-32-32"]
    assert sample["video"].shape == (3, 1, 32, 32)
    assert sample["fps"] == 120.0 and sample["num_frames"] == 1


def test_corrupt_and_missing_files_are_skipped_and_counted(shapes, tmp_path, caplog):
    rows = read_rows(shapes)
    good = [r for r in rows if r["num_frames"] == "20"]
    (tmp_path / "corrupt.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42" + bytes(range(256)) * 8)
    bad = dict(good[0], path=str(tmp_path / "corrupt.mp4"))
    missing = dict(good[0], path=str(tmp_path / "gone.mp4"))
    fine = dict(good[1], path=str(shapes.parent / good[1]["path"]))
    path = write_table(tmp_path / "mixed.csv", [bad, missing, fine])
    data = VideoTextDataset(path)
    sample = data["0-8-32-32"]  # rows 0 and 1 fail, row 2 takes their place
    assert sample["index"] == 2 and sample["video"].shape == (3, 8, 32, 32)
    assert sample["skipped"] == [str(tmp_path / "corrupt.mp4"), str(tmp_path / "gone.mp4")]
    assert sum(data.skipped.values()) == 2
    assert "skipping unreadable row 0" in caplog.text and "skipping unreadable row 1" in caplog.text
    batch = collate_samples([sample, data["2-8-32-32"]])
    assert batch["video"].shape == (2, 3, 8, 32, 32) and len(batch["skipped"]) == 2


def test_all_rows_unreadable_raises(tmp_path):
    path = write_table(tmp_path / "gone.csv", [{"path": f"missing{i}.mp4", "text": "x", "num_frames": 9, "height": 8, "width": 8} for i in range(3)])
    data = VideoTextDataset(path, max_substitutes=2)
    with pytest.raises(RuntimeError, match="3 consecutive rows"):
        data["0-4-8-8"]


def test_score_suffixes_from_columns(shapes):
    columns = {"aes": "aes", "flow": "flow", "camera_motion": "camera"}
    data = VideoTextDataset(shapes, score_columns=columns)
    row = data.rows[0]
    text = data.caption(0)
    tail = f" aesthetic score: {float(row['aes']):.1f}. motion score: {float(row['flow']):.1f}. camera motion: {row['camera']}."
    assert text == row["text"] + tail
    official = VideoTextDataset(shapes, score_columns={"aes": "aes", "flow": "flow"}, score_format="datautil")
    assert official.caption(0) == f"{row['text']} [aesthetic score: {float(row['aes']):.1f}, motion score: {float(row['flow']):.1f}]"
    dropped = VideoTextDataset(shapes, score_columns=columns, score_drop_prob=1.0)
    assert dropped.caption(0) == row["text"]
    assert VideoTextDataset(shapes).caption(0) == row["text"]  # default: verbatim, as officially


def test_score_column_errors(shapes, tmp_path):
    with pytest.raises(ValueError, match="no such column"):
        VideoTextDataset(shapes, score_columns={"aes": "beauty"})
    with pytest.raises(ValueError, match="kind 'beauty' is not allowed"):
        VideoTextDataset(shapes, score_columns={"beauty": "aes"})
    rows = [dict(r, camera="spin") for r in read_rows(shapes)]
    for r in rows:
        r["path"] = str(shapes.parent / r["path"])
    path = write_table(tmp_path / "cam.csv", rows)
    with pytest.raises(ValueError, match=r"row 2, column 'camera'.*'spin'"):
        VideoTextDataset(path, score_columns={"camera_motion": "camera"})


def test_relative_paths_resolve_against_the_csv_folder(tmp_path):
    (tmp_path / "clips").mkdir()
    write_video(np.zeros((3, 16, 16, 3), np.uint8), tmp_path / "clips" / "a.mp4", fps=8)
    path = write_table(tmp_path / "rel.csv", [{"path": "clips/a.mp4", "text": "t", "num_frames": 3, "height": 16, "width": 16}])
    assert VideoTextDataset(path)["0-2-16-16"]["fps"] == 8.0


def test_a_row_may_name_its_frame_mask(shapes, tmp_path):
    """The optional frame_mask column: checked when the dataset is built (row and column named),
    carried by every sample and gathered by collate_samples as a list."""
    rows = read_rows(shapes)
    for r in rows:
        r["path"] = str(shapes.parent / r["path"])
    rows[0]["frame_mask"] = "chunk_head"
    for r in rows[1:]:
        r["frame_mask"] = ""
    data = VideoTextDataset(write_table(tmp_path / "fm.csv", rows))
    video_rows = [i for i in range(len(rows)) if not data.is_image(i)]
    assert data.frame_masks[0] == "chunk_head" and not any(data.frame_masks[1:])
    batch = collate_samples([data[f"{i}-4-32-32"] for i in video_rows[:2]])
    assert batch["frame_mask"] == [data.frame_masks[i] for i in video_rows[:2]]
    assert VideoTextDataset(shapes)[f"{video_rows[0]}-4-32-32"]["frame_mask"] == ""  # no column: drawn
    rows[2]["frame_mask"] = "half"
    with pytest.raises(ValueError, match=r"row 4, column 'frame_mask': mask type 'half' is unknown"):
        VideoTextDataset(write_table(tmp_path / "bad.csv", rows))


def test_scene_frames_make_a_clip_the_head_of_a_longer_scene():
    """SyntheticStyle.scene_frames: the travel is spread over the scene (a clip of 17 frames
    moves 16/50 as fast as when it is its own scene of 17), and the shape stays inside the
    frame for all the scene's frames."""
    short = synthetic.sample_clip(np.random.default_rng(5), 64, 64, 17, static_fraction=0.0, camera_fraction=0.0)
    style = synthetic.SyntheticStyle(scene_frames=51)
    head = synthetic.sample_clip(np.random.default_rng(5), 64, 64, 17, static_fraction=0.0, camera_fraction=0.0, style=style)
    assert head.direction == short.direction and head.speed == pytest.approx(short.speed * 16 / 50)
    scene = synthetic.render_clip(head, 64, 64, 51)
    assert np.array_equal(synthetic.render_clip(head, 64, 64, 17), scene[:17])
    dx, dy = synthetic._UNIT[head.direction]
    for i in (0, 50):  # the centre at both ends of the scene keeps the whole shape inside
        cx, cy = head.x + dx * head.speed * i, head.y + dy * head.speed * i
        assert head.radius < cx < 64 - head.radius and head.radius < cy < 64 - head.radius
    with pytest.raises(ValueError, match="scene_frames=1 is not allowed"):
        synthetic.SyntheticStyle(scene_frames=1)


def test_windows_write_parts_of_each_scene_as_rows(tmp_path):
    """generate_dataset(windows=...): each video scene gives one row per window (frames cut from
    the rendered scene, a PNG for a one-frame window) with its frame_mask; still rows stay."""
    W = synthetic.Window
    windows = [W("head", 0, 5), W("tail", 6, 5, "chunk_head"), W("still", (0, 5), 1)]
    whole = read_rows(synthetic.generate_dataset(tmp_path / "whole", 4, size=16, num_frames=11, seed=11, crf=0,
                                                 image_fraction=0.25))  # fmt: skip
    cut_csv = synthetic.generate_dataset(tmp_path / "cut", 4, size=16, num_frames=11, seed=11, crf=0,
                                         image_fraction=0.25, windows=windows)  # fmt: skip
    cut = read_rows(cut_csv)
    videos = [r for r in whole if r["path"].endswith(".mp4")]
    assert len(cut) == 3 * len(videos) + (len(whole) - len(videos)) and 0 < len(videos) < len(whole)
    for r in videos:
        scene, _ = read_video(tmp_path / "whole" / r["path"])
        parts = {c["path"].split("/")[0]: c for c in cut if c["path"].endswith(Path(r["path"]).stem + Path(c["path"]).suffix)}
        assert {c["text"] for c in parts.values()} == {r["text"]}
        head, _ = read_video(tmp_path / "cut" / parts["head"]["path"])
        tail, _ = read_video(tmp_path / "cut" / parts["tail"]["path"])
        assert np.array_equal(head, scene[:5]) and np.array_equal(tail, scene[6:11])  # crf 0: lossless
        still = read_image(tmp_path / "cut" / parts["still"]["path"]).astype(np.int32)  # [H, W, 3]
        assert still.shape == (16, 16, 3) and float(parts["still"]["fps"]) == 120.0
        error = [np.abs(scene[k].astype(np.int32) - still).mean() for k in range(11)]  # mp4 chroma is subsampled
        assert min(error[:5]) < 10 and (r["direction"] == "none" or min(error[:5]) < min(error[6:]))  # one of 0..4
        assert [parts[k]["frame_mask"] for k in ("head", "tail", "still")] == ["", "chunk_head", ""]
        assert [int(parts[k]["num_frames"]) for k in ("head", "tail", "still")] == [5, 5, 1]
    data = VideoTextDataset(cut_csv)  # the dataset reads the frame_mask column
    assert sorted(set(data.frame_masks)) == ["", "chunk_head"]
    with pytest.raises(ValueError, match="start \\+ num_frames <= the 11 frames"):
        synthetic.generate_dataset(tmp_path / "bad", 1, size=16, num_frames=11, windows=[W("tail", 8, 5)])
    with pytest.raises(ValueError, match="mask type 'half' is unknown"):
        synthetic.generate_dataset(tmp_path / "bad", 1, size=16, num_frames=11, windows=[W("tail", 0, 5, "half")])
