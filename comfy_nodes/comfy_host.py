"""The ComfyUI services the nodes use, imported lazily, with stand-ins outside ComfyUI.

Inside a running ComfyUI every function here delegates to ComfyUI (`folder_paths`,
`comfy.model_management`, `comfy.utils.ProgressBar`, `latent_preview`). Outside it (tests,
`opensora workflow run`), the same functions work on their own: devices come from the SDK,
model folders and the output folder from `configure()`, progress goes to registered
listeners, and interruption is a flag set by `request_interrupt()`. `node_hooks()` hands both
to the SDK's generation path: an interrupt check before every transformer block and a
progress bar (with the same check) for every VAE encode / decode.

Nothing is imported from ComfyUI when this module is imported; the first call decides.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Callable

OPENSORA_FOLDER = "opensora"  # our own model folder name: <ComfyUI>/models/opensora
MODEL_EXTENSIONS = {".safetensors", ".pt", ".pth", ".bin", ".ckpt"}

_comfy: dict | None = None
_settings = {"models_dir": None, "output_dir": None, "input_dir": None}
_interrupt = threading.Event()
_progress_listeners: list[Callable] = []
_progress_label = ["sampling"]


class InterruptedByUser(Exception):
    """Raised at the next check (between transformer blocks, sampling steps or VAE units) when
    an interrupt was requested outside ComfyUI."""


def _modules() -> dict:
    """ComfyUI's modules, or {} when ComfyUI is not importable (cached)."""
    global _comfy
    if _comfy is None:
        try:
            import comfy.model_management as mm
            import comfy.utils
            import folder_paths

            _comfy = {"mm": mm, "utils": comfy.utils, "folder_paths": folder_paths}
        except ImportError:
            _comfy = {}
    return _comfy


def in_comfyui() -> bool:
    return bool(_modules())


def configure(*, models_dir=None, output_dir=None, input_dir=None) -> None:
    """Folders used outside ComfyUI (None leaves a setting as it is)."""
    for key, value in (("models_dir", models_dir), ("output_dir", output_dir), ("input_dir", input_dir)):
        if value is not None:
            _settings[key] = Path(value)


# --------------------------------------------------------------------------------------------
# Model folders
# --------------------------------------------------------------------------------------------


def register_model_folder() -> None:
    """Add <models>/opensora to ComfyUI's folder names (called at pack import, lists nothing)."""
    fp = _modules().get("folder_paths")
    if fp is None:
        return
    # after any "opensora:" entry of extra_model_paths.yaml (read before the packs load)
    fp.add_model_folder_path(OPENSORA_FOLDER, os.path.join(fp.models_dir, OPENSORA_FOLDER))
    paths, extensions = fp.folder_names_and_paths[OPENSORA_FOLDER]
    fp.folder_names_and_paths[OPENSORA_FOLDER] = (paths, set(extensions) | MODEL_EXTENSIONS)


def model_folders(kind: str) -> list[Path]:
    """The folders ComfyUI searches for `kind` ("diffusion_models", "vae", "text_encoders",
    "opensora"), or <models_dir>/<kind> outside ComfyUI."""
    fp = _modules().get("folder_paths")
    if fp is not None:
        try:
            return [Path(p) for p in fp.get_folder_paths(kind)]
        except KeyError:
            return []
    base = _settings["models_dir"] or os.environ.get("OPENSORA_MODELS_DIR")
    return [Path(base) / kind] if base else []


def list_model_files(kind: str) -> list[str]:
    """Relative paths of weight files under the folders of `kind` (sorted)."""
    fp = _modules().get("folder_paths")
    if fp is not None:
        try:
            return [f for f in fp.get_filename_list(kind) if Path(f).suffix.lower() in MODEL_EXTENSIONS]
        except KeyError:
            return []
    out = set()
    for folder in model_folders(kind):
        if folder.is_dir():
            for path in folder.rglob("*"):
                if path.is_file() and path.suffix.lower() in MODEL_EXTENSIONS:
                    out.add(path.relative_to(folder).as_posix())
    return sorted(out)


def output_directory() -> Path:
    fp = _modules().get("folder_paths")
    if fp is not None:
        return Path(fp.get_output_directory())
    return Path(_settings["output_dir"] or "output")


def input_directory() -> Path:
    fp = _modules().get("folder_paths")
    if fp is not None:
        return Path(fp.get_input_directory())
    return Path(_settings["input_dir"] or "input")


def save_path(prefix: str, width: int, height: int) -> tuple[Path, str, int, str]:
    """(folder, file stem, counter, subfolder) for ComfyUI's "<stem>_<counter:05>_" naming."""
    fp = _modules().get("folder_paths")
    out = output_directory()
    if fp is not None:
        folder, stem, counter, subfolder, _ = fp.get_save_image_path(prefix, str(out), width, height)
        return Path(folder), stem, counter, subfolder
    subfolder, stem = os.path.split(os.path.normpath(prefix))
    folder = (out / subfolder).resolve()
    if out.resolve() not in (folder, *folder.parents):
        raise ValueError(f"filename_prefix={prefix!r} points outside the output folder {str(out)!r}")
    folder.mkdir(parents=True, exist_ok=True)
    counters = [
        int(p.name[len(stem) + 1 :].split("_")[0])
        for p in folder.glob(f"{stem}_*_.*")
        if p.name[len(stem) + 1 :].split("_")[0].isdigit()
    ]
    return folder, stem, max(counters, default=0) + 1, subfolder


def metadata_disabled() -> bool:
    """ComfyUI's --disable-metadata (never set outside ComfyUI)."""
    if not in_comfyui():
        return False
    from comfy.cli_args import args

    return bool(getattr(args, "disable_metadata", False))


# --------------------------------------------------------------------------------------------
# Devices and memory
# --------------------------------------------------------------------------------------------


def torch_device():
    mm = _modules().get("mm")
    if mm is not None:
        return mm.get_torch_device()
    from opensora_sdk.placement import default_device

    return default_device()


def offload_device(kind: str = "unet"):
    """Where weights wait between uses: kind "unet", "vae" or "text_encoder"."""
    import torch

    mm = _modules().get("mm")
    if mm is None:
        return torch.device("cpu")
    return {"vae": mm.vae_offload_device, "text_encoder": mm.text_encoder_offload_device}.get(
        kind, mm.unet_offload_device
    )()


def text_encoder_device():
    mm = _modules().get("mm")
    return mm.text_encoder_device() if mm is not None else torch_device()


def intermediate_device():
    import torch

    mm = _modules().get("mm")
    return mm.intermediate_device() if mm is not None else torch.device("cpu")


def make_room(num_bytes: int, device) -> None:
    """Ask ComfyUI to unload its own models until `num_bytes` are free on `device`."""
    mm = _modules().get("mm")
    if mm is not None and getattr(device, "type", "cpu") != "cpu":
        mm.free_memory(num_bytes, device)


def soft_empty_cache() -> None:
    mm = _modules().get("mm")
    if mm is not None:
        mm.soft_empty_cache()
    else:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()


# --------------------------------------------------------------------------------------------
# Progress, previews, interruption
# --------------------------------------------------------------------------------------------


def check_interrupted() -> None:
    """Raise ComfyUI's InterruptProcessingException (or InterruptedByUser) if asked to stop."""
    mm = _modules().get("mm")
    if mm is not None:
        mm.throw_exception_if_processing_interrupted()
    if _interrupt.is_set():
        _interrupt.clear()
        raise InterruptedByUser("interrupted: stopped at the next check (between blocks, steps or VAE units)")


def request_interrupt() -> None:
    """Outside ComfyUI: the next check (any thread's) raises InterruptedByUser."""
    _interrupt.set()


def add_progress_listener(fn: Callable) -> Callable:
    """fn(value, total, preview) on every progress update outside ComfyUI; returns fn.
    `progress_label()` tells what is counted ("sampling", "decoding", "encoding")."""
    _progress_listeners.append(fn)
    return fn


def remove_progress_listener(fn: Callable) -> None:
    if fn in _progress_listeners:
        _progress_listeners.remove(fn)


def progress_label() -> str:
    """What the latest progress update counted."""
    return _progress_label[0]


class Progress:
    """comfy.utils.ProgressBar when in ComfyUI (websocket progress + its interrupt check),
    else the registered listeners."""

    def __init__(self, total: int, label: str = "sampling"):
        utils = _modules().get("utils")
        self.bar = utils.ProgressBar(total) if utils is not None else None
        self.total, self.label = total, label

    def update_absolute(self, value: int, preview=None) -> None:
        _progress_label[0] = self.label
        if self.bar is not None:
            self.bar.update_absolute(value, self.total, preview)
        for fn in list(_progress_listeners):
            fn(value, self.total, preview)


class VaeProgress:
    """The VAE's progress(stage, done, total) on a progress bar, then an interrupt check:
    a new bar whenever a new encode / decode starts."""

    def __init__(self):
        self.bar, self.stage, self.done = None, None, 0

    def __call__(self, stage: str, done: int, total: int) -> None:
        if self.bar is None or stage != self.stage or done <= self.done or total != self.bar.total:
            self.bar, self.stage = Progress(total, stage), stage
        self.done = done
        self.bar.update_absolute(done)
        check_interrupted()

    def stage_fn(self, stage: str) -> Callable[[int, int], None]:
        """progress(done, total) of one stage (for a direct vae.encode / vae.decode call)."""
        return lambda done, total: self(stage, done, total)


def node_hooks():
    """The SDK's generation hooks of a node run: ComfyUI's interrupt check before every
    transformer block, VAE progress on ComfyUI's bar (each update also checks)."""
    from opensora_sdk.generation import Hooks

    return Hooks(between_blocks=check_interrupted, vae_progress=VaeProgress())


# Linear map from the 4 latent channels to RGB for ComfyUI's Latent2RGB previews. It is the
# SD1.5 map (the v1.2 VAE's spatial stage is an SD-VAE) applied per channel, an approximation
# for the temporal latent: enough to see composition and motion while sampling.
LATENT_RGB_FACTORS = [
    [0.3512, 0.2297, 0.3227],
    [0.3250, 0.4974, 0.2350],
    [-0.2829, 0.1762, 0.2721],
    [-0.2120, -0.2616, -0.7177],
]


class OpenSoraLatentFormat:
    """What `latent_preview.get_previewer` reads from a latent format."""

    latent_channels = 4
    latent_dimensions = 3
    latent_rgb_factors = LATENT_RGB_FACTORS
    latent_rgb_factors_bias = None
    taesd_decoder_name = None


def previewer():
    """ComfyUI's previewer for our latents (None outside ComfyUI or with previews off)."""
    if not in_comfyui():
        return None
    try:
        import latent_preview
    except ImportError:
        return None
    return latent_preview.get_previewer(torch_device(), OpenSoraLatentFormat)


def preview_image(prev, denoised) -> tuple | None:
    """A preview of the middle latent frame of sample 0 ([B, C, T, h, w]), for the progress bar."""
    if prev is None:
        return None
    mid = denoised[:1, :, denoised.shape[2] // 2]  # [1, C, h, w]
    return prev.decode_latent_to_preview_image("JPEG", mid.float())
