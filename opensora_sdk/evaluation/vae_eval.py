"""`opensora eval vae`: reconstruct the videos of a meta file through the VAE and measure them.

    opensora eval vae meta/val.csv --vae models/OpenSora-VAE-v1.2 --num-frames 17 --resolution 256 \
        --lpips-backbone models/alexnet-owt-7be5be79.pth --flow farneback -o eval/vae.csv

As the official `eval/vae` (spec 10.2): `num_frames` frames at indices
linspace(0, sample_rate * num_frames - 1, num_frames), values / 255, shorter side resized to
`--resolution` (bilinear, antialiased), centre crop `--crop-size`; [T, C, H, W] in [0, 1].
`--mode pipeline` reconstructs through the whole v1.2 VAE (2D + temporal), `--mode spatial`
through the 2D autoencoder alone (per frame), both from the posterior means (deterministic).
Per video: PSNR, SSIM, and with `--lpips-backbone` LPIPS (AlexNet by default) and with
`--flow` FloLPIPS (Farneback, or RAFT with `--raft` weights; the official tool uses PWC-Net).
Metrics are means over frames (over pairs for FloLPIPS); the summary is the mean over videos,
which equals the official per-frame-index average for videos of one length.

Writes the per-video CSV (`path, num_frames, psnr, ssim[, lpips][, flolpips]`) and
`<output>_summary.json`; unreadable or too short videos are listed in `<output>_errors.csv`.
Resumable (a journal of finished videos).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from opensora_sdk.data import table
from opensora_sdk.data.runner import report_errors, run_journaled, split_done
from opensora_sdk.evaluation import metrics
from opensora_sdk.loading import write_text_atomic

MODES = ("pipeline", "spatial")


def load_clip(path, num_frames: int, resolution: int, crop_size: int, sample_rate: int = 1) -> torch.Tensor:
    """[T, 3, crop, crop] float in [0, 1] (see the module docstring)."""
    from opensora_sdk.video_io import read_video

    span = sample_rate * num_frames
    indices = np.linspace(0, span - 1, num_frames).astype(int)
    frames, _ = read_video(path, max_frames=span)
    if len(frames) < span:
        raise ValueError(f"{len(frames)} frames, fewer than the {span} needed (num_frames {num_frames} x sample_rate {sample_rate})")
    x = torch.from_numpy(frames[indices]).permute(0, 3, 1, 2).float() / 255.0  # [T, 3, H, W]
    H, W = x.shape[-2:]
    s = resolution / min(H, W)
    h, w = max(crop_size, round(H * s)), max(crop_size, round(W * s))
    x = F.interpolate(x, size=(h, w), mode="bilinear", align_corners=False, antialias=True)
    top, left = (h - crop_size) // 2, (w - crop_size) // 2
    return x[..., top : top + crop_size, left : left + crop_size].clamp(0, 1)


@torch.no_grad()
def reconstruct(vae, clip: torch.Tensor, mode: str = "pipeline") -> torch.Tensor:
    """[T, 3, H, W] in [0, 1] -> the VAE's reconstruction, same layout, clamped to [0, 1]."""
    x = (clip * 2 - 1).permute(1, 0, 2, 3)[None].to(vae.device, vae.dtype)  # [1, 3, T, H, W]
    if mode == "pipeline":
        rec = vae.decode(vae.encode(x, sample=False), num_frames=clip.shape[0])
    elif mode == "spatial":
        x_z = vae.encode_spatial(x, sample=False)[0].permute(1, 0, 2, 3) / vae.config.spatial_scaling_factor  # [T, 4, h, w]
        step = vae.config.micro_batch_size or len(x_z)
        rec = torch.cat([vae.spatial.decode(x_z[i : i + step]) for i in range(0, len(x_z), step)])  # [T, 3, H, W]
        rec = rec.permute(1, 0, 2, 3)[None]
    else:
        raise ValueError(f"mode {mode!r}: choose one of {MODES}")
    return ((rec[0].permute(1, 0, 2, 3).float().cpu() + 1) / 2).clamp(0, 1)


class VideoMetrics:
    """PSNR and SSIM always; LPIPS with a model; FloLPIPS with a model and a flow function."""

    def __init__(self, lpips: metrics.LPIPS | None = None, flow=None):
        self.lpips, self.flow = lpips, flow
        self.columns = ["psnr", "ssim"] + (["lpips"] if lpips else []) + (["flolpips"] if lpips and flow else [])

    def __call__(self, gt: torch.Tensor, rec: torch.Tensor) -> dict:
        out = {"psnr": float(metrics.psnr_frames(gt, rec).mean()), "ssim": float(metrics.ssim_frames(gt, rec).mean())}
        if self.lpips is not None:
            out["lpips"] = float(metrics.lpips_frames(self.lpips, gt, rec).mean())
            if self.flow is not None and len(gt) > 1:
                out["flolpips"] = float(metrics.flolpips_frames(self.lpips, gt, rec, self.flow).mean())
        return out


def flow_function(flow: str | None, raft: str | None = None, device="cpu"):
    if raft:
        from opensora_sdk.data.motion import RaftFlow

        model = RaftFlow(raft, torch.device(device))
        return lambda a, b: model(a[None], b[None])[0]
    if flow in (None, "none"):
        return None
    if flow == "farneback":
        from opensora_sdk.data.motion import farneback_flow

        return farneback_flow
    raise ValueError(f"--flow {flow!r}: choose none or farneback (or give --raft weights)")


def evaluate(meta, vae, output, *, num_frames: int = 17, resolution: int = 256, crop_size: int | None = None,
             sample_rate: int = 1, mode: str = "pipeline", video_metrics: VideoMetrics | None = None,
             progress: bool = True, overwrite: bool = False, settings: dict | None = None) -> dict:  # fmt: skip
    """Evaluate every row of `meta`; write the per-video CSV and the summary. Returns the summary."""
    crop_size = crop_size or resolution
    if mode not in MODES:
        raise ValueError(f"--mode {mode!r}: choose one of {MODES}")
    f = getattr(vae, "spatial_factor", 8)
    if crop_size % f:
        raise ValueError(f"--crop-size {crop_size} must be a multiple of the VAE's spatial factor {f}")
    video_metrics = video_metrics or VideoMetrics()
    columns, rows = table.read_meta(meta)
    written = [r["path"] for r in rows]
    paths = [str(p if (p := Path(r["path"])).is_absolute() else (Path(meta).parent / p).resolve()) for r in rows]
    output = Path(output)
    folder = table.parts_dir(output)
    if overwrite:
        table.remove_parts(folder)
    cfg = {"num_frames": num_frames, "resolution": resolution, "crop_size": crop_size, "sample_rate": sample_rate, "mode": mode}
    journal = table.Journal(folder, video_metrics.columns,
                            meta={"command": "eval vae", **table.input_identity(meta), **cfg, **(settings or {})})  # fmt: skip

    def one(path):
        try:
            gt = load_clip(path, num_frames, resolution, crop_size, sample_rate)
        except Exception as err:  # noqa: BLE001 - an unreadable video is this row's error
            return None, f"{type(err).__name__}: {err}"
        return video_metrics(gt, reconstruct(vae, gt, mode)), ""

    done = run_journaled(list(enumerate(paths)), one, journal, workers=1, desc=f"eval vae ({mode})", progress=progress)
    ok, bad = split_done(done)
    out_rows = [{"path": written[i], "num_frames": num_frames, **{c: ok[i][c] for c in video_metrics.columns}}
                for i in range(len(rows)) if i in ok]  # fmt: skip
    table.write_rows(out_rows, output, ["path", "num_frames", *video_metrics.columns])
    summary = {"videos": len(out_rows), **cfg,
               **{c: float(np.mean([float(r[c]) for r in out_rows])) for c in video_metrics.columns if out_rows}}  # fmt: skip
    write_text_atomic(json.dumps(summary, indent=2) + "\n", table.suffixed(output, "summary").with_suffix(".json"))
    errors = [(written[i], bad[i]) for i in sorted(bad)]
    errors_path = table.suffixed(output, "errors")
    if errors:
        table.write_rows([{"path": p, "error": e} for p, e in errors], errors_path, ["path", "error"])
    else:
        errors_path.unlink(missing_ok=True)
    table.remove_parts(folder)
    report_errors(errors, errors_path)
    return summary
