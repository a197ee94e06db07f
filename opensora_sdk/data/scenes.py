"""`opensora data scenes` and `opensora data split`: shot detection, then cutting into clips.

    opensora data scenes meta/info.csv                          # -> meta/info_timestamp.csv
    opensora data split meta/info_timestamp.csv --save-dir clips/ --min-seconds 2 --max-seconds 15
                                                                # -> meta/info_timestamp_clips.csv

`scenes` (official 2.1): PySceneDetect's AdaptiveDetector with `adaptive_threshold=3.0`, every
other setting the library default, `start_in_scene=True` (a video without cuts is one scene).
It adds `timestamp`, the official Python-literal list of (start, end) `HH:MM:SS.nnn` pairs. Rows
whose detection failed are left out and listed in `<output>_errors.csv` (official: dropped).

`split` (official 2.2): each scene shorter than `--min-seconds` is skipped (its index is still
used, so clip numbers can have gaps), a longer one than `--max-seconds` keeps its first
`--max-seconds`. Clips are re-encoded with PyAV (H.264, yuv420p, crf 23 as ffmpeg's default),
the shorter side scaled down to `--shorter-size` (never up, even sizes), optionally resampled to
`--target-fps`, without audio, to `{save_dir}/[dirname(relpath)/]{stem}_scene-{idx}.mp4`.
Each clip is written atomically. The output has one row per clip: `path, text` (the source's
caption, if any), `source`, `scene`, `start`, `end` (seconds in the source) and the info columns
of the clip as written, so it needs no second `info` pass.
"""

from __future__ import annotations

import ast
import json
import math
import os
from fractions import Fraction
from pathlib import Path

from opensora_sdk.data import table
from opensora_sdk.data.runner import report_errors, run_journaled, split_done

ADAPTIVE_THRESHOLD = 3.0  # the official setting (tools/scene_cut/scene_detect.py)
SHORTER_SIZE = 1080  # the official default of cut.py
CLIP_COLUMNS = ("path", "text", "source", "scene", "start", "end", *table.INFO_COLUMNS)


# --------------------------------------------------------------------------------------------
# Workers (top-level: they run in spawned processes)
# --------------------------------------------------------------------------------------------


def detect_worker(path: str) -> tuple[dict | None, str]:
    if table.is_image(path):
        return None, "an image: no scenes to detect (left out; add it back with `opensora data csv`)"
    try:
        scenes = detect_scenes(path)
    except Exception as err:  # noqa: BLE001 - a failed detection is this row's error
        return None, f"{type(err).__name__}: {err}"
    return {"timestamp": format_timestamps(scenes)}, ""


def detect_scenes(path: str, threshold: float = ADAPTIVE_THRESHOLD) -> list[tuple[str, str]]:
    """[(start, end)] timecodes 'HH:MM:SS.nnn' of the shots of one video."""
    scenedetect = require_scenedetect()
    if not os.path.isfile(path):
        raise FileNotFoundError("file not found")
    detector = scenedetect.AdaptiveDetector(adaptive_threshold=threshold)
    scenes = scenedetect.detect(path, detector, start_in_scene=True, backend="pyav")
    return [(s.get_timecode(), e.get_timecode()) for s, e in scenes]


def require_scenedetect():
    try:
        import scenedetect
    except ImportError:
        raise ImportError("scene detection needs PySceneDetect and OpenCV: pip install 'opensora-sdk[data]'") from None
    return scenedetect


def format_timestamps(scenes) -> str:
    return repr([tuple(pair) for pair in scenes])


def parse_timestamps(text: str) -> list[tuple[float, float]]:
    """The official `timestamp` cell -> [(start_s, end_s)]. ValueError if it is not a list."""
    text = (text or "").strip()
    if not (text.startswith("[") and text.endswith("]")):
        raise ValueError(f"timestamp {text[:60]!r} is not a list of (start, end) pairs")
    return [(timecode_seconds(a), timecode_seconds(b)) for a, b in ast.literal_eval(text)]


def timecode_seconds(code) -> float:
    if isinstance(code, (int, float)):
        return float(code)
    parts = str(code).split(":")
    seconds = 0.0
    for part in parts:
        seconds = seconds * 60 + float(part)
    return seconds


def cut_worker(job: dict) -> tuple[dict | None, str]:
    try:
        clips = cut_row(**job)
    except Exception as err:  # noqa: BLE001
        return None, f"{type(err).__name__}: {err}"
    return {"clips": json.dumps(clips)}, ""


def cut_row(path: str, scenes, save_dir: str, min_seconds, max_seconds, target_fps, shorter_size) -> list[dict]:
    """Cut one video into its scene clips; the info of each clip written."""
    stem = Path(path).stem
    out = []
    for idx, (start, end) in enumerate(scenes):
        if min_seconds is not None and end - start < min_seconds:
            continue  # official: the index is still consumed
        if max_seconds is not None and end - start > max_seconds:
            end = start + max_seconds
        dst = Path(save_dir) / f"{stem}_scene-{idx}.mp4"
        info = cut_clip(path, dst, start, end, target_fps=target_fps, shorter_size=shorter_size)
        out.append({"path": str(dst.resolve()), "scene": idx, "start": start, "end": end, **info})
    return out


def _even(x: float) -> int:
    return max(2, int(round(x / 2)) * 2)


def cut_clip(src, dst, start: float, end: float, *, target_fps=None, shorter_size=SHORTER_SIZE) -> dict:
    """Re-encode the frames of `src` whose time is in [start, end) to `dst` (atomically)."""
    import av
    import numpy as np

    from opensora_sdk.loading import write_file_atomic

    av.logging.set_level(None)  # PySceneDetect's PyAV backend turns the encoder's chatter on
    with av.open(str(src)) as inp:
        stream = inp.streams.video[0]
        stream.thread_type = "AUTO"
        rate = stream.average_rate or stream.guessed_rate or 24
        src_fps = float(rate)
        h, w = stream.codec_context.height, stream.codec_context.width
        if shorter_size and min(h, w) > shorter_size:
            f = shorter_size / min(h, w)
            h, w = _even(h * f), _even(w * f)
        else:
            h, w = max(2, h - h % 2), max(2, w - w % 2)
        out_fps = float(target_fps) if target_fps else src_fps
        t0 = float(stream.start_time * stream.time_base) if stream.start_time is not None else 0.0
        if start > 0:
            inp.seek(int((start + t0) / stream.time_base), stream=stream, backward=True)
        eps = 0.25 / src_fps

        def frames():
            next_t = start  # time of the next output frame (resampling to out_fps)
            for index, frame in enumerate(inp.decode(stream)):
                t = float(frame.pts * stream.time_base) - t0 if frame.pts is not None else index / src_fps
                if t < start - eps:
                    continue
                if t >= end - eps:
                    break
                image = frame.to_ndarray(format="rgb24", width=w, height=h)
                while next_t <= t + 0.5 / src_fps + 1e-9 and next_t < end - eps:
                    yield image
                    next_t += 1.0 / out_fps

        count = [0]

        def write(tmp: Path) -> None:
            with av.open(str(tmp), mode="w", format="mp4") as out:
                vs = out.add_stream("libx264", rate=Fraction(out_fps).limit_denominator(1001), options={"crf": "23"})
                vs.height, vs.width, vs.pix_fmt = h, w, "yuv420p"
                for image in frames():
                    for packet in vs.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(image), format="rgb24")):
                        out.mux(packet)
                    count[0] += 1
                if count[0] == 0:
                    raise ValueError(f"no frame in [{start:.3f}, {end:.3f}) s")
                for packet in vs.encode():
                    out.mux(packet)

        write_file_atomic(dst, write)
    n = count[0]
    return {"num_frames": n, "height": h, "width": w, "aspect_ratio": h / w, "fps": out_fps,
            "resolution": h * w, "duration": n / out_fps}  # fmt: skip


# --------------------------------------------------------------------------------------------
# Commands
# --------------------------------------------------------------------------------------------


def _resolved_rows(meta: str | os.PathLike):
    columns, rows = table.read_meta(meta)
    for row in rows:
        p = Path(row["path"])
        row["path"] = str(p if p.is_absolute() else (Path(meta).parent / p).resolve())
    return columns, rows


def detect(meta, output=None, *, workers: int = 1, progress: bool = True, overwrite: bool = False) -> dict:
    """Add `timestamp` to every readable video of `meta`; see the module docstring."""
    require_scenedetect()
    columns, rows = _resolved_rows(meta)
    output = Path(output) if output else table.suffixed(meta, "timestamp")
    folder = table.parts_dir(output)
    if overwrite:
        table.remove_parts(folder)
    journal = table.Journal(folder, ["timestamp"], meta={"command": "scenes", **table.input_identity(meta),
                                                         "threshold": ADAPTIVE_THRESHOLD})  # fmt: skip
    done = run_journaled(list(enumerate(r["path"] for r in rows)), detect_worker, journal, workers=workers,
                         desc="scenes", progress=progress)  # fmt: skip
    ok, bad = split_done(done)
    out_rows = [{**r, "timestamp": ok[i]["timestamp"]} for i, r in enumerate(rows) if i in ok]
    errors = [(rows[i]["path"], bad[i]) for i in sorted(bad)]
    return _finish(out_rows, table.merged_columns(columns, ["timestamp"]), output, errors, folder)


def split(
    meta, output=None, *, save_dir, min_seconds: float | None = None, max_seconds: float | None = None,
    target_fps: float | None = None, shorter_size: int | None = SHORTER_SIZE, workers: int = 1,
    progress: bool = True, overwrite: bool = False,
) -> dict:
    """Cut every row's scenes into clips under `save_dir`; see the module docstring."""
    if min_seconds is not None and max_seconds is not None and min_seconds > max_seconds:
        raise ValueError(f"--min-seconds {min_seconds} is larger than --max-seconds {max_seconds}")
    columns, rows = _resolved_rows(meta)
    output = Path(output) if output else table.suffixed(meta, "clips")
    folder = table.parts_dir(output)
    if overwrite:
        table.remove_parts(folder)
    settings = {"min_seconds": min_seconds, "max_seconds": max_seconds, "target_fps": target_fps, "shorter_size": shorter_size}
    journal = table.Journal(folder, ["clips"], meta={"command": "split", **table.input_identity(meta),
                                                     "save_dir": str(Path(save_dir).resolve()), **settings})  # fmt: skip
    jobs, errors = [], []
    for i, row in enumerate(rows):
        try:
            scenes = parse_timestamps(row["timestamp"]) if row.get("timestamp") else None
        except (ValueError, SyntaxError) as err:
            errors.append((row["path"], f"timestamp: {err}"))
            continue
        if scenes is None:  # no timestamp: the whole video is one scene (official)
            from opensora_sdk.data.probe import safe_probe

            info, err = safe_probe(row["path"])
            if info is None:
                errors.append((row["path"], err))
                continue
            scenes = [(0.0, info["duration"] or math.inf)]
        sub = Path(save_dir) / Path(row["relpath"]).parent if row.get("relpath") else Path(save_dir)
        jobs.append((i, {"path": row["path"], "scenes": scenes, "save_dir": str(sub), **settings}))
    done = run_journaled(jobs, cut_worker, journal, workers=workers, desc="split", progress=progress)
    ok, bad = split_done(done)
    out_rows = []
    for i, row in enumerate(rows):
        if i in bad:
            errors.append((row["path"], bad[i]))
        for clip in json.loads(ok[i]["clips"]) if i in ok else []:
            out_rows.append({"path": clip["path"], "text": row.get("text", ""), "source": row["path"], **clip})
    return _finish(out_rows, list(CLIP_COLUMNS), output, errors, folder)


def _finish(out_rows, columns, output: Path, errors, folder) -> dict:
    table.write_rows(out_rows, output, columns)
    errors_path = table.suffixed(output, "errors")
    if errors:
        table.write_rows([{"path": p, "error": e} for p, e in errors], errors_path, ["path", "error"])
    elif errors_path.exists():
        errors_path.unlink()
    table.remove_parts(folder)
    report_errors(errors, errors_path, what="failed")
    return {"output": output, "rows": len(out_rows), "errors": len(errors), "errors_path": errors_path if errors else None}
