"""The v1.2 video VAE pipeline: per-frame 2D KL autoencoder (x8 space), then the causal
temporal VAE (x4 time), then per-channel normalisation (spec section 3.1).

    video [B, 3, N, H, W] in [-1, 1]
      -> spatial: frames in micro-batches of `micro_batch_size`, posterior x 0.18215
      -> x_z [B, 4, N, H/8, W/8]
      -> temporal: chunks of `micro_frame_size` (17) frames, each encoded on its own
      -> z [B, 4, T', H/8, W/8], returned as (z - shift) / scale

Decoding reverses it chunk by chunk: 5 latent frames -> at most 17 frames of 2D latents ->
pixels in micro-batches written into a preallocated output, so peak memory is one chunk's
working set plus the output, whatever the video length. Outputs are not clamped.

Memory options: `micro_batch_size` (4 frames) and `micro_frame_size` (17) in the config, as
officially; and, per call, `tiling=SpatialTiling(tile_size, overlap)` in pixels for the 2D
stage (the temporal stage works at latent resolution and is never tiled). Tiling is off by
default, so results match the official code.

Progress: `encode` and `decode` take `progress(done, total)`, called after each unit of work
(a temporal chunk, a micro-batch of frames, or one tile of it when tiling); it may raise to
stop the work there (front ends raise their interrupt).

Randomness: both posteriors are sampled at encode time; pass `generator` to draw every
sample from it, or `noise_fn(shape) -> tensor` to supply each draw yourself (tests inject the
recorded official draws this way). Draw order: one per spatial micro-batch, then one per
temporal chunk. Without either, draws follow the official code: the spatial ones from the
default RNG of the model's device, the temporal ones from the CPU RNG in float32.

Speed: `decode` runs both decoders through vae_fast.py (the same values up to float rounding,
1e-5 in the tests; `set_fast_decode(False)` gives the plain decoders). On a CPU with AMX or
AVX512-BF16 (`cpu_has_fast_bf16()`), a bfloat16 VAE decodes several times faster than float32
at about 50 dB PSNR from it (benchmarks/bench_vae.py; the pipeline's `vae_dtype`).

dtypes: float32, bfloat16 and float16. In float16 the spatial decoder runs in float32
(`vae_2d.force_upcast`, default True): the KL decoder is known to overflow in half precision.
`from_pretrained(dtype=torch.float16)` keeps its weights in float32, and so does a cast
(`.to(torch.float16)`, `.half()`): the model's `_apply` applies the rule, once. On CUDA, float32 parity with
the official outputs (1e-4) needs TF32 convolutions off (`torch.backends.cudnn.allow_tf32 =
False`; PyTorch enables them by default): with TF32 the tiny goldens move by up to 8e-3.
"""

from __future__ import annotations

import copy
import json
import os
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from einops import rearrange
from torch import nn

from opensora_sdk.configs import (
    VAE_PRESETS,
    VideoAutoencoderConfig,
    config_to_dict,
    video_autoencoder_config_from_official,
)
from opensora_sdk.models.vae_spatial import AutoencoderKL, DiagonalGaussian, randn, rename_legacy_attention
from opensora_sdk.models.vae_temporal import TemporalVAE
from opensora_sdk.models.vae_tiling import SpatialTiling, tile_starts, tiled_decode, tiled_encode

NoiseFn = Callable[[tuple], torch.Tensor]
ProgressFn = Callable[[int, int], None]  # progress(done, total) after each unit of work; may raise to stop


# --------------------------------------------------------------------------------------------
# Sizes (pure functions)
# --------------------------------------------------------------------------------------------


def latent_size(
    num_frames: int | None,
    height: int | None,
    width: int | None,
    *,
    micro_frame_size: int | None = 17,
    time_factor: int = 4,
    space_factor: int = 8,
) -> tuple[int | None, int | None, int | None]:
    """(T', H/8, W/8) of the latent for a video of `num_frames` x `height` x `width`.

    Temporal: every full chunk of `micro_frame_size` frames gives ceil(chunk/4) latents (5 for
    17) and the remainder r gives ceil(r/4); with `micro_frame_size=None` the whole video is
    one chunk: ceil(N/4). Spatial: floor division. A None size stays None (as officially).
    """
    def per_chunk(n: int) -> int:
        return -(-n // time_factor)

    if num_frames is None:
        t = None
    elif micro_frame_size is None:
        t = per_chunk(num_frames)
    else:
        full, rest = divmod(num_frames, micro_frame_size)
        t = full * per_chunk(micro_frame_size) + per_chunk(rest)
    h = None if height is None else height // space_factor
    w = None if width is None else width // space_factor
    return t, h, w


def frames_for_latent_length(
    latent_frames: int, *, micro_frame_size: int | None = 17, time_factor: int = 4
) -> tuple[int, int] | None:
    """The range (lo, hi) of frame counts N whose latent has `latent_frames` frames, or None."""
    chunk = micro_frame_size or time_factor
    fits = [
        n for n in range(1, chunk * (latent_frames + 1) + 1)
        if latent_size(n, None, None, micro_frame_size=micro_frame_size, time_factor=time_factor)[0] == latent_frames
    ]
    return (fits[0], fits[-1]) if fits else None


# --------------------------------------------------------------------------------------------
# Progress (units of work: temporal chunks, micro-batches, tiles)
# --------------------------------------------------------------------------------------------


class WorkCounter:
    """Counts units of work and reports `progress(done, total)` after each one (None: silent)."""

    def __init__(self, progress: ProgressFn | None, total: int):
        self.progress, self.total, self.done = progress, max(int(total), 1), 0

    def tick(self) -> None:
        self.done += 1
        if self.progress is not None:
            self.progress(min(self.done, self.total), self.total)

    def counted(self, fn: Callable) -> Callable:
        """`fn` that ticks after every call (a tile of a tiled encode / decode)."""

        def run(x):
            out = fn(x)
            self.tick()
            return out

        return run


def tile_count(height: int, width: int, tiling: SpatialTiling | None, factor: int, *, latent: bool) -> int:
    """Tiles per frame of a (height, width) input: latents (decode) or pixels (encode)."""
    if tiling is None:
        return 1
    if latent:
        tile, overlap, align = tiling.tile_size // factor, tiling.overlap // factor, 1
    else:
        tile, overlap, align = tiling.tile_size, tiling.overlap, factor
    return len(tile_starts(height, tile, overlap, align)) * len(tile_starts(width, tile, overlap, align))


# --------------------------------------------------------------------------------------------
# The pipeline
# --------------------------------------------------------------------------------------------


class VideoAutoencoder(nn.Module):
    """Open-Sora v1.2 video VAE (`VideoAutoencoderPipeline`): `encode`, `decode`, `latent_size`."""

    def __init__(self, config: VideoAutoencoderConfig | None = None):
        super().__init__()
        self.config = config = config or VideoAutoencoderConfig()
        if config.vae_2d.latent_channels != config.vae_temporal.in_out_channels:
            raise ValueError(
                f"vae_2d.latent_channels={config.vae_2d.latent_channels} must equal "
                f"vae_temporal.in_out_channels={config.vae_temporal.in_out_channels}"
            )
        c = config.vae_temporal.embed_dim
        self.register_buffer("scale", torch.tensor(config.scale, dtype=torch.float32).view(1, c, 1, 1, 1))
        self.register_buffer("shift", torch.tensor(config.shift, dtype=torch.float32).view(1, c, 1, 1, 1))
        # The official pipeline wraps the 2D autoencoder one level deep: `spatial_vae.module.*`.
        self.spatial_vae = nn.ModuleDict({"module": AutoencoderKL(config.vae_2d)})
        self.temporal_vae = TemporalVAE(config.vae_temporal)

    def set_fast_decode(self, enabled: bool = True) -> VideoAutoencoder:
        """Decode both stages through vae_fast.py (True, the default: the same values up to
        float rounding, faster) or through the plain decoders (False: for comparisons)."""
        self.spatial.set_fast_decode(enabled)
        self.temporal_vae.set_fast_decode(enabled)
        return self

    # ---- properties ----------------------------------------------------------------------

    @property
    def spatial(self) -> AutoencoderKL:
        return self.spatial_vae["module"]

    def _apply(self, fn, recurse=True):  # every cast and move (`.to`, `.half()`) goes through here
        """After a cast to float16, the spatial decoder goes back to float32 when
        `vae_2d.force_upcast` (it overflows in half precision): the one place of that rule."""
        super()._apply(fn, recurse)
        kl = self.spatial
        if self.config.vae_2d.force_upcast and kl.post_quant_conv.weight.dtype == torch.float16:
            kl.decoder.float()
            kl.post_quant_conv.float()
        return self

    @property
    def dtype(self) -> torch.dtype:
        return self.temporal_vae.dtype

    @property
    def device(self) -> torch.device:
        return self.scale.device

    @property
    def spatial_factor(self) -> int:
        return 2 ** (len(self.config.vae_2d.block_out_channels) - 1)

    @property
    def latent_channels(self) -> int:
        return self.config.vae_temporal.embed_dim

    def latent_size(self, num_frames: int | None, height: int | None, width: int | None) -> tuple:
        """(T', H/8, W/8) for this model's micro_frame_size; see the module-level `latent_size`."""
        return latent_size(
            num_frames, height, width,
            micro_frame_size=self.config.micro_frame_size,
            time_factor=self.temporal_vae.time_downsample_factor,
            space_factor=self.spatial_factor,
        )

    def forward(self, video: torch.Tensor, sample: bool = False, generator: torch.Generator | None = None):
        """Reconstruction decode(encode(video)), e.g. for evaluating the autoencoder."""
        return self.decode(self.encode(video, sample, generator), num_frames=video.shape[2])

    # ---- encode --------------------------------------------------------------------------

    def encode(
        self,
        video: torch.Tensor,
        sample: bool = True,
        generator: torch.Generator | None = None,
        *,
        noise_fn: NoiseFn | None = None,
        tiling: SpatialTiling | None = None,
        progress: ProgressFn | None = None,
    ) -> torch.Tensor:
        """video [B, 3, N, H, W] in [-1, 1] -> normalised latent [B, 4, T', H/8, W/8].

        `sample=False` returns the posterior means (deterministic). See the module docstring
        for `generator` / `noise_fn`, `tiling` and `progress`.
        """
        counter = None
        if progress is not None and isinstance(video, torch.Tensor) and video.ndim == 5:
            B, _, N, H, W = video.shape
            step = self.config.micro_batch_size or B * N
            mfs = self.config.micro_frame_size or N
            tiles = tile_count(H, W, tiling, self.spatial_factor, latent=False)
            counter = WorkCounter(progress, -(-B * N // step) * tiles + -(-N // mfs))
        x_z = self.encode_spatial(video, sample, generator, noise_fn=noise_fn, tiling=tiling, _counter=counter)
        z = self.encode_temporal(x_z, sample, generator, noise_fn=noise_fn, _counter=counter)
        return (z - self.shift) / self.scale

    def encode_spatial(
        self,
        video: torch.Tensor,
        sample: bool = True,
        generator: torch.Generator | None = None,
        *,
        noise_fn: NoiseFn | None = None,
        tiling: SpatialTiling | None = None,
        _counter: WorkCounter | None = None,
    ) -> torch.Tensor:
        """Stage 1: video [B, 3, N, H, W] -> 2D latents x 0.18215, [B, 4, N, H/8, W/8]."""
        _check_video(video, self.config.vae_2d.in_channels, self.spatial_factor)
        _check_noise_args(generator, noise_fn)
        kl = self.spatial
        B, _, N = video.shape[:3]
        step = self.config.micro_batch_size or B * N
        latents = []
        for i in range(0, B * N, step):
            # frames i.. of the (B N) order, gathered one micro-batch at a time so the video
            # is never copied whole (it may stay on the CPU while the model is on a GPU)
            batch = torch.stack([video[j // N, :, j % N] for j in range(i, min(i + step, B * N))])
            batch = batch.to(self.device, kl.dtype)  # [m, 3, H, W]
            if tiling is None:
                moments = kl.encode_moments(batch)
                if _counter is not None:
                    _counter.tick()
            else:
                encode = kl.encode_moments if _counter is None else _counter.counted(kl.encode_moments)
                moments = tiled_encode(encode, batch, tiling, self.spatial_factor)
            z = _draw(DiagonalGaussian(moments), sample, generator, noise_fn, official_cpu_fp32=False)
            latents.append(z * self.config.spatial_scaling_factor)  # [m, 4, h, w]
        return rearrange(torch.cat(latents), "(B N) C h w -> B C N h w", B=B)

    def encode_temporal(
        self,
        x_z: torch.Tensor,
        sample: bool = True,
        generator: torch.Generator | None = None,
        *,
        noise_fn: NoiseFn | None = None,
        _counter: WorkCounter | None = None,
    ) -> torch.Tensor:
        """Stage 2: 2D latents [B, 4, N, h, w] -> raw temporal latent [B, 4, T', h, w]."""
        _check_noise_args(generator, noise_fn)
        x_z = x_z.to(self.device, self.temporal_vae.dtype)
        N = x_z.shape[2]
        step = self.config.micro_frame_size or N
        z = []
        for i in range(0, N, step):
            posterior = self.temporal_vae.encode(x_z[:, :, i : i + step])  # over [B, 4, ceil(n/4), h, w]
            z.append(_draw(posterior, sample, generator, noise_fn, official_cpu_fp32=True))
            if _counter is not None:
                _counter.tick()
        return torch.cat(z, dim=2)

    # ---- decode --------------------------------------------------------------------------

    def decode(self, latent: torch.Tensor, num_frames: int, *, tiling: SpatialTiling | None = None,
               progress: ProgressFn | None = None) -> torch.Tensor:
        """Normalised latent [B, 4, T', h, w] -> video [B, 3, num_frames, 8h, 8w] (not clamped).

        `num_frames` must be a frame count whose latent length is T' (see `latent_size`).
        Runs chunk by chunk into a preallocated output of the model's dtype; `progress(done,
        total)` after each temporal chunk and each micro-batch (or tile) of frames.
        """
        _check_latent(latent, num_frames, self)
        kl = self.spatial
        z = latent.to(self.device, self.dtype) * self.scale + self.shift
        B, _, _, h, w = z.shape
        f = self.spatial_factor
        c = self.config.vae_2d.out_channels
        out = torch.empty(B, c, num_frames, h * f, w * f, dtype=self.dtype, device=self.device)
        counter = WorkCounter(progress, self._decode_units(B, num_frames, tile_count(h, w, tiling, f, latent=True)))
        decode = kl.decode if tiling is None else counter.counted(kl.decode)
        for t0, x_z in self._temporal_chunks(z, num_frames):
            counter.tick()
            n = x_z.shape[2]
            frames = rearrange(x_z, "B C n h w -> (B n) C h w") / self.config.spatial_scaling_factor
            step = self.config.micro_batch_size or frames.shape[0]
            for i in range(0, frames.shape[0], step):
                batch = frames[i : i + step]  # [m, 4, h, w]
                pixels = decode(batch) if tiling is None else tiled_decode(decode, batch, tiling, f)
                if tiling is None:
                    counter.tick()
                for j, frame in enumerate(pixels):  # [3, 8h, 8w]
                    b, t = divmod(i + j, n)
                    out[b, :, t0 + t] = frame
        return out

    def _decode_units(self, batch: int, num_frames: int, tiles: int) -> int:
        """Units of work of a decode: per temporal chunk, 1 + its micro-batches x tiles."""
        mfs = self.config.micro_frame_size or num_frames
        units = 0
        for t0 in range(0, num_frames, mfs):
            frames = batch * min(mfs, num_frames - t0)
            units += 1 + -(-frames // (self.config.micro_batch_size or frames)) * tiles
        return units

    def decode_temporal(self, latent: torch.Tensor, num_frames: int) -> torch.Tensor:
        """Stage 2 only: normalised latent -> 2D latents x 0.18215, [B, 4, num_frames, h, w]."""
        _check_latent(latent, num_frames, self)
        z = latent.to(self.device, self.dtype) * self.scale + self.shift
        return torch.cat([x_z for _, x_z in self._temporal_chunks(z, num_frames)], dim=2)

    def _temporal_chunks(self, z: torch.Tensor, num_frames: int) -> Iterator[tuple[int, torch.Tensor]]:
        """Yield (first frame, 2D latents [B, 4, n, h, w]) per temporal chunk of raw latent z."""
        mfs = self.config.micro_frame_size
        if mfs is None:
            yield 0, self.temporal_vae.decode(z, num_frames)
            return
        step = self.latent_size(mfs, None, None)[0]  # 5 latent frames per 17-frame chunk
        for k, i in enumerate(range(0, z.shape[2], step)):
            n = min(mfs, num_frames - k * mfs)
            yield k * mfs, self.temporal_vae.decode(z[:, :, i : i + step], num_frames=n)

    # ---- files ---------------------------------------------------------------------------

    @classmethod
    def from_pretrained(
        cls,
        path_or_repo: str | os.PathLike,
        *,
        config: VideoAutoencoderConfig | None = None,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
        strict: bool = True,
        local_files_only: bool | None = None,
    ) -> VideoAutoencoder:
        """Load the official `hpcai-tech/OpenSora-VAE-v1.2` layout (or our own saves).

        `path_or_repo`: a folder with config.json (`model_type` VideoAutoencoderPipeline) and
        model.safetensors, a single weight file (the config is taken from `config=`, else
        inferred from the tensor shapes among the presets), or a hub repo id. The model is
        built on the meta device and each tensor is assigned in `dtype` on `device`. With
        float16 the spatial decoder stays float32 (see the module docstring).
        """
        from opensora_sdk.loading import iter_tensors, load_tensors_into, resolve_checkpoint

        resolved = resolve_checkpoint(path_or_repo, local_files_only=local_files_only)
        if config is None and resolved.config_file is not None:
            data = json.loads(resolved.config_file.read_text("utf-8"))
            if data.get("model_type") == VideoAutoencoderConfig.model_type or "vae_temporal" in data:
                config = video_autoencoder_config_from_official(data)
        if config is None:
            config = _infer_config(resolved.weight_files)
        from opensora_sdk.loading import meta_device

        with meta_device():  # no meta arithmetic (it imports torch's compiler)
            model = cls(config)
        keep_float32 = ()
        if dtype == torch.float16 and config.vae_2d.force_upcast:
            decoder = ("spatial_vae.module.decoder.", "spatial_vae.module.post_quant_conv.")
            keep_float32 = [k for k in model.state_dict() if k.startswith(decoder)]
        tensors = rename_legacy_attention(iter_tensors(resolved.weight_files))
        load_tensors_into(model, tensors, strict=strict, dtype=dtype, device=device, keep_float32=keep_float32)
        return model.eval()

    def save_pretrained(self, folder: str | os.PathLike) -> None:
        """Write config.json (official layout) and model.safetensors, each atomically."""
        from opensora_sdk.loading import save_safetensors_atomic, write_json_atomic

        folder = Path(folder)
        save_safetensors_atomic(self.state_dict(), folder / "model.safetensors")
        data = official_config_dict(self.config)
        data["torch_dtype"] = str(self.dtype).removeprefix("torch.")
        write_json_atomic(data, folder / "config.json")


def official_config_dict(config: VideoAutoencoderConfig) -> dict:
    """config.json content in the official layout, plus our architecture fields."""
    return {
        "architectures": ["VideoAutoencoderPipeline"],
        "model_type": VideoAutoencoderConfig.model_type,
        "cal_loss": False,
        "freeze_vae_2d": False,
        "micro_batch_size": config.micro_batch_size,
        "micro_frame_size": config.micro_frame_size,
        "spatial_scaling_factor": config.spatial_scaling_factor,
        "shift": list(config.shift),
        "scale": list(config.scale),
        "vae_2d": {
            "type": "VideoAutoencoderKL",
            "micro_batch_size": config.micro_batch_size,
            **config_to_dict(config.vae_2d),
        },
        "vae_temporal": {"type": "VAE_Temporal_SD", **config_to_dict(config.vae_temporal)},
    }


def _infer_config(files) -> VideoAutoencoderConfig:
    """Pick the preset whose shapes match two probe tensors of a weight file without config."""
    from opensora_sdk.loading import CheckpointError, iter_tensors

    probes = ("spatial_vae.module.encoder.conv_in.weight", "temporal_vae.encoder.conv_in.conv.weight")
    shapes = _probe_shapes(files, probes, iter_tensors)
    from opensora_sdk.loading import meta_device

    for name, preset in VAE_PRESETS.items():
        with meta_device():  # no meta arithmetic (it imports torch's compiler)
            sd = VideoAutoencoder(preset).state_dict()
        if all(k in shapes and tuple(sd[k].shape) == shapes[k] for k in probes):
            return copy.deepcopy(preset)
    raise CheckpointError(
        f"cannot tell which VAE this checkpoint is (shapes {shapes} match none of the presets "
        f"{sorted(VAE_PRESETS)}); pass config=VideoAutoencoderConfig(...) or a folder with config.json"
    )


def _probe_shapes(files, keys, iter_tensors) -> dict[str, tuple]:
    from opensora_sdk.loading import strip_key_prefixes

    shapes = {}
    for file in files:
        if Path(file).suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(file), framework="pt", device="cpu") as f:
                for raw in f.keys():
                    if strip_key_prefixes(raw) in keys:
                        shapes[strip_key_prefixes(raw)] = tuple(f.get_slice(raw).get_shape())
        else:
            shapes.update({k: tuple(t.shape) for k, t in iter_tensors([file]) if k in keys})
    return shapes


# --------------------------------------------------------------------------------------------
# Draws and argument checks
# --------------------------------------------------------------------------------------------

def cpu_has_fast_bf16() -> bool:
    """Whether this CPU computes bfloat16 convolutions natively (AMX or AVX512-BF16); without
    them oneDNN emulates bfloat16 and a bfloat16 VAE decode is slower than float32."""
    cpu = getattr(torch, "cpu", None)
    checks = [getattr(cpu, name, None) for name in ("_is_amx_tile_supported", "_is_avx512_bf16_supported")]
    return any(check() for check in checks if check is not None)


def _draw(posterior: DiagonalGaussian, sample: bool, generator, noise_fn, *, official_cpu_fp32: bool) -> torch.Tensor:
    """Sample (or take the mean of) one posterior, drawing its noise as described above."""
    if not sample:
        return posterior.mode()
    mean = posterior.mean
    shape = tuple(mean.shape)
    if noise_fn is not None:
        noise = noise_fn(shape)
        if tuple(noise.shape) != shape:
            raise ValueError(f"noise_fn returned a tensor of shape {list(noise.shape)}; this draw needs {list(shape)}")
    elif official_cpu_fp32:  # the temporal posterior: float32 noise from the CPU (or generator) RNG
        where = generator.device if generator is not None else "cpu"
        noise = torch.randn(shape, generator=generator, device=where, dtype=torch.float32)
    else:  # the spatial posterior: like diffusers' randn_tensor
        noise = randn(shape, generator=generator, device=mean.device, dtype=mean.dtype)
    return posterior.sample(noise=noise)


def _check_noise_args(generator, noise_fn) -> None:
    if generator is not None and noise_fn is not None:
        raise ValueError("pass either generator= or noise_fn=, not both: noise_fn supplies every draw")


def _check_video(video, channels: int, factor: int) -> None:
    if not isinstance(video, torch.Tensor):
        raise TypeError(f"video must be a torch.Tensor [B, {channels}, N, H, W], got {type(video).__name__}")
    shape = list(video.shape)
    if video.ndim != 5:
        hint = (
            " For one clip add the batch axis (video[None]); for a batch of images add the frame "
            "axis (video.unsqueeze(2))." if video.ndim == 4 else ""
        )
        raise ValueError(f"video must be a 5D tensor [B, {channels}, N, H, W]; got shape {shape}.{hint}")
    if shape[1] != channels:
        hint = " Channels last? Use video.permute(0, 4, 1, 2, 3)." if shape[-1] == channels else ""
        raise ValueError(f"video has {shape[1]} channels (dim 1 of shape {shape}); expected {channels} (RGB).{hint}")
    if not video.is_floating_point():
        raise ValueError(
            f"video must be floating point in [-1, 1], got dtype {video.dtype}; "
            "convert uint8 frames with video.float() / 127.5 - 1"
        )
    if shape[2] < 1 or shape[3] < factor or shape[4] < factor:
        raise ValueError(f"video of shape {shape} is too small: need N >= 1 frames and H, W >= {factor} pixels")
    low, high = torch.aminmax(video.detach())
    peak = max(-float(low), float(high))
    if peak > 1.5:
        warnings.warn(
            f"video values reach {peak:.4g}, far outside [-1, 1] where the VAE was trained; "
            "pixels in [0, 255] map to [-1, 1] with x / 127.5 - 1",
            stacklevel=4,
        )


def _check_latent(latent, num_frames, model: VideoAutoencoder) -> None:
    c = model.latent_channels
    if not isinstance(latent, torch.Tensor):
        raise TypeError(f"latent must be a torch.Tensor [B, {c}, T, h, w], got {type(latent).__name__}")
    shape = list(latent.shape)
    if latent.ndim != 5:
        raise ValueError(f"latent must be a 5D tensor [B, {c}, T, h, w]; got shape {shape}")
    if shape[1] != c:
        raise ValueError(f"latent has {shape[1]} channels (dim 1 of shape {shape}); expected {c}")
    if not isinstance(num_frames, int) or isinstance(num_frames, bool) or num_frames < 1:
        raise ValueError(f"num_frames must be a positive int, got {num_frames!r}")
    need = model.latent_size(num_frames, None, None)[0]
    if shape[2] != need:
        mfs = model.config.micro_frame_size
        factor = model.temporal_vae.time_downsample_factor
        fits = frames_for_latent_length(shape[2], micro_frame_size=mfs, time_factor=factor)
        allowed = "no frame count" if fits is None else (
            f"num_frames={fits[0]}" if fits[0] == fits[1] else f"num_frames in {fits[0]}..{fits[1]}"
        )
        raise ValueError(
            f"latent has {shape[2]} frames (dim 2 of shape {shape}) but num_frames={num_frames} needs "
            f"{need} latent frames (micro_frame_size={mfs}); a {shape[2]}-frame latent decodes to {allowed}"
        )
