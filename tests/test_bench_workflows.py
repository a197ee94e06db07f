"""benchmarks/bench_workflows.py: its claim checkers on rendered clips with known attributes (a
clip that matches the claim passes, one with the wrong colour / direction / size / frame
fails), what it reads from the shipped workflows, and a smoke run of its main on one workflow
and one seed (the built-in model)."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
from pathlib import Path

import numpy as np
import pytest

from comfy_nodes import comfy_host as host
from opensora_sdk.training.shapes_benchmark import BUILTIN_STYLE, Case, rendered_clip

ROOT = Path(__file__).resolve().parents[1]


def _load():
    spec = importlib.util.spec_from_file_location("bench_workflows", ROOT / "benchmarks" / "bench_workflows.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


bw = _load()


def case(color: str, shape: str, direction: str, background: str, big: bool = False) -> Case:
    prompt = f"a {'big ' if big else ''}{color} {shape} moving {direction} on a {background} background"
    return Case(prompt, color, shape, direction, background)


def clip(c: Case, seed: int = 0, frames: int = 17, big: bool = False) -> np.ndarray:
    """The built-in model's training look: 64x64, every 3rd frame of a 24 fps rendering (8 fps)."""
    style = dataclasses.replace(BUILTIN_STYLE, radius=(0.32, 0.36), scene_frames=None) if big else BUILTIN_STYLE
    return rendered_clip(c, 64, 64, frames, seed, 3, style=style)


def oks(observations) -> dict:
    return {o["claim"]: o["ok"] for o in observations}


CASES = [case("red", "circle", "right", "black"), case("yellow", "square", "up", "gray"),
         case("blue", "triangle", "down", "white"), case("purple", "square", "left", "white")]  # fmt: skip


def test_parse_caption_and_loop_prompts():
    assert bw.parse_caption("a big red circle moving left on a black background") == {
        "color": "red", "shape": "circle", "direction": "left", "background": "black", "big": True}  # fmt: skip
    still = bw.parse_caption("A still  green circle on a gray background")
    assert (still["color"], still["shape"], still["direction"], still["big"]) == ("green", "circle", "none", False)
    # a colour word in the background is not the object's colour
    assert bw.parse_caption("a white square moving up on a red background")["color"] == "white"
    with pytest.raises(ValueError, match="names no colour"):
        bw.parse_caption("a lighthouse at dusk")
    text = "|0|a blue triangle moving right on a white background|1|a blue triangle moving down on a white background"
    assert bw.loop_prompt(text, 0).endswith("moving right on a white background")
    assert bw.loop_prompt(text, 1).endswith("moving down on a white background")
    assert bw.loop_prompt(text, 5) == bw.loop_prompt(text, 1)


@pytest.mark.parametrize("c", CASES, ids=lambda c: c.prompt.split(" on ")[0].removeprefix("a ").replace(" ", "-"))
def test_text_to_video_claims_on_rendered_clips(c):
    frames = clip(c, seed=3)
    got = bw.claims_text_to_video(frames, c.prompt)
    assert [o["claim"] for o in got] == [f"colour = {c.color}", f"shape = {c.shape}", f"direction = {c.direction}"]
    assert all(o["ok"] for o in got), got
    other = {"red": "green", "yellow": "blue", "blue": "red", "purple": "yellow"}[c.color]
    opposite = {"left": "right", "right": "left", "up": "down", "down": "up"}[c.direction]
    wrong = bw.claims_text_to_video(frames, c.prompt.replace(c.color, other).replace(c.direction, opposite))
    assert oks(wrong) == {f"colour = {other}": False, f"shape = {c.shape}": True, f"direction = {opposite}": False}


def test_text_to_image_claims():
    still = clip(case("green", "circle", "left", "gray"))[:1]
    assert all(oks(bw.claims_text_to_image(still, "a still green circle on a gray background")).values())
    assert oks(bw.claims_text_to_image(still, "a still red square on a gray background")) == {
        "colour = red": False, "shape = square": False}  # fmt: skip


def test_frame_match_claims():
    rng = np.random.default_rng(0)
    c = case("red", "circle", "right", "black")
    frames = clip(c)
    noisy = np.clip(frames.astype(np.float64) + rng.normal(0, 4, frames.shape), 0, 255).round().astype(np.uint8)
    refs = [("first frame", 0, frames[0]), ("last frame", -1, frames[-1])]
    got = bw.claims_conditioned(noisy, c.prompt, refs)
    assert oks(got) == {"first frame = input image (PSNR)": True, "last frame = input image (PSNR)": True,
                        "colour = red": True}  # fmt: skip
    assert 30 < got[0]["got"] < 50  # finite: noise of sigma 4 is ~36 dB
    # the images swapped: the circle is at the other end of its path, far below 25 dB
    swapped = bw.claims_conditioned(noisy, c.prompt, [("first frame", 0, frames[-1]), ("last frame", -1, frames[0])])
    assert [o["ok"] for o in swapped] == [False, False, True]
    assert bw.check_frame_match(frames[0], frames[0], "first frame")["got"] == bw.PSNR_CAP_DB  # identical: capped
    with pytest.raises(ValueError, match="differ in size"):
        bw.check_frame_match(frames[0], frames[0, :32], "first frame")
    blue = clip(case("blue", "circle", "right", "black"))
    assert not oks(bw.claims_conditioned(blue, c.prompt, refs))["colour = red"]


def test_continuation_claims_measure_only_the_added_frames():
    """A blue clip moving right followed by a red one moving left: from frame 17 on the clip is
    red and moves left; measured whole it is neither."""
    first = clip(case("blue", "circle", "right", "black"), seed=1)
    second = clip(case("red", "circle", "left", "black"), seed=2)
    video = np.concatenate([first, second])
    prompt = "a red circle moving left on a black background"
    assert oks(bw.claims_continuation(video, 17, None, prompt, "(after the input)")) == {
        "colour = red (after the input)": True, "direction = left (after the input)": True}  # fmt: skip
    assert oks(bw.claims_continuation(video, 17, 34, prompt.replace("left", "right"), "(2nd loop)")) == {
        "colour = red (2nd loop)": True, "direction = right (2nd loop)": False}  # fmt: skip
    assert not any(oks(bw.claims_continuation(video, 0, 17, prompt, "(1st)")).values())
    with pytest.raises(ValueError, match="too few"):
        bw.claims_continuation(video, 32, None, prompt, "(end)")


def test_lora_claims():
    c = case("red", "circle", "left", "black", big=True)
    big, ordinary = clip(c, big=True), clip(c)
    assert all(oks(bw.claims_lora(big, ordinary, 1.0, ordinary.copy())).values())
    rng = np.random.default_rng(1)
    nudged = np.clip(ordinary + rng.integers(-2, 3, ordinary.shape), 0, 255).astype(np.uint8)
    assert not oks(bw.claims_lora(big, ordinary, 1.0, nudged))["strength 0 = no adapter (same video)"]  # saves are exact
    assert bw.claims_lora(big, ordinary, 1.0)[1]["target"] is None  # the base model's size: information only
    swapped = bw.claims_lora(ordinary, big, 0.5, ordinary)
    assert oks(swapped) == {"big at strength 0.5": False, "not big at strength 0": False,
                            "strength 0 = no adapter (same video)": False}  # fmt: skip
    assert swapped[0]["extent"] < 0.45 <= swapped[1]["extent"]
    other_seed = clip(c, seed=1)  # the same prompt drawn elsewhere: not the same video
    assert not oks(bw.claims_lora(big, ordinary, 1.0, other_seed))["strength 0 = no adapter (same video)"]


def test_aggregate_and_table():
    per_seed = {
        0: [bw._observation("colour = red", "rate", "red", "red", True, 0.9),
            bw._observation("first frame = input image (PSNR)", "psnr_db", 25.0, 30.0, True, 25.0),
            bw._observation("shape = circle", "rate", "circle", "square", False, None)],
        1: [bw._observation("colour = red", "rate", "red", "blue", False, 0.9),
            bw._observation("first frame = input image (PSNR)", "psnr_db", 25.0, 22.0, False, 25.0),
            bw._observation("shape = circle", "rate", "circle", "circle", True, None)],
    }  # fmt: skip
    rows = {r["claim"]: r for r in bw.aggregate("wf", "image to video", per_seed)}
    assert rows["colour = red"]["rate"] == 0.5 and rows["colour = red"]["passed"] is False
    psnr = rows["first frame = input image (PSNR)"]
    assert (psnr["rate"], psnr["value"], psnr["min"], psnr["passed"]) == (0.5, 26.0, 22.0, True)  # the mean decides
    assert rows["shape = circle"]["passed"] is None
    text = bw.table(list(rows.values()), 2)
    assert "26.0 dB (min 22.0)" in text and "FAIL" in text and "info" in text and "pass" in text


def test_workflow_kinds_of_the_shipped_workflows():
    kinds = {}
    for path in sorted((ROOT / "workflows").glob("*.json")):
        prompt = bw.api_prompt(json.loads(path.read_text()))
        kinds[path.stem] = bw.workflow_kind(prompt) if bw.is_builtin(prompt) else None
        if kinds[path.stem]:
            assert bw.seed_nodes(prompt), path.name
    assert kinds == {
        "opensora_first_last_frame": "first + last frame", "opensora_image_to_video": "image to video",
        "opensora_long_video": "long video", "opensora_lora": "lora", "opensora_text_to_image": "text to image",
        "opensora_text_to_video": "text to video", "opensora_v11_text_to_video": None,
        "opensora_video_extension": "video extension"}  # fmt: skip
    lora = bw.api_prompt(json.loads((ROOT / "workflows" / "opensora_lora.json").read_text()))
    lora_id = next(k for k, n in lora.items() if n["class_type"] == "OpenSoraLoraLoader")
    bypassed = bw.without_node(lora, lora_id)
    assert lora_id not in bypassed and lora_id in lora
    assert [n["inputs"]["model"] for n in bypassed.values() if n["class_type"] == "OpenSoraSampler"] == [
        lora[lora_id]["inputs"]["model"]]  # fmt: skip


def test_fitted_input_image_is_the_conditioning_image(monkeypatch):
    from opensora_sdk.video_io import read_image

    monkeypatch.setitem(host._settings, "input_dir", ROOT / "workflows" / "inputs")
    prompt = bw.api_prompt(json.loads((ROOT / "workflows" / "opensora_first_last_frame.json").read_text()))
    conds = [k for k, n in sorted(prompt.items()) if n["class_type"] == "OpenSoraImageCondition"]
    first = bw.fitted_input_image(prompt, conds[0], 64, 64)
    assert np.array_equal(first, read_image(ROOT / "workflows" / "inputs" / "opensora_example.png"))  # 64x64: as is
    wide = bw.fitted_input_image(prompt, conds[1], 32, 64)  # another aspect ratio: resized and centre-cropped
    assert wide.shape == (32, 64, 3) and wide.dtype == np.uint8


@pytest.mark.slow
def test_main_smoke_one_workflow_one_seed(tmp_path, monkeypatch, capsys):
    for key in ("models_dir", "output_dir", "input_dir"):  # main sets the folders; put back afterwards
        monkeypatch.setitem(host._settings, key, host._settings[key])
    out = tmp_path / "w.json"
    report = bw.main(["--workflows", "text_to_image", "--seeds", "1", "--seed", "5", "--output-dir",
                      str(tmp_path / "out"), "--json", str(out)])  # fmt: skip
    printed = capsys.readouterr().out
    saved = json.loads(out.read_text())
    assert saved["rows"] == json.loads(json.dumps(report["rows"]))
    assert [(r["workflow"], r["claim"]) for r in saved["rows"]] == [
        ("opensora_text_to_image", "colour = green"), ("opensora_text_to_image", "shape = circle")]  # fmt: skip
    for row in saved["rows"]:
        assert isinstance(row["rate"], float) and 0.0 <= row["rate"] <= 1.0 and not math.isnan(row["rate"])
        assert [s["seed"] for s in row["seeds"]] == [5]
        line = next(x for x in printed.splitlines() if x.startswith("opensora_text_to_image") and row["claim"] in x)
        assert f"{row['rate']:.0%}" in line and ("pass" in line or "FAIL" in line or "info" in line)
    assert saved["workflows"]["opensora_text_to_image"]["note"] == "Open-Sora: text to image"
    assert list((tmp_path / "out" / "opensora").glob("t2i_*.png"))
    colour = saved["rows"][0]
    assert colour["target"] == 0.9 and colour["passed"] == (colour["rate"] >= 0.9)
    assert bw.exit_status(report) == 0
    assert bw.exit_status({**report, "settings": {**report["settings"], "strict": True}}) == int(bool(report["targets_missed"]))
