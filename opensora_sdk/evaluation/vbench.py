"""VBench: score samples with the `vbench` package, and combine the dimensions (spec 2.3, 2.4).

    opensora eval vbench samples/vbench --out eval/vbench             # score (needs vbench + its models) and combine
    opensora eval vbench --tabulate eval/vbench                       # combine existing *_eval_results.json only

Combination (the official tabulation, pure math): each dimension's raw value (rounded to 4
decimals) is min-max normalised with the fixed table and multiplied by its weight; quality =
sum(scaled quality dims) / sum(their weights) (6.5), semantic = sum(scaled semantic dims) / 9,
total = (4 quality + 1 semantic) / 5. I2V: i2v = (i2v_subject + i2v_background) / 2, quality
the same 7 dimensions / 6.5, total = (quality + i2v) / 2; camera_motion is scaled and reported
but in no aggregate. Outputs: `all_results.json` (raw values as 4-decimal strings) and
`scaled_results.json` = {"items": [{name: "xx.xx%"}, ...]} in the official order.
"""

from __future__ import annotations

import json
from pathlib import Path

from opensora_sdk.loading import write_text_atomic

# name: (min, max, weight, group)
T2V_TABLE = {
    "subject consistency": (0.1462, 1.0, 1, "quality"),
    "background consistency": (0.2615, 1.0, 1, "quality"),
    "temporal flickering": (0.6293, 1.0, 1, "quality"),
    "motion smoothness": (0.706, 0.9975, 1, "quality"),
    "dynamic degree": (0.0, 1.0, 0.5, "quality"),
    "aesthetic quality": (0.0, 1.0, 1, "quality"),
    "imaging quality": (0.0, 1.0, 1, "quality"),
    "object class": (0.0, 1.0, 1, "semantic"),
    "multiple objects": (0.0, 1.0, 1, "semantic"),
    "human action": (0.0, 1.0, 1, "semantic"),
    "color": (0.0, 1.0, 1, "semantic"),
    "spatial relationship": (0.0, 1.0, 1, "semantic"),
    "scene": (0.0, 0.8222, 1, "semantic"),
    "appearance style": (0.0009, 0.2855, 1, "semantic"),
    "temporal style": (0.0, 0.364, 1, "semantic"),
    "overall consistency": (0.0, 0.364, 1, "semantic"),
}
QUALITY_WEIGHT, SEMANTIC_WEIGHT = 4, 1
T2V_DIMENSIONS = [n.replace(" ", "_") for n in (  # the order calc_vbench evaluates them in
    "subject consistency", "background consistency", "motion smoothness", "dynamic degree", "aesthetic quality",
    "imaging quality", "temporal flickering", "object class", "multiple objects", "color", "spatial relationship",
    "scene", "temporal style", "overall consistency", "human action", "appearance style")]  # fmt: skip

I2V_TABLE = {
    "camera_motion": (0.0, 1.0, 0.1, "camera"),
    "i2v_subject": (0.1462, 1.0, 1, "i2v"),
    "i2v_background": (0.2615, 1.0, 1, "i2v"),
    "subject_consistency": (0.1462, 1.0, 1, "quality"),
    "background_consistency": (0.2615, 1.0, 1, "quality"),
    "motion_smoothness": (0.7060, 0.9975, 1, "quality"),
    "dynamic_degree": (0.0, 1.0, 0.5, "quality"),
    "aesthetic_quality": (0.0, 1.0, 1, "quality"),
    "imaging_quality": (0.0, 1.0, 1, "quality"),
    "temporal_flickering": (0.6293, 1.0, 1, "quality"),
}


def _key(name: str) -> str:
    return name.replace("_", " ").strip().lower()


def scale(raw: float, lo: float, hi: float, weight: float) -> float:
    return (round(float(raw), 4) - lo) / (hi - lo) * weight


def combine_t2v(raw: dict[str, float]) -> dict[str, float]:
    """{dimension: raw} (16 dims; '_' or ' ' in names) -> {total, quality, semantic, <dim>: scaled} in [0, 1]."""
    values = {_key(k): v for k, v in raw.items()}
    missing = [k for k in T2V_TABLE if k not in values]
    if missing:
        raise ValueError(f"VBench dimensions missing: {missing}; all 16 are needed for the total")
    scaled = {k: scale(values[k], lo, hi, w) for k, (lo, hi, w, _) in T2V_TABLE.items()}
    weight = {g: sum(w for _, _, w, gg in T2V_TABLE.values() if gg == g) for g in ("quality", "semantic")}
    quality = sum(scaled[k] for k, t in T2V_TABLE.items() if t[3] == "quality") / weight["quality"]
    semantic = sum(scaled[k] for k, t in T2V_TABLE.items() if t[3] == "semantic") / weight["semantic"]
    total = (QUALITY_WEIGHT * quality + SEMANTIC_WEIGHT * semantic) / (QUALITY_WEIGHT + SEMANTIC_WEIGHT)
    return {"total score": total, "quality score": quality, "semantic score": semantic, **scaled}


def combine_i2v(raw: dict[str, float]) -> dict[str, float]:
    """{dimension: raw} (the 10 I2V dims) -> {total, i2v, quality, camera_motion, <dim>: scaled}."""
    values = {k.replace(" ", "_").strip().lower(): v for k, v in raw.items()}
    missing = [k for k in I2V_TABLE if k not in values]
    if missing:
        raise ValueError(f"VBench-I2V dimensions missing: {missing}")
    scaled = {k: scale(values[k], lo, hi, w) for k, (lo, hi, w, _) in I2V_TABLE.items()}
    i2v = (scaled["i2v_subject"] + scaled["i2v_background"]) / 2
    qdims = [k for k, t in I2V_TABLE.items() if t[3] == "quality"]
    quality = sum(scaled[k] for k in qdims) / sum(I2V_TABLE[k][2] for k in qdims)
    return {"total score": (quality + i2v) / 2, "i2v score": i2v, "quality score": quality, **scaled}


def read_results(score_dir: str | Path) -> dict[str, float]:
    """val[0] of every dimension of every `*_eval_results.json` in `score_dir`."""
    out = {}
    files = sorted(Path(score_dir).glob("*_eval_results.json"))
    if not files:
        raise FileNotFoundError(f"no *_eval_results.json in {str(score_dir)!r}: score the samples first")
    for file in files:
        for dim, value in json.loads(file.read_text("utf-8")).items():
            out[dim] = float(value[0] if isinstance(value, (list, tuple)) else value)
    return out


def tabulate(score_dir: str | Path, out_dir: str | Path | None = None, *, i2v: bool = False) -> dict[str, float]:
    """Combine the results in `score_dir`; write all_results.json and scaled_results.json."""
    raw = read_results(score_dir)
    combined = combine_i2v(raw) if i2v else combine_t2v(raw)
    out_dir = Path(out_dir or score_dir)
    write_text_atomic(json.dumps({_key(k) if not i2v else k: f"{round(v, 4):.4f}" for k, v in raw.items()}, indent=2) + "\n",
                      out_dir / "all_results.json")  # fmt: skip
    key = "item" if i2v else "items"
    items = [{name: f"{value * 100:.2f}%"} for name, value in combined.items()]
    write_text_atomic(json.dumps({key: items}, indent=2) + "\n", out_dir / "scaled_results.json")
    return combined


def score_videos(video_dir, out_dir, *, full_info=None, dimensions=None, device="cuda") -> Path:
    """Run the `vbench` package on `video_dir` (mode vbench_standard, imaging quality 'longer')."""
    try:
        from vbench import VBench
    except ImportError:
        raise ImportError("scoring needs the vbench package and its models: pip install vbench (see its README for the "
                          "model files it reads); or combine existing results with --tabulate") from None  # fmt: skip
    import vbench as vb

    info = Path(full_info) if full_info else Path(vb.__file__).parent / "VBench_full_info.json"
    if not info.is_file():
        raise FileNotFoundError(f"VBench full-info JSON {str(info)!r} not found: give --full-info")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    bench = VBench(device, str(info), str(out_dir))
    for dim in dimensions or T2V_DIMENSIONS:  # one file per dimension: a crash keeps the finished ones
        if (out_dir / f"{dim}_eval_results.json").exists():
            continue
        bench.evaluate(videos_path=str(video_dir), name=dim, dimension_list=[dim], mode="vbench_standard",
                       imaging_quality_preprocessing_mode="longer")  # fmt: skip
    return out_dir
