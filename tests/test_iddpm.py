"""IDDPM (v1.0 / v1.1): golden replay per step, schedules in closed form, CFG channels, masks, the loss."""

from __future__ import annotations

import math

import pytest
import torch

from opensora_sdk.sampling import SamplingInterrupted
from opensora_sdk.schedulers.iddpm import (
    IDDPM,
    diffusion_tables,
    discretized_gaussian_log_likelihood,
    guided_output,
    linear_betas,
    normal_kl,
    sample_iddpm,
    space_timesteps,
)

# |out| ~ 1e3 with random weights: errors are measured relative to max(1, max|golden|)
REL_TOL = 1e-5

# bundle -> (table dtype, seed of the official run, index of the first per-step draw)
BUNDLES = {
    "iddpm_sample": (torch.float32, 400, 0),  # v1.1: z given, 10 step draws
    "iddpm_sample_v10": (torch.float64, 402, 1),  # v1.0: z = noise.00 drawn inside, then 10 step draws
}


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / max(1.0, b.abs().max().item())).item()


class Replay:
    """Checks each model call against step.NN.* and returns the recorded raw output."""

    def __init__(self, g):
        self.g, self.calls, self.errors = g, 0, []

    def __call__(self, x, t, *, y, mask, x_mask, **kwargs):
        p = f"step.{self.calls:02d}."
        self.errors.append(rel_err(x, self.g[p + "z_in"]))
        assert torch.equal(t, self.g[p + "t_model"]), (p, t, self.g[p + "t_model"])
        assert x_mask is None
        assert torch.equal(y[:2], self.g["in.y"]) and torch.equal(mask[2:], self.g["in.mask"])  # [cond; null], one mask
        self.calls += 1
        return self.g[p + "model_out"]


def _run(g, table_dtype, **kw):
    B = g["in.y"].shape[0]
    z = g["in.z"] if "in.z" in g else g["noise.00"]
    diffusion = IDDPM(num_sampling_steps=g.meta["scheduler"]["steps"], table_dtype=table_dtype)
    model = Replay(g)
    records = []

    def callback(step, total, latent, denoised):
        assert total == diffusion.num_steps and latent.shape == z.shape
        records.append(
            (
                rel_err(latent, g[f"step.{step:02d}.sample"][:B]),
                rel_err(denoised, g[f"step.{step:02d}.pred_xstart"][:B]),
            )
        )

    y_null = g["sd.y_embedder.y_embedding"][None, None].expand_as(g["in.y"])
    out = sample_iddpm(
        model,
        z,
        diffusion,
        y=g["in.y"],
        y_null=y_null,
        y_mask=g["in.mask"],
        guidance_scale=g.meta["scheduler"]["cfg_scale"],
        callback=callback,
        **kw,
    )
    return out, model, records


@pytest.mark.parametrize("name", sorted(BUNDLES))
def test_golden_replay_per_step_with_recorded_noise(golden, name):
    g = golden(name)
    dtype, _, first = BUNDLES[name]
    assert torch.equal(IDDPM(num_sampling_steps=10).timestep_map, g["in.timestep_map"])
    out, model, records = _run(g, dtype, noise_sampler=lambda i, like: g[f"noise.{i + first:02d}"])
    assert model.calls == 10 and len(records) == 10
    assert max(model.errors) < REL_TOL, model.errors  # the chain state fed to the model
    for step, (sample_err, x0_err) in enumerate(records):
        assert sample_err < REL_TOL and x0_err < REL_TOL, (step, sample_err, x0_err)
    assert rel_err(out, g["out"]) < REL_TOL


@pytest.mark.parametrize("name", sorted(BUNDLES))
def test_golden_generator_reproduces_official_draws(golden, name):
    g = golden(name)
    dtype, seed, first = BUNDLES[name]
    gen = torch.Generator().manual_seed(seed)
    seen = []

    def spy(i, like):  # the official chain is [z; z]: every draw has 2B rows
        seen.append(like.shape)
        return torch.randn(like.shape, generator=gen)

    if first:  # v1.0 draws z inside the call first; the caller draws it here from the same generator
        z = torch.randn(g["noise.00"].shape, generator=gen)
        assert torch.equal(z, g["noise.00"])
    out, _, _ = _run(g, dtype, noise_sampler=spy)
    assert seen == [g[f"noise.{first:02d}"].shape] * 10
    assert rel_err(out, g["out"]) < REL_TOL
    # and the plain generator path gives the same draws
    gen = torch.Generator().manual_seed(seed)
    if first:
        torch.randn(g["noise.00"].shape, generator=gen)
    out2, _, _ = _run(g, dtype, generator=gen)
    assert torch.equal(out, out2)


def test_each_bundle_needs_its_own_table_precision(golden):
    # float32 tables (v1.1) and float64 tables (v1.0) differ by ~1.7e-4 relative at the last step
    for name, (dtype, _, first) in BUNDLES.items():
        g = golden(name)
        other = torch.float64 if dtype == torch.float32 else torch.float32
        out, _, _ = _run(g, other, noise_sampler=lambda i, like, g=g, first=first: g[f"noise.{i + first:02d}"])
        assert rel_err(out, g["out"]) > 10 * REL_TOL, name


# ---- schedules in closed form ------------------------------------------------------------------


def test_linear_betas_and_respacing_indices():
    betas = linear_betas(1000)
    assert betas.dtype == torch.float64 and betas[0].item() == 1e-4 and betas[-1].item() == 0.02
    torch.testing.assert_close(betas[1:] - betas[:-1], torch.full((999,), (0.02 - 1e-4) / 999, dtype=torch.float64))
    assert space_timesteps(1000, 100)[:10] == [0, 10, 20, 30, 40, 50, 61, 71, 81, 91]
    assert space_timesteps(1000, "100")[-1] == 999 and len(space_timesteps(1000, 100)) == 100
    assert space_timesteps(1000, 10) == [0, 111, 222, 333, 444, 555, 666, 777, 888, 999]
    assert space_timesteps(100, "3,2") == [0, 24, 49, 50, 99]  # two sections of 50 steps
    assert space_timesteps(1000, "") == list(range(1000))
    with pytest.raises(ValueError, match="DDIM"):
        space_timesteps(1000, "ddim50")


def test_respaced_tables_telescope_to_the_base_schedule():
    base = linear_betas(1000)
    abar = torch.cumprod(1 - base, 0)
    kept = space_timesteps(1000, 10)
    tab = diffusion_tables(base, kept, torch.float64)
    # prod of the new alphas up to k = abar[tau_k]: respacing keeps the marginals q(x_tau | x_0)
    torch.testing.assert_close(tab.alphas_cumprod, abar[kept], rtol=1e-12, atol=0)
    # all steps kept: the base process itself
    full = diffusion_tables(base, range(1000), torch.float64)
    torch.testing.assert_close(full.betas, base, rtol=1e-9, atol=0)
    # float32 tables are the float32 computation, not a cast of the float64 one
    tab32 = diffusion_tables(base, kept, torch.float32)
    assert tab32.posterior_mean_coef1.dtype == torch.float32
    assert not torch.equal(tab32.posterior_mean_coef1, tab.posterior_mean_coef1.float())


def test_posterior_is_the_gaussian_product():
    # q(x_{t-1} | x_t, x_0) ∝ N(x_t; sqrt(a_t) x_{t-1}, b_t) N(x_{t-1}; sqrt(abar_{t-1}) x_0, 1 - abar_{t-1})
    d = IDDPM(num_sampling_steps=20, table_dtype=torch.float64)
    tab = d.tables
    gen = torch.Generator().manual_seed(0)
    x0, xt = torch.randn(2, 1, 4, generator=gen, dtype=torch.float64).unbind(0)
    for k in (1, 7, 19):
        b, ab_prev = tab.betas[k], tab.alphas_cumprod_prev[k]
        precision = 1 / (1 - ab_prev) + (1 - b) / b
        var = 1 / precision
        mean = var * (ab_prev.sqrt() * x0 / (1 - ab_prev) + (1 - b).sqrt() * xt / b)
        t = torch.tensor([k])
        m, v, log_v = IDDPM.q_posterior(tab, x0[None].float(), xt[None].float(), t)
        torch.testing.assert_close(m[0].double(), mean, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(v.flatten()[0].double(), var, rtol=1e-6, atol=0)
        torch.testing.assert_close(log_v.flatten()[0].double(), var.log(), rtol=1e-6, atol=0)
    # the clipped log-variance at k = 0 (posterior variance 0) takes the k = 1 value
    assert tab.posterior_variance[0] == 0 and tab.posterior_log_variance_clipped[0] == tab.posterior_variance[1].log()


def test_learned_range_variance_and_x0_prediction():
    d = IDDPM(num_sampling_steps=10)
    tab = d.tables
    gen = torch.Generator().manual_seed(1)
    x0 = torch.randn(2, 4, 2, 3, 3, generator=gen)
    noise = torch.randn(x0.shape, generator=gen)
    t = torch.tensor([3, 8])
    xt = IDDPM.q_sample(tab, x0, t, noise)
    for v, expect in ((1.0, tab.log_betas), (-1.0, tab.posterior_log_variance_clipped)):
        out = IDDPM.p_mean_variance(tab, torch.cat([noise, torch.full_like(noise, v)], 1), xt, t)
        torch.testing.assert_close(out["log_variance"][:, 0, 0, 0, 0], expect[t].float())
        torch.testing.assert_close(out["pred_xstart"], x0, rtol=0, atol=2e-5)  # the true eps recovers x0
        mean, _, _ = IDDPM.q_posterior(tab, x0, xt, t)
        torch.testing.assert_close(out["mean"], mean, rtol=0, atol=2e-5)
    with pytest.raises(ValueError, match="learned-sigma"):
        IDDPM.p_mean_variance(tab, noise, xt, t)


def test_guidance_touches_only_the_first_cfg_channels():
    gen = torch.Generator().manual_seed(2)
    cond, uncond = torch.randn(2, 2, 8, 1, 2, 2, generator=gen).unbind(0)
    out = guided_output(torch.cat([cond, uncond]), 7.0, 3)
    torch.testing.assert_close(out[:, :3], uncond[:, :3] + 7.0 * (cond[:, :3] - uncond[:, :3]))
    assert torch.equal(out[:, 3:], cond[:, 3:])  # eps channel 3 and every variance channel: conditional
    all4 = guided_output(torch.cat([cond, uncond]), 7.0, 4)
    torch.testing.assert_close(all4[:, :4], uncond[:, :4] + 7.0 * (cond[:, :4] - uncond[:, :4]))
    assert IDDPM().cfg_channel == 3


# ---- the sampling loop -----------------------------------------------------------------------


def point_model(x0_star: torch.Tensor, diffusion: IDDPM, v: float = 0.0):
    """The exact eps for data concentrated at x0_star: eps = (x - sqrt(abar) x0*) / sqrt(1 - abar)."""
    abar_full = torch.cumprod(1 - linear_betas(diffusion.diffusion_steps), 0)

    def model(x, t, *, y=None, mask=None, x_mask=None, **kw):
        abar = abar_full[t].reshape(-1, 1, 1, 1, 1)
        eps = ((x.double() - abar.sqrt() * x0_star.double()) / (1 - abar).sqrt()).float()
        return torch.cat([eps, torch.full_like(eps, v)], 1)

    return model


def test_chain_converges_to_a_point_mass():
    # with the exact eps, x0_hat = x0* at every step and the last step (coef1 = 1, coef2 = 0) returns it
    gen = torch.Generator().manual_seed(3)
    x0_star = torch.randn(2, 4, 2, 3, 3, generator=gen)
    z = torch.randn(x0_star.shape, generator=gen)
    for dtype, tol in ((torch.float64, 1e-5), (torch.float32, 1e-3)):
        d = IDDPM(num_sampling_steps=25, table_dtype=dtype)
        denoised = []
        out = sample_iddpm(
            point_model(x0_star, d, v=0.3), z, d, y=torch.zeros(2, 1, 1, 1), generator=gen,
            callback=lambda s, n, lat, x0, denoised=denoised: denoised.append(x0),
        )  # fmt: skip
        torch.testing.assert_close(denoised[0], x0_star, rtol=0, atol=1e-3)
        # float32 tables (v1.1): coef1 at k = 0 is 1 - O(1e-4) (1 - abar_0 ~ 1e-4 in float32)
        torch.testing.assert_close(out, x0_star, rtol=tol, atol=tol)
    assert not torch.equal(d.tables.posterior_mean_coef1[0], torch.tensor(1.0))


def test_draws_seeding_and_no_guidance_batch():
    d = IDDPM(num_sampling_steps=6)
    z = torch.randn(2, 4, 2, 2, 2)
    y = torch.randn(2, 1, 3, 5)
    shapes, batches = [], []

    def spy_model(x, t, **kw):
        batches.append((x.shape[0], t.dtype, kw["y"].shape[0]))
        return torch.cat([x * 0.1, torch.zeros_like(x)], 1)

    def spy_noise(i, like):
        shapes.append((i, like.shape[0]))
        return torch.zeros_like(like)

    sample_iddpm(spy_model, z, d, y=y, noise_sampler=spy_noise)
    assert shapes == [(i, 2) for i in range(6)] and batches == [(2, torch.int64, 2)] * 6
    shapes.clear()
    batches.clear()
    sample_iddpm(spy_model, z, d, y=y, y_null=torch.zeros_like(y), noise_sampler=spy_noise)
    assert shapes == [(i, 4) for i in range(6)] and batches == [(4, torch.int64, 4)] * 6

    run = lambda seed: sample_iddpm(spy_model, z, d, y=y, y_null=y, generator=torch.Generator().manual_seed(seed))
    a, b, c = run(5), run(5), run(6)
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_callback_stops_with_sampling_interrupted():
    d = IDDPM(num_sampling_steps=5)
    z = torch.randn(1, 4, 1, 2, 2)
    model = point_model(torch.zeros_like(z), d)
    steps = []

    def stop_after_two(step, total, latent, denoised):
        steps.append((step, total))
        return step < 1

    with pytest.raises(SamplingInterrupted) as info:
        sample_iddpm(model, z, d, y=torch.zeros(1, 1, 1, 1), callback=stop_after_two)
    assert steps == [(0, 5), (1, 5)] and info.value.step == 1 and info.value.latent.shape == z.shape

    def raising(step, total, latent, denoised):
        raise SamplingInterrupted(message="user cancel")

    with pytest.raises(SamplingInterrupted, match="user cancel") as info:
        sample_iddpm(model, z, d, y=torch.zeros(1, 1, 1, 1), callback=raising)
    assert info.value.step == 0


def test_frame_mask_renoise_restore_and_x_mask():
    # K = 4, frame_mask [0, 1, 0.5] -> mask_k = [0, 4, 2]
    d = IDDPM(num_sampling_steps=4)
    gen = torch.Generator().manual_seed(4)
    z = torch.randn(1, 4, 3, 2, 2, generator=gen)
    y = torch.randn(1, 1, 2, 3, generator=gen)
    x_masks, inputs, draws = [], [], []

    def model(x, t, *, y, mask, x_mask, **kw):
        x_masks.append(x_mask.clone())
        inputs.append(x[:1].clone())
        return torch.cat([x * 0.5, torch.zeros_like(x)], 1)

    def noise(i, like):
        draws.append(i)
        return torch.full(like.shape, 2.0)

    frame_mask = torch.tensor([[0.0, 1.0, 0.5]])
    out = sample_iddpm(model, z, d, y=y, y_null=torch.zeros_like(y), frame_mask=frame_mask, noise_sampler=noise)
    assert draws == list(range(8))  # per step: the re-noising draw, then the step draw
    assert [m[0].tolist() for m in x_masks] == [
        [False, True, False],  # k = 3
        [False, True, False],  # k = 2: mask_k == k is re-noised, not yet generated
        [False, True, True],  # k = 1
        [False, True, True],  # k = 0
    ]
    assert all(torch.equal(m[0], m[1]) for m in x_masks)  # same flags for both CFG halves
    # the condition frame is restored after every step k > 0 (mask_k = 0 < k) ...
    for step in range(3):
        assert torch.equal(inputs[step][0, :, 0], z[0, :, 0])
    # ... and at k = 0 it is re-noised to level 0 before the model sees it (spec 5.3, literal)
    tab = d.tables
    renoised = tab.sqrt_alphas_cumprod[0] * z[0, :, 0] + tab.sqrt_one_minus_alphas_cumprod[0] * 2.0
    torch.testing.assert_close(inputs[3][0, :, 0], renoised)
    # frame 2 (edit ratio 0.5) is kept until k = 2, where it is noised from its clean value once
    assert torch.equal(inputs[0][0, :, 2], z[0, :, 2])
    expect = tab.sqrt_alphas_cumprod[2] * z[0, :, 2] + tab.sqrt_one_minus_alphas_cumprod[2] * 2.0
    torch.testing.assert_close(inputs[1][0, :, 2], expect)
    assert out.shape == z.shape


def test_input_validation():
    d = IDDPM(num_sampling_steps=3)
    z = torch.randn(2, 4, 3, 2, 2)
    with pytest.raises(ValueError, match="frame_mask"):
        sample_iddpm(lambda *a, **k: None, z, d, y=torch.zeros(2, 1, 1, 1), frame_mask=torch.ones(2, 2))
    with pytest.raises(ValueError, match="model_kwargs must not contain 'mask'"):
        sample_iddpm(lambda *a, **k: None, z, d, y=torch.zeros(2, 1, 1, 1), model_kwargs={"mask": None})
    with pytest.raises(ValueError, match="not both"):
        IDDPM(num_sampling_steps=10, timestep_respacing="10")
    with pytest.raises(ValueError, match="table_dtype"):
        IDDPM(table_dtype=torch.float16)
    with pytest.raises(ValueError, match=r"integer in \[2, 1000\]"):
        IDDPM(num_sampling_steps=1)  # the k = 0 clipped log-variance needs a k = 1


# ---- the training loss -----------------------------------------------------------------------


def test_normal_kl_and_discretized_likelihood_closed_forms():
    m1, m2 = torch.tensor([0.3]), torch.tensor([-0.2])
    lv1, lv2 = torch.tensor([-1.0]), torch.tensor([0.5])
    assert normal_kl(m1, lv1, m1, lv1).item() == 0.0  # identical Gaussians
    v1, v2 = math.exp(-1.0), math.exp(0.5)
    expect = 0.5 * math.log(v2 / v1) + (v1 + 0.25) / (2 * v2) - 0.5
    assert normal_kl(m1, lv1, m2, lv2).item() == pytest.approx(expect, rel=1e-6)
    # the 256 bins cover the real line: their probabilities sum to 1 for any mean and scale
    bins = torch.linspace(-1, 1, 256, dtype=torch.float64)
    for mean, log_scale in ((0.1, -2.0), (-0.7, -4.0), (0.95, 0.5)):
        logp = discretized_gaussian_log_likelihood(bins, torch.tensor(mean, dtype=torch.float64), torch.tensor(log_scale, dtype=torch.float64))
        assert logp.exp().sum().item() == pytest.approx(1.0, abs=1e-9)


def _loss_case(seed=0, B=3, T=2):
    gen = torch.Generator().manual_seed(seed)
    x0 = torch.randn(B, 4, T, 2, 2, generator=gen, dtype=torch.float64).float()
    noise = torch.randn(x0.shape, generator=gen)
    return x0, noise


def test_training_loss_is_zero_at_the_analytic_optimum():
    # eps = the true noise and v = -1 (variance = the true posterior variance): mse 0, KL 0
    d = IDDPM(num_sampling_steps=None, table_dtype=torch.float64)
    x0, noise = _loss_case()
    t = torch.tensor([1, 500, 999])
    model = lambda x, t, **kw: torch.cat([noise, -torch.ones_like(noise)], 1)
    terms = d.training_losses(model, x0, t, noise)
    assert set(terms) == {"loss", "mse", "vb"} and terms["loss"].shape == (3,)
    torch.testing.assert_close(terms["mse"], torch.zeros(3))
    torch.testing.assert_close(terms["vb"], torch.zeros(3), rtol=0, atol=5e-6)
    # and the optimum over v: any other variance has a larger bound (early t, where beta_t and the
    # posterior variance differ; they meet for large t)
    t = torch.tensor([1, 2, 3])
    for v in (-0.5, 0.0, 1.0):
        model = lambda x, t, v=v, **kw: torch.cat([noise, torch.full_like(noise, v)], 1)
        other = d.training_losses(model, x0, t, noise)
        assert (other["vb"] > 1e-4).all(), (v, other["vb"])


def test_training_loss_closed_form_for_a_mean_error():
    # eps_hat = eps + delta: mse = delta^2; the mean is off by coef1 * sqrt(1/abar - 1) * delta, so
    # with the true variance, vb = (coef1 * sqrt(1/abar - 1) * delta)^2 / (2 var) / ln 2 per element
    d = IDDPM(num_sampling_steps=None, table_dtype=torch.float64)
    x0, noise = _loss_case(1)
    t = torch.tensor([3, 250, 900])
    delta = 0.05
    model = lambda x, t, **kw: torch.cat([noise + delta, -torch.ones_like(noise)], 1)
    terms = d.training_losses(model, x0, t, noise)
    tab = d.train_tables
    shift = tab.posterior_mean_coef1[t] * tab.sqrt_recipm1_alphas_cumprod[t] * delta
    vb = shift**2 / (2 * tab.posterior_variance[t]) / math.log(2)
    torch.testing.assert_close(terms["mse"], torch.full((3,), delta**2), rtol=1e-5, atol=0)
    torch.testing.assert_close(terms["vb"].double(), vb, rtol=2e-3, atol=1e-7)
    torch.testing.assert_close(terms["loss"], terms["mse"] + terms["vb"])


def test_training_loss_t0_uses_the_decoder_likelihood():
    d = IDDPM(num_sampling_steps=None, table_dtype=torch.float64)
    x0 = torch.tensor([-1.0, -0.5, 0.0, 0.998]).reshape(1, 1, 1, 2, 2).repeat(1, 4, 1, 1, 1)
    noise = torch.zeros_like(x0)
    model = lambda x, t, **kw: torch.cat([noise, torch.ones_like(noise)], 1)
    terms = d.training_losses(model, x0, torch.tensor([0]), noise)
    # mean = x0 exactly (no noise), sigma = sqrt(beta_0) = 0.01: bins of half-width 1/255 around x0
    s = 1 / 255 / 0.01
    cdf = lambda u: 0.5 * (1 + math.tanh(math.sqrt(2 / math.pi) * (u + 0.044715 * u**3)))
    inner, edge = -math.log(cdf(s) - cdf(-s)), -math.log(cdf(s))  # x = -1 is an edge bin, 0.998 is not
    expect = (edge + 3 * inner) / 4 / math.log(2)
    assert terms["vb"].item() == pytest.approx(expect, rel=1e-4)


def test_training_loss_gradients_and_mask():
    d = IDDPM(num_sampling_steps=None)
    x0, noise = _loss_case(2, B=2, T=3)
    t = torch.tensor([10, 700])
    out = torch.randn(2, 8, 3, 2, 2, requires_grad=True)
    seen = {}

    def model(x, t, **kw):
        seen.update(kw, x=x)
        return out

    d.training_losses(model, x0, t, noise)["loss"].sum().backward()
    # the vb term does not train eps: its gradient is the mse's alone
    eps_grad = 2 * (out[:, :4] - noise).detach() / noise[0].numel()
    torch.testing.assert_close(out.grad[:, :4], eps_grad)
    assert out.grad[:, 4:].abs().sum() > 0

    mask = torch.tensor([[True, False, True], [True, True, True]])
    a = d.training_losses(model, x0, t, noise, mask=mask)
    assert torch.equal(seen["x_mask"], mask)
    x_t0 = IDDPM.q_sample(d.train_tables, x0, torch.zeros_like(t), noise)
    torch.testing.assert_close(seen["x"][0, :, 1], x_t0[0, :, 1])  # condition frame: q_sample(x0, 0)
    with torch.no_grad():
        out[0, :, 1] += 100.0  # the model's output on a condition frame does not count
    b = d.training_losses(model, x0, t, noise, mask=mask)
    torch.testing.assert_close(a["loss"], b["loss"])


def test_training_timesteps_and_validation():
    d = IDDPM()
    t = d.sample_training_timesteps(1000, generator=torch.Generator().manual_seed(0))
    assert t.dtype == torch.int64 and 0 <= t.min() and t.max() < 1000 and t.unique().numel() > 500
    assert torch.equal(t, d.sample_training_timesteps(1000, generator=torch.Generator().manual_seed(0)))
    # the loss runs on the full 1000-step process whatever the sampling respacing
    assert d.train_tables.num_steps == 1000 and d.num_steps == 100
    x0, noise = _loss_case()
    with pytest.raises(ValueError, match=r"t must lie in \[0, 1000\)"):
        d.training_losses(lambda x, t, **kw: torch.cat([x, x], 1), x0, torch.tensor([0, 1, 1000]), noise)
    with pytest.raises(ValueError, match="2C"):
        d.training_losses(lambda x, t, **kw: x, x0, torch.tensor([0, 1, 2]), noise)
