"""Train or fine-tune STDiT3 (Open-Sora v1.2), STDiT2 (v1.1) or STDiT (v1.0) with accelerate.

    accelerate launch training/train.py --config training/configs/tiny_cpu.yaml
    accelerate launch --config_file training/accelerate/multi_gpu.yaml training/train.py \
        --config training/configs/finetune_v1.2_80gb.yaml --resume latest
    python training/train.py --config training/configs/tiny_v1.1_cpu.yaml     # STDiT2 + IDDPM

The family comes from the model section (type, preset or checkpoint) and picks the objective:
rectified flow for STDiT3, IDDPM (MSE + variational bound) for STDiT2 / STDiT, see
`opensora_sdk.training.objectives`.

The script reads top to bottom: config -> accelerator -> models -> data -> objective ->
optimizer -> resume -> loop. Each training feature is a visible block; the reusable parts
(dataset, buckets, masks, EMA, checkpoints, features) live in `opensora_sdk.training`.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import io
import logging
import resource
import signal
import sys
import time
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType, set_seed
from tqdm.auto import tqdm

from opensora_sdk.dtypes import parse_dtype
from opensora_sdk.loading import append_line, write_json_atomic, write_text_atomic
from opensora_sdk.models.auto import build_vae as build_vae_from_config
from opensora_sdk.models.auto import load_vae
from opensora_sdk.models.t5_file import tiny_t5_config
from opensora_sdk.models.text_encoder import T5TextEncoder
from opensora_sdk.text import text_preprocessing
from opensora_sdk.training import checkpoint as ckpt
from opensora_sdk.training import features as feats
from opensora_sdk.training import lora as train_lora
from opensora_sdk.training import objectives
from opensora_sdk.training import validation as val
from opensora_sdk.training.buckets import BucketBatchSampler, BucketConfig, FixedSize
from opensora_sdk.training.config import config_as_dict, load_train_config
from opensora_sdk.training.dataset import VideoTextDataset, collate_samples
from opensora_sdk.training.ema import EMA
from opensora_sdk.training.lr_schedule import lr_factor
from opensora_sdk.training.masks import MaskGenerator

logger = logging.getLogger("train")
LOG_COLUMNS = ["step", "epoch", "loss", "lr", "grad_norm", "samples_per_s", "tokens_per_s", "skipped", "peak_mem_mib", "elapsed_s"]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Train STDiT3 / STDiT2 / STDiT with accelerate (see training/README.md).")
    p.add_argument("--config", required=True, help="training YAML, e.g. training/configs/tiny_cpu.yaml")
    p.add_argument("--resume", default=None, help="'latest' or a checkpoint folder (output_dir/checkpoints/step-N)")
    p.add_argument("--max-steps", type=int, default=None, help="override max_steps (optimizer steps)")
    p.add_argument("--output-dir", default=None, help="override output_dir")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key, e.g. optim.lr=3e-4")
    return p.parse_args(argv)


# ---- model construction ---------------------------------------------------------------------


def build_vae(section, device):
    """The frozen VAE: the v1.2 video VAE or the per-frame SD VAE (v1.1 / v1.0), from a checkpoint
    (recognised from its files) or a preset with random weights."""
    dtype = parse_dtype(section.dtype)
    if section.from_pretrained:
        vae = load_vae(section.from_pretrained, dtype=dtype, device=device)
    else:
        logger.warning("vae.from_pretrained is null: the VAE %s has random weights", section.preset)
        vae = build_vae_from_config(objectives.vae_preset(section.preset)).to(device, dtype)
    if section.micro_batch_size:
        if hasattr(vae.config, "micro_batch_size"):  # VideoAutoencoder
            vae.config.micro_batch_size = section.micro_batch_size
        else:  # FrameAutoencoder
            vae.micro_batch_size = section.micro_batch_size
    return vae.eval().requires_grad_(False)


def build_text_encoder(section, device) -> T5TextEncoder:
    if section.from_pretrained:
        return T5TextEncoder.from_pretrained(section.from_pretrained, section.model_max_length, dtype=section.dtype, device=device)
    logger.warning("text_encoder.tiny_t5 is set: the T5 encoder has random weights")
    return T5TextEncoder.from_config(tiny_t5_config(**section.tiny_t5), model_max_length=section.model_max_length,
                                     dtype=section.dtype, device=device)  # fmt: skip


def keep_random_encoders(cfg, vae, text_encoder, out: Path) -> None:
    """Save randomly initialised VAE / T5 once, so samplers can use the same frozen encoders."""
    if not cfg.vae.from_pretrained and not (out / "random_encoders" / "vae").exists():
        vae.save_pretrained(out / "random_encoders" / "vae")
    if not cfg.text_encoder.from_pretrained and not (out / "random_encoders" / "text_encoder").exists():
        text_encoder.model.save_pretrained(out / "random_encoders" / "text_encoder")
        text_encoder.tokenizer.save_pretrained(out / "random_encoders" / "text_encoder")


def ensure_random_encoders(cfg, out: Path) -> None:
    """Random VAE / T5 missing from this run's folder (its features were extracted by another
    run): rebuild them from the same seeds, on the CPU, without touching the global RNG."""
    missing_vae = not cfg.vae.from_pretrained and not (out / "random_encoders" / "vae").exists()
    missing_te = not cfg.text_encoder.from_pretrained and not (out / "random_encoders" / "text_encoder").exists()
    if missing_vae or missing_te:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed + 1)
            text_encoder = build_text_encoder(cfg.text_encoder, "cpu")
            torch.manual_seed(cfg.seed + 2)
            keep_random_encoders(cfg, build_vae(cfg.vae, "cpu"), text_encoder, out)


@torch.no_grad()
def encode_batch(batch, vae, text_encoder, generator, device, clean_captions=False):
    """Pixels and captions -> (x0 latents [B, C, T', h, w], y [B, 1, L, C_text], mask [B, L]).
    `clean_captions`: v1.0's T5 embedder cleaned every caption (spec 9.2)."""
    x0 = vae.encode(batch["video"].to(device, vae.dtype), generator=generator).float()
    texts = [text_preprocessing(t) for t in batch["text"]] if clean_captions else batch["text"]
    y, mask = text_encoder.encode(texts)
    return x0, y, mask


def setup_sequence_parallel(sp_size: int, accelerator: Accelerator, model):
    """(data-parallel size, data-parallel rank). With sp_size > 1, ranks [k*sp, (k+1)*sp) form
    sequence-parallel group k: they share one batch and the model's tokens are sharded over them
    (opensora_sdk.distributed, spec 8); DDP's average over all ranks then gives the right gradients."""
    if sp_size == 1:
        return accelerator.num_processes, accelerator.process_index
    try:
        from opensora_sdk import distributed
    except ImportError as err:
        raise RuntimeError(f"sp_size={sp_size}: sequence parallelism needs opensora_sdk.distributed ({err}); set sp_size: 1") from None
    mesh = distributed.make_mesh(sp_size)  # ValueError unless sp_size divides the number of processes
    model.set_sequence_parallel_group(mesh.sp_group)
    return mesh.dp_size, mesh.dp_rank


# ---- distributed-aware state ----------------------------------------------------------------


def full_model_state(accelerator, model, is_fsdp):
    if is_fsdp:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return {k: v.detach().cpu() for k, v in accelerator.unwrap_model(model).state_dict().items()}


def full_optimizer_state(model, optimizer, is_fsdp):
    if is_fsdp:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        return get_optimizer_state_dict(model, optimizer.optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return optimizer.state_dict()


def load_full_state(accelerator, model, optimizer, state, is_fsdp, adapter_only=False):
    """Weights and optimizer state; `adapter_only`: state.model_state holds a LoRA run's adapter."""
    if is_fsdp:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict, set_optimizer_state_dict

        options = StateDictOptions(full_state_dict=True, strict=not adapter_only)
        set_model_state_dict(model, state.model_state, options=options)
        set_optimizer_state_dict(model, optimizer.optimizer, state.optimizer_state, options=StateDictOptions(full_state_dict=True))
    else:
        if adapter_only:
            train_lora.load_into(accelerator.unwrap_model(model), state.model_state)
        else:
            accelerator.unwrap_model(model).load_state_dict(state.model_state)
        optimizer.load_state_dict(state.optimizer_state)


def adapter_state(accelerator, model, is_fsdp) -> dict:
    """A LoRA run's adapter weights as CPU tensors (gathered under FSDP: a collective)."""
    if is_fsdp:
        return {k: v for k, v in full_model_state(accelerator, model, is_fsdp).items() if ".lora_" in k}
    return train_lora.trainable_state(accelerator.unwrap_model(model))


def log_memory_estimate(cfg, model, buckets, sampler, device) -> None:
    """The training memory estimate (`opensora_sdk.estimates.estimate_training`) for the largest
    micro-batch of the run's buckets, before the first step."""
    from opensora_sdk.estimates import estimate_training

    counts = sampler.describe(0)
    if not counts:
        return
    T, H, W = max((buckets.shape(b) + (buckets.batch_size(b),) for b in counts), key=lambda s: s[0] * s[1] * s[2] * s[3])[:3]
    batch = max(buckets.batch_size(b) for b in counts if buckets.shape(b) == (T, H, W))
    est = estimate_training(model, batch=batch, num_frames=T, height=H, width=W, vae_config=None,
                            mixed_precision=cfg.mixed_precision, gradient_checkpointing=cfg.model.gradient_checkpointing,
                            optimizer=cfg.optim.name, ema=cfg.optim.ema_decay > 0)  # fmt: skip
    logger.info("memory estimate for the largest micro-batch (%d x %d frames of %dx%d, %s): %s", batch, T, H, W,
                device.type, "; ".join(est.lines()))  # fmt: skip


def peak_memory_mib(device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    scale = 1 if sys.platform == "darwin" else 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / 2**20


class CSVLog:
    """Rows in logs/train_log.csv: a fresh file, or on resume the old rows up to the resumed step
    (rewritten atomically; a row cut short by a crash is dropped). New rows are appended."""

    def __init__(self, path: Path, resume_step: int | None):
        self.path = path
        rows = []
        if path.exists() and resume_step is not None:
            with open(path, newline="") as f:
                rows = [r for r in csv.DictReader(f) if None not in r.values() and int(r["step"]) <= resume_step]
        write_text_atomic(csv_text(rows, header=True), path)

    def write(self, row: dict) -> None:
        append_line(csv_text([{k: row.get(k, "") for k in LOG_COLUMNS}], header=False), self.path)


def csv_text(rows: list[dict], header: bool) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, LOG_COLUMNS)
    if header:
        writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


def main(argv=None) -> dict:
    args = parse_args(argv)
    overrides = list(args.set) + ([f"max_steps={args.max_steps}"] if args.max_steps else [])
    overrides += [f"output_dir={args.output_dir}"] if args.output_dir else []
    cfg = load_train_config(args.config, overrides)
    out = Path(cfg.output_dir)

    # ---- accelerator: devices, processes, mixed precision, gradient accumulation -------------
    use_tb = False
    if cfg.tensorboard:
        try:
            import tensorboard  # noqa: F401

            use_tb = True
        except ImportError:
            pass
    no_accelerator = not (torch.cuda.is_available() or torch.backends.mps.is_available())
    accelerator = Accelerator(
        cpu=no_accelerator,  # several processes on a machine without GPUs: gloo DDP on the CPU
        mixed_precision=cfg.mixed_precision,
        gradient_accumulation_steps=cfg.optim.gradient_accumulation_steps,
        log_with=(["tensorboard"] if use_tb else []) + (["wandb"] if cfg.wandb_project else []) or None,
        project_dir=str(out),
    )
    logging.basicConfig(level=logging.INFO if accelerator.is_main_process else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", force=True)  # fmt: skip
    if cfg.cpu_threads:
        torch.set_num_threads(cfg.cpu_threads)
    device, is_main, rank = accelerator.device, accelerator.is_main_process, accelerator.process_index
    is_fsdp = accelerator.distributed_type == DistributedType.FSDP
    set_seed(cfg.seed)
    if is_main:
        out.mkdir(parents=True, exist_ok=True)
        if not args.resume and ckpt.list_checkpoints(out / "checkpoints"):
            logger.warning("%s already holds checkpoints; this run starts from scratch (use --resume latest to continue)", out)
        write_json_atomic(config_as_dict(cfg), out / "config.json")

    # ---- the diffusion model (seeded on its own, so the frozen models' order does not matter);
    # its family (v1.2 STDiT3, v1.1 STDiT2, v1.0 STDiT) picks the objective and the model inputs
    family = objectives.model_family(cfg.model)
    if not family.frame_masks and cfg.mask_ratios is not None:
        raise ValueError(f"mask_ratios={cfg.mask_ratios!r}: {family.model_type} ({family.name}) has no frame conditioning; set mask_ratios: null")
    if family.model_type == "STDiT" and cfg.data.fixed_size is None:
        raise ValueError("STDiT (v1.0) trains at one fixed size: set data.fixed_size {num_frames: T, image_size: [H, W], "
                         "batch_size: n} (pixels of the model's latent input_size) and data.buckets: {}")  # fmt: skip
    fps_condition = cfg.data.fps_condition or family.fps_condition
    torch.manual_seed(cfg.seed)
    model = objectives.build_model(cfg.model)
    # ---- LoRA: freeze the transformer, train an adapter on its linear layers (lora.rank > 0) --
    lora_info = train_lora.add_adapter(model, cfg.lora) if cfg.lora.rank else None
    base_source = cfg.model.from_pretrained or f"preset {cfg.model.preset} (random weights, seed {cfg.seed})"
    dp_size, dp_rank = setup_sequence_parallel(cfg.sp_size, accelerator, model)

    # ---- data: CSV -> buckets -> batches of one shape per step ------------------------------
    if cfg.data.fixed_size:  # one size, resized to cover and centre-cropped (v1.0's VideoTextDataset)
        fixed = cfg.data.fixed_size
        buckets = FixedSize(fixed["num_frames"], fixed["image_size"], fixed["batch_size"])
    else:
        buckets = BucketConfig(cfg.data.buckets, cfg.data.extra_resolutions, cfg.data.length_rule)
    dataset = VideoTextDataset(cfg.data.csv, frame_interval=cfg.data.frame_interval, seed=cfg.seed,
                               score_columns=cfg.data.score_columns, score_format=cfg.data.score_format,
                               score_drop_prob=cfg.data.score_drop_prob, native_fps=fps_condition == "native")  # fmt: skip
    if not family.frame_masks and any(dataset.frame_masks):
        raise ValueError(f"{cfg.data.csv}: rows name a frame_mask, but {family.model_type} ({family.name}) has no frame "
                         f"conditioning; leave the frame_mask column empty")  # fmt: skip
    sampler_args = dict(seed=cfg.seed, frame_interval=cfg.data.frame_interval, num_replicas=dp_size, rank=dp_rank,
                        drop_last=cfg.data.drop_last)  # fmt: skip
    sampler = BucketBatchSampler(dataset.sizes, buckets, **sampler_args)
    source_sizes = dataset.sizes[:3]  # for the error below (a feature dataset has no source sizes)

    # ---- frozen VAE and T5, or precomputed features (encode once, then train without them) --
    vae = text_encoder = None
    encode_gen = torch.Generator(device).manual_seed(cfg.seed + 1000 * (dp_rank + 1))
    if cfg.features.dir:
        meta = {"data": str(Path(cfg.data.csv).resolve()), "frame_interval": cfg.data.frame_interval, "seed": cfg.seed,
                "buckets": cfg.data.buckets, "extra_resolutions": cfg.data.extra_resolutions,
                "score_columns": cfg.data.score_columns, "score_format": cfg.data.score_format,
                "score_drop_prob": cfg.data.score_drop_prob, "dtype": cfg.features.dtype,
                "vae": dataclasses.asdict(cfg.vae), "text_encoder": dataclasses.asdict(cfg.text_encoder)}  # fmt: skip
        # settings other than v1.2's, recorded only when used (features written before them stay valid)
        meta.update({"fixed_size": cfg.data.fixed_size} if cfg.data.fixed_size else {})
        meta.update({"fps_condition": fps_condition} if fps_condition != "divided" else {})
        meta.update({"clean_captions": True} if family.clean_captions else {})
        meta.update({"length_rule": cfg.data.length_rule} if cfg.data.length_rule != "official" else {})
        if not feats.check_existing(cfg.features.dir, meta):
            torch.manual_seed(cfg.seed + 1)
            text_encoder = build_text_encoder(cfg.text_encoder, device)
            torch.manual_seed(cfg.seed + 2)
            vae = build_vae(cfg.vae, device)
            if is_main:
                keep_random_encoders(cfg, vae, text_encoder, out)
            writer = feats.FeatureWriter(cfg.features.dir, rank=rank, shard_size=cfg.features.shard_size,
                                         dtype=feats.feature_dtype(cfg.features.dtype))  # fmt: skip
            plan = feats.extraction_plan(sampler.assign(0), cfg.features.batch_size, rank, accelerator.num_processes)
            for bucket, ids in tqdm(plan, desc="extracting features", disable=not is_main):
                T, H, W = buckets.shape(bucket)
                batch = collate_samples([dataset[f"{i}-{T}-{H}-{W}"] for i in ids])
                x0, y, mask = encode_batch(batch, vae, text_encoder, encode_gen, device, family.clean_captions)
                for j in range(len(ids)):
                    writer.add(index=int(batch["index"][j]), bucket=bucket, x=x0[j], y=y[j, 0], mask=mask[j],
                               text=batch["text"][j], fps=float(batch["fps"][j]), num_frames=T, height=H, width=W,
                               frame_mask=batch["frame_mask"][j])  # fmt: skip
            writer.close()
            accelerator.wait_for_everyone()
            if is_main:
                feats.merge_indices(cfg.features.dir, accelerator.num_processes, meta)
            accelerator.wait_for_everyone()
            vae = text_encoder = None  # not needed any more: free their memory
        if is_main:
            ensure_random_encoders(cfg, out)  # what generation.json points at
        dataset = feats.FeatureDataset(cfg.features.dir, model_max_length=model.config.model_max_length)
        sampler = BucketBatchSampler(None, buckets, assignments=dataset.assignments, **sampler_args)
    else:
        torch.manual_seed(cfg.seed + 1)
        text_encoder = build_text_encoder(cfg.text_encoder, device)
        torch.manual_seed(cfg.seed + 2)
        vae = build_vae(cfg.vae, device)
        if is_main:
            keep_random_encoders(cfg, vae, text_encoder, out)
    if text_encoder is not None and (text_encoder.model_max_length, text_encoder.output_dim) != (
        model.config.model_max_length, model.config.caption_channels):
        raise ValueError(f"text encoder gives [{text_encoder.model_max_length}, {text_encoder.output_dim}] features but the model expects "
                         f"model_max_length={model.config.model_max_length}, caption_channels={model.config.caption_channels}")  # fmt: skip
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=sampler, collate_fn=collate_samples,
                                         num_workers=cfg.data.num_workers, pin_memory=cfg.data.pin_memory)  # fmt: skip
    if not sampler.epoch_batches(0):
        fi = cfg.data.frame_interval
        raise ValueError(f"no sample of {cfg.data.csv!r} fills a whole micro-batch of any bucket in data.buckets "
                         f"(source (frames, height, width) of the first rows: {source_sizes}); a T-frame bucket takes clips "
                         f"of more than T * frame_interval = T * {fi} frames (data.length_rule: window also takes exactly "
                         "T * frame_interval) and at least 0.8 x the resolution's pixels; check the resolutions, frame "
                         "counts and batch sizes")  # fmt: skip
    if is_main:
        logger.info("%d samples, %d micro-batches per epoch (all ranks); buckets %s", len(dataset),
                    len(sampler.epoch_batches(0)), sampler.describe(0))  # fmt: skip

    # ---- objective: rectified flow (logit-normal t + warp; STDiT3) or IDDPM (MSE + VB on the
    # learned sigma; STDiT2, STDiT), frame masks, caption dropout -------------------------------
    objective = objectives.make_objective(family, cfg.scheduler)
    mask_generator = MaskGenerator(cfg.mask_ratios, seed=cfg.seed + 7919 * (dp_rank + 1))
    train_gen = torch.Generator(device).manual_seed(cfg.seed + 104729 * (dp_rank + 1))  # t, noise, caption drop

    # ---- optimizer (official AdamW settings), linear warm-up, EMA ---------------------------
    model.to(device)  # before the optimizer: fused AdamW checks where its parameters live
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = train_lora.make_optimizer(params, cfg.optim)  # AdamW, or 8-bit AdamW (optim.name: adamw8bit)
    schedule = dict(warmup_steps=cfg.optim.warmup_steps, max_steps=cfg.max_steps, decay_steps=cfg.optim.decay_steps)
    lr_scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda k: lr_factor(k, **schedule))
    model, optimizer = accelerator.prepare(model, optimizer)
    unwrapped = accelerator.unwrap_model(model)
    params = [p for p in model.parameters() if p.requires_grad]
    ema = EMA(unwrapped, decay=cfg.optim.ema_decay)
    if is_main:
        n_train = sum(p.numel() for p in unwrapped.parameters() if p.requires_grad)
        logger.info("%s (%s): %.1fM trainable parameters; %d processes (dp %d, sp %d: %s); %s", family.model_type, family.name,
                    n_train / 1e6, accelerator.num_processes, dp_size, cfg.sp_size, unwrapped.sequence_parallel or "off",
                    accelerator.mixed_precision)  # fmt: skip
        if lora_info:
            logger.info("LoRA rank %d, alpha %g on %d layers (%s): %.3fM parameters; base %s (fingerprint %s)", cfg.lora.rank,
                        lora_info["alpha"], len(lora_info["layers"]), ", ".join(cfg.lora.target_modules),
                        lora_info["parameters"] / 1e6, base_source, lora_info["fingerprint"])  # fmt: skip
        log_memory_estimate(cfg, unwrapped, buckets, sampler, device)

    # ---- resume: weights, EMA, optimizer, scheduler, sampler position, RNG states ----------
    step, epoch, batches_in_epoch = 0, 0, 0
    ckpt_root = out / "checkpoints"
    if args.resume:
        folder = ckpt.resolve_resume(args.resume, ckpt_root, warn=logger.warning)
        state = ckpt.load_checkpoint(folder, rank=rank)
        if lora_info:  # the adapter files instead of model/ and ema/
            raw, ema_adapter = train_lora.read_checkpoint(folder)
            state = state._replace(model_state=raw, ema_state=ema_adapter)
        load_full_state(accelerator, model, optimizer, state, is_fsdp, adapter_only=bool(lora_info))
        ema.load_state_dict({k: state.ema_state[k] for k in ema.shadow})
        lr_scheduler.load_state_dict(state.scheduler_state)
        if state.scaler_state is not None and accelerator.scaler is not None:
            accelerator.scaler.load_state_dict(state.scaler_state)
        sampler.load_state_dict(state.sampler_state)
        if state.rng_state is None or state.train_state.get("world_size") != accelerator.num_processes:
            logger.warning("no RNG state for rank %d of %d in %s: continuing with fresh draws (not bit-exact)",
                           rank, accelerator.num_processes, folder)  # fmt: skip
        else:
            ckpt.restore_rng_state(state.rng_state, {"train": train_gen, "encode": encode_gen})
            mask_generator.load_state_dict(state.rng_state["mask_generator"])
        step, epoch = int(state.train_state["step"]), sampler.epoch
        batches_in_epoch = sampler.start_position // dp_size
        logger.info("resumed from %s at step %d (epoch %d, micro-batch %d)", folder, step, epoch, batches_in_epoch)

    # what generating with a checkpoint needs (generation.json): VAE, text encoder, defaults of the data
    card = val.make_card(cfg, family.name, out, val.data_defaults(dataset, sampler, buckets, cfg.data.frame_interval, fps_condition),
                         base_model=base_source if lora_info else None)  # fmt: skip

    def save(step_now: int) -> Path:
        rng = ckpt.capture_rng_state({"train": train_gen, "encode": encode_gen}, {"mask_generator": mask_generator.state_dict()})
        if lora_info:  # adapter files (written by `extra`), no model/ and ema/ folders
            model_state = ema_state = None
            adapter_raw = adapter_state(accelerator, model, is_fsdp)  # collective under FSDP
            adapter_ema = {k: v.full_tensor() if hasattr(v, "full_tensor") else v for k, v in ema.state_dict().items()}
        else:
            model_state = full_model_state(accelerator, model, is_fsdp)  # collective under FSDP
            ema_state = ema.full_state_dict(unwrapped)  # collective under FSDP
        optim_state = full_optimizer_state(model, optimizer, is_fsdp)

        def extra(folder: Path) -> None:
            if lora_info:
                meta = train_lora.metadata(unwrapped, cfg.lora, lora_info, steps=step_now, base_model=base_source)
                train_lora.write_adapters(folder, unwrapped, adapter_raw, adapter_ema, meta, cfg.lora.save_dtype)
                val.write_card(card, folder)
            else:
                for sub in ("model", "ema"):
                    val.write_card(card, folder / sub)

        return ckpt.save_checkpoint(
            ckpt_root, step_now, rank=rank, is_main=is_main, barrier=accelerator.wait_for_everyone,
            model_config=unwrapped.config, model_state=model_state, ema_state=ema_state, optimizer_state=optim_state,
            scheduler_state=lr_scheduler.state_dict(),
            scaler_state=accelerator.scaler.state_dict() if accelerator.scaler is not None else None,
            sampler_state=sampler.state_dict(batches_in_epoch), rng_state=rng, extra=extra,
            train_state={"epoch": epoch, "batches_in_epoch": batches_in_epoch, "world_size": accelerator.num_processes,
                         "dp_size": dp_size, "time": time.time()},
            keep_last=cfg.keep_last,
        )  # fmt: skip

    # ---- SIGTERM: finish the current step, save, exit cleanly ---------------------------------
    stop = {"requested": False}

    def on_sigterm(signum, frame):
        stop["requested"] = True

    previous_handler = signal.signal(signal.SIGTERM, on_sigterm)

    def stop_requested() -> bool:
        flag = torch.tensor([1.0 if stop["requested"] else 0.0], device=device)
        return bool(accelerator.reduce(flag, "max").item() > 0) if accelerator.num_processes > 1 else bool(flag.item())

    # ---- logs: tqdm, CSV, TensorBoard ---------------------------------------------------------
    log = CSVLog(out / "logs" / "train_log.csv", step if args.resume else None) if is_main else None
    if use_tb or cfg.wandb_project:  # TensorBoard under output_dir/tb; wandb runs in wandb_project
        accelerator.init_trackers(cfg.wandb_project or "tb", config=config_as_dict(cfg) if cfg.wandb_project else None,
                                  init_kwargs={"wandb": {"dir": str(out)}} if cfg.wandb_project else {})  # fmt: skip
    progress = tqdm(total=cfg.max_steps, initial=step, disable=not is_main, desc="train", dynamic_ncols=True)
    window = {"loss": 0.0, "micro": 0, "samples": 0, "tokens": 0, "skipped": 0, "t0": time.perf_counter()}
    pt, ph, pw = unwrapped.config.patch_size
    validator = None
    if cfg.validation.every:  # videos from fixed prompts and seed, through the SDK's generation path
        from opensora_sdk.models.auto import load_vae as load_any_vae

        validator = val.Validator(
            cfg.validation, card, device=device, out=out, is_main=is_main,
            build_vae=lambda: load_any_vae(card["vae"], dtype=parse_dtype(cfg.vae.dtype), device="cpu").eval(),
            build_text_encoder=lambda: T5TextEncoder.from_pretrained(card["text_encoder"], unwrapped.config.model_max_length,
                                                                     dtype=cfg.text_encoder.dtype, device="cpu"),
            sp_group=getattr(unwrapped.sequence_parallel, "group", None),
            autocast=accelerator.autocast if accelerator.mixed_precision in ("bf16", "fp16") else None,
        )  # fmt: skip
    total_skipped, last_loss, grad_norm, t_start, saved_at = 0, float("nan"), float("nan"), time.perf_counter(), None

    # ---- the loop -------------------------------------------------------------------------------
    model.train()
    done = step >= cfg.max_steps
    while not done and epoch < cfg.epochs:
        sampler.set_epoch(epoch)
        dataset.set_epoch(epoch)
        for batch in loader:
            with accelerator.accumulate(model):
                if vae is None:  # precomputed features
                    x0, y, mask = batch["x"].to(device), batch["y"].to(device), batch["mask"].to(device)
                else:
                    x0, y, mask = encode_batch(batch, vae, text_encoder, encode_gen, device, family.clean_captions)
                model_kwargs = {
                    "y": y, "mask": mask, **objectives.model_inputs(family, batch, device, cfg.data.ar_condition),
                    "generator": train_gen,  # the 10% caption drop of the model's y_embedder (train mode)
                }  # fmt: skip
                kinds = batch.get("frame_mask")  # a row's own mask type, or "" (drawn by the ratios)
                named = kinds is not None and any(kinds)
                x_mask = mask_generator.get_masks(x0, kinds) if mask_generator.mask_ratios or named else None
                loss = objective(model, x0, model_kwargs, mask=x_mask, generator=train_gen).mean()
                accelerator.backward(loss)
                if accelerator.sync_gradients and cfg.optim.grad_clip > 0:
                    grad_norm = accelerator.clip_grad_norm_(params, cfg.optim.grad_clip)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            batches_in_epoch += 1
            B, _, T, H, W = x0.shape
            window["loss"] += loss.detach().double()  # a tensor: no device sync per step
            window["micro"] += 1
            window["samples"] += B
            window["tokens"] += B * -(-T // pt) * -(-H // ph) * -(-W // pw)
            window["skipped"] += len(batch["skipped"])
            if not accelerator.sync_gradients:
                continue
            lr_used = lr_scheduler.get_last_lr()[0]
            if not accelerator.optimizer_step_was_skipped:  # fp16 overflow: keep the schedule in place
                lr_scheduler.step()
            ema.update(unwrapped)
            step += 1
            progress.update(1)

            if step % cfg.log_every == 0 or step == cfg.max_steps:
                stats = torch.stack([torch.as_tensor(window[k], dtype=torch.float64, device=device)
                                     for k in ("loss", "micro", "samples", "tokens", "skipped")])  # fmt: skip
                stats = accelerator.reduce(stats, "sum") if accelerator.num_processes > 1 else stats
                stats[2:] /= cfg.sp_size  # the ranks of an SP group share their samples
                seconds = time.perf_counter() - window["t0"]
                total_skipped += int(stats[4])
                last_loss = float(stats[0] / stats[1])
                row = {"step": step, "epoch": epoch, "loss": round(last_loss, 6), "lr": lr_used,
                       "grad_norm": round(float(grad_norm), 6), "samples_per_s": round(float(stats[2]) / seconds, 3),
                       "tokens_per_s": round(float(stats[3]) / seconds, 1), "skipped": total_skipped,
                       "peak_mem_mib": round(peak_memory_mib(device), 1), "elapsed_s": round(time.perf_counter() - t_start, 2)}  # fmt: skip
                if is_main:
                    log.write(row)
                    progress.set_postfix(loss=f"{last_loss:.4f}", lr=f"{row['lr']:.2e}", gn=f"{row['grad_norm']:.3f}",
                                         sps=row["samples_per_s"])  # fmt: skip
                if use_tb or cfg.wandb_project:
                    accelerator.log({k: v for k, v in row.items() if k != "step"}, step=step)
                window = {"loss": 0.0, "micro": 0, "samples": 0, "tokens": 0, "skipped": 0, "t0": time.perf_counter()}

            done = step >= cfg.max_steps or stop_requested()
            if step % cfg.ckpt_every == 0 or done:
                saved_at = save(step)
                if is_main:
                    logger.info("saved %s", saved_at)
            if validator is not None and (step % cfg.validation.every == 0 or done):
                files = validator.run(step, unwrapped, ema)
                if is_main:
                    logger.info("validation videos at step %d: %s", step, files[0].parent if files else "-")
                    if use_tb:
                        writer = accelerator.get_tracker("tensorboard", unwrap=True)
                        writer.add_images("validation", val.frame_strip(validator.last_videos), step, dataformats="NCHW")
            if done:
                break
        else:  # the epoch ran out
            epoch, batches_in_epoch = epoch + 1, 0
    progress.close()
    signal.signal(signal.SIGTERM, previous_handler)

    # ---- end: ranks must hold the same weights; summary for scripts and tests ------------------
    digest = torch.stack([p.detach().double().sum() for p in unwrapped.parameters()])[None]  # [1, n]
    digests = accelerator.gather(digest.to(device)).cpu() if not is_fsdp else digest.cpu()
    summary = {"step": step, "epoch": epoch, "stopped_by_signal": stop["requested"], "last_loss": last_loss,
               "skipped": total_skipped, "world_size": accelerator.num_processes,
               "ranks_in_sync": None if is_fsdp else bool((digests == digests[:1]).all()),
               "param_digest": [float(d.sum()) for d in digests], "checkpoint": str(saved_at) if saved_at else None,
               "adapter": str(saved_at / train_lora.EMA_FILE) if saved_at and lora_info else None,
               "peak_mem_mib": round(peak_memory_mib(device), 1), "wall_s": round(time.perf_counter() - t_start, 2)}  # fmt: skip
    if is_main:
        write_json_atomic(summary, out / "summary.json")
    # Leave the process groups on every rank before returning: wait for all ranks, then destroy
    # the groups while the interpreter is alive. Exiting with them alive, right after the last
    # collective (the gather above), let a gloo worker thread drop that collective's tensors
    # during the interpreter's teardown: SIGABRT at exit (see opensora_sdk.distributed.shutdown).
    from opensora_sdk import distributed

    distributed.shutdown()
    if use_tb or cfg.wandb_project:
        accelerator.end_training()  # trackers; its destroy_process_group is a no-op now
    return summary


if __name__ == "__main__":
    main()
