"""T5TextEncoder on a tiny T5 with the built-in tokenizer: tokenisation, shapes, cache, offload."""

import importlib.util
import inspect
import json
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer

from opensora_sdk.configs import TEXT_ENCODER_PRESETS
from opensora_sdk.dtypes import parse_dtype
from opensora_sdk.loading import CheckpointError
from opensora_sdk.models import T5TextEncoder
from opensora_sdk.models.t5_file import TINY_TOKENIZER_DIR, load_tiny_tokenizer, tiny_t5_config
from opensora_sdk.models.text_cache import EmbeddingCache
from opensora_sdk.models.text_encoder import TextEmbedding
from opensora_sdk.text import process_prompt

CAPTION = (
    "a red circle moving left on a blue background, aesthetic score: 6.5. motion score: 5.0. "
    "camera motion: pan left."
)
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tokenizer():
    return load_tiny_tokenizer()


def make_encoder(tokenizer, **kw):
    torch.manual_seed(0)
    kw.setdefault("model_max_length", 300)
    return T5TextEncoder.from_config(tiny_t5_config(vocab_size=len(tokenizer)), tokenizer, **kw)


def count_forward(encoder):
    """Replace the model's forward with a counting wrapper; returns the list of batch sizes."""
    calls, forward = [], encoder.model.forward

    def spy(*args, **kwargs):
        calls.append(kwargs["input_ids"].shape[0])
        return forward(*args, **kwargs)

    encoder.model.forward = spy
    return calls


# ---- the built-in tokenizer -------------------------------------------------------------------


def test_tiny_tokenizer_has_t5_special_ids_and_covers_captions(tokenizer):
    assert (tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id) == (0, 1, 2)
    assert tokenizer.convert_ids_to_tokens([0, 1, 2]) == ["<pad>", "</s>", "<unk>"]
    ids = tokenizer(CAPTION)["input_ids"]
    assert ids[-1] == 1 and 2 not in ids and 0 not in ids
    assert tokenizer.decode(ids, skip_special_tokens=True) == CAPTION


def test_tiny_tokenizer_files_are_small_and_reproducible(tmp_path):
    files = sorted(p.name for p in TINY_TOKENIZER_DIR.iterdir())
    assert files == ["special_tokens_map.json", "tokenizer.json", "tokenizer_config.json"]
    assert sum(p.stat().st_size for p in TINY_TOKENIZER_DIR.iterdir()) < 1_000_000
    script = ROOT / "training" / "build_tiny_tokenizer.py"
    spec = importlib.util.spec_from_file_location("build_tiny_tokenizer", script)
    builder = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(builder)
    builder.write_tiny_tokenizer(tmp_path)
    # compared by content, not bytes, so a newer `tokenizers` serialisation does not matter
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        assert json.loads((tmp_path / name).read_text()) == json.loads((TINY_TOKENIZER_DIR / name).read_text())
    rebuilt, shipped = (json.loads((d / "tokenizer.json").read_text()) for d in (tmp_path, TINY_TOKENIZER_DIR))
    assert rebuilt["model"]["vocab"] == shipped["model"]["vocab"]
    texts = [CAPTION, "A Zebra!  jumps", "x" * 50]
    assert [e.ids for e in builder.build_tiny_tokenizer().encode_batch(texts)] == [
        e.ids for e in Tokenizer.from_file(str(TINY_TOKENIZER_DIR / "tokenizer.json")).encode_batch(texts)
    ]


# ---- tokenisation as official -----------------------------------------------------------------


def test_tokenize_pads_with_zero_and_appends_eos(tokenizer):
    enc = make_encoder(tokenizer)
    tokens = enc.tokenize(["a red circle", CAPTION])
    ids, mask = tokens["input_ids"], tokens["attention_mask"]
    assert ids.shape == mask.shape == (2, 300) and mask.dtype == torch.int64
    n = int(mask[0].sum())
    assert n == 4  # three words + </s>
    assert ids[0, n - 1] == 1 and (ids[0, n:] == 0).all() and (mask[0, n:] == 0).all()
    assert torch.equal(mask, (ids != 0).long())


def test_truncation_keeps_first_299_tokens_plus_eos(tokenizer):
    enc = make_encoder(tokenizer)
    words = ("red blue green circle square " * 80).strip()  # 400 words
    full = tokenizer(words)["input_ids"]
    assert len(full) == 401
    ids = enc.tokenize([words])["input_ids"][0]
    assert ids.shape == (300,)
    assert ids[:299].tolist() == full[:299] and ids[299] == 1
    assert enc.encode(words).mask.sum() == 300


# ---- encode -----------------------------------------------------------------------------------


def test_encode_shapes_and_values_match_the_model(tokenizer):
    enc = make_encoder(tokenizer)
    prompts = ["a red circle", CAPTION, "a cat"]
    out = enc.encode(prompts)
    assert isinstance(out, TextEmbedding)
    y, mask = out  # unpacks as a pair
    assert y.shape == (3, 1, 300, 32) and y.dtype == torch.float32
    assert mask.shape == (3, 300) and mask.dtype == torch.int64
    tokens = enc.tokenize(prompts)
    with torch.no_grad():
        ref = enc.model(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"]).last_hidden_state
    torch.testing.assert_close(y[:, 0], ref)
    assert torch.equal(mask, tokens["attention_mask"])
    assert enc.encode("a cat").y.shape == (1, 1, 300, 32)
    assert not y.requires_grad


@pytest.mark.parametrize("bad", [[], None, ["a", 3], 5])
def test_encode_rejects_bad_input(tokenizer, bad):
    enc = make_encoder(tokenizer)
    with pytest.raises(ValueError, match="prompts"):
        enc.encode(bad)


@pytest.mark.parametrize(
    "dtype, expected", [("fp32", torch.float32), ("bf16", torch.bfloat16), (torch.float16, torch.float16)]
)
def test_dtype_choices(tokenizer, dtype, expected):
    enc = make_encoder(tokenizer, model_max_length=16, dtype=dtype)
    assert enc.dtype == expected
    y = enc.encode("a red circle").y
    assert y.dtype == expected and torch.isfinite(y.float()).all()


def test_bad_dtype_and_vocab_errors(tokenizer):
    with pytest.raises(ValueError, match="int8"):
        parse_dtype("int8")
    with pytest.raises(ValueError, match="vocab_size"):
        T5TextEncoder.from_config(tiny_t5_config(vocab_size=10), tokenizer)


def test_defaults_match_the_v1_2_preset():
    repo, max_length = TEXT_ENCODER_PRESETS["v1.2"]
    params = inspect.signature(T5TextEncoder.from_pretrained).parameters
    assert params["path_or_repo"].default == repo
    assert params["model_max_length"].default == max_length
    assert params["dtype"].default == torch.float32


# ---- cache ------------------------------------------------------------------------------------


def test_cached_prompts_skip_the_model(tokenizer):
    enc = make_encoder(tokenizer, cache=True)
    calls = count_forward(enc)
    first = enc.encode(["a red circle", "a blue square", "a red circle"])
    assert calls == [1, 1]  # each distinct text once, on its own (a cached row is the text alone)
    again = enc.encode(["a red circle", "a blue square"])
    assert calls == [1, 1]  # all hits: T5 not called
    assert torch.equal(again.y, first.y[:2]) and torch.equal(again.mask, first.mask[:2])
    enc.encode(["a blue square", "a green star"])
    assert calls == [1, 1, 1]  # only the new prompt runs
    assert enc.cache.hits == 3 and enc.cache.misses == 3


def test_without_a_cache_the_texts_run_as_one_batch(tokenizer):
    enc = make_encoder(tokenizer)
    calls = count_forward(enc)
    enc.encode(["a red circle", "a blue square", "a red circle"])
    assert calls == [2]  # as the official encoder: one batch, each distinct text once


def test_a_cached_row_does_not_depend_on_the_prompts_it_came_with(tokenizer):
    """With a cache, what a prompt gets is what encoding it alone gives, bit for bit, whether
    it was first met alone or in a batch, cached or not."""
    enc = make_encoder(tokenizer, cache=True)
    together = enc.encode(["a red circle moving left", "a blue square on a white background, camera motion: pan"])
    alone = make_encoder(tokenizer).encode("a blue square on a white background, camera motion: pan")
    assert torch.equal(together.y[1], alone.y[0]) and torch.equal(together.mask[1], alone.mask[0])


def test_lru_evicts_oldest(tokenizer):
    enc = make_encoder(tokenizer, model_max_length=16, cache=EmbeddingCache(max_items=2))
    calls = count_forward(enc)
    for p in ("a cat", "a dog", "a bird"):
        enc.encode(p)
    assert len(enc.cache) == 2 and calls == [1, 1, 1]
    enc.encode("a bird")
    enc.encode("a cat")
    assert calls == [1, 1, 1, 1]


def test_disk_cache_reused_by_a_new_encoder(tokenizer, tmp_path):
    enc = make_encoder(tokenizer, model_max_length=16, cache=tmp_path / "emb")
    first = enc.encode(["a cat", "a dog"])
    files = sorted((tmp_path / "emb").iterdir())
    assert len(files) == 2 and all(f.suffix == ".safetensors" and not f.name.startswith(".") for f in files)
    # same weights, fresh process-like state: only the folder is shared
    other = T5TextEncoder(enc.model, tokenizer, model_max_length=16, cache=EmbeddingCache(folder=tmp_path / "emb"))
    calls = count_forward(other)
    second = other.encode(["a dog", "a cat"])
    assert calls == []
    assert torch.equal(second.y[0], first.y[1]) and torch.equal(second.mask[1], first.mask[0])


def test_cache_key_depends_on_encoder_dtype_and_length(tokenizer):
    a = make_encoder(tokenizer, model_max_length=16)
    same = T5TextEncoder(a.model, tokenizer, model_max_length=16)
    assert a.cache_key("a cat") == same.cache_key("a cat")
    assert a.cache_key("a cat") != a.cache_key("a dog")
    assert T5TextEncoder(a.model, tokenizer, model_max_length=20).cache_key("a cat") != a.cache_key("a cat")
    torch.manual_seed(1)
    config = tiny_t5_config(vocab_size=len(tokenizer))
    other_weights = T5TextEncoder.from_config(config, tokenizer, model_max_length=16)
    assert other_weights.identity != a.identity
    half = T5TextEncoder(a.model.to(torch.bfloat16), tokenizer, model_max_length=16)
    assert half.cache_key("a cat") != same.cache_key("a cat")


def test_bad_cache_argument(tokenizer):
    with pytest.raises(ValueError, match="cache=3"):
        make_encoder(tokenizer, cache=3)


# ---- offloading -------------------------------------------------------------------------------


# On CPU-only machines "cpu:0" stands in for a second device: it differs from "cpu" as a
# torch.device, so the offload path copies and swaps the weights exactly as with a GPU.


def weight_ptrs(encoder):
    return [t.data_ptr() for _, t in encoder._weights()]


def test_offload_after_encode_moves_off_and_back(tokenizer):
    enc = make_encoder(tokenizer, model_max_length=16, offload_after_encode=True, offload_device="cpu:0", cache=True)
    resident = weight_ptrs(enc)
    first = enc.encode("a cat")
    assert enc.is_offloaded and (enc.offload_count, enc.onload_count) == (1, 0)
    host = weight_ptrs(enc)
    assert all(a != b for a, b in zip(host, resident))  # weights now live in the host copy
    enc.encode("a cat")  # a cache hit needs no T5: nothing moves
    assert (enc.offload_count, enc.onload_count) == (1, 0)
    calls = count_forward(enc)
    second = enc.encode(["a dog", "a cat"])  # back to the compute device, encode, off again
    assert calls == [1] and (enc.offload_count, enc.onload_count) == (2, 1) and enc.is_offloaded
    assert weight_ptrs(enc) == host  # the host copy is made once and reused
    assert torch.equal(second.y[1], first.y[0])


def test_explicit_offload_is_idempotent_and_values_survive(tokenizer):
    enc = make_encoder(tokenizer, model_max_length=16, offload_device="cpu:0")
    before = enc.encode("a cat").y
    state = {k: v.clone() for k, v in enc.model.state_dict().items()}
    enc.offload()
    enc.offload()
    assert enc.is_offloaded and enc.offload_count == 1
    enc.onload()
    enc.onload()
    assert not enc.is_offloaded and enc.onload_count == 1
    assert all(torch.equal(v, state[k]) for k, v in enc.model.state_dict().items())
    assert torch.equal(enc.encode("a cat").y, before)


def test_offload_to_the_compute_device_is_bookkeeping_only(tokenizer):
    enc = make_encoder(tokenizer, model_max_length=16, offload_after_encode=True)
    resident = weight_ptrs(enc)
    enc.encode("a cat")
    assert enc.is_offloaded and weight_ptrs(enc) == resident


# ---- loading from a folder, offline errors ----------------------------------------------------


def test_from_pretrained_local_folder(tokenizer, tmp_path):
    enc = make_encoder(tokenizer, model_max_length=16)
    enc.model.save_pretrained(tmp_path / "t5")
    tokenizer.save_pretrained(tmp_path / "t5")
    loaded = T5TextEncoder.from_pretrained(tmp_path / "t5", model_max_length=16)
    torch.testing.assert_close(loaded.encode("a red circle").y, enc.encode("a red circle").y)
    half = T5TextEncoder.from_pretrained(str(tmp_path / "t5"), model_max_length=16, dtype="bf16")
    assert half.encode("a cat").y.dtype == torch.bfloat16


def test_from_pretrained_errors_name_the_folder(tmp_path):
    with pytest.raises(CheckpointError, match="no config.json"):
        T5TextEncoder.from_pretrained(tmp_path)
    (tmp_path / "w.safetensors").write_bytes(b"")
    with pytest.raises(CheckpointError, match="pass the folder"):
        T5TextEncoder.from_pretrained(tmp_path / "w.safetensors")
    with pytest.raises(CheckpointError) as err:
        T5TextEncoder.from_pretrained("DeepFloyd/t5-v1_1-xxl", local_files_only=True, cache_dir=tmp_path / "hub")
    assert "DeepFloyd/t5-v1_1-xxl" in str(err.value) and "models/t5-v1_1-xxl" in str(err.value)


def test_processed_prompt_encodes_without_unknown_tokens(tokenizer):
    enc = make_encoder(tokenizer, model_max_length=64)
    text = process_prompt("A red circle moving left on a blue background", flow=5, camera_motion="pan left").text
    assert text == CAPTION.replace("background,", "background")
    ids = enc.tokenize([text])["input_ids"][0]
    assert 2 not in ids.tolist()


# ---- placement: on_device ---------------------------------------------------------------------


def host_ptrs(encoder):
    return [encoder._host_copy[name].data_ptr() for name, _ in encoder._weights()]


def test_on_device_runs_there_and_goes_home_after(tokenizer):
    enc = make_encoder(tokenizer, model_max_length=16)
    expected = enc.encode("a cat").y
    resident = weight_ptrs(enc)
    with enc.on_device("cpu", home="cpu:0") as inside:  # "cpu:0" stands in for the host
        assert inside is enc and not enc.is_offloaded and weight_ptrs(enc) == resident
        out = enc.encode("a cat")
    assert out.y.device == torch.device("cpu") and torch.equal(out.y, expected)
    assert enc.is_offloaded and enc.offload_device == torch.device("cpu:0")
    home = host_ptrs(enc)
    assert weight_ptrs(enc) == home and home != resident  # the weights left `device` for `home`
    with enc.on_device("cpu", home="cpu:0"):  # back from the kept host copy, encode, home again
        assert not enc.is_offloaded and torch.equal(enc.encode("a cat").y, expected)
    assert host_ptrs(enc) == home and weight_ptrs(enc) == home  # the host copy was made once
    assert (enc.offload_count, enc.onload_count) == (2, 1)
    with enc.on_device("cpu", home="cpu"):  # a new home: the stale host copy is dropped
        pass
    assert enc._host_copy is None and enc.offload_device == torch.device("cpu")


def test_t5_is_off_the_accelerator_after_an_encoding_error(tokenizer):
    enc = make_encoder(tokenizer, model_max_length=16)
    state = {k: v.clone() for k, v in enc.model.state_dict().items()}
    resident = weight_ptrs(enc)

    def fail(*args, **kwargs):
        assert weight_ptrs(enc) == resident  # T5 runs where the block put it
        raise RuntimeError("out of memory")

    enc.model.forward = fail
    with pytest.raises(RuntimeError, match="out of memory"):
        with enc.on_device("cpu", home="cpu:0"):
            enc.encode("a cat")
    assert enc.is_offloaded and weight_ptrs(enc) == host_ptrs(enc) != resident
    assert all(torch.equal(v, state[k]) for k, v in enc.model.state_dict().items())
    del enc.model.forward  # the class's forward again
    with enc.on_device("cpu", home="cpu:0"):
        assert enc.encode("a cat").y.shape == (1, 1, 16, 32)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_on_device_cuda_round_trip_and_error(tokenizer):
    enc = make_encoder(tokenizer, model_max_length=16)
    expected = enc.encode("a cat").y
    for _ in range(2):
        with enc.on_device("cuda"):
            assert all(t.is_cuda for _, t in enc._weights())
            y = enc.encode("a cat").y
        assert y.is_cuda and torch.allclose(y.cpu(), expected, atol=1e-5)
        assert all(t.device.type == "cpu" and t.is_pinned() for _, t in enc._weights())
    enc.model.forward = lambda *a, **k: 1 / 0
    with pytest.raises(ZeroDivisionError):
        with enc.on_device("cuda"):
            enc.encode("a dog")
    assert all(t.device.type == "cpu" for _, t in enc._weights())


# ---- loading one file (ComfyUI's t5xxl_fp16.safetensors layout) --------------------------------


def write_single_file(encoder, path, edit=None):
    """The encoder's weights as one safetensors file with the tied embedding stored once."""
    from safetensors.torch import save_file

    tensors = {k: v.clone() for k, v in encoder.model.state_dict().items() if k != "encoder.embed_tokens.weight"}
    if edit is not None:
        edit(tensors)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path))
    return path


def test_from_single_file_matches_the_original_and_builds_on_meta(tokenizer, tmp_path, monkeypatch):
    from transformers.models.t5.modeling_t5 import T5EncoderModel, T5PreTrainedModel

    enc = make_encoder(tokenizer, model_max_length=16)
    path = write_single_file(enc, tmp_path / "t5" / "t5.safetensors")
    tokenizer.save_pretrained(str(tmp_path / "t5"))  # beside the weights, as found first
    built_on, inits, init = [], [], T5EncoderModel.__init__

    def spy(self, config):
        init(self, config)
        built_on.append({p.device.type for p in self.parameters()})

    monkeypatch.setattr(T5EncoderModel, "__init__", spy)
    monkeypatch.setattr(T5PreTrainedModel, "_init_weights", lambda self, module: inits.append(module))
    for name in ("kaiming_uniform_", "normal_"):  # nn.Linear's and nn.Embedding's own init
        monkeypatch.setattr(torch.nn.init, name, lambda tensor, *a, **k: inits.append(tensor))
    loaded = T5TextEncoder.from_single_file(path, model_max_length=16)
    assert built_on == [{"meta"}] and inits == []  # no random float32 T5 was made, no init ran
    model = loaded.model
    assert model.encoder.embed_tokens.weight is model.shared.weight
    assert not any(t.is_meta for _, t in loaded._weights())
    for field in ("vocab_size", "d_model", "d_kv", "d_ff", "num_layers", "num_heads"):
        assert getattr(model.config, field) == getattr(enc.model.config, field), field
    prompts = ["a red circle", CAPTION]
    torch.testing.assert_close(loaded.encode(prompts).y, enc.encode(prompts).y, atol=1e-6, rtol=0)
    assert loaded.name == str(path) and loaded.identity == enc.identity
    half = T5TextEncoder.from_single_file(path, model_max_length=16, dtype="fp16")
    dtypes = {n: p.dtype for n, p in half.model.named_parameters()}
    assert dtypes["encoder.block.0.layer.0.SelfAttention.q.weight"] == torch.float16
    assert dtypes["encoder.block.0.layer.1.DenseReluDense.wo.weight"] == torch.float32  # as from_pretrained
    assert torch.isfinite(half.encode("a cat").y.float()).all()


@pytest.mark.parametrize(
    "edit, match",
    [
        (lambda t: t.update({"encoder.block.0.extra.weight": torch.zeros(2)}), r"(?s)unexpected.*encoder\.block\.0\.extra\.weight"),
        (lambda t: t.pop("encoder.final_layer_norm.weight"), r"(?s)missing.*encoder\.final_layer_norm\.weight"),
        (lambda t: t.update({"encoder.final_layer_norm.weight": torch.ones(31)}), r"(?s)shape mismatch.*final_layer_norm"),
    ],
    ids=["unexpected", "missing", "mismatched"],
)
def test_from_single_file_checks_keys_strictly(tokenizer, tmp_path, edit, match):
    path = write_single_file(make_encoder(tokenizer), tmp_path / "t5.safetensors", edit)
    with pytest.raises(CheckpointError, match=match) as err:
        T5TextEncoder.from_single_file(path, tokenizer=tokenizer)
    assert str(path) in str(err.value)


def test_from_single_file_errors_name_the_file(tokenizer, tmp_path):
    from safetensors.torch import save_file

    other = tmp_path / "stdit.safetensors"
    save_file({"x_embedder.proj.weight": torch.zeros(2, 2)}, str(other))
    with pytest.raises(ValueError, match=r"'stdit.safetensors' is not a T5 v1.1 encoder") as err:
        T5TextEncoder.from_single_file(other, tokenizer=tokenizer)
    assert isinstance(err.value, CheckpointError) and str(other) in str(err.value)
    (tmp_path / "t5.gguf").write_bytes(b"")
    with pytest.raises(ValueError, match=r"t5\.gguf.*suffix '.gguf'"):
        T5TextEncoder.from_single_file(tmp_path / "t5.gguf", tokenizer=tokenizer)
    with pytest.raises(FileNotFoundError, match="absent.safetensors"):
        T5TextEncoder.from_single_file(tmp_path / "absent.safetensors")


def test_from_single_file_finds_the_tokenizer_or_says_where_it_looked(tokenizer, tmp_path):
    enc = make_encoder(tokenizer, model_max_length=16)
    path = tmp_path / "weights" / "t5.pt"
    path.parent.mkdir()
    torch.save({k: v for k, v in enc.model.state_dict().items() if k != "encoder.embed_tokens.weight"}, path)
    with pytest.raises(FileNotFoundError, match=r"tokenizer\.json.*weights.*bundled") as err:
        T5TextEncoder.from_single_file(path, tokenizer_search=[tmp_path / "bundled"])
    assert "tokenizer=" in str(err.value)
    tokenizer.save_pretrained(str(tmp_path / "bundled"))
    found = T5TextEncoder.from_single_file(path, tokenizer_search=[tmp_path / "empty", tmp_path / "bundled"],
                                           model_max_length=16)
    given = T5TextEncoder.from_single_file(path, tokenizer=tokenizer, model_max_length=16)
    for loaded in (found, given):
        torch.testing.assert_close(loaded.encode("a cat").y, enc.encode("a cat").y, atol=1e-6, rtol=0)
