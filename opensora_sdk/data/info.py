"""`opensora data info`: scan videos and images into the training meta format.

    opensora data info raw_videos/ -o meta/info.csv --workers 8
    opensora data info list.txt -o meta/info.csv            # one path per line
    opensora data info meta/clips.csv                       # -> meta/clips_info.csv (official naming)

The official steps 1.1 + 1.2 (`convert video` then `datautil --info --fmin 1`) in one: every file
is decoded (PyAV; images with Pillow) in `--workers` processes, and the output has `path, text,
num_frames, height, width, aspect_ratio, fps, resolution, duration` (a CSV input keeps its other
columns; `text` is empty when the input has none). Paths are written absolute. A file that
cannot be read is not in the output: it is listed with the reason in `<output>_errors.csv` and
on the terminal. Interrupted runs continue where they stopped.
"""

from __future__ import annotations

import os
from pathlib import Path

from opensora_sdk.data import table
from opensora_sdk.data.probe import safe_probe
from opensora_sdk.data.runner import report_errors, run_journaled, split_done

BASE_COLUMNS = ("path", "text")


def find_media(root: str | os.PathLike, *, videos: bool = True, images: bool = True) -> list[Path]:
    """Video and image files under `root`, recursively, sorted."""
    root = Path(root)
    keep = lambda p: (videos and table.is_video(p.name)) or (images and table.is_image(p.name))  # noqa: E731
    return sorted(p for p in root.rglob("*") if p.is_file() and keep(p) and not p.name.startswith("."))


def input_rows(source: str | os.PathLike) -> tuple[list[str], list[dict]]:
    """(columns, rows) of a folder (recursive scan), a .csv / .parquet meta file, or a text list."""
    source = Path(source)
    if source.is_dir():
        rows = [{"path": str(p.resolve()), "text": ""} for p in find_media(source)]
        return list(BASE_COLUMNS), rows
    if not source.is_file():
        raise FileNotFoundError(f"input {str(source)!r}: no such folder or file")
    if source.suffix.lower() in (".csv", ".parquet"):
        columns, rows = table.read_meta(source)
        for row in rows:
            path = Path(row["path"])
            row["path"] = str(path if path.is_absolute() else (source.parent / path).resolve())
            row.setdefault("text", "")
        return table.merged_columns(columns, BASE_COLUMNS), rows
    lines = [line.strip() for line in source.read_text("utf-8").splitlines()]
    rows = [{"path": str(Path(line).resolve()), "text": ""} for line in lines if line and not line.startswith("#")]
    return list(BASE_COLUMNS), rows


def default_output(source: str | os.PathLike) -> Path:
    source = Path(source)
    if source.is_dir():
        return source.parent / f"{source.name}_info.csv"
    return table.suffixed(source, "info")


def scan(
    source: str | os.PathLike,
    output: str | os.PathLike | None = None,
    *,
    workers: int = 1,
    fmin: int = 1,
    progress: bool = True,
    overwrite: bool = False,
) -> dict:
    """Probe every file of `source` and write the meta file. Returns counts and paths.

    Rows with fewer than `fmin` frames (official `--fmin 1`) are left out of the output and
    listed in the errors file, as are unreadable files.
    """
    columns, rows = input_rows(source)
    output = Path(output) if output else default_output(source)
    folder = table.parts_dir(output)
    if overwrite:
        table.remove_parts(folder)
    journal = table.Journal(folder, table.INFO_COLUMNS, meta={"command": "info", "items": table.fingerprint(r["path"] for r in rows)})
    done = run_journaled(list(enumerate(r["path"] for r in rows)), safe_probe, journal, workers=workers,
                         desc="info", progress=progress)  # fmt: skip
    ok, bad = split_done(done)
    out_rows, errors = [], []
    for i, row in enumerate(rows):
        if i in bad:
            errors.append((row["path"], bad[i]))
            continue
        info = {c: ok[i][c] for c in table.INFO_COLUMNS}
        if int(info["num_frames"]) < fmin:
            errors.append((row["path"], f"{info['num_frames']} frames < --fmin {fmin}"))
            continue
        out_rows.append({**row, **info})
    out_columns = table.merged_columns(columns, table.INFO_COLUMNS)
    table.write_rows(out_rows, output, out_columns)
    errors_path = table.suffixed(output, "errors")
    if errors:
        table.write_rows([{"path": p, "error": e} for p, e in errors], errors_path, ["path", "error"])
    elif errors_path.exists():
        errors_path.unlink()
    table.remove_parts(folder)
    report_errors(errors, errors_path)
    return {"output": output, "rows": len(out_rows), "errors": len(errors), "errors_path": errors_path if errors else None}
