"""STDiT, the Open-Sora v1.0 diffusion transformer (spec section 9.2).

Reads top-down: the block (spatial attention, temporal attention, cross-attention, MLP in
one block), the model, then loading.

What v1.0 shares with v1.2 (STDiT3, spec section 2) and takes from it unchanged: the patch
embedder, the timestep embedder and `t_block` (adaLN-single, 6 rows per block), the caption
embedder and its null caption `y_embedding`, self-attention (without qk-norm) and the
cross-attention to the valid text tokens of each row, the GELU-tanh MLP, the final layer.

What differs (spec 9.2):
* a **fixed input size**: `config.input_size` is the only latent size the model runs at;
* **fixed sin-cos tables** `pos_embed` [1, S, C] (grid / `space_scale`, no `base_size`) and
  `pos_embed_temporal` [1, T, C] (grid / `time_scale`), persistent buffers of the official
  state dict that are recomputed, never loaded;
* the temporal table is added **only to the temporal-attention input of block 0**, never
  to the residual stream;
* the temporal attention (`attn_temp`) takes x un-normalised and un-modulated and its output
  is gated with the spatial gate `gate_msa`; no RoPE, no qk-norm, no fps/size embedders, no
  `x_mask`.

Shapes: latents [B, C_in, T, H, W]; tokens [B, N, C] with N = T*S, frame-major, S = H_p*W_p
spatial tokens per frame in row-major order; text [B, L, C].
"""

from __future__ import annotations

import math
import os
import re
import warnings
from pathlib import Path

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from opensora_sdk.configs import (
    STDIT_PRESETS,
    STDiTConfig,
    config_from_dict,
    config_to_dict,
    preset,
    read_config_json,
)
from opensora_sdk.loading import (
    CheckpointError,
    iter_tensors,
    load_tensors_into,
    resolve_checkpoint,
    save_safetensors_atomic,
    write_json_atomic,
)
from opensora_sdk.models.attention import check_backend
from opensora_sdk.models.forward_checks import check_latents, check_text, check_timestep
from opensora_sdk.models.layers import (
    MLP,
    CaptionEmbedder,
    DropPath,
    PatchEmbed3D,
    T2IFinalLayer,
    TimestepEmbedder,
    modulation_table,
    pack_text_tokens,
    sincos_table_1d,
    sincos_table_2d,
    t2i_modulate,
    unpatchify,
)
from opensora_sdk.models.stdit3_blocks import CrossAttention, SelfAttention

# The fixed sin-cos tables: persistent in the official state dict, recomputed here.
SINCOS_KEYS = ("pos_embed", "pos_embed_temporal")

# v1.0 latents are SD-VAE latents: pixels = latent * (1, 8, 8), no temporal compression (messages only).
_VAE_STRIDE = (1, 8, 8)


class STDiTBlock(nn.Module):
    """One v1.0 block, x [B, T*S, C] -> [B, T*S, C] (spec 9.2, "Block").

    1. spatial attention on modulate(LN(x)), x += gate_msa * out;
    2. temporal attention on x itself (+ `tpe` in block 0), x += gate_msa * out (same gate);
    3. x += cross_attn(x, text);
    4. x += gate_mlp * MLP(modulate(LN(x))).
    Under sequence parallelism x holds this rank's S of each frame and `sp` (a
    `stdit2_parallel` shard) runs the spatial attention over every rank's tokens.
    """

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0, drop_path: float = 0.0):
        super().__init__()
        self.scale_shift_table = nn.Parameter(torch.randn(6, hidden_size) / hidden_size**0.5)
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attn = SelfAttention(hidden_size, num_heads, qk_norm=False)
        self.cross_attn = CrossAttention(hidden_size, num_heads)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.mlp = MLP(hidden_size, int(hidden_size * mlp_ratio))
        self.drop_path = DropPath(drop_path)
        self.attn_temp = SelfAttention(hidden_size, num_heads, qk_norm=False)

    def forward(self, x, y, y_valid, t_mlp, T: int, S: int, tpe: torch.Tensor | None = None, sp=None) -> torch.Tensor:
        """x [B, T*S, C]; y [B, L', C] text, y_valid [B, L'] or None; t_mlp [B, 6C];
        tpe [1, T, C] (block 0 only) or None."""
        B, N, C = x.shape
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = modulation_table(
            self.scale_shift_table, t_mlp
        )  # each [B, 1, 1, C]
        h = t2i_modulate(self.norm1(x).view(B, T, S, C), shift_msa, scale_msa)  # [B, T, S, C]
        if sp is not None:  # the S of every rank
            a = sp.spatial_attention(self.attn, h)  # [B, T, S, C]
        else:
            a = self.attn(h.reshape(B * T, S, C)).view(B, T, S, C)  # over the S tokens of a frame
        x = x + self.drop_path((gate_msa * a).reshape(B, N, C))

        # v1.0 only (spec 9.2): the temporal branch sees x without norm or modulation, the
        # temporal table is added to its input (not to x), and it reuses gate_msa.
        h = x.view(B, T, S, C).transpose(1, 2).reshape(B * S, T, C)  # [B*S, T, C]
        if tpe is not None:
            h = h + tpe
        a = self.attn_temp(h).view(B, S, T, C).transpose(1, 2)  # [B, T, S, C]
        x = x + self.drop_path((gate_msa * a).reshape(B, N, C))

        x = x + self.cross_attn(x, y, y_valid)  # no norm, no modulation
        h = t2i_modulate(self.norm2(x).view(B, T, S, C), shift_mlp, scale_mlp)  # [B, T, S, C]
        return x + self.drop_path((gate_mlp * self.mlp(h)).reshape(B, N, C))


class STDiT(nn.Module):
    """The v1.0 diffusion transformer; state dict identical to the official checkpoints.

    `pos_embed` [1, S, C] and `pos_embed_temporal` [1, T, C] are persistent buffers, as in the
    official state dict, but they are a function of the config: **every load recomputes
    them**. A state dict may hold them (their shapes are checked like any key, since they
    record the size a checkpoint was trained at) or omit them; their values are never used
    (a `load_state_dict` pre-hook puts the recomputed tables in their place). A model built on
    the meta device gets real tables when it is loaded, or from `initialize_weights`.

    Run-time switches (not config fields): `set_attention_backend`,
    `enable_gradient_checkpointing`, `set_sequence_parallel_group` (tokens sharded over
    processes).
    """

    def __init__(self, config: STDiTConfig):
        super().__init__()
        self.config = config
        self.gradient_checkpointing = False
        self.sequence_parallel = None  # a stdit2_parallel.StackSequenceParallel, see set_sequence_parallel_group
        C, (T, Hp, Wp) = config.hidden_size, config.grid_size
        self.register_buffer("pos_embed", torch.empty(1, Hp * Wp, C))  # filled by reset_sincos_tables
        self.register_buffer("pos_embed_temporal", torch.empty(1, T, C))
        self.x_embedder = PatchEmbed3D(config.patch_size, config.in_channels, C)
        self.t_embedder = TimestepEmbedder(C)
        self.t_block = nn.Sequential(nn.SiLU(), nn.Linear(C, 6 * C))
        self.y_embedder = CaptionEmbedder(
            config.caption_channels, C, config.class_dropout_prob, config.model_max_length
        )
        depth = config.depth
        drop = [config.drop_path * i / max(depth - 1, 1) for i in range(depth)]  # linear over depth
        self.blocks = nn.ModuleList(
            STDiTBlock(C, config.num_heads, config.mlp_ratio, drop_path=drop[i]) for i in range(depth)
        )
        self.final_layer = T2IFinalLayer(C, math.prod(config.patch_size), config.out_channels)
        self.register_load_state_dict_pre_hook(_recompute_sincos_on_load)
        if not self.pos_embed.is_meta:
            self.initialize_weights()

    # ---- fixed sin-cos tables ---------------------------------------------------------------

    def sincos_tables(self) -> dict[str, torch.Tensor]:
        """{"pos_embed": [1, S, C], "pos_embed_temporal": [1, T, C]}, float32 on the CPU.

        Spec 9.2: fixed grids of the config's input size divided by `space_scale` /
        `time_scale` (v1.2 instead builds the spatial table per call with a `base_size`).
        """
        cfg = self.config
        T, Hp, Wp = cfg.grid_size
        return {
            "pos_embed": sincos_table_2d(cfg.hidden_size, (Hp, Wp), scale=cfg.space_scale),
            "pos_embed_temporal": sincos_table_1d(cfg.hidden_size, T, scale=cfg.time_scale),
        }

    @torch.no_grad()
    def reset_sincos_tables(self) -> None:
        """Write the recomputed tables into the buffers (which must not be on meta)."""
        for key, table in self.sincos_tables().items():
            getattr(self, key).copy_(table)

    # ---- run-time switches ------------------------------------------------------------------

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
        *,
        force_drop_ids: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Noise (channels 0..C_in-1) and learned sigma (the rest) for latents x [B, C_in, T, H, W].

        (T, H, W) must equal `config.input_size` (a v1.0 model has one size). timestep [B] (or
        a scalar) in [0, 1000]; y [B, 1, L, C_text] text features; mask [B', L] text mask
        (nonzero = token), B' divides B and rows are tiled (under CFG the null half reuses the
        prompts' masks). `force_drop_ids` [B] (1 = null caption) and `generator` steer caption
        dropout (train mode). Returns [B, 2*C_in (pred_sigma) or C_in, T, H, W] in float32.
        """
        cfg, dtype = self.config, self.x_embedder.proj.weight.dtype
        timestep = self._check_inputs(x, timestep, y, mask)
        B, C = x.shape[0], cfg.hidden_size
        T, Hp, Wp = cfg.grid_size
        S = Hp * Wp
        x, y = x.to(dtype), y.to(dtype)

        t = self.t_embedder(timestep, dtype)  # [B, C]
        t_mlp = self.t_block(t)  # [B, 6C]
        y = self.y_embedder(y, train=self.training, force_drop_ids=force_drop_ids, generator=generator)
        y, y_valid = pack_text_tokens(y.squeeze(1), mask)  # [B, L', C], [B, L'] or None

        x = self.x_embedder(x)  # [B, N, C]
        x = (x.view(B, T, S, C) + self.pos_embed.to(dtype)).flatten(1, 2)  # same table every frame
        tpe = None if cfg.no_temporal_pos_emb else self.pos_embed_temporal.to(dtype)  # [1, T, C]
        sp, S_run, shard = self.sequence_parallel, S, None
        if sp is not None:  # blocks and final layer on this rank's S_run of the S positions, then gather
            x, S_run, shard = sp.shard(x, T, S)  # [B, T*S_run, C]
        for i, block in enumerate(self.blocks):
            x = self._call_block(block, x, y, y_valid, t_mlp, T, S_run, tpe if i == 0 else None, shard)
        x = self.final_layer(x, t)  # [B, T*S_run, pt*ph*pw*C_out]
        if sp is not None:
            x = sp.gather(x, T, S)  # [B, N, pt*ph*pw*C_out]
        return unpatchify(x, cfg.patch_size, T, Hp, Wp, cfg.input_size).float()

    def _call_block(self, block, *args):
        if self.gradient_checkpointing and torch.is_grad_enabled():
            return checkpoint(block, *args, use_reentrant=False)
        return block(*args)

    def _check_inputs(self, x, timestep, y, mask) -> torch.Tensor:
        """Validate shapes; return timestep [B] float32."""
        cfg = self.config
        check_latents(x, cfg.in_channels)
        size = tuple(x.shape[2:])
        if size != cfg.input_size:
            raise ValueError(
                f"this v1.0 STDiT generates {_pixels(cfg.input_size)} (latent {_dims(cfg.input_size)}, "
                f"config.input_size); got latent {_dims(size)} ({_pixels(size)}). v1.0 models have one "
                "fixed size: load the checkpoint made for the size you want (e.g. OpenSora-v1-HQ-16x512x512.pth "
                "for 16x512x512) or generate at its size"
            )
        timestep = check_timestep(timestep, x)
        check_text(y, mask, x.shape[0], cfg.caption_channels)
        return timestep

    # ---- weights ----------------------------------------------------------------------------

    @torch.no_grad()
    def initialize_weights(self) -> None:
        """A from-scratch initialisation (the spec does not record v1.0's own): Xavier-uniform
        linears with zero biases, default conv, scale-shift tables randn/sqrt(C), a random
        null caption; then the sin-cos tables."""
        C = self.config.hidden_size
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Conv3d):
                module.reset_parameters()
        self.y_embedder.y_embedding.normal_(std=self.config.caption_channels**-0.5)
        for module in self.modules():
            if isinstance(module, (STDiTBlock, T2IFinalLayer)):
                module.scale_shift_table.normal_(std=C**-0.5)
        self.reset_sincos_tables()

    @classmethod
    def from_pretrained(
        cls,
        path: str | os.PathLike,
        *,
        config: STDiTConfig | dict | str | None = None,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
        strict: bool = True,
        prefer: str = "ema",
        local_files_only: bool | None = None,
    ) -> STDiT:
        """Load a v1.0 checkpoint: an official `.pth` state dict (`OpenSora-v1-*.pth`), a
        training checkpoint (`{"ema": ...}` / `{"model": ...}`, EMA preferred), a single
        `.safetensors` file, or a folder written by `save_pretrained`.

        The config comes from `config` (an `STDiTConfig`, a dict, or a `STDIT_PRESETS` name),
        else the folder's config.json, else the tensor shapes (the size from `pos_embed` /
        `pos_embed_temporal`, see `infer_config`). The model is built on the meta device and
        each tensor is assigned in `dtype` (default float32) on `device` (default CPU).
        `pos_embed` / `pos_embed_temporal` are optional in the file; when present their
        shapes are checked and their values ignored (recomputed). With `strict=False`, absent
        tensors keep a from-scratch initialisation and the report is a warning. Returns eval mode.
        """
        resolved = resolve_checkpoint(path, local_files_only=local_files_only)
        files = resolved.weight_files
        if isinstance(config, str):
            config = preset(config, STDIT_PRESETS)
        elif isinstance(config, dict):
            config = config_from_dict(STDiTConfig, config, ignore=STDiTConfig.ignored_keys)
        elif config is None and resolved.config_file is not None:
            config = read_config_json(STDiTConfig, resolved.config_file, ignore=STDiTConfig.ignored_keys)
        elif config is None:
            shapes = {k: tuple(t.shape) for k, t in iter_tensors(files, prefer=prefer)}
            config = infer_config(shapes, source=str(path))
        with torch.device("meta"):
            model = cls(config)
        if not strict:
            model.to_empty(device=device or "cpu").to(dtype or torch.float32)
            model.initialize_weights()
        stored: dict[str, tuple] = {}  # shapes of the sin-cos tables the file holds
        try:
            report = load_tensors_into(
                model,
                _with_sincos_keys(iter_tensors(files, prefer=prefer), model, stored),
                strict=strict,
                dtype=dtype or torch.float32,
                device=device,
            )
        except CheckpointError as err:
            hint = ""
            if any(shape != tuple(getattr(model, key).shape) for key, shape in stored.items()):
                hint = (
                    f"\n(pos_embed / pos_embed_temporal {[list(s) for s in stored.values()]} record the fixed "
                    f"size the checkpoint was trained at; the config says input_size {config.input_size}: "
                    "pass the matching config, e.g. config='OpenSora-v1-16x512x512')"
                )
            raise CheckpointError(f"{', '.join(map(str, files))}: {err}{hint}") from err
        if not report.ok:
            warnings.warn(f"STDiT loaded non-strictly from {str(path)!r}:\n{report}", stacklevel=2)
        return model.eval()

    def save_pretrained(self, folder: str | os.PathLike) -> None:
        """Write model.safetensors (the official keys, incl. the sin-cos tables) and
        config.json (official field names) atomically."""
        folder = Path(folder)
        dtype = str(self.x_embedder.proj.weight.dtype).removeprefix("torch.")
        save_safetensors_atomic(self.state_dict(), folder / "model.safetensors", metadata={"format": "pt"})
        config = {"architectures": ["STDiT"], "model_type": STDiTConfig.model_type, **config_to_dict(self.config)}
        write_json_atomic({**config, "torch_dtype": dtype}, folder / "config.json")


# --------------------------------------------------------------------------------------------
# Loading helpers
# --------------------------------------------------------------------------------------------


def _recompute_sincos_on_load(module, state_dict, prefix, local_metadata, strict, missing, unexpected, errors):
    """load_state_dict pre-hook: the sin-cos tables in a state dict are replaced by the
    recomputed ones (same shape; a different shape is left for torch to report), and added
    when absent, so no load ever uses stored values or needs them."""
    like = state_dict.get(prefix + "x_embedder.proj.weight")
    for key, table in module.sincos_tables().items():
        full = prefix + key
        given = state_dict.get(full)
        if given is not None and tuple(given.shape) != tuple(table.shape):
            continue
        ref = given if given is not None else like
        if ref is not None and not ref.is_meta:
            table = table.to(device=ref.device, dtype=ref.dtype)
        state_dict[full] = table


def _with_sincos_keys(tensors, model: STDiT, stored: dict):
    """Pass the checkpoint's tensors through, noting the shapes of its sin-cos tables in
    `stored`, and add the sin-cos keys it lacks (the values are replaced on load anyway), so
    that they are never reported missing."""
    for key, tensor in tensors:
        if key in SINCOS_KEYS:
            stored[key] = tuple(tensor.shape)
        yield key, tensor
    for key, table in model.sincos_tables().items():
        if key not in stored:
            yield key, table


# Official v1.0 sizes -> (space_scale, time_scale), spec 9.2 "Configs".
OFFICIAL_SCALES: dict[tuple[int, int, int], tuple[float, float]] = {
    (16, 32, 32): (0.5, 1.0),  # 16x256x256
    (16, 64, 64): (1.0, 1.0),  # 16x512x512
    (64, 64, 64): (1.0, 2 / 3),  # 64x512x512
}


def infer_config(shapes: dict[str, tuple], *, source: str = "checkpoint") -> STDiTConfig:
    """STDiTConfig from a v1.0 state dict's {key: shape} (checkpoints have no config).

    The widths come from the weights; `num_heads` from the official head size 72 (v1.0 has
    no per-head tensor); the fixed input size from `pos_embed` [1, S, C] (a square grid) and
    `pos_embed_temporal` [1, T, C], and the scales from the official config of that size
    (e.g. [1, 256, 1152] -> 16x256x256, space_scale 0.5; [1, 1024, 1152] -> 16x512x512).
    Anything else needs an explicit `config=`.
    """

    def need(key, why="is it a v1.0 STDiT checkpoint?"):
        if key not in shapes:
            raise CheckpointError(
                f"cannot infer the STDiT config of {source!r}: key {key!r} is missing ({why}); "
                "pass config=STDiTConfig(...) or a preset name such as 'OpenSora-v1-16x256x256'"
            )
        return shapes[key]

    hidden, in_channels, *patch = need("x_embedder.proj.weight")
    depth = len({m.group(1) for k in shapes if (m := re.fullmatch(r"blocks\.(\d+)\.scale_shift_table", k))})
    out_channels = need("final_layer.linear.weight")[0] // math.prod(patch)
    if out_channels not in (in_channels, 2 * in_channels):
        raise CheckpointError(f"{source!r}: final layer gives {out_channels} channels for in_channels={in_channels}")
    caption_len, caption_channels = need("y_embedder.y_embedding")
    why = "it records the fixed size the checkpoint was trained at"
    S, T = need("pos_embed", why)[1], need("pos_embed_temporal", why)[1]
    side = math.isqrt(S)
    input_size = (T * patch[0], side * patch[1], side * patch[2])
    if side * side != S or input_size not in OFFICIAL_SCALES or hidden % 72:
        raise CheckpointError(
            f"cannot infer the STDiT config of {source!r}: latent size from pos_embed {list(need('pos_embed'))} "
            f"and pos_embed_temporal {list(need('pos_embed_temporal'))} is not an official v1.0 size "
            f"{sorted(OFFICIAL_SCALES)}, or hidden_size {hidden} is not a multiple of the head size 72; "
            "pass config=STDiTConfig(...) with its input_size, num_heads, space_scale and time_scale"
        )
    space_scale, time_scale = OFFICIAL_SCALES[input_size]
    return STDiTConfig(
        input_size=input_size,
        in_channels=in_channels,
        patch_size=tuple(patch),
        hidden_size=hidden,
        depth=depth,
        num_heads=hidden // 72,
        mlp_ratio=need("blocks.0.mlp.fc1.weight")[0] / hidden,
        pred_sigma=out_channels == 2 * in_channels,
        caption_channels=caption_channels,
        model_max_length=caption_len,
        space_scale=space_scale,
        time_scale=time_scale,
    )


def _dims(size) -> str:
    return "x".join(str(n) for n in size)


def _pixels(latent) -> str:
    return _dims(n * s for n, s in zip(latent, _VAE_STRIDE))
