"""The video-text training dataset (spec 7.1, 7.2) over the official CSV / parquet files.

Columns: `path` (video, or image read as a one-frame video), `text` (the caption), and the
source clip's `num_frames`, `height`, `width`, used only to pick its bucket. An optional
`frame_mask` column names the frame-mask type a row is trained with (`training.masks`; empty:
drawn by the configured ratios). Other columns are kept; `aes`, `flow` and a camera-motion column can be turned into the caption suffixes of spec
6.4 (`score_columns`). A file missing a required column is an error when the dataset is built.
Relative paths are resolved against the folder of the CSV (absolute ones are used as given).

`dataset["idx-T-H-W"]` (keys from `BucketBatchSampler`) returns one sample in that shape:

    video [3, T, H, W] float32 in [-1, 1], text, num_frames T, height H, width W, ar H/W, fps

Videos are decoded with PyAV, cropped in time with the official random crop (window
T * frame_interval, `temporal_crop_indices`) and resized-to-cover + centre-cropped with the
official bilinear transform; fps = floor(video fps / frame_interval) (v1.2), or the video's own
fps with `native_fps=True` (the v1.1 dataset, spec 9.1). Images use the official bicubic
transform and fps 120. Randomness (crop start, score drops) comes from
`numpy.random.default_rng([seed, epoch, idx])`, so a sample is the same in every run and
worker: call `set_epoch` before each epoch, like the sampler.

A missing or undecodable file is logged once, counted (`skipped`, and each sample's
`skipped` list, which `collate_samples` gathers so workers' counts reach the trainer) and
replaced by the next readable row (in CSV order) that can fill the same shape, so batches
keep their size and data-parallel ranks stay in step. Too many unreadable rows in a row
raise an error (the data path is probably wrong).
"""

from __future__ import annotations

import csv
import logging
import math
import os
from collections import Counter
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import torch

from opensora_sdk.text import append_score_suffixes, check_camera_motion
from opensora_sdk.training.buckets import parse_bucket_key
from opensora_sdk.training.masks import check_mask_type
from opensora_sdk.video_io import IMAGE_SUFFIXES, IMG_FPS, VideoReadError, read_image, read_video, resize_crop, temporal_crop_indices

logger = logging.getLogger(__name__)

REQUIRED_COLUMNS = ("path", "text", "num_frames", "height", "width")
SCORE_KINDS = ("aes", "flow", "camera_motion")
SCORE_FORMATS = ("inference", "datautil")
READ_ERRORS = (FileNotFoundError, IsADirectoryError, PermissionError, VideoReadError, OSError)


def read_table(path: str | os.PathLike, required: Sequence[str] = REQUIRED_COLUMNS) -> list[dict]:
    """Rows of a .csv (csv module) or .parquet (pandas + pyarrow, optional) as dicts.

    Raises ValueError naming the missing columns and the columns found.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"data file {str(path)!r} does not exist")
    if path.suffix.lower() == ".parquet":
        try:
            import pandas as pd
            import pyarrow  # noqa: F401  (pandas reads parquet through it)
        except ImportError:
            raise ImportError(f"reading {str(path)!r} needs pandas and pyarrow (pip install pandas pyarrow); or convert it to CSV") from None
        frame = pd.read_parquet(path)
        columns, rows = list(frame.columns), frame.to_dict("records")
    elif path.suffix.lower() == ".csv":
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            columns, rows = list(reader.fieldnames or []), list(reader)
    else:
        raise ValueError(f"data file {str(path)!r}: extension {path.suffix!r} is not allowed; use .csv or .parquet")
    missing = [c for c in required if c not in columns]
    if missing:
        raise ValueError(f"data file {str(path)!r} lacks the required column(s) {missing}; it has {columns}; required: {list(required)}")
    return rows


def _positive_int(row: Mapping, column: str, line: int, path) -> int:
    value = row[column]
    try:
        number = float(value)
        if number != int(number) or number < 1:
            raise ValueError
    except (TypeError, ValueError):
        raise ValueError(f"data file {str(path)!r}, row {line}: {column}={value!r} is not allowed: expected a positive integer") from None
    return int(number)


def _optional_float(value, column: str, line: int, path) -> float | None:
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = math.nan
    if not math.isfinite(number):
        if isinstance(value, float) and math.isnan(value):  # an empty parquet cell
            return None
        raise ValueError(f"data file {str(path)!r}, row {line}: {column}={value!r} is not allowed: expected a number or an empty cell")
    return number


class VideoTextDataset(torch.utils.data.Dataset):
    """See the module docstring.

    Args:
        data_path: the .csv or .parquet file.
        frame_interval: take every n-th frame (official default 1).
        seed: base of the per-sample RNG.
        score_columns: {kind: column} with kind in ("aes", "flow", "camera_motion"), e.g.
            {"aes": "aes", "flow": "flow", "camera_motion": "camera"}; None: text verbatim.
        score_format: "inference" appends " aesthetic score: 6.5. motion score: 4.0. camera
            motion: pan left." (`append_score_suffixes`, what the pipeline adds at inference);
            "datautil" writes the official data tool's "{text} [aesthetic score: 6.5, motion
            score: 4.0]" plus " Camera motion: pan left.".
        score_drop_prob: each suffix is left out with this probability (datautil used 0.2).
        native_fps: fps = the video's fps (v1.1) instead of floor(fps / frame_interval) (v1.2).
        max_substitutes: unreadable rows tolerated in a row before raising.
    """

    def __init__(
        self,
        data_path: str | os.PathLike,
        *,
        frame_interval: int = 1,
        seed: int = 0,
        score_columns: Mapping[str, str] | None = None,
        score_format: str = "inference",
        score_drop_prob: float = 0.0,
        native_fps: bool = False,
        max_substitutes: int = 16,
    ):
        self.data_path = Path(data_path)
        self.root = self.data_path.parent
        self.rows = read_table(self.data_path)
        if isinstance(frame_interval, bool) or not isinstance(frame_interval, int) or frame_interval < 1:
            raise ValueError(f"frame_interval={frame_interval!r} is not allowed: expected an integer >= 1")
        if score_format not in SCORE_FORMATS:
            raise ValueError(f"score_format={score_format!r} is not allowed: choose one of {SCORE_FORMATS}")
        if not 0.0 <= float(score_drop_prob) <= 1.0:
            raise ValueError(f"score_drop_prob={score_drop_prob!r} is not allowed: expected a number in [0, 1]")
        self.frame_interval, self.seed = frame_interval, int(seed)
        self.score_format, self.score_drop_prob = score_format, float(score_drop_prob)
        self.max_substitutes = max_substitutes
        self.native_fps = bool(native_fps)
        self.score_columns = dict(score_columns or {})
        for kind, column in self.score_columns.items():
            if kind not in SCORE_KINDS:
                raise ValueError(f"score_columns: kind {kind!r} is not allowed; choose from {SCORE_KINDS}")
            if self.rows and column not in self.rows[0]:
                raise ValueError(f"score_columns[{kind!r}]={column!r}: no such column in {str(self.data_path)!r}; it has {list(self.rows[0])}")
        self.sizes = []  # (num_frames, height, width) of each source clip
        self.scores = []  # {kind: value or None}
        self.frame_masks = []  # the row's own frame-mask type, or "" (drawn by the ratios)
        for line, row in enumerate(self.rows, start=2):  # line 1 is the header
            self.sizes.append(tuple(_positive_int(row, c, line, self.data_path) for c in ("num_frames", "height", "width")))
            self.scores.append(self._row_scores(row, line))
            self.frame_masks.append(self._row_frame_mask(row, line))
        self.epoch = 0
        self.skipped: Counter = Counter()  # path -> times skipped, in this process

    def _row_scores(self, row, line) -> dict:
        scores = {}
        for kind, column in self.score_columns.items():
            value = row[column]
            if kind == "camera_motion":
                text = "" if value is None or (isinstance(value, float) and math.isnan(value)) else str(value).strip()
                if text:
                    try:
                        text = check_camera_motion(text)
                    except ValueError as err:
                        raise ValueError(f"data file {str(self.data_path)!r}, row {line}, column {column!r}: {err}") from None
                scores[kind] = text or None
            else:
                scores[kind] = _optional_float(value, column, line, self.data_path)
        return scores

    def _row_frame_mask(self, row, line) -> str:
        value = row.get("frame_mask")
        text = "" if value is None or (isinstance(value, float) and math.isnan(value)) else str(value).strip()
        if not text:
            return ""
        try:
            return check_mask_type(text)
        except ValueError as err:
            raise ValueError(f"data file {str(self.data_path)!r}, row {line}, column 'frame_mask': {err}") from None

    def __len__(self) -> int:
        return len(self.rows)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def path(self, idx: int) -> Path:
        p = Path(str(self.rows[idx]["path"]))
        return p if p.is_absolute() else self.root / p

    def is_image(self, idx: int) -> bool:
        return self.path(idx).suffix.lower() in IMAGE_SUFFIXES

    # ---- captions ----------------------------------------------------------------------------

    def caption(self, idx: int, rng: np.random.Generator | None = None) -> str:
        """The row's text with its configured score suffixes (spec 6.4)."""
        text = str(self.rows[idx]["text"])
        if not self.score_columns:
            return text
        scores = dict(self.scores[idx])
        if self.score_drop_prob > 0:
            rng = rng or np.random.default_rng([self.seed, self.epoch, idx, 1])
            scores = {k: (None if rng.random() < self.score_drop_prob else v) for k, v in scores.items()}
        aes, flow, camera = scores.get("aes"), scores.get("flow"), scores.get("camera_motion")
        if self.score_format == "inference":
            return append_score_suffixes(text, aes=aes, flow=flow, camera_motion=camera)
        parts = [f"aesthetic score: {aes:.1f}" if aes is not None else None, f"motion score: {flow:.1f}" if flow is not None else None]
        parts = [p for p in parts if p]
        if parts:
            text = f"{text} [{', '.join(parts)}]"
        if camera is not None:
            text = f"{text} Camera motion: {camera}."
        return text

    # ---- samples ------------------------------------------------------------------------------

    def __getitem__(self, key) -> dict:
        idx, T, H, W = parse_bucket_key(key) if isinstance(key, str) else tuple(int(v) for v in key)
        if not 0 <= idx < len(self.rows):
            raise IndexError(f"dataset key {key!r}: row {idx} is out of range (0..{len(self.rows) - 1})")
        skipped = []
        candidate = idx
        for _ in range(self.max_substitutes + 1):
            if T > 1 and self.is_image(candidate):  # an image cannot fill a video bucket
                candidate = (candidate + 1) % len(self.rows)
                continue
            try:
                sample = self.load(candidate, T, H, W)
            except READ_ERRORS as err:
                path = str(self.path(candidate))
                if path not in self.skipped:
                    logger.warning("skipping unreadable row %d (%s): %s", candidate, path, err)
                self.skipped[path] += 1
                skipped.append(path)
                candidate = (candidate + 1) % len(self.rows)
                continue
            sample["skipped"] = skipped
            return sample
        raise RuntimeError(
            f"{self.max_substitutes + 1} consecutive rows from row {idx} of {str(self.data_path)!r} could not be read "
            f"(last: {skipped[-1] if skipped else 'none'}); check the paths (relative ones are resolved against {str(self.root)!r})"
        )

    def load(self, idx: int, T: int, H: int, W: int) -> dict:
        """Row `idx` as a [3, T, H, W] sample (raises the reader's error for a bad file)."""
        rng = np.random.default_rng([self.seed, self.epoch, idx])
        path = self.path(idx)
        if self.is_image(idx):
            video = resize_crop(read_image(path), H, W, mode="bicubic")  # [3, 1, H, W]
            fps = IMG_FPS
        else:
            frames, video_fps = self._read_clip(path, idx, T, rng)
            video = resize_crop(frames, H, W, mode="bilinear")  # [3, T, H, W]
            fps = float(video_fps if self.native_fps else video_fps // self.frame_interval)
        return {
            "video": video,
            "text": self.caption(idx),
            "num_frames": T,
            "height": H,
            "width": W,
            "ar": H / W,
            "fps": float(fps),
            "index": idx,
            "frame_mask": self.frame_masks[idx],
        }

    def _read_clip(self, path: Path, idx: int, T: int, rng) -> tuple[np.ndarray, float]:
        """Decode only up to the crop's last frame when the CSV's num_frames is right."""
        listed = self.sizes[idx][0]
        indices = temporal_crop_indices(listed, T, self.frame_interval, rng=rng)
        try:
            return read_video(path, frame_indices=indices)
        except VideoReadError:
            raise
        except ValueError:  # the file is shorter than its num_frames: crop on the real length
            frames, fps = read_video(path)
            rng = np.random.default_rng([self.seed, self.epoch, idx])
            indices = temporal_crop_indices(len(frames), T, self.frame_interval, rng=rng)
            return frames[indices], fps


def collate_samples(samples: list[dict]) -> dict:
    """Stack samples of one bucket: tensors for video and the numbers, lists for text/skipped."""
    first = samples[0]
    batch = {}
    for key in first:
        if key == "skipped":
            batch[key] = [p for s in samples for p in s[key]]
        elif isinstance(first[key], str):  # text, frame_mask
            batch[key] = [s[key] for s in samples]
        elif isinstance(first[key], torch.Tensor):
            batch[key] = torch.stack([s[key] for s in samples])
        else:
            batch[key] = torch.tensor([s[key] for s in samples])
    return batch
