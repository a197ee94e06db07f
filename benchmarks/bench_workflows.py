"""Does every workflow show what its note says? The built-in model's workflows run headless,
their saved outputs measured without a human.

    python benchmarks/bench_workflows.py                       # every built-in workflow, 6 seeds
    python benchmarks/bench_workflows.py --seeds 2 --workflows text_to_video,lora --json w.json
    python benchmarks/bench_workflows.py --strict              # exit status 1 when a target is missed

Each workflow in workflows/ whose loaders all pick "(built-in)" (the v1.1 one needs real weights
and is skipped) runs with `comfy_nodes.headless.run_workflow` for `--seeds` seeds: seed s, s + 1,
... where s is the workflow's own seed (or `--seed`); only the seed is overridden, every other
setting is the workflow's, so the figures are what a user of the workflow gets. The file of the
first output node (an Open-Sora Save Video, or SaveImage) is read back (`opensora_sdk.video_io`)
and measured with `opensora_sdk.training.shapes_benchmark.analyse_clip`. What the workflow is
follows from its graph; the claim follows from its note:

* text to video: the prompt's colour, shape and direction (read from the Text Encode node);
* text to image (num_frames 1): colour and shape;
* image to video / first + last frame: the first (and last) frame against the input image(s)
  fitted as the workflow fits them (`conditioning.condition_pixels`: the one resize,
  `fit.fit_pixels` -> `video_io.resize_crop`), PSNR; and the prompt's colour;
* video extension: the frames after the carried input clip (the Video Condition's `length`
  latent frames, 5 = 17 video frames) keep the prompt's colour and direction;
* long video: the frames the second loop added (after the first clip's `num_frames`; the video
  has `conditioning.looped_num_frames` frames) keep the second loop's prompt's colour and
  direction (`|0|...|1|...` loop prompts: the text of loop 1);
* LoRA: with the adapter at the workflow's strength the shape is "big" (bench_lora.py's measure:
  bounding-box side >= 0.45 of the frame); strength 0 (the one other override) gives "the model
  as it is" (the note): the same frames as the graph with the LoRA node taken out (a third run
  per seed; saving is deterministic). Whether the base model draws "big" prompts big (the word
  is new to it) is shown for information.

A claim's rate is the share of seeds where it held. Targets: bench_quality.py's for the same
attribute (colour >= 90%, direction >= 80%, first-frame PSNR mean >= 25 dB, used for every
matched frame); the long-video targets for text-to-image colour (>= 90%) and the second parts of extension
and 2-loop videos (colour >= 90%, direction >= 80%); bench_lora.py's for size (>= 80%, both
ways); 100% for "strength 0 = no adapter". Shape has no target there: its rows
are shown for information ("info"). Videos are measured as saved (mp4, crf of the workflow: the
input images come back through it at ~34 dB). The exit status is 0 unless `--strict` is given
and a target is missed.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import re
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from opensora_sdk.training.shapes_benchmark import BUILTIN_STYLE, analyse_clip, psnr

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
WORKFLOWS = ROOT / "workflows"
INPUTS = WORKFLOWS / "inputs"

COLOR_TARGET, DIRECTION_TARGET, PSNR_TARGET_DB = 0.90, 0.80, 25.0  # bench_quality.TARGETS
PSNR_CAP_DB = 100.0  # identical frames (infinite PSNR) count as this much
SAME_VIDEO_DB = PSNR_CAP_DB  # the same frames saved twice decode to the same frames
BUILTIN = "(built-in)"
ATTRIBUTE_NAMES = {"color": "colour", "shape": "shape", "direction": "direction"}
TARGETS = {"color": COLOR_TARGET, "direction": DIRECTION_TARGET, "shape": None}


def _bench_lora():
    """benchmarks/bench_lora.py (its size measure and target), imported from beside this file."""
    spec = importlib.util.spec_from_file_location("bench_lora", HERE / "bench_lora.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# --------------------------------------------------------------------------------------------
# Prompts
# --------------------------------------------------------------------------------------------


def _words(values) -> str:
    return "|".join(re.escape(v) for v in sorted(values, key=len, reverse=True))


def parse_caption(text: str, style=BUILTIN_STYLE) -> dict:
    """The attributes a built-in-model caption asks for ("a [big] [still] red circle moving left
    on a black background") -> {"color", "shape", "direction" ("none" when it names no motion),
    "background" (None when not named), "big"}; ValueError when it names no colour + shape."""
    t = " ".join(text.lower().split())
    obj = re.search(rf"\b({_words(style.colors)})\s+({_words(style.shapes)})\b", t)
    if obj is None:
        raise ValueError(f"prompt {text!r} names no colour + shape of the built-in model "
                         f"(colours {list(style.colors)}, shapes {list(style.shapes)})")  # fmt: skip
    move = re.search(rf"\bmoving\s+({_words(style.directions)})\b", t)
    bg = re.search(rf"\bon an?\s+({_words(style.backgrounds)})\s+background\b", t)
    return {"color": obj.group(1), "shape": obj.group(2), "direction": move.group(1) if move else "none",
            "background": bg.group(1) if bg else None, "big": bool(re.search(r"\bbig\b", t[: obj.start()]))}  # fmt: skip


def loop_prompt(text: str, loop: int) -> str:
    """The prompt loop `loop` of a long video uses (`|0|first|1|second` syntax, or the plain text)."""
    from opensora_sdk.text import parse_loop_prompt, prompt_for_loop

    return prompt_for_loop(parse_loop_prompt(text), loop)


# --------------------------------------------------------------------------------------------
# Claim checkers: frames in, one observation per claim out
# --------------------------------------------------------------------------------------------


def _observation(claim: str, measure: str, want, got, ok: bool, target, **extra) -> dict:
    return {"claim": claim, "measure": measure, "want": want, "got": got, "ok": bool(ok), "target": target, **extra}


def check_attributes(frames: np.ndarray, want: dict, attributes, *, where: str = "", targets=None) -> list[dict]:
    """`analyse_clip(frames)` against the wanted attributes: one observation per attribute
    ("colour = red", "direction = left"...; `where` is appended, e.g. "(2nd loop)")."""
    targets = TARGETS if targets is None else targets
    found = analyse_clip(frames)
    suffix = f" {where}" if where else ""
    return [_observation(f"{ATTRIBUTE_NAMES[a]} = {want[a]}{suffix}", "rate", want[a], found[a], found[a] == want[a],
                         targets.get(a), fill=round(found["fill"], 3) if math.isfinite(found["fill"]) else None,
                         found=round(found["found"], 3))  # fmt: skip
            for a in attributes]  # fmt: skip


def check_frame_match(frame: np.ndarray, reference: np.ndarray, label: str) -> dict:
    """A generated frame against the (fitted) conditioning image: PSNR in dB, ok at >= 25 dB."""
    if frame.shape != reference.shape:
        raise ValueError(f"{label}: frame {frame.shape} and reference {reference.shape} differ in size")
    db = min(psnr(frame, reference), PSNR_CAP_DB)
    return _observation(f"{label} = input image (PSNR)", "psnr_db", PSNR_TARGET_DB, round(db, 2), db >= PSNR_TARGET_DB,
                        PSNR_TARGET_DB)  # fmt: skip


def claims_text_to_video(frames: np.ndarray, prompt: str) -> list[dict]:
    return check_attributes(frames, parse_caption(prompt), ("color", "shape", "direction"))


def claims_text_to_image(frames: np.ndarray, prompt: str) -> list[dict]:
    return check_attributes(frames[:1], parse_caption(prompt), ("color", "shape"))


def claims_conditioned(frames: np.ndarray, prompt: str, references: list[tuple[str, int, np.ndarray]]) -> list[dict]:
    """Image-to-video / first + last frame: each (label, frame index, fitted image) matches, and
    the clip has the prompt's colour."""
    rows = [check_frame_match(frames[index], image, label) for label, index, image in references]
    return rows + check_attributes(frames, parse_caption(prompt), ("color",))


def claims_continuation(frames: np.ndarray, start: int, stop: int | None, prompt: str, where: str) -> list[dict]:
    """Extension / long video: frames[start:stop] (what was added) keep the prompt's colour and
    direction."""
    part = frames[start:stop]
    if len(part) < 4:
        raise ValueError(f"{where}: {len(part)} frames from {start} to {stop} of {len(frames)}; too few to measure")
    return check_attributes(part, parse_caption(prompt), ("color", "direction"), where=where)


def claims_lora(with_adapter: np.ndarray, at_zero: np.ndarray, strength: float,
                no_adapter: np.ndarray | None = None) -> list[dict]:  # fmt: skip
    """The adapter makes the shape "big" (bench_lora's extent >= BIG_EXTENT); at strength 0 the
    size is shown for information (the note claims nothing about it). With `no_adapter` (the same
    graph without the LoRA node) also: strength 0 gives the model as it is (the note's words),
    i.e. the same frames."""
    lora = _bench_lora()
    rows = []
    for frames, label, want, target in ((with_adapter, f"big at strength {strength:g}", "big", lora.TARGET_BIG),
                                        (at_zero, "not big at strength 0", "ordinary", None)):  # fmt: skip
        e = lora.extent(frames)
        got = "big" if e >= lora.BIG_EXTENT else "ordinary"
        rows.append(_observation(label, "rate", want, got, got == want, target, extent=round(e, 3)))
    if no_adapter is not None:
        db = min(psnr(at_zero, no_adapter), PSNR_CAP_DB) if at_zero.shape == no_adapter.shape else 0.0
        rows.append(_observation("strength 0 = no adapter (same video)", "rate", f">= {SAME_VIDEO_DB:g} dB",
                                 round(db, 2), db >= SAME_VIDEO_DB, 1.0))  # fmt: skip
    return rows


# --------------------------------------------------------------------------------------------
# Workflows: what they are, running them, reading what they saved
# --------------------------------------------------------------------------------------------


def api_prompt(data: dict) -> dict:
    from comfy_nodes import headless

    return headless.editor_to_api(data, headless.node_classes()) if headless.is_editor_workflow(data) else data


def note_title(data: dict) -> str:
    """The heading of the workflow's Note ("Open-Sora: text to video"), or ""."""
    for node in data.get("nodes", []):
        if node.get("type") in ("Note", "MarkdownNote"):
            text = (node.get("widgets_values") or [""])[0]
            return text.splitlines()[0].lstrip("# ").strip() if text else ""
    return ""


def _nodes(prompt: dict, class_type: str) -> list[tuple[str, dict]]:
    return sorted(((nid, n) for nid, n in prompt.items() if n["class_type"] == class_type), key=lambda x: int(x[0]))


def _one(prompt: dict, class_type: str) -> tuple[str, dict]:
    found = _nodes(prompt, class_type)
    if len(found) != 1:
        raise ValueError(f"expected one {class_type} node, found {len(found)}")
    return found[0]


def is_builtin(prompt: dict) -> bool:
    """Every loader (model, VAE, text encoder, LoRA) picks the pack's built-in files."""
    loaders = [n for n in prompt.values() if n["class_type"].endswith("Loader")]
    return bool(loaders) and all(next(iter(n["inputs"].values())) == BUILTIN for n in loaders)


def workflow_kind(prompt: dict) -> str:
    """What a workflow is, from its graph."""
    types = [n["class_type"] for n in prompt.values()]
    if "OpenSoraLoraLoader" in types:
        return "lora"
    if "OpenSoraLongVideo" in types:
        return "long video"
    if "OpenSoraVideoCondition" in types:
        return "video extension"
    images = types.count("OpenSoraImageCondition")
    if images:
        return "first + last frame" if images == 2 else "image to video"
    if _one(prompt, "OpenSoraEmptyLatentVideo")[1]["inputs"]["num_frames"] == 1:
        return "text to image"
    return "text to video"


def seed_nodes(prompt: dict) -> list[str]:
    """Ids of the nodes with a seed input (the sampler, or Long Video)."""
    return sorted((nid for nid, n in prompt.items() if "seed" in n["inputs"]), key=int)


def without_node(prompt: dict, node_id: str) -> dict:
    """An API prompt with a model-in, model-out node (the LoRA loader) taken out: what linked to
    its output links to its model input instead (as bypassing it in the editor does)."""
    out = json.loads(json.dumps(prompt))
    source = out.pop(node_id)["inputs"]["model"]
    for node in out.values():
        for name, value in node["inputs"].items():
            if isinstance(value, list) and str(value[0]) == node_id:
                node["inputs"][name] = source
    return out


def run_once(data: dict, sets: list[str]) -> np.ndarray:
    """Run the workflow headless; the frames [N, H, W, 3] of its first output node's file (the
    other files are left where they were saved)."""
    from comfy_nodes import headless
    from opensora_sdk.video_io import IMAGE_SUFFIXES, read_image, read_video

    ui, files = headless.run_workflow(data, sets)
    if not files:
        raise RuntimeError("the workflow saved no file")
    first = sorted(ui, key=int)[0]
    entry = ui[first]["images"][0]
    path = next(f for f in files if f.name == entry["filename"])
    if path.suffix.lower() in IMAGE_SUFFIXES:
        return read_image(path)[None]
    return read_video(path)[0]


def fitted_input_image(prompt: dict, condition_id: str, height: int, width: int) -> np.ndarray:
    """The image an Image Condition node pins, as the sampler sees it: its LoadImage file read as
    the node reads it, fitted by the SDK's one resize (`condition_pixels` -> `fit_pixels`),
    back to uint8 [H, W, 3]."""
    import torch

    from comfy_nodes import comfy_host as host
    from opensora_sdk.conditioning import ImageCondition, condition_pixels
    from opensora_sdk.video_io import read_image

    node = prompt[condition_id]["inputs"]
    source = prompt[str(node["image"][0])]
    if source["class_type"] != "LoadImage":
        raise ValueError(f"node #{condition_id}: its image comes from {source['class_type']}, not LoadImage")
    image = torch.from_numpy(read_image(host.input_directory() / source["inputs"]["image"]).copy())
    pixels = image.float().div(255).permute(2, 0, 1).mul(2).sub(1)  # as OpenSoraImageCondition: [3, H, W] in [-1, 1]
    x = condition_pixels(ImageCondition(pixels, fit=node.get("fit", "crop")), height, width)  # [3, 1, H, W]
    return x[:, 0].clamp(-1, 1).add(1).mul(127.5).round().byte().permute(1, 2, 0).numpy()


def measure_workflow(data: dict, seed: int) -> list[dict]:
    """Run one workflow with one seed; its observations (see the module docstring)."""
    prompt = api_prompt(data)
    kind = workflow_kind(prompt)
    sets = [f"{nid}.seed={seed}" for nid in seed_nodes(prompt)]
    text = _one(prompt, "OpenSoraTextEncode")[1]["inputs"]["prompt"]
    latent = _one(prompt, "OpenSoraEmptyLatentVideo")[1]["inputs"]
    height, width, num_frames = latent["height"], latent["width"], latent["num_frames"]
    frames = run_once(data, sets)
    if kind == "text to video":
        return claims_text_to_video(frames, text)
    if kind == "text to image":
        return claims_text_to_image(frames, text)
    if kind in ("image to video", "first + last frame"):
        refs = []
        for k, (nid, node) in enumerate(_nodes(prompt, "OpenSoraImageCondition")):
            at = node["inputs"]["frame"]
            index = 0 if at == 0 else -1 if at == -1 else None
            if index is None:
                raise ValueError(f"node #{nid} pins latent frame {at}; only 0 (first) and -1 (last) are measured")
            refs.append(("first frame" if index == 0 else "last frame", index,
                         fitted_input_image(prompt, nid, height, width)))  # fmt: skip
        return claims_conditioned(frames, text, refs)
    if kind == "video extension":
        from opensora_sdk.conditioning import condition_pixel_frames

        cond = _one(prompt, "OpenSoraVideoCondition")[1]["inputs"]
        if cond["target_start"] != 0 or not cond["length"] or cond["edit_ratio"] != 0:
            raise ValueError("the video condition does not carry a clip into the start (target_start 0, length > 0, "
                             "edit_ratio 0): not an extension")  # fmt: skip
        return claims_continuation(frames, condition_pixel_frames(cond["length"]), None, text, "(after the input)")
    if kind == "long video":
        from opensora_sdk.conditioning import condition_pixel_frames, looped_num_frames

        node = _one(prompt, "OpenSoraLongVideo")[1]["inputs"]
        loops, carried = node["loops"], node["condition_frames"]
        total = looped_num_frames(num_frames, loops, carried)
        if loops < 2 or len(frames) != total:
            raise ValueError(f"{loops} loops of {num_frames} frames: expected {total} frames, got {len(frames)}")
        stop = 2 * num_frames - condition_pixel_frames(carried)
        return claims_continuation(frames, num_frames, stop, loop_prompt(text, 1), "(2nd loop)")
    if kind == "lora":
        lora_id, lora = _one(prompt, "OpenSoraLoraLoader")
        at_zero = run_once(data, sets + [f"{lora_id}.strength=0"])
        no_adapter = run_once(without_node(prompt, lora_id), sets)
        return claims_lora(frames, at_zero, float(lora["inputs"]["strength"]), no_adapter)
    raise ValueError(f"no claims known for a {kind} workflow")


# --------------------------------------------------------------------------------------------
# Aggregation and report
# --------------------------------------------------------------------------------------------


def aggregate(workflow: str, kind: str, per_seed: dict[int, list[dict]]) -> list[dict]:
    """One row per claim: the rate over seeds (and the mean PSNR for frame matches) against its target."""
    rows: dict[str, dict] = {}
    for seed, observations in per_seed.items():
        for o in observations:
            row = rows.setdefault(o["claim"], {"workflow": workflow, "kind": kind, "claim": o["claim"],
                                               "measure": o["measure"], "target": o["target"], "seeds": []})  # fmt: skip
            row["seeds"].append({"seed": seed, **{k: v for k, v in o.items() if k not in ("claim", "measure", "target")}})
    for row in rows.values():
        oks = [s["ok"] for s in row["seeds"]]
        row["rate"] = float(np.mean(oks))
        if row["measure"] == "psnr_db":
            values = [s["got"] for s in row["seeds"]]
            row["value"] = round(float(np.mean(values)), 2)
            row["min"] = round(float(np.min(values)), 2)
        else:
            row["value"] = row["rate"]
        row["passed"] = None if row["target"] is None else bool(row["value"] >= row["target"])
    return list(rows.values())


def _target_text(row: dict) -> str:
    if row["target"] is None:
        return "-"
    return f">= {row['target']:g} dB" if row["measure"] == "psnr_db" else f">= {row['target']:.0%}"


def _measured_text(row: dict) -> str:
    if row["measure"] == "psnr_db":
        return f"{row['value']:.1f} dB (min {row['min']:.1f})"
    return f"{row['value']:.1%}"


def table(rows: list[dict], seeds: int) -> str:
    head = ("workflow", "claim", f"rate/{seeds}", "measured", "target", "result")
    lines = [(r["workflow"], r["claim"], f"{r['rate']:.0%}", _measured_text(r), _target_text(r),
              "info" if r["passed"] is None else "pass" if r["passed"] else "FAIL") for r in rows]  # fmt: skip
    widths = [max(len(str(x[i])) for x in [head, *lines]) for i in range(len(head))]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    return "\n".join([fmt.format(*head), fmt.format(*("-" * w for w in widths))] + [fmt.format(*x) for x in lines])


def select_workflows(names: str | None) -> tuple[list[Path], dict[str, str]]:
    """(the built-in workflows to run, {skipped workflow: why})."""
    paths, skipped = [], {}
    wanted = None if not names else {n.strip().removeprefix("opensora_").removesuffix(".json") for n in names.split(",")}
    for path in sorted(WORKFLOWS.glob("*.json")):
        short = path.stem.removeprefix("opensora_")
        if wanted is not None and short not in wanted:
            continue
        if not is_builtin(api_prompt(json.loads(path.read_text(encoding="utf-8")))):
            skipped[path.stem] = "its loaders name models that do not ship with the pack"
            continue
        paths.append(path)
    if wanted is not None:
        unknown = wanted - {p.stem.removeprefix("opensora_") for p in WORKFLOWS.glob("*.json")}
        if unknown:
            raise SystemExit(f"bench_workflows: unknown workflow(s) {sorted(unknown)} (in {WORKFLOWS})")
    return paths, skipped


def _run_all(paths: list[Path], first_seed: int | None, count: int, rows: list, workflows: dict) -> None:
    for path in paths:
        data = json.loads(path.read_text(encoding="utf-8"))
        prompt = api_prompt(data)
        kind = workflow_kind(prompt)
        first = int(prompt[seed_nodes(prompt)[0]]["inputs"]["seed"]) if first_seed is None else first_seed
        seeds = list(range(first, first + count))
        t1 = time.perf_counter()
        per_seed = {s: measure_workflow(data, s) for s in seeds}
        rows += aggregate(path.stem, kind, per_seed)
        workflows[path.stem] = {"kind": kind, "note": note_title(data), "seeds": seeds,
                                "seconds": round(time.perf_counter() - t1, 1)}  # fmt: skip


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", type=int, default=6, help="seeds per workflow (default 6)")
    p.add_argument("--seed", type=int, default=None, help="first seed (default: each workflow's own)")
    p.add_argument("--workflows", default=None,
                   help="comma-separated names, e.g. text_to_video,lora (default: every built-in workflow)")
    p.add_argument("--output-dir", default=None, help="keep the saved files here (default: a temporary folder)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--json", default=None, help="write the rows and every seed's observations here")
    p.add_argument("--strict", action="store_true", help="exit status 1 when a target is missed")
    args = p.parse_args(argv)
    if args.seeds < 1:
        p.error("--seeds must be >= 1")
    import torch

    from comfy_nodes import comfy_host as host

    if args.threads:
        torch.set_num_threads(args.threads)
    paths, skipped = select_workflows(args.workflows)
    t0, r0 = time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF)
    rows, workflows = [], {}
    saved = dict(host._settings)  # the folders, put back afterwards (main may run inside another program)
    with tempfile.TemporaryDirectory(prefix="bench_workflows_") as tmp:
        host.configure(output_dir=args.output_dir or tmp, input_dir=INPUTS)
        try:
            _run_all(paths, args.seed, args.seeds, rows, workflows)
        finally:
            host._settings.update(saved)
    r1 = resource.getrusage(resource.RUSAGE_SELF)
    report = {"settings": {"seeds": args.seeds, "first_seed": args.seed if args.seed is not None else "each workflow's own",
                           "threads": torch.get_num_threads(), "strict": args.strict},  # fmt: skip
              "workflows": workflows, "skipped": skipped, "rows": rows}  # fmt: skip
    missed = [f"{r['workflow']}: {r['claim']}" for r in rows if r["passed"] is False]
    report["targets_missed"] = missed
    report["wall_s"] = round(time.perf_counter() - t0, 1)
    report["cpu_s"] = round(r1.ru_utime + r1.ru_stime - r0.ru_utime - r0.ru_stime, 1)
    used = ", ".join(f"{name} {w['seeds'][0]}..{w['seeds'][-1]}" for name, w in workflows.items())
    print(f"built-in model workflows, each with its own settings; {args.seeds} seed(s) each ({used})")
    print(table(rows, args.seeds))
    for name, why in skipped.items():
        print(f"skipped {name}: {why}")
    print(f"targets: {len(rows) - len(missed) - sum(r['passed'] is None for r in rows)} met, {len(missed)} missed"
          + (f" ({'; '.join(missed)})" if missed else ""))
    print(f"{report['wall_s']:.0f} s wall, {report['cpu_s']:.0f} s CPU")
    if args.json:
        from opensora_sdk.loading import write_json_atomic

        write_json_atomic(report, args.json)
    return report


def exit_status(report: dict) -> int:
    return 1 if report["settings"]["strict"] and report["targets_missed"] else 0


if __name__ == "__main__":
    sys.exit(exit_status(main()))
