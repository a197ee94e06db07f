"""The sharded, resumable model run behind every score (aesthetic, motion, OCR).

    torchrun --nproc_per_node 8 -m opensora_sdk data aes meta/clips.csv --clip models/clip-vit-l-14 --head models/aesthetic.pth
    python -m opensora_sdk data motion meta/clips.csv           # one process

Rank r of W (torchrun's / accelerate's RANK and WORLD_SIZE, or the arguments) scores rows
r, r+W, r+2W, ... (no padding, so no duplicates to remove). Frames are decoded in `workers`
threads while the model runs on the previous batch; every finished batch is appended to the
rank's CSV part (`<output dir>/.<output name>.parts/part<r>.csv`). When a rank is done it
marks its part; rank 0 waits for every mark, merges the parts into the input's rows in their
order and writes the output atomically. Re-running after a crash (with any number of
processes) scores only the rows no part holds yet. No process group is needed: the parts and
marks live on the (shared) file system.

Rows whose file cannot be read are left out of the output (as the official aes / flow tools
keep only scored rows) and listed with the reason in `<output>_errors.csv`.

A scorer is an object with `name` (the output suffix), `columns`, `settings` (stored with the
parts, so a re-run with other settings is refused), `load(row) -> item` (thread-safe, may
raise for a bad file) and `score(items) -> [result dict]`.
"""

from __future__ import annotations

import math
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Protocol, Sequence

import numpy as np
from tqdm.auto import tqdm

from opensora_sdk.data import table
from opensora_sdk.data.runner import report_errors, split_done


class Scorer(Protocol):
    name: str
    columns: Sequence[str]
    settings: dict

    def load(self, row: dict): ...

    def score(self, items: list) -> list[dict]: ...


# --------------------------------------------------------------------------------------------
# Frames (spec 1.6: points p in [0, 1) -> index int(p * total), clamped)
# --------------------------------------------------------------------------------------------


def total_frames(row: dict) -> int:
    """The `num_frames` column when given, else the decoded count."""
    n = table.to_float(row.get("num_frames"))
    if not math.isnan(n) and n >= 1:
        return int(n)
    from opensora_sdk.data.probe import probe

    return int(probe(row["path"])["num_frames"])


def read_frames(row: dict, indices: Sequence[int]) -> np.ndarray:
    """uint8 [len(indices), H, W, 3]; indices past the end are clamped to the last frame; an
    image gives itself for every index."""
    from opensora_sdk.video_io import read_video

    path = row["path"]
    if table.is_image(path):
        from opensora_sdk.video_io import read_image

        return np.stack([read_image(path)] * len(indices))
    total = total_frames(row)
    wanted = [min(max(int(i), 0), total - 1) for i in indices]
    try:
        frames, _ = read_video(path, frame_indices=wanted)
    except ValueError as err:
        if "out of range" not in str(err):
            raise
        frames, _ = read_video(path)  # the num_frames column was wrong: clamp to what decodes
        frames = frames[[min(i, len(frames) - 1) for i in wanted]]
    return frames


def point_indices(points: Sequence[float], total: int) -> list[int]:
    return [min(int(p * total), total - 1) for p in points]


# --------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------


def _resolve(meta) -> tuple[list[str], list[dict], list[str]]:
    columns, rows = table.read_meta(meta)
    written = [r["path"] for r in rows]
    for row in rows:
        p = Path(row["path"])
        row["path"] = str(p if p.is_absolute() else (Path(meta).parent / p).resolve())
    return columns, rows, written


def run_scores(
    scorer: Scorer,
    meta,
    output=None,
    *,
    rank: int | None = None,
    world_size: int | None = None,
    batch_size: int = 16,
    workers: int = 4,
    progress: bool = True,
    overwrite: bool = False,
    wait_timeout_s: float = 24 * 3600,
) -> dict | None:
    """Score this rank's rows of `meta`; on rank 0 also merge and write `output`.

    Returns the summary on rank 0, None on the others.
    """
    rank, world_size, _ = table.dist_env(rank, world_size)
    if batch_size < 1:
        raise ValueError(f"--batch-size {batch_size}: expected a positive integer")
    columns, rows, written = _resolve(meta)
    output = Path(output) if output else table.suffixed(meta, scorer.name)
    folder = table.parts_dir(output)
    if overwrite:
        if world_size > 1:
            raise ValueError("--overwrite works with one process only (the ranks would delete each other's parts)")
        table.remove_parts(folder)
    journal = table.Journal(folder, scorer.columns, rank=rank,
                            meta={"command": scorer.name, **table.input_identity(meta), **scorer.settings})  # fmt: skip
    done = journal.done()
    mine = [i for i in range(rank, len(rows), world_size) if i not in done]
    total_mine = len(range(rank, len(rows), world_size))
    bar = tqdm(total=total_mine, initial=total_mine - len(mine), desc=f"{scorer.name} [rank {rank}/{world_size}]",
               disable=not progress, file=sys.stderr)  # fmt: skip

    def load(i):
        try:
            return i, scorer.load(rows[i]), ""
        except Exception as err:  # noqa: BLE001 - an unreadable file is this row's error
            return i, None, f"{type(err).__name__}: {err}"

    try:
        with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
            batch: list[tuple[int, object]] = []
            for i, item, error in pool.map(load, mine):  # in order, `workers` rows ahead
                if error:
                    journal.add(i, None, error)
                    bar.update()
                    continue
                batch.append((i, item))
                if len(batch) == batch_size:
                    _score_batch(scorer, batch, journal, bar)
                    batch = []
            if batch:
                _score_batch(scorer, batch, journal, bar)
    finally:
        bar.close()
    journal.mark_finished(world_size)
    if rank != 0:
        return None
    table.wait_for_ranks(folder, world_size, timeout_s=wait_timeout_s)
    ok, bad = split_done(table.read_journals(folder))
    missing = [i for i in range(len(rows)) if i not in ok and i not in bad]
    if missing:
        raise RuntimeError(f"{len(missing)} rows have no result in {folder} (first: {missing[:5]}); re-run to finish them")
    out_rows, errors = [], []
    for i, row in enumerate(rows):
        if i in bad:
            errors.append((row["path"], bad[i]))
            continue
        out_rows.append({**row, "path": written[i], **{c: ok[i][c] for c in scorer.columns}})
    table.write_rows(out_rows, output, table.merged_columns(columns, scorer.columns))
    errors_path = table.suffixed(output, "errors")
    if errors:
        table.write_rows([{"path": p, "error": e} for p, e in errors], errors_path, ["path", "error"])
    elif errors_path.exists():
        errors_path.unlink()
    table.remove_parts(folder)
    report_errors(errors, errors_path)
    return {"output": output, "rows": len(out_rows), "errors": len(errors), "errors_path": errors_path if errors else None}


def _score_batch(scorer: Scorer, batch, journal: table.Journal, bar) -> None:
    results = scorer.score([item for _, item in batch])
    if len(results) != len(batch):
        raise RuntimeError(f"scorer {scorer.name} returned {len(results)} results for {len(batch)} rows")
    for (i, _), result in zip(batch, results):
        journal.add(i, result)
    bar.update(len(batch))


def pick_device(device: str | None = None):
    """--device, else cuda:LOCAL_RANK when CUDA is there, else the CPU."""
    import torch

    if device and device != "auto":
        return torch.device(device)
    _, _, local_rank = table.dist_env()
    if torch.cuda.is_available():
        return torch.device(f"cuda:{local_rank % torch.cuda.device_count()}")
    return torch.device("cpu")
