"""`opensora data stats`: counts and histograms of a meta file.

    opensora data stats meta/train.csv                   # prints; PNGs + stats.json in meta/train_stats/

Prints the number of rows, videos and images, the total duration, and min / median / mean /
max of each numeric column it knows (num_frames, duration, height, width, resolution, fps,
aspect_ratio, aes, flow, ocr, match, text length in words), plus the counts of `cmotion`
labels. Draws one histogram per column (PNG, drawn with Pillow: no plotting package needed)
and writes the figures to `stats.json`, each file atomically.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path

import numpy as np

from opensora_sdk.data import table
from opensora_sdk.loading import write_file_atomic, write_text_atomic

COLUMNS = ("num_frames", "duration", "height", "width", "resolution", "fps", "aspect_ratio", "aes", "flow", "ocr", "match")


def column_values(rows, column) -> np.ndarray:
    if column == "text_words":
        return np.array([len(str(r.get("text", "")).split()) for r in rows], dtype=np.float64)
    values = np.array([table.to_float(r.get(column)) for r in rows], dtype=np.float64)
    return values[~np.isnan(values)]


def summarize(rows, columns) -> dict:
    videos = sum(table.is_video(r["path"]) for r in rows)
    images = sum(table.is_image(r["path"]) for r in rows)
    out = {"rows": len(rows), "videos": videos, "images": images, "other": len(rows) - videos - images}
    if "duration" in columns:
        out["total_hours"] = float(column_values(rows, "duration").sum() / 3600)
    numeric = {}
    for column in [c for c in COLUMNS if c in columns] + (["text_words"] if "text" in columns else []):
        v = column_values(rows, column)
        if len(v):
            numeric[column] = {"count": int(len(v)), "min": float(v.min()), "median": float(np.median(v)),
                               "mean": float(v.mean()), "max": float(v.max())}  # fmt: skip
    out["columns"] = numeric
    if "cmotion" in columns:
        out["cmotion"] = dict(Counter(r.get("cmotion", "") for r in rows).most_common())
    return out


def histogram_png(values: np.ndarray, title: str, path, bins: int = 30, size=(640, 400)) -> None:
    """A bar chart of `values` with axis ticks, drawn with Pillow, written atomically."""
    from PIL import Image, ImageDraw

    W, H = size
    left, right, top, bottom = 60, 20, 30, 50
    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)
    lo, hi = (float(values.min()), float(values.max())) if len(values) else (0.0, 1.0)
    if hi == lo:
        lo, hi = lo - 0.5, hi + 0.5
    counts, edges = np.histogram(values, bins=bins, range=(lo, hi))
    peak = max(int(counts.max()), 1)
    pw, ph = W - left - right, H - top - bottom
    for i, c in enumerate(counts):
        x0 = left + pw * i / bins
        x1 = left + pw * (i + 1) / bins
        draw.rectangle([x0 + 1, top + ph * (1 - c / peak), x1 - 1, top + ph], fill=(70, 110, 200))
    draw.line([left, top, left, top + ph, left + pw, top + ph], fill="black")
    for k in range(5):
        x = left + pw * k / 4
        draw.text((x - 15, top + ph + 6), _tick(lo + (hi - lo) * k / 4), fill="black")
        y = top + ph * (1 - k / 4)
        draw.text((4, y - 6), str(round(peak * k / 4)), fill="black")
    draw.text((left, 8), f"{title}  (n={len(values)})", fill="black")
    write_file_atomic(path, lambda tmp: image.save(tmp, format="PNG"))


def _tick(v: float) -> str:
    if v != 0 and (abs(v) >= 1e5 or abs(v) < 1e-2):
        return f"{v:.1e}"
    return f"{v:.3g}"


def stats(meta, out_dir=None, *, bins: int = 30, plots: bool = True) -> dict:
    columns, rows = table.read_meta(meta)
    if "resolution" not in columns and {"height", "width"} <= set(columns):
        for r in rows:
            r["resolution"] = table.to_float(r.get("height")) * table.to_float(r.get("width"))
        columns = [*columns, "resolution"]
    summary = summarize(rows, columns)
    out_dir = Path(out_dir) if out_dir else Path(meta).with_name(f"{Path(meta).stem}_stats")
    if plots:
        for column in summary["columns"]:
            histogram_png(column_values(rows, column), column, out_dir / f"hist_{column}.png", bins=bins)
    write_text_atomic(json.dumps(summary, indent=2) + "\n", out_dir / "stats.json")
    summary["out_dir"] = str(out_dir)
    return summary


def format_summary(summary: dict) -> str:
    lines = [f"rows {summary['rows']}: {summary['videos']} videos, {summary['images']} images"
             + (f", {summary['other']} other" if summary["other"] else "")]  # fmt: skip
    if "total_hours" in summary:
        lines.append(f"total duration {summary['total_hours']:.2f} h")
    lines.append(f"{'column':<14}{'count':>8}{'min':>12}{'median':>12}{'mean':>12}{'max':>12}")
    for name, s in summary["columns"].items():
        lines.append(f"{name:<14}{s['count']:>8}" + "".join(f"{_tick(s[k]) if not math.isnan(s[k]) else '-':>12}"
                                                            for k in ("min", "median", "mean", "max")))  # fmt: skip
    if "cmotion" in summary:
        lines.append("cmotion: " + ", ".join(f"{k or '(empty)'} {v}" for k, v in summary["cmotion"].items()))
    return "\n".join(lines)
