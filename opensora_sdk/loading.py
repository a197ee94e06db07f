"""Checkpoint files: where the SDK reads model weights from disk or the hub.

Sources a user may hand us, for any model:

* a Hugging Face folder (``config.json`` + ``model.safetensors`` or a sharded index),
* a single ``.safetensors`` file,
* a ``.pth`` / ``.pt`` / ``.bin`` file, read only with ``torch.load(weights_only=True)``,
* a hub repo id (``hpcai-tech/OpenSora-STDiT-v3``) resolved through huggingface_hub.

Training checkpoints wrap the weights (``{"ema": ...}``, ``{"model": ...}``,
``{"state_dict": ...}``) and DDP / torch.compile prefix the keys (``module.``, ``_orig_mod.``);
both are unwrapped here. Models are built on the meta device and the tensors are assigned
one by one in the target dtype and device, so no transient float32 copy of the whole model is
made. Every load checks keys and shapes and reports missing, unexpected and mismatched keys.

torch is imported by the functions that need it, not by this module: the command line imports
`CheckpointError` for its error lines, and `opensora --help` does not need torch.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch
    from torch import nn

WEIGHT_FILE_NAMES = (
    "model.safetensors",
    "diffusion_pytorch_model.safetensors",
    "model.safetensors.index.json",
    "diffusion_pytorch_model.safetensors.index.json",
    "ema.safetensors",
    "pytorch_model.bin.index.json",  # shards of .bin files (e.g. a T5 folder saved by transformers)
    "pytorch_model.bin",
    "ema.pt",
    "model.pt",
    "model.pth",
)
_TORCH_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt")
_WRAPPER_KEYS = ("ema", "model", "state_dict", "module", "model_state_dict")
_KEY_PREFIXES = ("module.", "_orig_mod.")


class CheckpointError(RuntimeError):
    """A checkpoint could not be found, read, or does not fit the model."""


# --------------------------------------------------------------------------------------------
# Finding files
# --------------------------------------------------------------------------------------------


@dataclass
class ResolvedCheckpoint:
    """Where a model's files are: its weight files (one, or the shards) and its config.json."""

    weight_files: list[Path]
    config_file: Path | None = None
    source: str = ""


def looks_like_repo_id(source: str) -> bool:
    """"org/name": a Hugging Face repo id rather than a local path."""
    parts = source.split("/")
    return (
        len(parts) == 2
        and all(parts)
        and not source.startswith((".", "/", "~"))
        and not Path(source).suffix in (".safetensors",) + _TORCH_SUFFIXES
    )


def _weights_in_folder(folder: Path) -> list[Path]:
    for name in WEIGHT_FILE_NAMES:
        path = folder / name
        if path.is_file():
            if name.endswith(".index.json"):
                with open(path, encoding="utf-8") as f:
                    shards = sorted(set(json.load(f)["weight_map"].values()))
                return [folder / s for s in shards]
            return [path]
    candidates = sorted(folder.glob("*.safetensors")) or sorted(
        p for p in folder.iterdir() if p.suffix in _TORCH_SUFFIXES
    )
    if len(candidates) == 1:
        return candidates
    raise CheckpointError(
        f"no weights found in folder {str(folder)!r}: expected one of {list(WEIGHT_FILE_NAMES)}"
        + (f", found several candidates {[c.name for c in candidates]}" if candidates else "")
    )


def resolve_checkpoint(
    source: str | os.PathLike,
    *,
    subfolder: str | None = None,
    local_files_only: bool | None = None,
    cache_dir: str | os.PathLike | None = None,
    allow_patterns: Iterable[str] = ("*.json", "*.safetensors"),
) -> ResolvedCheckpoint:
    """Find the weight files and config.json for `source` (folder, file or hub repo id).

    Hub downloads honour ``HF_HUB_OFFLINE`` / `local_files_only`; when the files are neither
    cached nor downloadable, the error names the local folder the user can pass instead.
    """
    text = os.fspath(source)
    path = Path(text).expanduser()
    if path.is_file():
        config = path.parent / "config.json"
        return ResolvedCheckpoint([path], config if config.is_file() else None, text)
    if path.is_dir():
        folder = path / subfolder if subfolder else path
        if not folder.is_dir():
            raise CheckpointError(f"subfolder {subfolder!r} not found in {str(path)!r}")
        config = folder / "config.json"
        return ResolvedCheckpoint(_weights_in_folder(folder), config if config.is_file() else None, text)
    parts = text.split("/")
    if len(parts) >= 3 and Path(text).suffix in (".safetensors",) + _TORCH_SUFFIXES and not text.startswith((".", "/", "~")):
        # one file of a hub repo: "org/repo/OpenSora-v1-16x256x256.pth"
        repo_id, filename = "/".join(parts[:2]), "/".join(parts[2:])
        folder = _download(repo_id, None, local_files_only, cache_dir, [filename])
        file = folder / filename
        if not file.is_file():
            raise CheckpointError(f"{filename!r} is not in the hub repo {repo_id!r} (checked {str(folder)!r})")
        return ResolvedCheckpoint([file], None, text)
    if not looks_like_repo_id(text):
        raise CheckpointError(
            f"checkpoint {text!r} not found: expected an existing folder, a .safetensors/.pth file, "
            "or a Hugging Face repo id like 'hpcai-tech/OpenSora-STDiT-v3'"
        )
    folder = _download(text, subfolder, local_files_only, cache_dir, list(allow_patterns))
    return resolve_checkpoint(folder, subfolder=subfolder)


def _download(repo_id, subfolder, local_files_only, cache_dir, allow_patterns) -> Path:
    from huggingface_hub import snapshot_download

    if local_files_only is None:
        local_files_only = os.environ.get("HF_HUB_OFFLINE", "0") not in ("", "0", "false", "False")
    patterns = [f"{subfolder}/{p}" for p in allow_patterns] if subfolder else allow_patterns
    try:
        return Path(
            snapshot_download(
                repo_id,
                allow_patterns=patterns,
                local_files_only=local_files_only,
                cache_dir=cache_dir,
            )
        )
    except Exception as err:  # huggingface_hub raises many types for "not reachable"
        raise CheckpointError(
            f"could not get {repo_id!r} from the Hugging Face hub ({type(err).__name__}: {err}). "
            f"Offline? Download it on a connected machine with "
            f"`huggingface-cli download {repo_id} --local-dir <folder>`, copy the folder here, "
            f"and pass that folder's path instead of the repo id."
        ) from err


# --------------------------------------------------------------------------------------------
# Reading tensors
# --------------------------------------------------------------------------------------------


def _unwrap(obj, prefer: str) -> dict:
    """Peel training wrappers off a loaded .pth object until a flat tensor dict remains."""
    import torch

    order = (prefer,) + tuple(k for k in _WRAPPER_KEYS if k != prefer)
    while isinstance(obj, dict) and not any(isinstance(v, torch.Tensor) for v in obj.values()):
        for key in order:
            if key in obj and isinstance(obj[key], dict):
                obj = obj[key]
                break
        else:
            raise CheckpointError(f"no tensors found; top-level keys are {sorted(obj)[:10]}")
    if not isinstance(obj, dict):
        raise CheckpointError(f"expected a state dict, found {type(obj).__name__}")
    return obj


def strip_key_prefixes(key: str) -> str:
    changed = True
    while changed:
        changed = False
        for prefix in _KEY_PREFIXES:
            if key.startswith(prefix):
                key, changed = key[len(prefix) :], True
    return key


def _open_safetensors(file: Path):
    """safetensors' lazy reader; a damaged or truncated file is a CheckpointError naming it."""
    from safetensors import safe_open

    try:
        return safe_open(str(file), framework="pt", device="cpu")
    except Exception as err:  # safetensors raises its own error types for damaged headers
        raise CheckpointError(
            f"{str(file)!r} is not a readable .safetensors file ({type(err).__name__}: {err}); it is damaged or was "
            "cut short: download or copy it again"
        ) from err


def read_shapes(path: str | os.PathLike) -> dict[str, tuple[int, ...]]:
    """{key: shape} of a weight file; a .safetensors file is read without loading tensors."""
    path = Path(path)
    if path.suffix.lower() != ".safetensors":
        return {key: tuple(t.shape) for key, t in iter_tensors([path])}
    with _open_safetensors(path) as f:
        return {strip_key_prefixes(k): tuple(f.get_slice(k).get_shape()) for k in f.keys()}


def check_weight_files(files: Iterable[Path]) -> None:
    """Fail fast, before any model is built, on a weight file that cannot be read whole: a
    .safetensors header that does not parse or promises more bytes than the file holds, a
    .pth/.pt/.bin zip archive that is cut short. Reads headers only."""
    import zipfile

    for file in files:
        file = Path(file)
        if not file.is_file():
            raise CheckpointError(f"weight file {str(file)!r} not found")
        if file.suffix == ".safetensors":
            with _open_safetensors(file):  # the header parses
                pass
            size = file.stat().st_size
            with open(file, "rb") as raw:
                n = int.from_bytes(raw.read(8), "little")
                meta = json.loads(raw.read(n))
            end = max((v["data_offsets"][1] for k, v in meta.items() if k != "__metadata__"), default=0)
            if 8 + n + end > size:
                raise CheckpointError(
                    f"{str(file)!r} is truncated: its header describes {8 + n + end} bytes, the file has {size}; "
                    "download or copy it again"
                )
        elif file.suffix in _TORCH_SUFFIXES:
            with open(file, "rb") as raw:
                magic = raw.read(4)
            if magic[:2] == b"PK" and not zipfile.is_zipfile(file):
                raise CheckpointError(
                    f"{str(file)!r} is truncated or damaged (an incomplete zip archive, as torch.save writes); "
                    "download or copy it again"
                )


def iter_tensors(files: Iterable[Path], *, prefer: str = "ema") -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (key, tensor) from checkpoint files, one tensor at a time where the format allows.

    Safetensors are read lazily tensor by tensor; torch files are memory-mapped and loaded
    with ``weights_only=True`` (never arbitrary pickles). `prefer` picks the EMA or the raw
    weights of a training checkpoint that holds both.
    """
    import torch

    for file in files:
        file = Path(file)
        if file.suffix == ".safetensors":
            with _open_safetensors(file) as f:
                for key in f.keys():
                    yield strip_key_prefixes(key), f.get_tensor(key)
        elif file.suffix in _TORCH_SUFFIXES:
            for key, value in _unwrap(_torch_load_weights(file), prefer).items():
                if isinstance(value, torch.Tensor):
                    yield strip_key_prefixes(key), value
        else:
            raise CheckpointError(
                f"unsupported checkpoint file {str(file)!r}: use .safetensors, .pth, .pt or .bin"
            )


def _torch_load_weights(file: Path):
    """torch.load with weights_only=True (memory-mapped when the file format allows)."""
    import zipfile

    import torch

    try:
        return torch.load(file, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(file))
    except Exception as err:
        with open(file, "rb") as raw:
            zipped = raw.read(2) == b"PK"
        if zipfile.is_zipfile(file) or not zipped:
            raise CheckpointError(
                f"{str(file)!r} is not a plain tensor checkpoint ({type(err).__name__}); only weights "
                "are loaded (torch.load weights_only=True). Convert it to .safetensors."
            ) from err
        raise CheckpointError(
            f"{str(file)!r} is truncated or damaged (an incomplete zip archive); download or copy it again"
        ) from err


def read_state_dict(source: str | os.PathLike, *, prefer: str = "ema", **resolve_kw) -> dict[str, torch.Tensor]:
    """Read a whole state dict from any supported source into CPU memory."""
    resolved = resolve_checkpoint(source, **resolve_kw)
    return dict(iter_tensors(resolved.weight_files, prefer=prefer))


# --------------------------------------------------------------------------------------------
# Loading into a model
# --------------------------------------------------------------------------------------------


@contextmanager
def meta_device():
    """Build a model without weights: as ``with torch.device("meta")``, plus shape-only
    arithmetic on the new tensors.

    Constructors compute on their fresh tensors (``torch.randn(6, C) / C**0.5``, a frequency
    table ``1 / theta ** (arange / dim)``, an ``init.normal_``). On the meta device torch runs
    that arithmetic through its Python reference kernels, whose first use imports torch's
    compiler stack (torch._dynamo, sympy): about a second, more than the built-in model's whole
    load. Here those few operations (see `_shape_only_mode`) give an empty meta tensor of the result's
    shape and dtype instead, and in-place random fills leave the tensor as it is. The values
    never mattered: a model built so gets every tensor from a checkpoint (`load_tensors_into`,
    which fails on any tensor left on meta).
    """
    import torch

    with torch.device("meta"), _shape_only_mode()():
        yield


def _broadcast(shapes) -> tuple[int, ...]:
    """The broadcast of plain shapes (`torch.broadcast_shapes` imports sympy)."""
    n = max(len(s) for s in shapes)
    out = []
    for dims in zip(*[(1,) * (n - len(s)) + tuple(s) for s in shapes]):
        sizes = {d for d in dims if d != 1}
        if len(sizes) > 1:
            raise RuntimeError(f"shapes {[tuple(s) for s in shapes]} do not broadcast")
        out.append(sizes.pop() if sizes else 1)
    return tuple(out)


def _shape_only_mode():
    import torch
    from torch.overrides import TorchFunctionMode

    T = torch.Tensor
    binary = {torch.add, torch.sub, torch.mul, torch.div, torch.true_divide, torch.pow,
              T.add, T.sub, T.mul, T.div, T.true_divide, T.pow,
              T.__add__, T.__radd__, T.__sub__, T.__rsub__, T.__mul__, T.__rmul__,
              T.__truediv__, T.__rtruediv__, T.__pow__, T.__rpow__}  # fmt: skip
    true_division = {torch.div, torch.true_divide, T.div, T.true_divide, T.__truediv__, T.__rtruediv__}
    in_place = {T.add_, T.sub_, T.mul_, T.div_, T.pow_, T.__iadd__, T.__isub__, T.__imul__, T.__itruediv__,
                T.normal_, T.uniform_, T.exponential_, T.random_, T.log_normal_, T.cauchy_, T.geometric_}  # fmt: skip
    random = {torch.randn, torch.rand}
    handled = binary | in_place | random | {torch.arange}

    def is_meta(x):
        return isinstance(x, torch.Tensor) and x.is_meta

    class ShapeOnly(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            if func not in handled and getattr(func, "__module__", None) != "torch.nn.init":
                return func(*args, **kwargs)  # everything else as under torch.device("meta")
            tensors = [a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)]
            all_meta = bool(tensors) and all(t.is_meta for t in tensors)
            if func in random and kwargs.get("device") in (None, "meta") and "out" not in kwargs:
                return torch.empty(*args, dtype=kwargs.get("dtype"), device="meta",
                                   requires_grad=kwargs.get("requires_grad", False))
            if func is torch.arange and kwargs.get("device") is None and "out" not in kwargs:
                return func(*args, **{**kwargs, "device": "cpu"}).to("meta")  # small; exact on the CPU
            if func in in_place or getattr(func, "__module__", None) == "torch.nn.init":
                target = args[0] if args else kwargs.get("tensor")
                if all_meta and is_meta(target):
                    return target  # an init or in-place fill of a meta tensor: nothing to compute
            if func in binary and all_meta and len(args) == 2 and "out" not in kwargs and not kwargs.get("rounding_mode"):
                dtype = torch.result_type(args[0], args[1])
                if func in true_division and not (dtype.is_floating_point or dtype.is_complex):
                    dtype = torch.get_default_dtype()
                return torch.empty(_broadcast([t.shape for t in tensors]), dtype=dtype, device="meta")
            return func(*args, **kwargs)

    return ShapeOnly


@dataclass
class LoadReport:
    """What did not fit when a state dict met a model."""

    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    mismatched: list[tuple[str, tuple, tuple]] = field(default_factory=list)  # key, ckpt, model

    @property
    def ok(self) -> bool:
        return not (self.missing or self.unexpected or self.mismatched)

    def __str__(self) -> str:
        if self.ok:
            return "all keys matched"

        def block(title, items, limit=12):
            shown = "\n".join(f"    {i}" for i in items[:limit])
            more = f"\n    ... and {len(items) - limit} more" if len(items) > limit else ""
            return f"  {title} ({len(items)}):\n{shown}{more}"

        parts = []
        if self.missing:
            parts.append(block("missing from the checkpoint", self.missing))
        if self.unexpected:
            parts.append(block("unexpected in the checkpoint", self.unexpected))
        if self.mismatched:
            rows = [f"{k}: checkpoint {list(a)} vs model {list(b)}" for k, a, b in self.mismatched]
            parts.append(block("shape mismatch", rows))
        return "\n".join(parts)


def load_tensors_into(
    model: nn.Module,
    tensors: Iterable[tuple[str, torch.Tensor]],
    *,
    strict: bool = True,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
    rename=None,
    keep_float32: Iterable[str] = (),
) -> LoadReport:
    """Load (key, tensor) pairs into `model`, which may live on the meta device.

    Each tensor is cast to `dtype` (floating tensors only; names in `keep_float32` stay fp32)
    and moved to `device` as it arrives, then assigned in place of the model's tensor, so peak
    memory is the model in its target dtype plus one checkpoint tensor. `rename(key)` maps a
    checkpoint key to a model key, or to None to drop it. With `strict`, any missing,
    unexpected or mismatched key raises `CheckpointError` with the full report and the model
    is left untouched.
    """
    import torch

    expected = {k: v for k, v in model.state_dict(keep_vars=True).items()}
    keep_float32 = set(keep_float32)
    report, ready = LoadReport(), {}
    for key, tensor in tensors:
        if rename is not None:
            key = rename(key)
            if key is None:
                continue
        if key not in expected:
            report.unexpected.append(key)
            continue
        target = expected[key]
        if tuple(tensor.shape) != tuple(target.shape):
            report.mismatched.append((key, tuple(tensor.shape), tuple(target.shape)))
            continue
        if tensor.is_floating_point():
            want = torch.float32 if key in keep_float32 else (dtype or target.dtype)
        else:
            want = target.dtype
        ready[key] = tensor.to(device=device or _device_of(target), dtype=want)
    report.missing = [k for k in expected if k not in ready and k not in {m[0] for m in report.mismatched}]
    if strict and not report.ok:
        raise CheckpointError(f"checkpoint does not fit {type(model).__name__}:\n{report}")
    model.load_state_dict(ready, strict=False, assign=True)
    leftover = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if leftover:
        raise CheckpointError(
            f"{len(leftover)} tensors of {type(model).__name__} were not in the checkpoint and the "
            f"model was built without weights (first: {leftover[:5]}); load with strict=True "
            "from a complete checkpoint, or build the model with initialised weights first"
        )
    return report


def _device_of(t: torch.Tensor) -> torch.device:
    import torch

    return torch.device("cpu") if t.is_meta else t.device


def fsync_dir(folder: str | os.PathLike) -> None:
    """Make the renames in `folder` durable (POSIX; Windows cannot open a folder, so a no-op there)."""
    if os.name == "nt":
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_file_atomic(path: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """Write `path` so that it is never half-written: `write(tmp)` fills a temporary file in the
    same folder, which is fsynced, renamed over `path` (`os.replace`) and the folder fsynced.
    If `write` or the rename fails, the temporary file is removed and `path` keeps its old content."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        fd = os.open(tmp, os.O_RDWR)  # writable: Windows' fsync needs it
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    fsync_dir(path.parent)
    return path


def save_safetensors_atomic(tensors: dict[str, torch.Tensor], path: str | os.PathLike, metadata=None) -> None:
    """Write a .safetensors file through `write_file_atomic` (never half-written)."""
    from safetensors.torch import save_file

    cpu = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    write_file_atomic(path, lambda tmp: save_file(cpu, str(tmp), metadata=metadata))


def write_text_atomic(text: str, path: str | os.PathLike) -> None:
    """Write UTF-8 text through `write_file_atomic` (never half-written)."""
    write_file_atomic(path, lambda tmp: tmp.write_bytes(text.encode("utf-8")))


def write_json_atomic(data, path: str | os.PathLike) -> None:
    """Write `data` as indented JSON through `write_file_atomic` (never half-written)."""
    write_text_atomic(json.dumps(data, indent=2) + "\n", path)


def append_line(line: str, path: str | os.PathLike) -> None:
    """Append one line to a log (JSONL, CSV) in a single write, then fsync.

    Logs grow by appending, so they are not renamed into place: a crash can at worst cut the
    last line, never touch the lines before it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = (line if line.endswith("\n") else line + "\n").encode("utf-8")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | getattr(os, "O_BINARY", 0), 0o666)
    try:
        while data:
            data = data[os.write(fd, data) :]
        os.fsync(fd)
    finally:
        os.close(fd)
