"""What a run's checkpoints say about generating with them, and validation videos while training.

`generation.json` (see `opensora_sdk.presets.generation_card`) goes into every checkpoint's
model/ and ema/ folders, and beside a LoRA run's adapter files: the VAE and text encoder the
run was trained with (their folders or hub ids; a run with random ones points at
output_dir/random_encoders/) and the generation defaults of its data (the size and length of
its most common bucket, fps = video fps / frame_interval), on top of the defaults of the
model it started from (e.g. the built-in model's steps and guidance) and under the config's
`generation:` overrides. `opensora generate --model <checkpoint>/ema` then needs no other flag.

`Validator` generates `validation.prompts` with `validation.seed` every `validation.every`
steps through the SDK's one generation path (`opensora_sdk.generation`, as OpenSoraPipeline),
with the live transformer (EMA weights swapped in for the call), and writes
output_dir/validation/step-N/NN.mp4. Prompts are encoded once, on the CPU, and kept; the VAE
waits on the CPU between validations.
"""

from __future__ import annotations

import contextlib
import logging
import statistics
from pathlib import Path

import numpy as np
import torch

from opensora_sdk.presets import GENERATION_FILE, check_defaults, generation_card

logger = logging.getLogger(__name__)
FORMAT = "opensora-generation"


def _source(value: str | None, random_folder: Path) -> str:
    """A config's from_pretrained as an absolute path when it is local, else as given; the
    run's random encoders folder when it is null."""
    if not value:
        return str(random_folder.resolve())
    path = Path(value).expanduser()
    return str(path.resolve()) if path.exists() else str(value)


def data_defaults(dataset, sampler, buckets, frame_interval: int, fps_condition: str) -> dict:
    """Size and length of the most common bucket, and the fps the model was conditioned on."""
    counts = sampler.describe(0)
    out = {}
    if counts:
        T, H, W = buckets.shape(max(counts, key=counts.get))
        out = {"height": int(H), "width": int(W), "num_frames": int(T)}
    fps = None
    if hasattr(dataset, "entries"):  # precomputed features: the fps as fed to the model
        values = [float(e["fps"]) for e in dataset.entries if e.get("fps")]
        fps = statistics.median(values) if values else None
    elif getattr(dataset, "rows", None) and "fps" in dataset.rows[0]:
        values = [float(r["fps"]) for r in dataset.rows if str(r.get("fps", "")).strip()]
        if values:
            fps = statistics.median(values)
            fps = fps if fps_condition == "native" else float(fps // frame_interval)
    if fps and fps < 120:  # 120: images
        out["fps"] = float(fps)
    return out


def make_card(cfg, family_name: str, out: Path, defaults_from_data: dict, *, base_model: str | None = None) -> dict:
    """The generation.json of this run (see the module docstring)."""
    init = generation_card(cfg.model.from_pretrained) if cfg.model.from_pretrained else None
    defaults = dict((init or {}).get("defaults") or {})
    if init and defaults_from_data.get("num_frames") and defaults.get("loop_num_frames"):
        defaults["loop_num_frames"] = 2 * defaults_from_data["num_frames"]
    defaults.update(defaults_from_data)
    if family_name == "v1.2":  # sample with the timestep warp only if the model was trained with it
        defaults["timestep_warp"] = bool(cfg.scheduler.get("use_timestep_transform", True))
    defaults.update(cfg.generation)
    check_defaults(defaults)
    card = {
        "format": FORMAT, "family": family_name,
        "vae": _source(cfg.vae.from_pretrained, out / "random_encoders" / "vae"),
        "text_encoder": _source(cfg.text_encoder.from_pretrained, out / "random_encoders" / "text_encoder"),
        "defaults": defaults, "max_latent_frames": (init or {}).get("max_latent_frames"),
    }  # fmt: skip
    if base_model is not None:
        card["base_model"] = base_model
    return card


def write_card(card: dict, folder: Path) -> None:
    from opensora_sdk.loading import write_json_atomic

    write_json_atomic(card, folder / GENERATION_FILE)


class Validator:
    """Validation videos (see the module docstring). Call `run` on every rank (sharded models
    and sequence parallelism need all of them); only `is_main` writes."""

    def __init__(self, section, card: dict, *, device, out: Path, is_main: bool, build_vae, build_text_encoder,
                 sp_group=None, autocast=None):  # fmt: skip
        self.section, self.card, self.device, self.out, self.is_main = section, card, torch.device(device), out, is_main
        self.build_vae, self.build_text_encoder = build_vae, build_text_encoder
        self.sp_group, self.autocast = sp_group, autocast
        self.plan = self.embeddings = self.vae = None

    def _prepare(self, model) -> None:
        from opensora_sdk.pipeline import OpenSoraPipeline

        text_encoder = self.build_text_encoder()
        self.vae = self.build_vae()
        flags = {n: p.requires_grad for n, p in model.named_parameters()}
        training = model.training
        try:  # the pipeline checks the three models fit together and resolves the plan
            pipe = OpenSoraPipeline(model, self.vae, text_encoder, device=self.device, defaults=self.card["defaults"],
                                    max_latent_frames=self.card.get("max_latent_frames"), progress=False,
                                    sp_group=self.sp_group)  # fmt: skip
            s = self.section
            self.plan = pipe.plan(list(s.prompts), seed=s.seed, num_steps=s.num_steps, guidance_scale=s.guidance_scale,
                                  batch_size=min(4, len(s.prompts)))  # fmt: skip
        finally:
            _restore(model, flags, training)
        texts = list(dict.fromkeys(t for sample in self.plan.samples for t in sample.loop_prompts))
        if self.plan.negative_prompt is not None:
            texts.append(self.plan.negative_prompt)
        with torch.no_grad():
            y, mask = text_encoder.encode(texts)
        self.embeddings = {t: (y[i : i + 1].cpu(), mask[i : i + 1].cpu()) for i, t in enumerate(texts)}
        del text_encoder  # prompts are encoded once; T5 is not kept

    @torch.no_grad()
    def run(self, step: int, model, ema=None) -> list[Path]:
        from opensora_sdk import generation
        from opensora_sdk.placement import Placement

        if self.plan is None:
            self._prepare(model)
        flags = {n: p.requires_grad for n, p in model.named_parameters()}
        training = model.training
        saved = {}
        if ema is not None and self.section.ema:
            params = dict(model.named_parameters())
            saved = {n: params[n].detach().clone() for n in ema.shadow}
            ema.copy_to(model)
        model.eval()
        paths = []
        try:
            embeddings = {t: (y.to(self.device), m.to(self.device)) for t, (y, m) in self.embeddings.items()}
            models = generation.Models(model, self.vae, None, sp_group=self.sp_group)
            with self.autocast() if self.autocast is not None else contextlib.nullcontext():
                videos = generation.generate(models, Placement(self.device, None), self.plan, embeddings=embeddings)
            if self.is_main:
                folder = self.out / "validation" / f"step-{step:08d}"
                folder.mkdir(parents=True, exist_ok=True)
                for k, video in enumerate(videos):
                    video.metadata["step"] = str(step)
                    paths.append(Path(video.save(folder / f"{k:02d}.mp4")))
            self.last_videos = videos
        finally:
            self.vae.to("cpu")
            if saved:
                params = dict(model.named_parameters())
                for n, value in saved.items():
                    params[n].copy_(value)
            _restore(model, flags, training)
        return paths


def _restore(model, flags: dict, training: bool) -> None:
    for n, p in model.named_parameters():
        p.requires_grad_(flags.get(n, False))
    model.train(training)


def frame_strip(videos, frames: int = 4) -> torch.Tensor:
    """[N, 3, H, frames * W] uint8: `frames` evenly spaced frames of each video side by side (for TensorBoard)."""
    rows = []
    for v in videos:
        f = v.frames
        picks = [f[round(i * (len(f) - 1) / max(frames - 1, 1))] for i in range(frames)]
        rows.append(torch.from_numpy(np.concatenate(picks, axis=1)).permute(2, 0, 1))
    return torch.stack(rows)


__all__ = ["FORMAT", "Validator", "data_defaults", "frame_strip", "make_card", "write_card"]
