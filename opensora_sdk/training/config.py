"""The training config: inert YAML read into dataclasses, every key checked.

Each section below is one YAML mapping; a key that is not a field is an error naming the
section, the key and the allowed keys. Defaults are the official v1.2 settings where one
exists (spec 7.5, 7.6). `--set a.b=value` overrides (value parsed as YAML) are applied before
checking, so they are validated the same way.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

PRECISIONS = (None, "no", "fp16", "bf16")
MODEL_TYPES = (None, "STDiT3", "STDiT2", "STDiT")
FPS_CONDITIONS = (None, "divided", "native")
AR_CONDITIONS = (None, "W/H", "H/W")


@dataclass
class ModelSection:
    preset: str | None = "STDiT3-XL/2"  # a name of STDIT3_PRESETS / STDIT2_PRESETS / STDIT_PRESETS (when from_pretrained is null)
    from_pretrained: str | None = None  # folder, file or hub id of STDiT3 / STDiT2 / STDiT weights
    type: str | None = None  # STDiT3 | STDiT2 | STDiT (v1.2 | v1.1 | v1.0); null: from the preset or the checkpoint
    config_overrides: dict = field(default_factory=dict)  # config fields of that model, e.g. freeze_y_embedder
    gradient_checkpointing: bool = False
    attention_backend: str = "sdpa"
    official_bf16_quantization: bool = False


@dataclass
class VAESection:
    preset: str | None = "OpenSoraVAE_V1_2"  # VAE_PRESETS name or SD-VAE / SD-VAE-tiny (random weights) when from_pretrained is null
    from_pretrained: str | None = None  # e.g. hpcai-tech/OpenSora-VAE-v1.2, or stabilityai/sd-vae-ft-ema (v1.1 / v1.0)
    dtype: str = "bf16"
    micro_batch_size: int | None = None  # frames per spatial encode call (None: the config's)


@dataclass
class TextEncoderSection:
    from_pretrained: str | None = None  # folder or hub id of a T5 encoder, e.g. DeepFloyd/t5-v1_1-xxl
    tiny_t5: dict | None = None  # random tiny T5 (built-in tokenizer) with these T5Config overrides
    model_max_length: int = 300
    dtype: str = "bf16"


@dataclass
class DataSection:
    csv: str | None = None  # .csv or .parquet with path, text, num_frames, height, width
    frame_interval: int = 1
    length_rule: str = "official"  # "window": a T-frame bucket also takes clips of exactly T * frame_interval frames
    buckets: dict = field(default_factory=dict)  # {resolution: {num_frames: [keep_prob, batch_size]}}
    extra_resolutions: dict = field(default_factory=dict)  # {name: pixel count} for small custom buckets
    fixed_size: dict | None = None  # {num_frames, image_size: [H, W], batch_size}: one size, centre crop (v1.0), instead of buckets
    fps_condition: str | None = None  # "divided" (video fps // frame_interval) | "native" (video fps); null: the family's
    ar_condition: str | None = None  # STDiT2's ar input: "W/H" (official v1.1 training, sic) | "H/W" (inference); null: W/H
    score_columns: dict = field(default_factory=dict)  # {aes|flow|camera_motion: column}
    score_format: str = "inference"
    score_drop_prob: float = 0.0
    num_workers: int = 0
    pin_memory: bool = False
    drop_last: bool = True


@dataclass
class FeaturesSection:
    dir: str | None = None  # set to train on precomputed VAE latents + T5 embeddings
    dtype: str = "fp32"  # storage dtype (bf16 halves the disk use)
    batch_size: int = 8  # samples per VAE/T5 call during extraction
    shard_size: int = 256  # samples per safetensors shard


@dataclass
class OptimSection:
    lr: float = 1e-4
    eps: float = 1e-15
    weight_decay: float = 0.0
    betas: tuple = (0.9, 0.999)
    warmup_steps: int = 1000  # linear warm-up: lr_k = (k+1)/(warmup+1) * lr for k < warmup
    decay_steps: int = 0  # linear decay to 0 over the last decay_steps of max_steps (0: constant, official)
    grad_clip: float = 1.0
    ema_decay: float = 0.99
    gradient_accumulation_steps: int = 1
    fused: bool = False  # torch's fused AdamW kernel (CUDA): faster, no foreach temporaries (-4.8 GB peak on XL/2)
    name: str = "adamw"  # adamw | adamw8bit (bitsandbytes' 8-bit AdamW: a quarter of the optimizer memory; CUDA)


@dataclass
class LoraSection:
    """Train a LoRA adapter instead of the whole transformer (`opensora_sdk.training.lora`)."""

    rank: int = 0  # 0: off (full fine-tune); e.g. 16
    alpha: float | None = None  # scale = alpha / rank; null: alpha = rank
    dropout: float = 0.0
    target_modules: list = field(default_factory=lambda: ["attention", "cross_attention", "mlp"])  # groups or name regexes
    base_dtype: str | None = None  # bf16 | fp16: keep the frozen base weights in that dtype (needs mixed_precision)
    save_dtype: str = "fp32"  # dtype of the adapter files (fp16 halves them)


@dataclass
class ValidationSection:
    """Videos generated every `every` steps from fixed prompts and seed (OpenSoraPipeline)."""

    every: int = 0  # optimizer steps; 0: off
    prompts: list = field(default_factory=list)
    seed: int = 0
    num_steps: int | None = None  # null: the run's generation defaults
    guidance_scale: float | None = None
    ema: bool = True  # sample with the EMA weights (what the checkpoint's ema/ holds)


@dataclass
class TrainConfig:
    seed: int = 42
    output_dir: str = "outputs/run"
    max_steps: int = 1000  # optimizer steps
    epochs: int = 1000
    mixed_precision: str | None = None  # no | fp16 | bf16; null: accelerate's setting
    cpu_threads: int | None = None
    log_every: int = 10
    ckpt_every: int = 200
    keep_last: int | None = None  # keep only the newest N checkpoints
    tensorboard: bool = True  # used when the tensorboard package is installed (pip install -e ".[training]")
    wandb_project: str | None = None  # also log to Weights & Biases (needs the wandb package)
    sp_size: int = 1  # sequence parallelism degree (needs opensora_sdk.distributed)
    mask_ratios: Any = "stage1"  # preset name ("v1.1" for STDiT2), {type: ratio} or null (STDiT: must be null)
    scheduler: dict = field(default_factory=dict)  # RectifiedFlow fields (STDiT3), or IDDPM's diffusion_steps (STDiT2 / STDiT)
    model: ModelSection = field(default_factory=ModelSection)
    vae: VAESection = field(default_factory=VAESection)
    text_encoder: TextEncoderSection = field(default_factory=TextEncoderSection)
    data: DataSection = field(default_factory=DataSection)
    features: FeaturesSection = field(default_factory=FeaturesSection)
    optim: OptimSection = field(default_factory=OptimSection)
    lora: LoraSection = field(default_factory=LoraSection)
    validation: ValidationSection = field(default_factory=ValidationSection)
    generation: dict = field(default_factory=dict)  # generation defaults recorded in checkpoints (height, width, num_frames, fps, ...)


_SECTION_TYPES = {
    "model": ModelSection, "vae": VAESection, "text_encoder": TextEncoderSection, "data": DataSection,
    "features": FeaturesSection, "optim": OptimSection, "lora": LoraSection, "validation": ValidationSection,
}  # fmt: skip
OPTIMIZERS = ("adamw", "adamw8bit")


def _build(cls, data: dict, where: str):
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ValueError(f"config section {where!r} must be a mapping, got {data!r}")
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ValueError(f"config section {where!r}: unknown key(s) {unknown}; allowed: {sorted(names)}")
    kwargs = {}
    types = {f.name: str(f.type) for f in dataclasses.fields(cls)}
    for key, value in data.items():
        if key in _SECTION_TYPES and cls is TrainConfig:
            value = _build(_SECTION_TYPES[key], value, key)
        elif types[key] == "float" and isinstance(value, str):
            value = _yaml_float(value)  # PyYAML reads 3e-4 (no dot) as a string
        kwargs[key] = value
    return cls(**kwargs)


def _yaml_float(text: str):
    try:
        return float(text)
    except ValueError:
        return text  # left for the checks below, which name the field


def apply_override(data: dict, assignment: str) -> None:
    """Apply "a.b.c=value" (value parsed as YAML) to nested dict `data` in place."""
    if "=" not in assignment:
        raise ValueError(f"--set {assignment!r} is not allowed: expected key.path=value, e.g. optim.lr=3e-4")
    path, _, raw = assignment.partition("=")
    keys = path.strip().split(".")
    node = data
    for key in keys[:-1]:
        node = node.setdefault(key, {})
        if not isinstance(node, dict):
            raise ValueError(f"--set {assignment!r}: {key!r} is not a section")
    node[keys[-1]] = yaml.safe_load(raw)


def load_train_config(path: str | Path | None, overrides: list[str] | None = None) -> TrainConfig:
    """Read a YAML training config (or the defaults when `path` is None), apply overrides, check it."""
    data = {}
    if path is not None:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f) or {}
        if not isinstance(data, dict):
            raise ValueError(f"training config {str(path)!r} must be a YAML mapping at the top level")
    for assignment in overrides or []:
        apply_override(data, assignment)
    cfg = _build(TrainConfig, data, "top level")
    check_config(cfg)
    return cfg


def _check(cond: bool, field_name: str, value, allowed: str) -> None:
    if not cond:
        raise ValueError(f"config {field_name}={value!r} is not allowed: {allowed}")


def _pos_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def check_config(cfg: TrainConfig) -> None:
    _check(cfg.mixed_precision in PRECISIONS, "mixed_precision", cfg.mixed_precision, f"one of {PRECISIONS}")
    for name in ("max_steps", "epochs", "log_every", "ckpt_every", "sp_size"):
        _check(_pos_int(getattr(cfg, name)), name, getattr(cfg, name), "an integer >= 1")
    _check(cfg.keep_last is None or _pos_int(cfg.keep_last), "keep_last", cfg.keep_last, "null or an integer >= 1")
    _check(cfg.cpu_threads is None or _pos_int(cfg.cpu_threads), "cpu_threads", cfg.cpu_threads, "null or an integer >= 1")
    m = cfg.model
    _check(m.preset is not None or m.from_pretrained is not None, "model.preset", m.preset,
           "a preset name, or null with model.from_pretrained set")  # fmt: skip
    o = cfg.optim
    _check(isinstance(o.lr, (int, float)) and o.lr > 0, "optim.lr", o.lr, "a number > 0 (official 1e-4)")
    _check(isinstance(o.eps, (int, float)) and o.eps > 0, "optim.eps", o.eps, "a number > 0 (official 1e-15)")
    _check(isinstance(o.weight_decay, (int, float)) and o.weight_decay >= 0, "optim.weight_decay", o.weight_decay, "a number >= 0")
    _check(isinstance(o.betas, (list, tuple)) and len(o.betas) == 2, "optim.betas", o.betas, "two numbers in [0, 1)")
    o.betas = tuple(float(b) for b in o.betas)
    _check(isinstance(o.warmup_steps, int) and o.warmup_steps >= 0, "optim.warmup_steps", o.warmup_steps, "an integer >= 0")
    _check(isinstance(o.decay_steps, int) and 0 <= o.decay_steps <= cfg.max_steps, "optim.decay_steps", o.decay_steps,
           f"an integer in [0, max_steps={cfg.max_steps}] (0 = no decay)")
    _check(isinstance(o.grad_clip, (int, float)) and o.grad_clip >= 0, "optim.grad_clip", o.grad_clip, "a number >= 0 (0 = off)")
    _check(_pos_int(o.gradient_accumulation_steps), "optim.gradient_accumulation_steps", o.gradient_accumulation_steps, "an integer >= 1")
    _check(m.type in MODEL_TYPES, "model.type", m.type, f"one of {MODEL_TYPES}")
    d = cfg.data
    _check(d.csv is not None, "data.csv", d.csv, "a path to a .csv or .parquet file")
    _check(bool(d.buckets) != (d.fixed_size is not None), "data.buckets", d.buckets,
           "a mapping {resolution: {num_frames: [keep_prob, batch_size]}}, or {} with data.fixed_size set")  # fmt: skip
    if d.fixed_size is not None:
        d.fixed_size = _fixed_size(d.fixed_size)
    _check(d.fps_condition in FPS_CONDITIONS, "data.fps_condition", d.fps_condition, f"one of {FPS_CONDITIONS}")
    _check(d.ar_condition in AR_CONDITIONS, "data.ar_condition", d.ar_condition, f"one of {AR_CONDITIONS}")
    _check(_pos_int(d.frame_interval), "data.frame_interval", d.frame_interval, "an integer >= 1")
    _check(d.length_rule in ("official", "window"), "data.length_rule", d.length_rule,
           "official (more than T * frame_interval source frames) or window (at least that many)")
    _check(isinstance(d.num_workers, int) and d.num_workers >= 0, "data.num_workers", d.num_workers, "an integer >= 0")
    t = cfg.text_encoder
    _check((t.from_pretrained is None) != (t.tiny_t5 is None), "text_encoder.from_pretrained", t.from_pretrained,
           "set exactly one of text_encoder.from_pretrained and text_encoder.tiny_t5")  # fmt: skip
    _check(_pos_int(cfg.features.batch_size), "features.batch_size", cfg.features.batch_size, "an integer >= 1")
    _check(o.name in OPTIMIZERS, "optim.name", o.name, f"one of {OPTIMIZERS}")
    if cfg.wandb_project:
        import importlib.util

        if importlib.util.find_spec("wandb") is None:
            raise ValueError(f"config wandb_project={cfg.wandb_project!r} needs the wandb package: pip install wandb")
    lo = cfg.lora
    _check(isinstance(lo.rank, int) and lo.rank >= 0, "lora.rank", lo.rank, "an integer >= 0 (0: full fine-tune)")
    _check(lo.alpha is None or (isinstance(lo.alpha, (int, float)) and lo.alpha > 0), "lora.alpha", lo.alpha, "null or a number > 0")
    _check(isinstance(lo.dropout, (int, float)) and 0 <= lo.dropout < 1, "lora.dropout", lo.dropout, "a number in [0, 1)")
    _check(isinstance(lo.target_modules, list) and lo.target_modules and all(isinstance(t, str) for t in lo.target_modules),
           "lora.target_modules", lo.target_modules, "a non-empty list of groups (attention, cross_attention, mlp) or name regexes")  # fmt: skip
    _check(lo.base_dtype in (None, "bf16", "fp16", "fp32"), "lora.base_dtype", lo.base_dtype, "null, bf16, fp16 or fp32")
    _check(lo.base_dtype in (None, "fp32") or cfg.mixed_precision in ("bf16", "fp16"), "lora.base_dtype", lo.base_dtype,
           "bf16 / fp16 base weights need mixed_precision: bf16 or fp16")  # fmt: skip
    _check(lo.save_dtype in ("fp32", "fp16", "bf16"), "lora.save_dtype", lo.save_dtype, "fp32, fp16 or bf16")
    v = cfg.validation
    _check(isinstance(v.every, int) and v.every >= 0, "validation.every", v.every, "an integer >= 0 (0: off)")
    _check(isinstance(v.prompts, list) and all(isinstance(p, str) for p in v.prompts), "validation.prompts", v.prompts, "a list of strings")
    _check(not v.every or bool(v.prompts), "validation.prompts", v.prompts, "at least one prompt when validation.every > 0")
    from opensora_sdk.presets import check_defaults

    try:
        check_defaults(cfg.generation)
    except ValueError as err:
        raise ValueError(f"config generation: {err}") from None


def _fixed_size(value) -> dict:
    """data.fixed_size checked: {num_frames: T, image_size: [H, W], batch_size: n}."""
    allowed = "{num_frames: T, image_size: [H, W], batch_size: n} with positive integers, e.g. {num_frames: 16, image_size: [256, 256], batch_size: 8}"
    ok = isinstance(value, dict) and set(value) == {"num_frames", "image_size", "batch_size"}
    ok = ok and isinstance(value["image_size"], (list, tuple)) and len(value["image_size"]) == 2
    ok = ok and all(_pos_int(v) for v in (value["num_frames"], value["batch_size"], *value["image_size"]))
    _check(ok, "data.fixed_size", value, allowed)
    return {"num_frames": value["num_frames"], "image_size": [int(v) for v in value["image_size"]], "batch_size": value["batch_size"]}


def config_as_dict(cfg: TrainConfig) -> dict:
    """Plain nested dict of a config (for the run folder and trackers)."""
    return json_safe(dataclasses.asdict(cfg))


def json_safe(value):
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value
