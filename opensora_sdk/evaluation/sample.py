"""`opensora eval sample`: batch generation for VBench and human review (spec 2.2, 2.3).

    opensora eval sample --prompt-path all_dimension.txt --prompt-as-path --num-sample 5 \
        --model CKPT --image-size 240 426 --num-frames 51 --save-dir samples/vbench --start-index 0 --end-index 120

Names (the official inference script's, spec 6.5): `{save_dir}/{sample_name or "sample"}_{idx:04d}`
with idx = start_index + position, or with `--prompt-as-path` `{save_dir}/{prompt}`; `-{k}` is
appended when `--num-sample` is not 1; `.mp4` (`.png` for one frame). A file that exists is
skipped, so an interrupted run continues (and several processes can share the prompt list by
`--start-index` / `--end-index`). Each sample has its own seed, `seed + idx * num_sample + k`,
so a sample is the same whichever others were generated before it. Every other option is
`opensora generate`'s; the models load once, through `OpenSoraPipeline`.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
from pathlib import Path


def sample_path(save_dir, sample_name, idx: int, prompt: str, prompt_as_path: bool, num_sample: int, k: int, suffix: str) -> Path:
    if prompt_as_path:
        stem = (sample_name or "") + prompt.replace(os.sep, "_")
    else:
        stem = f"{sample_name or 'sample'}_{idx:04d}"
    if num_sample != 1:
        stem += f"-{k}"
    return Path(save_dir) / f"{stem}{suffix}"


def sample_seed(seed: int, idx: int, k: int, num_sample: int) -> int:
    return seed + idx * num_sample + k


def cmd_sample(args: argparse.Namespace) -> int:
    from tqdm.auto import tqdm

    from opensora_sdk import cli_generate, cli_plan

    if args.num_sample < 1:
        raise ValueError(f"--num-sample {args.num_sample}: expected a positive integer")
    if args.seed is None:
        raise ValueError("--seed random is not allowed here: samples are named and resumed by their seeds")
    prompts = cli_plan._read_prompts(args)
    first = copy.copy(args)
    first.prompt, first.text, first.prompt_path, first.batch_size = [prompts[0]], [], None, 1
    _, plan = cli_plan._configs_and_plan(first)  # every option checked before any weight is read
    suffix = ".png" if plan.total_frames == 1 else ".mp4"
    save_dir = Path(args.save_dir)
    save_dir.mkdir(parents=True, exist_ok=True)
    todo = []
    for pos, prompt in enumerate(prompts):
        idx = args.start_index + pos
        for k in range(args.num_sample):
            path = sample_path(save_dir, args.sample_name, idx, prompt, args.prompt_as_path, args.num_sample, k, suffix)
            if not path.exists():
                todo.append((idx, k, prompt, path))
    total = len(prompts) * args.num_sample
    print(f"{total - len(todo)} of {total} samples exist; generating {len(todo)}", file=sys.stderr)
    if not todo:
        return 0
    device, dtype = cli_plan._device_and_dtype(args)
    pipe = cli_generate._load_pipeline(args, device, dtype)
    for idx, k, prompt, path in tqdm(todo, desc="samples", disable=args.no_progress, file=sys.stderr):
        one = copy.copy(first)
        one.prompt, one.seed = [prompt], sample_seed(args.seed, idx, k, args.num_sample)
        _, plan = cli_plan._configs_and_plan(one)
        video = pipe.generate(plan, progress=False)[0]
        if args.save_fps is not None:
            video.fps = float(args.save_fps)
        print(video.save(path))
    return 0
