"""`EmbeddingCache`: per-prompt T5 outputs kept in memory (an LRU) and optionally in a folder
of .safetensors files, so a prompt seen before skips T5 (see `T5TextEncoder`'s `cache`).

`opensora generate` keeps such a folder by default (`default_cache_folder()`): a prompt it has
encoded before, with the same T5 files, dtype and device type, skips T5, which is then never
loaded (a deferred encoder, `T5TextEncoder.from_pretrained(lazy=True)`). The folder is bounded
(`max_bytes`, oldest use first out).
"""

from __future__ import annotations

import os
import warnings
from collections import OrderedDict
from pathlib import Path

import torch

from opensora_sdk.loading import save_safetensors_atomic


class EmbeddingCache:
    """Per-prompt T5 outputs, keyed by (processed text, encoder identity, dtype, max length,
    device type; see `T5TextEncoder.cache_key`).

    An in-memory LRU of `max_items` rows (each row is L x C values: 4.9 MB for T5-XXL at 300
    tokens in float32; `max_items=0` keeps nothing in memory) and, when `folder` is given, one
    ``<key>.safetensors`` file per prompt there, written atomically, so a later run reuses it.
    The folder holds at most `max_bytes` (default 1 GiB, about 200 T5-XXL prompts in float32):
    after a write the files used longest ago go first (a hit marks its file as used).
    Rows are kept on the CPU. `hits` and `misses` count lookups.
    """

    def __init__(self, max_items: int = 64, folder: str | os.PathLike | None = None, max_bytes: int = 1 << 30):
        if isinstance(max_items, bool) or not isinstance(max_items, int) or max_items < 0:
            raise ValueError(f"max_items={max_items!r} is not allowed: expected an integer >= 0")
        if isinstance(max_bytes, bool) or not isinstance(max_bytes, int) or max_bytes < 0:
            raise ValueError(f"max_bytes={max_bytes!r} is not allowed: expected an integer >= 0")
        self.max_items = max_items
        self.folder = Path(folder).expanduser() if folder is not None else None
        self.max_bytes = max_bytes
        self._warned = False
        self._rows: OrderedDict[str, tuple[torch.Tensor, torch.Tensor]] = OrderedDict()
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._rows)

    def _file(self, key: str) -> Path:
        return self.folder / f"{key}.safetensors"

    def get(self, key: str) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(y_row [L,C], mask_row [L]) on the CPU, or None."""
        row = self._rows.get(key)
        if row is not None:
            self._rows.move_to_end(key)
        elif self.folder is not None and self._file(key).is_file():
            row = self._read(key)
            if row is not None:
                self._remember(key, row)
                _touch(self._file(key))
        if row is None:
            self.misses += 1
        else:
            self.hits += 1
        return row

    def put(self, key: str, y_row: torch.Tensor, mask_row: torch.Tensor, metadata: dict | None = None) -> None:
        row = (y_row.detach().to("cpu", copy=True), mask_row.detach().to("cpu", copy=True))
        self._remember(key, row)
        if self.folder is not None:
            meta = {k: str(v) for k, v in (metadata or {}).items()}
            try:
                save_safetensors_atomic({"y": row[0], "mask": row[1]}, self._file(key), metadata=meta)
                self.trim()
            except OSError as err:  # the embedding is still returned: only the reuse is lost
                if not self._warned:
                    warnings.warn(f"text cache {str(self.folder)!r}: cannot store embeddings there "
                                  f"({err.strerror or err}); prompts will be encoded again next time", stacklevel=2)
                    self._warned = True

    def trim(self) -> None:
        """Delete the folder's files used longest ago until it holds at most `max_bytes`."""
        files = []
        for path in self.folder.glob("*.safetensors"):
            try:
                st = path.stat()
            except OSError:  # removed meanwhile (another process trimming)
                continue
            files.append((st.st_mtime_ns, st.st_size, path))
        total = sum(size for _, size, _ in files)
        for _, size, path in sorted(files):
            if total <= self.max_bytes:
                break
            path.unlink(missing_ok=True)
            total -= size

    def clear(self) -> None:
        """Forget the in-memory rows (files in `folder` stay)."""
        self._rows.clear()

    def _remember(self, key, row) -> None:
        if self.max_items == 0:
            return
        self._rows[key] = row
        self._rows.move_to_end(key)
        while len(self._rows) > self.max_items:
            self._rows.popitem(last=False)

    def _read(self, key: str):
        from safetensors.torch import load_file

        try:
            data = load_file(str(self._file(key)))
            return data["y"], data["mask"]
        except Exception:  # unreadable or foreign file: treat as a miss, it is rewritten
            return None


def _touch(path: Path) -> None:
    try:
        os.utime(path)
    except OSError:  # a read-only cache folder still serves hits
        pass


def default_cache_folder() -> Path | None:
    """Where `opensora generate` keeps prompt embeddings: $OPENSORA_TEXT_CACHE ("none" or "off":
    no folder), else $XDG_CACHE_HOME/opensora_sdk/text, else ~/.cache/opensora_sdk/text (None
    when there is no home folder)."""
    value = os.environ.get("OPENSORA_TEXT_CACHE")
    if value is not None:
        return None if value.strip().lower() in ("", "none", "off") else Path(value).expanduser()
    base = os.environ.get("XDG_CACHE_HOME")
    if not base:
        try:
            base = Path.home() / ".cache"
        except RuntimeError:  # no home folder (a bare container): no cache rather than an error
            return None
    return Path(base) / "opensora_sdk" / "text"


def as_cache(cache) -> EmbeddingCache | None:
    if cache is None or cache is False:
        return None
    if cache is True:
        return EmbeddingCache()
    if isinstance(cache, EmbeddingCache):
        return cache
    if isinstance(cache, (str, os.PathLike)):
        return EmbeddingCache(folder=cache)
    raise ValueError(
        f"cache={cache!r} is not allowed: expected None, True (in-memory), a folder path, or an EmbeddingCache"
    )


__all__ = ["EmbeddingCache", "as_cache", "default_cache_folder"]
