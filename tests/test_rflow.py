"""Rectified flow: schedule and warp against their closed forms and the official goldens."""

from __future__ import annotations

import math

import pytest
import torch

from opensora_sdk.schedulers import RectifiedFlow, add_noise, mean_flat, sampling_timesteps, timestep_transform


def _closed_form_warp(t: float, h: float, w: float, n: int, scale: float = 1.0) -> float:
    frames = 1 if n == 1 else max(1, n // 17 * 5)
    r = math.sqrt(h * w / 512**2) * math.sqrt(frames) * scale
    s = t / 1000
    return 1000 * r * s / (1 + (r - 1) * s)


# ---- closed forms --------------------------------------------------------------------------


def test_sampling_timesteps_closed_form():
    ts = sampling_timesteps(30)
    assert len(ts) == 30
    assert ts[0] == 1000.0 and 0.0 not in ts
    assert ts == pytest.approx([1000 * (1 - i / 30) for i in range(30)])
    assert sampling_timesteps(3, use_discrete_timesteps=True) == [1000.0, 667.0, 333.0]
    with pytest.raises(ValueError, match="num_sampling_steps"):
        sampling_timesteps(0)


@pytest.mark.parametrize("h,w,n", [(240, 426, 51), (720, 1280, 102), (512, 512, 1), (144, 256, 204)])
def test_warp_matches_closed_form(h, w, n):
    t = torch.tensor([1000.0, 800.0, 500.0, 123.4, 10.0, 0.0])
    out = timestep_transform(t, h, w, n)
    expected = [_closed_form_warp(v, h, w, n) for v in t.tolist()]
    assert out.dtype == torch.float32
    assert out.tolist() == pytest.approx(expected, rel=1e-5, abs=1e-3)


def test_warp_fixed_points_and_monotone():
    t = torch.linspace(0, 1000, 101)
    out = timestep_transform(t, 720, 1280, 102)
    assert out[0] == 0 and out[-1] == 1000
    assert bool((out[1:] > out[:-1]).all())
    assert bool((out >= t - 1e-3).all())  # r > 1 pushes towards noise


def test_appendix_a_bf16_values():
    rf = RectifiedFlow(official_bf16=True)
    ts = [float(t[0]) for t in rf.timesteps(1, height=240, width=426, num_frames=51)]
    assert ts[:6] == pytest.approx([1000, 985.962, 971.352, 956.134, 940.271, 923.719], abs=1e-3)
    assert ts[-4:] == pytest.approx([271.454, 212.038, 147.479, 77.076], abs=1e-3)
    ts = [float(t[0]) for t in rf.timesteps(1, height=720, width=1280, num_frames=102)]
    assert ts[1] == pytest.approx(996.647, abs=1e-3) and ts[-1] == pytest.approx(261.146, abs=1e-3)


def test_bf16_option_changes_ratio():
    t = torch.tensor([500.0])
    f32 = timestep_transform(t, 720, 1280, 102)
    bf16 = timestep_transform(t, 720, 1280, 102, official_bf16=True)
    r32, rbf = 10.2698, 10.25  # spec section 1
    assert float(f32) == pytest.approx(1000 * r32 * 0.5 / (1 + (r32 - 1) * 0.5), abs=1e-2)
    assert float(bf16) == pytest.approx(1000 * rbf * 0.5 / (1 + (rbf - 1) * 0.5), abs=1e-3)


# ---- degenerate 2..16-frame warp -------------------------------------------------------------


def test_degenerate_warp_official_reproduces_failure():
    t = torch.tensor([1000.0, 500.0, 0.0])
    out = timestep_transform(t, 240, 426, 16, degenerate_warp="official")
    assert math.isnan(out[0]) and out[1:].tolist() == [0.0, 0.0]
    # a mixed batch: only element 0 is checked for images, so the image row collapses too
    t2, frames = torch.tensor([400.0, 400.0]), torch.tensor([51.0, 1.0])
    mixed = timestep_transform(t2, 240, 426, frames, degenerate_warp="official")
    assert mixed[1] == 0


def test_degenerate_warp_default_clamps_to_image_warp():
    t = torch.tensor([1000.0, 500.0, 0.0])
    for n in (2, 9, 16):
        out = timestep_transform(t, 240, 426, n)
        assert out.tolist() == pytest.approx(timestep_transform(t, 240, 426, 1).tolist())
        assert not torch.isnan(out).any() and out[1] > 0
    mixed = timestep_transform(torch.tensor([400.0, 400.0]), 240, 426, torch.tensor([51.0, 1.0]))
    assert float(mixed[1]) == pytest.approx(_closed_form_warp(400, 240, 426, 1), rel=1e-5)
    assert float(mixed[0]) == pytest.approx(_closed_form_warp(400, 240, 426, 51), rel=1e-5)


def test_degenerate_warp_raise():
    with pytest.raises(ValueError, match=r"num_frames=\[16\]"):
        timestep_transform(torch.tensor([500.0]), 240, 426, 16, degenerate_warp="raise")
    assert float(timestep_transform(torch.tensor([500.0]), 240, 426, 17, degenerate_warp="raise")) > 500
    with pytest.raises(ValueError, match="degenerate_warp"):
        RectifiedFlow(degenerate_warp="ignore")


def test_default_scheduler_denoises_short_clips():
    ts = RectifiedFlow(num_sampling_steps=5).timesteps(1, height=240, width=426, num_frames=8)
    values = [float(t[0]) for t in ts]
    assert values[0] == 1000 and all(v > 0 for v in values)
    assert values == sorted(values, reverse=True)


# ---- goldens ------------------------------------------------------------------------------


def test_warp_golden_grid(golden):
    g = golden("timestep_transform")
    t = g["in.t"]
    for case in g.meta["cases"]:
        h, w, n = case["height"], case["width"], case["num_frames"]
        for key, bf16 in (("out_f32kwargs", False), ("out_bf16kwargs", True)):
            out = timestep_transform(t, h, w, n, official_bf16=bf16, degenerate_warp="official")
            ref = g[f"{case['case']}.{key}"]
            assert torch.equal(torch.isnan(out), torch.isnan(ref)), (case, key)
            torch.testing.assert_close(out.nan_to_num(), ref.nan_to_num(), rtol=0, atol=0, msg=f"{case} {key}")


def test_warp_golden_mixed_batch_and_scale(golden):
    g = golden("timestep_transform")
    args = (g["mixed.t"], g["mixed.height"], g["mixed.width"], g["mixed.num_frames"])
    for scale, key in ((1.0, "mixed.out_scale1"), (2.5, "mixed.out_scale2.5")):
        out = timestep_transform(*args, scale=scale, degenerate_warp="official")
        torch.testing.assert_close(out, g[key], rtol=0, atol=1e-4)
    rf = RectifiedFlow(transform_scale=2.5, degenerate_warp="official")
    torch.testing.assert_close(rf.timestep_transform(*args), g["mixed.out_scale2.5"], rtol=0, atol=1e-4)


def test_sampler_schedule_golden(golden):
    g = golden("rflow_sample")
    sched = g.meta["scheduler"]
    rf = RectifiedFlow(num_sampling_steps=sched["num_sampling_steps"])
    ts = rf.timesteps(2, height=g["in.args.height"], width=g["in.args.width"], num_frames=g["in.args.num_frames"])
    for i, t in enumerate(ts):
        torch.testing.assert_close(torch.cat([t, t]), g[f"step.{i:02d}.t"], rtol=0, atol=1e-5)


# ---- forward process and training loss ---------------------------------------------------------


def test_add_noise_endpoints_and_midpoint():
    x0, eps = torch.randn(2, 4, 3, 2, 2), torch.randn(2, 4, 3, 2, 2)
    assert torch.equal(add_noise(x0, eps, torch.zeros(2)), x0)
    torch.testing.assert_close(add_noise(x0, eps, torch.full((2,), 1000.0)), eps)
    mid = add_noise(x0, eps, torch.tensor([250.0, 750.0]))
    torch.testing.assert_close(mid[0], 0.75 * x0[0] + 0.25 * eps[0])
    torch.testing.assert_close(mid[1], 0.25 * x0[1] + 0.75 * eps[1])


def test_sample_training_timesteps_methods():
    rf = RectifiedFlow(use_timestep_transform=False)
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    logit = rf.sample_training_timesteps(4096, generator=g1)
    expected = torch.sigmoid(torch.randn(4096, generator=g2)) * 1000
    torch.testing.assert_close(logit, expected)
    uni = rf.sample_training_timesteps(4096, method="uniform", generator=torch.Generator().manual_seed(0))
    assert 0 <= float(uni.min()) and float(uni.max()) < 1000 and abs(float(uni.mean()) - 500) < 20
    disc = RectifiedFlow(use_discrete_timesteps=True, use_timestep_transform=False).sample_training_timesteps(64)
    assert torch.equal(disc, disc.round())
    warped = RectifiedFlow(sample_method="uniform").sample_training_timesteps(
        8, generator=torch.Generator().manual_seed(1), height=720, width=1280, num_frames=102
    )
    raw = torch.rand(8, generator=torch.Generator().manual_seed(1)) * 1000
    torch.testing.assert_close(warped, timestep_transform(raw, 720, 1280, 102))
    with pytest.raises(ValueError, match="height"):
        RectifiedFlow().sample_training_timesteps(2)
    with pytest.raises(ValueError, match="method"):
        rf.sample_training_timesteps(2, method="cosine")


def test_training_loss_target_and_mask():
    rf = RectifiedFlow(use_timestep_transform=False)
    x0, eps = torch.randn(2, 4, 3, 2, 2), torch.randn(2, 4, 3, 2, 2)
    t = torch.tensor([300.0, 700.0])
    mask = torch.tensor([[False, True, True], [True, True, True]])
    seen = {}

    def model(x, t_in, **kw):
        seen.update(x=x, t=t_in, **kw)
        return torch.cat([x0 - eps + 1.0, torch.zeros_like(x0)], 1)  # velocity off by exactly 1

    loss = rf.training_loss(model, x0, {"fps": 24}, mask=mask, t=t, noise=eps)
    torch.testing.assert_close(loss, torch.ones(2))
    assert torch.equal(seen["x_mask"], mask) and seen["fps"] == 24
    torch.testing.assert_close(seen["x"][0, :, 0], x0[0, :, 0])  # condition frame stays clean
    torch.testing.assert_close(seen["x"][0, :, 1], 0.7 * x0[0, :, 1] + 0.3 * eps[0, :, 1])

    def model2(x, t_in, **kw):  # error only on frame 0 of sample 0, which the mask excludes
        out = (x0 - eps).clone()
        out[0, :, 0] += 5.0
        return out

    torch.testing.assert_close(rf.training_loss(model2, x0, mask=mask, t=t, noise=eps), torch.zeros(2))
    unmasked = rf.training_loss(model2, x0, t=t, noise=eps)
    assert float(unmasked[0]) == pytest.approx(25.0 / 3) and float(unmasked[1]) == 0


def test_training_loss_seeded():
    rf = RectifiedFlow()
    x0 = torch.randn(2, 4, 3, 2, 2)
    kw = {
        "height": torch.tensor([240.0, 240.0]),
        "width": torch.tensor([426.0, 426.0]),
        "num_frames": torch.tensor([51.0, 51.0]),
    }

    def model(x, t, **k):
        return x * 0.5 + t.reshape(-1, 1, 1, 1, 1) / 1000

    a = rf.training_loss(model, x0, kw, generator=torch.Generator().manual_seed(9))
    b = rf.training_loss(model, x0, kw, generator=torch.Generator().manual_seed(9))
    c = rf.training_loss(model, x0, kw, generator=torch.Generator().manual_seed(10))
    assert torch.equal(a, b) and not torch.equal(a, c) and a.shape == (2,)


def test_mean_flat_shapes():
    x = torch.arange(2 * 1 * 3 * 1 * 2, dtype=torch.float32).reshape(2, 1, 3, 1, 2)
    assert mean_flat(x).tolist() == pytest.approx([2.5, 8.5])
    mask = torch.tensor([[True, False, False], [False, False, True]])
    assert mean_flat(x, mask).tolist() == pytest.approx([0.5, 10.5])
    with pytest.raises(ValueError, match="mask must be"):
        mean_flat(x, mask[:, :2])
