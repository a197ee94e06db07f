"""Step caching (TeaCache, PAB): exact when off, close when on, per-row state under CFG,
frame-mask changes, a fresh state per clip, and clear errors on every front end."""

from __future__ import annotations

from contextlib import nullcontext

import pytest
import torch

from opensora_sdk import cli
from opensora_sdk.configs import STDIT3_PRESETS
from opensora_sdk.models.stdit3 import STDiT3
from opensora_sdk.pipeline import OpenSoraPipeline
from opensora_sdk.sampling import sample
from opensora_sdk.step_cache import CacheStats, PABConfig, TeaCacheConfig, attach, parse_cache

B, T, STEPS = 2, 3, 6


@pytest.fixture(scope="module")
def model():
    """A tiny STDiT3 with every weight non-zero (the temporal blocks start as the identity)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        m = STDiT3(STDIT3_PRESETS["STDiT3-tiny"]).eval().requires_grad_(False)
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return m


def _inputs(seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(B, 4, T, 8, 8, generator=g)
    y = torch.randn(B, 1, 16, 32, generator=g)
    mask = torch.ones(B, 16, dtype=torch.long)
    mask[0, 9:] = 0
    return z, y, mask


def _model_kwargs(rows: int) -> dict:
    return {k: torch.full((rows,), v) for k, v in (("fps", 24.0), ("height", 64.0), ("width", 64.0))}


def _sample(model, cache, *, frame_mask=None, guidance=5.0, stats=None):
    """STEPS rectified-flow steps of the tiny model with `cache` (a string or config)."""
    z, y, mask = _inputs()
    times = torch.linspace(1000, 1000 / STEPS, STEPS)
    timesteps = [torch.full((B,), float(t)) for t in times]

    def model_fn(x, t, *, y, mask, x_mask=None, **kwargs):
        return model(x, t, y=y, mask=mask, x_mask=x_mask, **kwargs)

    null = model.y_embedder.y_embedding[None, None].expand(B, 1, -1, -1)
    with torch.no_grad(), attach(model, parse_cache(cache), num_steps=STEPS, timesteps=times.tolist(), stats=stats):
        return sample(model_fn, z, timesteps, y=y, y_null=null if guidance != 1 else None, y_mask=mask,
                      guidance_scale=guidance, frame_mask=frame_mask, model_kwargs=_model_kwargs(B),
                      generator=torch.Generator().manual_seed(5))  # fmt: skip


FRAME_MASK = torch.tensor([[0.0, 1.0, 1.0], [0.5, 1.0, 1.0]])  # sample 1's first frame is regenerated from t=500


@pytest.fixture(scope="module")
def plain(model):
    """The uncached outputs: {"masked": with FRAME_MASK, "text": text-to-video}."""
    return {"masked": _sample(model, None, frame_mask=FRAME_MASK), "text": _sample(model, None)}


@pytest.mark.parametrize("cache", ["teacache:0", "teacache:0:open-sora-v1.2", "pab:1,1,1",
                                   PABConfig(timestep_range=(2000.0, 3000.0))])
def test_threshold_zero_reproduces_the_uncached_output_bitwise(model, plain, cache):
    stats = CacheStats()
    cached = _sample(model, cache, frame_mask=FRAME_MASK, stats=stats)
    assert torch.equal(cached, plain["masked"])
    assert stats.forwards == STEPS and stats.rows == stats.rows_computed == 2 * B * STEPS
    assert model.step_cache is None and all(b.attention_cache is None for b in model.spatial_blocks)


@pytest.mark.parametrize("cache, bound", [("teacache:0.3", 0.05), ("pab:2,3,4:0-1000", 0.25)])
def test_a_positive_threshold_skips_steps_and_stays_close(model, plain, cache, bound):
    """On random weights (no trained smoothness across steps): the bounds are loose; see
    benchmarks/bench_cache.py for the built-in model."""
    stats = CacheStats()
    out = _sample(model, cache, stats=stats)
    rel = float((out - plain["text"]).norm() / plain["text"].norm())
    if cache.startswith("teacache"):
        assert 0 < stats.rows_computed < stats.rows and stats.rows_computed % 2 == 0  # CFG halves together
        assert stats.rows_computed >= 2 * 2 * B  # first and last steps always computed
    else:
        spatial, temporal, cross = (stats.attention[k] for k in ("spatial", "temporal", "cross"))
        assert 0 < spatial[0] < spatial[1] and 0 < temporal[0] < temporal[1] and 0 < cross[0] < cross[1]
    assert 0 < rel < bound, rel


def _forward(model, x, t, y, mask, x_mask=None):
    return model(x, torch.full((x.shape[0],), t), y=y, mask=mask, x_mask=x_mask, **_model_kwargs(x.shape[0]))


@pytest.mark.parametrize("reuse", [False, True])
def test_cfg_halves_and_rows_keep_their_own_residuals(model, reuse):
    """[cond; uncond]: a skipped step with an unchanged input gives each half its own last
    output (the halves differ through the text); a row whose input changed computes alone
    (also with the per-generation text keys / values of `step_invariants`: `reuse`)."""
    z, y, mask = _inputs()
    null = model.y_embedder.y_embedding[None, None].expand(B, 1, -1, -1)
    x, yy, mm = torch.cat([z, z]), torch.cat([y, null]), torch.cat([mask, mask])
    stats = CacheStats()
    scope = model.step_invariants() if reuse and hasattr(model, "step_invariants") else nullcontext()
    config = TeaCacheConfig(0.05, "identity")
    with torch.no_grad(), scope, attach(model, config, num_steps=5, timesteps=[0] * 5, stats=stats):
        first = _forward(model, x, 800.0, yy, mm)
        again = _forward(model, x, 800.0, yy, mm)
        assert stats.rows_computed == 2 * B  # the second call skipped every row
        torch.testing.assert_close(again, first, rtol=0, atol=1e-5)
        assert not torch.allclose(first[:B], first[B:], atol=1e-3)  # cond and uncond really differ
        moved = x.clone()
        moved[1] += 0.5 * torch.randn_like(moved[1])  # one row changes a lot
        third = _forward(model, moved, 800.0, yy, mm)
        assert stats.rows_computed == 2 * B + 1
    with torch.no_grad():
        alone = _forward(model, moved[1:2], 800.0, yy[1:2], mm[1:2])
    torch.testing.assert_close(third[1:2], alone, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(third[[0, 2, 3]], first[[0, 2, 3]], rtol=0, atol=1e-5)


def test_a_changed_frame_mask_forces_a_full_step(model):
    z, y, mask = _inputs()
    before = torch.tensor([[False, True, True], [False, True, True]])
    after = torch.tensor([[False, True, True], [True, True, True]])  # sample 1's condition frame regenerated
    stats = CacheStats()
    with torch.no_grad():
        plain = _forward(model, z, 500.0, y, mask, after)
        with attach(model, TeaCacheConfig(1e6), num_steps=9, timesteps=[0] * 9, stats=stats):
            _forward(model, z, 500.0, y, mask, before)
            _forward(model, z, 500.0, y, mask, before)  # skipped: threshold 1e6
            cached = _forward(model, z, 500.0, y, mask, after)
    assert stats.rows_computed == B + 1  # step 0, then only the row whose mask changed
    assert torch.equal(cached[1], plain[1])
    stats = CacheStats()
    with torch.no_grad(), attach(model, PABConfig(8, 8, 8, (0.0, 1000.0)), num_steps=9, timesteps=[500] * 9,
                                 stats=stats):
        _forward(model, z, 500.0, y, mask, before)
        cached = _forward(model, z, 500.0, y, mask, after)
    assert torch.equal(cached, plain) and stats.attention["spatial"] == [4, 4]  # 2 blocks x 2 steps, all computed


@pytest.fixture(scope="module")
def pipe():
    return OpenSoraPipeline.from_preset(device="cpu", dtype=torch.float32, progress=False)


def test_a_fresh_state_per_clip_and_the_counts(pipe):
    """Two samples in two batches of one call equal two separate calls: nothing is carried
    from one clip to the next; the counts cover the whole call."""
    from opensora_sdk.generation import Timings

    kwargs = dict(num_steps=5, cache="teacache:0.3:identity", batch_size=1, height=32, width=32)
    both = pipe.plan(["a red circle moves left", "a blue square moves up"], seed=11, **kwargs)
    t = Timings()
    together = pipe.generate(both, latents_only=True, timings=t)
    first = pipe.generate(pipe.plan("a red circle moves left", seed=11, **kwargs), latents_only=True)
    second = pipe.generate(pipe.plan("a blue square moves up", seed=12, **kwargs), latents_only=True)
    assert torch.equal(together, torch.cat([first, second]))
    assert t.cache_stats.forwards == 10 and t.cache_stats.rows == 20 and t.cache_stats.rows_computed < 20
    assert "teacache:0.3:identity" in t.cache_stats.summary() and pipe.transformer.step_cache is None


@pytest.mark.parametrize("value", ["teacache", "teacache:fast", "teacache:-1", "pab:2,4", "pab:0,1,1", "magcache:1"])
def test_bad_cache_values_are_one_line_errors(value):
    with pytest.raises(ValueError, match="cache=.* is not allowed") as err:
        parse_cache(value)
    assert "\n" not in str(err.value)


def test_cli_bad_cache_is_one_line_before_loading(monkeypatch, tmp_path, capsys):
    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(OpenSoraPipeline, "from_preset", classmethod(refuse))
    rc = cli.main(["generate", "--prompt", "a cat", "--cache", "teacache:fast", "--save-dir", str(tmp_path)])
    err = capsys.readouterr().err.strip()
    assert rc == cli.EXIT_USAGE and len(err.splitlines()) == 1 and "--cache teacache:fast is not allowed" in err
    assert not list(tmp_path.iterdir())


def test_v11_models_refuse_a_cache_clearly():
    from opensora_sdk.families import V1_1
    from opensora_sdk.plan import _step_cache

    with pytest.raises(ValueError, match="supported for v1.2 models only"):
        _step_cache("teacache:0.1", V1_1)
    assert _step_cache("none", V1_1) is None
    with pytest.raises(ValueError, match="supported for v1.2 models"):
        with attach(torch.nn.Linear(2, 2), TeaCacheConfig(0.1), num_steps=3, timesteps=[0, 0, 0]):
            pass


def test_comfy_sampler_validates_its_cache_input():
    from comfy_nodes import latent, loaders, sampler, text

    model = loaders.load_model(loaders.BUILTIN, "fp32")
    te = loaders.load_text_encoder(loaders.BUILTIN, "fp32")
    embeds = text.OpenSoraTextEncode().encode(te, "a cat", "", 6.5, 0.0, "none")[0]
    empty = latent.OpenSoraEmptyLatentVideo().create("custom", "9:16", "custom", 32, 32, 17, 8.0, 1)[0]
    node = sampler.OpenSoraSampler()
    with pytest.raises(ValueError, match="cache='teacache:x' is not allowed"):
        node.sample(model, embeds, empty, 1, 2, 5.0, True, cache="teacache:x")
    plain = node.sample(model, embeds, empty, 1, 3, 5.0, True)[0]["samples"]
    exact = node.sample(model, embeds, empty, 1, 3, 5.0, True, cache="teacache:0")[0]["samples"]
    assert torch.equal(plain, exact)


def test_auto_coefficients_follow_the_model_size():
    from types import SimpleNamespace

    from opensora_sdk.step_cache import BUILTIN_COEFFICIENTS, OPEN_SORA_V1_2_COEFFICIENTS, TeaCacheState

    def sized(hidden, depth, caption):
        return SimpleNamespace(config=SimpleNamespace(hidden_size=hidden, depth=depth, caption_channels=caption))

    auto = TeaCacheConfig(0.1)
    assert auto.polynomial(sized(1152, 28, 4096)) == OPEN_SORA_V1_2_COEFFICIENTS  # STDiT3-XL/2
    assert auto.polynomial(sized(128, 4, 64)) == BUILTIN_COEFFICIENTS
    assert auto.polynomial(sized(64, 2, 32)) == (1.0, 0.0)  # any other size: no rescaling
    assert TeaCacheConfig(0.1, "identity").polynomial(sized(1152, 28, 4096)) == (1.0, 0.0)
    custom = TeaCacheConfig(0.1, (2, 0, 1))
    assert custom.spec == "teacache:0.1:custom" and custom.polynomial(None) == (2.0, 0.0, 1.0)
    assert TeaCacheState(custom, custom.polynomial(None), 5, CacheStats()).rescale(3.0) == 19.0


def test_app_step_cache_box_reaches_the_plan(pipe):
    from opensora_sdk.app import Request, call_arguments

    prompt = "a red circle moves left"
    for box, expected in (("teacache:0.2", TeaCacheConfig(0.2)), ("pab", PABConfig()), ("none", None)):
        plan = pipe.plan(prompt, **call_arguments(pipe, Request(prompt=prompt, cache=box), prompt))
        assert plan.cache == expected
    with pytest.raises(ValueError, match="cache='fast' is not allowed"):
        pipe.plan(prompt, **call_arguments(pipe, Request(prompt=prompt, cache="fast"), prompt))
