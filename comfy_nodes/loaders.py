"""Loader nodes: STDiT3 (diffusion model), the video VAE and the T5 text encoder.

Choices are listed when ComfyUI asks for the node definitions (never at import time):
"(built-in)" first, the SDK's built-in default model (`opensora_sdk.presets.BUILTIN_PRESET`),
then every weight file under ComfyUI's folder for that model kind and under models/opensora.
A sub-folder holding a config.json (the official Hugging Face layout) is offered once, as
"name/", and loaded as a folder; any other file is loaded as a single checkpoint.

A file that cannot be loaded raises `ModelFileError`, in ComfyUI's terms: which file (the
entry and its full path), what is wrong with it (damaged, not this kind of model, not
Open-Sora), and where such files come from and which folder they go in. The SDK's advice to
pass a config object (which a graph cannot do) becomes: use the Hugging Face folder with its
config.json.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import pickle
import re
from pathlib import Path

from . import comfy_host as host
from .types import BUILTIN, CATEGORY, DTYPES, MODEL, TEXT_ENCODER, VAE, LoadedModel, LoadedTextEncoder, LoadedVAE, tip

FOLDERS = {
    "model": ("diffusion_models", host.OPENSORA_FOLDER),
    "vae": ("vae", host.OPENSORA_FOLDER),
    "text_encoder": ("text_encoders", host.OPENSORA_FOLDER),
}


LABELS = {"model": "diffusion model", "vae": "VAE", "text_encoder": "text encoder"}
WHERE_FROM = {
    "model": (
        "Open-Sora diffusion models are the Hugging Face folders hpcai-tech/OpenSora-STDiT-v3 (v1.2) and "
        "hpcai-tech/OpenSora-STDiT-v2-stage3 (v1.1), or the OpenSora-v1-*.pth files of hpcai-tech/Open-Sora (v1.0): "
        "download the whole folder (with its config.json) into ComfyUI/models/diffusion_models or models/opensora "
        "and pick 'name/', or put a single file there"
    ),
    "vae": (
        "Open-Sora VAEs are the Hugging Face folders hpcai-tech/OpenSora-VAE-v1.2 (v1.2) and stabilityai/sd-vae-ft-ema "
        "(v1.1, v1.0): download the folder (with its config.json) into ComfyUI/models/vae or models/opensora and pick "
        "'name/'"
    ),
    "text_encoder": (
        "Open-Sora's text encoder is T5-XXL v1.1: the Hugging Face folder DeepFloyd/t5-v1_1-xxl (pick 'name/'), or "
        "one T5-XXL file such as ComfyUI's t5xxl_fp16.safetensors, in ComfyUI/models/text_encoders or models/opensora"
    ),
}


class ModelFileError(ValueError):
    """A model file that cannot be loaded: which file, what is wrong, where such files come from."""


def _what_is_wrong(err: BaseException) -> str:
    """The SDK's message without advice a graph cannot follow (passing a config object)."""
    text = str(err).strip() or type(err).__name__
    if not isinstance(err, _checkpoint_error()):
        text = f"{type(err).__name__}: {text}"
    kept = []
    for line in text.splitlines():
        parts = [p for p in re.split(r";\s+", line) if not re.search(r"pass (config=|the matching config)", p)]
        if parts:
            kept.append("; ".join(parts).rstrip(" ,;("))
    text = "\n".join(kept)
    if re.search(r"pass (config=|the matching config)", str(err)):
        text += ("; the loader cannot tell the model's settings from this file alone: use the model's Hugging Face "
                 "folder with its config.json (pick 'name/'), or a complete official checkpoint")
    return text


def _checkpoint_error() -> type:
    from opensora_sdk.loading import CheckpointError

    return CheckpointError


@contextlib.contextmanager
def explained(kind: str, choice: str, path: Path):
    """Re-raise a failed load as `ModelFileError` naming the file in ComfyUI's terms."""
    import torch

    try:
        yield
    except torch.cuda.OutOfMemoryError:
        raise
    except (_checkpoint_error(), OSError, ValueError, RuntimeError, KeyError, EOFError,
            pickle.UnpicklingError) as err:
        what = _what_is_wrong(err).rstrip(". ")
        if str(path) not in what:
            what = f"{path}: {what}"
        raise ModelFileError(
            f"{LABELS[kind]} {choice!r} cannot be loaded. {what}. {WHERE_FROM[kind]}."
        ) from err


# --------------------------------------------------------------------------------------------
# Choices and paths
# --------------------------------------------------------------------------------------------


def _roots(kind: str) -> list[Path]:
    return [root for name in FOLDERS[kind] for root in host.model_folders(name)]


def model_choices(kind: str) -> list[str]:
    """"(built-in)" + files and HF folders ("name/") of the folders for `kind`."""
    entries = set()
    for name in FOLDERS[kind]:
        roots = host.model_folders(name)
        for rel in host.list_model_files(name):
            parent = Path(rel).parent
            is_hf = parent != Path(".") and any((root / parent / "config.json").is_file() for root in roots)
            entries.add(parent.as_posix() + "/" if is_hf else rel)
    return [BUILTIN] + sorted(entries)


def resolve_choice(kind: str, choice: str) -> Path:
    """The file or folder behind a choice; FileNotFoundError naming the folders searched."""
    roots = _roots(kind)
    for root in roots:
        path = root / choice.rstrip("/")
        if (choice.endswith("/") and path.is_dir()) or path.is_file():
            return path
    where = ", ".join(str(r) for r in roots) or f"no folder registered for {FOLDERS[kind]}"
    raise FileNotFoundError(f"{kind} {choice!r} not found in the model folders ({where}); pick another entry")


def resolve_dtype(name: str, device):
    """"auto" -> the SDK default for `device` (bf16 on accelerators, fp32 on the CPU)."""
    from opensora_sdk.dtypes import parse_dtype
    from opensora_sdk.placement import default_dtype

    if name not in DTYPES:
        raise ValueError(f"dtype={name!r} is not allowed: choose one of {list(DTYPES)}")
    return default_dtype(device) if name == "auto" else parse_dtype(name)


@functools.lru_cache(maxsize=1)
def _builtin_pipeline(preset: str):
    """The built-in preset's three models on the CPU in float32 (built once per process)."""
    import torch

    from opensora_sdk.pipeline import OpenSoraPipeline

    return OpenSoraPipeline.from_preset(preset, device="cpu", dtype=torch.float32, progress=False)


def builtin_component(name: str):
    """A private copy of one model of the built-in default preset, and its preset name."""
    from opensora_sdk.presets import builtin_preset

    preset = builtin_preset()
    return copy.deepcopy(getattr(_builtin_pipeline(preset), name)), preset


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------


WEIGHT_DTYPES = ("default", "fp8_e4m3fn")  # ComfyUI's names for the weight storage of a diffusion model


def load_model(choice: str, dtype: str = "auto", attention: str = "sdpa", weight_dtype: str = "default") -> LoadedModel:
    """Any family's transformer (STDiT3 v1.2, STDiT2 v1.1, STDiT v1.0), recognised from the file.
    `weight_dtype` "fp8_e4m3fn": Linear weights stored in float8 (`opensora_sdk.fp8`); a file
    written with fp8 weights loads as fp8 whatever it says."""
    from opensora_sdk import fp8
    from opensora_sdk.families import family_of
    from opensora_sdk.models.auto import load_transformer
    from opensora_sdk.presets import generation_card, get_preset

    if weight_dtype not in WEIGHT_DTYPES:
        raise ValueError(f"weight_dtype={weight_dtype!r} is not allowed: choose one of {list(WEIGHT_DTYPES)}")
    torch_dtype = resolve_dtype(dtype, host.torch_device())
    if choice == BUILTIN:
        transformer, preset = builtin_component("transformer")
        transformer.to(torch_dtype)
        source, max_frames = f"built-in preset {preset!r}", get_preset(preset).latent_frame_limit
        warp = get_preset(preset).defaults.get("timestep_warp", True)
    else:
        path = resolve_choice("model", choice)
        with explained("model", choice, path):
            if fp8.is_fp8_file(path):
                transformer = fp8.load_fp8_transformer(path).to(torch_dtype)
            else:
                transformer = load_transformer(path, dtype=torch_dtype, device=host.offload_device("unet"))
        source, max_frames = str(path), family_of(transformer).max_latent_frames
        card = generation_card(path)  # a training checkpoint's generation.json: its own clip-length limit and warp
        if card and card.get("max_latent_frames") is not None:
            max_frames = card["max_latent_frames"]
        warp = (card or {}).get("defaults", {}).get("timestep_warp", family_of(transformer).defaults.get("timestep_warp", True))
    transformer.set_attention_backend(attention)
    if weight_dtype == "fp8_e4m3fn" and not fp8.fp8_layers(transformer):
        fp8.quantize_transformer_fp8(transformer)
    transformer.to(host.offload_device("unet"))
    return LoadedModel(transformer.eval().requires_grad_(False), source, torch_dtype, max_frames, bool(warp))


def load_vae(choice: str, dtype: str = "auto") -> LoadedVAE:
    """The v1.2 video VAE or the per-frame SD VAE of v1.1 / v1.0, recognised from the file."""
    from opensora_sdk.models.auto import load_vae as sdk_load_vae

    torch_dtype = resolve_dtype(dtype, host.torch_device())
    if choice == BUILTIN:
        vae, preset = builtin_component("vae")
        vae.to(torch_dtype)
        source = f"built-in preset {preset!r}"
    else:
        path = resolve_choice("vae", choice)
        with explained("vae", choice, path):
            vae = sdk_load_vae(path, dtype=torch_dtype, device=host.offload_device("vae"))
        source = str(path)
    vae.to(host.offload_device("vae"))
    return LoadedVAE(vae.eval().requires_grad_(False), source, torch_dtype)


def load_text_encoder(choice: str, dtype: str = "auto", max_length: int = 300) -> LoadedTextEncoder:
    """T5 from a folder or one file, checked now and loaded when a prompt first needs it: prompts
    found in the text cache (`default_cache_folder()`, shared with `opensora generate`) never
    load it, also after ComfyUI restarts."""
    from opensora_sdk.models import T5TextEncoder
    from opensora_sdk.models.text_cache import EmbeddingCache, default_cache_folder

    device = host.text_encoder_device()
    torch_dtype = resolve_dtype(dtype, device)
    if choice == BUILTIN:
        encoder, preset = builtin_component("text_encoder")
        encoder.model.to(torch_dtype)
        source = f"built-in preset {preset!r}"
    else:
        path = resolve_choice("text_encoder", choice)
        folder = default_cache_folder()
        cache = EmbeddingCache(folder=folder) if folder is not None else None
        with explained("text_encoder", choice, path):
            if path.is_dir():
                encoder = T5TextEncoder.from_pretrained(path, model_max_length=max_length, dtype=torch_dtype,
                                                        device="cpu", cache=cache, lazy=True)
            else:
                encoder = T5TextEncoder.from_single_file(
                    path, tokenizer_search=_bundled_t5_tokenizer_folders(), model_max_length=max_length,
                    dtype=torch_dtype, cache=cache, lazy=True,
                )
        source = str(path)
    return LoadedTextEncoder(encoder, source)  # placed per use by comfy_nodes.placement


def _bundled_t5_tokenizer_folders() -> list[Path]:
    """The T5 tokenizer ComfyUI ships (comfy/text_encoders/t5_tokenizer), when running inside it."""
    import importlib.util

    comfy = importlib.util.find_spec("comfy") if host.in_comfyui() else None
    if comfy is None:
        return []
    return [Path(folder) / "text_encoders" / "t5_tokenizer" for folder in comfy.submodule_search_locations or []]


# --------------------------------------------------------------------------------------------
# Nodes
# --------------------------------------------------------------------------------------------


def _attention_choices() -> list[str]:
    from opensora_sdk.models.attention import BACKENDS

    return list(BACKENDS)


class OpenSoraModelLoader:
    DESCRIPTION = (
        "Loads the diffusion transformer of any Open-Sora release: STDiT3 (v1.2), STDiT2 (v1.1) or STDiT (v1.0), "
        "recognised from the file."
    )
    CATEGORY = f"{CATEGORY}/loaders"
    RETURN_TYPES = (MODEL,)
    RETURN_NAMES = ("model",)
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": (model_choices("model"), tip(
                "(built-in): the small model that ships with the pack. Otherwise a file or Hugging Face folder "
                "(name/) from models/diffusion_models or models/opensora, e.g. hpcai-tech/OpenSora-STDiT-v3",
                default=BUILTIN)),
            "dtype": (list(DTYPES), tip("Weight precision; auto = bf16 on a GPU, fp32 on the CPU", default="auto")),
            "attention": (_attention_choices(), tip(
                "Attention kernel: sdpa (PyTorch, always available), flash (flash-attn, CUDA bf16/fp16) or "
                "xformers; a kernel whose package is missing fails with install instructions", default="sdpa")),
        }, "optional": {
            "weight_dtype": (list(WEIGHT_DTYPES), tip(
                "default: weights in dtype. fp8_e4m3fn: the transformer blocks' Linear weights stored in float8 "
                "(per-channel scales; half the memory of bf16), computed in dtype; embedders, norms and the final "
                "layer stay in dtype", default="default")),
        }}

    def load(self, model, dtype, attention, weight_dtype="default"):
        return (load_model(model, dtype, attention, weight_dtype),)


class OpenSoraVAELoader:
    DESCRIPTION = (
        "Loads the Open-Sora v1.2 video VAE (spatial SD-VAE + temporal VAE), or the per-frame SD VAE of v1.1 and v1.0 "
        "(stabilityai/sd-vae-ft-ema), recognised from the file."
    )
    CATEGORY = f"{CATEGORY}/loaders"
    RETURN_TYPES = (VAE,)
    RETURN_NAMES = ("vae",)
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "vae": (model_choices("vae"), tip(
                "(built-in) or a file / Hugging Face folder (name/) from models/vae or models/opensora, "
                "e.g. hpcai-tech/OpenSora-VAE-v1.2", default=BUILTIN)),
            "dtype": (list(DTYPES), tip(
                "Weight precision; auto = bf16 on a GPU, fp32 on the CPU (fp16 keeps the spatial decoder in fp32)",
                default="auto")),
        }}

    def load(self, vae, dtype):
        return (load_vae(vae, dtype),)


class OpenSoraTextEncoderLoader:
    DESCRIPTION = "Loads the T5 text encoder (T5-XXL v1.1 for Open-Sora v1.2)."
    CATEGORY = f"{CATEGORY}/loaders"
    RETURN_TYPES = (TEXT_ENCODER,)
    RETURN_NAMES = ("text_encoder",)
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "text_encoder": (model_choices("text_encoder"), tip(
                "(built-in), a Hugging Face folder (name/, e.g. DeepFloyd/t5-v1_1-xxl) or a single T5-XXL "
                ".safetensors such as t5xxl_fp16.safetensors from models/text_encoders or models/opensora",
                default=BUILTIN)),
            "dtype": (list(DTYPES), tip(
                "Weight precision; auto = bf16 on a GPU, fp32 on the CPU (the official runs use fp32)",
                default="auto")),
            "max_length": ("INT", tip(
                "Tokens per prompt; must equal the diffusion model's model_max_length (300 for v1.2). Ignored "
                "for (built-in)", default=300, min=2, max=4096)),
        }}

    def load(self, text_encoder, dtype, max_length):
        return (load_text_encoder(text_encoder, dtype, max_length),)


NODES = {
    "OpenSoraModelLoader": (OpenSoraModelLoader, "Open-Sora Load Diffusion Model"),
    "OpenSoraVAELoader": (OpenSoraVAELoader, "Open-Sora Load VAE"),
    "OpenSoraTextEncoderLoader": (OpenSoraTextEncoderLoader, "Open-Sora Load Text Encoder"),
}
