"""Buckets (spec 7.3): the official bucket config, the deterministic assignment, the batch sampler.

A bucket config maps a resolution name to frame counts, each with (keep_prob, batch_size):

    {"144p": {1: (1.0, 475), 51: (1.0, 51), 102: ((1.0, 0.33), 27)}, "240p": {...}}

`keep_prob` is a float p or a pair (p_res, p_len). Each sample goes to at most one bucket
(resolution, frame count, aspect-ratio key) per epoch, by the official rules (see
`BucketConfig.get_bucket_id`); every micro-batch holds samples of one bucket, so one shape.

`BucketBatchSampler` turns the assignment into micro-batches of keys "idx-T-H-W" (what
`VideoTextDataset.__getitem__` takes), shuffles them with a `torch.Generator(seed + epoch)`,
and deals them to data-parallel ranks: slot i of the shuffled list gives rank r the micro-batch
i * num_replicas + r, so ranks train on different shapes in the same step, as officially.
Its state is {seed, epoch, position}: position counts micro-batches consumed over all ranks.

Extension: resolution names are those of `opensora_sdk.sizes.ASPECT_RATIOS`, plus any
`extra_resolutions` {name: pixel_count} whose tables are built by `get_aspect_ratios_dict`
(e.g. {"32px": 1024} for 32x32 clips of the tiny recipe).
"""

from __future__ import annotations

import math
from collections import defaultdict
from typing import Iterator, Mapping, Sequence

import numpy as np
import torch

from opensora_sdk.sizes import ASPECT_RATIOS, get_aspect_ratios_dict, get_closest_ratio, parse_num_frames

# "official": a T-frame bucket takes clips of more than T * frame_interval frames (the official
# rule); "window": also clips of exactly T * frame_interval frames (they fill the crop window)
LENGTH_RULES = ("official", "window")
BucketId = tuple  # (resolution name, num_frames, aspect-ratio key), e.g. ("144p", 51, "0.56")
APPROX = 0.8  # a sample qualifies for a resolution when H*W >= APPROX * pixels(resolution)


def _row(*cells):
    """One table row: cells for 1, 51, 102, 204, 408 frames (None = absent)."""
    return {t: cell for t, cell in zip((1, 51, 102, 204, 408), cells) if cell is not None}


# The official v1.2 stage tables (spec 7.3): {res: {frames: (keep_prob, batch_size)}}; batch
# sizes are per GPU for H100-80GB with ZeRO-2 (sharded optimizer states).
BUCKET_PRESETS: dict[str, dict] = {
    "stage1": {
        "144p": _row((1.0, 475), (1.0, 51), ((1.0, 0.33), 27), ((1.0, 0.1), 13), ((1.0, 0.1), 6)),
        "256": _row((0.4, 297), (0.5, 20), ((0.5, 0.33), 10), ((0.5, 0.1), 5), ((0.5, 0.1), 2)),
        "240p": _row((0.3, 297), (0.4, 20), ((0.4, 0.33), 10), ((0.4, 0.1), 5), ((0.4, 0.1), 2)),
        "360p": _row((0.2, 141), (0.15, 8), ((0.15, 0.33), 4), ((0.15, 0.1), 2), ((0.15, 0.1), 1)),
        "512": _row((0.1, 141)),
        "480p": _row((0.1, 89)),
        "720p": _row((0.05, 36)),
        "1024": _row((0.05, 36)),
        "1080p": _row((0.1, 5)),
        "2048": _row((0.1, 5)),
    },
    "stage2": {
        "144p": _row((1.0, 475), (1.0, 51), ((1.0, 0.33), 27), ((1.0, 0.1), 13), ((1.0, 0.1), 6)),
        "256": _row((0.4, 297), (0.5, 20), ((0.5, 0.33), 10), ((0.5, 1.0), 5), ((0.5, 1.0), 2)),
        "240p": _row((0.3, 297), (0.4, 20), ((0.4, 0.33), 10), ((0.4, 1.0), 5), ((0.4, 1.0), 2)),
        "360p": _row((0.5, 141), (0.15, 8), ((0.3, 0.5), 4), ((0.3, 1.0), 2), ((0.5, 0.5), 1)),
        "512": _row((0.4, 141), (0.15, 8), ((0.2, 0.4), 4), ((0.2, 1.0), 2), ((0.4, 0.5), 1)),
        "480p": _row((0.5, 89), (0.2, 5), (0.2, 2), (0.1, 1)),
        "720p": _row((0.1, 36), (0.03, 1)),
        "1024": _row((0.1, 36), (0.02, 1)),
        "1080p": _row((0.01, 5)),
        "2048": _row((0.01, 5)),
    },
    "stage3": {
        "144p": _row((1.0, 475), (1.0, 51), (1.0, 27), (1.0, 13), (1.0, 6)),
        "256": _row((1.0, 297), (0.5, 20), (0.5, 10), (0.5, 5), ((0.5, 0.5), 2)),
        "240p": _row((1.0, 297), (0.5, 20), (0.5, 10), (0.5, 5), ((0.5, 0.4), 2)),
        "360p": _row((1.0, 141), (0.5, 8), (0.5, 4), (0.5, 2), ((0.5, 0.3), 1)),
        "512": _row((1.0, 141), (0.5, 8), (0.5, 4), (0.5, 2), ((0.5, 0.2), 1)),
        "480p": _row((1.0, 89), (0.5, 5), (0.5, 3), ((0.5, 0.5), 1), (0.0, None)),
        "720p": _row((0.3, 36), (0.2, 2), (0.1, 1), (0.0, None)),
        "1024": _row((0.3, 36), (0.1, 2), (0.1, 1), (0.0, None)),
        "1080p": _row((0.1, 5)),
        "2048": _row((0.05, 5)),
    },
}


def _is_prob(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and 0.0 <= value <= 1.0 and not math.isnan(value)


class BucketConfig:
    """A validated bucket config (a mapping, or a `BUCKET_PRESETS` name such as "stage3").

    Resolutions are ordered by descending pixel count and frame counts by descending length;
    `bucket_index(res, t)` is the position of (res, t) in that order (the per-candidate RNG
    seed offset). Errors name the resolution, the frame count, the value and what is allowed.
    """

    def __init__(self, config: Mapping | str, extra_resolutions: Mapping[str, int] | None = None, length_rule: str = "official"):
        if length_rule not in LENGTH_RULES:
            raise ValueError(f"length_rule={length_rule!r} is not allowed: choose one of {LENGTH_RULES}")
        self.length_rule = length_rule
        if isinstance(config, str):
            if config not in BUCKET_PRESETS:
                raise ValueError(f"bucket config {config!r} is not a preset; presets: {sorted(BUCKET_PRESETS)}, or give a mapping")
            config = BUCKET_PRESETS[config]
        if not isinstance(config, Mapping) or not config:
            raise ValueError(f"bucket config must be a non-empty mapping {{resolution: {{num_frames: (keep_prob, batch_size)}}}}, got {config!r}")
        extra = dict(extra_resolutions or {})
        for name, pixels in extra.items():
            if isinstance(pixels, bool) or not isinstance(pixels, int) or pixels < 64:
                raise ValueError(f"extra_resolutions[{name!r}]={pixels!r} is not allowed: expected a pixel count >= 64 (e.g. 1024 for 32x32)")
        self.tables: dict[str, dict[str, tuple[int, int]]] = {}
        self.pixels: dict[str, int] = {}
        parsed = {}
        for res, lengths in config.items():
            if res in extra:
                self.tables[res] = get_aspect_ratios_dict(extra[res])
                self.pixels[res] = extra[res]
            elif res in ASPECT_RATIOS:
                self.tables[res] = dict(ASPECT_RATIOS[res]["table"])
                self.pixels[res] = ASPECT_RATIOS[res]["num_pixels"]
            else:
                raise ValueError(
                    f"bucket config: resolution {res!r} is unknown; allowed: {list(ASPECT_RATIOS)} "
                    f"or a name declared in extra_resolutions ({list(extra)})"
                )
            if not isinstance(lengths, Mapping) or not lengths:
                raise ValueError(f"bucket config[{res!r}] must map num_frames to (keep_prob, batch_size), got {lengths!r}")
            parsed[res] = {}
            for t, entry in lengths.items():
                try:
                    frames = parse_num_frames(t)
                except ValueError as err:
                    raise ValueError(f"bucket config[{res!r}]: frame count {t!r} is not allowed: {err}") from None
                parsed[res][frames] = self._check_entry(res, frames, entry)
        self.resolutions = sorted(parsed, key=lambda r: -self.pixels[r])  # descending pixels, stable
        self.probs: dict[str, dict[int, float | tuple[float, float]]] = {}
        self.batch_sizes: dict[tuple[str, int], int | None] = {}
        self._index: dict[tuple[str, int], int] = {}
        for res in self.resolutions:
            self.probs[res] = {}
            for t in sorted(parsed[res], reverse=True):
                keep, batch = parsed[res][t]
                self.probs[res][t] = keep
                self.batch_sizes[(res, t)] = batch
                self._index[(res, t)] = len(self._index)
        self.num_buckets = len(self._index)

    @staticmethod
    def _check_entry(res, t, entry):
        where = f"bucket config[{res!r}][{t}]"
        if not isinstance(entry, (list, tuple)) or len(entry) != 2:
            raise ValueError(f"{where}={entry!r} is not allowed: expected (keep_prob, batch_size)")
        keep, batch = entry
        if isinstance(keep, (list, tuple)):
            if len(keep) != 2 or not all(_is_prob(p) for p in keep):
                raise ValueError(f"{where}: keep_prob {keep!r} is not allowed: expected p or (p_res, p_len) in [0, 1]")
            keep = (float(keep[0]), float(keep[1]))
        elif _is_prob(keep):
            keep = float(keep)
        else:
            raise ValueError(f"{where}: keep_prob {keep!r} is not allowed: expected p or (p_res, p_len) in [0, 1]")
        p_res = keep[0] if isinstance(keep, tuple) else keep
        if batch is None and p_res == 0.0:
            return keep, None
        if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
            raise ValueError(f"{where}: batch_size {batch!r} is not allowed: expected an integer >= 1 (None only with keep_prob 0)")
        return keep, batch

    def bucket_index(self, res: str, t: int) -> int:
        return self._index[(res, t)]

    def get_bucket_id(self, T: int, H: int, W: int, frame_interval: int = 1, seed: int = 0) -> BucketId | None:
        """The bucket of a source clip with T frames of H x W pixels, or None (dropped).

        Official rules: resolutions in descending pixel count, skipping those with
        H*W < 0.8 * pixels. Images (T == 1) take the `1` entry with probability p. Videos try
        lengths t != 1 in descending order; a tuple entry is considered only if
        rng.random() <= p_len; the first t with T > t * frame_interval wins (`length_rule`
        "window": T >= t * frame_interval, a clip that exactly fills the crop window); the resolution is
        then accepted if p >= 1 or rng.random() < p (the same rng), else the next smaller
        resolution is tried. rng = np.random.default_rng(seed + bucket_index(res, t)).
        """
        for res in self.resolutions:
            if H * W < APPROX * self.pixels[res]:
                continue
            lengths = self.probs[res]
            if T == 1:
                if 1 not in lengths:
                    continue
                keep = lengths[1]
                p = keep[0] if isinstance(keep, tuple) else keep
                rng = np.random.default_rng(seed + self.bucket_index(res, 1))
                if rng.random() < p:
                    return self._finish(res, 1, H, W)
                continue
            chosen = None
            for t, keep in lengths.items():
                if t == 1:
                    continue
                rng = np.random.default_rng(seed + self.bucket_index(res, t))
                if isinstance(keep, tuple) and rng.random() > keep[1]:
                    continue
                if T > t * frame_interval or (self.length_rule == "window" and T == t * frame_interval):
                    chosen = (t, keep, rng)
                    break
            if chosen is None:
                continue
            t, keep, rng = chosen
            p = keep[0] if isinstance(keep, tuple) else keep
            if p >= 1 or rng.random() < p:
                return self._finish(res, t, H, W)
        return None

    def _finish(self, res: str, t: int, H: int, W: int) -> BucketId:
        return (res, t, get_closest_ratio(H, W, self.tables[res]))

    def shape(self, bucket: BucketId) -> tuple[int, int, int]:
        """Target (num_frames, height, width) of a bucket."""
        res, t, ar = bucket
        h, w = self.tables[res][ar]
        return t, h, w

    def batch_size(self, bucket: BucketId) -> int:
        return self.batch_sizes[(bucket[0], bucket[1])]


class FixedSize:
    """One size for every clip (the v1.0 `VideoTextDataset`, spec 9.2): T frames of H x W, every
    clip resized to cover and centre-cropped, `batch_size` per micro-batch. The same interface as
    `BucketConfig` for `BucketBatchSampler`; its one bucket is ("fixed", T, "HxW").

    Every video takes part (a clip shorter than T * frame_interval repeats frames, as the
    official temporal crop does); images take part only when T is 1.
    """

    def __init__(self, num_frames: int, image_size: Sequence[int], batch_size: int):
        H, W = (int(v) for v in image_size)
        self.bucket: BucketId = ("fixed", int(num_frames), f"{H}x{W}")
        self.size = (int(num_frames), H, W)
        self.batch_sizes = {("fixed", int(num_frames)): int(batch_size)}
        self.num_buckets = 1

    def bucket_index(self, res: str, t: int) -> int:
        return 0

    def get_bucket_id(self, T: int, H: int, W: int, frame_interval: int = 1, seed: int = 0) -> BucketId | None:
        """The bucket, or None for an image when T > 1 (no draw: the assignment is fixed)."""
        return self.bucket if self.size[0] == 1 or T > 1 else None

    def shape(self, bucket: BucketId) -> tuple[int, int, int]:
        return self.size

    def batch_size(self, bucket: BucketId) -> int:
        return self.batch_sizes[(bucket[0], bucket[1])]


class BucketBatchSampler:
    """Deterministic, resumable, rank-sharded micro-batches of one bucket each.

    Args:
        sizes: per sample, the source (num_frames, height, width) (CSV columns).
        buckets: the `BucketConfig`.
        seed, frame_interval: as in the official sampler.
        num_replicas, rank: data-parallel world size and this rank.
        drop_last: truncate each bucket to a multiple of its batch size (the official
            training setting) and the micro-batch list to a multiple of num_replicas;
            otherwise pad both by repetition.
        assignments: a fixed bucket per sample (e.g. precomputed features), used for every
            epoch instead of drawing.
    """

    def __init__(
        self,
        sizes: Sequence[tuple[int, int, int]] | None,
        buckets: BucketConfig,
        *,
        seed: int = 0,
        frame_interval: int = 1,
        num_replicas: int = 1,
        rank: int = 0,
        drop_last: bool = True,
        assignments: Sequence[BucketId | None] | None = None,
    ):
        if (sizes is None) == (assignments is None):
            raise ValueError("give exactly one of sizes (source sizes to draw buckets from) and assignments")
        if isinstance(num_replicas, bool) or not isinstance(num_replicas, int) or num_replicas < 1:
            raise ValueError(f"num_replicas={num_replicas!r} is not allowed: expected an integer >= 1")
        if not isinstance(rank, int) or not 0 <= rank < num_replicas:
            raise ValueError(f"rank={rank!r} is not allowed: expected 0..{num_replicas - 1}")
        self.sizes = None if sizes is None else [tuple(int(v) for v in s) for s in sizes]
        self.fixed = None if assignments is None else [None if b is None else tuple(b) for b in assignments]
        self.buckets = buckets
        self.seed, self.frame_interval = int(seed), int(frame_interval)
        self.num_replicas, self.rank, self.drop_last = num_replicas, rank, drop_last
        self.epoch = 0
        self.start_position = 0  # micro-batches (all ranks) to skip at the start of this epoch
        self._cache: tuple[int, list] | None = None
        if self.fixed is not None:
            for i, b in enumerate(self.fixed):
                if b is not None and (b[0], b[1]) not in buckets.batch_sizes:
                    raise ValueError(f"assignments[{i}]={b!r}: bucket ({b[0]!r}, {b[1]}) is not in the bucket config")

    def __len__(self) -> int:
        return max(0, len(self.epoch_batches()) - self.start_position) // self.num_replicas

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self.epoch, self.start_position = int(epoch), 0

    def assign(self, epoch: int | None = None) -> list[BucketId | None]:
        """The bucket of every sample for `epoch` (None = not used this epoch)."""
        if self.fixed is not None:
            return list(self.fixed)
        epoch = self.epoch if epoch is None else epoch
        n_b = self.buckets.num_buckets
        return [
            self.buckets.get_bucket_id(T, H, W, self.frame_interval, seed=self.seed + epoch + i * n_b)
            for i, (T, H, W) in enumerate(self.sizes)
        ]

    def epoch_batches(self, epoch: int | None = None) -> list[tuple[BucketId, list[int]]]:
        """All micro-batches of an epoch (every rank's), in dealing order: [(bucket, [idx, ...])]."""
        epoch = self.epoch if epoch is None else epoch
        if self._cache is not None and self._cache[0] == epoch:
            return self._cache[1]
        groups: dict[BucketId, list[int]] = defaultdict(list)
        for idx, bucket in enumerate(self.assign(epoch)):
            if bucket is not None:
                groups[bucket].append(idx)
        g = torch.Generator().manual_seed(self.seed + epoch)
        batches = []
        for bucket in sorted(groups):
            ids = groups[bucket]
            ids = [ids[i] for i in torch.randperm(len(ids), generator=g).tolist()]
            size = self.buckets.batch_size(bucket)
            if self.drop_last:
                ids = ids[: len(ids) // size * size]
            elif len(ids) % size:
                ids = ids + [ids[i % len(ids)] for i in range(size - len(ids) % size)]
            batches += [(bucket, ids[i : i + size]) for i in range(0, len(ids), size)]
        batches = [batches[i] for i in torch.randperm(len(batches), generator=g).tolist()]
        extra = len(batches) % self.num_replicas
        if extra and self.drop_last:
            batches = batches[: len(batches) - extra]
        elif extra:
            batches += batches[: self.num_replicas - extra]
        self._cache = (epoch, batches)
        return batches

    def __iter__(self) -> Iterator[list[str]]:
        batches = self.epoch_batches()
        for i in range(self.start_position + self.rank, len(batches), self.num_replicas):
            bucket, ids = batches[i]
            T, H, W = self.buckets.shape(bucket)
            yield [f"{idx}-{T}-{H}-{W}" for idx in ids]

    def state_dict(self, batches_consumed: int) -> dict:
        """State after this rank consumed `batches_consumed` micro-batches of the current epoch
        (counted from the epoch's start, resumed ones included)."""
        return {
            "seed": self.seed,
            "epoch": self.epoch,
            "position": int(batches_consumed) * self.num_replicas,
            "num_replicas": self.num_replicas,
        }

    def load_state_dict(self, state: Mapping) -> None:
        if int(state["seed"]) != self.seed:
            raise ValueError(f"sampler state has seed={state['seed']} but this run has seed={self.seed}; resume with the same seed")
        self.epoch = int(state["epoch"])
        self.start_position = int(state["position"])
        self._cache = None

    def describe(self, epoch: int | None = None) -> dict[BucketId, int]:
        """{bucket: number of micro-batches} of an epoch (all ranks), for logs."""
        counts: dict[BucketId, int] = defaultdict(int)
        for bucket, _ in self.epoch_batches(epoch):
            counts[bucket] += 1
        return dict(counts)


def parse_bucket_key(key: str) -> tuple[int, int, int, int]:
    """"idx-T-H-W" -> (idx, T, H, W) with a clear error for anything else."""
    parts = str(key).split("-")
    if len(parts) != 4 or not all(p.isdigit() for p in parts):
        raise ValueError(f"dataset key {key!r} is not allowed: expected 'idx-T-H-W' with non-negative integers (from BucketBatchSampler)")
    idx, T, H, W = (int(p) for p in parts)
    if min(T, H, W) < 1:
        raise ValueError(f"dataset key {key!r}: T, H and W must be >= 1")
    return idx, T, H, W
