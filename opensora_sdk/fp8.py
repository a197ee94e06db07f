"""fp8 weight storage: Linear weights kept as float8 (e4m3) with scales, computed in the
activations' dtype.

`quantize_fp8(module)` replaces the `nn.Linear` layers of a loaded module (any dtype, e.g.
straight from a bf16 or fp32 checkpoint) by `FP8Linear` layers, one at a time, so the host
never holds a second full copy. Each keeps

    weight  [out, in]  float8_e4m3fn   round(W / scale), clamped to +-448
    scale   [out] (per output channel, default) or [] (per tensor), float32: amax / 448
    bias    [out]      the original bias, in the model dtype

and computes y = (x @ weight.to(x.dtype)^T) * scale + bias: the weight is cast (exactly: every
e4m3 value is a bfloat16 / float16 / float32 value) to the dtype of the input, bf16 on a GPU,
and the scale is applied to the output (the same as scaling each weight row, one multiply per
output instead of per weight). Only weights shrink: activations, norms and the layers listed
below stay as they were. Casting the model (`.to(torch.bfloat16)`) keeps the weights in
float8 and the scales in float32.

Kept in the model dtype, as the community's fp8 video checkpoints do (`STDIT3_KEEP`): the patch
embedding (a Conv3d), the timestep / fps / caption embedders and the timestep MLP (`t_block`),
the final layer, every norm and modulation table, and any Linear with fewer than
`min_weights` (default 4096) weights. So STDiT3 quantizes the attention (qkv, proj, q, kv,
proj) and MLP (fc1, fc2) layers of its blocks; T5 (`quantize_text_encoder_fp8`) the q, k, v,
o and feed-forward input layers (wi) of its blocks, keeping the token embedding, the norms and
the feed-forward output `wo` (`T5_KEEP`: sensitive to T5's large activations).

Files: `save_fp8(module, path)` writes a safetensors file with the float8 weights and their
scales and the metadata entry `FP8_METADATA_KEY` = "float8_e4m3fn"; `load_fp8_transformer`
reads one back (strict keys), `is_fp8_file` recognises one. Measured error: see
`benchmarks/bench_memory.py` and tests/test_fp8.py.
"""

from __future__ import annotations

import fnmatch
import os

import torch
from torch import nn
from torch.nn import functional as F

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0  # largest finite e4m3fn value
FP8_METADATA_KEY = "opensora_sdk.fp8"
STDIT3_KEEP = ("x_embedder*", "t_embedder*", "fps_embedder*", "t_block*", "y_embedder*", "final_layer*")
# T5: the token embedding, and the feed-forward output `wo` (the layer T5 keeps in float32 under
# float16 for its large activations; its forward casts its input to wo's dtype)
T5_KEEP = ("*shared*", "*embed_tokens*", "*.wo")
MIN_WEIGHTS = 4096


class FP8Linear(nn.Module):
    """A Linear layer with a float8 e4m3 weight and float32 scales (see the module docstring).
    x [..., in] -> [..., out] in x's dtype."""

    def __init__(self, in_features: int, out_features: int, *, bias: bool = True, per_channel: bool = True,
                 device=None, dtype: torch.dtype | None = None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.zeros(out_features, in_features, device=device, dtype=FP8_DTYPE),
                                   requires_grad=False)
        self.register_buffer("scale", torch.ones(out_features if per_channel else (), device=device))
        self.bias = nn.Parameter(torch.zeros(out_features, device=device, dtype=dtype), requires_grad=False) if bias else None

    @property
    def per_channel(self) -> bool:
        return self.scale.ndim == 1

    @classmethod
    @torch.no_grad()
    def from_linear(cls, linear: nn.Linear, per_channel: bool = True) -> FP8Linear:
        w = linear.weight
        layer = cls(linear.in_features, linear.out_features, bias=linear.bias is not None, per_channel=per_channel,
                    device="meta")
        weight, scale = quantize_weight(w, per_channel)
        layer.weight = nn.Parameter(weight, requires_grad=False)
        layer.scale = scale
        if linear.bias is not None:
            layer.bias = nn.Parameter(linear.bias.detach(), requires_grad=False)
        return layer

    def dequantized(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The weight [out, in] as `dtype` (scale applied)."""
        scale = self.scale[:, None] if self.per_channel else self.scale
        return (self.weight.float() * scale).to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight.to(x.dtype)) * self.scale.to(x.dtype)  # [..., out]
        return y + self.bias.to(x.dtype) if self.bias is not None else y

    def _apply(self, fn, recurse=True):  # every cast and move: weight stays fp8, scale float32
        super()._apply(fn, recurse)
        if self.weight.dtype != FP8_DTYPE and not self.weight.is_meta:
            self.weight.data = self.weight.data.to(FP8_DTYPE)  # exact: an fp8 value cast up and back
        elif self.weight.dtype != FP8_DTYPE:
            self.weight.data = torch.empty_like(self.weight.data, dtype=FP8_DTYPE)
        if self.scale.dtype != torch.float32:
            self.scale = self.scale.float()
        return self

    def extra_repr(self) -> str:
        kind = "per_channel" if self.per_channel else "per_tensor"
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, {kind}"


def quantize_weight(w: torch.Tensor, per_channel: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """W [out, in] -> (float8 [out, in], float32 scale [out] or []) with W ~ q * scale."""
    w = w.detach().float()
    amax = w.abs().amax(dim=1) if per_channel else w.abs().amax()
    scale = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))
    q = (w / (scale[:, None] if per_channel else scale)).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return q, scale


def _kept(name: str, skip) -> bool:
    return any(fnmatch.fnmatchcase(name, pattern) for pattern in skip)


def quantize_fp8(module: nn.Module, *, per_channel: bool = True, skip=(), min_weights: int = MIN_WEIGHTS) -> list[str]:
    """Replace the `nn.Linear` layers of `module` in place by `FP8Linear` (module docstring).

    `skip`: glob patterns of qualified layer names kept as they are (e.g. `STDIT3_KEEP`);
    Linear layers with fewer than `min_weights` weights are kept too. Returns the names of the
    layers quantized. Layers already in fp8 are left alone. Works on any device; the layer's
    weight is freed as its fp8 copy is made."""
    if isinstance(per_channel, str):
        per_channel = _scale_choice(per_channel)
    if not isinstance(min_weights, int) or min_weights < 0:
        raise ValueError(f"min_weights={min_weights!r} is not allowed: expected an integer >= 0")
    done = []
    for name, linear in [(n, m) for n, m in module.named_modules() if type(m) is nn.Linear]:
        if _kept(name, skip) or linear.weight.numel() < min_weights:
            continue
        parent_name, _, child = name.rpartition(".")
        parent = module.get_submodule(parent_name) if parent_name else module
        setattr(parent, child, FP8Linear.from_linear(linear, per_channel))
        done.append(name)
    return done


def quantize_transformer_fp8(transformer: nn.Module, *, per_channel: bool = True) -> list[str]:
    """`quantize_fp8` with the layers the community keeps (`STDIT3_KEEP`) for any Open-Sora
    transformer (the names are shared by STDiT3, STDiT2 and STDiT)."""
    return quantize_fp8(transformer, per_channel=per_channel, skip=STDIT3_KEEP)


def quantize_text_encoder_fp8(text_encoder, *, per_channel: bool = True, min_weights: int = MIN_WEIGHTS) -> list[str]:
    """fp8 weights for the Linear layers of a loaded `T5TextEncoder` (its blocks' attention and
    feed-forward); the token embedding and the norms stay. Its embedding-cache identity is
    recomputed from the new weights, so cached embeddings of the full-precision T5 are not
    reused."""
    done = quantize_fp8(text_encoder.model, per_channel=per_channel, skip=T5_KEEP,
                        min_weights=min_weights)
    text_encoder.fp8_scales = scales_name(per_channel)
    text_encoder._identity = None  # the identity hashes the weights (or names fp8): other weights
    text_encoder._host_copy = None  # the host copy no longer matches the layers
    return done


def fp8_layers(module: nn.Module) -> list[str]:
    return [n for n, m in module.named_modules() if isinstance(m, FP8Linear)]


def scales_name(per_channel: bool | str) -> str:
    """"per_channel" or "per_tensor" for a `per_channel` argument (a bool or one of those names)."""
    if isinstance(per_channel, str):
        per_channel = _scale_choice(per_channel)
    return "per_channel" if per_channel else "per_tensor"


def _scale_choice(text: str) -> bool:
    if text not in ("per_channel", "per_tensor"):
        raise ValueError(f"fp8 scales {text!r} are not allowed: choose per_channel or per_tensor")
    return text == "per_channel"


def weight_bytes(module: nn.Module) -> int:
    """Bytes of the parameters and buffers of `module`."""
    return sum(t.numel() * t.element_size() for t in list(module.parameters()) + list(module.buffers()))


# --------------------------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------------------------


def save_fp8(module: nn.Module, path: str | os.PathLike, metadata: dict[str, str] | None = None) -> None:
    """Write `module`'s state dict (its `FP8Linear` weights in float8 with their `.scale`) to a
    safetensors file, atomically, marked with `FP8_METADATA_KEY` and the compute dtype."""
    from opensora_sdk.loading import save_safetensors_atomic

    if not fp8_layers(module):
        raise ValueError(f"{type(module).__name__} has no fp8 layers to save: call quantize_fp8 first")
    state = {k: v.detach().contiguous() for k, v in module.state_dict().items()}
    other = [v.dtype for k, v in state.items() if v.is_floating_point() and v.dtype != FP8_DTYPE
             and not k.endswith(".scale") and k != "rope.freqs"]
    dtype = max(set(other), key=other.count) if other else torch.float32
    meta = {"format": "pt", FP8_METADATA_KEY: "float8_e4m3fn", "dtype": str(dtype).removeprefix("torch."),
            "model_type": type(module).__name__, **(metadata or {})}
    save_safetensors_atomic(state, path, metadata=meta)


def _metadata(path) -> dict[str, str]:
    from safetensors import safe_open

    with safe_open(os.fspath(path), framework="pt") as f:
        return f.metadata() or {}


def _fp8_keys(path) -> list[str]:
    from safetensors import safe_open

    with safe_open(os.fspath(path), framework="pt") as f:
        return [k for k in f.keys() if f.get_slice(k).get_dtype() == "F8_E4M3"]


def is_fp8_file(path) -> bool:
    """Whether `path` is a safetensors file written by `save_fp8` (by its metadata entry)."""
    path = os.fspath(path) if isinstance(path, (str, os.PathLike)) else None
    if path is None or not path.endswith(".safetensors") or not os.path.isfile(path):
        return False
    try:
        return FP8_METADATA_KEY in _metadata(path)
    except Exception:  # not a readable safetensors file: the ordinary loader reports it
        return False


def load_fp8_into(model: nn.Module, path: str | os.PathLike, *, device=None) -> nn.Module:
    """Load a `save_fp8` file into `model` (built on the meta device or with weights): the layers
    that have a `.scale` in the file become `FP8Linear`, then every key must match (strict).
    Tensors keep the file's dtypes. Returns `model`."""
    from opensora_sdk.loading import CheckpointError, iter_tensors, load_tensors_into, read_shapes

    meta = _metadata(path)
    if FP8_METADATA_KEY not in meta:
        raise CheckpointError(f"{os.fspath(path)!r} is not an fp8 file (no {FP8_METADATA_KEY!r} metadata entry)")
    dtype = getattr(torch, meta.get("dtype", "bfloat16"))
    shapes = read_shapes(path)
    fp8_weights = {k[: -len(".weight")] for k in _fp8_keys(path) if k.endswith(".weight")}
    scaled = {k[: -len(".scale")] for k in shapes if k.endswith(".scale")}
    unpaired = [f"{n}.scale missing" for n in sorted(fp8_weights - scaled)]
    unpaired += [f"{n}.weight not fp8" for n in sorted(scaled - fp8_weights)]
    unpaired += [f"{k} is fp8 but not a weight" for k in _fp8_keys(path) if not k.endswith(".weight")]
    if unpaired:
        raise CheckpointError(f"{os.fspath(path)!r}: every fp8 weight needs its .scale and every .scale an fp8 "
                              f"weight: {unpaired[:5]}")
    for key, shape in shapes.items():
        if not key.endswith(".scale"):
            continue
        name = key[: -len(".scale")]
        try:
            layer = model.get_submodule(name)
        except AttributeError:
            raise CheckpointError(f"{os.fspath(path)!r}: fp8 layer {name!r} is not a layer of {type(model).__name__}") from None
        if isinstance(layer, FP8Linear):
            continue
        if type(layer) is not nn.Linear:
            raise CheckpointError(f"{os.fspath(path)!r}: fp8 layer {name!r} is a {type(layer).__name__}, not a Linear")
        parent_name, _, child = name.rpartition(".")
        with torch.device("meta"):
            new = FP8Linear(layer.in_features, layer.out_features, bias=layer.bias is not None,
                            per_channel=len(shape) == 1)
        setattr(model.get_submodule(parent_name) if parent_name else model, child, new)
    model.to(dtype)
    keep = [k for k in shapes if k.endswith(".scale")] + ["rope.freqs"]
    load_tensors_into(model, iter_tensors([path]), strict=True, dtype=None, device=device, keep_float32=keep)
    return model


def load_fp8_transformer(path: str | os.PathLike, *, device=None, config=None) -> nn.Module:
    """An Open-Sora v1.2 transformer (STDiT3) from a `save_fp8` file; the config comes from
    `config` or from the tensor shapes."""
    from opensora_sdk.loading import read_shapes
    from opensora_sdk.models.stdit3 import STDiT3, infer_config

    if config is None:
        config = infer_config({k: tuple(v) for k, v in read_shapes(path).items()})
    with torch.device("meta"):
        model = STDiT3(config)
    return load_fp8_into(model, path, device=device or "cpu").eval().requires_grad_(False)


__all__ = [
    "FP8Linear", "FP8_METADATA_KEY", "STDIT3_KEEP", "fp8_layers", "is_fp8_file", "load_fp8_into",
    "load_fp8_transformer", "quantize_fp8", "quantize_text_encoder_fp8", "quantize_transformer_fp8",
    "quantize_weight", "save_fp8", "scales_name", "weight_bytes",
]  # fmt: skip
