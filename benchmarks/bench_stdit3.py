"""STDiT3 forward time and peak memory with random weights, and the exact speed-ups side by side.

    python benchmarks/bench_stdit3.py --preset STDiT3-XL/2 --batch 2 --latent 5x16x16 \\
        --text-len 300 --runs 3
    python benchmarks/bench_stdit3.py --compare --steps 3 --runs 3 [--compile] [--threads 2]

Without `--compare`: one forward, its median time and peak memory. Run it as its own process:
peak host memory is the process's `ru_maxrss` high-water mark, so the figure printed for the
forward is the growth of that mark over the built model. On CUDA the peak is
`torch.cuda.max_memory_allocated` during the timed runs.

With `--compare`, side by side, the variants alternating run by run in this one process
(medians of wall and of process CPU time, ratios plain / variant, and the max abs
difference of each output to plain's; on a shared CPU use --threads 1 and read the CPU column):

    plain     reuse off: every forward recomputes the text, fps and position work
    reuse     `step_invariants()`: that work once per loop (bitwise the same output)
    compiled  reuse + `compile_blocks()` (with `--compile`; the first call compiles, not timed)

  1. one forward of the model at a step inside a loop (the scope already holds the text work);
  2. a sampling loop of `--steps` rectified-flow steps with CFG (batch = prompts x 2);
  3. the built-in model's whole sampling loop (its default size, steps and guidance; text
     encoded once beforehand, no decode).
"""

from __future__ import annotations

import argparse
import resource
import statistics
import sys
import time

import torch

from opensora_sdk.configs import STDIT3_PRESETS, preset
from opensora_sdk.models import STDiT3


def maxrss_mib() -> float:
    scale = 1 if sys.platform == "darwin" else 1024  # bytes on macOS, KiB on Linux
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / 2**20


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="STDiT3-XL/2", choices=sorted(STDIT3_PRESETS))
    p.add_argument("--batch", type=int, default=2, help="model batch (with --compare: the CFG batch, prompts x 2)")
    p.add_argument("--latent", default="5x16x16", help="latent T x H x W")
    p.add_argument("--text-len", type=int, default=300, help="valid text tokens per row")
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--attention", default="sdpa", choices=["sdpa", "flash", "xformers"])
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--compare", action="store_true", help="plain vs reuse (vs compiled) side by side")
    p.add_argument("--steps", type=int, default=3, help="--compare: steps of the sampling loop")
    p.add_argument("--compile", action="store_true", help="--compare: add the compiled variant")
    p.add_argument("--parts", default="forward,loop,builtin",
                   help="--compare: which of forward, loop, builtin to run (comma-separated; default all)")
    return p.parse_args(argv)


def build_model(args, device, dtype) -> STDiT3:
    cfg = preset(args.preset, STDIT3_PRESETS)
    if not 1 <= args.text_len <= cfg.model_max_length:
        raise SystemExit(f"--text-len must be in 1..{cfg.model_max_length}, got {args.text_len}")
    with torch.device("meta"):
        model = STDiT3(cfg)
    model.to_empty(device=device)
    model.initialize_weights()
    with torch.no_grad():  # random temporal blocks (from-scratch init makes them the identity)
        g = torch.Generator(device="cpu").manual_seed(1)
        for block in model.temporal_blocks:
            for layer in (block.attn.proj, block.cross_attn.proj, block.mlp.fc2):
                layer.weight.copy_(torch.randn(layer.weight.shape, generator=g) * 0.02)
    model.to(dtype).eval()
    model.set_attention_backend(args.attention)
    return model


def make_inputs(args, cfg, device) -> dict:
    T, H, W = (int(v) for v in args.latent.lower().split("x"))
    g = torch.Generator(device="cpu").manual_seed(0)
    B, L = args.batch, cfg.model_max_length
    mask = torch.zeros(B, L, dtype=torch.long)
    mask[:, : args.text_len] = 1
    inputs = dict(
        x=torch.randn(B, cfg.in_channels, T, H, W, generator=g),
        timestep=torch.rand(B, generator=g) * 1000,
        y=torch.randn(B, 1, L, cfg.caption_channels, generator=g),
        mask=mask,
        fps=torch.full((B,), 24.0),
        height=torch.full((B,), H * 8.0),
        width=torch.full((B,), W * 8.0),
    )
    return {k: v.to(device) for k, v in inputs.items()}


def synchronize(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# --------------------------------------------------------------------------------------------
# One forward: time and memory
# --------------------------------------------------------------------------------------------


def single(args, device, dtype) -> None:
    rss_start = maxrss_mib()
    model = build_model(args, device, dtype)
    cfg = model.config
    rss_model = maxrss_mib()
    inputs = make_inputs(args, cfg, device)
    times = []
    with torch.inference_mode():
        for _ in range(args.warmup):
            model(**inputs)
        synchronize(device)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        for _ in range(args.runs):
            start = time.perf_counter()
            out = model(**inputs)
            synchronize(device)
            times.append(time.perf_counter() - start)
    rss_end = maxrss_mib()

    T, H, W = inputs["x"].shape[2:]
    tokens = -(-T // cfg.patch_size[0]) * -(-H // cfg.patch_size[1]) * -(-W // cfg.patch_size[2])
    print(header(args, model, device))
    print(f"input x {list(inputs['x'].shape)}, {tokens} tokens/sample, text {args.text_len}/{cfg.model_max_length}, "
          f"attention {args.attention}, output {list(out.shape)}")
    print(f"forward: median {statistics.median(times):.3f} s over {args.runs} runs "
          f"(min {min(times):.3f}, max {max(times):.3f}; {args.warmup} warm-up)")
    print(f"host peak RSS: {rss_model:.0f} MiB after building the model "
          f"(+{rss_model - rss_start:.0f}), forward adds {rss_end - rss_model:.0f} MiB")
    if device.type == "cuda":
        weights = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20
        print(f"GPU peak allocated during forward: {torch.cuda.max_memory_allocated(device) / 2**20:.0f} MiB "
              f"(weights {weights:.0f} MiB)")


def header(args, model, device) -> str:
    params = sum(p.numel() for p in model.parameters())
    threads = f", {torch.get_num_threads()} threads"
    where = f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else threads
    return f"preset {args.preset} ({params / 1e9:.3f} B params), {args.dtype} on {device}{where}"


# --------------------------------------------------------------------------------------------
# Side by side: plain / reuse / compiled
# --------------------------------------------------------------------------------------------


class Variants:
    """Switches one model between plain, reuse and (optionally) compiled blocks. nn.Module.compile
    keeps the compiled callable in `_compiled_call_impl`; clearing it runs the block eagerly again,
    so one model (one copy of the weights) serves every variant."""

    def __init__(self, model, compiled: bool):
        self.model, self.compiled = model, {}
        self.names = ["plain", "reuse"] + (["compiled"] if compiled else [])
        if compiled:
            model.compile_blocks()
            self.compiled = {b: b._compiled_call_impl for b in self.blocks()}

    def blocks(self):
        return (*self.model.spatial_blocks, *self.model.temporal_blocks)

    def use(self, name: str) -> None:
        self.model.set_step_reuse(name != "plain")
        for b in self.blocks():
            b._compiled_call_impl = self.compiled.get(b) if name == "compiled" else None


def timed(fn, device):
    """(fn(), (wall seconds, this process's CPU seconds)) with the device synchronised around it.
    On a shared CPU the CPU seconds (use --threads 1) hold better than the wall time."""
    synchronize(device)
    start, cpu = time.perf_counter(), time.process_time()
    out = fn()
    synchronize(device)
    return out, (time.perf_counter() - start, time.process_time() - cpu)


def side_by_side(title: str, variants: Variants, run, runs: int, warmup: int) -> None:
    """`run()` -> (output, seconds) for each variant in turn, `runs` rounds after `warmup` rounds
    (at least one with the compiled variant: it compiles); prints medians, ratios and max abs
    differences."""
    times = {n: [] for n in variants.names}
    outs = {}
    warmup = max(warmup, 1 if "compiled" in variants.names else 0)
    for round_ in range(warmup + runs):
        for name in variants.names:
            variants.use(name)
            outs[name], seconds = run()
            if round_ >= warmup:
                times[name].append(seconds)
    variants.use("plain")
    wall = {n: [w for w, _ in times[n]] for n in variants.names}
    cpu = {n: [c for _, c in times[n]] for n in variants.names}
    base, base_cpu = statistics.median(wall["plain"]), statistics.median(cpu["plain"])
    print(title)
    for name in variants.names:
        med, med_cpu = statistics.median(wall[name]), statistics.median(cpu[name])
        diff = (outs[name].float() - outs["plain"].float()).abs().max().item()
        print(f"  {name:9s} wall median {med:8.3f} s (min {min(wall[name]):.3f}) x{base / med:5.2f}  |  "
              f"CPU median {med_cpu:8.3f} s x{base_cpu / med_cpu:5.2f}  |  max|diff| vs plain {diff:.2e}", flush=True)


def compare(args, device, dtype) -> None:
    if args.batch % 2:
        raise SystemExit(f"--compare needs an even --batch (prompts x 2 for CFG), got {args.batch}")
    parts = set(args.parts.split(","))
    unknown = parts - {"forward", "loop", "builtin"}
    if unknown:
        raise SystemExit(f"--parts: unknown {sorted(unknown)}; choose from forward, loop, builtin")
    if parts & {"forward", "loop"}:
        random_weights(args, device, dtype, parts)
    if "builtin" in parts:
        builtin(args, device)


def random_weights(args, device, dtype, parts) -> None:
    """Parts 1 and 2 on the preset's architecture with random weights."""
    from opensora_sdk.sampling import sample
    from opensora_sdk.schedulers import RectifiedFlow

    model = build_model(args, device, dtype)
    inputs = make_inputs(args, model.config, device)
    variants = Variants(model, args.compile)
    print(header(args, model, device))
    print(f"latent {args.latent}, CFG batch {args.batch}, text {args.text_len} tokens; {args.runs} timed rounds, "
          "variants alternating; ratios: plain / variant")

    def step():  # a forward at a step inside a loop: the scope already holds this text's work
        with model.step_invariants():
            if model.step_reuse:
                model(**inputs)  # the loop's first step, which fills the scope
            return timed(lambda: model(**inputs), device)

    with torch.inference_mode():
        if "forward" in parts:
            side_by_side("1. one forward (a step inside the loop)", variants, step, args.runs, args.warmup)

        P = args.batch // 2
        half = {k: v[:P] for k, v in inputs.items()}
        y_null = model.y_embedder.y_embedding.to(dtype)[None, None].expand(P, 1, -1, -1)
        T, H, W = half["x"].shape[2:]
        ts = RectifiedFlow(num_sampling_steps=args.steps).timesteps(P, height=8 * H, width=8 * W,
                                                                     num_frames=4 * T, device=device)

        def loop():
            with model.step_invariants():
                return timed(lambda: sample(
                    model, half["x"], ts, y=half["y"], y_null=y_null, y_mask=half["mask"], guidance_scale=7.0,
                    model_kwargs={k: half[k] for k in ("fps", "height", "width")},
                ), device)

        if "loop" in parts:
            side_by_side(f"2. sampling loop, {args.steps} steps with CFG", variants, loop, args.runs, args.warmup)


def builtin(args, device) -> None:
    """The built-in model's sampling loop at its defaults (text encoded once, no decode)."""
    from opensora_sdk import generation
    from opensora_sdk.pipeline import OpenSoraPipeline

    pipe = OpenSoraPipeline.from_preset(device=device, progress=False)
    plan = pipe.plan("a yellow square moving right on a gray background", seed=3)
    models = pipe.models()
    emb = generation.encode_texts(models.text_encoder, pipe.placement, [s.loop_prompts[0] for s in plan.samples])
    variants = Variants(pipe.transformer, args.compile)

    def run():
        return timed(lambda: generation.generate_latents(models, pipe.placement, plan, embeddings=emb), device)

    note = (f" ({plan.height}x{plan.width}, {plan.num_frames} frames, {plan.num_steps} steps, "
            f"guidance {plan.guidance_scale:g})")
    print(f"built-in model ({pipe.dtype}) on {device}, {torch.get_num_threads()} threads; variants alternating")
    side_by_side(f"3. built-in model, whole sampling loop{note}", variants, run, max(args.runs, 5), 1)


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    if args.compare:
        compare(args, device, dtype)
    else:
        single(args, device, dtype)


if __name__ == "__main__":
    main()
