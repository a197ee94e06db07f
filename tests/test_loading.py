"""The loading module: every checkpoint format, strict reports, meta-device assignment."""

import json
import pickle

import pytest
import torch
from torch import nn

from opensora_sdk.loading import (
    CheckpointError,
    load_tensors_into,
    read_state_dict,
    resolve_checkpoint,
    save_safetensors_atomic,
)


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(3, 4)
        self.register_buffer("table", torch.arange(4.0))
        self.register_buffer("count", torch.tensor(2))


def _weights():
    torch.manual_seed(1)
    return {k: torch.randn_like(v.float()).to(v.dtype) for k, v in Tiny().state_dict().items()}


def _meta_model():
    with torch.device("meta"):
        return Tiny()


def test_single_safetensors_loads_on_meta_in_target_dtype(tmp_path):
    sd = _weights()
    save_safetensors_atomic(sd, tmp_path / "w.safetensors")
    model = _meta_model()
    report = load_tensors_into(model, read_state_dict(tmp_path / "w.safetensors").items(), dtype=torch.bfloat16)
    assert report.ok
    assert model.proj.weight.dtype == torch.bfloat16 and not model.proj.weight.is_meta
    assert model.count.dtype == sd["count"].dtype  # integer buffers keep their dtype
    torch.testing.assert_close(model.proj.weight.float(), sd["proj.weight"].bfloat16().float())


def test_hf_folder_with_sharded_index(tmp_path):
    sd = _weights()
    save_safetensors_atomic({"proj.weight": sd["proj.weight"]}, tmp_path / "a.safetensors")
    save_safetensors_atomic({k: v for k, v in sd.items() if k != "proj.weight"}, tmp_path / "b.safetensors")
    weight_map = {"proj.weight": "a.safetensors", **{k: "b.safetensors" for k in sd if k != "proj.weight"}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    (tmp_path / "config.json").write_text("{}")
    resolved = resolve_checkpoint(tmp_path)
    assert [p.name for p in resolved.weight_files] == ["a.safetensors", "b.safetensors"]
    assert resolved.config_file == tmp_path / "config.json"
    loaded = read_state_dict(tmp_path)
    assert set(loaded) == set(sd)



def test_a_damaged_config_json_is_an_error_not_a_guess(tmp_path):
    """An unreadable config.json beside the weights stops the load with its name (guessing the
    architecture from the keys instead could silently pick another model)."""
    from opensora_sdk.models.auto import transformer_kind, vae_kind

    save_safetensors_atomic(_weights(), tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text('{"model_type": "STDiT3", ')
    for kind in (transformer_kind, vae_kind):
        with pytest.raises(CheckpointError, match=r"config\.json' cannot be read as JSON"):
            kind(tmp_path)


@pytest.mark.parametrize("wrapper", ["ema", "model", "state_dict"])
def test_pth_wrappers_and_prefixes_are_unwrapped(tmp_path, wrapper):
    sd = _weights()
    other = {k: torch.zeros_like(v) for k, v in sd.items()}
    payload = {wrapper: {f"module.{k}": v for k, v in sd.items()}, "step": 3}
    if wrapper == "ema":
        payload["model"] = other
    torch.save(payload, tmp_path / "ckpt.pth")
    loaded = read_state_dict(tmp_path / "ckpt.pth")
    assert set(loaded) == set(sd)
    torch.testing.assert_close(loaded["proj.weight"], sd["proj.weight"])


def test_prefer_raw_weights_over_ema(tmp_path):
    sd = _weights()
    torch.save({"ema": {k: v + 1 for k, v in sd.items()}, "model": sd}, tmp_path / "ckpt.pt")
    loaded = read_state_dict(tmp_path / "ckpt.pt", prefer="model")
    torch.testing.assert_close(loaded["table"], sd["table"])


def test_pickled_code_is_refused(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("side effect",))

    with open(tmp_path / "evil.pth", "wb") as f:
        pickle.dump({"x": Evil()}, f)
    with pytest.raises(CheckpointError, match="weights_only"):
        read_state_dict(tmp_path / "evil.pth")


def test_strict_report_names_every_problem_and_leaves_model_untouched(tmp_path):
    sd = _weights()
    sd["proj.bias"] = torch.zeros(5)  # wrong shape
    sd["extra.weight"] = torch.zeros(1)  # unexpected
    del sd["table"]  # missing
    model = Tiny()
    before = model.proj.weight.clone()
    with pytest.raises(CheckpointError) as info:
        load_tensors_into(model, sd.items())
    text = str(info.value)
    assert "missing from the checkpoint (1)" in text and "table" in text
    assert "unexpected in the checkpoint (1)" in text and "extra.weight" in text
    assert "proj.bias: checkpoint [5] vs model [4]" in text
    torch.testing.assert_close(model.proj.weight, before)


def test_non_strict_on_initialised_model_reports_and_keeps_the_rest():
    sd = _weights()
    del sd["table"]
    model = Tiny()
    report = load_tensors_into(model, sd.items(), strict=False)
    assert report.missing == ["table"]
    torch.testing.assert_close(model.table, torch.arange(4.0))


def test_non_strict_on_meta_model_refuses_to_leave_empty_tensors():
    sd = _weights()
    del sd["table"]
    with pytest.raises(CheckpointError, match="were not in the checkpoint"):
        load_tensors_into(_meta_model(), sd.items(), strict=False)


def test_missing_path_and_offline_hub_errors_are_clear(tmp_path, monkeypatch):
    with pytest.raises(CheckpointError, match="not found"):
        resolve_checkpoint(tmp_path / "nope.safetensors")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(CheckpointError, match="huggingface-cli download some-org/some-model"):
        resolve_checkpoint("some-org/some-model")


def test_atomic_save_leaves_no_partial_file(tmp_path):
    target = tmp_path / "out.safetensors"
    with pytest.raises(Exception):
        save_safetensors_atomic({"x": object()}, target)  # not a tensor
    assert not target.exists()
    assert list(tmp_path.iterdir()) == []
