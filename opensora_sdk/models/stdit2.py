"""STDiT2, the Open-Sora v1.1 diffusion transformer (spec section 9.1).

Reads top-down: the v1.1 attention order, the block, the model, loading, then the family
detector that tells STDiT2 / STDiT3 / STDiT (v1.0) checkpoints apart by their keys.

What is the same as STDiT3 (spec section 2) and reused from it: patch embedding, the 2D
sin-cos position embedding with its scale sqrt(height[0] * width[0]) / input_sq_size and
base_size = round(sqrt(S)) (spec 9.1: "pos_emb is the same as in v1.2"), the timestep and
size embedders, the caption embedder and text-token selection, self-attention with RMS
qk-norm, cross-attention, the MLP, RoPE and the final layer with its double-norm quirk.

What differs (spec 9.1):

* One block holds spatial attention, temporal attention (`attn_temp`), cross-attention and
  the MLP (STDiT3 has separate spatial and temporal blocks, each with its own
  cross-attention and MLP).
* The temporal attention has its own LayerNorm (`norm_temp`) and its own modulation: 3 rows
  from `scale_shift_table_temporal` + `t_block_temp(t + fl)`.
* Conditioning: the spatial vector is t + data_info, with data_info = [csize_embedder([h, w])
  (2 x C/3) | ar_embedder(ar) (C/3)]; the temporal vector is t + fl_embedder(num_frames) +
  fps_embedder(fps). STDiT3 adds fps to t and has one t_block.
* RoPE is applied *before* the RMS qk-norm in temporal attention (`qk_norm_legacy=True`).
* The final layer takes plain t (no data_info) for generated frames but t0 + data_info for
  conditioning frames.
* Output: 2 * in_channels (epsilon and the learned variance of IDDPM).

Shapes: latents [B, C_in, T, H, W]; tokens [B, N, C] with N = T*S, frame-major; S = H_p*W_p.
"""

from __future__ import annotations

import json
import math
import os
import re
import warnings
from collections.abc import Iterable
from pathlib import Path

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from opensora_sdk.configs import STDiT2Config, config_from_dict, config_to_dict
from opensora_sdk.loading import (
    CheckpointError,
    iter_tensors,
    load_tensors_into,
    resolve_checkpoint,
    save_safetensors_atomic,
    strip_key_prefixes,
    write_json_atomic,
)
from opensora_sdk.models.attention import attention, check_backend
from opensora_sdk.models.forward_checks import (
    check_latents,
    check_text,
    check_timestep,
    check_x_mask,
)
from opensora_sdk.models.layers import (
    MLP,
    CaptionEmbedder,
    DropPath,
    PatchEmbed3D,
    PositionEmbedding2D,
    RMSNorm,
    RotaryEmbedding,
    SizeEmbedder,
    T2IFinalLayer,
    TimestepEmbedder,
    bf16_round,
    modulation_table,
    pack_text_tokens,
    t2i_modulate,
    unpatchify,
)
from opensora_sdk.models.stdit3_blocks import CrossAttention, SelfAttention


class RoPEFirstSelfAttention(SelfAttention):
    """v1.1 self-attention order: RoPE, then RMS qk-norm (spec 9.1, "Attention order").

    Same parameters and math as the v1.2 `SelfAttention` (norm, then RoPE) otherwise; the
    two orders differ only when both RoPE and qk-norm are on (temporal attention).
    """

    def forward(self, x: torch.Tensor, rope=None, key_padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        """x [B', N', C]; rope: (cos, sin) or None."""
        B, N, C = x.shape
        qkv = self.qkv(x).view(B, N, 3, self.num_heads, C // self.num_heads)  # [B, N, 3, H, D]
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each [B, H, N, D]
        if rope is not None:
            q, k = RotaryEmbedding.rotate(q, *rope), RotaryEmbedding.rotate(k, *rope)
        q, k = self.q_norm(q), self.k_norm(k)
        out = attention(q, k, v, key_padding_mask=key_padding_mask, backend=self.attention_backend)  # [B, H, N, D]
        return self.proj(out.transpose(1, 2).reshape(B, N, C))


class STDiT2Block(nn.Module):
    """One v1.1 block, x [B, T*S, C] -> [B, T*S, C] (spec 9.1, "Block").

    1. spatial:  x += gate_msa * attn(modulate(norm1(x), shift_msa, scale_msa)) over S
    2. temporal: x += gate_tmp * attn_temp(modulate(norm_temp(x), shift_tmp, scale_tmp)) over T, RoPE
    3. x += cross_attn(x, y)   (no norm, no modulation)
    4. x += gate_mlp * mlp(modulate(norm2(x), shift_mlp, scale_mlp))
    With `x_mask` [B, T], frames marked False take every shift/scale/gate from the t=0 tables.
    Under sequence parallelism x holds this rank's S of each frame and `sp` (a
    `stdit2_parallel` shard) runs the spatial attention over every rank's tokens.
    """

    def __init__(self, hidden_size, num_heads, mlp_ratio=4.0, drop_path=0.0, qk_norm=True, qk_norm_legacy=True):
        super().__init__()
        C = hidden_size
        self.norm1 = nn.LayerNorm(C, elementwise_affine=False, eps=1e-6)
        self.attn = SelfAttention(C, num_heads, qk_norm)  # no RoPE: the order does not matter
        self.cross_attn = CrossAttention(C, num_heads)
        self.norm2 = nn.LayerNorm(C, elementwise_affine=False, eps=1e-6)
        self.mlp = MLP(C, int(C * mlp_ratio))
        self.drop_path = DropPath(drop_path)
        self.scale_shift_table = nn.Parameter(torch.randn(6, C) / C**0.5)
        self.norm_temp = nn.LayerNorm(C, elementwise_affine=False, eps=1e-6)
        self.attn_temp = (RoPEFirstSelfAttention if qk_norm_legacy else SelfAttention)(C, num_heads, qk_norm)
        self.scale_shift_table_temporal = nn.Parameter(torch.randn(3, C) / C**0.5)

    def forward(self, x, y, y_valid, t_mlp, t_tmp_mlp, T: int, S: int, x_mask=None, t0_mlp=None, t0_tmp_mlp=None, rope=None,
                sp=None):  # fmt: skip
        """x [B, T*S, C]; y [B, L', C] with y_valid [B, L'] or None; t_mlp [B, 6C]; t_tmp_mlp [B, 3C]."""
        B, N, C = x.shape
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = modulation_table(
            self.scale_shift_table, t_mlp, x_mask, t0_mlp
        )  # each [B, T or 1, 1, C]
        shift_tmp, scale_tmp, gate_tmp = modulation_table(self.scale_shift_table_temporal, t_tmp_mlp, x_mask, t0_tmp_mlp)

        h = t2i_modulate(self.norm1(x).view(B, T, S, C), shift_msa, scale_msa)  # [B, T, S, C]
        if sp is not None:  # the S of every rank
            a = sp.spatial_attention(self.attn, h)  # [B, T, S, C]
        else:
            a = self.attn(h.reshape(B * T, S, C)).view(B, T, S, C)  # over the S tokens of a frame
        x = x + self.drop_path((gate_msa * a).reshape(B, N, C))

        h = t2i_modulate(self.norm_temp(x).view(B, T, S, C), shift_tmp, scale_tmp)  # [B, T, S, C]
        a = self.attn_temp(h.transpose(1, 2).reshape(B * S, T, C), rope)  # [B*S, T, C], over frames
        a = a.view(B, S, T, C).transpose(1, 2)  # [B, T, S, C]
        x = x + self.drop_path((gate_tmp * a).reshape(B, N, C))

        x = x + self.cross_attn(x, y, y_valid)
        h = t2i_modulate(self.norm2(x).view(B, T, S, C), shift_mlp, scale_mlp)  # [B, T, S, C]
        return x + self.drop_path((gate_mlp * self.mlp(h)).reshape(B, N, C))


class STDiT2(nn.Module):
    """The v1.1 diffusion transformer; state dict identical to the official checkpoints.

    Run-time switches (not config fields): `set_attention_backend`,
    `enable_gradient_checkpointing`, `set_sequence_parallel_group` (tokens sharded over
    processes) and `official_bf16_quantization`. The latter, off by
    default, rounds timestep, num_frames, height, width, ar and fps to bfloat16 and uses
    bfloat16 RoPE / position-embedding frequency tables, as the official bf16 runs did
    (spec section 1); with it off these are used in float32 whatever the model dtype.
    """

    def __init__(self, config: STDiT2Config, *, official_bf16_quantization: bool = False):
        super().__init__()
        if config.no_temporal_pos_emb:
            raise ValueError(
                "STDiT2Config.no_temporal_pos_emb=True is not supported: the released v1.1 models use "
                "False (RoPE in every temporal attention)"
            )
        self.config = config
        self.official_bf16_quantization = official_bf16_quantization
        self.gradient_checkpointing = False
        self.sequence_parallel = None  # a stdit2_parallel.StackSequenceParallel, see set_sequence_parallel_group
        C, depth = config.hidden_size, config.depth
        # Registration order = the official state-dict order (checked against the schema).
        self.pos_embed = PositionEmbedding2D(C)  # no tensors
        self.x_embedder = PatchEmbed3D(config.patch_size, config.in_channels, C)
        self.t_embedder = TimestepEmbedder(C)
        self.t_block = nn.Sequential(nn.SiLU(), nn.Linear(C, 6 * C))
        self.t_block_temp = nn.Sequential(nn.SiLU(), nn.Linear(C, 3 * C))
        self.y_embedder = CaptionEmbedder(
            config.caption_channels, C, config.class_dropout_prob, config.model_max_length
        )
        self.rope = RotaryEmbedding(config.head_dim)
        drop = [config.drop_path * i / max(depth - 1, 1) for i in range(depth)]  # linear over depth
        self.blocks = nn.ModuleList(
            STDiT2Block(
                C, config.num_heads, config.mlp_ratio, drop[i], qk_norm=config.qk_norm, qk_norm_legacy=config.qk_norm_legacy
            )
            for i in range(depth)
        )
        self.final_layer = T2IFinalLayer(C, math.prod(config.patch_size), config.out_channels)
        # v1.1 embedders of the micro-conditions (spec 9.1): [h, w] and ar feed the spatial
        # vector (2 x C/3 + C/3 = C); num_frames and fps feed the temporal one.
        self.csize_embedder = SizeEmbedder(C // 3)
        self.ar_embedder = SizeEmbedder(C // 3)
        self.fl_embedder = SizeEmbedder(C)
        self.fps_embedder = SizeEmbedder(C)
        if not self.rope.freqs.is_meta:
            self.initialize_weights()
        self.rope.freqs.requires_grad_(False)

    # ---- run-time switches -------------------------------------------------------------------

    def set_attention_backend(self, backend: str) -> None:
        """"sdpa" (default), "flash" or "xformers"; an uninstalled backend is an error now."""
        check_backend(backend)
        for module in self.modules():
            if isinstance(module, (SelfAttention, CrossAttention)):
                module.attention_backend = backend

    @property
    def attention_backend(self) -> str:
        return self.blocks[0].attn.attention_backend

    def enable_gradient_checkpointing(self, enabled: bool = True) -> None:
        """Recompute each block in backward (torch.utils.checkpoint, non-reentrant)."""
        self.gradient_checkpointing = enabled

    def set_sequence_parallel_group(self, group, mode: str = "auto") -> None:
        """Shard the tokens over the ranks of `group` (a torch.distributed process group; None
        or one rank: off). Every rank of the group must then call forward with the same
        inputs; each returns the full output. `mode`: "auto", "ulysses" or "allgather_kv"
        (see `opensora_sdk.models.stdit2_parallel`)."""
        from opensora_sdk.models.stdit2_parallel import make_sequence_parallel

        self.sequence_parallel = make_sequence_parallel(group, self.config.num_heads, mode)

    # ---- forward ----------------------------------------------------------------------------

    def forward(
        self,
        x: torch.Tensor,
        timestep: torch.Tensor,
        y: torch.Tensor,
        mask: torch.Tensor | None = None,
        x_mask: torch.Tensor | None = None,
        num_frames: torch.Tensor | float | None = None,
        height: torch.Tensor | float | None = None,
        width: torch.Tensor | float | None = None,
        ar: torch.Tensor | float | None = None,
        fps: torch.Tensor | float | None = None,
        *,
        force_drop_ids: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Noise and variance prediction for latents x [B, C_in, T, H, W].

        timestep [B] (or a scalar) in [0, 1000]; y [B, 1, L, C_text] text features; mask
        [B', L] text mask (nonzero = token), B' divides B and rows are tiled (under CFG the
        null half reuses the prompts' masks); x_mask [B, T_p] bool, False = clean
        conditioning frame (t = 0). The micro-conditions are per sample, each [b] with b
        dividing B (rows tiled) or a scalar: num_frames (pixel frames, e.g. 16), height and
        width (pixels; element 0 also sets the position-embedding scale), ar (height / width
        at inference) and fps. `force_drop_ids` [B] (1 = null caption) and `generator` steer
        caption dropout. Returns [B, 2*C_in (pred_sigma) or C_in, T, H, W] in float32:
        channels 0..C_in-1 epsilon, the rest the learned variance.
        """
        cfg, dtype = self.config, self.x_embedder.proj.weight.dtype
        timestep, cond = self._check_inputs(x, timestep, y, mask, x_mask, num_frames, height, width, ar, fps)
        B, _, T0, H0, W0 = x.shape
        pt, ph, pw = cfg.patch_size
        T, Hp, Wp = -(-T0 // pt), -(-H0 // ph), -(-W0 // pw)
        S = Hp * Wp
        x, y = x.to(dtype), y.to(dtype)
        if x_mask is not None:
            x_mask = x_mask.to(device=x.device, dtype=torch.bool)

        # micro-conditions (spec 9.1): data_info [B, C] for space, fl [B, C] for time
        hw = torch.stack([cond["height"], cond["width"]], dim=1)  # [b, 2]
        data_info = torch.cat([self.csize_embedder(hw, B), self.ar_embedder(cond["ar"], B)], dim=1)  # [B, C]
        fl = self.fl_embedder(cond["num_frames"], B) + self.fps_embedder(cond["fps"], B)  # [B, C]

        t = self.t_embedder(timestep, dtype)  # [B, C]
        t_mlp = self.t_block(t + data_info)  # [B, 6C]
        t_tmp_mlp = self.t_block_temp(t + fl)  # [B, 3C]
        t0_spc = t0_mlp = t0_tmp_mlp = None
        if x_mask is not None:
            t0 = self.t_embedder(torch.zeros_like(timestep), dtype)  # [B, C]
            t0_spc = t0 + data_info
            t0_mlp = self.t_block(t0_spc)
            t0_tmp_mlp = self.t_block_temp(t0 + fl)
        y, y_valid = self.encode_text(y, mask, force_drop_ids=force_drop_ids, generator=generator)

        # patches + 2D position embedding, same formula as v1.2 (spec 9.1 / 2.4.2)
        quant = self.official_bf16_quantization
        scale = (cond["height"][0].item() * cond["width"][0].item()) ** 0.5 / cfg.input_sq_size
        pos = self.pos_embed(
            Hp, Wp, scale=scale, base_size=round(S**0.5), device=x.device, dtype=dtype, quantize_bf16=quant
        )  # [1, S, C]
        x = self.x_embedder(x)  # [B, N, C]
        x = (x.view(B, T, S, -1) + pos[:, None]).flatten(1, 2)  # [B, N, C]

        rope = self.rope.cos_sin(T, device=x.device, quantize_bf16=quant)  # 2 x [T, D]
        sp, S_run, shard = self.sequence_parallel, S, None
        if sp is not None:  # blocks and final layer on this rank's S_run of the S positions, then gather
            x, S_run, shard = sp.shard(x, T, S)  # [B, T*S_run, C]
        for block in self.blocks:
            args = (x, y, y_valid, t_mlp, t_tmp_mlp, T, S_run, x_mask, t0_mlp, t0_tmp_mlp, rope, shard)
            if self.gradient_checkpointing and torch.is_grad_enabled():
                x = checkpoint(block, *args, use_reentrant=False)
            else:
                x = block(*args)
        # Official asymmetry (spec 9.1, 11.2): generated frames use t without data_info,
        # conditioning frames t0 + data_info.
        x = self.final_layer(x, t, x_mask, t0_spc, T, S_run)  # [B, T*S_run, pt*ph*pw*C_out]
        if sp is not None:
            x = sp.gather(x, T, S)  # [B, N, pt*ph*pw*C_out]
        return unpatchify(x, cfg.patch_size, T, Hp, Wp, (T0, H0, W0)).float()

    def encode_text(self, y, mask=None, *, force_drop_ids=None, generator=None):
        """y [B, 1, L, C_text] -> (tokens [B, L', C], valid [B, L'] or None); see pack_text_tokens."""
        y = self.y_embedder(y, train=self.training, force_drop_ids=force_drop_ids, generator=generator)
        return pack_text_tokens(y.squeeze(1), mask)  # [B, L', C]

    def _check_inputs(self, x, timestep, y, mask, x_mask, num_frames, height, width, ar, fps):
        """Validate shapes; return (timestep [B], {name: [b] float32}) for the micro-conditions."""
        cfg = self.config
        check_latents(x, cfg.in_channels)
        B, T = x.shape[0], -(-x.shape[2] // cfg.patch_size[0])
        timestep = check_timestep(timestep, x)
        check_text(y, mask, B, cfg.caption_channels)
        check_x_mask(x_mask, B, T)
        hints = {
            "num_frames": "the pixel frame count, e.g. 16",
            "height": "the pixel height, e.g. 240",
            "width": "the pixel width, e.g. 426",
            "ar": "height / width at inference, e.g. 240/426",
            "fps": "e.g. 24 (120 for images in the v1.1 pipeline)",
        }
        given = {"num_frames": num_frames, "height": height, "width": width, "ar": ar, "fps": fps}
        cond = {}
        for name, value in given.items():
            if value is None:
                raise ValueError(f"STDiT2 needs {name} ({hints[name]}); the official v1.1 pipelines always pass it")
            value = torch.as_tensor(value, device=x.device).float().reshape(-1)  # [b]
            if value.numel() == 0 or B % value.numel():
                raise ValueError(f"{name} must be [b] with b dividing B={B} (or a scalar), got shape {tuple(value.shape)}")
            cond[name] = value
        if cond["height"].numel() != cond["width"].numel():  # a scalar joins the other's rows
            rows = max(cond["height"].numel(), cond["width"].numel())
            for name in ("height", "width"):
                if cond[name].numel() == 1:
                    cond[name] = cond[name].expand(rows)
            if cond["height"].numel() != cond["width"].numel():
                raise ValueError(
                    f"height and width need the same number of rows, got {cond['height'].numel()} and {cond['width'].numel()}"
                )
        if self.official_bf16_quantization:
            timestep = bf16_round(timestep)
            cond = {name: bf16_round(value) for name, value in cond.items()}
        return timestep, cond

    # ---- weights ----------------------------------------------------------------------------

    @torch.no_grad()
    def initialize_weights(self) -> None:
        """Initialisation for training from scratch, as for STDiT3 (spec 2.4.10) plus a new
        temporal attention that starts as the identity (its output projection is zero)."""
        C = self.config.hidden_size
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Conv3d):
                module.reset_parameters()
            elif isinstance(module, RMSNorm):
                nn.init.ones_(module.weight)
        self.rope.reset_parameters()
        self.y_embedder.y_embedding.normal_(std=self.config.caption_channels**-0.5)
        for module in self.modules():
            if isinstance(module, STDiT2Block):
                module.scale_shift_table.normal_(std=C**-0.5)
                module.scale_shift_table_temporal.normal_(std=C**-0.5)
                nn.init.zeros_(module.attn_temp.proj.weight)
            elif isinstance(module, T2IFinalLayer):
                module.scale_shift_table.normal_(std=C**-0.5)

    @classmethod
    def from_pretrained(
        cls,
        path_or_repo: str | os.PathLike,
        *,
        config: STDiT2Config | dict | None = None,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
        strict: bool = True,
        local_files_only: bool | None = None,
        prefer: str = "ema",
        official_bf16_quantization: bool = False,
    ) -> STDiT2:
        """Load a v1.1 checkpoint: HF folder or repo id (`hpcai-tech/OpenSora-STDiT-v2-stage3`),
        .safetensors, or .pth/.pt (training wrappers unwrapped, EMA preferred).

        The config comes from `config`, else the folder's config.json (read as data; the
        repo's custom code is never run), else the tensor shapes. The model is built on the
        meta device and each tensor assigned in `dtype` (default float32) on `device`
        (default CPU); `rope.freqs` stays float32. With `strict=False`, tensors absent from
        the checkpoint keep the from-scratch initialisation and the mismatch report is a
        warning. Returns the model in eval mode.
        """
        resolved = resolve_checkpoint(path_or_repo, local_files_only=local_files_only)

        def tensors():
            return _drop_fixed_tables(iter_tensors(resolved.weight_files, prefer=prefer))

        if isinstance(config, dict):
            config = config_from_official(config)
        elif config is None and resolved.config_file is not None:
            config = read_official_config(resolved.config_file)
        elif config is None:
            config = infer_config({k: tuple(t.shape) for k, t in tensors()})
        with torch.device("meta"):
            model = cls(config, official_bf16_quantization=official_bf16_quantization)
        if not strict:
            model.to_empty(device=device or "cpu").to(dtype or torch.float32)
            model.initialize_weights()
        seen: list[str] = []

        def recorded():
            for key, tensor in tensors():
                seen.append(key)
                yield key, tensor

        try:
            report = load_tensors_into(
                model, recorded(), strict=strict, dtype=dtype or torch.float32, device=device, keep_float32=("rope.freqs",)
            )
        except CheckpointError as err:
            family = detect_stdit_family(seen)
            if family not in (None, "STDiT2"):
                raise CheckpointError(f"{err}\nThe checkpoint's keys are those of {family}, not STDiT2: load it with {family}.") from err
            raise
        if not report.ok:
            warnings.warn(f"STDiT2 loaded non-strictly from {str(path_or_repo)!r}:\n{report}", stacklevel=2)
        model.rope.freqs.requires_grad_(False)
        return model.eval()

    def save_pretrained(self, folder: str | os.PathLike) -> None:
        """Write model.safetensors and config.json in the official HF layout (`model_type`
        "stdit2", official field names), atomically. No `auto_map`: no custom code is shipped."""
        folder = Path(folder)
        dtype = str(self.x_embedder.proj.weight.dtype).removeprefix("torch.")
        save_safetensors_atomic(self.state_dict(), folder / "model.safetensors", metadata={"format": "pt"})
        config = {"architectures": ["STDiT2"], "model_type": STDiT2Config.model_type, **config_to_dict(self.config)}
        write_json_atomic({**config, "torch_dtype": dtype}, folder / "config.json")


def _drop_fixed_tables(tensors):
    """Drop sin-cos tables some training checkpoints store (the official loader deletes them too)."""
    for key, tensor in tensors:
        if key not in ("pos_embed", "pos_embed_temporal"):
            yield key, tensor


# --------------------------------------------------------------------------------------------
# Configs from files
# --------------------------------------------------------------------------------------------


def config_from_official(data: dict) -> STDiT2Config:
    """STDiT2Config from a parsed v1.1 config.json (`hpcai-tech/OpenSora-STDiT-v2-stage2/3`).

    Fields map one to one (same names). `model_type`, `architectures`, `auto_map`,
    `torch_dtype` and `transformers_version` are bookkeeping. A config.json of another
    family is an error that names it.
    """
    model_type = str(data.get("model_type", "stdit2"))
    if model_type.lower() != "stdit2":
        raise CheckpointError(
            f"config.json has model_type {model_type!r}, not 'stdit2' (Open-Sora v1.1): use the model class "
            "of that family, or pass config=STDiT2Config(...) to override"
        )
    return config_from_dict(STDiT2Config, data)


def read_official_config(path: str | os.PathLike) -> STDiT2Config:
    """`config_from_official` of a config.json file (parsed as JSON, never executed)."""
    with open(path, encoding="utf-8") as f:
        return config_from_official(json.load(f))


def infer_config(shapes: dict[str, tuple]) -> STDiT2Config:
    """STDiT2Config from a state dict's {key: shape} (for checkpoints without config.json).

    `input_sq_size` (512) and `qk_norm_legacy` (True) cannot be seen in the weights and take
    the released model's values.
    """

    def need(key):
        if key not in shapes:
            family = detect_stdit_family(shapes)
            hint = f" (its keys are those of {family})" if family not in (None, "STDiT2") else ""
            raise CheckpointError(
                f"cannot infer the STDiT2 config: key {key!r} is missing from the checkpoint{hint}; "
                "pass config=STDiT2Config(...) explicitly"
            )
        return shapes[key]

    hidden, in_channels, *patch = need("x_embedder.proj.weight")
    depth = len({m.group(1) for k in shapes if (m := re.fullmatch(r"blocks\.(\d+)\.scale_shift_table", k))})
    qk_norm = "blocks.0.attn.q_norm.weight" in shapes
    head_dim = need("blocks.0.attn.q_norm.weight")[0] if qk_norm else 2 * need("rope.freqs")[0]
    out_channels = need("final_layer.linear.weight")[0] // math.prod(patch)
    if out_channels not in (in_channels, 2 * in_channels):
        raise CheckpointError(f"final layer gives {out_channels} channels for in_channels={in_channels}")
    caption_len, caption_channels = need("y_embedder.y_embedding")
    return STDiT2Config(
        in_channels=in_channels,
        patch_size=tuple(patch),
        hidden_size=hidden,
        depth=depth,
        num_heads=hidden // head_dim,
        mlp_ratio=need("blocks.0.mlp.fc1.weight")[0] / hidden,
        pred_sigma=out_channels == 2 * in_channels,
        caption_channels=caption_channels,
        model_max_length=caption_len,
        qk_norm=qk_norm,
    )


# --------------------------------------------------------------------------------------------
# Which family does a checkpoint belong to?
# --------------------------------------------------------------------------------------------


def detect_stdit_family(keys: Iterable[str]) -> str | None:
    """"STDiT3" (v1.2), "STDiT2" (v1.1), "STDiT" (v1.0) or None, from state-dict keys.

    Training prefixes (`module.`, `_orig_mod.`) are ignored. What tells them apart (see the
    three schemas in the reference data):

    * STDiT3: separate `spatial_blocks.{i}.*` and `temporal_blocks.{i}.*`; no `blocks.*`.
    * STDiT2: `blocks.{i}.attn_temp.*` plus the v1.1-only temporal modulation
      (`blocks.{i}.scale_shift_table_temporal`, `t_block_temp.*`) and the micro-condition
      embedders `csize_embedder`, `ar_embedder`, `fl_embedder`.
    * STDiT: `blocks.{i}.attn_temp.*` without any of those (and without qk-norm, `rope.freqs`
      or `fps_embedder`); it may carry `pos_embed` / `pos_embed_temporal`.

    Anything else (e.g. a PixArt checkpoint: `blocks.*` without `attn_temp`) gives None.
    """
    keys = {strip_key_prefixes(k) for k in keys}
    if any(k.startswith(("spatial_blocks.", "temporal_blocks.")) for k in keys):
        return "STDiT3"
    has_temporal_attn = any(re.fullmatch(r"blocks\.\d+\.attn_temp\..+", k) for k in keys)
    if not has_temporal_attn:
        return None
    v11_markers = ("t_block_temp.", "csize_embedder.", "ar_embedder.", "fl_embedder.")
    if any(k.startswith(v11_markers) or k.endswith(".scale_shift_table_temporal") for k in keys):
        return "STDiT2"
    return "STDiT"


def is_stdit2_state_dict(keys: Iterable[str]) -> bool:
    """True when the keys are those of an STDiT2 (Open-Sora v1.1) checkpoint."""
    return detect_stdit_family(keys) == "STDiT2"
