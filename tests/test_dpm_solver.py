"""DPM-Solver++(2M) (v1.0 fast sampler): golden replay per model call, the schedule in closed form."""

from __future__ import annotations

import pytest
import torch

from opensora_sdk.sampling import SamplingInterrupted
from opensora_sdk.schedulers.dpm_solver import (
    DPMSolver,
    NoiseScheduleVP,
    interpolate,
    sample_dpm_solver,
)
from opensora_sdk.schedulers.iddpm import linear_betas

REL_TOL = 1e-5  # relative to max(1, max|golden|): |out| ~ 1e3 with random weights


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / max(1.0, b.abs().max().item())).item()


def test_golden_replay_per_model_call(golden):
    g = golden("dpms_sample")
    B = g["in.y"].shape[0]
    solver = DPMSolver(num_sampling_steps=g.meta["scheduler"]["steps"])
    assert torch.equal(torch.randn(g["noise.00"].shape, generator=torch.Generator().manual_seed(500)), g["noise.00"])
    y_null = g["sd.y_embedder.y_embedding"][None, None].expand_as(g["in.y"])
    errors = []

    def replay(x, t, *, y, mask, x_mask, **kw):
        p = f"step.{len(errors):02d}."
        errors.append(rel_err(x, g[p + "z_in"]))
        assert torch.equal(t, g[p + "t_model"]), (p, t)  # (t - 1/1000) * 1000, float32
        assert torch.equal(y[:B], y_null) and torch.equal(y[B:], g["in.y"])  # [uncond; cond]
        assert torch.equal(mask, g["in.mask"].repeat(2, 1)) and x_mask is None
        return g[p + "model_out"]

    out = sample_dpm_solver(
        replay, g["noise.00"], solver, y=g["in.y"], y_null=y_null, y_mask=g["in.mask"],
        guidance_scale=g.meta["scheduler"]["cfg_scale"],
    )  # fmt: skip
    assert len(errors) == 5 and max(errors) < REL_TOL, errors
    assert rel_err(out, g["out"]) < REL_TOL


def test_schedule_matches_the_discrete_process():
    betas = linear_betas(1000)
    ns = NoiseScheduleVP.from_betas(betas)
    abar = torch.cumprod(1 - betas, 0)
    knots = torch.tensor([1e-3, 0.5, 1.0])
    idx = [0, 499, 999]
    torch.testing.assert_close(ns.marginal_log_mean_coeff(knots), (0.5 * abar[idx].log()).float())
    t = torch.linspace(1e-3, 1.0, 37)
    alpha, sigma = ns.marginal_alpha(t), ns.marginal_std(t)
    torch.testing.assert_close(alpha**2 + sigma**2, torch.ones_like(t))
    torch.testing.assert_close(ns.marginal_lambda(t), (alpha / sigma).log(), rtol=1e-5, atol=1e-5)
    # linear between knots, linear extrapolation outside
    xp, yp = torch.tensor([0.0, 1.0, 3.0]), torch.tensor([1.0, 3.0, 2.0])
    torch.testing.assert_close(interpolate(torch.tensor([-1.0, 0.5, 2.0, 4.0]), xp, yp), torch.tensor([-1.0, 2.0, 2.5, 1.5]))
    torch.testing.assert_close(ns.model_time(torch.tensor([1.0, 1e-3])), torch.tensor([999.0, 0.0]))


def test_timesteps_and_orders():
    s5 = DPMSolver(num_sampling_steps=5)
    torch.testing.assert_close(s5.timesteps(), torch.linspace(1.0, 1e-3, 6))
    assert s5.step_orders() == [1, 2, 2, 2, 1]  # warm-up, then lower_order_final below 10 steps
    assert DPMSolver(num_sampling_steps=12).step_orders() == [1] + [2] * 11
    assert DPMSolver(num_sampling_steps=3, order=1).step_orders() == [1, 1, 1]
    with pytest.raises(ValueError, match="order"):
        DPMSolver(num_sampling_steps=5, order=3)
    with pytest.raises(ValueError, match="num_sampling_steps"):
        DPMSolver(num_sampling_steps=1)


def point_model(x0_star, ns: NoiseScheduleVP):
    """The exact eps for data at x0_star: eps = (x - alpha_t x0*) / sigma_t, t from the model time."""

    def model(x, t, *, y=None, mask=None, x_mask=None, **kw):
        t_cont = t / 1000.0 + 1.0 / ns.total_n
        a = ns.marginal_alpha(t_cont).reshape(-1, 1, 1, 1, 1)
        s = ns.marginal_std(t_cont).reshape(-1, 1, 1, 1, 1)
        eps = (x - a * x0_star.repeat(x.shape[0] // x0_star.shape[0], 1, 1, 1, 1)) / s
        return torch.cat([eps, torch.full_like(eps, 1e6)], 1)  # the variance channels are ignored

    return model


@pytest.mark.parametrize("steps", [5, 12])
def test_exact_for_a_point_mass(steps):
    # with x0 constant the data-prediction ODE is solved exactly by every DPM-Solver++ order:
    # x_t / sigma_t = x_1 / sigma_1 + (e^lambda_t - e^lambda_1) x0*
    solver = DPMSolver(num_sampling_steps=steps)
    ns = solver.schedule
    gen = torch.Generator().manual_seed(0)
    x0_star = torch.randn(2, 4, 2, 3, 3, generator=gen)
    z = torch.randn(x0_star.shape, generator=gen)
    y = torch.randn(2, 1, 3, 5, generator=gen)
    out = sample_dpm_solver(point_model(x0_star, ns), z, solver, y=y, y_null=torch.zeros_like(y), guidance_scale=4.5)
    t0, t1 = torch.tensor([1e-3]), torch.tensor([1.0])
    sigma0, sigma1 = ns.marginal_std(t0), ns.marginal_std(t1)
    lam0, lam1 = ns.marginal_lambda(t0), ns.marginal_lambda(t1)
    expect = sigma0 * (z / sigma1 + (lam0.exp() - lam1.exp()) * x0_star)
    torch.testing.assert_close(out, expect, rtol=1e-4, atol=1e-4)


def test_guidance_order_and_no_guidance():
    solver = DPMSolver(num_sampling_steps=3)
    z = torch.randn(2, 4, 1, 2, 2)
    y = torch.randn(2, 1, 3, 5)
    seen = []

    def model(x, t, *, y, mask, x_mask, **kw):
        seen.append((x.shape[0], kw["height"].shape[0]))
        # eps = 0.1 x + mean(y): cond and uncond differ through y
        return torch.cat([0.1 * x + y.mean(dim=(1, 2, 3)).reshape(-1, 1, 1, 1, 1), torch.zeros_like(x)], 1)

    kw = {"height": torch.tensor([64.0, 64.0])}
    guided = sample_dpm_solver(model, z, solver, y=y, y_null=torch.zeros_like(y), guidance_scale=3.0, model_kwargs=kw)
    assert seen == [(4, 4)] * 3
    # the same as an unguided run on the guided eps uncond + 3 * (cond - uncond) = 0.1 x + 3 mean(y)
    seen.clear()
    plain = sample_dpm_solver(model, z, solver, y=3.0 * y, model_kwargs=kw)
    assert seen == [(2, 2)] * 3
    torch.testing.assert_close(guided, plain, rtol=1e-5, atol=1e-5)


def test_callback_and_interruption():
    solver = DPMSolver(num_sampling_steps=4)
    z = torch.randn(1, 4, 1, 2, 2)
    x0_star = torch.zeros_like(z)
    model = point_model(x0_star, solver.schedule)
    calls, records = [], []

    def counting(x, t, **kw):
        calls.append(t[0].item())
        return model(x, t, **kw)

    sample_dpm_solver(counting, z, solver, y=torch.zeros(1, 1, 1, 1), callback=lambda *a: records.append(a[:2]))
    assert len(calls) == 4 and records == [(i, 4) for i in range(4)]  # one call per step, the end not evaluated
    calls.clear()
    with pytest.raises(SamplingInterrupted) as info:
        sample_dpm_solver(counting, z, solver, y=torch.zeros(1, 1, 1, 1), callback=lambda s, *a: s < 1)
    assert info.value.step == 1 and len(calls) == 2  # stopped before evaluating the next model call
