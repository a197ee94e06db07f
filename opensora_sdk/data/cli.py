"""`opensora data ...`: the parsers (imported by `opensora --help`, so nothing heavy here) and
the command functions, which import their implementation when they run."""

from __future__ import annotations

import argparse
import os
import sys


def _lazy(function: str):
    from opensora_sdk.cli import lazy

    return lazy("opensora_sdk.data.cli", function)


def _common(p, *, workers: int | None = 1, output: bool = True) -> None:
    if output:
        p.add_argument("-o", "--output", default=None, help="output CSV (default: the input's name + the official suffix)")
    if workers is not None:
        p.add_argument("--workers", type=int, default=workers, help=f"parallel worker processes (default {workers})")
    p.add_argument("--overwrite", action="store_true", help="drop the partial results of an earlier run instead of continuing it")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def _scoring_args(p) -> None:
    p.add_argument("meta", help="input meta CSV (column path; num_frames used when present)")
    p.add_argument("-o", "--output", default=None, help="output CSV (default: INPUT_<score>.csv)")
    p.add_argument("--batch-size", type=int, default=16, help="rows per model call (default 16)")
    p.add_argument("--workers", type=int, default=4, help="decoding threads per process (default 4)")
    p.add_argument("--device", default="auto", help="cuda, cuda:1, cpu (default: this rank's GPU when there is one)")
    p.add_argument("--overwrite", action="store_true", help="drop the partial results of an earlier run (one process only)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def register(sub) -> None:
    p = sub.add_parser("data", help="data tools: info, scenes, split, aes, motion, ocr, caption, csv, stats")
    acts = p.add_subparsers(dest="data_command", required=True, metavar="ACTION")

    a = acts.add_parser("info", help="scan a folder, list or CSV of videos / images into the training meta format")
    a.add_argument("source", help="a folder (scanned recursively), a .csv / .parquet with a path column, or a text file of paths")
    a.add_argument("--fmin", type=int, default=1, help="leave out files with fewer frames (default 1: unreadable ones)")
    _common(a, workers=os.cpu_count() or 1)
    a.set_defaults(func=_lazy("cmd_info"))

    a = acts.add_parser("scenes", help="shot detection (PySceneDetect AdaptiveDetector, threshold 3.0): adds timestamp")
    a.add_argument("meta", help="meta CSV with a path column")
    _common(a, workers=os.cpu_count() or 1)
    a.set_defaults(func=_lazy("cmd_scenes"))

    a = acts.add_parser("split", help="cut each video's scenes into clips (PyAV re-encode); one row per clip")
    a.add_argument("meta", help="meta CSV with path and timestamp (no timestamp: the whole video is one scene)")
    a.add_argument("--save-dir", required=True, help="folder for the clips")
    a.add_argument("--min-seconds", type=float, default=None, help="skip scenes shorter than this")
    a.add_argument("--max-seconds", type=float, default=None, help="keep at most the first this many seconds of a scene")
    a.add_argument("--target-fps", type=float, default=None, help="resample clips to this frame rate")
    a.add_argument("--shorter-size", type=int, default=1080, help="scale down so the shorter side is at most this (default 1080; 0: never)")
    _common(a, workers=os.cpu_count() or 1)
    a.set_defaults(func=_lazy("cmd_split"))

    a = acts.add_parser("aes", help="aesthetic score: CLIP image encoder + the LAION MLP head (sharded under torchrun)")
    _scoring_args(a)
    a.add_argument("--clip", required=True, help="local folder of a CLIPVisionModelWithProjection (ViT-L/14 officially)")
    a.add_argument("--head", required=True, help="the aesthetic MLP weights (.pth / .safetensors)")
    a.add_argument("--num-frames", type=int, default=3, choices=(1, 2, 3), help="frames scored per video (default 3)")
    a.set_defaults(func=_lazy("cmd_aes"))

    a = acts.add_parser("motion", help="motion score (flow) and camera motion (cmotion) from optical flow (sharded under torchrun)")
    _scoring_args(a)
    a.add_argument("--raft", default=None, help="torchvision RAFT-large weights file (default: OpenCV Farneback, no weights)")
    a.set_defaults(func=_lazy("cmd_motion"))

    a = acts.add_parser("ocr", help="text boxes and text area of frame 10 (needs an OCR package; sharded under torchrun)")
    _scoring_args(a)
    a.add_argument("--ocr-models", default=None, help="easyocr only: the folder of its weights")
    a.set_defaults(func=_lazy("cmd_ocr"))

    a = acts.add_parser("caption", help="captions from an OpenAI-compatible vision endpoint (resumable, rate-limited)")
    a.add_argument("meta", help="meta CSV with a path column")
    a.add_argument("--base-url", default=None, help="API base URL (default $OPENAI_BASE_URL, else OpenAI's)")
    a.add_argument("--model", default=None, help="model name (default $OPENSORA_CAPTION_MODEL, else gpt-4o)")
    a.add_argument("--api-key-env", default="OPENAI_API_KEY", help="environment variable holding the key (default OPENAI_API_KEY)")
    a.add_argument("--prompt", default="video-f3-detail-3ex", help="prompt: video-f3-detail-3ex (default), video, video-text, "
                   "video-f1-detail-3ex, image, image-text")  # fmt: skip
    a.add_argument("--rpm", type=float, default=None, help="at most this many requests per minute")
    a.add_argument("--concurrency", type=int, default=1, help="requests in flight at once (default 1)")
    a.add_argument("--retries", type=int, default=5, help="retries of a request on 429 / 5xx / network errors (default 5)")
    a.add_argument("--max-size", type=int, default=512, help="longer side of the frames sent, in pixels (default 512; 0: as decoded)")
    _common(a, workers=None)
    a.set_defaults(func=_lazy("cmd_caption"))

    a = acts.add_parser("csv", help="filter, merge, deduplicate, shuffle, shard meta files (the official datautil's options)")
    a.add_argument("inputs", nargs="+", help="meta CSVs (globs allowed); several are concatenated")
    a.add_argument("-o", "--output", default=None, help="output CSV (default: the official suffix naming)")
    a.add_argument("--difference", metavar="CSV", help="drop rows whose path is in CSV")
    a.add_argument("--ext", action="store_true", help="keep rows whose file exists")
    a.add_argument("--relpath", metavar="ROOT", help="paths relative to ROOT")
    a.add_argument("--abspath", metavar="ROOT", help="paths joined onto ROOT")
    a.add_argument("--remove-empty-caption", action="store_true")
    a.add_argument("--remove-path-duplication", action="store_true")
    a.add_argument("--remove-text-duplication", action="store_true")
    a.add_argument("--refine-llm-caption", action="store_true", help="strip 'The video shows' style prefixes")
    a.add_argument("--clean-caption", action="store_true", help="the T5 caption cleaner (lower-cases)")
    a.add_argument("--merge-cmotion", action="store_true", help="append ' Camera motion: LABEL.' from the cmotion column")
    a.add_argument("--sort", metavar="COL", help="sort by COL, descending")
    a.add_argument("--sort-ascending", metavar="COL", help="sort by COL, ascending")
    for flag, kind, text in (("--fmin", int, "num_frames >= N"), ("--fmax", int, "num_frames <= N"),
                             ("--fpsmax", float, "fps <= F (images kept)"), ("--hwmax", int, "height*width <= N"),
                             ("--hwmin", int, "height*width >= N"), ("--aesmin", float, "aes >= F"),
                             ("--matchmin", float, "match >= F"), ("--flowmin", float, "flow >= F"),
                             ("--ocrmax", float, "ocr <= F")):  # fmt: skip
        a.add_argument(flag, type=kind, default=None, help=f"keep rows with {text}")
    a.add_argument("--cmotion", nargs="+", metavar="LABEL", help="keep rows whose cmotion is one of these (e.g. static 'pan left')")
    a.add_argument("--img-only", action="store_true")
    a.add_argument("--vid-only", action="store_true")
    a.add_argument("--shuffle", action="store_true")
    a.add_argument("--seed", type=int, default=42)
    a.add_argument("--head", type=int, default=None, help="keep the first N rows")
    a.add_argument("--train-column", action="store_true", help="keep only the training columns")
    a.add_argument("--shard", type=int, default=None, help="split into N near-equal parts NAME_{i}.csv")
    a.set_defaults(func=_lazy("cmd_csv"))

    a = acts.add_parser("stats", help="counts and histograms (PNG) of lengths, sizes and scores")
    a.add_argument("meta")
    a.add_argument("--out-dir", default=None, help="where the PNGs and stats.json go (default INPUT_stats/)")
    a.add_argument("--bins", type=int, default=30)
    a.add_argument("--no-plots", action="store_true")
    a.set_defaults(func=_lazy("cmd_stats"))


# --------------------------------------------------------------------------------------------
# Commands
# --------------------------------------------------------------------------------------------


def _done(result: dict) -> int:
    if result is not None:
        outs = result.get("outputs") or [result["output"]]
        print(f"{result['rows']} rows -> {', '.join(map(str, outs))}", file=sys.stderr)
        for o in outs:
            print(o)
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    from opensora_sdk.data.info import scan

    return _done(scan(args.source, args.output, workers=args.workers, fmin=args.fmin, progress=not args.no_progress,
                      overwrite=args.overwrite))  # fmt: skip


def cmd_scenes(args: argparse.Namespace) -> int:
    from opensora_sdk.data.scenes import detect

    return _done(detect(args.meta, args.output, workers=args.workers, progress=not args.no_progress, overwrite=args.overwrite))


def cmd_split(args: argparse.Namespace) -> int:
    from opensora_sdk.data.scenes import split

    return _done(split(args.meta, args.output, save_dir=args.save_dir, min_seconds=args.min_seconds, max_seconds=args.max_seconds,
                       target_fps=args.target_fps, shorter_size=args.shorter_size or None, workers=args.workers,
                       progress=not args.no_progress, overwrite=args.overwrite))  # fmt: skip


def _run_scorer(scorer, args) -> int:
    from opensora_sdk.data.scoring import run_scores

    return _done(run_scores(scorer, args.meta, args.output, batch_size=args.batch_size, workers=args.workers,
                            progress=not args.no_progress, overwrite=args.overwrite))  # fmt: skip


def cmd_aes(args: argparse.Namespace) -> int:
    from opensora_sdk.data.aesthetic import AestheticScorer

    return _run_scorer(AestheticScorer(args.clip, args.head, num_frames=args.num_frames, device=args.device), args)


def cmd_motion(args: argparse.Namespace) -> int:
    from opensora_sdk.data.motion import MotionScorer

    return _run_scorer(MotionScorer(args.raft, device=args.device), args)


def cmd_ocr(args: argparse.Namespace) -> int:
    from opensora_sdk.data.ocr import OCRScorer

    return _run_scorer(OCRScorer(models_dir=args.ocr_models, device=args.device), args)


def cmd_caption(args: argparse.Namespace) -> int:
    from opensora_sdk.data.caption import Captioner, caption_csv

    key = os.environ.get(args.api_key_env)
    if not key:
        print(f"opensora data caption: note: ${args.api_key_env} is not set; requests go without a key", file=sys.stderr)
    captioner = Captioner(base_url=args.base_url, model=args.model, api_key=key, prompt=args.prompt, retries=args.retries,
                          rpm=args.rpm, max_size=args.max_size or None)  # fmt: skip
    return _done(caption_csv(args.meta, args.output, captioner=captioner, concurrency=args.concurrency,
                             progress=not args.no_progress, overwrite=args.overwrite))  # fmt: skip


def cmd_csv(args: argparse.Namespace) -> int:
    from opensora_sdk.data.csvtools import transform

    return _done(transform(
        args.inputs, args.output, difference=args.difference, ext=args.ext, remove_empty_caption=args.remove_empty_caption,
        remove_path_duplication=args.remove_path_duplication, remove_text_duplication=args.remove_text_duplication,
        relpath=args.relpath, abspath=args.abspath, refine_llm=args.refine_llm_caption, clean_caption=args.clean_caption,
        merge_cmotion=args.merge_cmotion, sort=args.sort, sort_ascending=args.sort_ascending, fmin=args.fmin, fmax=args.fmax,
        fpsmax=args.fpsmax, hwmax=args.hwmax, hwmin=args.hwmin, aesmin=args.aesmin, matchmin=args.matchmin,
        flowmin=args.flowmin, ocrmax=args.ocrmax, cmotion=args.cmotion, img_only=args.img_only, vid_only=args.vid_only,
        shuffle=args.shuffle, seed=args.seed, head=args.head, train_column=args.train_column, shard=args.shard,
    ))  # fmt: skip


def cmd_stats(args: argparse.Namespace) -> int:
    from opensora_sdk.data.stats import format_summary, stats

    summary = stats(args.meta, args.out_dir, bins=args.bins, plots=not args.no_plots)
    print(format_summary(summary))
    print(f"figures in {summary['out_dir']}", file=sys.stderr)
    return 0


def _clear_errors(function):
    """A missing optional package or a refusing endpoint is a one-line error (exit 2), not a traceback."""
    import functools

    @functools.wraps(function)
    def run(args):
        from opensora_sdk.data.caption import CaptionError

        try:
            return function(args)
        except (ImportError, CaptionError) as err:
            raise ValueError(str(err)) from err

    return run


for _name in [n for n in list(globals()) if n.startswith("cmd_")]:
    globals()[_name] = _clear_errors(globals()[_name])
