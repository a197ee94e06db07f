"""training/train_vae.py checkpoints through opensora_sdk.training.checkpoint: the shared layout
(one root per stage), and a resumed run that ends bit-identical to one never interrupted."""

from __future__ import annotations

import importlib.util
import json
import logging
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from opensora_sdk.models.vae import VideoAutoencoder
from opensora_sdk.training import checkpoint as ckpt

ROOT = Path(__file__).resolve().parents[1]
TOY = [
    "--config", "training/configs/tiny_vae.yaml", "--set", "max_clips=3", "--set", "eval_clips=1",
    "--set", "normalize_clips=2", "--set", "temporal_cache_clips=2", "--set", "ckpt_every=1", "--set", "log_every=1",
    "--set", "spatial.steps=2", "--set", "spatial.batch_size=2", "--set", "temporal.steps=2",
    "--set", "temporal.batch_size=1", "--set", "temporal.frames=5", "--set", "joint.batch_size=1",
    "--set", "joint.frames=5", "--set", "decoder.steps=0",
]  # fmt: skip


@pytest.fixture(scope="module")
def train_vae():
    name = "opensora_train_vae_script"
    spec = importlib.util.spec_from_file_location(name, ROOT / "training" / "train_vae.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    yield module
    del sys.modules[name]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from opensora_sdk.training import synthetic

    return synthetic.generate_dataset(tmp_path_factory.mktemp("vae_data"), 4, size=32, num_frames=9, seed=0)


@pytest.fixture
def run(train_vae, data, monkeypatch):
    monkeypatch.chdir(ROOT)
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level

    def go(out: Path, *extra: str) -> dict:
        return train_vae.main([*TOY, "--output-dir", str(out), "--set", f"data_csv={data}", *extra])

    yield go
    root.handlers[:], root.level = handlers, level  # main() configures logging for its own run


@pytest.mark.slow
def test_vae_checkpoints_are_the_shared_format_and_resume_exactly(tmp_path, train_vae, run):
    full = tmp_path / "full"
    summary = run(full, "--set", "joint.steps=2")
    root = full / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == ["0-spatial", "1-temporal", "2-joint"]
    roots = [train_vae.stage_root(root, stage) for stage in train_vae.STAGES]
    last = ckpt.resolve_resume("latest", *roots)
    assert last == root / "2-joint" / "step-00000002"
    assert [p.name for p in ckpt.list_checkpoints(root / "0-spatial")] == ["step-00000001", "step-00000002"]
    assert sorted(p.name for p in last.iterdir()) == ["model", "optimizer.pt", "rng", "state.json"]
    assert not list(root.rglob(".*"))  # no temp folder or file left behind

    state = ckpt.load_checkpoint(last)
    assert state.train_state["stage"] == "joint" and state.train_state["step"] == 2
    assert "vae" in state.rng_state["generators"] and state.optimizer_state["state"]
    vae = VideoAutoencoder.from_pretrained(last / "model", dtype=torch.float32)  # the model folder loads as a VAE
    assert all(torch.equal(v, state.model_state[k]) for k, v in vae.state_dict().items())

    cut = tmp_path / "cut"  # stopped after the first joint step, then resumed from it
    run(cut, "--set", "joint.steps=1")
    assert ckpt.resolve_resume("latest", *[train_vae.stage_root(cut / "checkpoints", s) for s in train_vae.STAGES]).parts[-2:] == (
        "2-joint", "step-00000001")  # fmt: skip
    resumed = run(cut, "--set", "joint.steps=2", "--resume", "latest")
    a, b = load_file(str(full / "vae" / "model.safetensors")), load_file(str(cut / "vae" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert resumed["video_psnr_db"] == summary["video_psnr_db"]
    assert json.loads((cut / "checkpoints" / "2-joint" / "step-00000002" / "state.json").read_text())["stage"] == "joint"


@pytest.mark.slow
def test_vae_resume_names_what_is_missing(tmp_path, run):
    with pytest.raises(FileNotFoundError, match="no complete checkpoint"):
        run(tmp_path / "empty", "--resume", "latest")
