"""Training checkpoints: everything needed to continue a run exactly, written atomically.

One format for both trainers (training/train.py: STDiT3, STDiT2 or STDiT; training/train_vae.py:
the video VAE, one checkpoint root per stage). Layout of `<output>/checkpoints/step-00000200/`:

    model/          config.json + model.safetensors   raw weights  (the model class's from_pretrained,
                                                                    or opensora_sdk.models.auto.load_transformer)
    ema/            config.json + model.safetensors   EMA weights  (likewise)
    optimizer.pt    optimizer state (optimizer/rank{r}.pt per rank when it is sharded)
    lr_scheduler.pt learning-rate scheduler state
    grad_scaler.pt  fp16 loss-scaler state (fp16 runs only)
    sampler.json    {seed, epoch, position, num_replicas} of the bucket batch sampler
    rng/rank{r}.pt  python / numpy / torch / CUDA RNG states and the trainer's generators
    state.json      {step, epoch, batches_in_epoch, world_size, ...}, written last

Every rank writes its files into `.tmp-step-00000200/`; after a barrier the main process
renames it to `step-00000200` (`os.replace`, atomic on one filesystem). A run killed while
saving leaves only a `.tmp-*` folder, which `list_checkpoints` ignores and the next save
removes. Every file goes through `opensora_sdk.loading`'s atomic writers (temp file, fsync,
rename, fsync of the folder), and the folder rename is fsynced too. The folder's files are loaded
with `torch.load(weights_only=True)`.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import Callable, Mapping, NamedTuple

import numpy as np
import torch

from opensora_sdk.configs import STDiT2Config, STDiT3Config, STDiTConfig, VideoAutoencoderConfig, config_to_dict
from opensora_sdk.loading import fsync_dir, save_safetensors_atomic, write_file_atomic, write_json_atomic
from opensora_sdk.models.vae import official_config_dict

PREFIX = "step-"
TEMP_PREFIX = ".tmp-" + PREFIX


def checkpoint_name(step: int) -> str:
    return f"{PREFIX}{int(step):08d}"


def list_checkpoints(root: str | os.PathLike) -> list[Path]:
    """Complete checkpoints under `root` (folders step-N with a state.json), oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [
        p for p in root.iterdir()
        if p.is_dir() and p.name.startswith(PREFIX) and p.name[len(PREFIX):].isdigit() and (p / "state.json").is_file()
    ]  # fmt: skip
    return sorted(found, key=lambda p: int(p.name[len(PREFIX) :]))


def checkpoint_problems(folder: str | os.PathLike) -> list[str]:
    """What is wrong with a checkpoint folder, cheaply (no tensor is read): state.json must be
    JSON; every safetensors file must have a readable header whose tensors fill the file; every
    torch file must be a complete zip archive. [] for a good checkpoint."""
    import zipfile

    from opensora_sdk.loading import CheckpointError, check_weight_files

    folder = Path(folder)
    problems = []
    try:
        json.loads((folder / "state.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        problems.append(f"{folder / 'state.json'}: {err}")
    for path in sorted(folder.rglob("*")):
        if not path.is_file():
            continue
        if path.suffix == ".safetensors":
            try:
                check_weight_files([path])
            except (CheckpointError, OSError, ValueError) as err:
                problems.append(f"{path}: {str(err).splitlines()[0]}")
        elif path.suffix == ".pt" and not zipfile.is_zipfile(path):
            problems.append(f"{path}: not a complete torch file (truncated or damaged)")
        elif path.suffix == ".json" and path.name != "state.json":
            try:
                json.loads(path.read_text(encoding="utf-8"))
            except (OSError, ValueError) as err:
                problems.append(f"{path}: {err}")
    return problems


def resolve_resume(value: str | os.PathLike, *roots: str | os.PathLike, warn: Callable[[str], None] | None = None) -> Path:
    """`--resume latest` -> the newest good checkpoint of the last of `roots` (in run order)
    that has one: a damaged or half-written one (`checkpoint_problems`) is named through `warn`
    (default: the logging module) and the next older one is taken. A path -> that checkpoint."""
    if str(value) == "latest":
        import logging

        warn = warn or logging.getLogger(__name__).warning
        for root in reversed(roots):
            for folder in reversed(list_checkpoints(root)):
                problems = checkpoint_problems(folder)
                if not problems:
                    return folder
                warn(f"--resume latest: skipping the damaged checkpoint {folder} ({'; '.join(problems[:3])}); trying an older one")
        where = " or ".join(repr(str(r)) for r in roots)
        raise FileNotFoundError(f"--resume latest: no complete checkpoint (step-N/state.json, readable) under {where}")
    folder = Path(value)
    if not (folder / "state.json").is_file():
        raise FileNotFoundError(
            f"--resume {str(value)!r}: not a complete checkpoint folder (no state.json); "
            f"pass 'latest' or a folder such as {str(Path(roots[-1]) / checkpoint_name(200))!r}"
        )
    return folder


# The transformer configs and the class name each model's `save_pretrained` writes.
_ARCHITECTURES = {STDiT3Config: "STDiT3", STDiT2Config: "STDiT2", STDiTConfig: "STDiT"}


def model_config_json(config: STDiT3Config | STDiT2Config | STDiTConfig | VideoAutoencoderConfig, dtype: str) -> dict:
    """config.json of a model folder, as the model's `save_pretrained` writes it."""
    if type(config) in _ARCHITECTURES:
        arch = _ARCHITECTURES[type(config)]
        return {"architectures": [arch], "model_type": config.model_type, **config_to_dict(config), "torch_dtype": dtype}
    if isinstance(config, VideoAutoencoderConfig):
        return {**official_config_dict(config), "torch_dtype": dtype}
    raise TypeError(
        f"model_config: {type(config).__name__} is not supported; allowed: STDiT3Config, STDiT2Config, STDiTConfig, "
        "VideoAutoencoderConfig"
    )


def write_model_folder(state_dict: Mapping[str, torch.Tensor], config: STDiT3Config | STDiT2Config | STDiTConfig | VideoAutoencoderConfig,
                       folder: str | os.PathLike) -> None:  # fmt: skip
    """model.safetensors + config.json in the layout of the model's `save_pretrained`."""
    folder = Path(folder)
    first = next(iter(state_dict.values()))
    dtype = str(first.dtype).removeprefix("torch.")
    save_safetensors_atomic(dict(state_dict), folder / "model.safetensors", metadata={"format": "pt"})
    write_json_atomic(model_config_json(config, dtype), folder / "config.json")


# --------------------------------------------------------------------------------------------
# RNG states
# --------------------------------------------------------------------------------------------


def capture_rng_state(generators: Mapping[str, torch.Generator] | None = None, extra: Mapping | None = None) -> dict:
    """This process's RNG states: python, numpy, torch CPU, CUDA (if used), named generators."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": [kind, torch.from_numpy(np.asarray(keys, dtype=np.int64)), int(pos), int(has_gauss), float(gauss)],
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None,
        "generators": {name: g.get_state() for name, g in (generators or {}).items()},
    }
    state.update(extra or {})
    return state


def restore_rng_state(state: Mapping, generators: Mapping[str, torch.Generator] | None = None) -> None:
    random.setstate(_as_tuple(state["python"]))
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    for name, g in (generators or {}).items():
        if name not in state["generators"]:
            raise KeyError(f"checkpoint RNG state has no generator {name!r} (has {sorted(state['generators'])})")
        g.set_state(state["generators"][name])


def _as_tuple(value):
    return tuple(_as_tuple(v) for v in value) if isinstance(value, (list, tuple)) else value


# --------------------------------------------------------------------------------------------
# Save / load
# --------------------------------------------------------------------------------------------


class TrainingState(NamedTuple):
    """What a training checkpoint holds for one rank."""

    folder: Path
    train_state: dict
    model_state: dict | None
    ema_state: dict | None
    optimizer_state: dict | None
    scheduler_state: dict | None
    scaler_state: dict | None
    sampler_state: dict | None
    rng_state: dict | None


def save_checkpoint(
    root: str | os.PathLike,
    step: int,
    *,
    rank: int,
    is_main: bool,
    barrier: Callable[[], None],
    model_config: STDiT3Config | STDiT2Config | STDiTConfig | VideoAutoencoderConfig,
    model_state: Mapping[str, torch.Tensor] | None,
    ema_state: Mapping[str, torch.Tensor] | None,
    optimizer_state: dict | None,
    optimizer_sharded: bool = False,
    scheduler_state: dict | None = None,
    scaler_state: dict | None = None,
    sampler_state: dict | None = None,
    rng_state: dict | None = None,
    train_state: dict | None = None,
    keep_last: int | None = None,
    extra: Callable[[Path], None] | None = None,
) -> Path:
    """Write one checkpoint atomically; call on every rank with the same `step`.

    The main process writes the shared pieces (model, ema, optimizer unless sharded,
    scheduler, sampler, state); every rank writes its RNG state (and optimizer shard).
    `barrier` synchronises the ranks (a no-op for one process). `extra(folder)` writes more
    files into the checkpoint before it is committed (main process).
    """
    root = Path(root)
    tmp, final = root / (TEMP_PREFIX + checkpoint_name(step)[len(PREFIX):]), root / checkpoint_name(step)
    if is_main:
        root.mkdir(parents=True, exist_ok=True)
        for stale in root.glob(TEMP_PREFIX + "*"):  # left by a run killed while saving
            shutil.rmtree(stale, ignore_errors=True)
        tmp.mkdir()
    barrier()
    if rng_state is not None:
        _torch_save(rng_state, tmp / "rng" / f"rank{rank}.pt")
    if optimizer_sharded and optimizer_state is not None:
        _torch_save(optimizer_state, tmp / "optimizer" / f"rank{rank}.pt")
    if is_main:
        if model_state is not None:
            write_model_folder(model_state, model_config, tmp / "model")
        if ema_state is not None:
            write_model_folder(ema_state, model_config, tmp / "ema")
        if optimizer_state is not None and not optimizer_sharded:
            _torch_save(optimizer_state, tmp / "optimizer.pt")
        for name, value in (("lr_scheduler.pt", scheduler_state), ("grad_scaler.pt", scaler_state)):
            if value is not None:
                _torch_save(value, tmp / name)
        if sampler_state is not None:
            write_json_atomic(sampler_state, tmp / "sampler.json")
        if extra is not None:  # more files of the main process (adapters, generation.json)
            extra(tmp)
    barrier()
    if is_main:
        write_json_atomic({"step": int(step), **(train_state or {})}, tmp / "state.json")
        _commit(tmp, final)
        if keep_last:
            for old in list_checkpoints(root)[: -int(keep_last)]:
                shutil.rmtree(old, ignore_errors=True)
    barrier()
    return final


def _torch_save(obj, path: Path) -> None:
    write_file_atomic(path, lambda tmp: torch.save(obj, tmp))


def _commit(tmp: Path, final: Path) -> None:
    """Move the finished temp folder into place; an older folder of the same step is replaced."""
    old = None
    if final.exists():
        old = final.with_name(f".old-{final.name}-{os.getpid()}")
        os.replace(final, old)
    os.replace(tmp, final)
    fsync_dir(final.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def load_checkpoint(folder: str | os.PathLike, rank: int = 0, *, optimizer_sharded: bool = False, map_location="cpu") -> TrainingState:
    """Read a checkpoint for `rank` (model/EMA tensors as full CPU state dicts)."""
    from safetensors.torch import load_file

    folder = Path(folder)
    train_state = json.loads((folder / "state.json").read_text(encoding="utf-8"))

    def maybe(path: Path):
        return torch.load(path, map_location=map_location, weights_only=True) if path.is_file() else None

    def weights(sub: str):
        path = folder / sub / "model.safetensors"
        return load_file(str(path)) if path.is_file() else None

    optimizer_file = folder / "optimizer" / f"rank{rank}.pt" if optimizer_sharded else folder / "optimizer.pt"
    sampler_file = folder / "sampler.json"
    return TrainingState(
        folder=folder,
        train_state=train_state,
        model_state=weights("model"),
        ema_state=weights("ema"),
        optimizer_state=maybe(optimizer_file),
        scheduler_state=maybe(folder / "lr_scheduler.pt"),
        scaler_state=maybe(folder / "grad_scaler.pt"),
        sampler_state=json.loads(sampler_file.read_text(encoding="utf-8")) if sampler_file.is_file() else None,
        rng_state=maybe(folder / "rng" / f"rank{rank}.pt"),
    )
