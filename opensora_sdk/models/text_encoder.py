"""The T5 text encoder of Open-Sora v1.2: prompts in, (y [B,1,L,C], mask [B,L]) out.

A thin wrapper around transformers' `T5EncoderModel` and the T5 tokenizer that tokenises and
encodes exactly as the official `T5Encoder` (spec section 4):

    tokenizer(texts, max_length=L, padding="max_length", truncation=True,
              return_attention_mask=True, add_special_tokens=True, return_tensors="pt")
    y = T5EncoderModel(input_ids, attention_mask).last_hidden_state[:, None]  # [B,1,L,C]

so ``</s>`` (id 1) ends every text, padding uses id 0, and a long text keeps its first L-1
tokens plus the EOS. The prompts given to `encode` are used as they are: clean them first
with `opensora_sdk.text.process_prompt`.

Memory: the encoder runs in the dtype you choose (official inference: float32, ~19 GB for
T5-XXL; training used bfloat16). `with encoder.on_device("cuda"): encoder.encode(...)` runs T5
on the accelerator for the block only: the weights go home afterwards, also on error. With
`offload_after_encode=True` they leave as soon as a batch is encoded and come back on the
next encode that needs them. The first offload keeps a (pinned) host copy of the frozen
weights, so later offloads need no transfer and each return is one host-to-device copy
(`models/t5_offload.py`). Loading builds `T5EncoderModel` on the meta device without
initialisation and assigns each checkpoint tensor once, in the chosen dtype (strict keys;
folders, hub ids, tokenizers and the tiny config: `models/t5_file.py`). transformers is
imported only when an encoder or tokenizer is built, and only its T5 and tokenizer modules.
Weights from one file (ComfyUI's t5xxl_fp16.safetensors): `from_single_file`.
An `EmbeddingCache` (in-memory LRU, optionally backed by a folder of .safetensors files)
skips T5 entirely for prompts it has already seen. With a cache, each new prompt is encoded
on its own, so a cached row is what encoding that prompt alone gives, whatever it came with.

Deferred loading (`from_pretrained(..., lazy=True)`, what the pipeline uses): the folder is
found and its config, tokenizer files and weight files are checked, but T5 and its tokenizer
(and transformers) are loaded only when first needed, by `encode` of a prompt the cache does
not hold, or by reading `model` / `tokenizer`. Such an encoder's cache identity comes from
its files (`t5_file.folder_facts`), so a later process finds its prompts without loading T5.

The unconditional rows of classifier-free guidance are not computed by T5: they are the
diffusion model's `y_embedder.y_embedding` buffer (`generation.null_caption`), with the prompt's
own mask; a negative prompt is encoded like any prompt and keeps its own mask.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
from pathlib import Path
from typing import NamedTuple

import torch

from opensora_sdk.dtypes import parse_dtype
from opensora_sdk.loading import check_weight_files
from opensora_sdk.models.t5_file import (
    find_t5_folder,
    find_tokenizer_folder,
    fingerprint,
    folder_facts,
    load_t5_encoder,
    load_t5_folder,
    load_tiny_tokenizer,
    load_tokenizer_folder,
    read_config,
    tokenizer_files,
)
from opensora_sdk.models.t5_offload import HostCopyOffload
from opensora_sdk.models.text_cache import as_cache

DEFAULT_REPO = "DeepFloyd/t5-v1_1-xxl"


class TextEmbedding(NamedTuple):
    """What `T5TextEncoder.encode` returns; unpacks as ``y, mask = encoder.encode(prompts)``.

    y: [B, 1, L, C] in the encoder's dtype; mask: [B, L] int64 (1 = token incl. EOS, 0 = pad).
    """

    y: torch.Tensor
    mask: torch.Tensor


# --------------------------------------------------------------------------------------------
# The encoder
# --------------------------------------------------------------------------------------------


def _sha(*parts) -> str:
    h = hashlib.sha256()
    for part in parts:
        h.update(part if isinstance(part, bytes) else str(part).encode("utf-8"))
        h.update(b"\0")
    return h.hexdigest()


@functools.lru_cache(maxsize=1)
def _library_versions() -> str:
    """torch's and transformers' versions (T5's float results may change with either), read
    without importing transformers."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        transformers = version("transformers")
    except PackageNotFoundError:
        transformers = "none"
    return f"torch {torch.__version__}, transformers {transformers}"


_ARCH_FIELDS = (
    "vocab_size", "d_model", "d_kv", "d_ff", "num_layers", "num_heads", "feed_forward_proj",
    "relative_attention_num_buckets", "relative_attention_max_distance", "layer_norm_epsilon",
)


class T5TextEncoder(HostCopyOffload):
    """T5 encoder + tokenizer with the official tokenisation, dtype/device choice, offloading
    and an optional embedding cache.

    Build it with `from_pretrained` (a local folder or a hub id) or `from_config` (random
    weights, e.g. a tiny config for tests). `device` is where T5 runs and where `encode`
    returns its tensors; `offload_device` is where the weights wait between encodes when
    `offload_after_encode` is set (or after an explicit `offload()`).
    """

    def __init__(
        self,
        model,
        tokenizer,
        *,
        model_max_length: int = 300,
        device: torch.device | str = "cpu",
        cache=None,
        offload_after_encode: bool = False,
        offload_device: torch.device | str = "cpu",
        name: str = "",
    ):
        if isinstance(model_max_length, bool) or not isinstance(model_max_length, int) or model_max_length < 2:
            raise ValueError(f"model_max_length={model_max_length!r} is not allowed: expected an integer >= 2")
        self.model_max_length = model_max_length
        self.device = torch.device(device)
        self.offload_device = torch.device(offload_device)
        self.offload_after_encode = offload_after_encode
        self.cache = as_cache(cache)
        self.name = name
        self.offload_count = 0  # how many times the weights left `device`
        self.onload_count = 0  # how many times they came back
        self.fp8_scales: str | None = None  # "per_channel" / "per_tensor" once T5's Linears are fp8
        self._offloaded = False
        self._host_copy: dict[str, torch.Tensor] | None = None
        self._identity: str | None = None
        self._model = self._tokenizer = None
        self._load = None  # deferred: () -> (model, tokenizer)
        self._deferred_facts: dict | None = None  # deferred: output_dim, dtype, files (fingerprint)
        self._pending_fp8: bool | None = None  # deferred: per_channel, applied when T5 loads
        if model is not None or tokenizer is not None:  # None, None: `deferred` sets a loader
            self._attach(model, tokenizer)

    def _attach(self, model, tokenizer) -> None:
        if len(tokenizer) > model.config.vocab_size:
            raise ValueError(
                f"tokenizer has {len(tokenizer)} tokens but the model's vocab_size is "
                f"{model.config.vocab_size}: use a T5 config with vocab_size >= {len(tokenizer)}"
            )
        self._model = model.eval().requires_grad_(False)
        self._tokenizer = tokenizer
        self._load = None

    @classmethod
    def deferred(
        cls,
        load,
        *,
        output_dim: int,
        dtype: torch.dtype,
        fingerprint: str,
        **options,
    ) -> "T5TextEncoder":
        """An encoder whose T5 and tokenizer `load()` -> (model, tokenizer) builds the first time
        they are needed. `output_dim` and `dtype` are what the loaded model will have;
        `fingerprint` identifies its files (the cache identity); `options` are the constructor's
        (model_max_length, device, cache, ...)."""
        self = cls(None, None, **options)
        self._load = load
        self._deferred_facts = {"output_dim": output_dim, "dtype": dtype, "fingerprint": fingerprint}
        return self

    # ---- the loaded parts ----------------------------------------------------------------

    @property
    def is_loaded(self) -> bool:
        """Whether T5 and its tokenizer are built (always, unless made with `lazy=True`)."""
        return self._model is not None

    @property
    def model(self):
        """transformers' `T5EncoderModel` (a deferred encoder loads it here)."""
        if self._model is None:
            self._load_now()
        return self._model

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            self._load_now()
        return self._tokenizer

    def _load_now(self) -> None:
        if self._load is None:
            raise ValueError("this T5TextEncoder was made without a model or tokenizer: build it with "
                             "from_pretrained, from_single_file or from_config")
        model, tokenizer = self._load()
        self._attach(model, tokenizer)
        if self._pending_fp8 is not None:
            from opensora_sdk import fp8

            fp8.quantize_text_encoder_fp8(self, per_channel=self._pending_fp8)
            self._pending_fp8 = None

    def enable_fp8(self, per_channel: bool | str = True) -> None:
        """float8 Linear weights (`fp8.quantize_text_encoder_fp8`): now, or for a deferred
        encoder when T5 loads (its cache identity changes at once)."""
        from opensora_sdk import fp8

        if self.is_loaded:
            fp8.quantize_text_encoder_fp8(self, per_channel=per_channel)
        else:
            self._pending_fp8 = per_channel
            self.fp8_scales = fp8.scales_name(per_channel)
            self._identity = None

    def offload(self) -> None:
        if self.is_loaded:  # a T5 not loaded yet is on no device
            super().offload()

    def onload(self) -> None:
        if self.is_loaded:
            super().onload()

    # ---- construction ------------------------------------------------------------------

    @classmethod
    def from_pretrained(
        cls,
        path_or_repo: str | os.PathLike = DEFAULT_REPO,
        model_max_length: int = 300,
        dtype: torch.dtype | str = torch.float32,
        device: torch.device | str = "cpu",
        local_files_only: bool | None = None,
        cache=None,
        *,
        cache_dir: str | os.PathLike | None = None,
        offload_after_encode: bool = False,
        offload_device: torch.device | str = "cpu",
        lazy: bool = False,
    ) -> "T5TextEncoder":
        """Load T5 and its tokenizer from a Hugging Face folder or hub repo id.

        The folder holds config.json, the weights (*.safetensors, sharded or not) and the
        tokenizer files (spiece.model or tokenizer.json, tokenizer_config.json). A repo id is
        downloaded through huggingface_hub (`local_files_only`, `HF_HUB_OFFLINE` and
        `cache_dir` apply); when that is impossible, the CheckpointError says which folder to
        pass instead. Weights are loaded straight in `dtype` on `device`. `lazy=True`: only the
        folder is found and checked now; T5 loads when first needed (see the module docstring).
        """
        dtype = parse_dtype(dtype)
        device = torch.device(device)
        folder = find_t5_folder(path_or_repo, local_files_only, cache_dir)
        options = dict(model_max_length=model_max_length, device=device, cache=cache,
                       offload_after_encode=offload_after_encode, offload_device=offload_device,
                       name=str(path_or_repo))  # fmt: skip
        if lazy:
            output_dim, fingerprint = folder_facts(folder)
            load = lambda: (load_t5_folder(folder, dtype, device), load_tokenizer_folder(folder))  # noqa: E731
            return cls.deferred(load, output_dim=output_dim, dtype=dtype, fingerprint=fingerprint, **options)
        tokenizer = load_tokenizer_folder(folder)
        model = load_t5_folder(folder, dtype, device)
        return cls(model, tokenizer, **options)

    @classmethod
    def from_config(
        cls,
        t5_config,
        tokenizer=None,
        *,
        model_max_length: int = 300,
        dtype: torch.dtype | str = torch.float32,
        device: torch.device | str = "cpu",
        cache=None,
        offload_after_encode: bool = False,
        offload_device: torch.device | str = "cpu",
    ) -> "T5TextEncoder":
        """A T5 encoder with freshly initialised weights (seed torch first for reproducibility).

        `t5_config` is a transformers `T5Config` (see `tiny_t5_config`) or a dict of its
        fields; `tokenizer` is a tokenizer object, a folder to load one from, or None for the
        built-in tiny tokenizer.
        """
        from transformers.models.auto.tokenization_auto import AutoTokenizer
        from transformers.models.t5.configuration_t5 import T5Config
        from transformers.models.t5.modeling_t5 import T5EncoderModel

        if isinstance(t5_config, dict):
            t5_config = T5Config(**t5_config)
        if tokenizer is None:
            tokenizer = load_tiny_tokenizer()
        elif isinstance(tokenizer, (str, os.PathLike)):
            tokenizer = AutoTokenizer.from_pretrained(str(tokenizer))
        model = T5EncoderModel(t5_config).to(device=torch.device(device), dtype=parse_dtype(dtype))
        return cls(
            model,
            tokenizer,
            model_max_length=model_max_length,
            device=device,
            cache=cache,
            offload_after_encode=offload_after_encode,
            offload_device=offload_device,
            name="config",
        )

    @classmethod
    def from_single_file(
        cls,
        path: str | os.PathLike,
        *,
        tokenizer=None,
        tokenizer_search=(),
        model_max_length: int = 300,
        dtype: torch.dtype | str = torch.float32,
        device: torch.device | str = "cpu",
        cache=None,
        offload_after_encode: bool = False,
        offload_device: torch.device | str = "cpu",
        lazy: bool = False,
    ) -> "T5TextEncoder":
        """T5 from one weight file in the Hugging Face key layout (ComfyUI's t5xxl_fp16.safetensors).

        The config comes from the tensor shapes; the model is built on the meta device and each
        tensor is assigned once in `dtype` on `device` (see `models/t5_file.py`). .safetensors is
        read lazily; .pth/.pt/.bin only through torch.load(weights_only=True). Missing,
        unexpected or mismatched keys are a CheckpointError naming the file and the keys.
        `tokenizer`: a tokenizer object or a folder; None takes the first folder among [the
        file's folder, *tokenizer_search] that holds tokenizer.json or spiece.model.
        `lazy=True`: the file and the tokenizer folder are checked now, the weights and the
        tokenizer are loaded when first needed (a tokenizer object: used as it is).
        """
        path = Path(path).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"T5 weight file {str(path)!r} not found")
        dtype, device = parse_dtype(dtype), torch.device(device)
        config = read_config(path)  # a file of another kind fails here, before anything loads
        if tokenizer is None:
            tokenizer = find_tokenizer_folder(path, tokenizer_search)
        options = dict(model_max_length=model_max_length, device=device, cache=cache,
                       offload_after_encode=offload_after_encode, offload_device=offload_device,
                       name=str(path))  # fmt: skip
        if lazy:
            check_weight_files([path])
            if isinstance(tokenizer, (str, os.PathLike)):
                folder = Path(tokenizer)
                files = tokenizer_files(folder)
                if not files:
                    raise FileNotFoundError(
                        f"tokenizer folder {str(folder)!r} has neither tokenizer.json nor spiece.model"
                    )
                identity = fingerprint([path], files)
                load = lambda: (load_t5_encoder(path, config, dtype, device),  # noqa: E731
                                load_tokenizer_folder(folder))
            else:  # a tokenizer object: identified by its vocabulary
                identity = fingerprint([path], []) + _sha(sorted(tokenizer.get_vocab().items()))
                load = lambda: (load_t5_encoder(path, config, dtype, device), tokenizer)  # noqa: E731
            return cls.deferred(load, output_dim=config.d_model, dtype=dtype, fingerprint=identity, **options)
        if isinstance(tokenizer, (str, os.PathLike)):
            tokenizer = load_tokenizer_folder(Path(tokenizer))
        return cls(load_t5_encoder(path, config, dtype, device), tokenizer, **options)

    # ---- facts -------------------------------------------------------------------------

    @property
    def dtype(self) -> torch.dtype:
        if not self.is_loaded:
            return self._deferred_facts["dtype"]
        return next(self.model.parameters()).dtype

    @property
    def output_dim(self) -> int:
        """C, the width of y (4096 for T5-XXL); STDiT3's `caption_channels` must equal it."""
        if not self.is_loaded:
            return self._deferred_facts["output_dim"]
        return self.model.config.d_model

    @property
    def identity(self) -> str:
        """A stable id of this encoder: a hash of its architecture, weights sample and tokenizer.

        The weight part hashes the first and last 32 values of every tensor (cheap even for
        T5-XXL), so two encoders with different weights do not share cache entries, while the
        same weights loaded from a folder or a hub id do. An encoder made with `lazy=True` is
        identified by its files instead (paths, sizes, modification times, the config and
        tokenizer files' bytes) and its fp8 choice, without loading anything.
        """
        if self._identity is None and self._deferred_facts is not None:
            self._identity = _sha("files", self._deferred_facts["fingerprint"], self.fp8_scales)[:32]
        if self._identity is None:
            config = self.model.config
            arch = json.dumps({k: getattr(config, k, None) for k in _ARCH_FIELDS}, sort_keys=True)
            h = hashlib.sha256(arch.encode())
            for key, tensor in self.model.state_dict().items():
                flat = tensor.detach().reshape(-1)
                sample = torch.cat([flat[:32], flat[-32:]]).float().cpu()
                h.update(f"{key}{tuple(tensor.shape)}".encode())
                h.update(sample.numpy().tobytes())
            vocab = sorted(self.tokenizer.get_vocab().items())
            h.update(json.dumps(vocab, ensure_ascii=False).encode("utf-8"))
            self._identity = h.hexdigest()[:32]
        return self._identity

    def cache_key(self, text: str, device: torch.device | str | None = None) -> str:
        """The cache key of one (already processed) prompt for this encoder running on `device`
        (default: its `device`): its identity, dtype, max length, the device type and the
        torch / transformers versions (each may change the float results)."""
        device_type = torch.device(device if device is not None else self.device).type
        return _sha(self.identity, self.dtype, self.model_max_length, device_type, _library_versions(), text)

    def lookup(self, prompts, device: torch.device | str | None = None) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """{text: (y_row [L, C], mask_row [L]) on the CPU} for the prompts the cache holds for
        this encoder on `device`; loads nothing (empty without a cache)."""
        if self.cache is None:
            return {}
        rows = {}
        for text in dict.fromkeys(_as_text_list(prompts)):
            hit = self.cache.get(self.cache_key(text, device))
            if hit is not None:
                rows[text] = hit
        return rows

    # ---- encoding ----------------------------------------------------------------------

    def tokenize(self, prompts: list[str]):
        """The official tokenizer call: max_length padding, truncation, EOS, attention mask."""
        return self.tokenizer(
            list(prompts),
            max_length=self.model_max_length,
            padding="max_length",
            truncation=True,
            return_attention_mask=True,
            add_special_tokens=True,
            return_tensors="pt",
        )

    def _run_model(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        self.onload()
        tokens = self.tokenize(texts)
        input_ids = tokens["input_ids"].to(self.device)  # [b, L]
        mask = tokens["attention_mask"].to(self.device, torch.int64)  # [b, L]
        with torch.no_grad():
            y = self.model(input_ids=input_ids, attention_mask=mask)["last_hidden_state"]  # [b, L, C]
        return y, mask

    def encode(self, prompts: str | list[str]) -> TextEmbedding:
        """Encode processed prompts -> TextEmbedding(y [B,1,L,C], mask [B,L] int64) on `device`.

        Without a cache the distinct texts run as one batch (as the official encoder). With
        one, prompts it holds skip T5 and each other text runs on its own and is stored. With
        `offload_after_encode`, T5 leaves `device` right after encoding.
        """
        texts = _as_text_list(prompts)
        rows = self.lookup(texts)
        todo = [t for t in dict.fromkeys(texts) if t not in rows]
        if todo and self.cache is None:
            y_new, mask_new = self._run_model(todo)
            rows.update((text, (y_new[j], mask_new[j])) for j, text in enumerate(todo))
        elif todo:
            for text in todo:  # alone: the stored row does not depend on the other prompts of a call
                y_new, mask_new = self._run_model([text])
                rows[text] = (y_new[0], mask_new[0])
                meta = {"encoder": self.identity, "name": self.name, "dtype": self.dtype,  # not the prompt itself
                        "max_length": self.model_max_length, "device": self.device.type,
                        "versions": _library_versions()}  # fmt: skip
                self.cache.put(self.cache_key(text), y_new[0], mask_new[0], meta)
        if todo and self.offload_after_encode:
            self.offload()
        y = torch.stack([rows[t][0].to(self.device) for t in texts])[:, None]  # [B, 1, L, C]
        mask = torch.stack([rows[t][1].to(self.device) for t in texts])  # [B, L]
        return TextEmbedding(y, mask)

    __call__ = encode

    def __repr__(self) -> str:
        return (
            f"T5TextEncoder(name={self.name!r}, d_model={self.output_dim}, max_length={self.model_max_length}, "
            f"dtype={self.dtype}, device={self.device}, offloaded={self._offloaded}, "
            f"cache={'on' if self.cache is not None else 'off'}{'' if self.is_loaded else ', not loaded yet'})"
        )


def _as_text_list(prompts) -> list[str]:
    if isinstance(prompts, str):
        prompts = [prompts]
    if not isinstance(prompts, (list, tuple)) or not prompts or not all(isinstance(p, str) for p in prompts):
        raise ValueError(f"prompts={prompts!r} is not allowed: expected a string or a non-empty list of strings")
    return list(prompts)
