"""T5 encoder loading: one weight file (ComfyUI's t5xxl_fp16.safetensors) or a Hugging Face folder.

The weights hold the Hugging Face T5 encoder keys: ``shared.weight``, ``encoder.block.N....``
(gated ``wi_0`` / ``wi_1``), ``encoder.final_layer_norm.weight``. The tied
``encoder.embed_tokens.weight`` may be absent: it is the same table as ``shared.weight``.
transformers' `T5EncoderModel` is built on the meta device with its weight initialisation
switched off, and each tensor is assigned once, in the target dtype (no random float32
T5-XXL, ~19 GB, is ever made); the keys are checked strictly. A single file's `T5Config` is
read from its tensor shapes (`T5TextEncoder.from_single_file`); a folder's from its
config.json, its weights being one file or the shards of an index (`.safetensors` or `.bin`),
of which the decoder and LM head of a full T5 are skipped (`T5TextEncoder.from_pretrained`).
A local folder or hub repo id is found by `find_t5_folder`, its tokenizer loaded by
`load_tokenizer_folder`; `load_tiny_tokenizer` and `tiny_t5_config` give the built-in tiny
tokenizer and a T5 v1.1 config at tiny widths (also the base of a single file's config).
transformers is imported here, when a T5 is built, and only its T5 modules.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from opensora_sdk.loading import CheckpointError, iter_tensors, load_tensors_into, read_shapes, resolve_checkpoint

SUFFIXES = (".safetensors", ".pth", ".pt", ".bin")
TOKENIZER_FILES = ("tokenizer.json", "spiece.model")
SHARED, EMBED = "shared.weight", "encoder.embed_tokens.weight"
_Q = "encoder.block.0.layer.0.SelfAttention.q.weight"
_BIAS = "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"
_WI_0 = "encoder.block.0.layer.1.DenseReluDense.wi_0.weight"
ENCODER_ONLY_SKIP = ("decoder.", "lm_head.")  # a full T5 checkpoint's other half
TINY_TOKENIZER_DIR = Path(__file__).resolve().parents[1] / "builtin" / "tokenizer"
_HUB_FILES = ("*.json", "*.safetensors", "*.model")  # config, weights, tokenizer (spiece.model)


class NotT5FileError(CheckpointError, ValueError):
    """The file is not a T5 encoder checkpoint this loader reads (a ValueError too: wrong file given)."""


def load_tiny_tokenizer(model_max_length: int | None = None):
    """The small T5-style tokenizer shipped with the package (see training/build_tiny_tokenizer.py).

    Same special ids as T5 (pad 0, ``</s>`` 1, unk 2), EOS appended, right padding.
    """
    from transformers.models.auto.tokenization_auto import AutoTokenizer

    kwargs = {} if model_max_length is None else {"model_max_length": model_max_length}
    return AutoTokenizer.from_pretrained(str(TINY_TOKENIZER_DIR), **kwargs)


def tiny_t5_config(vocab_size: int | None = None, **overrides):
    """A `T5Config` with the T5 v1.1 layout (gated-GELU, untied) and tiny widths.

    `vocab_size` defaults to the size of the built-in tiny tokenizer. Override any field, e.g.
    ``tiny_t5_config(d_model=512, num_layers=8, num_heads=8, d_kv=64, d_ff=1024)``.
    """
    from transformers.models.t5.configuration_t5 import T5Config

    if vocab_size is None:
        vocab_size = len(load_tiny_tokenizer())
    fields = dict(
        vocab_size=vocab_size,
        d_model=32,
        d_kv=8,
        d_ff=64,
        num_layers=2,
        num_heads=4,
        relative_attention_num_buckets=32,
        relative_attention_max_distance=128,
        dropout_rate=0.0,
        layer_norm_epsilon=1e-6,
        feed_forward_proj="gated-gelu",
        tie_word_embeddings=False,
        is_encoder_decoder=False,
        use_cache=False,
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
    )
    fields.update(overrides)
    return T5Config(**fields)


def config_from_shapes(shapes: dict[str, tuple[int, ...]], path: Path):
    """The T5 v1.1 encoder `T5Config` that the tensor shapes of `path` describe."""
    embed = shapes.get(SHARED) or shapes.get(EMBED)
    if embed is None or not all(k in shapes for k in (_Q, _BIAS, _WI_0)):
        raise NotT5FileError(
            f"{path.name!r} is not a T5 v1.1 encoder in the Hugging Face key layout: {str(path)!r} has no "
            f"'{SHARED}' / gated 'wi_0' keys (its first keys: {sorted(shapes)[:3]}); Open-Sora v1.2 uses "
            "T5-XXL v1.1 (e.g. ComfyUI's t5xxl_fp16.safetensors)"
        )
    vocab_size, d_model = embed
    num_buckets, num_heads = shapes[_BIAS]
    inner = shapes[_Q][0]
    if inner % num_heads:
        raise CheckpointError(
            f"{str(path)!r}: '{_Q}' has {inner} rows, not a multiple of the {num_heads} attention heads "
            f"that '{_BIAS}' has"
        )
    blocks = {k.split(".")[2] for k in shapes if k.startswith("encoder.block.")}
    return tiny_t5_config(  # the T5 v1.1 encoder layout, at the file's sizes
        vocab_size=vocab_size,
        d_model=d_model,
        d_kv=inner // num_heads,
        d_ff=shapes[_WI_0][0],
        num_layers=1 + max(int(b) for b in blocks if b.isdigit()),
        num_heads=num_heads,
        relative_attention_num_buckets=num_buckets,
        tie_word_embeddings=True,  # `shared` is `encoder.embed_tokens`, stored once or twice
    )


def read_config(path: Path):
    """The `T5Config` of a single-file T5, from its tensor shapes (no tensor is loaded for
    .safetensors); `NotT5FileError` when the file is of another kind."""
    if path.suffix.lower() not in SUFFIXES:
        raise NotT5FileError(
            f"{str(path)!r} has suffix {path.suffix!r}: a single-file T5 must be one of {list(SUFFIXES)} "
            "(or pass the encoder's Hugging Face folder to T5TextEncoder.from_pretrained)"
        )
    return config_from_shapes(read_shapes(path), path)


def load_t5_encoder(path: Path, config, dtype: torch.dtype, device: torch.device):
    """`T5EncoderModel` from one file: built on meta, tensors assigned in `dtype` on `device`.

    As transformers' `from_pretrained` does, float16 keeps the feed-forward output projections
    (`wo`) in float32. Missing, unexpected or mismatched keys raise `CheckpointError`.
    """
    try:
        return load_t5_weights([path], config, dtype, device)
    except CheckpointError as err:
        raise CheckpointError(f"{str(path)!r}: {err}") from err


def load_t5_folder(folder: Path, dtype: torch.dtype, device: torch.device):
    """`T5EncoderModel` from a Hugging Face folder: its config.json, and its weights (one file
    or the shards of an index) assigned in `dtype` on `device`."""
    from transformers.models.t5.configuration_t5 import T5Config

    resolved = resolve_checkpoint(folder)
    try:
        config = T5Config.from_pretrained(str(folder))
    except (OSError, ValueError) as err:
        raise CheckpointError(
            f"{str(folder)!r}: config.json is not a T5 config ({type(err).__name__}: {err})"
        ) from err
    try:
        return load_t5_weights(resolved.weight_files, config, dtype, device)
    except CheckpointError as err:
        raise CheckpointError(f"{str(folder)!r}: {err}") from err


def load_t5_weights(files, config, dtype: torch.dtype, device: torch.device):
    """`T5EncoderModel(config)` built on the meta device without initialisation, then the
    encoder tensors of `files` assigned (strict keys; a full T5's decoder / LM head skipped)."""
    model = build_empty_t5_encoder(config)
    keep_float32 = set()
    if dtype == torch.float16:  # as transformers' from_pretrained (`_keep_in_fp32_modules`)
        keep = set(model._keep_in_fp32_modules or ())
        keep_float32 = {k for k in model.state_dict() if keep & set(k.split("."))}
    tensors = ((k, t) for k, t in iter_tensors(files) if not k.startswith(ENCODER_ONLY_SKIP))
    tensors = _cast(tensors, dtype, device, keep_float32)
    tied = _ties_embedding(model)
    if tied:
        tensors = _tied_once(tensors)
    load_tensors_into(model, tensors, dtype=dtype, device=device, keep_float32=keep_float32)
    if tied:
        model.encoder.embed_tokens.weight = model.shared.weight  # one table, as transformers ties them
    return model.eval().requires_grad_(False)


def build_empty_t5_encoder(config):
    """transformers' `T5EncoderModel(config)` on the meta device, its weight initialisation
    (torch's and transformers' `init_weights`, which also ties) switched off: every tensor
    is to be assigned from a checkpoint."""
    from transformers.models.t5.modeling_t5 import T5EncoderModel

    try:
        from transformers.initialization import no_init_weights  # transformers >= 5
    except ImportError:
        from transformers.modeling_utils import no_init_weights

    with torch.device("meta"), no_init_weights():
        return T5EncoderModel(config)


def _ties_embedding(model) -> bool:
    """Whether transformers ties `encoder.embed_tokens` to `shared` in `model`: one module in
    transformers 4, per the config's `tie_word_embeddings` in transformers 5."""
    tied = getattr(model, "all_tied_weights_keys", None) or {}
    return model.encoder.embed_tokens is model.shared or tied.get(EMBED) == SHARED


def _cast(tensors, dtype, device, keep_float32):
    """The file's floating point tensors in `dtype` on `device` (`keep_float32` keys in float32)."""
    for key, tensor in tensors:
        if tensor.is_floating_point():
            tensor = tensor.to(device=device, dtype=torch.float32 if key in keep_float32 else dtype)
        yield key, tensor


def _tied_once(tensors):
    """The tensors, plus the tied embedding under its other name when the file stores it once
    (the same cast tensor under both names: no second copy)."""
    seen = {}
    for key, tensor in tensors:
        if key in (SHARED, EMBED):
            seen[key] = tensor
        yield key, tensor
    if SHARED in seen and EMBED not in seen:
        yield EMBED, seen[SHARED]
    elif EMBED in seen and SHARED not in seen:
        yield SHARED, seen[EMBED]


def folder_facts(folder: Path) -> tuple[int, str]:
    """(d_model, fingerprint) of a T5 folder, for an encoder loaded later: nothing is built and
    transformers is not imported. Checks now what can be checked without loading: config.json
    names d_model, the tokenizer files and the weight files are there and their headers parse,
    and a .safetensors file's embedding is d_model wide. The fingerprint hashes config.json and
    the tokenizer files (their bytes) and each weight file's path, size and modification time:
    a changed or replaced file is another encoder."""
    import json

    from opensora_sdk.loading import check_weight_files

    config_file = folder / "config.json"
    try:
        d_model = json.loads(config_file.read_text(encoding="utf-8"))["d_model"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise CheckpointError(
            f"{str(folder)!r}: config.json is not a T5 config with d_model ({type(err).__name__}: {err})"
        ) from err
    if isinstance(d_model, bool) or not isinstance(d_model, int) or d_model < 1:
        raise CheckpointError(f"{str(folder)!r}: config.json has d_model={d_model!r}; expected a positive integer")
    tokenizer = tokenizer_files(folder)
    if not tokenizer:
        find_tokenizer_folder(folder / "config.json")  # raises: names the files it looked for
    weights = resolve_checkpoint(folder).weight_files
    check_weight_files(weights)
    for file in weights:
        if file.suffix == ".safetensors":
            shapes = read_shapes(file)
            embed = shapes.get(SHARED) or shapes.get(EMBED)
            if embed is not None and embed[-1] != d_model:
                raise CheckpointError(
                    f"{str(file)!r}: '{SHARED}' is {embed[-1]} wide but config.json says d_model={d_model}"
                )
    return d_model, fingerprint(weights, [config_file, *tokenizer])


def fingerprint(weight_files, small_files) -> str:
    """A hash of the small files' names and bytes and of each weight file's resolved path,
    size and modification time (large files are not read: a replaced file has a new time)."""
    import hashlib

    h = hashlib.sha256()
    for file in small_files:
        h.update(file.name.encode() + b"\0" + file.read_bytes() + b"\0")
    for file in weight_files:
        st = file.stat()
        h.update(f"{file.resolve()}\0{st.st_size}\0{st.st_mtime_ns}\0".encode())
    return h.hexdigest()


def tokenizer_files(folder: Path) -> list[Path]:
    """The tokenizer files of `folder` (empty when it has neither tokenizer.json nor spiece.model)."""
    names = (*TOKENIZER_FILES, "tokenizer_config.json", "special_tokens_map.json")
    files = sorted(p for p in folder.iterdir() if p.name in names)
    return files if any(p.name in TOKENIZER_FILES for p in files) else []


def find_tokenizer_folder(path: Path, search=()) -> Path:
    """The first folder of [the file's folder, *search] that holds tokenizer.json or spiece.model."""
    candidates = [path.parent, *(Path(s) for s in search)]
    for folder in candidates:
        if any((folder / name).is_file() for name in TOKENIZER_FILES):
            return folder
    raise FileNotFoundError(
        f"no T5 tokenizer found for {str(path)!r}: looked for {list(TOKENIZER_FILES)} in "
        f"{[str(c) for c in candidates]}; put the tokenizer files beside the weights, pass "
        "tokenizer=<folder>, or use the encoder's Hugging Face folder (config.json, weights, spiece.model)"
    )


def load_tokenizer_folder(folder: Path):
    """transformers' tokenizer of a folder (AutoTokenizer: the class its tokenizer_config.json names)."""
    from transformers.models.auto.tokenization_auto import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(folder))
    except (OSError, ValueError) as err:
        raise CheckpointError(
            f"could not load a T5 tokenizer from {str(folder)!r} ({type(err).__name__}: {err}); the folder "
            "needs tokenizer.json or spiece.model with tokenizer_config.json"
        ) from err


def find_t5_folder(source, local_files_only, cache_dir) -> Path:
    """The local folder holding the T5 files, downloading a hub repo id if allowed."""
    text = os.fspath(source)
    path = Path(text).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise CheckpointError(
                f"text encoder folder {text!r} has no config.json: expected a Hugging Face T5 folder "
                "with config.json, *.safetensors weights and tokenizer files (spiece.model or tokenizer.json)"
            )
        return path
    if path.is_file():
        raise CheckpointError(
            f"text encoder {text!r} is a file: pass the folder that holds it together with "
            "config.json and the tokenizer files"
        )
    try:
        resolved = resolve_checkpoint(
            text, local_files_only=local_files_only, cache_dir=cache_dir, allow_patterns=_HUB_FILES
        )
    except CheckpointError as err:
        folder = f"models/{Path(text).name or 't5'}"
        raise CheckpointError(
            f"text encoder {text!r} is not available here. {err}\nPut the T5 files (config.json, "
            f"*.safetensors, spiece.model, tokenizer_config.json) in a folder such as {folder} "
            f"and pass it: T5TextEncoder.from_pretrained({folder!r})"
        ) from err
    return resolved.config_file.parent if resolved.config_file else resolved.weight_files[0].parent
