"""Writes the template thumbnails: runs each workflow headless and keeps frames of its output
(deterministic: the workflows fix their seeds; run from the repository root):

    python workflows/inputs/make_thumbnails.py [--models-dir DIR] [NAME ...]

ComfyUI's template browser shows custom-node templates with the thumbnail
"<workflow name>.jpg" beside the JSON (the frontend asks for
/api/workflow_templates/<pack>/<name>.jpg), so each workflows/<name>.json gets a
workflows/<name>.jpg: 2x2 frames of its first saved video (first, one third, two thirds,
last; read left to right, top to bottom), or its image, enlarged to 256x256. A workflow
whose models are not installed (the v1.1 one needs the released v1.1 models; pass their
folder with --models-dir) is skipped with a note, and keeps any thumbnail it has.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
WORKFLOWS = HERE.parent
CELL = 128


def thumbnail(frames: np.ndarray):
    """uint8 frames [N, H, W, 3] -> a PIL image: 2x2 frames of CELL px (one frame: 2 CELL px)."""
    from PIL import Image

    if len(frames) == 1:
        return Image.fromarray(frames[0]).resize((2 * CELL, 2 * CELL), Image.Resampling.BICUBIC)
    from PIL import ImageDraw

    picks = [round(i * (len(frames) - 1) / 3) for i in range(4)]
    sheet = Image.new("RGB", (2 * CELL, 2 * CELL))
    for k, index in enumerate(picks):
        cell = Image.fromarray(frames[index]).resize((CELL, CELL), Image.Resampling.BICUBIC)
        sheet.paste(cell, ((k % 2) * CELL, (k // 2) * CELL))
    draw = ImageDraw.Draw(sheet)  # a light line between the frames (read left to right, top to bottom)
    draw.rectangle((CELL - 1, 0, CELL, 2 * CELL), fill=(200, 200, 200))
    draw.rectangle((0, CELL - 1, 2 * CELL, CELL), fill=(200, 200, 200))
    return sheet


def make(path: Path, models_dir: str | None) -> Path | None:
    """Run one workflow and write its thumbnail; None when it cannot run here."""
    from comfy_nodes import comfy_host as host
    from comfy_nodes import headless
    from opensora_sdk.video_io import read_video

    with tempfile.TemporaryDirectory() as out:
        host.configure(models_dir=models_dir, output_dir=out, input_dir=HERE)
        try:
            _, files = headless.run_workflow(json.loads(path.read_text(encoding="utf-8")))
        except (headless.WorkflowError, headless.NodeFailed) as err:
            print(f"{path.name}: skipped ({' '.join(str(err).split())[:200]})", file=sys.stderr)
            return None
        frames, _ = read_video(sorted(files)[0])
        target = path.with_suffix(".jpg")
        thumbnail(np.asarray(frames)).save(target, quality=85, optimize=True)
    return target


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", help="workflow names (default: all)")
    parser.add_argument("--models-dir", help="ComfyUI-style models folder for workflows that need other models")
    args = parser.parse_args(argv)
    paths = sorted(WORKFLOWS.glob("*.json"))
    if args.names:
        paths = [p for p in paths if p.stem in args.names or p.name in args.names]
    for path in paths:
        target = make(path, args.models_dir)
        if target is not None:
            print(target)
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(WORKFLOWS.parent))
    raise SystemExit(main())
