"""Precomputed features: VAE latents and T5 embeddings written once, then trained on.

Training a small model on a CPU (or fine-tuning on a small GPU) spends most of its time in
the frozen VAE and T5. Encoding each sample once removes both from the loop:

    folder/
      shard-r0-00000.safetensors   "{n}.x" latent [C, T', h, w]; "{n}.y" T5 rows [n_tokens, C_text]
      ...                          (only the valid tokens are stored)
      index.json                   {"meta": {...}, "entries": [{shard, key, bucket, fps, ...}]}

The bucket of each sample is fixed at extraction (epoch-0 assignment), so training on features
has one crop and one VAE posterior draw per sample, like the official feature configs.
`FeatureDataset` pads y back to `model_max_length` with its mask, so the model sees exactly
what on-the-fly encoding gives it. Extraction runs sharded over ranks (`extraction_plan`); each
rank writes `index-rank{r}.json`, then the main process merges them (`merge_indices`).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Mapping, Sequence

import torch

from opensora_sdk.dtypes import DTYPES
from opensora_sdk.loading import save_safetensors_atomic, write_json_atomic
from opensora_sdk.training.buckets import BucketId, parse_bucket_key

INDEX = "index.json"


def feature_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise ValueError(f"features dtype {name!r} is not allowed: choose one of {sorted(DTYPES)}")
    return DTYPES[name]


def extraction_plan(
    assignments: Sequence[BucketId | None], batch_size: int, rank: int = 0, world_size: int = 1
) -> list[tuple[BucketId, list[int]]]:
    """This rank's share of [(bucket, sample ids)] batches covering every assigned sample once."""
    groups: dict[BucketId, list[int]] = {}
    for idx, bucket in enumerate(assignments):
        if bucket is not None:
            groups.setdefault(tuple(bucket), []).append(idx)
    batches = [(b, ids[i : i + batch_size]) for b in sorted(groups) for ids in [groups[b]] for i in range(0, len(ids), batch_size)]
    return batches[rank::world_size]


def check_existing(folder: str | os.PathLike, meta: Mapping) -> bool:
    """True when `folder` holds features extracted with `meta`; False when there are none.

    Raises ValueError naming the settings that differ (stale features are never mixed in).
    """
    path = Path(folder) / INDEX
    if not path.is_file():
        return False
    stored = json.loads(path.read_text(encoding="utf-8")).get("meta", {})
    meta = json.loads(json.dumps(dict(meta)))  # compare as JSON (tuples -> lists)
    differ = {k: (stored.get(k), meta.get(k)) for k in set(stored) | set(meta) if stored.get(k) != meta.get(k)}
    if differ:
        detail = "; ".join(f"{k}: stored {a!r}, now {b!r}" for k, (a, b) in sorted(differ.items()))
        raise ValueError(f"features in {str(folder)!r} were extracted with other settings ({detail}); remove the folder or set features.dir elsewhere")
    return True


class FeatureWriter:
    """Collects per-sample features of one rank into safetensors shards."""

    def __init__(self, folder: str | os.PathLike, *, rank: int = 0, shard_size: int = 256, dtype: torch.dtype = torch.float32):
        self.folder, self.rank, self.shard_size, self.dtype = Path(folder), rank, shard_size, dtype
        self.folder.mkdir(parents=True, exist_ok=True)
        self.entries: list[dict] = []
        self._tensors: dict[str, torch.Tensor] = {}
        self._pending: list[dict] = []
        self._shard = 0

    def add(self, *, index: int, bucket: BucketId, x: torch.Tensor, y: torch.Tensor, mask: torch.Tensor,
            text: str, fps: float, num_frames: int, height: int, width: int, frame_mask: str = "") -> None:  # fmt: skip
        """x [C, T', h, w] latent; y [L, C_text] T5 output with mask [L] (only valid rows are kept);
        frame_mask: the row's own frame-mask type ("" = drawn at training time)."""
        n = len(self._pending)
        valid = mask.bool().cpu()
        self._tensors[f"{n}.x"] = x.detach().to("cpu", self.dtype).contiguous()
        self._tensors[f"{n}.y"] = y.detach().cpu()[valid].to(self.dtype).contiguous()
        self._pending.append({
            "index": int(index), "key": str(n), "bucket": list(bucket), "text": text, "fps": float(fps),
            "num_frames": int(num_frames), "height": int(height), "width": int(width),
            **({"frame_mask": frame_mask} if frame_mask else {}),
        })  # fmt: skip
        if len(self._pending) >= self.shard_size:
            self._flush()

    def _flush(self) -> None:
        if not self._pending:
            return
        name = f"shard-r{self.rank}-{self._shard:05d}.safetensors"
        save_safetensors_atomic(self._tensors, self.folder / name)
        self.entries += [{**e, "shard": name} for e in self._pending]
        self._tensors, self._pending, self._shard = {}, [], self._shard + 1

    def close(self) -> list[dict]:
        """Write the last shard and this rank's partial index; returns its entries."""
        self._flush()
        write_json_atomic(self.entries, self.folder / f"index-rank{self.rank}.json")
        return self.entries


def merge_indices(folder: str | os.PathLike, world_size: int, meta: Mapping) -> Path:
    """Merge the ranks' partial indices into index.json (entries ordered by sample index)."""
    folder = Path(folder)
    entries = []
    for rank in range(world_size):
        part = folder / f"index-rank{rank}.json"
        entries += json.loads(part.read_text(encoding="utf-8"))
    entries.sort(key=lambda e: (e["index"], e["shard"], int(e["key"])))
    write_json_atomic({"meta": dict(meta), "entries": entries}, folder / INDEX)
    for rank in range(world_size):
        (folder / f"index-rank{rank}.json").unlink(missing_ok=True)
    return folder / INDEX


class FeatureDataset(torch.utils.data.Dataset):
    """Samples from an extracted feature folder: x, y [1, L, C], mask [L] and the size numbers.

    `model_max_length` is the text length the model expects (y is zero-padded to it; the mask
    marks the real tokens). Keys may be ints or "idx-T-H-W" strings from `BucketBatchSampler`
    built with `assignments=dataset.assignments`.
    """

    def __init__(self, folder: str | os.PathLike, model_max_length: int):
        self.folder = Path(folder)
        path = self.folder / INDEX
        if not path.is_file():
            raise FileNotFoundError(f"no {INDEX} in {str(self.folder)!r}: extract features first (train.py does it when features.dir is set)")
        data = json.loads(path.read_text(encoding="utf-8"))
        self.meta, self.entries = data["meta"], data["entries"]
        self.model_max_length = int(model_max_length)
        self.assignments: list[BucketId] = [tuple(e["bucket"]) for e in self.entries]
        self._handles: dict[str, object] = {}

    def __len__(self) -> int:
        return len(self.entries)

    def set_epoch(self, epoch: int) -> None:  # features are fixed; kept for a uniform trainer loop
        pass

    def _tensor(self, shard: str, key: str) -> torch.Tensor:
        from safetensors import safe_open

        if shard not in self._handles:
            self._handles[shard] = safe_open(str(self.folder / shard), framework="pt")
        return self._handles[shard].get_tensor(key)

    def __getstate__(self):  # open handles do not travel to DataLoader workers
        return {**self.__dict__, "_handles": {}}

    def __getitem__(self, key) -> dict:
        idx = parse_bucket_key(key)[0] if isinstance(key, str) else int(key)
        e = self.entries[idx]
        x = self._tensor(e["shard"], f"{e['key']}.x").float()  # [C, T', h, w]
        rows = self._tensor(e["shard"], f"{e['key']}.y").float()  # [n, C_text]
        n, L = rows.shape[0], self.model_max_length
        if n > L:
            raise ValueError(
                f"feature {idx} has {n} text tokens but model_max_length is {L}: the features were extracted with a longer text encoder length"
            )
        y = torch.zeros(L, rows.shape[1])
        y[:n] = rows
        mask = torch.zeros(L, dtype=torch.int64)
        mask[:n] = 1
        return {
            "x": x,
            "y": y[None],  # [1, L, C_text]
            "mask": mask,
            "text": e["text"],
            "num_frames": e["num_frames"],
            "height": e["height"],
            "width": e["width"],
            "ar": e["height"] / e["width"],
            "fps": e["fps"],
            "index": e["index"],
            "frame_mask": e.get("frame_mask", ""),
            "skipped": [],
        }
