"""`opensora eval ...`: parsers (light: imported by `opensora --help`) and command functions."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from opensora_sdk.cli_args import DTYPE_CHOICES


def _lazy(module: str, function: str):
    from opensora_sdk.cli import lazy

    return lazy(module, function)


def _model_args(p) -> None:
    g = p.add_argument_group("models (local paths; nothing is downloaded unless a hub id is in the cache)")
    g.add_argument("--preset", default=None, help="builtin (default without --model), v1.2, tiny-random")
    g.add_argument("--model", default=None, help="STDiT3 folder or weight file (e.g. a training checkpoint's ema/)")
    g.add_argument("--vae", default=None, help="VAE folder or weight file")
    g.add_argument("--text-encoder", default=None, help="T5 folder")
    g.add_argument("--dtype", default="auto", choices=DTYPE_CHOICES)
    g.add_argument("--device", default="auto")
    g.add_argument("--no-progress", action="store_true")
    p.set_defaults(local_files_only=True, offload="none", vae_tiling=None, debug=False)


def register(sub) -> None:
    p = sub.add_parser("eval", help="evaluation: vae reconstruction, validation loss, VBench samples and scores")
    acts = p.add_subparsers(dest="eval_command", required=True, metavar="ACTION")

    a = acts.add_parser("vae", help="PSNR / SSIM / LPIPS / FloLPIPS of VAE reconstructions of a meta file's videos")
    a.add_argument("meta", help="meta CSV with a path column")
    a.add_argument("--vae", required=True, help="VAE folder or file (e.g. opensora_sdk/builtin/tiny/vae, OpenSora-VAE-v1.2)")
    a.add_argument("-o", "--output", default=None, help="per-video CSV (default INPUT_vae_eval.csv)")
    a.add_argument("--mode", default="pipeline", choices=("pipeline", "spatial"), help="whole v1.2 VAE, or the 2D autoencoder alone")
    a.add_argument("--num-frames", type=int, default=17)
    a.add_argument("--resolution", type=int, default=256, help="shorter side after resizing (default 256)")
    a.add_argument("--crop-size", type=int, default=None, help="centre crop (default: --resolution)")
    a.add_argument("--sample-rate", type=int, default=1, help="read every n-th frame (default 1)")
    a.add_argument("--lpips-backbone", default=None, help="torchvision AlexNet (or VGG16) weights file: enables LPIPS")
    a.add_argument("--lpips-net", default="alex", choices=("alex", "vgg"))
    a.add_argument("--lpips-lin", default=None, help="LPIPS lin weights (default: the ones inside the lpips package)")
    a.add_argument("--flow", default="none", choices=("none", "farneback"), help="flow for FloLPIPS (needs LPIPS)")
    a.add_argument("--raft", default=None, help="RAFT-large weights file: FloLPIPS with RAFT flow")
    a.add_argument("--dtype", default="fp32", choices=DTYPE_CHOICES[1:])
    a.add_argument("--device", default="auto")
    a.add_argument("--overwrite", action="store_true")
    a.add_argument("--no-progress", action="store_true")
    a.set_defaults(func=_lazy("opensora_sdk.evaluation.cli", "cmd_vae"))

    a = acts.add_parser("loss", help="rectified-flow validation loss per bucket at the ten official timesteps")
    a.add_argument("--data", required=True, help="meta CSV (path, text, num_frames, height, width)")
    a.add_argument("-o", "--output", default=None, help="per-bucket CSV (default DATA_loss.csv)")
    a.add_argument("--buckets", default=None, help="bucket config: JSON / YAML text or file (default: the official eval config)")
    a.add_argument("--extra-resolution", action="append", default=[], metavar="NAME=PIXELS", help="e.g. 64px=4096 (repeatable)")
    a.add_argument("--start-index", type=int, default=0, help="first resolution of the config evaluated")
    a.add_argument("--end-index", type=int, default=None, help="stop before this resolution")
    a.add_argument("--seed", type=int, default=42)
    a.add_argument("--frame-interval", type=int, default=1)
    a.add_argument("--overwrite", action="store_true")
    _model_args(a)
    a.set_defaults(func=_lazy("opensora_sdk.evaluation.cli", "cmd_loss"))

    from opensora_sdk.cli_args import _add_generation_args

    a = acts.add_parser("sample", help="generate samples for VBench / human review (official naming, resumable)")
    _add_generation_args(a)
    g = a.add_argument_group("samples")
    g.add_argument("--save-dir", required=True, help="output folder")
    g.add_argument("--sample-name", default=None, help="file name prefix (default 'sample'; none with --prompt-as-path)")
    g.add_argument("--num-sample", type=int, default=1, help="samples per prompt, named -0, -1, ... (VBench: 5)")
    g.add_argument("--prompt-as-path", action="store_true", help="name each file after its prompt (VBench)")
    g.add_argument("--no-progress", action="store_true")
    a.set_defaults(func=_lazy("opensora_sdk.evaluation.sample", "cmd_sample"))

    a = acts.add_parser("vbench", help="score samples with the vbench package, combine into total / quality / semantic")
    a.add_argument("videos", nargs="?", help="folder of samples (from `opensora eval sample --prompt-as-path --num-sample 5`)")
    a.add_argument("--out", default=None, help="folder of the per-dimension results and the tables")
    a.add_argument("--tabulate", default=None, metavar="DIR", help="only combine the *_eval_results.json in DIR")
    a.add_argument("--i2v", action="store_true", help="the VBench-I2V table")
    a.add_argument("--dimensions", nargs="+", default=None, help="score these dimensions only")
    a.add_argument("--full-info", default=None, help="VBench_full_info.json (default: the one in the vbench package)")
    a.add_argument("--device", default="cuda")
    a.set_defaults(func=_lazy("opensora_sdk.evaluation.cli", "cmd_vbench"))


# --------------------------------------------------------------------------------------------
# Commands
# --------------------------------------------------------------------------------------------


def _device(name: str):
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _print_summary(summary: dict, output) -> None:
    print(json.dumps(summary, indent=2))
    print(f"written: {output}", file=sys.stderr)


def cmd_vae(args: argparse.Namespace) -> int:
    from opensora_sdk.data import table
    from opensora_sdk.dtypes import parse_dtype
    from opensora_sdk.evaluation import metrics, vae_eval
    from opensora_sdk.models.auto import load_vae

    try:
        device = _device(args.device)
        dtype = parse_dtype(args.dtype, "--dtype")
        if not Path(args.vae).expanduser().exists():
            raise FileNotFoundError(f"--vae {args.vae!r} not found: give a local VAE folder or file")
        vae = load_vae(args.vae, dtype=dtype, device=device, local_files_only=True).eval()
        lpips = metrics.LPIPS.from_files(args.lpips_backbone, args.lpips_net, args.lpips_lin).to(device) if args.lpips_backbone else None
        flow = vae_eval.flow_function(args.flow, args.raft, device)
        if flow is not None and lpips is None:
            raise ValueError("FloLPIPS (--flow / --raft) needs LPIPS: give --lpips-backbone too")
    except ImportError as err:
        raise ValueError(str(err)) from err
    output = args.output or table.suffixed(args.meta, "vae_eval")
    settings = {"vae": str(Path(args.vae).resolve()), "lpips": args.lpips_backbone and args.lpips_net, "flow": args.raft or args.flow}
    summary = vae_eval.evaluate(args.meta, vae, output, num_frames=args.num_frames, resolution=args.resolution,
                                crop_size=args.crop_size, sample_rate=args.sample_rate, mode=args.mode,
                                video_metrics=vae_eval.VideoMetrics(lpips, flow), progress=not args.no_progress,
                                overwrite=args.overwrite, settings=settings)  # fmt: skip
    _print_summary(summary, output)
    return 0


def _parse_buckets(text: str | None):
    if not text:
        return None
    import yaml

    source = Path(text).read_text("utf-8") if Path(text).is_file() else text
    data = yaml.safe_load(source)
    if not isinstance(data, dict):
        raise ValueError(f"--buckets {text!r}: expected a mapping {{resolution: {{num_frames: batch_size or [prob, batch_size]}}}}")
    return data


def cmd_loss(args: argparse.Namespace) -> int:
    from opensora_sdk import cli_generate, cli_plan
    from opensora_sdk.data import table
    from opensora_sdk.evaluation import loss

    extra = {}
    for item in args.extra_resolution:
        name, _, pixels = item.partition("=")
        if not pixels.isdigit():
            raise ValueError(f"--extra-resolution {item!r}: expected NAME=PIXELS, e.g. 64px=4096")
        extra[name] = int(pixels)
    buckets = _parse_buckets(args.buckets)
    device, dtype = cli_plan._device_and_dtype(args)
    pipe = cli_generate._load_pipeline(args, device, dtype)
    output = args.output or table.suffixed(args.data, "loss")
    summary = loss.evaluate(pipe, args.data, output, buckets=buckets, extra_resolutions=extra or None,
                            start_index=args.start_index, end_index=args.end_index, seed=args.seed,
                            frame_interval=args.frame_interval, progress=not args.no_progress, overwrite=args.overwrite)  # fmt: skip
    _print_summary(summary, output)
    return 0


def cmd_vbench(args: argparse.Namespace) -> int:
    from opensora_sdk.evaluation import vbench

    try:
        if args.tabulate:
            combined = vbench.tabulate(args.tabulate, args.out, i2v=args.i2v)
        else:
            if not args.videos or not args.out:
                raise ValueError("give VIDEOS and --out to score, or --tabulate DIR to combine existing results")
            if not Path(args.videos).is_dir():
                raise FileNotFoundError(f"{args.videos!r} is not a folder of samples")
            vbench.score_videos(args.videos, args.out, full_info=args.full_info, dimensions=args.dimensions, device=args.device)
            combined = vbench.tabulate(args.out, i2v=args.i2v)
    except ImportError as err:
        raise ValueError(str(err)) from err
    for name, value in combined.items():
        print(f"{name:<26} {value * 100:6.2f}%")
    return 0
