"""The official inference flags of `opensora generate`, run through `cli.main` on the built-in
model (1 step, 32x32, 5 frames): --num-sample, --prompt-as-path, --start-index / --end-index,
--batch-size, --frame-interval, --watermark, --verbose levels and --llm-refine (against the
chat server of tests/chat_server.py)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from chat_server import RANDOM_REPLY, ChatServer
from PIL import Image

from opensora_sdk import cli, cli_generate
from opensora_sdk.video import Video

FAST = ["--num-sampling-steps", "1", "--image-size", "32", "32", "--num-frames", "5", "--device", "cpu",
        "--no-progress"]
KEY = "sk-test-SECRET-0123456789"


@pytest.fixture(scope="module")
def builtin_pipeline():
    from opensora_sdk.pipeline import OpenSoraPipeline

    return OpenSoraPipeline.from_preset(device="cpu", progress=False)


@pytest.fixture(autouse=True)
def load_once(builtin_pipeline, monkeypatch):
    """Every command gets the one built-in pipeline (loading is tested elsewhere)."""
    monkeypatch.setattr(cli_generate, "_load_pipeline", lambda *args, **kwargs: builtin_pipeline)


def run(capsys, *argv):
    rc = cli.main(["generate", *FAST, *argv])
    out, err = capsys.readouterr()
    return rc, out.split("\n")[:-1], err


def test_help_documents_every_flag_with_its_default():
    parser = cli.build_parser()
    generate = parser._subparsers._group_actions[0].choices["generate"]
    helps = {a.option_strings[0]: a.help for a in generate._actions if a.option_strings}
    for flag in ("--prompt-as-path", "--num-sample", "--start-index", "--end-index", "--batch-size",
                 "--frame-interval", "--watermark", "--verbose", "--llm-refine", "--llm-refine-api-key",
                 "--llm-refine-base-url", "--llm-refine-model", "--llm-refine-timeout", "--llm-refine-retries",
                 "--llm-refine-fallback"):
        assert "default" in helps[flag], flag


def test_num_sample_names_and_consecutive_seeds(tmp_path, capsys):
    rc, out, _ = run(capsys, "--prompt", "a cat", "a dog", "--num-sample", "2", "--seed", "5", "--start-index", "3",
                     "--save-dir", str(tmp_path), "--batch-size", "3")
    assert rc == 0
    names = ["sample_0003-0.mp4", "sample_0003-1.mp4", "sample_0004-0.mp4", "sample_0004-1.mp4"]
    assert out == [str(tmp_path / n) for n in names]
    videos = [Video.from_file(tmp_path / n) for n in names]
    assert [v.metadata["seed"] for v in videos] == ["5", "6", "7", "8"]
    assert [v.metadata["title"] for v in videos] == ["a cat", "a cat", "a dog", "a dog"]
    assert not np.array_equal(videos[0].frames, videos[1].frames)  # different seeds, same prompt


def test_a_prompt_without_a_flag_and_output_names_the_file(tmp_path, capsys):
    rc, out, _ = run(capsys, "a cat on a mat", "-o", str(tmp_path / "cat.webm"), "--seed", "3")
    assert rc == 0 and out == [str(tmp_path / "cat.webm")]
    video = Video.from_file(tmp_path / "cat.webm")
    assert (video.num_frames, video.metadata["title"], video.metadata["seed"]) == (5, "a cat on a mat", "3")
    rc, out, _ = run(capsys, "a cat", "a dog", "--num-sample", "2", "--output", str(tmp_path / "new" / "pets.gif"))
    assert rc == 0 and out == [str(tmp_path / "new" / f"pets_{n:04d}.gif") for n in range(4)]
    assert [Video.from_file(p).metadata["title"] for p in out] == ["a cat", "a cat", "a dog", "a dog"]


@pytest.mark.parametrize(
    "argv, message",
    [
        (["a cat", "--prompt", "a dog"], "prompts given as PROMPT and --prompt: give them one way only"),
        (["a cat", "-o", "x.mp4", "--save-dir", "."], "--output names the file itself: leave out --save-dir"),
        (["a cat", "-o", "x.avi"], "--output: cannot save 'x.avi': extension '.avi' is not supported"),
        (["a cat", "-o", "x.png"], "--output: cannot save 5 frames to 'x.png'"),
    ],
    ids=["twice", "with save-dir", "suffix", "png"],
)
def test_prompt_and_output_mistakes_are_one_clear_line(tmp_path, capsys, monkeypatch, argv, message):
    monkeypatch.chdir(tmp_path)
    rc, out, err = run(capsys, *argv)
    assert rc != 0 and out == [] and message in err and "Traceback" not in err
    assert list(tmp_path.iterdir()) == []  # nothing written


def test_prompt_as_path_sanitises_and_resumes(tmp_path, capsys):
    argv = ["--prompt", "a red/blue ball: bouncing?", "a cat", "--num-sample", "2", "--prompt-as-path",
            "--save-dir", str(tmp_path), "--seed", "1"]
    rc, out, _ = run(capsys, *argv)
    names = ["a red_blue ball_ bouncing_-0.mp4", "a red_blue ball_ bouncing_-1.mp4", "a cat-0.mp4", "a cat-1.mp4"]
    assert rc == 0 and out == [str(tmp_path / n) for n in names]
    first = Video.from_file(tmp_path / "a cat-1.mp4")
    (tmp_path / "a cat-1.mp4").unlink()
    rc, out, err = run(capsys, *argv)  # only the missing file is made, with the seed it had
    assert rc == 0 and out == [str(tmp_path / "a cat-1.mp4")] and "skipping 3 of 4" in err
    again = Video.from_file(tmp_path / "a cat-1.mp4")
    assert again.metadata["seed"] == first.metadata["seed"] == "4"
    # the same video up to float rounding (a run of one sample, not four; up to ~1 level on
    # average seen); another seed is ~37 levels off
    assert np.abs(again.frames.astype(int) - first.frames).mean() < 4
    rc, out, _ = run(capsys, *argv)
    assert rc == 0 and out == []


def test_start_and_end_index_slice_the_prompt_file(tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("zero\none\n\ntwo\nthree\n", encoding="utf-8")
    rc, out, _ = run(capsys, "--prompt-path", str(prompts), "--start-index", "1", "--end-index", "3",
                     "--save-dir", str(tmp_path))
    assert rc == 0 and out == [str(tmp_path / "sample_0001.mp4"), str(tmp_path / "sample_0002.mp4")]
    assert Video.from_file(tmp_path / "sample_0002.mp4").metadata["title"] == "two"
    rc, _, err = run(capsys, "--prompt-path", str(prompts), "--start-index", "-1", "--save-dir", str(tmp_path))
    assert rc == 2 and "--start-index -1: expected an integer >= 0" in err
    rc, _, err = run(capsys, "--prompt", "a", "--num-sample", "0", "--save-dir", str(tmp_path))
    assert rc == 2 and "--num-sample 0" in err


def test_frame_interval_and_save_fps(tmp_path, capsys):
    rc, out, _ = run(capsys, "--prompt", "a cat", "--frame-interval", "2", "--save-dir", str(tmp_path))
    assert rc == 0 and Video.from_file(out[0]).fps == 4  # the built-in model's 8 fps / 2
    rc, out, _ = run(capsys, "--prompt", "a cat", "--frame-interval", "2", "--save-fps", "6", "--sample-name", "b",
                     "--save-dir", str(tmp_path))
    assert rc == 0 and Video.from_file(out[0]).fps == 6


def test_watermark(tmp_path, capsys, monkeypatch):
    logo = tmp_path / "logo.png"
    Image.new("RGBA", (8, 4), (255, 0, 0, 255)).save(logo)
    rc, out, _ = run(capsys, "--prompt", "a cat", "--watermark", str(logo), "--save-dir", str(tmp_path),
                     "--image-size", "64", "64")
    assert rc == 0 and out == [str(tmp_path / "sample_0000.mp4"), str(tmp_path / "sample_0000_watermark.mp4")]
    plain, marked = (Video.from_file(p) for p in out)
    assert marked.metadata == plain.metadata and marked.num_frames == plain.num_frames
    corner = marked.frames[:, :6, :12].astype(int)  # 10% of 64 = 6 rows, 12 columns (8x4 logo scaled)
    assert corner[..., 0].mean() > 180 and corner[..., 1].mean() < 80  # red
    assert np.abs(marked.frames[:, 16:, 16:].astype(int) - plain.frames[:, 16:, 16:]).mean() < 3  # the rest kept
    monkeypatch.chdir(tmp_path)  # --watermark alone: the official logo path, missing here
    rc, _, err = run(capsys, "--prompt", "a cat", "--watermark", "--save-dir", str(tmp_path))
    assert rc == 2 and "assets/images/watermark/watermark.png" in err and "not found" in err
    rc, out, _ = run(capsys, "--prompt", "a cat", "--watermark", "false", "--save-dir", str(tmp_path / "w"))
    assert rc == 0 and len(out) == 1


def test_verbose_levels(tmp_path, capsys):
    base = ["--prompt", "a cat", "--save-dir", str(tmp_path)]
    assert run(capsys, *base, "--verbose", "0")[2] == ""
    assert run(capsys, *base, "--quiet")[2] == ""
    err = run(capsys, *base)[2]
    assert "generating 1 video(s)" in err and "done in" in err and "size:" not in err
    err = run(capsys, *base, "--verbose")[2]
    assert "size:           32x32" in err and "generating" in err


# --------------------------------------------------------------------------------------------
# --llm-refine
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def chat():
    with ChatServer() as s:
        yield s


def refine_flags(chat, model="ok"):
    return ["--llm-refine", "--llm-refine-base-url", chat.base_url, "--llm-refine-model", model]


def test_llm_refine_prints_and_stores_the_refined_prompt(tmp_path, capsys, chat, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    rc, out, err = run(capsys, "--prompt", "ein Hund", "", *refine_flags(chat), "--prompt-as-path",
                       "--save-dir", str(tmp_path))
    assert rc == 0
    refined = "A detailed English video of ein Hund. The camera stays still."
    assert f"refined prompt 0: {refined}" in err and f"refined prompt 1: {RANDOM_REPLY}" in err
    assert out == [str(tmp_path / "ein Hund.mp4"), str(tmp_path / "prompt.mp4")]  # named after the original
    meta = Video.from_file(out[0]).metadata
    assert meta["refined_prompt"] == meta["title"] == refined and meta["original_prompt"] == "ein Hund"
    processed = json.loads(meta["opensora"])["processed_prompts"][0]
    assert processed.startswith("a detailed english video of ein hund") and processed.endswith("aesthetic score: 6.5.")
    assert KEY not in out[0] + err


def test_llm_refine_shows_the_reference_image(tmp_path, capsys, chat, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    image = tmp_path / "first.png"
    Image.fromarray(np.full((32, 32, 3), 90, np.uint8)).save(image)
    rc, _, err = run(capsys, "--prompt", "it rolls", "--reference-path", str(image), *refine_flags(chat),
                     "--save-dir", str(tmp_path))
    assert rc == 0 and "refined prompt 0: A red circle" in err
    content = chat.requests[-1]["body"]["messages"][-1]["content"]
    assert content[0]["image_url"]["url"].startswith("data:image/jpeg;base64,")


def test_llm_refine_failure_is_one_line_without_the_key(tmp_path, capsys, chat, monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    rc, out, err = run(capsys, "--prompt", "a cat", *refine_flags(chat, "unauthorized"), "--llm-refine-api-key", KEY,
                       "--save-dir", str(tmp_path))
    assert rc == 2 and out == [] and not list(tmp_path.iterdir())
    assert err.count("\n") == 1 and "HTTP 401: Incorrect API key provided" in err and KEY not in err
    rc, out, err = run(capsys, "--prompt", "a cat", *refine_flags(chat, "broken"), "--llm-refine-api-key", KEY,
                       "--llm-refine-fallback", "--save-dir", str(tmp_path))
    assert rc == 0 and "warning: prompt refinement failed: malformed reply" in err and KEY not in err
    assert Video.from_file(out[0]).metadata["refined_prompt"] == "a cat"
    monkeypatch.setenv("OPENAI_BASE_URL", "https://api.openai.com/v1")
    rc, _, err = run(capsys, "--prompt", "a cat", "--llm-refine", "--save-dir", str(tmp_path))
    assert rc == 2 and "needs an API key: set OPENAI_API_KEY" in err


def test_notes_are_one_line_each_and_held_back_when_the_command_fails(tmp_path, capsys):
    rc, out, err = run(capsys, "a cat", "--image-size", "60", "70", "-o", str(tmp_path / "cat.mp4"))
    notes = [line for line in err.splitlines() if ": note: " in line]
    assert rc == 0 and out == [str(tmp_path / "cat.mp4")]
    assert notes == [  # FAST asks for 32x32 first; the later --image-size wins
        "opensora generate: note: size 60x70 rounded to 64x72 (multiples of 8 for the VAE)",
        "opensora generate: note: this model makes 64x64 videos (its native size); at 64x72 they may not look right",
    ]
    assert "UserWarning" not in err and "plan.py" not in err
    rc, out, err = run(capsys, "a cat", "--image-size", "60", "70", "-o", str(tmp_path / "cat.avi"))
    assert rc != 0 and err.count("\n") == 1 and "--output: cannot save" in err  # the error alone
    rc, out, err = run(capsys, "a cat", "--image-size", "60", "70", "-o", str(tmp_path / "quiet.mp4"), "--quiet")
    assert rc == 0 and err == ""
