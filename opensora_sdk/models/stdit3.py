"""STDiT3, the Open-Sora v1.2 diffusion transformer (spec section 2).

Reads top-down: the model (switches, forward, conditions, weights), then the checkpoint
format. The attention modules and the block (spatial | temporal) are in `stdit3_blocks.py`,
the argument checks of forward in `forward_checks.py`.

Shapes: latents [B, C, T, H, W]; tokens [B, N, C] with N = T*S, frame-major, S = H_p*W_p
spatial tokens per frame in row-major order; text [B, L, C]. Within the block stack T and S
are the frames and spatial tokens *this process holds*: with sequence parallelism (spec
section 8, `set_sequence_parallel_group`, code in `stdit3_parallel.py`) each rank holds a
shard, and only `STDiT3Block.spatial_attention` needs collectives (all-to-all over heads);
temporal attention, cross-attention and the MLP are token-wise or per spatial position and
run on the shard unchanged.
"""

from __future__ import annotations

import math
import os
import re
import warnings
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from opensora_sdk.configs import STDiT3Config, config_from_dict, config_to_dict, read_config_json
from opensora_sdk.loading import (
    CheckpointError,
    iter_tensors,
    load_tensors_into,
    resolve_checkpoint,
    save_safetensors_atomic,
    write_json_atomic,
)
from opensora_sdk.models.attention import check_backend
from opensora_sdk.models.stdit3_blocks import CrossAttention, SelfAttention, STDiT3Block
from opensora_sdk.models.forward_checks import check_conditions, check_step_inputs
from opensora_sdk.models.stdit3_reuse import StepConditions, StepInvariants, reuse_allowed
from opensora_sdk.models.layers import (
    CaptionEmbedder,
    PatchEmbed3D,
    PositionEmbedding2D,
    RMSNorm,
    RotaryEmbedding,
    SizeEmbedder,
    T2IFinalLayer,
    TimestepEmbedder,
)

# Keyword arguments the official pipelines pass that the model does not use.
IGNORED_FORWARD_KWARGS = frozenset({"num_frames", "ar"})


class STDiT3(nn.Module):
    """The v1.2 diffusion transformer; state dict identical to the official checkpoints.

    Run-time switches (not config fields): `set_attention_backend`, `gradient_checkpointing`
    (see `enable_gradient_checkpointing`), `set_sequence_parallel_group` (tokens sharded over
    processes), `set_block_callback` (a call before every block, e.g. an interrupt check),
    `set_step_reuse` (with `step_invariants`: exact reuse of the step-invariant work of a
    sampling loop, on by default, see `stdit3_reuse`), `compile_blocks` (regional
    torch.compile) and `official_bf16_quantization`. The latter, off by default, reproduces
    the official bf16 runs bit for bit in their quantisation: the timestep, fps, height and
    width are rounded to bfloat16 before use (985.96 -> 984, width 854 -> 856), and the
    RoPE and positional-embedding frequency tables are bfloat16. With it off, all of these
    are used in float32 whatever the model dtype.
    """

    def __init__(self, config: STDiT3Config, *, official_bf16_quantization: bool = False):
        super().__init__()
        self.config = config
        self.official_bf16_quantization = official_bf16_quantization
        self.gradient_checkpointing = False
        self.sequence_parallel = None  # a stdit3_parallel.SequenceParallel, see set_sequence_parallel_group
        self.block_callback = None  # fn() before every block, see set_block_callback
        self.step_reuse = True  # see set_step_reuse
        self.step_scope = None  # the open StepInvariants of step_invariants(), or None
        self.step_cache = None  # step-cache hook: a state from opensora_sdk.step_cache.attach; None = off
        C, depth = config.hidden_size, config.depth
        self.pos_embed = PositionEmbedding2D(C)
        self.rope = RotaryEmbedding(config.head_dim)
        self.x_embedder = PatchEmbed3D(config.patch_size, config.in_channels, C)
        self.t_embedder = TimestepEmbedder(C)
        self.fps_embedder = SizeEmbedder(C)
        self.t_block = nn.Sequential(nn.SiLU(), nn.Linear(C, 6 * C))
        self.y_embedder = CaptionEmbedder(
            config.caption_channels, C, config.class_dropout_prob, config.model_max_length
        )
        drop = [config.drop_path * i / max(depth - 1, 1) for i in range(depth)]  # linear over depth
        block = dict(hidden_size=C, num_heads=config.num_heads, mlp_ratio=config.mlp_ratio, qk_norm=config.qk_norm)
        self.spatial_blocks = nn.ModuleList(STDiT3Block(**block, drop_path=drop[i]) for i in range(depth))
        self.temporal_blocks = nn.ModuleList(
            STDiT3Block(**block, drop_path=drop[i], temporal=True) for i in range(depth)
        )
        self.final_layer = T2IFinalLayer(C, math.prod(config.patch_size), config.out_channels)
        if not self.rope.freqs.is_meta:
            self.initialize_weights()
        self._apply_training_switches()

    # ---- run-time switches -------------------------------------------------------------------

    def set_attention_backend(self, backend: str) -> None:
        """ "sdpa" (default), "flash" or "xformers"; an uninstalled backend is an error now."""
        check_backend(backend)
        for module in self.modules():
            if isinstance(module, (SelfAttention, CrossAttention)):
                module.attention_backend = backend

    @property
    def attention_backend(self) -> str:
        return self.spatial_blocks[0].attn.attention_backend

    def set_sequence_parallel_group(self, group, mode: str = "auto") -> None:
        """Shard the tokens over the ranks of `group` (a torch.distributed process group; None
        or one rank: off). Every rank of the group must then call forward with the same
        inputs; each returns the full output. `mode`: "auto", "ulysses", "allgather_kv" or
        "dsp" (see `opensora_sdk.models.stdit3_parallel`)."""
        from opensora_sdk.distributed import group_size
        from opensora_sdk.models.stdit3_parallel import SequenceParallel

        off = group is None or group_size(group) == 1
        self.sequence_parallel = None if off else SequenceParallel(group, self.config.num_heads, mode)

    def set_block_callback(self, fn=None):
        """Call `fn()` before every block (spatial and temporal) of every forward; None: off.
        Returns the previous callback. Front ends pass their interrupt check: it may raise to
        stop a forward between blocks (one step of a large video takes minutes on a CPU)."""
        previous, self.block_callback = self.block_callback, fn
        return previous

    def set_step_reuse(self, enabled: bool = True) -> None:
        """On (default): inside `step_invariants()` forwards reuse the work that does not change
        across steps (bitwise the same output). Off: every forward runs the plain path."""
        self.step_reuse = bool(enabled)

    @contextmanager
    def step_invariants(self):
        """Scope of one sampling loop (one clip): forwards inside it compute the text, fps, size
        and position work once and reuse it (see `stdit3_reuse`). Yields the `StepInvariants`
        (hits / misses), or None when `set_step_reuse(False)`. Nested scopes: the inner one wins."""
        previous = self.step_scope
        self.step_scope = StepInvariants() if self.step_reuse else None
        try:
            yield self.step_scope
        finally:
            if self.step_scope is not None:
                self.step_scope.clear()
            self.step_scope = previous

    def compile_blocks(self, **options) -> None:
        """Regional torch.compile: each spatial and temporal block is compiled in place
        (`torch.compile` options; default dynamic=False). The first forward of each new size
        compiles (seconds to minutes); later ones run the compiled code."""
        options = {"dynamic": False, **options}
        for block in (*self.spatial_blocks, *self.temporal_blocks):
            block.compile(**options)

    def enable_gradient_checkpointing(self, enabled: bool = True) -> None:
        """Recompute each block in backward (torch.utils.checkpoint, non-reentrant)."""
        self.gradient_checkpointing = enabled

    def _apply_training_switches(self) -> None:
        if self.config.only_train_temporal:
            self.requires_grad_(False)
            self.temporal_blocks.requires_grad_(True)
        if self.config.freeze_y_embedder:
            self.y_embedder.requires_grad_(False)
        self.rope.freqs.requires_grad_(False)

    # ---- forward ----------------------------------------------------------------------------

    def forward(
        self,
        x: torch.Tensor,
        timestep: torch.Tensor,
        y: torch.Tensor,
        mask: torch.Tensor | None = None,
        x_mask: torch.Tensor | None = None,
        fps: torch.Tensor | None = None,
        height: torch.Tensor | float | None = None,
        width: torch.Tensor | float | None = None,
        *,
        force_drop_ids: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
        **kwargs,
    ) -> torch.Tensor:
        """Velocity (and the unused sigma head) for latents x [B, C_in, T, H, W].

        timestep [B] (or a scalar) in [0, 1000]; y [B, 1, L, C_text] text features; mask
        [B', L] text mask (nonzero = token), B' divides B and the rows are tiled (under CFG
        the null half reuses the prompts' masks); x_mask [B, T_p] bool, False = clean
        conditioning frame (t = 0); fps [b] with b dividing B; height, width: pixel sizes,
        only element 0 is used (position-embedding scale). `force_drop_ids` [B] (1 = null
        caption) and `generator` steer caption dropout. `num_frames` and `ar` are ignored.
        Returns [B, 2*C_in (pred_sigma) or C_in, T, H, W] in float32.
        """
        unknown = set(kwargs) - IGNORED_FORWARD_KWARGS
        if unknown:
            raise TypeError(f"STDiT3.forward got unexpected keyword arguments {sorted(unknown)}")
        cfg, dtype = self.config, self.x_embedder.proj.weight.dtype
        timestep = check_step_inputs(self, x, timestep, x_mask)
        B, _, T0, H0, W0 = x.shape
        pt, ph, pw = cfg.patch_size
        T, Hp, Wp = -(-T0 // pt), -(-H0 // ph), -(-W0 // pw)
        S = Hp * Wp
        if x_mask is not None:
            x_mask = x_mask.to(device=x.device, dtype=torch.bool)

        # text, fps, position tables: per call, or once per generation inside step_invariants()
        scope = self.step_scope if reuse_allowed(self, force_drop_ids) else None
        if scope is None:
            cond = self.step_conditions(
                x, y, mask, fps, height, width, force_drop_ids=force_drop_ids, generator=generator
            )
        else:
            cond = scope.lookup(
                (y, mask, fps, height, width),
                (B, T0, H0, W0, dtype, x.device),
                lambda: self.step_conditions(x, y, mask, fps, height, width, text_kv=True),
            )
            if x_mask is not None and bool(x_mask.all()):
                x_mask = None  # no condition frame: the t = 0 branch would change nothing (bitwise)
        y, y_valid, rope, text_kv = cond.y, cond.y_valid, cond.rope, cond.text_kv

        # conditioning vectors: t = t_embedder(timestep) + fps_embedder(fps)  [B, C]
        t = self.t_embedder(timestep, dtype) + cond.f
        t_mlp = self.t_block(t)  # [B, 6C]
        t0 = t0_mlp = None
        if x_mask is not None:
            t0, t0_mlp = cond.t0(lambda: self.t_zero(cond.f, dtype))

        # patches + 2D position embedding (same for every frame)
        x = self.x_embedder(x.to(dtype))  # [B, N, C]
        x = (x.view(B, T, S, -1) + cond.pos[:, None]).flatten(1, 2)  # [B, N, C]

        if self.sequence_parallel is not None:  # blocks and final layer on this rank's shard, then gather
            x = self.sequence_parallel.forward_tokens(
                self, x, t, y, y_valid, t_mlp, T, S, x_mask, t0, t0_mlp, rope, text_kv=text_kv
            )
        else:
            if self.step_cache is None:
                x = self.run_blocks(x, y, y_valid, t_mlp, T, S, x_mask, t0_mlp, rope, text_kv)
            else:  # step-cache hook (opensora_sdk.step_cache): may reuse earlier steps' work
                x = self.step_cache.run_blocks(self, x, y, y_valid, t_mlp, T, S, x_mask, t0_mlp, rope, text_kv)
            x = self.final_layer(x, t, x_mask, t0, T, S)  # [B, N, pt*ph*pw*C_out]
        return self.unpatchify(x, T, Hp, Wp, (T0, H0, W0)).float()

    def run_blocks(self, x, y, y_valid, t_mlp, T, S, x_mask=None, t0_mlp=None, rope=None, text_kv=None):
        """The block stack on tokens [B, T*S, C] (S may be a shard of the spatial tokens);
        text_kv: per depth ((k, v) spatial, (k, v) temporal) of y (`text_keys_values`) or None."""
        for i, (spatial, temporal) in enumerate(zip(self.spatial_blocks, self.temporal_blocks)):
            kv_s, kv_t = (None, None) if text_kv is None else text_kv[i]
            x = self._call_block(spatial, x, y, y_valid, t_mlp, T, S, x_mask, t0_mlp, None, None, kv_s)
            x = self._call_block(temporal, x, y, y_valid, t_mlp, T, S, x_mask, t0_mlp, rope, None, kv_t)
        return x

    def _call_block(self, block, *args):
        if self.block_callback is not None:
            self.block_callback()
        if self.gradient_checkpointing and torch.is_grad_enabled():
            return checkpoint(block, *args, use_reentrant=False)
        return block(*args)

    def step_conditions(
        self, x, y, mask, fps, height, width, *, force_drop_ids=None, generator=None, text_kv: bool = False
    ) -> StepConditions:
        """The inputs of a forward that do not change across sampling steps (checked here):
        text tokens and key mask, fps embedding, position and RoPE tables and, with `text_kv`,
        every block's cross-attention keys and values. x [B, C_in, T, H, W] gives sizes only."""
        cfg, dtype = self.config, self.x_embedder.proj.weight.dtype
        B, _, T0, H0, W0 = x.shape
        pt, ph, pw = cfg.patch_size
        T, Hp, Wp = -(-T0 // pt), -(-H0 // ph), -(-W0 // pw)
        S = Hp * Wp
        fps, height, width = check_conditions(self, x, y, mask, fps, height, width)
        f = self.fps_embedder(fps, B)  # [B, C]
        y, y_valid = self.encode_text(y.to(dtype), mask, force_drop_ids=force_drop_ids, generator=generator)
        quant = self.official_bf16_quantization
        scale = (height * width) ** 0.5 / cfg.input_sq_size
        pos = self.pos_embed(
            Hp, Wp, scale=scale, base_size=round(S**0.5), device=x.device, dtype=dtype, quantize_bf16=quant
        )  # [1, S, C]
        rope = self.rope.cos_sin(T, device=x.device, quantize_bf16=quant)  # 2 x [T, D]
        kv = self.text_keys_values(y) if text_kv else None
        return StepConditions(y, y_valid, f, pos, rope, kv)

    def text_keys_values(self, y: torch.Tensor) -> list:
        """Text tokens y [B, L', C] -> per depth ((k, v) spatial, (k, v) temporal), each [B, H, L', D]."""
        pairs = zip(self.spatial_blocks, self.temporal_blocks)
        return [(s.cross_attn.text_kv(y), t.cross_attn.text_kv(y)) for s, t in pairs]

    def t_zero(self, f: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """The condition frames' vectors: t0 = t_embedder(0) + f [B, C] and t0_mlp = t_block(t0) [B, 6C]."""
        t0 = self.t_embedder(torch.zeros(f.shape[0], device=f.device), dtype) + f
        return t0, self.t_block(t0)

    def encode_text(self, y, mask=None, *, force_drop_ids=None, generator=None):
        """y [B, 1, L, C_text] -> (tokens [B, L', C], valid [B, L'] bool or None).

        Only the valid tokens of each row are kept, moved to the front in their order, and
        rows are padded to the longest one, L' = max valid count (not the full L); `valid`
        marks real tokens for the attention key mask (None when every token is real).
        """
        B = y.shape[0]
        if self.config.skip_y_embedder:  # y is already projected and packed, mask holds lengths
            lens = torch.as_tensor(mask if mask is not None else [y.shape[-2] // B] * B).long().tolist()
            rows = list(y.reshape(-1, y.shape[-1]).split(lens))
            y = nn.utils.rnn.pad_sequence(rows, batch_first=True)  # [B, L', C]
            valid = torch.arange(y.shape[1], device=y.device)[None] < torch.tensor(lens, device=y.device)[:, None]
            return y, None if bool(valid.all()) else valid
        y = self.y_embedder(y, train=self.training, force_drop_ids=force_drop_ids, generator=generator)
        y = y.squeeze(1)  # [B, L, C]
        if mask is None:
            return y, None
        valid = mask.to(y.device).repeat(B // mask.shape[0], 1) != 0  # [B, L]
        lens = valid.sum(1)  # [B]
        longest = int(lens.max())
        order = torch.argsort((~valid).to(torch.int32), dim=1, stable=True)[:, :longest]  # valid first
        y = y.gather(1, order[..., None].expand(-1, -1, y.shape[-1]))  # [B, L', C]
        valid = torch.arange(longest, device=y.device)[None] < lens[:, None]  # [B, L']
        return y, None if bool(valid.all()) else valid

    def unpatchify(self, x, T, Hp, Wp, size):
        """[B, N, (pt ph pw C_out)] -> [B, C_out, T, H, W], cropping the patch padding."""
        pt, ph, pw = self.config.patch_size
        B = x.shape[0]
        x = x.view(B, T, Hp, Wp, pt, ph, pw, -1).permute(0, 7, 1, 4, 2, 5, 3, 6)
        x = x.reshape(B, -1, T * pt, Hp * ph, Wp * pw)  # [B, C_out, T_p*pt, H_p*ph, W_p*pw]
        return x[:, :, : size[0], : size[1], : size[2]]

    # ---- weights ----------------------------------------------------------------------------

    @torch.no_grad()
    def initialize_weights(self) -> None:
        """Initialisation for training from scratch (spec 2.4.10)."""
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
            if isinstance(module, (STDiT3Block, T2IFinalLayer)):
                module.scale_shift_table.normal_(std=C**-0.5)
        nn.init.normal_(self.fps_embedder.mlp[0].weight, std=0.02)
        nn.init.zeros_(self.fps_embedder.mlp[2].weight)
        nn.init.zeros_(self.fps_embedder.mlp[2].bias)
        for block in self.temporal_blocks:  # a new temporal block starts as the identity
            nn.init.zeros_(block.attn.proj.weight)
            nn.init.zeros_(block.cross_attn.proj.weight)
            nn.init.zeros_(block.mlp.fc2.weight)

    @classmethod
    def from_pretrained(
        cls,
        path_or_repo: str | os.PathLike,
        *,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
        strict: bool = True,
        prefer: str = "ema",
        local_files_only: bool | None = None,
        config: STDiT3Config | dict | None = None,
        official_bf16_quantization: bool = False,
    ) -> STDiT3:
        """Load a checkpoint: HF folder or repo id, .safetensors, .pth/.pt (EMA preferred).

        The config comes from `config`, else the folder's config.json, else the tensor shapes.
        The model is built on the meta device and each tensor is assigned in `dtype`
        (default float32) on `device` (default CPU); `rope.freqs` stays float32. With
        `strict=False`, tensors absent from the checkpoint keep the from-scratch
        initialisation and the mismatch report is issued as a warning. Returns eval mode.
        """
        resolved = resolve_checkpoint(path_or_repo, local_files_only=local_files_only)
        if isinstance(config, dict):
            config = config_from_dict(STDiT3Config, config)
        elif config is None and resolved.config_file is not None:
            config = read_config_json(STDiT3Config, resolved.config_file)
        elif config is None:
            shapes = {k: tuple(t.shape) for k, t in _renamed(iter_tensors(resolved.weight_files, prefer=prefer))}
            config = infer_config(shapes)
        from opensora_sdk.loading import meta_device

        with meta_device():  # no meta arithmetic (it imports torch's compiler)
            model = cls(config, official_bf16_quantization=official_bf16_quantization)
        if not strict:
            model.to_empty(device=device or "cpu").to(dtype or torch.float32)
            model.initialize_weights()
        report = load_tensors_into(
            model,
            _renamed(iter_tensors(resolved.weight_files, prefer=prefer)),
            strict=strict,
            dtype=dtype or torch.float32,
            device=device,
            keep_float32=("rope.freqs",),
        )
        if not report.ok:
            warnings.warn(f"STDiT3 loaded non-strictly from {str(path_or_repo)!r}:\n{report}", stacklevel=2)
        model._apply_training_switches()
        return model.eval()

    def save_pretrained(self, folder: str | os.PathLike) -> None:
        """Write model.safetensors and config.json (official field names) atomically."""
        folder = Path(folder)
        dtype = str(self.x_embedder.proj.weight.dtype).removeprefix("torch.")
        save_safetensors_atomic(self.state_dict(), folder / "model.safetensors", metadata={"format": "pt"})
        config = {"architectures": ["STDiT3"], "model_type": "STDiT3", **config_to_dict(self.config)}
        write_json_atomic({**config, "torch_dtype": dtype}, folder / "config.json")


def _renamed(tensors):
    """Drop the fixed sin-cos tables some older training checkpoints store (recomputed here)."""
    for key, tensor in tensors:
        if key not in ("pos_embed", "pos_embed_temporal"):
            yield key, tensor


def infer_config(shapes: dict[str, tuple]) -> STDiT3Config:
    """STDiT3Config from a state dict's {key: shape} (for checkpoints without config.json)."""

    def need(key):
        if key not in shapes:
            raise CheckpointError(
                f"cannot infer the STDiT3 config: key {key!r} is missing from the checkpoint "
                f"(is it an STDiT3 checkpoint?); pass config=STDiT3Config(...) explicitly"
            )
        return shapes[key]

    hidden, in_channels, *patch = need("x_embedder.proj.weight")
    depth = len({m.group(1) for k in shapes if (m := re.fullmatch(r"spatial_blocks\.(\d+)\.scale_shift_table", k))})
    qk_norm = "spatial_blocks.0.attn.q_norm.weight" in shapes
    head_dim = need("spatial_blocks.0.attn.q_norm.weight")[0] if qk_norm else 2 * need("rope.freqs")[0]
    out_channels = need("final_layer.linear.weight")[0] // math.prod(patch)
    if out_channels not in (in_channels, 2 * in_channels):
        raise CheckpointError(f"final layer gives {out_channels} channels for in_channels={in_channels}")
    caption_len, caption_channels = need("y_embedder.y_embedding")
    return STDiT3Config(
        in_channels=in_channels,
        patch_size=tuple(patch),
        hidden_size=hidden,
        depth=depth,
        num_heads=hidden // head_dim,
        mlp_ratio=need("spatial_blocks.0.mlp.fc1.weight")[0] / hidden,
        pred_sigma=out_channels == 2 * in_channels,
        caption_channels=caption_channels,
        model_max_length=caption_len,
        qk_norm=qk_norm,
    )
