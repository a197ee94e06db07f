"""Exact speed-ups of STDiT3 equal the plain path: the per-generation reuse of
`step_invariants()` (bitwise) and regional torch.compile (within 1e-5)."""

from __future__ import annotations

import copy
import shutil
from contextlib import contextmanager

import pytest
import torch
from test_sampling import OUT_TOL, _run_golden
from test_stdit3 import GOLDEN_OUT_TOL, golden_call, golden_model, make_inputs, model_for, tiny

from opensora_sdk.sampling import sample
from opensora_sdk.schedulers import RectifiedFlow

COMPILE_TOL = 1e-5


def cfg_inputs(cfg, guidance: bool, seed=0) -> dict:
    """Two prompts of different lengths; with guidance, the [cond; null] batch of 4 the
    sampling loop builds (the null rows masked with the prompts' masks)."""
    a = make_inputs(cfg, B=2, lens=(5, 13), seed=seed)
    if not guidance:
        return a
    null = torch.randn(1, 1, *a["y"].shape[2:], generator=torch.Generator().manual_seed(seed + 1))
    both = {k: torch.cat([v, v]) for k, v in a.items() if k in ("x", "fps", "height", "width")}
    return dict(a, **both, y=torch.cat([a["y"], null.expand(2, -1, -1, -1)]), mask=torch.cat([a["mask"]] * 2),
                timestep=torch.cat([a["timestep"]] * 2))  # fmt: skip


def steps(model, a, x_masks, reuse: bool):
    """Three steps (new x and t each) inside one scope -> (outputs, the scope)."""
    model.set_step_reuse(reuse)
    outs = []
    with torch.no_grad(), model.step_invariants() as scope:
        for i, (t, x_mask) in enumerate(zip((930.0, 512.5, 75.0), x_masks)):
            x = a["x"] * (1.0 - 0.3 * i) + 0.1 * i
            outs.append(model(**dict(a, x=x, timestep=torch.full_like(a["timestep"], t), x_mask=x_mask)))
    model.set_step_reuse(True)
    return outs, scope


@pytest.mark.parametrize("guidance", [False, True])
@pytest.mark.parametrize("frames", ["none", "condition", "condition then none"])
def test_reuse_equals_plain_bitwise_over_steps(guidance, frames):
    cfg = tiny()
    model = model_for(cfg, seed=1)
    a = cfg_inputs(cfg, guidance)
    B, T = a["x"].shape[0], a["x"].shape[2]
    cond = torch.ones(B, T, dtype=torch.bool)
    cond[:, 0] = False
    cond[-1, -1] = False
    x_masks = {"none": [None] * 3, "condition": [cond] * 3,
               "condition then none": [cond, cond, torch.ones(B, T, dtype=torch.bool)]}[frames]  # fmt: skip
    plain, off = steps(model, a, x_masks, reuse=False)
    reused, scope = steps(model, a, x_masks, reuse=True)
    assert off is None and (scope.misses, scope.hits) == (1, 2)
    assert model.step_scope is None  # closed
    for p, r in zip(plain, reused):
        assert torch.equal(p, r)
    assert not torch.allclose(plain[0], plain[1])  # the steps really differ


def test_reuse_through_the_sampling_loop_with_edit_ratio_frames():
    """The rectified-flow loop with CFG and a frame mask whose condition frames join at mid
    schedule (edit ratio 0.5): same latent with reuse on and off, one miss per loop."""
    cfg = tiny()
    model = model_for(cfg, seed=2)
    a = make_inputs(cfg, B=2, lens=(3, 16), seed=3)
    frame_mask = torch.tensor([[0.5, 1.0, 1.0], [1.0, 1.0, 0.0]])
    ts = RectifiedFlow(num_sampling_steps=4).timesteps(2, height=240, width=426, num_frames=9)
    y_null = model.y_embedder.y_embedding[None, None].expand_as(a["y"])
    kwargs = {k: a[k] for k in ("fps", "height", "width")}
    results = {}
    for reuse in (False, True):
        model.set_step_reuse(reuse)
        with torch.no_grad(), model.step_invariants() as scope:
            results[reuse] = sample(model, a["x"], ts, y=a["y"], y_null=y_null, y_mask=a["mask"], guidance_scale=5.0,
                                    frame_mask=frame_mask, model_kwargs=kwargs,
                                    generator=torch.Generator().manual_seed(7))
    model.set_step_reuse(True)
    assert (scope.misses, scope.hits) == (1, 3)
    assert torch.equal(results[False], results[True])


def test_reuse_never_crosses_texts_and_stays_out_of_training():
    cfg = tiny()
    model = model_for(cfg, seed=3)
    a = make_inputs(cfg)
    other = dict(a, y=a["y"].flip(2), mask=a["mask"].flip(0))
    with torch.no_grad():
        plain_a, plain_other, plain_neg = model(**a), model(**other), model(**dict(a, y=-a["y"]))
        with model.step_invariants() as scope:
            assert torch.equal(model(**a), plain_a)
            assert torch.equal(model(**other), plain_other)  # another y: a miss, never the old text
            y = a["y"].clone()
            assert torch.equal(model(**dict(a, y=y)), plain_a)
            y.mul_(-1)  # changed in place: its version counter says so
            assert torch.equal(model(**dict(a, y=y)), plain_neg)
        assert scope.hits == 0 and scope.misses == 4
    # autograd on, or train mode: the plain path (no lookups), same gradients
    x = a["x"].clone().requires_grad_()
    model(**dict(a, x=x)).square().sum().backward()
    with model.step_invariants() as scope:
        x2 = a["x"].clone().requires_grad_()
        model(**dict(a, x=x2)).square().sum().backward()
        model.train()
        with torch.no_grad():
            model(**a)
        model.eval()
    assert scope.hits == scope.misses == 0
    assert torch.equal(x.grad, x2.grad)


def test_goldens_hold_with_reuse(golden):
    """The official forward with condition frames (twice in one scope: the second reuses) and
    the official sampling loop with the tiny STDiT3, inside a scope."""
    bundle = golden("stdit3_b")
    model = golden_model(bundle)
    with torch.no_grad(), model.step_invariants() as scope:
        outs = [golden_call(model, bundle) for _ in range(2)]
    assert (scope.misses, scope.hits) == (1, 1)
    for out in outs:
        torch.testing.assert_close(out, bundle["out"], atol=GOLDEN_OUT_TOL["cpu"], rtol=0)

    from opensora_sdk.configs import STDiT3Config, config_from_dict
    from opensora_sdk.models import STDiT3

    g = golden("rflow_sample")
    with torch.device("meta"):
        model = STDiT3(config_from_dict(STDiT3Config, g.meta["config_overrides"]))
    model.load_state_dict(g.with_prefix("sd."), strict=True, assign=True)
    model.eval()
    y_null = model.y_embedder.y_embedding[None, None].expand_as(g["in.y"])
    with torch.no_grad(), model.step_invariants() as scope:
        out = _run_golden(g, model, y_null=y_null, generator=torch.Generator().manual_seed(502))
    assert scope.misses == 1 and scope.hits == g.meta["scheduler"]["num_sampling_steps"] - 1
    torch.testing.assert_close(out, g["out"], rtol=0, atol=OUT_TOL)


def test_generation_opens_one_scope_per_clip_and_matches_reuse_off():
    """The pipeline's sampling (negative prompt: its mask joins the null half) reuses across the
    steps of a clip and gives the same latents as with reuse off."""
    from opensora_sdk.pipeline import OpenSoraPipeline

    pipe = OpenSoraPipeline.from_preset("tiny-random", device="cpu", progress=False)
    model, scopes = pipe.transformer, []
    opened = model.step_invariants

    @contextmanager
    def spy():
        with opened() as scope:
            scopes.append(scope)
            yield scope

    model.step_invariants = spy
    call = dict(prompt=["a red ball", "two cats on a long wooden table"], negative_prompt="blurry", height=32,
                width=32, num_frames=5, num_steps=3, seed=5, output_type="latent")  # fmt: skip
    reused = pipe(**call).frames
    model.set_step_reuse(False)
    plain = pipe(**call).frames
    assert len(scopes) == 4  # one per clip: two prompts (batches of one), two calls
    assert [(s.misses, s.hits) for s in scopes[:2]] == [(1, 2)] * 2 and scopes[2:] == [None] * 2
    assert torch.equal(reused, plain)


# --------------------------------------------------------------------------------------------
# Regional compile
# --------------------------------------------------------------------------------------------


def test_compile_blocks_wraps_every_block_and_matches_plain():
    """The graph capture of every block (backend aot_eager: no C++ build), with and without the
    reused text keys / values."""
    cfg = tiny()
    model = model_for(cfg, seed=4)
    compiled = copy.deepcopy(model)
    compiled.compile_blocks(backend="aot_eager")
    assert all(b._compiled_call_impl is not None for b in (*compiled.spatial_blocks, *compiled.temporal_blocks))
    a = make_inputs(cfg)
    with torch.no_grad():
        ref = model(**a)
        torch.testing.assert_close(compiled(**a), ref, atol=COMPILE_TOL, rtol=0)
        with compiled.step_invariants():
            for _ in range(2):
                torch.testing.assert_close(compiled(**a), ref, atol=COMPILE_TOL, rtol=0)


@pytest.mark.slow
@pytest.mark.skipif(not any(shutil.which(c) for c in ("g++", "c++", "clang++")), reason="inductor needs a C++ compiler")
def test_inductor_compiled_block_equals_plain():
    """One tiny temporal block (RoPE, condition frames, masked text) through the default
    inductor backend, as `compile_blocks()` compiles them."""
    from opensora_sdk.models.layers import RotaryEmbedding
    from opensora_sdk.models.stdit3_blocks import STDiT3Block

    torch.manual_seed(0)
    block = STDiT3Block(32, 2, temporal=True).eval()
    compiled = copy.deepcopy(block)
    compiled.compile(dynamic=False)
    B, T, S, C = 2, 3, 4, 32
    g = torch.Generator().manual_seed(1)
    x, y, t_mlp, t0_mlp = (torch.randn(*s, generator=g) for s in ((B, T * S, C), (B, 5, C), (B, 6 * C), (B, 6 * C)))
    y_valid = torch.tensor([[True] * 5, [True] * 2 + [False] * 3])
    x_mask = torch.tensor([[False, True, True], [True, True, True]])
    rope = RotaryEmbedding(C // 2).cos_sin(T, device="cpu")
    args = (x, y, y_valid, t_mlp, T, S, x_mask, t0_mlp, rope)
    with torch.no_grad():
        ref, out = block(*args), compiled(*args)
    assert out.abs().max() > 0.1
    torch.testing.assert_close(out, ref, atol=COMPILE_TOL, rtol=0)


def test_pipeline_compile_option_compiles_blocks_with_a_note(capsys):
    from opensora_sdk.pipeline import OpenSoraPipeline

    pipe = OpenSoraPipeline.from_preset("tiny-random", device="cpu", progress=False, compile=True)
    blocks = (*pipe.transformer.spatial_blocks, *pipe.transformer.temporal_blocks)
    assert all(b._compiled_call_impl is not None for b in blocks)
    notes = [line for line in capsys.readouterr().err.splitlines() if line.startswith("compile:")]
    assert len(notes) == 1 and "first generation" in notes[0]


def test_cli_compile_flag_reaches_the_pipeline(monkeypatch):
    from opensora_sdk import cli, cli_generate
    from opensora_sdk.pipeline import OpenSoraPipeline

    seen = {}
    monkeypatch.setattr(OpenSoraPipeline, "from_preset", classmethod(lambda cls, name, **kw: seen.update(kw)))
    args = cli.build_parser().parse_args(["generate", "--prompt", "a cat", "--compile", "--preset", "tiny-random"])
    cli_generate._load_pipeline(args, torch.device("cpu"), torch.float32)
    assert seen["compile"] is True


def test_the_gpu_speed_script_runs_on_tiny_models(tmp_path):
    """benchmarks/gpu_speed.py is what a lent GPU runs: checked here on the CPU with the tiny
    architectures (the per-step path equals the reuse path bitwise; the report is written)."""
    import importlib.util
    import json
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_speed.py"
    spec = importlib.util.spec_from_file_location("gpu_speed", path)
    gpu_speed = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu_speed)
    out = tmp_path / "gpu.json"
    report = gpu_speed.main(["--device", "cpu", "--tiny", "--steps", "3", "--resolution", "144p", "--num-frames", "17",
                             "--variants", "plain,no-reuse,cached,fp8", "--json", str(out)])  # fmt: skip
    assert json.loads(out.read_text())["variants"].keys() == {"plain", "no-reuse", "cached", "fp8"}
    assert report["variants"]["no-reuse"]["max_abs_diff_vs_first"] == 0
    assert report["variants"]["plain"]["calls"] == 3 and report["tflop_per_call"] > 0
    assert report["vae_decode"]["seconds"] > 0


def test_the_builtin_speed_comparison_runs_every_switch(tmp_path):
    """benchmarks/bench_builtin_speed.py --compare: every switch of the built-in generation side
    by side; the exact ones stay within float rounding of the plain path (at most 1 of 255 in a
    pixel), the approximate ones are reported with their PSNR."""
    import importlib.util
    import json
    import math
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_builtin_speed.py"
    spec = importlib.util.spec_from_file_location("bench_builtin_speed", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "speed.json"
    report = bench.main(["--compare", "--runs", "1", "--steps", "3", "--json", str(out)])
    rows = {r["variant"]: r for r in json.loads(out.read_text())["compare"]}
    assert [r["variant"] for r in report["compare"]] == list(rows)
    assert rows["plain (before)"]["cpu_ratio"] == 1 and math.isinf(rows["plain (before)"]["psnr_db"])
    exact = [r for r in rows.values() if r["exact"]]
    assert len(exact) == 2 and all(r["max_uint8_diff"] <= 1 for r in exact)
    approximate = [r for r in rows.values() if not r["exact"]]
    assert {r["variant"] for r in approximate} >= {"+ bf16 VAE", "+ teacache:0.2"}
    assert all(r["median_cpu_s"] > 0 and r["psnr_db"] > 20 for r in approximate)
