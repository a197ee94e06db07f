"""Meta files (CSV) and the journals that make every data command resumable.

A meta file is a CSV with one row per sample and at least `path` (spec 1.1). Rows are plain
dicts of strings as read; numbers are written with `repr`-exact formatting. Outputs are
written whole and atomically (`opensora_sdk.loading.write_file_atomic`): a path holds the old
file or the new one, never half of one.

Long commands record each finished item in a journal: a CSV beside the output
(`<out_dir>/.<out_name>.parts/<name>_part<rank>.csv`) that grows by appended lines
(`loading.append_line`, fsynced), keyed by the item's row index. A crash can cut at most the
last line, which is dropped on reading. A re-run reads every journal of the folder (from any
earlier number of processes), skips the finished items and, once all are done, writes the
output and removes the folder.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import time
from pathlib import Path
from typing import Iterable, Mapping, Sequence

from opensora_sdk.loading import append_line, write_text_atomic

# The official extension lists (spec, "Conventions"), lower-cased checks.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
VIDEO_EXTENSIONS = (".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v")
# What `--train-column` keeps (spec 1.1), plus our `duration`.
TRAIN_COLUMNS = ("path", "text", "num_frames", "fps", "height", "width", "aspect_ratio", "resolution", "text_len")
INFO_COLUMNS = ("num_frames", "height", "width", "aspect_ratio", "fps", "resolution", "duration")
INDEX = "_index"  # journal column: the row's position in the input
ERROR = "_error"  # journal column: why the item failed ("" when it did not)


def is_image(path: str) -> bool:
    return os.path.splitext(str(path))[1].lower() in IMAGE_EXTENSIONS


def is_video(path: str) -> bool:
    return os.path.splitext(str(path))[1].lower() in VIDEO_EXTENSIONS


def fmt(value) -> str:
    """A cell: '' for None / NaN, ints without '.0', floats round-trip exact."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return ""
        if value.is_integer() and abs(value) < 1e15:
            return str(int(value))
        return repr(value)
    return str(value)


def to_float(value) -> float:
    """A cell as a float; '' and unparsable cells are NaN."""
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


# --------------------------------------------------------------------------------------------
# Reading and writing meta files
# --------------------------------------------------------------------------------------------


def read_rows(path: str | os.PathLike) -> tuple[list[str], list[dict]]:
    """(columns, rows) of a .csv (or .parquet with pandas installed). Cells are strings."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"meta file {str(path)!r} does not exist")
    if path.suffix.lower() == ".parquet":
        try:
            import pandas as pd
        except ImportError:
            raise ImportError(f"reading {str(path)!r} needs pandas and pyarrow (pip install pandas pyarrow)") from None
        frame = pd.read_parquet(path)
        rows = [{k: fmt(v) for k, v in r.items()} for r in frame.to_dict("records")]
        return [str(c) for c in frame.columns], rows
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        columns = list(reader.fieldnames or [])
        rows = [{k: (v if v is not None else "") for k, v in r.items() if k is not None} for r in reader]
    return columns, rows


def read_meta(path: str | os.PathLike, required: Sequence[str] = ("path",)) -> tuple[list[str], list[dict]]:
    """`read_rows`, checking the required columns (ValueError names what is missing and found)."""
    columns, rows = read_rows(path)
    missing = [c for c in required if c not in columns]
    if missing:
        raise ValueError(f"meta file {str(path)!r} lacks the column(s) {missing}; it has {columns}")
    return columns, rows


def csv_text(rows: Iterable[Mapping], columns: Sequence[str], header: bool = True) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(columns), extrasaction="ignore", lineterminator="\n")
    if header:
        writer.writeheader()
    for row in rows:
        writer.writerow({c: fmt(row.get(c)) for c in columns})
    return buf.getvalue()


def write_rows(rows: Sequence[Mapping], path: str | os.PathLike, columns: Sequence[str] | None = None) -> Path:
    """Write a CSV atomically; columns default to the union of the rows' keys in first-seen order."""
    if columns is None:
        columns = list(dict.fromkeys(k for r in rows for k in r))
    path = Path(path)
    if path.suffix.lower() != ".csv":
        raise ValueError(f"output {str(path)!r}: only .csv outputs are written")
    write_text_atomic(csv_text(rows, columns), path)
    return path


def merged_columns(columns: Sequence[str], added: Sequence[str]) -> list[str]:
    return list(dict.fromkeys([*columns, *added]))


def suffixed(path: str | os.PathLike, suffix: str) -> Path:
    """Official output naming: X.csv -> X_<suffix>.csv in the same folder."""
    path = Path(path)
    return path.with_name(f"{path.stem}_{suffix}.csv")


# --------------------------------------------------------------------------------------------
# Journals: appended CSV parts, read back by index
# --------------------------------------------------------------------------------------------


def parts_dir(output: str | os.PathLike) -> Path:
    output = Path(output)
    return output.with_name(f".{output.name}.parts")


class Journal:
    """Append-only record of finished items of one process (see the module docstring).

    `columns` are the result columns; `_index` and `_error` are added. `meta` (settings and the
    input's identity) is stored in the folder; a different one means the folder belongs to
    another run: ValueError, so results of other settings are never mixed in.
    """

    def __init__(self, folder: str | os.PathLike, columns: Sequence[str], *, rank: int = 0, meta: Mapping | None = None):
        self.folder = Path(folder)
        self.columns = [INDEX, *columns, ERROR]
        self.path = self.folder / f"part{rank}.csv"
        self.folder.mkdir(parents=True, exist_ok=True)
        if meta is not None:
            check_meta(self.folder, meta)

    def done(self) -> dict[int, dict]:
        """{index: row} of every journal in the folder (all ranks, all earlier runs)."""
        return read_journals(self.folder)

    def add(self, index: int, result: Mapping | None = None, error: str = "") -> None:
        row = {**(result or {}), INDEX: index, ERROR: " ".join(str(error).split())}
        new = not self.path.exists() or self.path.stat().st_size == 0
        append_line(csv_text([row], self.columns, header=new), self.path)

    def mark_finished(self, world_size: int) -> None:
        (self.folder / f"{self.path.stem}of{world_size}.done").touch()


def check_meta(folder: Path, meta: Mapping) -> None:
    meta = json.loads(json.dumps(meta, default=str))
    file = folder / "meta.json"
    if file.exists():
        try:
            old = json.loads(file.read_text("utf-8"))
        except json.JSONDecodeError:
            old = None
        if old is not None and old != meta:
            changed = sorted(k for k in set(old) | set(meta) if old.get(k) != meta.get(k))
            raise ValueError(
                f"{str(folder)!r} holds the partial results of a run with other settings ({', '.join(changed)} differ); "
                "re-run with the same settings to continue it, or delete the folder (or pass --overwrite) to start over"
            )
        if old is not None:
            return
    write_text_atomic(json.dumps(meta, indent=2, sort_keys=True) + "\n", file)


def read_journals(folder: str | os.PathLike) -> dict[int, dict]:
    out: dict[int, dict] = {}
    for file in sorted(Path(folder).glob("part*.csv")):
        text = file.read_text("utf-8")
        if not text.endswith("\n"):  # a crash cut the last line: drop it
            text = text[: text.rfind("\n") + 1]
        for row in csv.DictReader(io.StringIO(text)):
            try:
                index = int(row[INDEX])
            except (KeyError, TypeError, ValueError):
                continue
            if index not in out or not row.get(ERROR) or out[index].get(ERROR):
                out[index] = row  # a later answer replaces an earlier one, a success is never replaced by a failure
    return out


def wait_for_ranks(folder: str | os.PathLike, world_size: int, timeout_s: float = 24 * 3600, poll_s: float = 0.2) -> None:
    """Rank 0 waits until every rank marked its part finished (files, so no process group is needed)."""
    folder = Path(folder)
    deadline = time.monotonic() + timeout_s
    while True:
        missing = [r for r in range(world_size) if not (folder / f"part{r}of{world_size}.done").exists()]
        if not missing:
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"ranks {missing} of {world_size} did not finish within {timeout_s:.0f} s ({folder})")
        time.sleep(poll_s)


def remove_parts(folder: str | os.PathLike) -> None:
    folder = Path(folder)
    if not folder.is_dir():
        return
    for file in folder.iterdir():
        file.unlink()
    folder.rmdir()


def input_identity(path: str | os.PathLike) -> dict:
    """What tells one input file from another (a journal of another input is not reused)."""
    st = Path(path).stat()
    return {"input": str(Path(path).resolve()), "input_size": st.st_size, "input_mtime_ns": st.st_mtime_ns}


def fingerprint(values: Iterable) -> str:
    """A short hash of a list of values (the items a journal belongs to)."""
    import hashlib

    h = hashlib.sha256()
    for v in values:
        h.update(str(v).encode("utf-8") + b"\0")
    return h.hexdigest()[:16]


def dist_env(rank: int | None = None, world_size: int | None = None) -> tuple[int, int, int]:
    """(rank, world_size, local_rank): the arguments, else torchrun's / accelerate's environment."""
    if rank is None:
        rank = int(os.environ.get("RANK", "0"))
    if world_size is None:
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in [0, {world_size})")
    return rank, world_size, int(os.environ.get("LOCAL_RANK", str(rank)))
