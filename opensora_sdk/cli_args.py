"""The options of `opensora generate`, `info` and `app`: the value parsers (--seed, --aes, --align,
--watermark, --lora) and the argument groups the commands share."""

from __future__ import annotations

import argparse

from opensora_sdk import cli_refine

DTYPE_CHOICES = ("auto", "fp32", "bf16", "fp16")


def _seed(text: str) -> int | None:
    if text == "random":
        return None
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--seed {text!r}: expected an integer >= 0 or 'random'") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"--seed {value}: expected an integer >= 0 or 'random'")
    return value


def _optional_float(name: str):
    def parse(text: str):
        if text in ("default", "none"):
            return None if text == "none" else text
        try:
            return float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} {text!r}: expected a number, 'none' or 'default'") from None

    return parse


def _align(text: str) -> int | str | None:
    if text in ("default", "none"):
        return None if text == "none" else text
    if text.lower() == "none":
        return None
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--align {text!r}: expected a positive integer or 'none'") from None


OFFICIAL_WATERMARK = "assets/images/watermark/watermark.png"  # the official logo, relative to the working folder


def _watermark(text: str) -> str | None:
    """--watermark VALUE: 'true' the official logo, 'false' off, anything else an image path."""
    try:
        return OFFICIAL_WATERMARK if cli_refine.str2bool(text) else None
    except argparse.ArgumentTypeError:
        return text


def _lora_spec(text: str) -> tuple[str, float]:
    """--lora PATH[:SCALE] -> (path, scale); a colon not followed by a number is part of the path."""
    path, sep, scale = text.rpartition(":")
    if sep and path:
        try:
            return path, float(scale)
        except ValueError:
            pass
    return text, 1.0


def _add_generation_args(p: argparse.ArgumentParser) -> None:
    from opensora_sdk.text import CAMERA_MOTIONS

    g = p.add_argument_group("prompts")
    g.add_argument("text", nargs="*", metavar="PROMPT", help="the prompt(s), as --prompt (put them before the options)")
    g.add_argument("--prompt", nargs="+", help="one or more prompts (loop segments '|0|a|1|b' and inline JSON allowed)")
    g.add_argument("--prompt-path", help="a text file with one prompt per line (blank lines are skipped)")
    g.add_argument("--start-index", type=int, default=0,
                   help="first prompt used from --prompt-path (blank lines not counted); file numbering starts here, "
                        "also with --prompt (default 0)")
    g.add_argument("--end-index", type=int, default=None,
                   help="stop before this prompt of --prompt-path (default: after the last)")
    g.add_argument("--negative-prompt", default=None, help="text that replaces the null caption in guidance")

    g = p.add_argument_group("size and length (defaults: the preset's, e.g. the built-in model's native 64x64, 17 frames at 8 fps)")
    g.add_argument("--resolution", default=None, help="size table: 144p 240p 360p 480p 720p 1080p ... (default: preset, else 240p)")
    g.add_argument("--aspect-ratio", default=None, help="H:W, e.g. 9:16 (landscape) or 16:9 (portrait) (default: preset, else 9:16)")
    g.add_argument("--image-size", nargs=2, type=int, metavar=("H", "W"), help="explicit size in pixels (overrides the table)")
    g.add_argument("--num-frames", default=None,
                   help="frames per loop: a number or 2s 4s 8s 16s (51 102 204 408) (default: preset, else 4s)")
    g.add_argument("--fps", type=float, default=None,
                   help="frame rate of the video and of the model's conditioning (default: preset, e.g. 8 for the built-in model, else 24)")
    g.add_argument("--save-fps", type=float, default=None, help="frame rate written to the file (default --fps)")

    g = p.add_argument_group("sampling")
    g.add_argument("--num-sampling-steps", type=int, default=None,
                   help="sampling steps (default: the preset's, else the family's: v1.2 30, v1.1/v1.0 100, dpm-solver 20)")
    g.add_argument("--sampler", default=None, choices=("rflow", "iddpm", "dpm-solver"),
                   help="sampling method (default: the model's own: v1.2 rflow, v1.1/v1.0 iddpm; "
                   "dpm-solver: v1.1/v1.0 only, no references)")
    g.add_argument("--cache", default=None, metavar="METHOD",
                   help="step caching, faster and approximate (v1.2; default off): teacache:THRESHOLD skips the "
                        "transformer at steps whose input barely changed (e.g. teacache:0.1; 0 = exact), pab or "
                        "pab:S,T,X reuses spatial/temporal/cross attention for S/T/X steps mid-schedule")
    g.add_argument("--cfg-scale", type=float, default=None, help="classifier-free guidance scale (default: preset, else 7.0)")
    g.add_argument("--aes", type=_optional_float("--aes"), default="default",
                   help="aesthetic score appended to prompts; 'none': no suffix (default: the model family's, 6.5 for "
                        "v1.2, none for v1.1 and v1.0)")
    g.add_argument("--flow", type=float, default=None, help="motion score appended to prompts (default none)")
    g.add_argument("--camera-motion", default=None, choices=CAMERA_MOTIONS, help="camera motion appended to prompts")
    g.add_argument("--seed", type=_seed, default=42, help="seed of the first sample, +1 per sample; 'random' draws one (default 42)")
    g.add_argument("--batch-size", type=int, default=1, help="prompts sampled together (default 1)")

    g = p.add_argument_group("conditioning and long videos")
    g.add_argument("--reference-path", nargs="+", help="per prompt: image/video paths joined by ';'")
    g.add_argument("--mask-strategy", nargs="+", help="per prompt: loop,ref,ref_start,target_start,length,edit_ratio;...")
    g.add_argument("--loop", type=int, default=1, help="clips generated one after another, each continuing the last (default 1)")
    g.add_argument("--condition-frame-length", type=int, default=5, help="latent frames carried into the next loop (default 5)")
    g.add_argument("--condition-frame-edit", type=float, default=0.0, help="edit ratio of the carried frames (default 0)")
    g.add_argument("--align", type=_align, default="default",
                   help="snap mask-strategy starts to multiples of this many latent frames ('none': exact; default: the "
                        "model family's, 5 for v1.2)")

    _add_model_args(p)


def _add_model_args(p: argparse.ArgumentParser) -> None:
    """Which model runs and how (generate, info and app share these)."""
    g = p.add_argument_group("models and memory")
    g.add_argument("--preset", default=None,
                   help="model preset: builtin (default without --model/--vae/--text-encoder), v1.2 (default for the "
                        "components those options leave out), tiny-random")
    g.add_argument("--model", default=None, help="STDiT3 folder, weight file or hub id")
    g.add_argument("--vae", default=None, help="VAE folder, weight file or hub id")
    g.add_argument("--text-encoder", default=None, help="T5 folder or hub id")
    g.add_argument("--local-files-only", action="store_true", help="never download from the hub")
    g.add_argument("--text-cache", default=None, metavar="DIR",
                   help="folder of prompt embeddings: a prompt encoded before with the same T5 skips T5, which is then "
                        "not even loaded (default: $OPENSORA_TEXT_CACHE, else ~/.cache/opensora_sdk/text; at most "
                        "1 GiB, oldest out first); 'none' turns it off")
    g.add_argument("--dtype", default="auto", choices=DTYPE_CHOICES, help="STDiT3 and VAE dtype (auto: bf16 on GPU, fp32 on CPU)")
    g.add_argument("--vae-dtype", default=None, choices=DTYPE_CHOICES[1:],
                   help="the VAE's own dtype (default: --dtype). bf16 decodes several times faster than fp32 on a CPU "
                        "with AMX or AVX512-BF16 (about 50 dB PSNR from fp32); on other CPUs it is emulated and slower")
    g.add_argument("--device", default="auto", help="cuda, cuda:1, cpu ... (auto: cuda when available)")
    g.add_argument("--offload", default="none", choices=("none", "model", "sequential"),
                   help="'model': each model leaves the GPU after use; 'sequential': also the transformer's and T5's "
                        "blocks come in one at a time (least memory, slow)")
    g.add_argument("--block-swap", type=int, default=None, metavar="N",
                   help="keep N transformer blocks on the GPU and stream the others (and T5's blocks) from host "
                        "memory (same output)")
    g.add_argument("--fp8", action="store_true",
                   help="store the transformer's and T5's Linear weights as float8 e4m3 (per-channel scales), "
                        "computed in the model dtype")
    g.add_argument("--compile", action="store_true",
                   help="torch.compile the transformer's blocks (v1.2): the first generation of each size compiles "
                        "them (slow once), later ones run faster; same output within float rounding")
    g.add_argument("--vae-tiling", nargs=2, type=int, metavar=("TILE", "OVERLAP"), help="decode in spatial tiles (pixels)")
    g.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    g.add_argument("--sp-mode", default="auto", choices=("auto", "ulysses", "allgather_kv", "dsp"),
                   help="under torchrun: how STDiT3 is sharded over the processes (default auto: ulysses when the heads divide)")
