"""`opensora eval loss`: the rectified-flow validation loss per resolution / length bucket (spec 2.1, 10.3).

    opensora eval loss --data meta/val.csv --model outputs/run/checkpoints/step-00002000/ema -o eval/loss.csv
    opensora eval loss --data meta/val.csv --preset builtin --buckets '{"64px": {"17": [1.0, 4]}}' --extra-resolution 64px=4096

For each (resolution, num_frames) of the bucket config that has a batch size, in the config's
order (`--start-index` / `--end-index` pick resolutions, as officially): the rows that fall in
that single bucket (the official single-bucket loader, `opensora_sdk.training` buckets and
dataset) are VAE-encoded and T5-encoded; for each of the ten timesteps
t = linspace(0, 1000, 12)[1:-1] (passed explicitly: no warp, no logit-normal draw) the
per-sample loss of `RectifiedFlow.training_loss` (spec 5.2) is averaged over the bucket's
samples; the bucket's loss is the mean over the ten. No frame masks, noise from a generator
seeded with `--seed` (42) per bucket. Default bucket config: the official eval one (below).

Writes one CSV row per bucket (`resolution, num_frames, samples, loss, loss_t<t>...`) and
`<output>_summary.json`; finished buckets are journaled, so a re-run continues.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from opensora_sdk.data import table
from opensora_sdk.loading import write_text_atomic

NUM_EVAL_TIMESTEPS = 10
EVAL_BUCKETS = {  # configs/opensora-v1-2/misc/eval_loss.py: resolution -> {num_frames: batch size}
    "144p": {1: 100, 51: 30, 102: 20, 204: 8, 408: 4},
    "240p": {1: 100, 51: 24, 102: 12, 204: 4, 408: 2},
    "360p": {1: 60, 51: 12, 102: 6, 204: 2, 408: 1},
    "480p": {1: 40, 51: 6, 102: 3, 204: 1},
    "720p": {1: 20, 51: 2, 102: 1},
    "1080p": {1: 10},
    "2048": {1: 5},
}


def eval_timesteps(n: int = NUM_EVAL_TIMESTEPS, num_timesteps: int = 1000) -> list[float]:
    """The n interior points of linspace(0, num_timesteps, n + 2)."""
    return torch.linspace(0, num_timesteps, n + 2)[1:-1].tolist()


def _batch_size(entry) -> int | None:
    if isinstance(entry, (list, tuple)):
        return entry[1]
    return entry


def bucket_list(config: dict) -> list[tuple[str, int, int]]:
    """[(resolution, num_frames, batch_size)] in config order, entries without a batch size left out."""
    out = []
    for res, lengths in config.items():
        for t, entry in lengths.items():
            bs = _batch_size(entry)
            if bs:
                out.append((res, int(t), int(bs)))
    return out


@torch.no_grad()
def bucket_loss(model, vae, text_encoder, dataset, res: str, T: int, batch_size: int, *, extra_resolutions=None,
                scheduler=None, timesteps=None, seed: int = 42, device="cpu", frame_interval: int = 1) -> dict | None:
    """{samples, loss, losses: {t: loss}} of one bucket, or None when no row falls in it."""
    from opensora_sdk.schedulers.rflow import RectifiedFlow
    from opensora_sdk.training.buckets import BucketBatchSampler, BucketConfig
    from opensora_sdk.training.dataset import collate_samples

    scheduler = scheduler or RectifiedFlow()
    timesteps = timesteps or eval_timesteps()
    buckets = BucketConfig({res: {T: [1.0, batch_size]}}, extra_resolutions)
    sampler = BucketBatchSampler(dataset.sizes, buckets, seed=seed, frame_interval=frame_interval, drop_last=False)
    assigned = sampler.assign(0)
    members = [i for i, b in enumerate(assigned) if b is not None]
    if not members:
        return None
    batches = []  # encoded once, reused for every t
    for start in range(0, len(members), batch_size):
        by_shape: dict[tuple, list] = {}  # one forward pass holds one shape (aspect-ratio buckets differ)
        for i in members[start : start + batch_size]:
            Tb, H, W = buckets.shape(assigned[i])
            by_shape.setdefault((Tb, H, W), []).append(dataset[f"{i}-{Tb}-{H}-{W}"])
        for group in by_shape.values():
            batch = collate_samples(group)
            gen = torch.Generator(device).manual_seed(seed)
            x0 = vae.encode(batch["video"].to(device, vae.dtype), sample=True, generator=gen).float()
            y, mask = text_encoder.encode(batch["text"])
            kwargs = {"y": y, "mask": mask, **{k: batch[k].to(device) for k in ("fps", "height", "width", "num_frames")}}
            batches.append((x0, kwargs))
    losses = {}
    for t in timesteps:
        gen = torch.Generator(device).manual_seed(seed)
        values = []
        for x0, kwargs in batches:
            tt = torch.full((x0.shape[0],), float(t), device=device)
            values.append(scheduler.training_loss(model, x0, kwargs, t=tt, generator=gen).float().cpu())
        losses[float(t)] = float(torch.cat(values).mean())
    n = sum(x0.shape[0] for x0, _ in batches)
    return {"samples": n, "loss": sum(losses.values()) / len(losses), "losses": losses}


def evaluate(pipe, data, output, *, buckets: dict | None = None, extra_resolutions=None, start_index: int = 0,
             end_index: int | None = None, seed: int = 42, frame_interval: int = 1, num_eval_timesteps: int = NUM_EVAL_TIMESTEPS,
             progress: bool = True, overwrite: bool = False) -> dict:  # fmt: skip
    """Validation loss of `pipe`'s models (an `OpenSoraPipeline`) on `data`, bucket by bucket."""
    from tqdm.auto import tqdm

    from opensora_sdk.training.dataset import VideoTextDataset

    config = buckets or EVAL_BUCKETS
    resolutions = list(config)[start_index:end_index]
    todo = [b for b in bucket_list(config) if b[0] in resolutions]
    if not todo:
        raise ValueError(f"no bucket to evaluate: resolutions {list(config)}[{start_index}:{end_index}] is empty")
    if type(pipe.transformer).__name__ != "STDiT3":
        raise ValueError(f"the validation loss is the v1.2 rectified-flow loss; the model is a {type(pipe.transformer).__name__} "
                         "(v1.1 / v1.0 train with IDDPM)")  # fmt: skip
    dataset = VideoTextDataset(data, frame_interval=frame_interval, seed=seed)
    output = Path(output)
    timesteps = eval_timesteps(num_eval_timesteps)
    tcols = [f"loss_t{t:g}" for t in timesteps]
    folder = table.parts_dir(output)
    if overwrite:
        table.remove_parts(folder)
    journal = table.Journal(folder, ["resolution", "num_frames", "samples", "loss", *tcols],
                            meta={"command": "eval loss", **table.input_identity(data), "sources": pipe.sources,
                                  "buckets": {r: {str(t): v for t, v in lv.items()} for r, lv in config.items()},
                                  "seed": seed, "timesteps": timesteps})  # fmt: skip
    done = journal.done()
    device = pipe.device
    model, vae, te = pipe.transformer, pipe.vae, pipe.text_encoder
    model.eval()
    for k, (res, T, bs) in enumerate(tqdm(todo, desc="eval loss", disable=not progress)):
        if k in done:
            continue
        result = bucket_loss(model, vae, te, dataset, res, T, bs, extra_resolutions=extra_resolutions, seed=seed,
                             device=device, frame_interval=frame_interval, timesteps=timesteps)  # fmt: skip
        row = {"resolution": res, "num_frames": T, "samples": 0 if result is None else result["samples"]}
        if result is not None:
            row.update(loss=result["loss"], **{c: v for c, v in zip(tcols, result["losses"].values())})
        journal.add(k, row)
    done = journal.done()
    rows = [done[k] for k in range(len(todo))]
    table.write_rows(rows, output, ["resolution", "num_frames", "samples", "loss", *tcols])
    scored = [r for r in rows if r.get("loss")]
    summary = {"buckets": {f"{r['resolution']}x{r['num_frames']}": float(r["loss"]) for r in scored},
               "mean_loss": sum(float(r["loss"]) for r in scored) / len(scored) if scored else None,
               "empty_buckets": [f"{r['resolution']}x{r['num_frames']}" for r in rows if not r.get("loss")],
               "timesteps": timesteps}  # fmt: skip
    write_text_atomic(json.dumps(summary, indent=2) + "\n", table.suffixed(output, "summary").with_suffix(".json"))
    table.remove_parts(folder)
    return summary
