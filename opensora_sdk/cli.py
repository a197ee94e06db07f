"""The `opensora` command: `generate` videos, print the `info` of a generation.

    opensora generate --prompt "a red circle moving right on a black background"
    opensora generate --preset v1.2 --prompt "a red panda eating bamboo" --num-frames 4s --resolution 240p
    opensora generate --preset tiny-random --prompt "a cat" --image-size 64 64 --num-frames 17
    opensora info --preset v1.2 --prompt "a cat" --resolution 720p --num-frames 16s --loop 2

Without --preset, --model, --vae or --text-encoder the built-in model is used
(`pipeline.BUILTIN_PRESET`: tiny, trained on synthetic moving shapes, inside the package, offline).
Size, length, frame rate, steps and guidance left out come from the preset's defaults (the
built-in model: 64x64, 17 frames at 8 fps, its own steps and guidance), else the official ones
(240p 9:16, 4s, 24 fps, 30, 7.0).

The options are the official inference script's (spec 6.2) plus model paths, `--preset`,
`--negative-prompt`, `--offload` and `--align`. Both commands resolve and check every option
first (`opensora_sdk.plan.plan_generation`), so bad input fails before any weight is read;
`generate` also checks that each output path can be written before loading the models.

Subcommands are registered in `SUBCOMMANDS`; each entry adds its parser and names the
function that runs it. Implementations that live outside the SDK are imported only when
their command runs (see `lazy`), so `opensora --help` never imports them.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from pathlib import Path
from typing import Callable

from opensora_sdk import cli_refine

EXIT_USAGE = 2
EXIT_INTERRUPTED = 130
DTYPE_CHOICES = ("auto", "fp32", "bf16", "fp16")


def lazy(module: str, function: str) -> Callable[[argparse.Namespace], int]:
    """A command function imported from `module` when the command runs."""

    def run(args: argparse.Namespace) -> int:
        return getattr(importlib.import_module(module), function)(args)

    return run


# --------------------------------------------------------------------------------------------
# Options shared by generate and info
# --------------------------------------------------------------------------------------------


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


def _read_prompts(args) -> list[str]:
    for flag, value in (("--start-index", args.start_index), ("--end-index", args.end_index)):
        if value is not None and value < 0:
            raise ValueError(f"{flag} {value}: expected an integer >= 0")
    if args.prompt and args.prompt_path:
        raise ValueError("give --prompt or --prompt-path, not both")
    if args.prompt:
        return list(args.prompt)
    if not args.prompt_path:
        raise ValueError("no prompt: give --prompt TEXT [TEXT ...] or --prompt-path FILE")
    path = Path(args.prompt_path)
    if not path.is_file():
        raise FileNotFoundError(f"--prompt-path {args.prompt_path!r}: file not found")
    lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
    prompts = [line for line in lines if line][args.start_index : args.end_index]
    if not prompts:
        raise ValueError(
            f"--prompt-path {args.prompt_path!r} has no prompts in [{args.start_index}:{args.end_index}] "
            "(blank lines are skipped)"
        )
    return prompts


def _one_or_list(values):
    if not values:
        return None
    return values[0] if len(values) == 1 else list(values)


def _apply_generation_card(args) -> dict:
    """--model FOLDER with a generation.json (a training checkpoint, see
    `opensora_sdk.presets.generation_card`): its VAE and text encoder fill a missing --vae /
    --text-encoder, its defaults go over the preset's. Returns the card ({} without one)."""
    if not hasattr(args, "_generation_card"):
        from opensora_sdk.presets import generation_card

        card = (generation_card(args.model) if args.model and not args.preset else None) or {}
        for key in ("vae", "text_encoder"):
            if getattr(args, key) is None and card.get(key):
                setattr(args, key, card[key])
        args._generation_card = card
    return args._generation_card


def _preset_name(args) -> str:
    """--preset, else the official preset of the family --model belongs to (v1.2, v1.1 or v1.0,
    recognised from its config.json or its keys; it brings that family's defaults and fills
    the missing components), else the built-in model (whose other parts --vae or
    --text-encoder alone keep)."""
    from opensora_sdk.configs import STDIT_CHECKPOINTS
    from opensora_sdk.models.auto import TRANSFORMER_FAMILIES, transformer_kind
    from opensora_sdk.presets import BUILTIN_PRESET

    if args.preset:
        return args.preset
    if not args.model:
        return BUILTIN_PRESET
    if not Path(args.model).expanduser().exists():
        return "v1.2"  # a hub id: looked at when it is loaded
    family = TRANSFORMER_FAMILIES[transformer_kind(args.model, local_files_only=True)]
    if family == "v1.0":
        return {"OpenSora-v1-16x512x512": "v1.0-hq-512"}.get(STDIT_CHECKPOINTS.get(Path(args.model).name, ""), "v1.0")
    return family


def _check_sources(configs, args) -> None:
    """Before any weight is read: the given weight files are whole, and the parts fit together."""
    from opensora_sdk.loading import CheckpointError, check_weight_files, looks_like_repo_id, resolve_checkpoint

    for kind, option in (("transformer", args.model), ("vae", args.vae), ("text_encoder", args.text_encoder)):
        if option is None or (not Path(option).expanduser().exists() and looks_like_repo_id(option)):
            continue  # a hub id is checked when it is resolved
        try:
            check_weight_files(resolve_checkpoint(option).weight_files)
        except CheckpointError as err:
            flag = "--" + kind.replace("_", "-").replace("transformer", "model")
            raise CheckpointError(f"{flag} {option!r}: {err}") from None
    from opensora_sdk.families import family_of
    from opensora_sdk.presets import get_preset

    preset = _preset_name(args)
    found, wanted = family_of(configs.transformer).name, get_preset(preset).family.name
    if found != wanted:
        raise ValueError(
            f"--model {configs.sources['transformer']!r} is an Open-Sora {found} transformer but --preset {preset} is "
            f"Open-Sora {wanted}; leave --preset out (the model's family is recognised) or pick a {found} preset"
        )
    t, te = configs.transformer, configs.text_encoder
    d_model = te.get("d_model")
    if d_model is not None and d_model != t.caption_channels:
        raise ValueError(
            f"the transformer ({configs.sources['transformer']}) takes {t.caption_channels}-channel text embeddings "
            f"but the text encoder ({configs.sources['text_encoder']}) gives {d_model}: give --model and "
            "--text-encoder that belong together (the released transformers go with T5-XXL, 4096 channels), or "
            "--preset v1.2 for the official three"
        )


def _plan_kwargs(args, configs) -> dict:
    """Every argument of `plan_generation`: the options, with the preset's defaults filled in
    (a fixed-size v1.0 model's own size and length first)."""
    from opensora_sdk.presets import get_preset, resolve_defaults

    preset = get_preset(_preset_name(args))
    defaults = {**preset.defaults, **(_apply_generation_card(args).get("defaults") or {})}
    fixed = configs.facts.fixed_latent_size
    if fixed is not None:
        f = configs.facts.space_factor
        defaults.update(num_frames=fixed[0], height=fixed[1] * f, width=fixed[2] * f)
    height, width = args.image_size or (None, None)
    sized = resolve_defaults(
        defaults, preset.family, loop=args.loop, sampler=args.sampler, resolution=args.resolution,
        aspect_ratio=args.aspect_ratio, height=height, width=width, num_frames=args.num_frames, fps=args.fps, num_steps=args.num_sampling_steps,
        guidance_scale=args.cfg_scale, **({} if args.align == "default" else {"align": args.align}),
        **({} if args.aes == "default" else {"aesthetic_score": args.aes}),
    )
    return dict(
        **sized,
        timestep_warp=True,
        sampler=args.sampler,
        cache=_step_cache_arg(args),
        conditions=(),
        reference_path=_one_or_list(args.reference_path),
        mask_strategy=_one_or_list(args.mask_strategy),
        seed=args.seed,
        loop=args.loop,
        condition_frame_length=args.condition_frame_length,
        condition_frame_edit=args.condition_frame_edit,
        batch_size=args.batch_size,
        family=preset.family,
    )


def _step_cache_arg(args):
    """--cache as a step-cache config (None: off); a bad value is one line naming --cache."""
    from opensora_sdk.step_cache import parse_cache

    value = getattr(args, "cache", None)
    try:
        return parse_cache(value)
    except ValueError as err:
        message = str(err).replace(f"cache={value!r}", f"--cache {value}", 1).replace(", or a TeaCacheConfig / PABConfig", "")
        raise ValueError(message) from None


def _device_and_dtype(args, *, available: bool = True):
    """--device and --dtype; `available`: the device must exist here (not for `info`, which
    only estimates for it)."""
    import torch

    from opensora_sdk.models.text_encoder import resolve_dtype
    from opensora_sdk.placement import check_device, default_device, default_dtype

    if args.device == "auto":
        device = default_device()
    elif available:
        device = check_device(args.device, "--device")
    else:
        try:
            device = torch.device(args.device)
        except (RuntimeError, TypeError):
            raise ValueError(f"--device {args.device!r} is not a device: use cpu, cuda, cuda:N or mps") from None
    dtype = default_dtype(device) if args.dtype == "auto" else resolve_dtype(args.dtype)
    return device, dtype


def _configs_and_plan(args, prompts: list[str] | None = None, num_sample: int = 1):
    """The architectures (from configs, no weights) and the one plan of this command.
    `prompts`: instead of --prompt / --prompt-path; `num_sample`: each prompt (and its
    per-prompt references) repeated that many times in a row, seeds consecutive."""
    from opensora_sdk.diffusers_compat import repeat_per_prompt
    from opensora_sdk.plan import plan_generation, plan_prompts
    from opensora_sdk.presets import get_preset, model_configs

    _apply_generation_card(args)
    if args.preset and (args.model or args.vae or args.text_encoder):
        p = get_preset(args.preset)
        if not all(isinstance(v, str) for v in (p.transformer, p.vae, p.text_encoder)):
            raise ValueError(
                f"--preset {args.preset} builds random weights; it cannot be combined with --model, --vae or "
                "--text-encoder (leave --preset out to load those)"
            )
    configs = model_configs(_preset_name(args), model=args.model, vae=args.vae, text_encoder=args.text_encoder)
    if _apply_generation_card(args).get("max_latent_frames") is not None:  # a checkpoint's own clip-length limit
        configs.max_latent_frames = args._generation_card["max_latent_frames"]
    _check_sources(configs, args)
    kwargs = _plan_kwargs(args, configs)
    texts, _, kwargs["reference_path"], kwargs["mask_strategy"] = repeat_per_prompt(
        num_sample, _read_prompts(args) if prompts is None else prompts, (), kwargs["reference_path"],
        kwargs["mask_strategy"],
    )
    prompts = plan_prompts(texts, negative_prompt=args.negative_prompt,
                           aesthetic_score=kwargs.pop("aesthetic_score"), motion_score=args.flow,
                           camera_motion=args.camera_motion)
    plan = plan_generation(configs.facts, prompts, **kwargs)
    return configs, plan


# --------------------------------------------------------------------------------------------
# generate
# --------------------------------------------------------------------------------------------


def _load_pipeline(args, device, dtype, sp_group=None):
    from opensora_sdk.models.vae_tiling import SpatialTiling
    from opensora_sdk.pipeline import OpenSoraPipeline
    from opensora_sdk.presets import get_preset

    kwargs = dict(
        device=device, dtype=dtype, offload=None if args.offload == "none" else args.offload,
        local_files_only=args.local_files_only or None,
        vae_tiling=SpatialTiling(*args.vae_tiling) if args.vae_tiling else None, sp_group=sp_group,
    )
    # with --lora, fp8 comes after the adapters are fused (`_fp8_after_loras`)
    kwargs.update(fp8=getattr(args, "fp8", False) and not getattr(args, "lora", None),
                  block_swap=getattr(args, "block_swap", None))
    if getattr(args, "compile", False):
        kwargs["compile"] = True
    if getattr(args, "vae_dtype", None):
        kwargs["vae_dtype"] = args.vae_dtype
    card = _apply_generation_card(args)
    name = _preset_name(args)
    preset = get_preset(name)
    if not (args.model or args.vae or args.text_encoder):
        return OpenSoraPipeline.from_preset(name, **kwargs)
    limit = card["max_latent_frames"] if card.get("max_latent_frames") is not None else preset.latent_frame_limit
    return OpenSoraPipeline.from_pretrained(
        args.model or preset.transformer, args.vae or preset.vae, args.text_encoder or preset.text_encoder,
        defaults={**preset.defaults, **(card.get("defaults") or {})}, max_latent_frames=limit, family=preset.family,
        **kwargs,
    )


def _check_memory_args(args, configs) -> None:
    """--block-swap and --offload against each other and the transformer's block count."""
    from opensora_sdk.offload import block_count, check_block_swap

    if getattr(args, "compile", False) and (args.block_swap is not None or args.offload == "sequential"):
        raise ValueError("--compile does not combine with --block-swap or --offload sequential (they hook every "
                         "block); pick one")
    if args.block_swap is None:
        return
    check_block_swap(args.block_swap, block_count(configs.transformer), "--block-swap")
    if args.offload == "sequential":
        raise ValueError("--block-swap and --offload sequential exclude each other: sequential offload already "
                         "streams every block")


def _fp8_after_loras(args, pipe) -> None:
    """--fp8 with --lora: the adapters are fused into the full-precision weights, then those are
    stored in fp8 (a LoRA cannot wrap an fp8 layer)."""
    if getattr(args, "fp8", False) and getattr(args, "lora", None):
        pipe.fuse_lora()
        pipe.unload_lora_weights()
        pipe.enable_fp8()


def _check_loras(args) -> None:
    """--lora files: readable LoRA adapters, before any model is loaded (the fit to the model is
    checked when each is applied)."""
    from opensora_sdk.lora import read_metadata

    for path, _ in getattr(args, "lora", None) or []:
        read_metadata(path)


def _load_loras(args, pipe) -> None:
    for path, scale in getattr(args, "lora", None) or []:
        name = pipe.load_lora_weights(path, scale=scale)
        if args.verbose >= 1:
            print(f"LoRA {name}: {path} (scale {scale:g})", file=sys.stderr)


def _check_models_fit(configs, pipe) -> None:
    """The plan was made from configs; the loaded models must have the geometry it assumed."""
    if pipe.facts != configs.facts:
        raise ValueError(
            f"the loaded models do not match the architecture the options were checked against ({pipe.facts} "
            f"loaded, {configs.facts} planned); give model folders with their config.json"
        )


def _output_fps(args, plan) -> float | None:
    """--save-fps, else fps / --frame-interval when given, else None (the plan's: fps / the
    family's frame interval)."""
    from opensora_sdk.families import FAMILIES

    if args.save_fps is not None:
        return float(args.save_fps)
    if args.frame_interval is not None:
        return plan.fps * FAMILIES[plan.family].frame_interval / args.frame_interval
    return None


def cmd_generate(args: argparse.Namespace) -> int:
    device, dtype = _device_and_dtype(args)
    # ---- torchrun (WORLD_SIZE > 1): STDiT3 sharded over all ranks, rank 0 writes -------------
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return _generate(args, None, device, dtype)
    from opensora_sdk import distributed

    proc = distributed.init_from_env(backend="gloo" if device.type == "cpu" else None)
    try:
        return _generate(args, proc, device if device.type != proc.device.type else proc.device, dtype)
    finally:  # every rank leaves the group, also after an error (no wait once a rank failed)
        distributed.shutdown()


def _generate(args: argparse.Namespace, proc, device, dtype) -> int:
    """`opensora generate` in this process; `proc` (a ProcessInfo) under torchrun, else None."""
    import dataclasses
    import time
    from contextlib import nullcontext

    from opensora_sdk import outputs
    from opensora_sdk.generation import Timings
    from opensora_sdk.video_io import check_writable

    is_main = proc is None or proc.is_main
    for flag, value in (("--num-sample", args.num_sample), ("--frame-interval", args.frame_interval)):
        if value is not None and value < 1:
            raise ValueError(f"{flag} {value}: expected an integer >= 1")
    if args.save_fps is not None and not args.save_fps > 0:
        raise ValueError(f"--save-fps {args.save_fps}: expected a positive number")
    watermark = None if args.watermark is None else outputs.check_watermark_image(args.watermark)
    endpoint = cli_refine.endpoint(args) if args.llm_refine else None  # a missing key fails here
    originals = _read_prompts(args)
    # every option is checked before the LLM or a model runs (an empty prompt, which the LLM
    # replaces by a random one, checked as a stand-in)
    stand_in = [p if p.strip() or endpoint is None else "a video" for p in originals]
    configs, plan = _configs_and_plan(args, stand_in, args.num_sample)
    _check_memory_args(args, configs)
    names = outputs.sample_file_names(
        originals, num_sample=args.num_sample, sample_name=args.sample_name, start_index=args.start_index,
        prompt_as_path=args.prompt_as_path, suffix=".png" if plan.total_frames == 1 else ".mp4",
    )
    paths = [Path(args.save_dir) / name for name in names]
    keep = [k for k, path in enumerate(paths) if not (args.prompt_as_path and path.exists())]
    say = is_main and args.verbose >= 1
    if say and len(keep) < len(paths):
        print(f"skipping {len(paths) - len(keep)} of {len(paths)} video(s): their files exist (--prompt-as-path)",
              file=sys.stderr)
    if not keep:
        return 0
    if is_main:
        try:
            Path(args.save_dir).mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise ValueError(f"--save-dir {args.save_dir!r}: cannot create the folder ({e.strerror})") from e
        for k in keep:
            check_writable(paths[k], num_frames=plan.total_frames)
    texts = originals
    if endpoint is not None:
        which = {k // args.num_sample for k in keep}
        texts = cli_refine.refine_prompts(args, endpoint, originals, which, say, proc)
        configs, plan = _configs_and_plan(args, texts, args.num_sample)
    # skipped samples leave the plan; the others keep the seeds they have in a full run
    plan = dataclasses.replace(plan, samples=[plan.samples[k] for k in keep])
    paths = [paths[k] for k in keep]

    if is_main and args.verbose >= 2:
        print(plan.summary(), file=sys.stderr)
    _check_loras(args)
    t_load = time.perf_counter()
    pipe = _load_pipeline(args, device, dtype, sp_group=None if proc is None else proc.group)
    _load_loras(args, pipe)
    _fp8_after_loras(args, pipe)
    if proc is not None:
        pipe.transformer.set_sequence_parallel_group(proc.group, args.sp_mode)
    _check_models_fit(configs, pipe)
    timings = Timings(load=time.perf_counter() - t_load)
    from opensora_sdk.fail_together import fail_together

    together = nullcontext() if proc is None else fail_together(proc.group)
    with together:  # a failure on any rank (a write error on rank 0 too) ends every rank
        plan = pipe.agree(plan)  # rank 0's seeds when --seed random
        if say:
            print(f"generating {plan.num_samples} video(s): {plan.height}x{plan.width}, {plan.total_frames} frames, "
                  f"seeds {plan.seeds}" + (f", {proc.world_size} processes" if proc else ""), file=sys.stderr)
        videos = pipe.generate(plan, progress=say and not args.no_progress, timings=timings)
        if is_main:
            fps = _output_fps(args, plan)
            with timings.stage("save"):
                for video, path, sample in zip(videos, paths, plan.samples):
                    if fps is not None:
                        video.fps = fps
                    if endpoint is not None:
                        video.metadata["original_prompt"] = originals[sample.index // args.num_sample]
                        video.metadata["refined_prompt"] = sample.prompt
                    print(video.save(path))
                    if watermark is not None and path.suffix == ".mp4":
                        print(outputs.add_watermark(path, watermark))
    if say:
        stages = ", ".join(f"{k} {v:.1f} s" for k, v in timings.items())
        print(f"done in {sum(timings.values()):.1f} s ({stages})", file=sys.stderr)
        if timings.cache_stats is not None:
            print(timings.cache_stats.summary(), file=sys.stderr)
    return 0


# --------------------------------------------------------------------------------------------
# info
# --------------------------------------------------------------------------------------------


def cmd_info(args: argparse.Namespace) -> int:
    from opensora_sdk.estimates import estimate_memory

    device, dtype = _device_and_dtype(args, available=False)
    configs, plan = _configs_and_plan(args)
    _check_memory_args(args, configs)
    memory = estimate_memory(
        plan, configs.transformer, configs.vae, configs.text_encoder, dtype=dtype,
        offload=None if args.offload == "none" else args.offload, device_type=device.type,
        fp8=args.fp8, block_swap=args.block_swap,
    )
    print(plan.summary())
    print(f"device:         {device} ({str(dtype).removeprefix('torch.')} for the transformer and the VAE, T5 float32)")
    for line in memory.lines():
        print(f"memory:         {line}")
    from opensora_sdk.estimates import estimate_modes, gib

    swap = args.block_swap or 0
    modes = estimate_modes(plan, configs.transformer, configs.vae, configs.text_encoder, block_swap=swap)
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
    g.add_argument("--save-dir", default="./samples/samples/",
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


# Each entry adds one subcommand. A command implemented outside the SDK registers a parser
# whose func is `lazy("package.module", "function")`, e.g. the ComfyUI workflow runner:
#     p = sub.add_parser("workflow", ...); p.set_defaults(func=lazy("comfy_nodes.headless", "cmd_workflow_run"))
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


def main(argv: list[str] | None = None) -> int:
    from opensora_sdk.loading import CheckpointError

    try:
        args = build_parser().parse_args(argv)
    except SystemExit as done:  # --help, or a one-line usage error (already printed)
        return done.code if isinstance(done.code, int) else EXIT_USAGE
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print("opensora: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except (ValueError, TypeError, OSError, CheckpointError) as err:
        if getattr(args, "debug", False):
            raise
        message = " ".join(str(err).split("\n")) or type(err).__name__
        print(f"opensora {args.command}: error: {message}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
