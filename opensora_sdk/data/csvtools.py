"""`opensora data csv`: filter, merge, deduplicate, shuffle and shard meta files (spec 1.3).

    opensora data csv meta/clips_aes_flow.csv --fmin 17 --aesmin 5 --flowmin 1 --fpsmax 60   # -> ..._fmin17_fpsmax60.0_aesmin5.0_flowmin1.0.csv
    opensora data csv parts/*_part*.csv -o meta/merged.csv --remove-path-duplication          # merge
    opensora data csv meta/train.csv --shuffle --seed 42 --shard 8                            # -> train_shuffled_seed42_{0..7}.csv

The official `datautil`'s options that touch no model, applied in its order: read and
concatenate the inputs (globs expanded, missing inputs skipped) -> `--difference` -> `--ext`
-> caption filters -> path / caption processing -> sort -> score filters -> shuffle, head
-> `--train-column` -> save or shard. Without `-o`, the output is named as officially: the
inputs' base names joined by `+`, then one suffix per option (`_fmin17`, `_aesmin5.0`, ...),
in the first input's folder. Added here: `--hwmin`, `--ocrmax` (the official tool has no OCR
filter) and `--cmotion` (keep rows with these camera-motion labels). The shuffle is Python's
`random.Random(seed)`, not pandas', so the order differs from the official one.
"""

from __future__ import annotations

import glob
import math
import os
import random
import sys
from pathlib import Path

from opensora_sdk.data import table

LLM_PREFIXES = [f"The {k} {v}" for k in ("video", "image") for v in ("shows", "captures", "features", "depicts", "presents", "is")]
LLM_PREFIXES += ["In the video,", "In the image,", "The image portrays"]
CMOTION_WORDS = {"static": "static", "pan_right": "pan right", "pan_left": "pan left", "zoom_in": "zoom in",
                 "zoom_out": "zoom out", "tilt_up": "tilt up", "tilt_down": "tilt down"}  # fmt: skip


def expand_inputs(patterns) -> list[Path]:
    out = []
    for pattern in patterns:
        found = sorted(glob.glob(str(pattern))) or ([str(pattern)] if Path(pattern).exists() else [])
        if not found:
            print(f"opensora data csv: {pattern} does not exist, skipped", file=sys.stderr)
        out += [Path(p) for p in found]
    return out


def refine_llm_caption(text: str) -> str:
    """Strip the first leading "The video shows" style prefix, then capitalise (official --refine-llm-caption)."""
    for prefix in LLM_PREFIXES:
        for form in (prefix, prefix.lower()):
            if text.startswith(form):
                text = text[len(form) :].strip()
                return text[:1].upper() + text[1:]
    return text


def _num(row, column) -> float:
    return table.to_float(row.get(column))


def transform(inputs, output=None, *, difference=None, ext=False, remove_empty_caption=False,
              remove_path_duplication=False, remove_text_duplication=False, relpath=None, abspath=None,
              refine_llm=False, clean_caption=False, merge_cmotion=False, sort=None, sort_ascending=None,
              fmin=None, fmax=None, fpsmax=None, hwmax=None, hwmin=None, aesmin=None, matchmin=None, flowmin=None,
              ocrmax=None, cmotion=None, img_only=False, vid_only=False, shuffle=False, seed=42, head=None,
              train_column=False, shard=None) -> dict:  # fmt: skip
    """Apply the options in the official order; write `output` (or the shards). Returns counts and paths."""
    paths = expand_inputs(inputs)
    if not paths:
        raise FileNotFoundError(f"no input meta file found among {list(map(str, inputs))}")
    if sort and sort_ascending:
        raise ValueError("give --sort or --sort-ascending, not both")
    if img_only and vid_only:
        raise ValueError("give --img-only or --vid-only, not both")
    columns, rows = [], []
    for p in paths:
        cols, part = table.read_meta(p)
        columns = table.merged_columns(columns, cols)
        rows += part
    loaded = len(rows)
    name = "+".join(p.name.split(".")[0] for p in paths)
    suffix: list[str] = []
    if difference:
        _, other = table.read_meta(difference)
        drop = {r["path"] for r in other}
        rows = [r for r in rows if r["path"] not in drop]
        name += "-" + Path(difference).name.split(".")[0]
    if ext:
        rows = [r for r in rows if _exists(r["path"], paths[0])]
        suffix.append("ext")
    if relpath:
        rows = [{**r, "path": os.path.relpath(r["path"], relpath)} for r in rows]
        suffix.append("relpath")
    if abspath:
        rows = [{**r, "path": os.path.join(abspath, r["path"])} for r in rows]
        suffix.append("abspath")
    if remove_empty_caption:
        rows = [r for r in rows if str(r.get("text", "")).strip()]
        suffix.append("noempty")
    if remove_path_duplication:
        rows = _dedupe(rows, "path")
        suffix.append("noduppath")
    if refine_llm:
        rows = [{**r, "text": refine_llm_caption(r.get("text", ""))} for r in rows]
        suffix.append("llm")
    if clean_caption:
        from opensora_sdk.text import text_preprocessing

        rows = [{**r, "text": text_preprocessing(r.get("text", ""))} for r in rows]
        suffix.append("clean")
    if merge_cmotion:
        rows = [{**r, "text": f"{r.get('text', '')} Camera motion: {_cmotion_words(r)}."} for r in rows]
        suffix.append("cmcaption")
    if sort or sort_ascending:
        column = sort or sort_ascending
        _require(columns, column, "--sort")
        rows = sorted(rows, key=lambda r: _sort_key(r.get(column, "")), reverse=bool(sort))
        suffix.insert(0, "sort")
    filters = [  # (value, column, keep(row value, threshold), suffix)
        (fmin, "num_frames", lambda v, n: v >= n, f"fmin{fmin}"),
        (fmax, "num_frames", lambda v, n: v <= n, f"fmax{fmax}"),
        (fpsmax, "fps", lambda v, n: math.isnan(v) or v <= n, f"fpsmax{fpsmax}"),
        (hwmax, "resolution", lambda v, n: v <= n, f"hwmax{hwmax}"),
        (hwmin, "resolution", lambda v, n: v >= n, f"hwmin{hwmin}"),
        (aesmin, "aes", lambda v, n: v >= n, f"aesmin{aesmin}"),
        (matchmin, "match", lambda v, n: v >= n, f"matchmin{matchmin}"),
        (flowmin, "flow", lambda v, n: v >= n, f"flowmin{flowmin}"),
        (ocrmax, "ocr", lambda v, n: v <= n, f"ocrmax{ocrmax}"),
    ]
    for value, column, keep, tag in filters:
        if value is None:
            continue
        if column == "resolution" and "resolution" not in columns:
            for r in rows:
                r["resolution"] = _num(r, "height") * _num(r, "width")
        else:
            _require(columns, column, f"--{tag.rstrip('0123456789.')}")
        rows = [r for r in rows if keep(_num(r, column), value)]
        suffix.append(tag)
    if remove_text_duplication:
        rows = _dedupe(rows, "text")
        suffix.append("noduptext")
    if cmotion:
        _require(columns, "cmotion", "--cmotion")
        wanted = {w.replace("_", " ") for w in cmotion}
        rows = [r for r in rows if str(r.get("cmotion", "")).replace("_", " ") in wanted]
        suffix.append("cmotion")
    if img_only or vid_only:
        rows = [r for r in rows if (table.is_image(r["path"]) if img_only else table.is_video(r["path"]))]
        suffix.append("img" if img_only else "vid")
    if shuffle:
        random.Random(seed).shuffle(rows)
        suffix.append(f"shuffled_seed{seed}")
    if head is not None:
        rows = rows[:head]
        suffix.append(f"first_{head}_data")
    if train_column:
        columns = [c for c in columns if c in table.TRAIN_COLUMNS]
    out = Path(output) if output else paths[0].parent / ("_".join([name, *suffix]) + ".csv")
    if shard:
        if shard < 1:
            raise ValueError(f"--shard {shard}: expected a positive number of parts")
        bounds = [round(i * len(rows) / shard) for i in range(shard + 1)]
        outs = [out.with_name(f"{out.stem}_{i}.csv") for i in range(shard)]
        for i, o in enumerate(outs):
            table.write_rows(rows[bounds[i] : bounds[i + 1]], o, columns)
        return {"loaded": loaded, "rows": len(rows), "outputs": outs}
    table.write_rows(rows, out, columns)
    return {"loaded": loaded, "rows": len(rows), "outputs": [out]}


def _exists(path: str, first_input: Path) -> bool:
    p = Path(path)
    return (p if p.is_absolute() else first_input.parent / p).exists()


def _dedupe(rows, column):
    seen, out = set(), []
    for r in rows:
        if r.get(column) not in seen:
            seen.add(r.get(column))
            out.append(r)
    return out


def _require(columns, column, option) -> None:
    if column not in columns:
        raise ValueError(f"{option} needs the column {column!r}; the input has {columns}")


def _sort_key(value):
    number = table.to_float(value)
    return (0, number, "") if not math.isnan(number) else (1, 0.0, str(value))


def _cmotion_words(row) -> str:
    label = str(row.get("cmotion", ""))
    words = CMOTION_WORDS.get(label) or (label if label in CMOTION_WORDS.values() else None)
    if words is None:
        raise ValueError(f"--merge-cmotion: camera motion {label!r} of {row['path']} is not one of {sorted(CMOTION_WORDS.values())}; "
                         "filter with --cmotion first")  # fmt: skip
    return words
