"""The `opensora generate` command: load the pipeline (LoRA adapters, fp8), generate the plan
and save the videos, in one process or under torchrun."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from opensora_sdk import cli_refine
from opensora_sdk.cli_plan import (
    _apply_generation_card,
    _check_memory_args,
    _configs_and_plan,
    _device_and_dtype,
    _preset_name,
    _read_prompts,
)


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
    kwargs["text_cache"] = _text_cache(args)
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


def _text_cache(args):
    """--text-cache: an `EmbeddingCache` on its folder (default `default_cache_folder()`), or
    None for 'none' / 'off'."""
    from opensora_sdk.models.text_cache import EmbeddingCache, default_cache_folder

    value = getattr(args, "text_cache", None)
    if value is not None and value.strip().lower() in ("none", "off"):
        return None
    folder = Path(value).expanduser() if value is not None else default_cache_folder()
    if folder is None:
        return None
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"--text-cache {str(folder)!r}: not a folder; give a folder or 'none'")
    return EmbeddingCache(folder=folder)


def texts_in_cache(args, configs, plan, device):
    """(texts of `plan` in the text cache, distinct texts, its folder) for the T5 these options
    load, or None when there is no cache or the T5 files are not here (a hub id not yet
    downloaded). Loads no model: the T5 folder is only checked and fingerprinted."""
    from opensora_sdk.generation import plan_texts
    from opensora_sdk.loading import CheckpointError
    from opensora_sdk.models import T5TextEncoder
    from opensora_sdk.presets import get_preset

    cache = _text_cache(args)
    source = args.text_encoder or get_preset(_preset_name(args)).text_encoder
    if cache is None or not isinstance(source, str):
        return None
    try:
        encoder = T5TextEncoder.from_pretrained(source, model_max_length=configs.transformer.model_max_length,
                                                local_files_only=True, cache=cache, lazy=True)
    except (CheckpointError, OSError, ValueError):
        return None
    texts = list(dict.fromkeys(plan_texts(plan)))
    return len(encoder.lookup(texts, device)), len(texts), cache.folder


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
    from opensora_sdk.cli import flush_notes
    from opensora_sdk.generation import Timings
    from opensora_sdk.video_io import check_writable

    is_main = proc is None or proc.is_main
    for flag, value in (("--num-sample", args.num_sample), ("--frame-interval", args.frame_interval)):
        if value is not None and value < 1:
            raise ValueError(f"{flag} {value}: expected an integer >= 1")
    if args.save_fps is not None and not args.save_fps > 0:
        raise ValueError(f"--save-fps {args.save_fps}: expected a positive number")
    watermark = None if args.watermark is None else outputs.check_watermark_image(args.watermark)
    if args.output and (args.save_dir or args.sample_name or args.prompt_as_path):
        raise ValueError("--output names the file itself: leave out --save-dir, --sample-name and --prompt-as-path")
    save_dir = args.save_dir or outputs.DEFAULT_SAVE_DIR
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
    paths = outputs.output_paths(args.output, len(names)) if args.output else [Path(save_dir) / n for n in names]
    keep = [k for k, path in enumerate(paths) if not (args.prompt_as_path and path.exists())]
    say = is_main and args.verbose >= 1
    if say and len(keep) < len(paths):
        print(f"skipping {len(paths) - len(keep)} of {len(paths)} video(s): their files exist (--prompt-as-path)",
              file=sys.stderr)
    if not keep:
        return 0
    if is_main:
        flag, folder = ("--output", paths[0].parent) if args.output else ("--save-dir", Path(save_dir))
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise ValueError(f"{flag} {str(folder)!r}: cannot create the folder ({e.strerror})") from e
        for k in keep:
            try:
                check_writable(paths[k], num_frames=plan.total_frames)
            except (ValueError, OSError) as e:
                raise type(e)(f"{flag}: {e}") from None
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
        if is_main:
            flush_notes()  # before the long part
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
        if timings.texts is not None:
            found, total = timings.texts
            print(f"text cache: {found} of {total} prompt(s) found in {pipe.text_encoder.cache.folder}"
                  + ("; T5 was not loaded" if not pipe.text_encoder.is_loaded else ""), file=sys.stderr)
    return 0
