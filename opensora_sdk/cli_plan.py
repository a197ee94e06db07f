"""The options of `opensora generate` and `info` resolved into model configs (no weights) and
one checked plan, before any weight is read; `opensora eval sample` uses them too."""

from __future__ import annotations

from pathlib import Path


def _read_prompts(args) -> list[str]:
    for flag, value in (("--start-index", args.start_index), ("--end-index", args.end_index)):
        if value is not None and value < 0:
            raise ValueError(f"{flag} {value}: expected an integer >= 0")
    positional = list(getattr(args, "text", None) or [])
    if sum(map(bool, (positional, args.prompt, args.prompt_path))) > 1:
        given = [name for name, v in (("PROMPT", positional), ("--prompt", args.prompt),
                                      ("--prompt-path", args.prompt_path)) if v]  # fmt: skip
        raise ValueError(f"prompts given as {' and '.join(given)}: give them one way only")
    if positional or args.prompt:
        return positional or list(args.prompt)
    if not args.prompt_path:
        raise ValueError("no prompt: give PROMPT, --prompt TEXT [TEXT ...] or --prompt-path FILE")
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

    from opensora_sdk.dtypes import parse_dtype as resolve_dtype
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
