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

**Memory modes** (`estimate_memory(..., fp8=, block_swap=, offload=)`, `estimate_modes`):

* fp8 (`opensora_sdk.fp8`): the quantized Linear weights take 1 byte each plus a float32
  scale per output channel; every other tensor keeps its dtype. T5 likewise (q, k, v, o and
  wi in fp8; wo and the embedding at the T5 dtype).
* block swap N: the transformer's weights on the device are its layers outside the blocks +
  min(blocks, N + 2) blocks (N resident, the running one and the one being copied); T5's are
  its embedding and final norm + 2 blocks (it streams every block);
* offload "sequential": the transformer's layers outside the blocks + 1 block, T5's embedding
  and final norm + 1 block, the VAE whole during its phases; every model leaves after use.
  Activations do not change with any of these.

Checked against measurements on the CPU (tests/test_estimates.py): weight bytes exactly (fp8
layers, blocks present during a block-swapped forward), activations of one forward within
[1.0, 1.5] x the formula (a live-tensor counter over every op's outputs).

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
class WeightSplit:
    """Values of a transformer (or T5) by where they go: `blocks` per block, `rest` outside the
    blocks; each as (Linear weights fp8 would quantize, their output channels, other values)."""

    blocks: list[tuple[int, int, int]]
    rest: tuple[int, int, int]
    float32: int = 0  # values outside the blocks that stay float32 whatever the dtype (RoPE table)

    def total(self) -> int:
        return sum(sum(b) - b[1] for b in self.blocks) + sum(self.rest) - self.rest[1] + self.float32


def _split_values(module, skip=(), min_weights=None) -> tuple[int, int, int]:
    from opensora_sdk import fp8

    min_weights = fp8.MIN_WEIGHTS if min_weights is None else min_weights
    lin_w = lin_out = 0
    quantized = set()
    for name, m in module.named_modules():
        if type(m) is torch.nn.Linear and not fp8._kept(name, skip) and m.weight.numel() >= min_weights:
            lin_w, lin_out = lin_w + m.weight.numel(), lin_out + m.out_features
            quantized.add(id(m.weight))
    other = sum(t.numel() for t in list(module.parameters()) + list(module.buffers()) if id(t) not in quantized)
    return lin_w, lin_out, other


def transformer_weight_split(config) -> WeightSplit:
    """`WeightSplit` of the transformer `config` describes (built on the meta device)."""
    from opensora_sdk import fp8
    from opensora_sdk.models.auto import build_transformer
    from opensora_sdk.offload import transformer_blocks

    with torch.device("meta"):
        model = build_transformer(config)
    blocks = transformer_blocks(model)  # a block's own tensors stay with the rest (offload.streamed_tensors)
    per_block = []
    for block in blocks:
        parts = [_split_values(child) for child in block.children()]
        per_block.append(tuple(sum(p[i] for p in parts) for i in range(3)))
    whole = _split_values(model, fp8.STDIT3_KEEP)
    rest = [w - sum(b[i] for b in per_block) for i, w in enumerate(whole)]
    freqs = getattr(getattr(model, "rope", None), "freqs", None)
    float32 = freqs.numel() if freqs is not None else 0
    rest[2] -= float32
    return WeightSplit(per_block, tuple(rest), float32)


def t5_weight_split(config: dict) -> WeightSplit:
    """`WeightSplit` of a T5 encoder from its config fields (see `t5_encoder_parameters`): per
    layer q, k, v, o and wi in fp8 (`fp8.T5_KEEP` keeps wo), the rest at the T5 dtype."""
    d, inner, ff = config["d_model"], config["num_heads"] * config["d_kv"], config["d_ff"]
    wi = 2 if "gated" in config.get("feed_forward_proj", "relu") else 1
    lin_w, lin_out = 4 * d * inner + wi * d * ff, 3 * inner + d + wi * ff
    other = ff * d + 2 * d
    buckets = config.get("relative_attention_num_buckets", 32) * config["num_heads"]
    return WeightSplit([(lin_w, lin_out, other)] * config["num_layers"], (0, 0, config["vocab_size"] * d + buckets + d))


def _bytes(part: tuple[int, int, int], nb: int, fp8: bool) -> int:
    lin_w, lin_out, other = part
    return (lin_w + lin_out * 4 + other * nb) if fp8 else (lin_w + other) * nb


def device_weight_bytes(split: WeightSplit, nb: int, *, fp8: bool = False, blocks_on_device: int | None = None) -> int:
    """Bytes of `split`'s weights on the device at once: all of them, or with `blocks_on_device`
    = N (block swap; 0 and no prefetch is sequential offload, pass -1 for that: one block) the
    rest + min(blocks, N + 2) of the largest blocks."""
    rest = _bytes(split.rest, nb, fp8) + split.float32 * 4
    sizes = sorted((_bytes(b, nb, fp8) for b in split.blocks), reverse=True)
    if blocks_on_device is None:
        return rest + sum(sizes)
    count = 1 if blocks_on_device < 0 else min(len(sizes), blocks_on_device + 2)
    return rest + sum(sizes[:count])


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
    fp8: bool = False,
    block_swap: int | None = None,
    text_cached: bool = False,
) -> MemoryEstimate:
    """See the module docstring for the formulas. `plan` is a `GenerationPlan`. `fp8`: the
    transformer's and T5's Linear weights in float8; `block_swap`: transformer blocks kept on
    the device (the others stream); `offload`: None, "model" or "sequential"; `text_cached`:
    every prompt is in the text cache, so T5 never loads (no weights, no text phase)."""
    p = parameters or {
        "text_encoder": t5_encoder_parameters(t5_config),
        "transformer": stdit3_parameters(transformer_config),
        "vae": vae_parameters(vae_config),
    }
    nb, tb = dtype_bytes(dtype), dtype_bytes(text_encoder_dtype)
    weights = {"text_encoder": p["text_encoder"] * tb, "transformer": p["transformer"] * nb, "vae": p["vae"] * nb}
    sequential = offload == "sequential"
    on_device = dict(weights)  # weights on the device during a component's own phase
    kept_transformer = weights["transformer"]  # what stays on the device after sampling (offload None)
    if fp8 or block_swap is not None or sequential:
        tr, t5 = transformer_weight_split(transformer_config), t5_weight_split(t5_config)
        weights["transformer"] = device_weight_bytes(tr, nb, fp8=fp8)
        weights["text_encoder"] = device_weight_bytes(t5, tb, fp8=fp8)
        swap = -1 if sequential else block_swap
        on_device["transformer"] = device_weight_bytes(tr, nb, fp8=fp8, blocks_on_device=swap)
        t5_swap = -1 if sequential else (0 if block_swap is not None else None)  # block swap streams T5 too
        on_device["text_encoder"] = device_weight_bytes(t5, tb, fp8=fp8, blocks_on_device=t5_swap)
        if block_swap is not None:  # the resident part stays; streamed blocks are on the host
            kept_transformer = device_weight_bytes(WeightSplit(tr.blocks[:block_swap], tr.rest, tr.float32), nb, fp8=fp8)
        else:
            kept_transformer = weights["transformer"]
    if text_cached:
        weights["text_encoder"] = on_device["text_encoder"] = 0
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
            "text": on_device["text_encoder"],
            "sampling": on_device["transformer"] + acts + (weights["vae"] if keep and vae_before else 0),
            "decoding": weights["vae"] + decode + clip + (kept_transformer if keep else 0),
        }
    if text_cached:
        del phases["text"]
    return MemoryEstimate(weights, acts, scores, decode, clip, max(phases.values()), phases)


MODES = ("bf16", "fp8", "fp8 + block swap", "sequential offload")


def estimate_modes(plan, transformer_config, vae_config, t5_config: dict, *, block_swap: int = 0,
                   text_encoder_dtype: torch.dtype = torch.bfloat16,
                   text_cached: bool = False) -> dict[str, MemoryEstimate]:
    """Peak device memory of `plan` on a GPU in each of `MODES`, all bf16: plain (models stay
    after use), fp8 weights (transformer and T5), fp8 with `block_swap` blocks on the device
    and the models leaving after use, and sequential offload (bf16 weights)."""
    kw = dict(dtype=torch.bfloat16, text_encoder_dtype=text_encoder_dtype, device_type="cuda",
              text_cached=text_cached)  # fmt: skip
    args = (plan, transformer_config, vae_config, t5_config)
    return {
        "bf16": estimate_memory(*args, **kw),
        "fp8": estimate_memory(*args, fp8=True, **kw),
        "fp8 + block swap": estimate_memory(*args, fp8=True, block_swap=block_swap, offload="model", **kw),
        "sequential offload": estimate_memory(*args, offload="sequential", **kw),
    }


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
    "MODES",
    "MemoryEstimate",
    "WeightSplit",
    "device_weight_bytes",
    "estimate_modes",
    "t5_weight_split",
    "transformer_weight_split",
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
