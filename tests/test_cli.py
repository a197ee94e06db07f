"""The `opensora` command: generate (tiny-random preset, tiny sizes) and info (no model loaded)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from opensora_sdk import cli
from opensora_sdk.pipeline import OpenSoraPipeline
from opensora_sdk.video import Video

MODEL = ["--preset", "tiny-random", "--num-sampling-steps", "2", "--device", "cpu"]
TINY = [*MODEL, "--image-size", "64", "64"]


@pytest.fixture
def no_model_loading(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(OpenSoraPipeline, "from_preset", classmethod(refuse))
    monkeypatch.setattr(OpenSoraPipeline, "from_pretrained", classmethod(refuse))


def test_generate_writes_mp4_atomically_and_prints_the_path(tmp_path, capsys):
    out = tmp_path / "out"
    rc = cli.main(["generate", *TINY, "--prompt", "a cat", "a dog", "--num-frames", "5", "--save-dir", str(out),
                   "--sample-name", "clip", "--seed", "7", "--save-fps", "12", "--no-progress"])
    assert rc == 0
    printed = capsys.readouterr().out.split()
    expected = [out / "clip_0000.mp4", out / "clip_0001.mp4"]
    assert printed == [str(p) for p in expected]
    assert sorted(out.iterdir()) == expected  # no temporary files left behind
    video = Video.from_file(expected[1])
    assert (video.num_frames, video.height, video.width, video.fps) == (5, 64, 64, 12)
    assert video.metadata["seed"] == "8"


def test_generate_one_frame_png_from_prompt_file(tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("skipped\n\na cat\n", encoding="utf-8")
    rc = cli.main(["generate", *TINY, "--prompt-path", str(prompts), "--start-index", "1", "--num-frames", "1",
                   "--save-dir", str(tmp_path), "--no-progress"])
    assert rc == 0
    path = tmp_path / "sample_0001.png"
    assert capsys.readouterr().out.strip() == str(path)
    assert Video.from_file(path).frames.shape == (1, 64, 64, 3)


def test_python_dash_m_help():
    done = subprocess.run([sys.executable, "-m", "opensora_sdk", "--help"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and "generate" in done.stdout and "info" in done.stdout


def test_info_prints_the_plan_without_loading_models(no_model_loading, capsys):
    rc = cli.main(["info", "--preset", "v1.2", "--prompt", "a cat", "--resolution", "720p", "--num-frames", "16s",
                   "--loop", "2", "--device", "cpu", "--dtype", "bf16"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "720x1280 (HxW) from resolution 720p, aspect ratio 9:16" in out
    assert "408 per loop x 2 loops, 17 shared -> 799 in total" in out
    assert "[B, C, T', h, w] = [1, 4, 120, 90, 160]" in out
    assert "432000 video tokens per sample (120 x 3600), 300 text tokens" in out
    assert "weights transformer: 2.25 GiB" in out  # 1.2 B parameters in bf16
    assert "weights text_encoder: 17.74 GiB" in out  # T5-XXL encoder, float32
    assert "estimated peak:" in out and "hpcai-tech/OpenSora-STDiT-v3" in out


def test_info_tiny_preset_and_gpu_phases(no_model_loading, capsys):
    rc = cli.main(["info", *MODEL[:-2], "--image-size", "64", "64", "--prompt", "a cat", "--num-frames", "17", "--device", "cuda", "--offload", "model"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "[B, C, T', h, w] = [1, 4, 5, 8, 8]" in out and "80 video tokens" in out
    assert "peak by phase: text" in out and "random weights" in out


@pytest.mark.parametrize(
    "args, message",
    [
        (["--resolution", "999p"], "resolution '999p' is not one of"),
        (["--num-frames", "32s"], "needs 240 latent frames"),
        (["--reference-path", "nowhere.png"], "reference_path[0]='nowhere.png': file not found"),
        (["--model", "some/folder"], "--preset tiny-random builds random weights"),
    ],
)
def test_bad_input_is_a_clear_error_before_loading(no_model_loading, tmp_path, capsys, args, message):
    base = ["generate", *MODEL, "--prompt", "a cat", "--num-frames", "17", "--save-dir", str(tmp_path), *args]
    assert cli.main(base) == cli.EXIT_USAGE
    assert message in capsys.readouterr().err


def test_unwritable_output_fails_before_loading(no_model_loading, tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    rc = cli.main(["generate", *TINY, "--prompt", "a cat", "--num-frames", "17", "--save-dir", str(blocker)])
    err = capsys.readouterr().err
    assert rc == cli.EXIT_USAGE and "opensora generate: error: --save-dir" in err and str(blocker) in err
    rc = cli.main(["generate", *TINY, "--prompt", "a cat", "--num-frames", "17", "--save-dir", str(tmp_path),
                   "--sample-name", "sub/dir"])
    assert rc == cli.EXIT_USAGE and "does not exist" in capsys.readouterr().err
    assert cli.main(["generate", *TINY, "--num-frames", "17"]) == cli.EXIT_USAGE
    assert "no prompt" in capsys.readouterr().err


def test_a_registered_subcommand_is_imported_only_when_it_runs(monkeypatch, tmp_path, capsys):
    (tmp_path / "late_cmd.py").write_text("def run(args):\n    print('ran', args.name)\n    return 0\n")
    monkeypatch.syspath_prepend(str(tmp_path))

    def register(sub):
        p = sub.add_parser("late")
        p.add_argument("name")
        p.set_defaults(func=cli.lazy("late_cmd", "run"))

    monkeypatch.setattr(cli, "SUBCOMMANDS", [*cli.SUBCOMMANDS, register])
    assert cli.main(["info", "--prompt", "a", "--preset", "tiny-random", "--num-frames", "1"]) == 0
    assert "late_cmd" not in sys.modules
    assert cli.main(["late", "x"]) == 0 and capsys.readouterr().out.endswith("ran x\n")


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory):
    """Files a user can get wrong: a text file and a corrupt mp4 as references, a damaged and a
    truncated weight file, a folder with only a config, the weights of another model."""
    import torch

    root = tmp_path_factory.mktemp("bad")
    (root / "notes.txt").write_text("not a picture")
    (root / "corrupt.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42" + bytes(range(256)) * 4)
    (root / "damaged.safetensors").write_bytes(b"\xff" * 64)
    good = (Path(__file__).resolve().parents[1] / "opensora_sdk" / "builtin" / "tiny" / "vae" / "model.safetensors")
    data = good.read_bytes()
    (root / "truncated.safetensors").write_bytes(data[: len(data) // 2])
    torch.save({"w": torch.zeros(1000)}, root / "whole.pth")
    whole = (root / "whole.pth").read_bytes()
    (root / "truncated.pth").write_bytes(whole[: len(whole) // 2])
    (root / "only_config").mkdir()
    (root / "only_config" / "config.json").write_text("{}")
    return root


@pytest.mark.parametrize(
    "args, message",
    [
        (["--resolution", "999p"], "resolution '999p' is not one of"),
        (["--aspect-ratio", "7:3"], "aspect_ratio '7:3' has no entry"),
        (["--preset", "huge"], "preset='huge' is not known"),
        (["--num-frames", "-3"], "num_frames '-3' must be a positive integer"),
        (["--num-frames", "0"], "num_frames 0 must be a positive integer"),
        (["--num-frames", "100000"], "needs 29412 latent frames; this model takes at most 10"),
        (["--reference-path", "missing.png"], "reference_path[0]='missing.png': file not found"),
        (["--reference-path", "{bad}/notes.txt"], "extension '.txt' is not supported"),
        (["--reference-path", "{bad}/corrupt.mp4"], "cannot be decoded as a video"),
        (["--prompt", ""], "is empty: give a text describing the video"),
        (["--camera-motion", "sideways"], "argument --camera-motion: invalid choice: 'sideways'"),
        (["--seed", "abc"], "--seed 'abc': expected an integer >= 0 or 'random'"),
        (["--dtype", "fp64"], "argument --dtype: invalid choice: 'fp64'"),
        (["--num-sampling-steps", "0"], "num_steps=0 is not allowed"),
        (["--cfg-scale", "nan"], "guidance_scale=nan is not allowed"),
        (["--loop", "0"], "loop=0 is not allowed"),
        (["--model", "{bad}/damaged.safetensors"], "damaged.safetensors' is not a readable .safetensors file"),
        (["--vae", "{bad}/truncated.safetensors"], "truncated.safetensors"),
        (["--vae", "{bad}/truncated.pth"], "truncated.pth' is truncated or damaged"),
        (["--model", "{bad}/only_config"], "no weights found in folder"),
        (["--text-encoder", "{bad}/only_config"], "no weights found in folder"),
        (["--vae", "{bad}/no/such/folder"], "not found"),
        (["--model", "opensora_sdk/builtin/tiny/vae"], "not an Open-Sora transformer"),
    ],
)
def test_every_bad_input_is_one_line_before_any_model_loads(no_model_loading, bad_files, tmp_path, capsys, args,
                                                             message):
    """The list of a new user's first hour: each is one line, exit 2, nothing written."""
    root = Path(__file__).resolve().parents[1]
    args = [a.replace("{bad}", str(bad_files)) for a in args]
    args = [str(root / a) if a.startswith("opensora_sdk/") else a for a in args]
    out = tmp_path / "out"
    prompt = [] if "--prompt" in args else ["--prompt", "a cat"]
    rc = cli.main(["generate", *prompt, "--save-dir", str(out), *args])
    err = capsys.readouterr().err
    assert rc == cli.EXIT_USAGE, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert message in err, err
    assert not out.exists() or not any(out.iterdir())  # no partial output


def test_cuda_without_cuda_and_an_unwritable_folder_are_one_line(no_model_loading, tmp_path, capsys):
    import torch

    if not torch.cuda.is_available():
        assert cli.main(["generate", "--prompt", "a cat", "--device", "cuda", "--save-dir", str(tmp_path)]) == 2
        err = capsys.readouterr().err
        assert "--device 'cuda': CUDA is not available" in err and len(err.strip().splitlines()) == 1
    (tmp_path / "ro").mkdir()
    (tmp_path / "ro" / "file").write_text("x")
    assert cli.main(["generate", "--prompt", "a cat", "--save-dir", str(tmp_path / "ro" / "file" / "sub")]) == 2
    assert "--save-dir" in capsys.readouterr().err


def test_debug_shows_the_traceback(no_model_loading, capsys):
    with pytest.raises(ValueError, match="resolution '999p'"):
        cli.main(["generate", "--prompt", "a cat", "--resolution", "999p", "--debug"])
