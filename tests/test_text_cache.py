"""Prompt embeddings kept between runs: a deferred T5 (loaded only when a prompt is not cached),
its file identity, the bounded cache folder, and `opensora generate`'s default text cache."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from opensora_sdk.loading import CheckpointError
from opensora_sdk.models import T5TextEncoder
from opensora_sdk.models.text_cache import EmbeddingCache, default_cache_folder
from opensora_sdk.presets import BUILTIN_DIR

TEXT = BUILTIN_DIR / "text_encoder"
PROMPTS = ["a red circle moving right on a black background", "a blue square moving up on a gray background"]


@pytest.fixture
def t5_folder(tmp_path):
    """A copy of the built-in T5 folder (its files may be changed by the test)."""
    return Path(shutil.copytree(TEXT, tmp_path / "t5"))


def deferred(folder, **kw):
    kw.setdefault("model_max_length", 40)
    return T5TextEncoder.from_pretrained(folder, lazy=True, **kw)


# ---- the deferred encoder ---------------------------------------------------------------------


def test_a_deferred_encoder_loads_on_the_first_encode_and_equals_the_eager_one(t5_folder):
    lazy = deferred(t5_folder)
    assert not lazy.is_loaded and "not loaded yet" in repr(lazy)
    assert (lazy.output_dim, lazy.dtype) == (64, torch.float32)  # from config.json, nothing loaded
    lazy.offload()  # a T5 that is not loaded is on no device: nothing to do, nothing loads
    assert not lazy.is_loaded
    eager = T5TextEncoder.from_pretrained(t5_folder, model_max_length=40)
    got, want = lazy.encode(PROMPTS), eager.encode(PROMPTS)
    assert lazy.is_loaded
    assert torch.equal(got.y, want.y) and torch.equal(got.mask, want.mask)
    assert (lazy.output_dim, lazy.dtype) == (eager.output_dim, eager.dtype)


def test_a_cache_hit_never_loads_t5_and_gives_the_same_rows(t5_folder, tmp_path):
    first = deferred(t5_folder, cache=tmp_path / "cache")
    cold = first.encode(PROMPTS)
    assert len(list((tmp_path / "cache").glob("*.safetensors"))) == 2
    second = deferred(t5_folder, cache=tmp_path / "cache")  # a new process, in effect
    warm = second.encode(list(reversed(PROMPTS)))
    assert not second.is_loaded
    assert torch.equal(warm.y, cold.y.flip(0)) and torch.equal(warm.mask, cold.mask.flip(0))


def test_a_single_file_t5_can_be_deferred_too(t5_folder, tmp_path):
    weights = t5_folder / "model.safetensors"  # its tokenizer files lie beside it
    lazy = T5TextEncoder.from_single_file(weights, model_max_length=40, lazy=True, cache=tmp_path / "c")
    assert not lazy.is_loaded and lazy.output_dim == 64
    eager = T5TextEncoder.from_single_file(weights, model_max_length=40)
    assert torch.equal(lazy.encode(PROMPTS).y, eager.encode(PROMPTS).y) and lazy.is_loaded
    again = T5TextEncoder.from_single_file(weights, model_max_length=40, lazy=True, cache=tmp_path / "c")
    assert torch.equal(again.encode(PROMPTS[1]).y[0], eager.encode(PROMPTS[1]).y[0]) and not again.is_loaded
    given = T5TextEncoder.from_single_file(weights, model_max_length=40, lazy=True, tokenizer=eager.tokenizer)
    assert given.identity != again.identity and torch.equal(given.encode(PROMPTS[0]).y, eager.encode(PROMPTS[0]).y)
    with pytest.raises(FileNotFoundError, match="neither tokenizer.json nor spiece.model"):
        T5TextEncoder.from_single_file(weights, lazy=True, tokenizer=tmp_path)


def test_the_file_identity_changes_with_the_files_dtype_device_and_fp8(t5_folder):
    a, b = deferred(t5_folder), deferred(t5_folder)
    assert a.cache_key(PROMPTS[0]) == b.cache_key(PROMPTS[0])
    assert a.cache_key(PROMPTS[0]) != a.cache_key(PROMPTS[1])
    assert a.cache_key(PROMPTS[0]) != a.cache_key(PROMPTS[0], device="meta")  # another device type
    assert deferred(t5_folder, dtype=torch.bfloat16).cache_key(PROMPTS[0]) != a.cache_key(PROMPTS[0])
    b.enable_fp8()
    assert not b.is_loaded and b.cache_key(PROMPTS[0]) != a.cache_key(PROMPTS[0])
    weights = t5_folder / "model.safetensors"
    stat = weights.stat()
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # the file was replaced
    assert deferred(t5_folder).cache_key(PROMPTS[0]) != a.cache_key(PROMPTS[0])
    (t5_folder / "tokenizer_config.json").write_text(
        (t5_folder / "tokenizer_config.json").read_text().replace("}", ', "extra": 1}', 1))
    assert deferred(t5_folder).identity != a.identity


def test_fp8_asked_before_loading_is_applied_when_t5_loads(t5_folder):
    from opensora_sdk.fp8 import FP8Linear

    lazy = deferred(t5_folder)
    lazy.enable_fp8("per_tensor")
    assert lazy.fp8_scales == "per_tensor" and not lazy.is_loaded
    lazy.encode(PROMPTS[0])
    assert any(isinstance(m, FP8Linear) for m in lazy.model.modules())
    eager = T5TextEncoder.from_pretrained(t5_folder, model_max_length=40)
    eager.enable_fp8("per_tensor")
    assert eager.fp8_scales == "per_tensor"
    assert torch.equal(lazy.encode(PROMPTS[1]).y, eager.encode(PROMPTS[1]).y)


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda f: (f / "config.json").write_text(json.dumps({"model_type": "t5"})), "d_model"),
        (lambda f: [(f / n).unlink() for n in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")],
         "no T5 tokenizer found"),
        (lambda f: (f / "config.json").write_text(
            (f / "config.json").read_text().replace('"d_model": 64', '"d_model": 96')), "96"),
        (lambda f: (f / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{"), "model.safetensors"),
    ],
    ids=["no d_model", "no tokenizer", "width", "cut file"],
)
def test_a_broken_folder_fails_when_the_encoder_is_made_not_later(t5_folder, damage, message):
    damage(t5_folder)
    with pytest.raises((CheckpointError, FileNotFoundError), match=message):
        deferred(t5_folder)


# ---- the cache folder ---------------------------------------------------------------------------


def test_the_folder_keeps_at_most_max_bytes_and_drops_the_least_recently_used(tmp_path):
    cache = EmbeddingCache(max_items=0, folder=tmp_path, max_bytes=10_000)
    row = (torch.randn(8, 64), torch.ones(8, dtype=torch.int64))  # a file of about 2.2 kB
    for i in range(3):
        cache.put(f"k{i}", *row)
        path = tmp_path / f"k{i}.safetensors"
        os.utime(path, ns=(10**18 + i * 10**9,) * 2)  # distinct ages, oldest first
    size = (tmp_path / "k0.safetensors").stat().st_size
    assert cache.get("k0") is not None  # a hit marks k0 as used now
    cache.max_bytes = 3 * size
    cache.put("k3", *row)
    left = sorted(p.stem for p in tmp_path.glob("*.safetensors"))
    assert left == ["k0", "k2", "k3"]  # k1 was used longest ago
    assert torch.equal(cache.get("k3")[0], row[0])


def test_a_cache_folder_that_cannot_be_written_warns_once_and_loses_nothing(tmp_path, t5_folder):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    enc = deferred(t5_folder, cache=EmbeddingCache(folder=blocker / "cache"))
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        out = enc.encode(PROMPTS)
    assert len([w for w in seen if "cannot store embeddings" in str(w.message)]) == 1
    assert out.y.shape[0] == 2 and torch.isfinite(out.y).all()


def test_the_default_folder_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("OPENSORA_TEXT_CACHE", str(tmp_path / "here"))
    assert default_cache_folder() == tmp_path / "here"
    monkeypatch.setenv("OPENSORA_TEXT_CACHE", "none")
    assert default_cache_folder() is None
    monkeypatch.delenv("OPENSORA_TEXT_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_folder() == tmp_path / "xdg" / "opensora_sdk" / "text"
    monkeypatch.delenv("XDG_CACHE_HOME")

    def no_home():
        raise RuntimeError("Could not determine home directory.")

    monkeypatch.setattr(Path, "home", staticmethod(no_home))
    assert default_cache_folder() is None  # a bare container: no cache, no error


# ---- the pipeline and the command -------------------------------------------------------------


def run_generate(tmp_path, name, *extra, cache=None):
    env = dict(os.environ, OPENSORA_TEXT_CACHE=str(cache or tmp_path / "cache"))
    code = (
        "import sys\nfrom opensora_sdk.cli import main\n"
        f"code = main(['generate', '--prompt', {PROMPTS[0]!r}, '--save-dir', {str(tmp_path)!r}, "
        f"'--sample-name', {name!r}, '--no-progress', *{list(extra)!r}])\n"
        "print('transformers loaded:', 'transformers' in sys.modules)\nsys.exit(code)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 0, out.stderr
    return out


def test_a_second_generate_with_the_same_prompt_skips_t5_and_writes_the_same_video(tmp_path):
    cold = run_generate(tmp_path, "cold")
    assert "text cache: 0 of 1 prompt(s) found" in cold.stderr and "transformers loaded: True" in cold.stdout
    warm = run_generate(tmp_path, "warm")
    assert "text cache: 1 of 1 prompt(s) found" in warm.stderr and "T5 was not loaded" in warm.stderr
    assert "transformers loaded: False" in warm.stdout  # neither T5 nor transformers' modules imported
    assert (tmp_path / "warm_0000.mp4").read_bytes() == (tmp_path / "cold_0000.mp4").read_bytes()
    off = run_generate(tmp_path, "off", "--text-cache", "none", cache=tmp_path / "unused")
    assert "text cache" not in off.stderr and not (tmp_path / "unused").exists()
    assert (tmp_path / "off_0000.mp4").read_bytes() == (tmp_path / "cold_0000.mp4").read_bytes()


def test_a_text_cache_path_that_is_a_file_is_one_clear_error(tmp_path, capsys):
    from opensora_sdk.cli import main

    (tmp_path / "f").write_text("x")
    code = main(["generate", "--prompt", PROMPTS[0], "--save-dir", str(tmp_path), "--text-cache", str(tmp_path / "f")])
    err = capsys.readouterr().err
    assert code != 0 and "--text-cache" in err and "not a folder" in err and "Traceback" not in err


def test_the_pipeline_takes_a_text_cache_and_loads_t5_only_for_new_prompts(tmp_path):
    from opensora_sdk.pipeline import OpenSoraPipeline

    pipe = OpenSoraPipeline.from_preset(device="cpu", progress=False, text_cache=tmp_path / "emb")
    assert not pipe.text_encoder.is_loaded
    first = pipe(PROMPTS[0], seed=3, num_steps=4)
    again = OpenSoraPipeline.from_preset(device="cpu", progress=False, text_cache=tmp_path / "emb")
    second = again(PROMPTS[0], seed=3, num_steps=4)
    assert not again.text_encoder.is_loaded
    assert (second.frames == first.frames).all()
    plain = OpenSoraPipeline.from_preset(device="cpu", progress=False)(PROMPTS[0], seed=3, num_steps=4)
    assert (plain.frames == first.frames).all()  # one prompt: the same with or without the cache


def test_info_says_which_prompts_are_cached_and_leaves_t5_out_of_the_peak(tmp_path, capsys, monkeypatch):
    from opensora_sdk.cli import main

    monkeypatch.setenv("OPENSORA_TEXT_CACHE", str(tmp_path / "cache"))

    def info(*prompts):
        assert main(["info", *prompts, "--device", "cpu"]) == 0
        lines = capsys.readouterr().out.splitlines()
        return {k.strip(): v.strip() for k, _, v in (line.partition(":") for line in lines)}, lines

    before, lines = info(PROMPTS[0])
    assert before["text cache"].startswith("0 of 1 text(s)") and "T5 loads" in before["text cache"]
    assert any(line.startswith("memory:         peak by phase: text ") for line in lines)
    from opensora_sdk.pipeline import OpenSoraPipeline

    pipe = OpenSoraPipeline.from_preset(device="cpu", progress=False, text_cache=tmp_path / "cache")
    pipe(PROMPTS[0], num_steps=1)
    after, lines = info(PROMPTS[0])
    assert after["text cache"] == f"1 of 1 text(s) in {tmp_path / 'cache'}; T5 will not load"
    assert "memory:         weights text_encoder: 0.0 MiB" in lines
    assert not any("peak by phase: text" in line for line in lines)
    partly, _ = info(PROMPTS[0], PROMPTS[1])
    assert partly["text cache"].startswith("1 of 2 text(s)")


def test_the_estimate_without_t5_is_the_estimate_less_its_text_phase():
    from opensora_sdk.estimates import estimate_memory
    from opensora_sdk.pipeline import OpenSoraPipeline
    from opensora_sdk.presets import model_configs

    configs = model_configs("v1.2")
    plan = OpenSoraPipeline.from_preset(device="cpu").plan("a cat")  # 64x64, 17 frames: T5-XXL outweighs the rest
    args = (plan, configs.transformer, configs.vae, configs.text_encoder)
    full = estimate_memory(*args, device_type="cuda", fp8=True)
    cached = estimate_memory(*args, device_type="cuda", fp8=True, text_cached=True)
    assert cached.weights["text_encoder"] == 0 and "text" not in cached.phases
    assert cached.phases == {k: v for k, v in full.phases.items() if k != "text"}
    assert cached.peak == max(cached.phases.values()) < full.peak
