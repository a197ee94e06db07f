"""End-to-end runs of training/train.py on tiny models and synthetic clips (CPU, seconds each).

The checks: the tiny recipe's loss falls; a run stopped by SIGTERM and resumed equals an
uninterrupted run bit for bit; `accelerate launch` with 2 processes (gloo) keeps ranks in sync;
a corrupt or missing video is skipped and counted; precomputed features are written once;
sequence parallelism over two processes trains like one process.
"""

from __future__ import annotations

import csv
import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from opensora_sdk.training import synthetic

REPO = Path(__file__).resolve().parents[1]
TRAIN = REPO / "training" / "train.py"
TINY = REPO / "training" / "configs" / "tiny_cpu.yaml"

pytestmark = pytest.mark.slow


def load_trainer():
    spec = importlib.util.spec_from_file_location("opensora_train_script", TRAIN)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class Trainer:
    """train.main in this process; accelerate's process-wide state is reset before each run."""

    def __init__(self):
        self.module = load_trainer()

    def main(self, argv):
        from accelerate.state import AcceleratorState, GradientState

        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()
        return self.module.main(argv)


@pytest.fixture(scope="module")
def trainer():
    threads = torch.get_num_threads()
    yield Trainer()
    torch.set_num_threads(threads)  # the runs pin one thread (bitwise-stable CPU math)


@pytest.fixture(scope="module")
def clips(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("clips")
    return synthetic.generate_dataset(out, 24, size=32, num_frames=20, seed=0, image_fraction=0.1)


def args_for(csv_path, out, *extra) -> list[str]:
    """The tiny recipe, shrunk: 32x32 clips, 17-frame buckets of 4, video path (no features)."""
    sets = [
        f"data.csv={csv_path}", "features.dir=null", "data.extra_resolutions={32px: 1024}",
        "data.buckets={32px: {1: [1.0, 2], 17: [1.0, 4]}}", "cpu_threads=1", "log_every=1", "ckpt_every=1000",
    ]  # fmt: skip
    argv = ["--config", str(TINY), "--output-dir", str(out)]
    for s in sets:
        argv += ["--set", s]
    return argv + list(extra)


def log_rows(out) -> list[dict]:
    path = Path(out) / "logs" / "train_log.csv"
    if not path.exists():
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def tensors(folder) -> dict[str, torch.Tensor]:
    out = {f"model/{k}": v for k, v in load_file(str(folder / "model" / "model.safetensors")).items()}
    out.update({f"ema/{k}": v for k, v in load_file(str(folder / "ema" / "model.safetensors")).items()})
    optim = torch.load(folder / "optimizer.pt", weights_only=True)
    for i, state in optim["state"].items():
        out.update({f"optim/{i}/{k}": torch.as_tensor(v) for k, v in state.items()})
    return out


def subprocess_env(tmp_path) -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "HF_HOME": str(tmp_path / "hf"), "PYTHONUNBUFFERED": "1"}


def test_tiny_recipe_loss_falls(trainer, clips, tmp_path):
    summary = trainer.main(args_for(clips, tmp_path, "--max-steps", "30"))
    losses = [float(r["loss"]) for r in log_rows(tmp_path)]
    assert summary["step"] == 30 and len(losses) == 30
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < 0.8 * first, (first, last)
    rows = log_rows(tmp_path)
    assert float(rows[0]["lr"]) == pytest.approx(5e-4 / 101)  # warm-up: (k + 1) / (warmup + 1) * lr
    assert all(float(r["samples_per_s"]) > 0 and float(r["tokens_per_s"]) > 0 for r in rows)
    assert (tmp_path / "checkpoints" / "step-00000030" / "ema" / "model.safetensors").is_file()


def test_sigterm_then_resume_equals_an_uninterrupted_run(trainer, clips, tmp_path):
    stopped = tmp_path / "stopped"
    proc = subprocess.Popen([sys.executable, str(TRAIN), *args_for(clips, stopped, "--max-steps", "1000")], cwd=REPO,
                            env=subprocess_env(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.STDOUT)  # fmt: skip
    try:
        deadline = time.time() + 120
        while time.time() < deadline and proc.poll() is None:
            rows = log_rows(stopped)
            if rows and int(rows[-1]["step"]) >= 3:
                break
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        output = proc.communicate(timeout=120)[0].decode(errors="replace")
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, output[-3000:]
    summary = json.loads((stopped / "summary.json").read_text())
    k = summary["step"]
    assert summary["stopped_by_signal"] and 3 <= k < 1000
    assert Path(summary["checkpoint"]).name == f"step-{k:08d}"

    n = k + 4  # crosses an epoch boundary (6 micro-batches per epoch)
    resumed = trainer.main(args_for(clips, stopped, "--max-steps", str(n), "--resume", "latest"))
    straight = trainer.main(args_for(clips, tmp_path / "straight", "--max-steps", str(n)))
    assert resumed["step"] == straight["step"] == n and resumed["epoch"] == straight["epoch"] >= 1
    a = tensors(stopped / "checkpoints" / f"step-{n:08d}")
    b = tensors(tmp_path / "straight" / "checkpoints" / f"step-{n:08d}")
    assert a.keys() == b.keys() and len(a) > 50
    different = [key for key in a if not torch.equal(a[key], b[key])]
    assert not different, different[:5]
    assert [int(r["step"]) for r in log_rows(stopped)] == list(range(1, n + 1))  # no duplicated rows
    assert [r["loss"] for r in log_rows(stopped)] == [r["loss"] for r in log_rows(tmp_path / "straight")]


def test_lr_decay_after_raising_max_steps_equals_one_run(trainer, clips, tmp_path):
    """A run stopped in its constant phase, resumed with a larger max_steps and a decay, is the
    run that had those settings from the start (how the built-in recipe is extended)."""
    first, straight = tmp_path / "first", tmp_path / "straight"
    decay = ["--set", "optim.decay_steps=3", "--set", "optim.warmup_steps=0"]
    trainer.main(args_for(clips, first, "--max-steps", "3", "--set", "optim.warmup_steps=0"))
    resumed = trainer.main(args_for(clips, first, "--max-steps", "7", "--resume", "latest", *decay))
    trainer.main(args_for(clips, straight, "--max-steps", "7", *decay))
    assert resumed["step"] == 7
    lrs = [float(r["lr"]) for r in log_rows(straight)]
    assert lrs == pytest.approx([5e-4] * 5 + [5e-4 * 2 / 3, 5e-4 / 3])  # factor min(1, (7 - k) / 3)
    a, b = tensors(first / "checkpoints" / "step-00000007"), tensors(straight / "checkpoints" / "step-00000007")
    assert not [key for key in a if not torch.equal(a[key], b[key])]
    assert [r["lr"] for r in log_rows(first)] == [r["lr"] for r in log_rows(straight)]


def test_accelerate_launch_two_cpu_processes_stay_in_sync(clips, tmp_path):
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", str(TRAIN), *args_for(clips, out, "--max-steps", "4")]  # fmt: skip
    result = subprocess.run(cmd, cwd=REPO, env=subprocess_env(tmp_path), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["step"] == 4
    assert summary["ranks_in_sync"] and summary["param_digest"][0] == summary["param_digest"][1]
    folder = out / "checkpoints" / "step-00000004"
    assert (folder / "rng" / "rank0.pt").is_file() and (folder / "rng" / "rank1.pt").is_file()
    assert json.loads((folder / "sampler.json").read_text())["num_replicas"] == 2
    rng0 = torch.load(folder / "rng" / "rank0.pt", weights_only=True)["generators"]["train"]
    rng1 = torch.load(folder / "rng" / "rank1.pt", weights_only=True)["generators"]["train"]
    assert not torch.equal(rng0, rng1)  # ranks draw different noise


def test_sequence_parallel_over_two_processes_trains_like_one(trainer, clips, tmp_path):
    """sp_size=2 on 2 processes: one data-parallel rank, tokens sharded; same run as 1 process."""
    sp = tmp_path / "sp"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", str(TRAIN),
           *args_for(clips, sp, "--max-steps", "3", "--set", "sp_size=2")]  # fmt: skip
    result = subprocess.run(cmd, cwd=REPO, env=subprocess_env(tmp_path), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    single = trainer.main(args_for(clips, tmp_path / "one", "--max-steps", "3"))
    summary = json.loads((sp / "summary.json").read_text())
    assert summary["ranks_in_sync"] and summary["world_size"] == 2
    for a, b in zip(log_rows(sp), log_rows(tmp_path / "one")):
        assert float(a["loss"]) == pytest.approx(float(b["loss"]), abs=1e-5)
        assert float(a["grad_norm"]) == pytest.approx(float(b["grad_norm"]), rel=1e-4)
    assert summary["param_digest"][0] == pytest.approx(single["param_digest"][0], rel=1e-5)


def test_corrupt_and_missing_videos_are_skipped_and_counted(trainer, clips, tmp_path):
    with open(clips, newline="") as f:
        rows = list(csv.DictReader(f))
    for r in rows:
        r["path"] = str(clips.parent / r["path"])
    (tmp_path / "broken.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42" + os.urandom(2048))
    video = next(r for r in rows if r["num_frames"] == "20")
    rows += [dict(video, path=str(tmp_path / "broken.mp4")), dict(video, path=str(tmp_path / "missing.mp4"))]
    path = synthetic.write_csv(rows, tmp_path / "with_bad_rows.csv")
    summary = trainer.main(args_for(path, tmp_path / "run", "--max-steps", "14"))
    assert summary["step"] == 14 and summary["skipped"] >= 2
    assert int(log_rows(tmp_path / "run")[-1]["skipped"]) == summary["skipped"]


def test_precomputed_features_are_written_once(trainer, clips, tmp_path):
    features = tmp_path / "features"
    extra = ["--set", f"features.dir={features}", "--max-steps", "3"]
    first = trainer.main(args_for(clips, tmp_path / "a", *extra))
    index = json.loads((features / "index.json").read_text())
    assert first["step"] == 3 and len(index["entries"]) >= 20
    from opensora_sdk.models import T5TextEncoder, VideoAutoencoder
    from opensora_sdk.training.features import FeatureDataset

    saved = tmp_path / "a" / "random_encoders"  # the random frozen encoders, kept for sampling
    assert VideoAutoencoder.from_pretrained(saved / "vae").config.vae_2d.block_out_channels == (4, 8, 16, 16)
    t5 = T5TextEncoder.from_pretrained(saved / "text_encoder", model_max_length=40)
    sample = FeatureDataset(features, model_max_length=40)[0]
    y, mask = t5.encode([sample["text"]])
    assert torch.equal(mask[0], sample["mask"]) and torch.allclose(y[0, 0] * mask[0, :, None], sample["y"][0], atol=1e-6)
    shards = {p: p.stat().st_mtime_ns for p in features.glob("shard-*.safetensors")}
    second = trainer.main(args_for(clips, tmp_path / "b", *extra))
    assert second["step"] == 3 and {p: p.stat().st_mtime_ns for p in features.glob("shard-*.safetensors")} == shards
    with pytest.raises(ValueError, match="extracted with other settings"):
        trainer.main(args_for(clips, tmp_path / "c", *extra, "--set", "data.frame_interval=2"))


def test_accumulation_bf16_and_checkpointing_run(trainer, clips, tmp_path):
    extra = ["--set", "optim.gradient_accumulation_steps=2", "--set", "mixed_precision=bf16",
             "--set", "model.gradient_checkpointing=true", "--max-steps", "2"]  # fmt: skip
    summary = trainer.main(args_for(clips, tmp_path, *extra))
    assert summary["step"] == 2 and summary["last_loss"] == summary["last_loss"]  # finite, not NaN
    state = json.loads((tmp_path / "checkpoints" / "step-00000002" / "sampler.json").read_text())
    assert state["position"] == 4  # two micro-batches per optimizer step


def test_sequence_parallel_size_must_divide_the_processes(trainer, clips, tmp_path):
    with pytest.raises(ValueError, match="sp_size=2 must divide the number of processes"):
        trainer.main(args_for(clips, tmp_path, "--set", "sp_size=2", "--max-steps", "1"))
