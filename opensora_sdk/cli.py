"""The `opensora` command: `generate` videos, print the `info` of a generation.

    opensora generate --prompt "a red circle moving right on a black background"
    opensora generate --preset v1.2 --prompt "a red panda eating bamboo" --num-frames 4s --resolution 240p
    opensora generate --preset tiny-random --prompt "a cat" --image-size 64 64 --num-frames 17
    opensora info --preset v1.2 --prompt "a cat" --resolution 720p --num-frames 16s --loop 2

Without --preset, --model, --vae or --text-encoder the built-in model is used
(`presets.BUILTIN_PRESET`: tiny, trained on synthetic moving shapes, inside the package, offline).
Size, length, frame rate, steps and guidance left out come from the preset's defaults (the
built-in model: 64x64, 17 frames at 8 fps, its own steps and guidance), else the official ones
(240p 9:16, 4s, 24 fps, 30, 7.0).

The options are the official inference script's (spec 6.2) plus model paths, `--preset`,
`--negative-prompt`, `--offload` and `--align`. Both commands resolve and check every option
first (`opensora_sdk.plan.plan_generation`), so bad input fails before any weight is read;
`generate` also checks that each output path can be written before loading the models.

The parts: `cli_args` (the options), `cli_plan` (options -> model configs and a checked plan),
`cli_generate` (the `generate` command), `cli_refine` (the `--llm-refine` options).

Subcommands are registered in `SUBCOMMANDS`; each entry adds its parser and names the
function that runs it. Implementations that live outside the SDK are imported only when
their command runs (see `lazy`), so `opensora --help` never imports them.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import warnings
from typing import Callable

from opensora_sdk import cli_refine
from opensora_sdk.cli_args import OFFICIAL_WATERMARK, _add_generation_args, _add_model_args, _lora_spec, _watermark
from opensora_sdk.cli_generate import cmd_generate
from opensora_sdk.cli_plan import _check_memory_args, _configs_and_plan, _device_and_dtype

EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


def lazy(module: str, function: str) -> Callable[[argparse.Namespace], int]:
    """A command function imported from `module` when the command runs."""

    def run(args: argparse.Namespace) -> int:
        return getattr(importlib.import_module(module), function)(args)

    return run


# --------------------------------------------------------------------------------------------
# info
# --------------------------------------------------------------------------------------------


def cmd_info(args: argparse.Namespace) -> int:
    from opensora_sdk.cli_generate import texts_in_cache
    from opensora_sdk.estimates import estimate_memory

    device, dtype = _device_and_dtype(args, available=False)
    configs, plan = _configs_and_plan(args)
    _check_memory_args(args, configs)
    found = texts_in_cache(args, configs, plan, device)
    cached = found is not None and found[0] == found[1]
    memory = estimate_memory(
        plan, configs.transformer, configs.vae, configs.text_encoder, dtype=dtype,
        offload=None if args.offload == "none" else args.offload, device_type=device.type,
        fp8=args.fp8, block_swap=args.block_swap, text_cached=cached,
    )
    print(plan.summary())
    print(f"device:         {device} ({str(dtype).removeprefix('torch.')} for the transformer and the VAE, T5 float32)")
    if found is not None:
        print(f"text cache:     {found[0]} of {found[1]} text(s) in {found[2]}"
              + ("; T5 will not load" if cached else "; T5 loads to encode the others"))
    for line in memory.lines():
        print(f"memory:         {line}")
    from opensora_sdk.estimates import estimate_modes, gib

    swap = args.block_swap or 0
    modes = estimate_modes(plan, configs.transformer, configs.vae, configs.text_encoder, block_swap=swap,
                           text_cached=cached)
    print("memory modes:   estimated peak on a GPU (bf16; T5 bf16): " + ", ".join(
        f"{name}{f' ({swap} blocks on the GPU)' if 'swap' in name else ''} {gib(m.peak)}" for name, m in modes.items()))
    for kind, source in configs.sources.items():
        print(f"{kind + ':':<15} {source}")
    for note in configs.notes:
        print(f"note:           {note}")
    return 0


# --------------------------------------------------------------------------------------------
# The parser
# --------------------------------------------------------------------------------------------


def _register_generate(sub) -> None:
    p = sub.add_parser("generate", help="generate videos from prompts (and references)")
    _add_generation_args(p)
    g = p.add_argument_group("output")
    g.add_argument("-o", "--output", default=None, metavar="FILE",
                   help="write the video to FILE (.mp4, .webm, .gif, .webp; .png for one frame); several videos get "
                        "_0000, _0001, ... before the suffix. Instead of --save-dir, --sample-name, --prompt-as-path")
    g.add_argument("--save-dir", default=None,
                   help="output folder, created if missing (default ./samples/samples/, as the official script)")
    g.add_argument("--sample-name", default=None, help="file name prefix (default 'sample': sample_0000.mp4, ...)")
    g.add_argument("--prompt-as-path", action="store_true",
                   help="name each file after its prompt (characters / \\ : * ? \" < > | become _; cut to 180 bytes) "
                        "and skip the videos whose files exist, so a run can resume (default off)")
    g.add_argument("--num-sample", type=int, default=1, metavar="N",
                   help="videos per prompt, with consecutive seeds; files get -0, -1, ... (default 1)")
    g.add_argument("--frame-interval", type=int, default=None, metavar="N",
                   help="the file plays at fps / N; --save-fps wins (default: the model family's: 1 for v1.2, 3 for "
                        "v1.1 and v1.0)")
    g.add_argument("--watermark", nargs="?", type=_watermark, const=OFFICIAL_WATERMARK, default=None, metavar="IMAGE",
                   help=f"also write <name>_watermark.mp4 with IMAGE on the top-left corner, 10%% of the video height "
                        f"(alone or 'true': {OFFICIAL_WATERMARK}, the official logo's place; default off)")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
    g.add_argument("--verbose", nargs="?", type=int, const=2, default=1, choices=(0, 1, 2), metavar="LEVEL",
                   help="0: print only the saved paths and errors; 1: also progress, refined prompts and timings "
                        "(default); 2 (--verbose alone): also the resolved plan before generating")
    g.add_argument("--quiet", dest="verbose", action="store_const", const=0, help="the same as --verbose 0")
    g = p.add_argument_group("LoRA adapters")
    g.add_argument("--lora", action="append", type=_lora_spec, default=[], metavar="PATH[:SCALE]",
                   help="apply a LoRA adapter (.safetensors: this SDK's, PEFT / diffusers or kohya layout) with SCALE "
                        "(default 1); repeat to stack several")
    cli_refine.add_refine_args(p)
    p.set_defaults(func=cmd_generate)


def _register_info(sub) -> None:
    p = sub.add_parser("info", help="print sizes, latent shape, tokens, memory estimate; loads no model")
    _add_generation_args(p)
    p.set_defaults(func=cmd_info)


def _register_app(sub) -> None:
    p = sub.add_parser("app", help="the web app (Gradio; pip install -e \".[app]\"): the official demo in a browser")
    g = p.add_argument_group("server")
    g.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default 127.0.0.1: this computer only; 0.0.0.0: the whole network)")
    g.add_argument("--port", type=int, default=None, help="port (default: Gradio's, 7860 or the next free one)")
    g.add_argument("--share", action="store_true", help="also open a temporary public gradio.live link (default off)")
    g.add_argument("--output", default="./outputs", help="folder for the generated files (default ./outputs)")
    g.add_argument("--watermark", nargs="?", type=_watermark, const=OFFICIAL_WATERMARK, default=None, metavar="IMAGE",
                   help="also watermark each video with IMAGE (<name>_watermarked.mp4 is shown) (default off)")
    _add_model_args(p)
    cli_refine.add_refine_args(p)
    p.set_defaults(func=lazy("opensora_sdk.app", "cmd_app"))


# A command implemented outside the SDK registers a parser whose func is
# `lazy("package.module", "function")`: its code is imported only when it runs.
def _register_workflow(sub) -> None:
    p = sub.add_parser("workflow", help="run ComfyUI workflows of the Open-Sora nodes without a ComfyUI server")
    runs = p.add_subparsers(dest="workflow_command", required=True, metavar="ACTION")
    r = runs.add_parser("run", help="run an editor or API workflow JSON; prints the saved files")
    r.add_argument("file", help="workflow JSON (editor format as saved by ComfyUI, or API format)")
    r.add_argument("--set", action="append", metavar="NODE.INPUT=VALUE",
                   help="override an input; NODE is a node id or title, VALUE JSON or text (repeatable)")
    r.add_argument("--output-dir", default="output", help="where saved files go (default ./output)")
    r.add_argument("--input-dir", default=None, help="where LoadImage / LoadVideo read (default: inputs/ beside FILE)")
    r.add_argument("--models-dir", default=None, help="folder with diffusion_models/, vae/, text_encoders/, opensora/")
    r.add_argument("--quiet", action="store_true", help="do not print the nodes as they run")
    r.set_defaults(func=lazy("comfy_nodes.headless", "cmd_workflow_run"))


def _register_data(sub) -> None:
    from opensora_sdk.data.cli import register  # parsers only; each action imports its code when it runs

    register(sub)


def _register_eval(sub) -> None:
    from opensora_sdk.evaluation.cli import register

    register(sub)


SUBCOMMANDS: list[Callable] = [_register_generate, _register_info, _register_workflow, _register_app]
SUBCOMMANDS += [_register_data, _register_eval]


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors ("opensora generate: error: ...", exit 2), no usage dump."""

    def error(self, message: str):
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="opensora", description="Open-Sora v1.2 video generation")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for register in SUBCOMMANDS:
        register(sub)
    return parser


class _Notes:
    """The SDK's own UserWarnings during a command (a size rounded, a model used away from its
    native size, a text cache that cannot be written), as ``opensora COMMAND: note: ...`` lines
    without the source line; none with `quiet`. `generate` and `info` hold them until
    `flush_notes()` (before long work starts, and when the command ends well), so a failing
    command prints its one error line alone; other commands (the app's server) print them at
    once. Other warnings show as Python shows them."""

    active = None  # the running command's
    HELD = ("generate", "info")

    def __init__(self, command: str, default, *, debug: bool, quiet: bool):
        self.command, self.default, self.debug, self.quiet = command, default, debug, quiet
        self.hold = command in self.HELD
        self.package = os.path.dirname(os.path.abspath(__file__))
        self.pending: list[str] = []

    def show(self, message, category, filename, lineno, file=None, line=None):
        ours = issubclass(category, UserWarning) and os.path.abspath(filename).startswith(self.package)
        if self.debug or not ours:
            self.default(message, category, filename, lineno, file, line)
        elif not self.quiet and str(message) not in self.pending:
            self.pending.append(str(message))
            if not self.hold:
                self.flush()

    def flush(self) -> None:
        for message in self.pending:
            print(f"opensora {self.command}: note: {message}", file=sys.stderr)
        self.pending = []


def flush_notes() -> None:
    """Print the notes the running command has gathered (see `_Notes`)."""
    if _Notes.active is not None:
        _Notes.active.flush()


def main(argv: list[str] | None = None) -> int:
    from opensora_sdk.loading import CheckpointError

    try:
        args = build_parser().parse_args(argv)
    except SystemExit as done:  # --help, or a one-line usage error (already printed)
        return done.code if isinstance(done.code, int) else EXIT_USAGE
    try:
        with warnings.catch_warnings():  # the SDK's notes as one line each (restored afterwards)
            notes = _Notes(args.command, warnings.showwarning, debug=getattr(args, "debug", False),
                           quiet=getattr(args, "verbose", 1) == 0)
            warnings.simplefilter("always", UserWarning)  # each note once per command, not once per process
            warnings.showwarning, _Notes.active = notes.show, notes
            code = args.func(args)
            notes.flush()
            return code
    except KeyboardInterrupt:
        print("opensora: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except (ValueError, TypeError, OSError, CheckpointError) as err:
        if getattr(args, "debug", False):
            raise
        message = " ".join(str(err).split("\n")) or type(err).__name__
        print(f"opensora {args.command}: error: {message}", file=sys.stderr)
        return EXIT_USAGE
    finally:
        _Notes.active = None


if __name__ == "__main__":
    sys.exit(main())
