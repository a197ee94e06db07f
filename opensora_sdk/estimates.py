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
    C = transformer_config.hidden_size
    acts = rows * plan.video_tokens * C * TOKEN_ACTIVATION_FACTOR * nb
    T = -(-plan.latent_size[0] // transformer_config.patch_size[0])
    S = plan.video_tokens // max(T, 1)
    scores = rows * transformer_config.num_heads * max(T * S * S, S * T * T) * nb
    micro = getattr(vae_config, "micro_batch_size", 4) or plan.num_frames * B
    decode = min(micro, plan.num_frames * B) * _vae_decoder_peak_per_frame(vae_config, plan.height, plan.width)
    decode *= VAE_LIVE_TENSORS * nb
    clip = B * 3 * plan.num_frames * plan.height * plan.width * nb
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


__all__ = [
    "MemoryEstimate",
    "T5_XXL_CONFIG",
    "dtype_bytes",
    "estimate_memory",
    "gib",
    "stdit3_parameters",
    "t5_encoder_parameters",
    "vae_parameters",
]
