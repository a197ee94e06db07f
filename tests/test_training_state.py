"""EMA, checkpoints (atomic, loadable by STDiT3.from_pretrained), atomic file writes, RNG
states, features, config."""

from __future__ import annotations

import json
import os
import random

import numpy as np
import pytest
import torch
from torch import nn

from opensora_sdk import loading
from opensora_sdk.configs import STDIT3_PRESETS, preset
from opensora_sdk.models.stdit3 import STDiT3
from opensora_sdk.training import checkpoint as ckpt
from opensora_sdk.training import features as feats
from opensora_sdk.training.config import load_train_config
from opensora_sdk.training.ema import EMA
from opensora_sdk.training.lr_schedule import lr_factor


def tiny_stdit3() -> STDiT3:
    return STDiT3(preset("STDiT3-tiny", STDIT3_PRESETS))


# --------------------------------------------------------------------------------------------
# EMA
# --------------------------------------------------------------------------------------------


def test_ema_matches_the_closed_form_and_skips_frozen_weights():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))
    model[2].bias.requires_grad_(False)
    ema = EMA(model, decay=0.9)
    assert "2.bias" not in ema.shadow and "0.weight" in ema.shadow
    start = model[0].weight.detach().clone()
    values = [torch.randn(4, 3) for _ in range(5)]
    expected = start.double()
    for v in values:
        with torch.no_grad():
            model[0].weight.copy_(v)
            model[2].bias.add_(1.0)
        ema.update(model)
        expected = 0.9 * expected + 0.1 * v.double()
    torch.testing.assert_close(ema.shadow["0.weight"].double(), expected, rtol=0, atol=1e-6)
    full = ema.full_state_dict(model)
    assert set(full) == set(model.state_dict())  # buffers and frozen weights included
    assert torch.equal(full["2.bias"], model[2].bias.detach())  # frozen: the model's own value
    assert full["1.num_batches_tracked"].dtype == torch.int64
    ema.copy_to(model)
    assert torch.equal(model[0].weight, ema.shadow["0.weight"])
    with pytest.raises(ValueError, match="decay"):
        EMA(model, decay=1.5)
    with pytest.raises(ValueError, match="missing"):
        ema.load_state_dict({})


def test_ema_skips_named_tables_and_keeps_fp32():
    model = tiny_stdit3().to(torch.bfloat16)
    ema = EMA(model, skip=("pos_embed", "y_embedder"))
    assert all(t.dtype == torch.float32 for t in ema.shadow.values())
    assert not any(k.startswith("y_embedder") for k in ema.shadow)
    assert "rope.freqs" not in ema.shadow  # frozen in STDiT3


# --------------------------------------------------------------------------------------------
# Checkpoints
# --------------------------------------------------------------------------------------------


def save(root, step, model, **kw):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    args = dict(
        rank=0, is_main=True, barrier=lambda: None, model_config=model.config, model_state=model.state_dict(),
        ema_state=EMA(model).full_state_dict(model), optimizer_state=opt.state_dict(),
        scheduler_state={"last_epoch": step}, sampler_state={"seed": 1, "epoch": 0, "position": step, "num_replicas": 1},
        rng_state=ckpt.capture_rng_state(), train_state={"epoch": 0},
    )  # fmt: skip
    args.update(kw)
    return ckpt.save_checkpoint(root, step, **args)


def test_checkpoint_round_trip_loads_with_from_pretrained(tmp_path):
    torch.manual_seed(1)
    model = tiny_stdit3()
    folder = save(tmp_path, 7, model)
    assert folder.name == "step-00000007"
    assert sorted(p.name for p in folder.iterdir()) == [
        "ema", "lr_scheduler.pt", "model", "optimizer.pt", "rng", "sampler.json", "state.json"]  # fmt: skip
    for sub in ("model", "ema"):
        loaded = STDiT3.from_pretrained(folder / sub)
        assert loaded.config == model.config
        for key, value in model.state_dict().items():
            assert torch.equal(loaded.state_dict()[key], value), key
    state = ckpt.load_checkpoint(folder)
    assert state.train_state == {"step": 7, "epoch": 0}
    assert state.sampler_state["position"] == 7 and state.scheduler_state == {"last_epoch": 7}
    assert state.optimizer_state["param_groups"][0]["lr"] == 1e-3


def test_checkpoint_is_atomic_when_a_save_dies(tmp_path, monkeypatch):
    model = tiny_stdit3()
    good = save(tmp_path, 1, model)
    real = ckpt.write_model_folder
    calls = []

    def dies_on_ema(state, config, folder):
        calls.append(folder.name)
        if folder.name == "ema":
            raise OSError("disk full")
        real(state, config, folder)

    monkeypatch.setattr(ckpt, "write_model_folder", dies_on_ema)
    with pytest.raises(OSError, match="disk full"):
        save(tmp_path, 2, model)
    assert calls == ["model", "ema"]
    assert (tmp_path / ".tmp-step-00000002").is_dir()  # the half-written save stays hidden
    assert not (tmp_path / "step-00000002").exists()
    assert ckpt.list_checkpoints(tmp_path) == [good]
    assert ckpt.resolve_resume("latest", tmp_path) == good
    monkeypatch.setattr(ckpt, "write_model_folder", real)
    save(tmp_path, 3, model)
    assert not list(tmp_path.glob(".tmp-*"))  # the next save clears the leftovers
    assert ckpt.resolve_resume("latest", tmp_path).name == "step-00000003"


def test_keep_last_and_resave_of_the_same_step(tmp_path):
    model = tiny_stdit3()
    for step in (1, 2, 3):
        save(tmp_path, step, model, keep_last=2)
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["step-00000002", "step-00000003"]
    save(tmp_path, 3, model, train_state={"epoch": 5}, keep_last=2)
    assert ckpt.load_checkpoint(tmp_path / "step-00000003").train_state["epoch"] == 5
    with pytest.raises(FileNotFoundError, match="no complete checkpoint"):
        ckpt.resolve_resume("latest", tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="not a complete checkpoint"):
        ckpt.resolve_resume(tmp_path / "nothing", tmp_path)


# --------------------------------------------------------------------------------------------
# Atomic file writes (every file training writes goes through them)
# --------------------------------------------------------------------------------------------


def test_a_write_that_dies_leaves_the_previous_file_and_no_partial_one(tmp_path, monkeypatch):
    import safetensors.torch
    from safetensors.torch import load_file

    json_path, tensors_path, torch_path = tmp_path / "state.json", tmp_path / "model.safetensors", tmp_path / "optimizer.pt"
    loading.write_json_atomic({"step": 1}, json_path)
    loading.save_safetensors_atomic({"w": torch.ones(4)}, tensors_path)
    ckpt._torch_save({"step": 1}, torch_path)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}

    def dies_midway(tensors, filename, metadata=None):  # half a file on disk, then the crash
        with open(filename, "wb") as f:
            f.write(b"\x00" * 7)
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", dies_midway)
    with pytest.raises(OSError, match="disk full"):
        loading.save_safetensors_atomic({"w": torch.zeros(4)}, tensors_path)
    monkeypatch.undo()

    def killed(src, dst):  # the process dies after writing the temp file, before the rename
        raise OSError("killed before the rename")

    monkeypatch.setattr(os, "replace", killed)
    for write in (lambda: loading.write_json_atomic({"step": 2}, json_path),
                  lambda: loading.save_safetensors_atomic({"w": torch.zeros(4)}, tensors_path),
                  lambda: ckpt._torch_save({"step": 2}, torch_path),
                  lambda: loading.write_text_atomic("step,loss\n", tmp_path / "log.csv")):  # fmt: skip
        with pytest.raises(OSError, match="killed before the rename"):
            write()
    monkeypatch.undo()

    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before  # no temp file, no partial file
    assert json.loads(json_path.read_text()) == {"step": 1}
    assert torch.equal(load_file(str(tensors_path))["w"], torch.ones(4))
    assert torch.load(torch_path, weights_only=True) == {"step": 1}


def test_atomic_writes_fsync_the_file_and_the_folder(tmp_path, monkeypatch):
    synced = []
    real_fsync = os.fsync

    def spy(fd):
        synced.append(os.fstat(fd).st_ino)
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", spy)
    path = tmp_path / "sub" / "summary.json"
    loading.write_json_atomic({"a": 1}, path)
    assert path.stat().st_ino in synced  # the temp file, renamed into place
    if os.name != "nt":  # a folder cannot be fsynced on Windows
        assert path.parent.stat().st_ino in synced
    synced.clear()
    folder = save(tmp_path / "checkpoints", 1, tiny_stdit3())
    assert (folder / "state.json").stat().st_ino in synced and (folder / "model" / "model.safetensors").stat().st_ino in synced
    if os.name != "nt":
        assert folder.parent.stat().st_ino in synced  # the checkpoint folder's rename
    synced.clear()
    loading.append_line("1,0.5", tmp_path / "log.csv")
    loading.append_line("2,0.4", tmp_path / "log.csv")
    assert (tmp_path / "log.csv").read_text() == "1,0.5\n2,0.4\n" and len(synced) == 2


def test_rng_state_round_trip():
    gen = torch.Generator().manual_seed(5)
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    state = ckpt.capture_rng_state({"train": gen})
    first = (random.random(), np.random.rand(), torch.rand(2), torch.rand(2, generator=gen))
    random.seed(9), np.random.seed(9), torch.manual_seed(9), gen.manual_seed(9)
    ckpt.restore_rng_state(state, {"train": gen})
    again = (random.random(), np.random.rand(), torch.rand(2), torch.rand(2, generator=gen))
    assert first[:2] == again[:2] and torch.equal(first[2], again[2]) and torch.equal(first[3], again[3])
    with pytest.raises(KeyError, match="encode"):
        ckpt.restore_rng_state(state, {"encode": gen})


# --------------------------------------------------------------------------------------------
# Precomputed features
# --------------------------------------------------------------------------------------------


def test_features_round_trip_across_ranks(tmp_path):
    meta = {"data": "d.csv", "buckets": {"32px": {17: [1.0, 2]}}}
    items = []
    for rank in range(2):
        writer = feats.FeatureWriter(tmp_path, rank=rank, shard_size=2)
        for n in range(3):
            idx = 2 * n + rank
            x, y = torch.randn(4, 5, 4, 4), torch.randn(8, 6)
            mask = torch.tensor([1] * (idx + 1) + [0] * (7 - idx))
            items.append((idx, x, y, mask))
            writer.add(index=idx, bucket=("32px", 17, "1.00"), x=x, y=y, mask=mask, text=f"t{idx}", fps=24.0,
                       num_frames=17, height=32, width=32, frame_mask="chunk_head" if idx == 3 else "")  # fmt: skip
        writer.close()
    feats.merge_indices(tmp_path, 2, meta)
    assert feats.check_existing(tmp_path, meta)
    with pytest.raises(ValueError, match="buckets: stored"):
        feats.check_existing(tmp_path, {**meta, "buckets": {"32px": {17: [1.0, 4]}}})
    data = feats.FeatureDataset(tmp_path, model_max_length=10)
    assert len(data) == 6 and data.assignments == [("32px", 17, "1.00")] * 6
    for idx, x, y, mask in items:
        s = data[idx]  # entries are ordered by sample index
        n = int(mask.sum())
        assert s["index"] == idx and torch.equal(s["x"], x) and s["text"] == f"t{idx}"
        assert s["y"].shape == (1, 10, 6) and torch.equal(s["y"][0, :n], y[:n]) and not s["y"][0, n:].any()
        assert s["mask"].tolist() == [1] * n + [0] * (10 - n)
        assert s["frame_mask"] == ("chunk_head" if idx == 3 else "")  # a row's own frame-mask type travels along
    with pytest.raises(ValueError, match="model_max_length is 3"):
        feats.FeatureDataset(tmp_path, model_max_length=3)[5]
    plan = feats.extraction_plan([("a", 1, "1")] * 5 + [None], batch_size=2, rank=1, world_size=2)
    assert plan == [(("a", 1, "1"), [2, 3])]


# --------------------------------------------------------------------------------------------
# Config
# --------------------------------------------------------------------------------------------


def test_config_checks_keys_and_values(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("data: {csv: d.csv, buckets: stage3}\ntext_encoder: {tiny_t5: {}}\n")
    cfg = load_train_config(path, ["optim.lr=3e-4", "model.gradient_checkpointing=true"])
    assert cfg.optim.lr == 3e-4 and cfg.model.gradient_checkpointing and cfg.optim.eps == 1e-15
    assert (cfg.optim.warmup_steps, cfg.optim.ema_decay, cfg.optim.grad_clip) == (1000, 0.99, 1.0)
    with pytest.raises(ValueError, match=r"section 'optim': unknown key\(s\) \['lrate'\]"):
        load_train_config(path, ["optim.lrate=1"])
    with pytest.raises(ValueError, match=r"optim.lr=-1 is not allowed"):
        load_train_config(path, ["optim.lr=-1"])
    with pytest.raises(ValueError, match="mixed_precision='fp8'"):
        load_train_config(path, ["mixed_precision=fp8"])
    with pytest.raises(ValueError, match="exactly one of text_encoder"):
        load_train_config(path, ["text_encoder.from_pretrained=DeepFloyd/t5-v1_1-xxl"])
    with pytest.raises(ValueError, match="key.path=value"):
        load_train_config(path, ["optim.lr"])
    with pytest.raises(ValueError, match=r"optim.decay_steps=2000 is not allowed: an integer in \[0, max_steps=1000\]"):
        load_train_config(path, ["optim.decay_steps=2000"])


def test_lr_factor_warms_up_holds_then_decays_to_zero():
    f = [lr_factor(k, warmup_steps=2, max_steps=10, decay_steps=4) for k in range(10)]
    assert f == pytest.approx([1 / 3, 2 / 3, 1, 1, 1, 1, 1, 3 / 4, 2 / 4, 1 / 4])
    assert [lr_factor(k, warmup_steps=2, max_steps=10) for k in range(10)] == pytest.approx([1 / 3, 2 / 3] + [1] * 8)
    assert lr_factor(5, warmup_steps=0, max_steps=6, decay_steps=6) == pytest.approx(1 / 6)
    # the constant phase does not depend on max_steps: raising it later extends the same run
    assert [lr_factor(k, warmup_steps=2, max_steps=10, decay_steps=4) for k in range(6)] == [
        lr_factor(k, warmup_steps=2, max_steps=100, decay_steps=4) for k in range(6)]
