"""The 2D KL autoencoder: per-frame x8 spatial compression to 4 latent channels.

This is the architecture of diffusers' `AutoencoderKL` with its parameter names, so the
v1.2 pipeline's `spatial_vae.module.*` tensors, the SDXL VAE and `stabilityai/sd-vae-ft-ema`
(the VAE of v1.0/v1.1) load unchanged. Math only; files are read through loading.py.

Shapes: images [B, 3, H, W] in [-1, 1]; latents [B, 4, H/8, W/8] (unscaled: multiply by the
pipeline's scaling factor yourself). H and W not divisible by 8 give floor(H/8): the
downsamplers pad one row/column on the bottom/right only, as diffusers does.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from opensora_sdk.configs import AutoencoderKLConfig, config_from_dict, config_to_dict
from opensora_sdk.models import vae_fast

# --------------------------------------------------------------------------------------------
# Posterior
# --------------------------------------------------------------------------------------------


def randn(shape, *, generator: torch.Generator | None, device, dtype) -> torch.Tensor:
    """Gaussian noise as diffusers' `randn_tensor` draws it: on the generator's device when a
    generator is given (then moved), else on `device` from the global RNG."""
    where = generator.device if generator is not None else device
    return torch.randn(tuple(shape), generator=generator, device=where, dtype=dtype).to(device)


class DiagonalGaussian:
    """Posterior N(mean, exp(logvar)) from moments [B, 2C, ...] (mean first, then logvar)."""

    def __init__(self, moments: torch.Tensor):
        self.mean, logvar = moments.chunk(2, dim=1)  # [B, C, ...] each
        self.logvar = logvar.clamp(-30.0, 20.0)
        self.std = torch.exp(0.5 * self.logvar)

    def sample(self, generator: torch.Generator | None = None, noise: torch.Tensor | None = None) -> torch.Tensor:
        """mean + std * noise; noise is drawn like diffusers when not given."""
        if noise is None:
            noise = randn(self.mean.shape, generator=generator, device=self.mean.device, dtype=self.mean.dtype)
        return self.mean + self.std * noise.to(self.mean)

    def mode(self) -> torch.Tensor:
        return self.mean


# --------------------------------------------------------------------------------------------
# Blocks, smallest first
# --------------------------------------------------------------------------------------------

_EPS = 1e-6  # every GroupNorm of the KL autoencoder


class ResnetBlock2D(nn.Module):
    """GroupNorm -> SiLU -> conv3x3, twice, plus the (1x1-projected) input."""

    def __init__(self, cin: int, cout: int, groups: int):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, cin, eps=_EPS)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.norm2 = nn.GroupNorm(groups, cout, eps=_EPS)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(cin, cout, 1) if cin != cout else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        if self.conv_shortcut is not None:
            x = self.conv_shortcut(x)
        return x + h


class Attention(nn.Module):
    """Single-head self-attention over the H*W positions of a feature map, with residual."""

    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.group_norm = nn.GroupNorm(groups, channels, eps=_EPS)
        self.to_q = nn.Linear(channels, channels)
        self.to_k = nn.Linear(channels, channels)
        self.to_v = nn.Linear(channels, channels)
        self.to_out = nn.ModuleList([nn.Linear(channels, channels)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        h = self.group_norm(x).view(B, C, H * W).transpose(1, 2)  # [B, HW, C]
        q, k, v = (proj(h).unsqueeze(1) for proj in (self.to_q, self.to_k, self.to_v))  # [B, 1, HW, C]
        h = F.scaled_dot_product_attention(q, k, v).squeeze(1)  # [B, HW, C], scale 1/sqrt(C)
        h = self.to_out[0](h).transpose(1, 2).reshape(B, C, H, W)
        return x + h


class Downsample2D(nn.Module):
    """conv3x3 stride 2 after padding one row/column at the bottom/right: H -> floor(H/2)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample2D(nn.Module):
    """Nearest x2, then conv3x3."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class DownEncoderBlock2D(nn.Module):
    def __init__(self, cin: int, cout: int, layers: int, groups: int, downsample: bool):
        super().__init__()
        self.resnets = nn.ModuleList(ResnetBlock2D(cin if i == 0 else cout, cout, groups) for i in range(layers))
        self.downsamplers = nn.ModuleList([Downsample2D(cout)]) if downsample else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for resnet in self.resnets:
            x = resnet(x)
        if self.downsamplers is not None:
            x = self.downsamplers[0](x)  # [B, C, H/2, W/2]
        return x


class UpDecoderBlock2D(nn.Module):
    def __init__(self, cin: int, cout: int, layers: int, groups: int, upsample: bool):
        super().__init__()
        self.resnets = nn.ModuleList(ResnetBlock2D(cin if i == 0 else cout, cout, groups) for i in range(layers))
        self.upsamplers = nn.ModuleList([Upsample2D(cout)]) if upsample else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for resnet in self.resnets:
            x = resnet(x)
        if self.upsamplers is not None:
            x = self.upsamplers[0](x)  # [B, C, 2H, 2W]
        return x


class MidBlock2D(nn.Module):
    """resnet -> attention -> resnet at the lowest resolution."""

    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.attentions = nn.ModuleList([Attention(channels, groups)])
        self.resnets = nn.ModuleList([ResnetBlock2D(channels, channels, groups) for _ in range(2)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.resnets[0](x)
        x = self.attentions[0](x)
        return self.resnets[1](x)


# --------------------------------------------------------------------------------------------
# Encoder, decoder, autoencoder
# --------------------------------------------------------------------------------------------


def _check_supported(config: AutoencoderKLConfig) -> None:
    if config.act_fn != "silu":
        raise ValueError(f"AutoencoderKL: act_fn={config.act_fn!r} is not supported; only 'silu'")
    for name, allowed in (("down_block_types", "DownEncoderBlock2D"), ("up_block_types", "UpDecoderBlock2D")):
        types = getattr(config, name)
        if any(t != allowed for t in types) or len(types) != len(config.block_out_channels):
            raise ValueError(
                f"AutoencoderKL: {name}={list(types)} is not supported; expected "
                f"{len(config.block_out_channels)} x {allowed!r} (one per block_out_channels entry)"
            )


class Encoder(nn.Module):
    def __init__(self, config: AutoencoderKLConfig):
        super().__init__()
        ch, groups, n = config.block_out_channels, config.norm_num_groups, config.layers_per_block
        self.conv_in = nn.Conv2d(config.in_channels, ch[0], 3, padding=1)
        self.down_blocks = nn.ModuleList(
            DownEncoderBlock2D(ch[max(i - 1, 0)], ch[i], n, groups, downsample=i < len(ch) - 1)
            for i in range(len(ch))
        )
        self.mid_block = MidBlock2D(ch[-1], groups)
        self.conv_norm_out = nn.GroupNorm(groups, ch[-1], eps=_EPS)
        self.conv_out = nn.Conv2d(ch[-1], 2 * config.latent_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv_in(x)  # [B, ch0, H, W]
        for block in self.down_blocks:
            x = block(x)  # [B, ch[-1], H/8, W/8] after the last downsampler
        x = self.mid_block(x)
        return self.conv_out(F.silu(self.conv_norm_out(x)))  # [B, 2*latent, H/8, W/8]


class Decoder(nn.Module):
    def __init__(self, config: AutoencoderKLConfig):
        super().__init__()
        ch, groups, n = config.block_out_channels[::-1], config.norm_num_groups, config.layers_per_block
        self.conv_in = nn.Conv2d(config.latent_channels, ch[0], 3, padding=1)
        # up_blocks is registered before mid_block: that is the checkpoint's key order
        self.up_blocks = nn.ModuleList(
            UpDecoderBlock2D(ch[max(i - 1, 0)], ch[i], n + 1, groups, upsample=i < len(ch) - 1)
            for i in range(len(ch))
        )
        self.mid_block = MidBlock2D(ch[0], groups)
        self.conv_norm_out = nn.GroupNorm(groups, ch[-1], eps=_EPS)
        self.conv_out = nn.Conv2d(ch[-1], config.out_channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = self.mid_block(self.conv_in(z))  # [B, ch[-1], h, w]
        for block in self.up_blocks:
            x = block(x)  # [B, ch0, 8h, 8w] after the last upsampler
        return self.conv_out(F.silu(self.conv_norm_out(x)))  # [B, 3, 8h, 8w]


class AutoencoderKL(nn.Module):
    """The KL autoencoder: `encode(x) -> DiagonalGaussian`, `decode(z) -> x`.

    Latents are unscaled; `config.scaling_factor` is what image pipelines multiply by (the
    v1.2 video pipeline uses its own hard-coded 0.18215 instead). `force_upcast` tells callers
    that the decoder overflows in float16 and should run in float32; `VideoAutoencoder` honours
    it. `fast_decode` (default True; `set_fast_decode`) runs `decode` through vae_fast.py when
    no gradient is needed: the same values up to float rounding, faster.
    """

    fast_decode: bool = True

    def __init__(self, config: AutoencoderKLConfig | None = None):
        super().__init__()
        self.config = config = config or AutoencoderKLConfig()
        _check_supported(config)
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        self.quant_conv = nn.Conv2d(2 * config.latent_channels, 2 * config.latent_channels, 1)
        self.post_quant_conv = nn.Conv2d(config.latent_channels, config.latent_channels, 1)

    @property
    def dtype(self) -> torch.dtype:
        return self.quant_conv.weight.dtype

    def encode_moments(self, x: torch.Tensor) -> torch.Tensor:
        """[B, 3, H, W] -> posterior moments [B, 2*latent, H/8, W/8] (mean, then logvar)."""
        return self.quant_conv(self.encoder(x))

    def encode(self, x: torch.Tensor) -> DiagonalGaussian:
        return DiagonalGaussian(self.encode_moments(x))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """[B, latent, h, w] -> [B, 3, 8h, 8w], computed in the decoder's parameter dtype."""
        dtype = self.post_quant_conv.weight.dtype
        z = self.post_quant_conv(z.to(dtype))
        if self.fast_decode and not vae_fast.needs_grad(self.decoder, z):
            return vae_fast.decode_2d(self.decoder, z)
        return self.decoder(z)

    def set_fast_decode(self, enabled: bool = True) -> AutoencoderKL:
        """Decode through vae_fast.py (True, the default) or the plain `Decoder.forward`."""
        self.fast_decode = bool(enabled)
        return self

    def forward(self, x: torch.Tensor, sample_posterior: bool = False, generator: torch.Generator | None = None):
        posterior = self.encode(x)
        z = posterior.sample(generator) if sample_posterior else posterior.mode()
        return self.decode(z)

    # ---- files --------------------------------------------------------------------------

    @classmethod
    def from_pretrained(
        cls,
        source: str | os.PathLike,
        *,
        config: AutoencoderKLConfig | None = None,
        subfolder: str | None = None,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
        strict: bool = True,
        local_files_only: bool | None = None,
    ) -> AutoencoderKL:
        """Load a diffusers AutoencoderKL folder (config.json + diffusion_pytorch_model.*), a
        single weight file, or a hub id (e.g. `stabilityai/sd-vae-ft-ema`).

        Old checkpoints with the attention names query/key/value/proj_attn are renamed on the
        fly. Without a config.json (or `config=`), the SD/SDXL VAE architecture is assumed.
        """
        from opensora_sdk.loading import iter_tensors, load_tensors_into, resolve_checkpoint

        resolved = resolve_checkpoint(source, subfolder=subfolder, local_files_only=local_files_only)
        if config is None:
            config = AutoencoderKLConfig()
            if resolved.config_file is not None:
                config = autoencoder_kl_config_from_diffusers(json.loads(resolved.config_file.read_text("utf-8")))
        with torch.device("meta"):
            model = cls(config)
        tensors = rename_legacy_attention(iter_tensors(resolved.weight_files))
        load_tensors_into(model, tensors, strict=strict, dtype=dtype, device=device)
        return model.eval()

    def save_pretrained(self, folder: str | os.PathLike) -> None:
        """Write a diffusers-style folder: config.json + diffusion_pytorch_model.safetensors."""
        from opensora_sdk.loading import save_safetensors_atomic, write_json_atomic

        folder = Path(folder)
        save_safetensors_atomic(self.state_dict(), folder / "diffusion_pytorch_model.safetensors")
        write_json_atomic({"_class_name": "AutoencoderKL", **config_to_dict(self.config)}, folder / "config.json")


# diffusers config keys that do not change the architecture we build.
_DIFFUSERS_BOOKKEEPING = {
    "_class_name", "_diffusers_version", "_name_or_path", "latents_mean", "latents_std", "shift_factor"
}
# diffusers config keys that would change the architecture, with the only value we support.
_DIFFUSERS_FIXED = {"use_quant_conv": True, "use_post_quant_conv": True, "mid_block_add_attention": True}


def autoencoder_kl_config_from_diffusers(data: dict) -> AutoencoderKLConfig:
    """Read a diffusers AutoencoderKL config.json."""
    for key, supported in _DIFFUSERS_FIXED.items():
        if data.get(key, supported) != supported:
            raise ValueError(f"AutoencoderKL config: {key}={data[key]!r} is not supported (only {supported})")
    return config_from_dict(AutoencoderKLConfig, data, ignore=_DIFFUSERS_BOOKKEEPING | set(_DIFFUSERS_FIXED))


_LEGACY_ATTENTION = re.compile(r"(\.attentions\.\d+\.)(query|key|value|proj_attn)\.")
_LEGACY_NAMES = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}


def rename_legacy_attention(items: Iterable[tuple[str, torch.Tensor]]) -> Iterator[tuple[str, torch.Tensor]]:
    """Map old diffusers attention names (query/key/value/proj_attn) to to_q/to_k/to_v/to_out.0,
    squeezing 1x1-conv weights [C, C, 1, 1] to linear weights [C, C]. Other keys pass through."""
    for key, tensor in items:
        match = _LEGACY_ATTENTION.search(key)
        if match:
            key = key[: match.start(2)] + _LEGACY_NAMES[match.group(2)] + key[match.end(2) :]
            if tensor.ndim == 4:
                tensor = tensor[:, :, 0, 0]
        yield key, tensor
