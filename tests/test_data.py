"""The data tools (`opensora data ...`) on small real files made here: a two-scene mp4 (red, then
blue), an image, a corrupt file, textured clips that pan, tiny random-weight scoring models and a
local HTTP server standing in for the caption endpoint."""

from __future__ import annotations

import csv
import http.server
import json
import math
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from opensora_sdk.cli import main
from opensora_sdk.data import caption, csvtools, info, scenes, scoring, stats, table
from opensora_sdk.video_io import read_video, write_video

INFO_HEADER = ["path", "text", "num_frames", "height", "width", "aspect_ratio", "fps", "resolution", "duration"]
KEY = "sk-test-secret-0123456789"



@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    """One torch thread: on a shared 2-core machine two threads per process stall each other (10x)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)

def rows_of(path) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def header_of(path) -> list[str]:
    with open(path, newline="", encoding="utf-8") as f:
        return next(csv.reader(f))


def two_scene_frames(n: int = 24, h: int = 48, w: int = 64) -> np.ndarray:
    frames = []
    for color, start in (((200, 30, 30), 0), ((30, 30, 200), 40)):
        for i in range(n):
            f = np.zeros((h, w, 3), np.uint8) + np.array(color, np.uint8)
            f[10:20, abs(start - i) : abs(start - i) + 10] = 255
            frames.append(f)
    return np.stack(frames)


def texture(seed: int = 0, size=(200, 300)) -> np.ndarray:
    from PIL import Image, ImageFilter

    rng = np.random.default_rng(seed)
    noise = Image.fromarray((rng.random((*size, 3)) * 255).astype(np.uint8)).filter(ImageFilter.GaussianBlur(2))
    x = np.asarray(noise).astype(np.float32)
    return ((x - x.mean()) * 4 + 128).clip(0, 255).astype(np.uint8)


def pan_clip(big: np.ndarray, dx: int, dy: int, n: int = 31, h: int = 72, w: int = 128) -> np.ndarray:
    """The texture seen through a window moving (dx, dy) pixels every 2 frames."""
    return np.stack([big[40 + dy * (i // 2) : 40 + dy * (i // 2) + h, 40 + dx * (i // 2) : 40 + dx * (i // 2) + w] for i in range(n)])


@pytest.fixture(scope="module")
def raw(tmp_path_factory) -> Path:
    """raw/: two_scenes.mp4 (24 red + 24 blue frames at 12 fps), still.png, broken.mp4 (not a video)."""
    from PIL import Image

    folder = tmp_path_factory.mktemp("raw")
    write_video(two_scene_frames(), folder / "two_scenes.mp4", fps=12)
    Image.fromarray(np.full((40, 60, 3), (0, 180, 0), np.uint8)).save(folder / "still.png")
    (folder / "broken.mp4").write_bytes(b"this is not a video" * 20)
    return folder


@pytest.fixture(scope="module")
def motion_csv(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("motion")
    big = texture()
    write_video(pan_clip(big, 1, 0), folder / "pan.mp4", fps=8)  # the scene moves left: the camera pans right
    write_video(pan_clip(big, 0, 1), folder / "tilt.mp4", fps=8)  # the scene moves up: the camera tilts down
    write_video(pan_clip(big, 0, 0), folder / "still.mp4", fps=8)
    rows = [{"path": p, "text": f"clip {p}"} for p in ("pan.mp4", "tilt.mp4", "still.mp4", "missing.mp4")]
    return table.write_rows(rows, folder / "meta.csv")


# --------------------------------------------------------------------------------------------
# info
# --------------------------------------------------------------------------------------------


def test_info_scans_a_folder_into_the_training_columns_and_lists_unreadable_files(raw, tmp_path, capsys):
    result = info.scan(raw, tmp_path / "info.csv", progress=False)
    assert header_of(tmp_path / "info.csv") == INFO_HEADER
    rows = {Path(r["path"]).name: r for r in rows_of(tmp_path / "info.csv")}
    assert set(rows) == {"two_scenes.mp4", "still.png"} and result["rows"] == 2 and result["errors"] == 1
    video = rows["two_scenes.mp4"]
    assert (video["num_frames"], video["height"], video["width"], video["fps"]) == ("48", "48", "64", "12")
    assert float(video["aspect_ratio"]) == 0.75 and video["resolution"] == "3072" and float(video["duration"]) == 4.0
    image = rows["still.png"]
    assert (image["num_frames"], image["height"], image["width"], image["fps"]) == ("1", "40", "60", "")
    errors = rows_of(tmp_path / "info_errors.csv")
    assert [Path(e["path"]).name for e in errors] == ["broken.mp4"] and "Invalid data" in errors[0]["error"]
    assert "broken.mp4" in capsys.readouterr().err
    assert not table.parts_dir(tmp_path / "info.csv").exists()  # the journal is gone once the output is whole


def test_info_resumes_after_an_interruption_and_processes_give_the_same_result(raw, tmp_path, monkeypatch):
    calls = []
    real = info.safe_probe

    def crashing(path):
        if len(calls) == 1:
            raise KeyboardInterrupt
        calls.append(path)
        return real(path)

    monkeypatch.setattr(info, "safe_probe", crashing)
    with pytest.raises(KeyboardInterrupt):
        info.scan(raw, tmp_path / "a.csv", progress=False)
    assert not (tmp_path / "a.csv").exists() and len(table.read_journals(table.parts_dir(tmp_path / "a.csv"))) == 1
    monkeypatch.setattr(info, "safe_probe", lambda p: (calls.append(p), real(p))[1])
    info.scan(raw, tmp_path / "a.csv", progress=False)
    assert len(calls) == 3  # 1 before the interruption + the 2 left, none twice
    monkeypatch.undo()
    # the same through the CLI with two worker processes
    assert main(["data", "info", str(raw), "-o", str(tmp_path / "b.csv"), "--workers", "2", "--no-progress"]) == 0
    assert (tmp_path / "a.csv").read_text() == (tmp_path / "b.csv").read_text()


def test_info_of_a_missing_input_is_a_clear_error(tmp_path, capsys):
    assert main(["data", "info", str(tmp_path / "nowhere"), "--no-progress"]) == 2
    assert "no such folder or file" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------
# scenes + split
# --------------------------------------------------------------------------------------------


def test_scenes_then_split_cut_one_clip_per_shot(raw, tmp_path):
    pytest.importorskip("scenedetect")
    info.scan(raw, tmp_path / "info.csv", progress=False)
    result = scenes.detect(tmp_path / "info.csv", progress=False)
    assert result["output"] == tmp_path / "info_timestamp.csv"
    rows = rows_of(result["output"])
    assert [Path(r["path"]).name for r in rows] == ["two_scenes.mp4"]  # the image is listed, not cut
    assert rows[0]["timestamp"] == "[('00:00:00.000', '00:00:02.000'), ('00:00:02.000', '00:00:04.000')]"
    assert "an image" in rows_of(tmp_path / "info_timestamp_errors.csv")[0]["error"]

    rows.append({**rows[0], "path": str(raw / "two_scenes.mp4"), "timestamp": "not a list"})
    table.write_rows(rows, tmp_path / "ts.csv")
    result = scenes.split(tmp_path / "ts.csv", save_dir=tmp_path / "clips", min_seconds=1.0, max_seconds=1.5, progress=False)
    clips = rows_of(result["output"])
    assert header_of(result["output"]) == list(scenes.CLIP_COLUMNS)
    assert [Path(c["path"]).name for c in clips] == ["two_scenes_scene-0.mp4", "two_scenes_scene-1.mp4"]
    assert [(float(c["start"]), float(c["end"])) for c in clips] == [(0.0, 1.5), (2.0, 3.5)]  # cut to --max-seconds
    assert all(c["source"] == str(raw / "two_scenes.mp4") and c["num_frames"] == "18" for c in clips)
    red, _ = read_video(clips[0]["path"])
    blue, _ = read_video(clips[1]["path"])
    assert len(red) == 18 and red[..., 0].mean() > 150 > red[..., 2].mean()
    assert blue[..., 2].mean() > 150 > blue[..., 0].mean()
    assert "timestamp" in rows_of(tmp_path / "ts_clips_errors.csv")[0]["error"]


# --------------------------------------------------------------------------------------------
# scores: aesthetic (tiny random CLIP + head), motion, OCR
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_aesthetic(tmp_path_factory):
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    folder = tmp_path_factory.mktemp("aes")
    torch.manual_seed(0)
    cfg = CLIPVisionConfig(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4, image_size=32,
                           patch_size=8, projection_dim=16)  # fmt: skip
    CLIPVisionModelWithProjection(cfg).save_pretrained(folder / "clip")
    sizes = [16, 32, 8, 4, 3, 1]
    state = {}
    for n, i in enumerate((0, 2, 4, 6, 7)):
        state[f"layers.{i}.weight"] = torch.randn(sizes[n + 1], sizes[n]) * 0.5
        state[f"layers.{i}.bias"] = torch.randn(sizes[n + 1]) * 0.1
    torch.save(state, folder / "head.pth")
    return folder / "clip", folder / "head.pth"


def test_aesthetic_score_matches_the_model_by_hand(tiny_aesthetic, motion_csv, tmp_path):
    from opensora_sdk.data.aesthetic import AestheticScorer, preprocess

    clip, head = tiny_aesthetic
    scorer = AestheticScorer(clip, head, device="cpu")
    result = scoring.run_scores(scorer, motion_csv, tmp_path / "one.csv", batch_size=2, workers=2, progress=False)
    assert result["rows"] == 3 and result["errors"] == 1
    assert header_of(tmp_path / "one.csv") == ["path", "text", "aes"]
    rows = rows_of(tmp_path / "one.csv")
    assert [r["path"] for r in rows] == ["pan.mp4", "tilt.mp4", "still.mp4"]  # paths as written, input order
    frames, _ = read_video(motion_csv.parent / "pan.mp4")
    x = preprocess(frames[[3, 15, 27]], 32)  # points 0.1, 0.5, 0.9 of 31 frames
    with torch.no_grad():
        feats = torch.nn.functional.normalize(scorer.clip(pixel_values=x).image_embeds, dim=-1)
        expected = scorer.head(feats).mean().item()
    assert float(rows[0]["aes"]) == pytest.approx(expected, rel=1e-5)



def _motion_rank(rank, world, meta, out):
    from opensora_sdk.data.motion import MotionScorer

    torch.set_num_threads(1)

    scoring.run_scores(MotionScorer(size=(144, 256)), meta, out, rank=rank, world_size=world, batch_size=1, workers=1,
                       progress=False)  # fmt: skip


def test_a_crashed_score_run_continues_where_it_stopped(tiny_aesthetic, motion_csv, tmp_path, monkeypatch):
    from opensora_sdk.data.aesthetic import AestheticScorer

    scorer = AestheticScorer(*tiny_aesthetic, device="cpu")
    real, seen = scorer.score, []

    def crash_second(items):
        if seen:
            raise RuntimeError("killed")
        seen.append(len(items))
        return real(items)

    monkeypatch.setattr(scorer, "score", crash_second)
    with pytest.raises(RuntimeError, match="killed"):
        scoring.run_scores(scorer, motion_csv, tmp_path / "aes.csv", batch_size=1, workers=1, progress=False)
    assert not (tmp_path / "aes.csv").exists()
    monkeypatch.setattr(scorer, "score", lambda items: (seen.append(len(items)), real(items))[1])
    scoring.run_scores(scorer, motion_csv, tmp_path / "aes.csv", batch_size=1, workers=1, progress=False)
    assert sum(seen) == 3  # each readable row scored once
    full = scoring.run_scores(AestheticScorer(*tiny_aesthetic, device="cpu"), motion_csv, tmp_path / "full.csv",
                              progress=False)  # fmt: skip
    assert full["rows"] == 3
    assert [float(r["aes"]) for r in rows_of(tmp_path / "aes.csv")] == pytest.approx(
        [float(r["aes"]) for r in rows_of(tmp_path / "full.csv")], rel=1e-5)
    with pytest.raises(ValueError, match="other settings"):  # a journal is never mixed with other settings
        table.Journal(table.parts_dir(tmp_path / "x.csv"), ["aes"], meta={"a": 1})
        table.Journal(table.parts_dir(tmp_path / "x.csv"), ["aes"], meta={"a": 2})


def test_aesthetic_names_missing_weights(tmp_path):
    from opensora_sdk.data.aesthetic import AestheticScorer

    with pytest.raises(FileNotFoundError, match="--clip .*nothing is downloaded"):
        AestheticScorer(tmp_path / "no_clip", tmp_path / "head.pth")


def test_motion_score_and_camera_motion_two_processes_equal_one(motion_csv, tmp_path):
    pytest.importorskip("cv2")
    import torch.multiprocessing as mp

    mp.spawn(_motion_rank, args=(2, str(motion_csv), str(tmp_path / "two.csv")), nprocs=2, join=True)  # ranks 0, 1 of 2
    from opensora_sdk.data.motion import MotionScorer

    result = scoring.run_scores(MotionScorer(size=(144, 256)), motion_csv, tmp_path / "flow.csv", progress=False)
    assert (tmp_path / "two.csv").read_text() == (tmp_path / "flow.csv").read_text()
    assert result["rows"] == 3 and header_of(tmp_path / "flow.csv") == ["path", "text", "flow", "cmotion"]
    rows = {r["path"]: r for r in rows_of(tmp_path / "flow.csv")}
    assert [rows[p]["cmotion"] for p in ("pan.mp4", "tilt.mp4", "still.mp4")] == ["pan right", "tilt down", "static"]
    assert float(rows["pan.mp4"]["flow"]) > 2 and float(rows["still.mp4"]["flow"]) < 0.1
    assert Path(rows_of(tmp_path / "flow_errors.csv")[0]["path"]).name == "missing.mp4"


def test_camera_motion_rules_on_synthetic_flow_fields():
    from opensora_sdk.data.motion import camera_motion, pair_motion

    H, W = 40, 60
    yy, xx = np.mgrid[0:H, 0:W].astype(np.float32)
    out = np.stack([(xx - W / 2) * 0.2, (yy - H / 2) * 0.2])  # everything leaves the centre
    assert pair_motion(out) == "zoom in" and pair_motion(-out) == "zoom out"
    right = np.stack([np.full((H, W), 3.0), np.zeros((H, W))])
    assert pair_motion(right) == "pan left" and pair_motion(-right) == "pan right"
    assert pair_motion(np.zeros((2, H, W))) == "static"
    assert camera_motion(np.stack([right, right, np.zeros((2, H, W))])) == "pan left"
    assert camera_motion(np.stack([right, out, np.zeros((2, H, W))])) == "unknown"


def test_ocr_needs_a_package_and_says_which(motion_csv, capsys):
    from opensora_sdk.data.ocr import available_backend

    if available_backend() is not None:
        pytest.skip("an OCR package is installed")
    assert main(["data", "ocr", str(motion_csv), "--no-progress"]) == 2
    assert "pip install rapidocr-onnxruntime" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------
# caption: a local OpenAI-compatible server
# --------------------------------------------------------------------------------------------


class FakeAPI(http.server.BaseHTTPRequestHandler):
    requests: list = []
    fail: dict = {}  # "first": answer the first request with 429; "always": this status for every request

    def do_POST(self):  # noqa: N802 - http.server's name
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        images = [c for c in body["messages"][0]["content"] if c["type"] == "image_url"]
        auth = self.headers.get("Authorization")
        FakeAPI.requests.append({"auth": auth, "images": len(images), "model": body["model"]})
        if auth != f"Bearer {KEY}":
            return self._send(401, {"error": {"message": "bad key"}})
        if FakeAPI.fail.get("always"):
            return self._send(FakeAPI.fail["always"], {"error": "down"})
        if FakeAPI.fail.get("first") and len(FakeAPI.requests) == 1:
            return self._send(429, {"error": "slow down"})
        text = f"A video with {len(images)} frames.\nIt is nice."
        self._send(200, {"choices": [{"message": {"content": text}}]})

    def _send(self, code, payload):
        data = json.dumps(payload).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


@pytest.fixture
def api():
    FakeAPI.requests, FakeAPI.fail = [], {}
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), FakeAPI)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    server.shutdown()


def test_caption_retries_resumes_and_never_writes_the_key(api, motion_csv, tmp_path, monkeypatch, capsys):
    FakeAPI.fail["first"] = True  # one 429, then answers
    cap = caption.Captioner(base_url=api, model="tiny-vlm", api_key=KEY, backoff_s=0.01, retries=2)
    out = tmp_path / "cap.csv"
    result = caption.caption_csv(motion_csv, out, captioner=cap, progress=False)
    assert result["rows"] == 3 and result["errors"] == 1  # missing.mp4 cannot be read
    rows = rows_of(out)
    assert header_of(out) == ["path", "text"]
    assert [r["text"] for r in rows] == ["A video with 3 frames. It is nice."] * 3  # newlines become spaces
    assert len(FakeAPI.requests) == 4 and FakeAPI.requests[0]["model"] == "tiny-vlm"
    # a re-run retries only the failed row (still unreadable), nothing else is sent
    caption.caption_csv(motion_csv, out, captioner=cap, progress=False)
    assert len(FakeAPI.requests) == 4
    # a bad key stops the run with a clear message and the key appears nowhere
    monkeypatch.setenv("MY_KEY", "sk-wrong-9876")
    code = main(["data", "caption", str(motion_csv), "-o", str(tmp_path / "bad.csv"), "--base-url", api,
                 "--api-key-env", "MY_KEY", "--no-progress", "--overwrite"])  # fmt: skip
    captured = capsys.readouterr()
    assert code == 2 and "401" in captured.err
    written = "".join(p.read_text(errors="replace") for p in tmp_path.rglob("*") if p.is_file())
    assert KEY not in captured.out + captured.err + written and "sk-wrong-9876" not in captured.out + captured.err + written


def test_caption_gives_up_after_retries_and_a_rerun_finishes(api, motion_csv, tmp_path):
    FakeAPI.fail["always"] = 503
    cap = caption.Captioner(base_url=api, model="m", api_key=KEY, backoff_s=0.001, retries=1)
    result = caption.caption_csv(motion_csv, tmp_path / "c.csv", captioner=cap, progress=False)
    assert result["rows"] == 0 and result["errors"] == 4
    assert "gave up after 2 tries: HTTP 503" in rows_of(tmp_path / "c_errors.csv")[0]["error"]
    FakeAPI.fail["always"] = 0
    result = caption.caption_csv(motion_csv, tmp_path / "c.csv", captioner=cap, progress=False)
    assert result["rows"] == 3


# --------------------------------------------------------------------------------------------
# CSV tools, stats
# --------------------------------------------------------------------------------------------


@pytest.fixture
def meta(tmp_path) -> Path:
    rows = [
        {"path": "a.mp4", "text": "The video shows a cat", "num_frames": 51, "height": 240, "width": 426, "fps": 24, "aes": 5.5, "flow": 2.0, "cmotion": "static"},
        {"path": "b.mp4", "text": "a dog", "num_frames": 10, "height": 720, "width": 1280, "fps": 60, "aes": 4.0, "flow": 9.0, "cmotion": "pan left"},
        {"path": "c.jpg", "text": "", "num_frames": 1, "height": 512, "width": 512, "fps": math.nan, "aes": 6.5, "flow": 0.0, "cmotion": "static"},
        {"path": "a.mp4", "text": "duplicate", "num_frames": 51, "height": 240, "width": 426, "fps": 24, "aes": 5.5, "flow": 2.0, "cmotion": "static"},
    ]  # fmt: skip
    return table.write_rows(rows, tmp_path / "meta.csv")


def test_csv_filters_in_the_official_order_with_official_names(meta):
    result = csvtools.transform([meta], fmin=2, aesmin=5.0, fpsmax=30.0)
    out = result["outputs"][0]
    assert out.name == "meta_fmin2_fpsmax30.0_aesmin5.0.csv"
    assert [r["path"] for r in rows_of(out)] == ["a.mp4", "a.mp4"]
    result = csvtools.transform([meta], remove_path_duplication=True, refine_llm=True, vid_only=True)
    rows = rows_of(result["outputs"][0])
    assert [r["text"] for r in rows] == ["A cat", "a dog"] and result["outputs"][0].name == "meta_noduppath_llm_vid.csv"
    result = csvtools.transform([meta], hwmax=300_000, cmotion=["static"], train_column=True)
    rows = rows_of(result["outputs"][0])
    assert [r["path"] for r in rows] == ["a.mp4", "c.jpg", "a.mp4"] and "aes" not in rows[0]
    with pytest.raises(ValueError, match="needs the column 'match'"):
        csvtools.transform([meta], matchmin=1.0)


def test_csv_merge_shuffle_shard(meta, tmp_path):
    table.write_rows([{"path": "z.mp4", "text": "z", "num_frames": 5}], tmp_path / "more.csv")
    merged = csvtools.transform([meta, tmp_path / "more.csv", tmp_path / "absent.csv"], tmp_path / "all.csv")
    assert merged["rows"] == 5 and header_of(tmp_path / "all.csv")[-1] == "cmotion"
    first = csvtools.transform([tmp_path / "all.csv"], tmp_path / "s1.csv", shuffle=True, seed=3)
    again = csvtools.transform([tmp_path / "all.csv"], tmp_path / "s2.csv", shuffle=True, seed=3)
    assert (tmp_path / "s1.csv").read_text() == (tmp_path / "s2.csv").read_text() and first["rows"] == again["rows"] == 5
    shards = csvtools.transform([tmp_path / "all.csv"], tmp_path / "part.csv", shard=2)["outputs"]
    assert [p.name for p in shards] == ["part_0.csv", "part_1.csv"]
    assert [len(rows_of(p)) for p in shards] == [2, 3]
    assert main(["data", "csv", str(tmp_path / "all.csv"), "--difference", str(tmp_path / "more.csv"), "-o",
                 str(tmp_path / "diff.csv")]) == 0  # fmt: skip
    assert len(rows_of(tmp_path / "diff.csv")) == 4


def test_stats_prints_counts_and_draws_histograms(meta, tmp_path, capsys):
    from PIL import Image

    assert main(["data", "stats", str(meta), "--out-dir", str(tmp_path / "st")]) == 0
    out = capsys.readouterr().out
    assert "rows 4: 3 videos, 1 images" in out and "cmotion: static 3, pan left 1" in out
    summary = json.loads((tmp_path / "st" / "stats.json").read_text())
    assert summary["columns"]["num_frames"]["max"] == 51 and summary["columns"]["fps"]["count"] == 3
    with Image.open(tmp_path / "st" / "hist_aes.png") as image:
        assert image.size == (640, 400)
    assert stats.summarize([], ["path"])["rows"] == 0
