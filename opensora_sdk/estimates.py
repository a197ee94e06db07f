"""Memory estimates for a generation, from the model configs alone (no weights loaded).

What `opensora info` prints. All figures are bytes; they are estimates of the tensors that
must exist at once, not measurements (allocator caches and framework overhead come on top).

* **Weights** per component: parameters x bytes per value of its dtype (T5 usually float32,
  STDiT3 and the VAE at the pipeline dtype). Parameter counts come from building the model on
  the meta device (STDiT3, VAE) or from the T5 config (`t5_encoder_parameters`).
* **Transformer activations**, one forward pass: rows x N x hidden x 12 x bytes, where rows =
  2B with classifier-free guidance (B without), N = video tokens per sample and 12 counts the
  per-token tensors alive at once inside a block at its peak (the MLP): the residual stream,
  its normalised and modulated copy, the MLP hidden layer before and after GELU (2 x 4) and
  the MLP output, plus one for the broadcast modulation.
* **Attention scores**, only when attention runs unfused (the "math" SDPA path): rows x heads
  x max(T x S^2, S x T^2) x bytes (spatial: S x S per frame; temporal: T x T per position).
  Fused kernels (flash, memory-efficient SDPA, xformers) never hold them.
* **VAE decode**: micro_batch_size frames of the 2D decoder at its widest level (channels x
  pixels after each up block's upsampling) x 3 live tensors x bytes, plus the decoded clip
  [B, 3, N, H, W] at the VAE dtype.
* **Peak on the device**, phase by phase under the memory policy (T5 leaves after encoding):
  text = T5 weights; sampling = STDiT3 weights + activations (+ VAE weights when the VAE ran
  before sampling and `offload` is None); decoding = VAE weights + decode working set +
  clip (+ STDiT3 weights when `offload` is None). On a CPU run every weight stays in memory.

`estimate_peak` gives one number for a resource guard: the peak over some phases when the
models take turns on the device (each leaves after its phase, as ComfyUI runs them), counting
only the weights that still have to move there.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

# DeepFloyd/t5-v1_1-xxl (the encoder half is what Open-Sora uses).
T5_XXL_CONFIG = {
    "vocab_size": 32128, "d_model": 4096, "d_kv": 64, "d_ff": 10240, "num_layers": 24, "num_heads": 64,
    "relative_attention_num_buckets": 32, "feed_forward_proj": "gated-gelu",
}  # fmt: skip
TOKEN_ACTIVATION_FACTOR = 12
VAE_LIVE_TENSORS = 3


def dtype_bytes(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def module_parameters(build) -> int:
    """Parameters and buffers of the module `build()` makes on the meta device."""
    with torch.device("meta"):
        module = build()
    return sum(t.numel() for t in module.parameters()) + sum(b.numel() for b in module.buffers())


def stdit3_parameters(config) -> int:
    """Parameters of the transformer of any family (STDiT3Config, STDiT2Config, STDiTConfig)."""
    from opensora_sdk.models.auto import build_transformer

    return module_parameters(lambda: build_transformer(config))


def vae_parameters(config) -> int:
    """Parameters of the v1.2 video VAE or of the per-frame SD VAE."""
    from opensora_sdk.models.auto import build_vae

    return module_parameters(lambda: build_vae(config))


def t5_encoder_parameters(config: dict) -> int:
    """Parameters of a transformers `T5EncoderModel` from its config fields.

    embeddings V*d + per layer (q, k, v, o: 4*d*H*d_kv; feed-forward 3*d*d_ff when gated,
    else 2*d*d_ff; two RMS norms 2*d) + relative position bias buckets*H + final norm d.
    """
    d, inner = config["d_model"], config["num_heads"] * config["d_kv"]
    ff = (3 if "gated" in config.get("feed_forward_proj", "relu") else 2) * d * config["d_ff"]
    layer = 4 * d * inner + ff + 2 * d
    buckets = config.get("relative_attention_num_buckets", 32) * config["num_heads"]
    return config["vocab_size"] * d + config["num_layers"] * layer + buckets + d


@dataclass
class MemoryEstimate:
    weights: dict[str, int]  # bytes per component
    transformer_activations: int
    attention_scores: int
    vae_decode: int
    decoded_clip: int
    peak: int
    phases: dict[str, int] = field(default_factory=dict)

    def lines(self) -> list[str]:
        out = [f"weights {name}: {gib(b)}" for name, b in self.weights.items()]
        out += [
            f"transformer activations (one step): {gib(self.transformer_activations)}",
            f"attention scores (unfused attention only): {gib(self.attention_scores)}",
            f"VAE decode working set: {gib(self.vae_decode)} + decoded clip {gib(self.decoded_clip)}",
            "peak by phase: " + ", ".join(f"{k} {gib(v)}" for k, v in self.phases.items()),
            f"estimated peak: {gib(self.peak)}",
        ]
        return out


def gib(nbytes: int) -> str:
    return f"{nbytes / 2**30:.2f} GiB" if nbytes >= 2**27 else f"{nbytes / 2**20:.1f} MiB"


def _vae_decoder_peak_per_frame(vae_config, height: int, width: int) -> int:
    """Largest channels x pixels of the 2D decoder (values per frame)."""
    kl = getattr(vae_config, "vae_2d", vae_config)  # the per-frame SD VAE is an AutoencoderKLConfig
    channels = tuple(reversed(kl.block_out_channels))
    f = 2 ** (len(channels) - 1)
    pixels = (height // f) * (width // f)
    best = 0
    for k, c in enumerate(channels):
        scale = 4 ** min(k + 1, len(channels) - 1)  # resolution after this block's upsampler
        best = max(best, c * pixels * scale)
    return best


def transformer_activation_bytes(transformer_config, rows: int, tokens: int, dtype: torch.dtype) -> int:
    """One forward pass of the transformer on `rows` rows of `tokens` tokens (see the docstring)."""
    return rows * tokens * transformer_config.hidden_size * TOKEN_ACTIVATION_FACTOR * dtype_bytes(dtype)


def vae_decode_bytes(vae_config, batch: int, num_frames: int, height: int, width: int, dtype: torch.dtype):
    """(working set of one micro-batch of the 2D decoder, the decoded clip [B, 3, N, H, W]) in
    bytes. The working set also bounds the encoder's (its widest level is narrower)."""
    nb = dtype_bytes(dtype)
    micro = getattr(vae_config, "micro_batch_size", 4) or num_frames * batch
    decode = min(micro, num_frames * batch) * _vae_decoder_peak_per_frame(vae_config, height, width)
    return decode * VAE_LIVE_TENSORS * nb, batch * 3 * num_frames * height * width * nb


def estimate_memory(
    plan,
    transformer_config,
    vae_config,
    t5_config: dict,
    *,
    dtype: torch.dtype = torch.bfloat16,
    text_encoder_dtype: torch.dtype = torch.float32,
    offload: str | None = None,
    device_type: str = "cuda",
    parameters: dict[str, int] | None = None,
) -> MemoryEstimate:
    """See the module docstring for the formulas. `plan` is a `GenerationPlan`."""
    p = parameters or {
        "text_encoder": t5_encoder_parameters(t5_config),
        "transformer": stdit3_parameters(transformer_config),
        "vae": vae_parameters(vae_config),
    }
    nb, tb = dtype_bytes(dtype), dtype_bytes(text_encoder_dtype)
    weights = {"text_encoder": p["text_encoder"] * tb, "transformer": p["transformer"] * nb, "vae": p["vae"] * nb}
    B = plan.latent_shape[0]
    rows = 2 * B if plan.guidance_scale != 1 else B
    acts = transformer_activation_bytes(transformer_config, rows, plan.video_tokens, dtype)
    T = -(-plan.latent_size[0] // transformer_config.patch_size[0])
    S = plan.video_tokens // max(T, 1)
    scores = rows * transformer_config.num_heads * max(T * S * S, S * T * T) * nb
    decode, clip = vae_decode_bytes(vae_config, B, plan.num_frames, plan.height, plan.width, dtype)
    vae_before = plan.loop > 1 or any(s.references or s.conditions for s in plan.samples)
    if device_type == "cpu":
        resident = sum(weights.values())
        phases = {"text": resident, "sampling": resident + acts, "decoding": resident + decode + clip}
    else:
        keep = offload is None
        phases = {
            "text": weights["text_encoder"],
            "sampling": weights["transformer"] + acts + (weights["vae"] if keep and vae_before else 0),
            "decoding": weights["vae"] + decode + clip + (weights["transformer"] if keep else 0),
        }
    return MemoryEstimate(weights, acts, scores, decode, clip, max(phases.values()), phases)


def estimate_peak(
    plan,
    transformer_config,
    vae_config,
    *,
    dtype: torch.dtype,
    weights: dict[str, int] | None = None,
    phases: tuple[str, ...] = ("sampling", "decoding"),
) -> int:
    """Estimated peak bytes on the compute device over `phases` of `plan` ("sampling",
    "decoding", "encoding": references or loop carry-over) when the models take turns on the
    device: the number a resource guard compares with the free memory.

    `weights`: bytes per component ("transformer", "vae") that must still move to the device
    for its phase; a component already there (or, on a CPU, already in memory) counts 0.
    Activations follow `estimate_memory` (fused attention: no score matrices)."""
    w = weights or {}
    none = {"text_encoder": 0, "transformer": 0, "vae": 0}
    est = estimate_memory(plan, transformer_config, vae_config, {}, dtype=dtype, parameters=none, offload="model")
    B = plan.latent_shape[0]
    encode, _ = vae_decode_bytes(vae_config, B, plan.num_frames, plan.height, plan.width, dtype)
    peaks = {
        "sampling": w.get("transformer", 0) + est.transformer_activations,
        "decoding": w.get("vae", 0) + est.vae_decode + est.decoded_clip,
        "encoding": w.get("vae", 0) + encode,
    }
    unknown = set(phases) - set(peaks)
    if unknown:
        raise ValueError(f"phases {sorted(unknown)} are not among {sorted(peaks)}")
    return max(peaks[p] for p in phases)


# --------------------------------------------------------------------------------------------
# Training (a full fine-tune or a LoRA), per process, precomputed features
# --------------------------------------------------------------------------------------------

# Bytes kept for the backward pass per token, per hidden channel, per transformer block (spatial
# and temporal blocks each count), measured on STDiT3 with saved-tensor hooks at two depths (the
# difference per block; tests/test_lora.py checks the formula on another config): a full
# fine-tune keeps ~28 values of C channels per token (the inputs of every linear layer, norms,
# attention q/k/v/out, the MLP's 4C hidden twice), a LoRA ~22 (frozen layers keep no inputs for
# weight gradients); 4 bytes each in float32, ~2.6 on average under bf16 / fp16 autocast (norms
# and the residual stream stay float32). With gradient checkpointing a block keeps its float32
# input (4 bytes) and one block at a time is recomputed. Outside the blocks (embedders, final
# layer): `OUTSIDE_BLOCKS_BYTES` per token and channel.
TRAIN_ACTIVATION_BYTES = {("full", "fp32"): 112, ("full", "mixed"): 72, ("lora", "fp32"): 89, ("lora", "mixed"): 61}
CHECKPOINT_BYTES = 4
OUTSIDE_BLOCKS_BYTES = {"full": 15, "lora": 4}


@dataclass
class TrainingEstimate:
    weights: int  # frozen + trainable weights
    gradients: int
    optimizer: int
    ema: int
    activations: int
    peak: int
    parameters: int
    trainable: int

    def lines(self) -> list[str]:
        return [f"weights {gib(self.weights)} ({self.parameters / 1e6:.1f}M parameters, {self.trainable / 1e6:.2f}M trainable)",
                f"gradients {gib(self.gradients)}", f"optimizer {gib(self.optimizer)}", f"EMA {gib(self.ema)}",
                f"activations {gib(self.activations)}", f"estimated peak {gib(self.peak)}"]  # fmt: skip


def lora_parameters(transformer_config, rank: int, targets=None) -> int:
    """Parameters of a rank-`rank` adapter on the layers `targets` (regexes; default: all groups
    of `opensora_sdk.lora`) of the transformer `transformer_config` describes (built on meta)."""
    from opensora_sdk import lora
    from opensora_sdk.models.auto import build_transformer

    with torch.device("meta"):
        model = build_transformer(transformer_config)
    layers = lora.linear_layers(model)
    names = lora.target_names(model, targets or lora.DEFAULT_TARGETS)
    return sum(rank * (layers[n].in_features + layers[n].out_features) for n in names)


def estimate_training(
    model_or_config,
    *,
    batch: int,
    num_frames: int,
    height: int,
    width: int,
    vae_config=None,
    mixed_precision: str | None = "bf16",
    gradient_checkpointing: bool = False,
    optimizer: str = "adamw",
    ema: bool = True,
    lora_rank: int | None = None,
    lora_targets=None,
    base_dtype: torch.dtype | None = None,
    extra_weights: int = 0,
) -> TrainingEstimate:
    """Device memory of one training step of the transformer on precomputed features.

    weights: every parameter (frozen ones in `base_dtype`, default float32; trainable ones
    float32); gradients: 4 bytes per trainable parameter; optimizer: 8 (AdamW) or 2 (8-bit
    AdamW); EMA: 4. Activations: blocks x tokens x hidden x `TRAIN_ACTIVATION_BYTES` (with
    gradient checkpointing: blocks x tokens x hidden x `CHECKPOINT_BYTES` plus one block
    recomputed). Tokens = batch x latent frames x latent patches of the frame (the v1.2 VAE's
    17 -> 5 chunks unless `vae_config` says otherwise). `model_or_config`: a model (a LoRA on it
    is counted as the trainable part) or a transformer config (then `lora_rank` / `lora_targets`).
    `extra_weights`: bytes of other models on the device (VAE, T5 without precomputed features).
    """
    from opensora_sdk.models.vae import latent_size

    if isinstance(model_or_config, torch.nn.Module):
        config = model_or_config.config
        params = list(model_or_config.parameters())
        total = sum(p.numel() for p in params)
        trainable = sum(p.numel() for p in params if p.requires_grad)
        is_lora = any(".lora_" in n for n, _ in model_or_config.named_parameters())
        frozen_bytes = sum(p.numel() * p.element_size() for p in params if not p.requires_grad)
    else:
        config = model_or_config
        base = stdit3_parameters(config)
        is_lora = bool(lora_rank)
        trainable = lora_parameters(config, lora_rank, lora_targets) if is_lora else base
        total = base + (trainable if is_lora else 0)
        frozen_bytes = base * dtype_bytes(base_dtype or torch.float32) if is_lora else 0
    micro = getattr(vae_config, "micro_frame_size", 17) if vae_config is not None else 17
    T, h, w = latent_size(num_frames, height, width, micro_frame_size=micro)
    pt, ph, pw = config.patch_size
    tokens = batch * -(-T // pt) * -(-h // ph) * -(-w // pw)
    # STDiT3: a spatial and a temporal block per depth; STDiT2 / STDiT: one block holding both
    # attentions (about 1.4 STDiT3 blocks of activations)
    blocks = 2 * config.depth if type(config).__name__ == "STDiT3Config" else 1.4 * config.depth
    C = config.hidden_size
    per_block = tokens * C * TRAIN_ACTIVATION_BYTES[("lora" if is_lora else "full",
                                                     "mixed" if mixed_precision in ("bf16", "fp16") else "fp32")]
    outside = tokens * C * OUTSIDE_BLOCKS_BYTES["lora" if is_lora else "full"]
    activations = int(outside + ((blocks * tokens * C * CHECKPOINT_BYTES + per_block) if gradient_checkpointing else blocks * per_block))
    weights = frozen_bytes + trainable * 4
    grads, opt = trainable * 4, trainable * (2 if optimizer == "adamw8bit" else 8)
    ema_bytes = trainable * 4 if ema else 0
    peak = weights + grads + opt + ema_bytes + activations + extra_weights
    return TrainingEstimate(weights, grads, opt, ema_bytes, activations, peak, total, trainable)


__all__ = [
    "MemoryEstimate",
    "T5_XXL_CONFIG",
    "TrainingEstimate",
    "estimate_training",
    "lora_parameters",
    "dtype_bytes",
    "estimate_memory",
    "estimate_peak",
    "gib",
    "stdit3_parameters",
    "t5_encoder_parameters",
    "transformer_activation_bytes",
    "vae_decode_bytes",
    "vae_parameters",
]
