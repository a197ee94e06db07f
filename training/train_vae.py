"""Train the v1.2 video VAE (2D KL autoencoder + causal temporal VAE) from scratch, on a CPU.

    python training/train_vae.py --config training/configs/tiny_vae.yaml
    python training/train_vae.py --config training/configs/tiny_vae.yaml --resume latest

The architecture is the official pipeline's (`VideoAutoencoder`, spec 3) at the widths the
config gives. Training follows spec 10.1 in spirit, in three stages (and an optional fourth)
that each start from the previous one's weights:

  A. spatial:  the 2D KL autoencoder on single frames; L1 + MSE pixel loss + a small KL.
               (The official recipe adds 0.1 LPIPS; its VGG weights are a download, so it is
               left out. The SDXL VAE the official code starts from is not used either.)
  B. temporal: the temporal VAE on the frozen 2D encoder's latents x_z: L1 reconstruction of
               x_z, plus, on one-frame inputs (`image_prob` of the steps), the identity loss
               |z - x_z| that makes an image's temporal latent equal its 2D latent (official
               stage 1). The 2D posteriors of `temporal_cache_clips` clips are computed once
               (x_z is drawn from them at each step), so a step costs only the temporal VAE.
  C. joint:    both parts on pixels, clips of a random length 1..frames (official stage 3's
               `mixed_video_random`): L1 + MSE pixel loss + a small KL of the temporal posterior.
  D. decoder:  (optional; after shift / scale are measured) the temporal decoder alone on pixels,
               clips of `frames` frames read every `frame_interval`-th frame (the frame rate the
               diffusion model is trained at), encoders, 2D decoder and normalisation frozen: the
               latent space stays the one a diffusion model may already be trained on, only its
               decoding gets better (as diffusers' fine-tuned SD VAE decoders). Also trained on
               the image-to-video decode (the image's latent leading) and, on `image_prob` of
               the steps, on stills (one frame: text-to-image's decode).

Added for image-to-video (not in the official recipe): in stages B and C, a clip is also
decoded with its first latent frame replaced by the latent of its first frame encoded alone
(what the pipeline does with a conditioning image), and that decode must match the clip too
(`first_frame_weight`; in C only frame 0, in pixels). Without it the image's latent and the
video's first latent drift apart (GroupNorm statistics span the whole chunk), and the first
frame of an image-to-video clip is not the image.

The official three stages (spec 10.1) are configs of the same stages (`configs/vae_stage{1,2,3}.yaml`,
each starting from the previous one's `vae/` with `--init ... --start-stage`): stage 1 = `temporal`
(z-loss + identity loss, 2D frozen), stage 2 = `temporal` with `train_spatial: true` (2D latents
computed live, the 2D VAE unfrozen, no identity loss), stage 3 = `joint` on clips of a random
length 1..33 with `perceptual_weight: 0.1` (LPIPS from `lpips_backbone`, a local file) and KL
1e-6; `reduction: official` gives the official sums (/ (B*T), KL / B) instead of means.

After stage C `shift` / `scale` are measured per channel on the data (the pipeline normalises
z = (z - shift) / scale, so the diffusion model sees latents of unit variance), and at the end the model
is written with `VideoAutoencoder.save_pretrained` to `output_dir/vae/` (`summary.json` holds
the measured reconstruction PSNR). Clips are read once into memory (uint8).

Randomness (clip and frame picks, posterior samples) comes from one seeded generator saved in
each checkpoint. Checkpoints are those of `opensora_sdk.training.checkpoint`, one root per stage
(`output_dir/checkpoints/<k>-<stage>/step-NNNNNNNN/`: `model/` (loads with
`VideoAutoencoder.from_pretrained`), optimizer, RNG states with the generator, state.json with the
stage), written into a hidden folder renamed into place, so a killed run leaves no half-written
checkpoint; `--resume latest` continues from the newest one of the latest stage.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import resource
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np
import torch
import yaml
from einops import rearrange

from opensora_sdk.configs import AutoencoderKLConfig, TemporalVAEConfig, VideoAutoencoderConfig
from opensora_sdk.loading import append_line, write_json_atomic
from opensora_sdk.models.vae import VideoAutoencoder
from opensora_sdk.training import checkpoint as ckpt
from opensora_sdk.training.config import apply_override
from opensora_sdk.training.dataset import read_table
from opensora_sdk.video_io import read_video

logger = logging.getLogger("train_vae")
STAGES = ("spatial", "temporal", "joint", "decoder")


# ---- config ---------------------------------------------------------------------------------


@dataclass
class StageSection:
    steps: int = 1000
    batch_size: int = 16  # frames (spatial) or clips (temporal, joint)
    frames: int = 17  # clip length (temporal, joint; the VAE's micro_frame_size)
    lr: float = 1e-3
    warmup_steps: int = 100
    final_lr_ratio: float = 0.1  # cosine decay to lr * this at the last step
    grad_clip: float = 1.0
    mse_weight: float = 1.0
    kl_weight: float = 1e-6  # on the mean KL per latent element
    image_prob: float = 0.2  # temporal: share of steps with one-frame inputs (identity loss); decoder: of steps decoding stills
    first_frame_weight: float = 1.0  # temporal, joint, decoder: image-to-video consistency (see the module docstring)
    frame_interval: int = 1  # decoder: read every n-th frame of the clips
    train_spatial: bool = False  # temporal: 2D latents computed live by a trainable 2D encoder (official stage 2)
    perceptual_weight: float = 0.0  # joint: + this x LPIPS per frame (official stage 3: 0.1; needs lpips_backbone)
    reduction: str = "mean"  # "official": sums over elements / (B*T), KL summed / B (spec 10.1); "mean": per element


@dataclass
class VAETrainConfig:
    seed: int = 0
    output_dir: str = "outputs/vae"
    cpu_threads: int | None = None
    log_every: int = 50
    ckpt_every: int = 500
    data_csv: str | None = None
    max_clips: int = 512  # clips read into memory (the first ones of the CSV)
    image_size: list | None = None  # [H, W]: clips resized to cover and centre-cropped (official: 256x256); None: as stored
    min_frames: int = 2  # clips shorter than this are skipped (the official stage 3 reads 33-frame clips)
    eval_clips: int = 32  # clips for the final PSNR figures
    normalize_clips: int = 128  # clips whose latents give shift / scale
    temporal_cache_clips: int = 240  # clips whose 2D posteriors stage B draws from
    vae_2d: dict = field(default_factory=dict)  # AutoencoderKLConfig fields
    vae_temporal: dict = field(default_factory=dict)  # TemporalVAEConfig fields
    micro_batch_size: int = 17  # frames per 2D call at inference
    spatial: StageSection = field(default_factory=StageSection)
    temporal: StageSection = field(default_factory=StageSection)
    joint: StageSection = field(default_factory=StageSection)
    decoder: StageSection = field(default_factory=lambda: StageSection(steps=0))  # off unless configured
    lpips_backbone: str | None = None  # torchvision vgg16 / alexnet weights file for the perceptual term ("random": tests)
    lpips_net: str = "vgg"  # the official VAE loss uses a VGG LPIPS
    lpips_lin: str | None = None  # LPIPS lin weights (default: the ones inside the lpips package)


def load_config(path, overrides=()) -> VAETrainConfig:
    data = yaml.safe_load(Path(path).read_text("utf-8")) or {}
    for assignment in overrides:
        apply_override(data, assignment)
    names = {f.name for f in fields(VAETrainConfig)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ValueError(f"{path}: unknown key(s) {unknown}; allowed: {sorted(names)}")
    for stage in STAGES:
        section = data.get(stage) or ({"steps": 0} if stage == "decoder" else {})
        allowed = {f.name for f in fields(StageSection)}
        if set(section) - allowed:
            raise ValueError(f"{path}: section {stage!r}: unknown key(s) {sorted(set(section) - allowed)}; allowed: {sorted(allowed)}")
        data[stage] = StageSection(**{k: _yaml_number(v) for k, v in section.items()})
    cfg = VAETrainConfig(**data)
    for stage in STAGES:
        s = getattr(cfg, stage)
        if s.reduction not in ("mean", "official"):
            raise ValueError(f"{path}: {stage}.reduction={s.reduction!r}: choose mean or official")
        if s.perceptual_weight and not cfg.lpips_backbone:
            raise ValueError(f"{path}: {stage}.perceptual_weight needs lpips_backbone: a local torchvision {cfg.lpips_net} weights file "
                             "(e.g. vgg16-397923af.pth); nothing is downloaded")  # fmt: skip
    if not cfg.data_csv:
        raise ValueError(f"{path}: data_csv is required (a CSV with a path column, e.g. from opensora_sdk.training.synthetic)")
    return cfg


def _yaml_number(value):
    """YAML reads 1e-5 as a string; numbers written so become floats, other strings stay."""
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def build_vae(cfg: VAETrainConfig) -> VideoAutoencoder:
    vae_2d = AutoencoderKLConfig(**cfg.vae_2d)
    vae_t = TemporalVAEConfig(**cfg.vae_temporal)
    c = vae_t.embed_dim
    config = VideoAutoencoderConfig(vae_2d=vae_2d, vae_temporal=vae_t, micro_batch_size=cfg.micro_batch_size,
                                    shift=(0.0,) * c, scale=(1.0,) * c)  # fmt: skip
    return VideoAutoencoder(config)


# ---- data -----------------------------------------------------------------------------------


def load_clips(csv_path: str, max_clips: int, image_size=None, min_frames: int = 2) -> torch.Tensor:
    """uint8 [N, F, H, W, 3] of the first `max_clips` videos of the CSV with at least `min_frames`
    frames (all of one size, or resized to cover `image_size` and centre-cropped), cut to the shortest."""
    rows = [r for r in read_table(csv_path) if int(r["num_frames"]) >= max(2, min_frames)][:max_clips]
    if not rows:
        raise ValueError(f"{csv_path}: no video with at least {max(2, min_frames)} frames")
    root = Path(csv_path).parent
    clips = [read_video(root / r["path"])[0] for r in rows]
    if image_size:
        from opensora_sdk.video_io import resize_crop

        clips = [((resize_crop(c, *image_size) + 1) * 127.5).round().clamp(0, 255).byte().permute(1, 2, 3, 0).numpy() for c in clips]
    n = min(len(c) for c in clips)
    return torch.from_numpy(np.stack([c[:n] for c in clips]))


def to_pixels(x: torch.Tensor) -> torch.Tensor:
    """uint8 [..., H, W, 3] -> float [..., 3, H, W] in [-1, 1]."""
    return x.movedim(-1, -3).float().div(127.5).sub(1.0)


def draw_frames(clips, n, gen):
    idx = torch.randint(clips.shape[0], (n,), generator=gen)
    t = torch.randint(clips.shape[1], (n,), generator=gen)
    return to_pixels(clips[idx, t])  # [n, 3, H, W]


def draw_clips(clips, n, frames, gen, interval: int = 1):
    span = (frames - 1) * interval + 1
    idx = torch.randint(clips.shape[0], (n,), generator=gen)
    start = torch.randint(clips.shape[1] - span + 1, (n,), generator=gen)
    batch = torch.stack([clips[i, s : s + span : interval] for i, s in zip(idx.tolist(), start.tolist())])
    return rearrange(to_pixels(batch), "B T C H W -> B C T H W")


# ---- losses ---------------------------------------------------------------------------------


def kl_mean(posterior) -> torch.Tensor:
    """Mean over elements of KL(N(mean, var) || N(0, 1))."""
    return 0.5 * (posterior.mean.pow(2) + posterior.logvar.exp() - 1.0 - posterior.logvar).mean()


def kl_term(posterior, s: StageSection) -> torch.Tensor:
    """The KL of the stage's reduction: per-element mean, or the official sum over (C, T, H, W) / B."""
    if s.reduction == "mean":
        return kl_mean(posterior)
    kl = 0.5 * (posterior.mean.pow(2) + posterior.logvar.exp() - 1.0 - posterior.logvar)
    return kl.sum() / kl.shape[0]


def z_loss(x_z_rec, x_z, s: StageSection) -> torch.Tensor:
    """L1 of [B, C, T, h, w] latents: mean, or the official nll with logvar 0: sum / (B*T)."""
    err = (x_z_rec - x_z).abs()
    return err.mean() if s.reduction == "mean" else err.sum() / (err.shape[0] * err.shape[2])


def official_pixel_loss(x, x_rec, s: StageSection, perceptual=None) -> tuple[torch.Tensor, float]:
    """Spec 10.1: (|x - x_rec| + w * LPIPS per frame, broadcast over C, H, W) summed / (B*T); x [(B T), 3, H, W]."""
    rec = (x_rec - x).abs()
    if perceptual is not None and s.perceptual_weight:
        rec = rec + s.perceptual_weight * perceptual(x, x_rec).mean(dim=(1, 2, 3), keepdim=True)
    mse = (x_rec - x).pow(2).mean().item()
    return rec.sum() / rec.shape[0], 10 * math.log10(4.0 / max(mse, 1e-12))  # rows are (B T) frames


def pixel_loss(x, x_rec, s: StageSection) -> tuple[torch.Tensor, float]:
    """L1 + mse_weight * MSE, and the PSNR (dB, peak-to-peak 2) of the batch for the log."""
    err = x_rec - x
    mse = err.pow(2).mean()
    return err.abs().mean() + s.mse_weight * mse, 10 * math.log10(4.0 / max(mse.item(), 1e-12))


def spatial_latents(vae, frames, gen):
    """frames [n, 3, H, W] -> 2D latents x 0.18215 [n, C, h, w] (sampled) and the posterior."""
    posterior = vae.spatial.encode(frames)
    return posterior.sample(gen) * vae.config.spatial_scaling_factor, posterior


@torch.no_grad()
def cache_2d_posteriors(vae: VideoAutoencoder, clips: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and std of the 2D posterior x 0.18215 for the first n clips: [n, F, C, h, w] each."""
    sf = vae.config.spatial_scaling_factor
    means, stds = [], []
    for clip in clips[:n]:
        posterior = vae.spatial.encode(to_pixels(clip))  # [F, C, h, w]
        means.append(posterior.mean * sf)
        stds.append(posterior.std * sf)
    return torch.stack(means), torch.stack(stds)


def draw_latents(cache, n: int, frames: int, gen) -> torch.Tensor:
    """x_z [n, C, frames, h, w] sampled from random windows of the cached 2D posteriors."""
    mean, std = cache
    idx = torch.randint(mean.shape[0], (n,), generator=gen).tolist()
    start = torch.randint(mean.shape[1] - frames + 1, (n,), generator=gen).tolist()
    mu = torch.stack([mean[i, s : s + frames] for i, s in zip(idx, start)])
    sd = torch.stack([std[i, s : s + frames] for i, s in zip(idx, start)])
    return rearrange(mu + sd * torch.randn(mu.shape, generator=gen), "B T C h w -> B C T h w")


def stage_loss(stage: str, vae: VideoAutoencoder, clips, s: StageSection, gen, cache=None, perceptual=None) -> tuple[torch.Tensor, dict]:
    sf = vae.config.spatial_scaling_factor
    if stage == "spatial":  # A: frames through the 2D autoencoder
        x = draw_frames(clips, s.batch_size, gen)
        z, posterior = spatial_latents(vae, x, gen)
        rec, psnr = pixel_loss(x, vae.spatial.decode(z / sf), s)
        kl = kl_mean(posterior)
        return rec + s.kl_weight * kl, {"rec": rec.item(), "psnr": psnr, "kl": kl.item()}
    if stage == "temporal":  # B: 2D latents (cached, 2D part frozen) through the temporal VAE
        one_frame = torch.rand((), generator=gen).item() < s.image_prob
        T = 1 if one_frame else s.frames
        if s.train_spatial:  # official stage 2: the 2D encoder trains too, so x_z comes live from pixels
            x = draw_clips(clips, s.batch_size, T, gen)
            x_z, _ = spatial_latents(vae, rearrange(x, "B C T H W -> (B T) C H W"), gen)
            x_z = rearrange(x_z, "(B T) C h w -> B C T h w", T=T)
        else:
            x_z = draw_latents(cache, s.batch_size, T, gen)
        posterior = vae.temporal_vae.encode(x_z)
        z = posterior.sample(gen)
        rec = z_loss(vae.temporal_vae.decode(z, num_frames=T), x_z, s)
        loss, logs = rec, {"rec": rec.item()}
        if one_frame and z.shape == x_z.shape:  # identity: an image's temporal latent is its 2D latent
            identity = z_loss(z, x_z, s)
            loss, logs["identity"] = loss + identity, identity.item()
        if not one_frame and s.first_frame_weight > 0:  # image-to-video: the image's latent leads the chunk
            z_img = vae.temporal_vae.encode(x_z[:, :, :1]).sample(gen)
            mixed = vae.temporal_vae.decode(torch.cat([z_img, z[:, :, 1:]], dim=2), num_frames=T)
            first = z_loss(mixed, x_z, s)
            loss, logs["first"] = loss + s.first_frame_weight * first, first.item()
        kl = kl_term(posterior, s)
        return loss + s.kl_weight * kl, {**logs, "kl": kl.item()}
    if stage == "decoder":  # D: the temporal decoder on pixels; encoders and normalisation frozen
        # image_prob of the steps decode stills (one frame, as text-to-image does), as many
        # frames per step as the clips have; no draw when 0 (the random stream stays as it was)
        still = s.image_prob > 0 and torch.rand((), generator=gen).item() < s.image_prob
        if still:
            x = draw_frames(clips, s.batch_size * s.frames, gen)[:, :, None]  # [B, 3, 1, H, W]
        else:
            x = draw_clips(clips, s.batch_size, s.frames, gen, s.frame_interval)
        T = x.shape[2]
        target = rearrange(x, "B C T H W -> (B T) C H W")

        def decode(z):  # normalised latent -> frames [(B T), 3, H, W]
            x_z = vae.temporal_vae.decode(z * vae.scale + vae.shift, num_frames=T)
            return vae.spatial.decode(rearrange(x_z, "B C T h w -> (B T) C h w") / sf)

        with torch.no_grad():
            z = vae.encode(x, generator=gen)  # normalised, as the diffusion model sees it
        rec, psnr = pixel_loss(target, decode(z), s)
        loss, logs = rec, {"rec": rec.item(), "psnr": psnr}
        if still:
            logs["still_psnr"] = psnr
        elif s.first_frame_weight > 0:  # image-to-video: the image's own latent leads the clip
            with torch.no_grad():
                z_img = vae.encode(x[:, :, :1], generator=gen)
            mixed, mixed_psnr = pixel_loss(target, decode(torch.cat([z_img, z[:, :, 1:]], dim=2)), s)
            loss, logs["i2v_psnr"] = loss + s.first_frame_weight * mixed, mixed_psnr
        return loss, logs
    # C: pixels through both, clips of a random length 1..frames
    T = int(torch.randint(1, s.frames + 1, (), generator=gen))
    x = draw_clips(clips, s.batch_size, T, gen)
    x_z, _ = spatial_latents(vae, rearrange(x, "B C T H W -> (B T) C H W"), gen)
    x_z = rearrange(x_z, "(B T) C h w -> B C T h w", T=T)
    posterior = vae.temporal_vae.encode(x_z)
    z = posterior.sample(gen)
    x_z_rec = vae.temporal_vae.decode(z, num_frames=T)
    x_rec = vae.spatial.decode(rearrange(x_z_rec, "B C T h w -> (B T) C h w") / sf)
    if s.reduction == "official":
        rec, psnr = official_pixel_loss(rearrange(x, "B C T H W -> (B T) C H W"), x_rec, s, perceptual)
    else:
        rec, psnr = pixel_loss(rearrange(x, "B C T H W -> (B T) C H W"), x_rec, s)
        if perceptual is not None and s.perceptual_weight:
            rec = rec + s.perceptual_weight * perceptual(rearrange(x, "B C T H W -> (B T) C H W"), x_rec).mean()
    kl = kl_term(posterior, s)
    loss, logs = rec + s.kl_weight * kl, {"rec": rec.item(), "psnr": psnr, "kl": kl.item(), "T": T}
    if T > 1 and s.first_frame_weight > 0:  # image-to-video: frame 0 decoded with the image's latent leading
        z_img = vae.temporal_vae.encode(x_z[:, :, :1]).sample(gen)
        mixed = vae.temporal_vae.decode(torch.cat([z_img, z[:, :, 1:]], dim=2), num_frames=T)[:, :, 0]
        first, first_psnr = pixel_loss(x[:, :, 0], vae.spatial.decode(mixed / sf), s)
        loss, logs["first_psnr"] = loss + s.first_frame_weight * first, first_psnr
    return loss, logs


def build_perceptual(cfg: VAETrainConfig):
    """The frozen LPIPS network of the perceptual term (spec 10.1), or None when no stage uses one."""
    if not any(getattr(cfg, st).perceptual_weight for st in STAGES):
        return None
    from opensora_sdk.evaluation.metrics import LPIPS

    if cfg.lpips_backbone == "random":  # tests: the loss path without weight files
        return LPIPS.random(cfg.lpips_net)
    return LPIPS.from_files(cfg.lpips_backbone, cfg.lpips_net, cfg.lpips_lin)


def trainable(stage: str, vae: VideoAutoencoder, s: StageSection | None = None) -> list[torch.nn.Parameter]:
    modules = {"spatial": [vae.spatial], "temporal": [vae.temporal_vae], "joint": [vae.spatial, vae.temporal_vae],
               "decoder": [vae.temporal_vae.post_quant_conv, vae.temporal_vae.decoder]}[stage]
    if stage == "temporal" and s is not None and s.train_spatial:
        modules = [vae.spatial, vae.temporal_vae]  # official stage 2: the 2D VAE unfrozen
    return [p for m in modules for p in m.parameters()]


def lr_at(step: int, s: StageSection) -> float:
    if step < s.warmup_steps:
        return s.lr * (step + 1) / (s.warmup_steps + 1)
    progress = (step - s.warmup_steps) / max(1, s.steps - s.warmup_steps)
    return s.lr * (s.final_lr_ratio + (1 - s.final_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


# ---- checkpoints: opensora_sdk.training.checkpoint's, one root per stage ---------------------


def stage_root(ckpt_root: Path, stage: str) -> Path:
    """`checkpoints/<k>-<stage>/` (k orders the stages), holding step-NNNNNNNN folders."""
    return ckpt_root / f"{STAGES.index(stage)}-{stage}"


# ---- evaluation and normalisation ---------------------------------------------------------


def psnr_db(a: torch.Tensor, b: torch.Tensor) -> float:
    """PSNR of two tensors in [-1, 1] after the uint8 rounding a saved video gets."""
    qa = ((a.clamp(-1, 1) + 1) * 127.5).round()
    qb = ((b.clamp(-1, 1) + 1) * 127.5).round()
    mse = (qa - qb).pow(2).mean().item()
    return float("inf") if mse == 0 else 10 * math.log10(255.0**2 / mse)


@torch.no_grad()
def normalise(vae: VideoAutoencoder, clips: torch.Tensor, n_norm: int, gen) -> None:
    """Set shift / scale (buffers and config) to the per-channel mean and std of the latents of
    the first `n_norm` clips, so the diffusion model sees latents of unit variance."""
    vae.eval()
    vae.shift.zero_()
    vae.scale.fill_(1.0)
    zs = torch.cat([vae.encode(rearrange(to_pixels(clips[i : i + 4]), "B T C H W -> B C T H W"), generator=gen)
                    for i in range(0, min(n_norm, len(clips)), 4)])  # fmt: skip  # raw z: shift 0, scale 1 here
    vae.shift.copy_(zs.mean(dim=(0, 2, 3, 4)).view_as(vae.shift))
    vae.scale.copy_(zs.std(dim=(0, 2, 3, 4)).view_as(vae.scale))
    sync_normalisation_config(vae)


def sync_normalisation_config(vae: VideoAutoencoder) -> None:
    """The config's shift / scale from the buffers (what save_pretrained writes)."""
    vae.config.shift, vae.config.scale = tuple(vae.shift.flatten().tolist()), tuple(vae.scale.flatten().tolist())


@torch.no_grad()
def measure(vae: VideoAutoencoder, clips: torch.Tensor, n_eval: int, gen) -> dict:
    """PSNR of videos, images and the image-to-video first frame on the last `n_eval` clips,
    with shift / scale.

    The first-frame figure mimics image-to-video: the image's latent replaces the video's first
    latent frame, the chunk is decoded, and frame 0 is compared with the image.
    """
    vae.eval()
    video_psnr, image_psnr, first_psnr = [], [], []
    N = clips.shape[1]
    for i in range(len(clips) - n_eval, len(clips)):
        x = rearrange(to_pixels(clips[i : i + 1]), "B T C H W -> B C T H W")  # [1, 3, N, H, W]
        z = vae.encode(x, generator=gen)
        video_psnr.append(psnr_db(vae.decode(z, N), x))
        image = x[:, :, :1]
        z_img = vae.encode(image, generator=gen)
        image_psnr.append(psnr_db(vae.decode(z_img, 1), image))
        z = z.clone()
        z[:, :, :1] = z_img
        first_psnr.append(psnr_db(vae.decode(z, N)[:, :, :1], image))
    return {"shift": list(vae.config.shift), "scale": list(vae.config.scale),
            "video_psnr_db": float(np.mean(video_psnr)), "image_psnr_db": float(np.mean(image_psnr)),
            "i2v_first_frame_psnr_db": float(np.mean(first_psnr)), "eval_clips": n_eval}  # fmt: skip


def cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


# ---- main -----------------------------------------------------------------------------------


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description="Train the v1.2 video VAE at tiny widths (see the module docstring).")
    p.add_argument("--config", required=True)
    p.add_argument("--resume", default=None, help="'latest' or a checkpoint folder")
    p.add_argument("--output-dir", default=None)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key, e.g. spatial.steps=200")
    p.add_argument("--init", default=None,
                   help="start from this trained VAE (folder or file) instead of random weights (its architecture, not vae_2d / vae_temporal)")
    p.add_argument("--start-stage", default=STAGES[0], choices=STAGES,
                   help="skip the stages before this one (with --init; from 'decoder' on, its shift / scale are kept)")
    args = p.parse_args(argv)
    if args.start_stage != STAGES[0] and not args.init:
        raise ValueError(f"--start-stage {args.start_stage} needs --init: the stages before it would leave random weights")
    cfg = load_config(args.config, args.set + ([f"output_dir={args.output_dir}"] if args.output_dir else []))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", force=True)
    if cfg.cpu_threads:
        torch.set_num_threads(cfg.cpu_threads)
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(asdict(cfg), out / "config.json")
    t0, c0 = time.perf_counter(), cpu_seconds()

    torch.manual_seed(cfg.seed)
    vae = VideoAutoencoder.from_pretrained(args.init, dtype=torch.float32) if args.init else build_vae(cfg)
    gen = torch.Generator().manual_seed(cfg.seed)
    clips = load_clips(cfg.data_csv, cfg.max_clips + cfg.eval_clips, cfg.image_size, cfg.min_frames)
    if len(clips) <= cfg.eval_clips:
        raise ValueError(f"{cfg.data_csv}: {len(clips)} clips; need more than eval_clips={cfg.eval_clips}")
    train_clips = clips[: len(clips) - cfg.eval_clips]
    n2d = sum(p.numel() for p in vae.spatial.parameters())
    nt = sum(p.numel() for p in vae.temporal_vae.parameters())
    logger.info("VAE: 2D %.2fM + temporal %.2fM parameters; %d training clips of %s", n2d / 1e6, nt / 1e6, len(train_clips),
                tuple(clips.shape[1:]))  # fmt: skip

    perceptual = build_perceptual(cfg)

    # ---- resume ------------------------------------------------------------------------------
    ckpt_root = out / "checkpoints"
    start_stage, start_step, resumed = STAGES.index(args.start_stage), 0, None
    if args.resume:
        folder = ckpt.resolve_resume(args.resume, *(stage_root(ckpt_root, s) for s in STAGES))
        resumed = ckpt.load_checkpoint(folder)
        stage = resumed.train_state.get("stage")
        if stage not in STAGES or None in (resumed.model_state, resumed.optimizer_state, resumed.rng_state):
            raise ValueError(f"--resume {str(folder)!r}: not a train_vae checkpoint (stage {stage!r}, allowed {list(STAGES)}; "
                             "needs model/model.safetensors, optimizer.pt and rng/rank0.pt)")  # fmt: skip
        vae.load_state_dict(resumed.model_state)
        start_stage, start_step = STAGES.index(stage), int(resumed.train_state["step"])
        logger.info("resumed from %s (stage %s, step %d)", folder, stage, start_step)
        sync_normalisation_config(vae)  # the checkpoint's buffers hold the measured shift / scale

    # ---- the stages; shift / scale measured after the joint stage, before the decoder stage --
    log_path = out / "logs" / "vae_log.jsonl"
    for k, stage in enumerate(STAGES):
        s = getattr(cfg, stage)
        if stage == "decoder" and start_stage < k:
            normalise(vae, train_clips, min(cfg.normalize_clips, len(train_clips)), gen)
        if k < start_stage or s.steps == 0:
            continue
        vae.requires_grad_(False)
        params = trainable(stage, vae, s)
        for prm in params:
            prm.requires_grad_(True)
        vae.train()
        optimizer = torch.optim.AdamW(params, lr=s.lr, weight_decay=0.0)
        step = 0
        if resumed is not None and k == start_stage:
            optimizer.load_state_dict(resumed.optimizer_state)
            ckpt.restore_rng_state(resumed.rng_state, {"vae": gen})
            step = start_step
        cache = None
        if stage == "temporal" and not s.train_spatial:
            tc = time.perf_counter()
            cache = cache_2d_posteriors(vae, train_clips, cfg.temporal_cache_clips)
            logger.info("2D posteriors of %d clips cached in %.0f s", len(cache[0]), time.perf_counter() - tc)
        window, tw = [], time.perf_counter()
        while step < s.steps:
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step, s)
            loss, logs = stage_loss(stage, vae, train_clips, s, gen, cache, perceptual)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if s.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(params, s.grad_clip)
            optimizer.step()
            step += 1
            window.append(logs)
            if step % cfg.log_every == 0 or step == s.steps:
                row = {"stage": stage, "step": step, "lr": lr_at(step - 1, s),
                       **{key: float(np.mean([w[key] for w in window if key in w])) for key in dict.fromkeys(k for w in window for k in w)},
                       "s_per_step": (time.perf_counter() - tw) / len(window), "elapsed_s": time.perf_counter() - t0}  # fmt: skip
                append_line(json.dumps(row), log_path)
                logger.info("%s", " ".join(f"{key}={v:.4g}" if isinstance(v, float) else f"{key}={v}" for key, v in row.items()))
                window, tw = [], time.perf_counter()
            if step % cfg.ckpt_every == 0 or step == s.steps:
                ckpt.save_checkpoint(stage_root(ckpt_root, stage), step, rank=0, is_main=True, barrier=lambda: None,
                                     model_config=vae.config, model_state=vae.state_dict(), ema_state=None,
                                     optimizer_state=optimizer.state_dict(), rng_state=ckpt.capture_rng_state({"vae": gen}),
                                     train_state={"stage": stage, "elapsed_s": time.perf_counter() - t0})  # fmt: skip
        resumed = None

    # ---- figures, export ----------------------------------------------------------------------
    vae.requires_grad_(False)
    figures = measure(vae, clips, cfg.eval_clips, gen)
    vae.save_pretrained(out / "vae")
    summary = {**figures, "params_2d": n2d, "params_temporal": nt, "wall_s": round(time.perf_counter() - t0, 1),
               "cpu_s": round(cpu_seconds() - c0, 1)}  # fmt: skip
    write_json_atomic(summary, out / "summary.json")
    logger.info("exported %s: %s", out / "vae", json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
