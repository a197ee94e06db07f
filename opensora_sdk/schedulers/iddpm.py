"""IDDPM (the v1.0 / v1.1 scheduler): learned-variance DDPM on linear betas, respaced (spec 5.3).

Time convention: the base process has `diffusion_steps` = 1000 steps, index 0 (least noise)
to 999 (pure noise). Sampling runs on a respaced chain of K steps, respaced index k = K-1..0,
whose original timesteps are tau_k = `timestep_map[k]`; the model always receives tau_k.

    betas          linear 1e-4 * 1000/N .. 0.02 * 1000/N (float64)
    respacing      tau = space_timesteps(1000, K); beta'_k = 1 - abar[tau_k] / abar[tau_{k-1}]
    model output   [eps (C), v (C)]: 2C channels (learned sigma, LEARNED_RANGE)
    log var        frac * log beta'_k + (1 - frac) * log sigma~^2_k (clipped), frac = (v + 1) / 2
    x0_hat         sqrt(1/abar_k) * x_k - sqrt(1/abar_k - 1) * eps (no clipping)
    step           x_{k-1} = posterior_mean(x0_hat, x_k) + [k > 0] * exp(log var / 2) * noise

Everything is tensors in, tensors out: `IDDPM` holds the tables and the per-step math; the
loop `sample_iddpm` takes any `model_fn`, and `IDDPM.training_losses` any `model_fn` too.

Precision of the tables (`table_dtype`), reproduced from the official code:

* ``torch.float32`` (default): the v1.1 code (also the v1.2 branch) stores the respaced betas
  with ``torch.FloatTensor``, so every table (abar, posterior coefficients, log-variances) is
  computed in float32 from float32 betas.
* ``torch.float64``: the v1.0 code keeps float64 numpy tables and casts each looked-up value
  to float32.

The two differ by about 2e-4 relative at the last step of a 10-step run (most of it from
sqrt(1/abar - 1) at abar ~ 1 - 1e-4), so each official run is matched only by its own setting.
The per-step arithmetic is float32 in both cases (the official lookups end in ``.float()``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from opensora_sdk.schedulers.rflow import mean_flat

ModelFn = Callable[..., Tensor]
NoiseSampler = Callable[[int, Tensor], Tensor]
Callback = Callable[[int, int, Tensor, Tensor], "bool | None"]


# --------------------------------------------------------------------------------------------
# Schedules: pure functions
# --------------------------------------------------------------------------------------------


def linear_betas(num_timesteps: int = 1000) -> Tensor:
    """The linear beta schedule of IDDPM, float64 [num_timesteps]: 1e-4 .. 0.02 scaled by 1000/N."""
    scale = 1000 / num_timesteps
    start, stop = scale * 0.0001, scale * 0.02
    # numpy.linspace's arithmetic (start + i * step, last value exactly stop), bit for bit
    betas = start + torch.arange(num_timesteps, dtype=torch.float64) * ((stop - start) / (num_timesteps - 1))
    betas[-1] = stop
    return betas


def space_timesteps(num_timesteps: int, section_counts: int | str | Sequence[int]) -> list[int]:
    """The original timesteps kept by respacing, sorted ascending.

    `section_counts` is a step count (10, "100") or comma-separated counts ("10,15,20"): the
    range [0, num_timesteps) is cut into len(counts) equal sections (the first ones one
    longer when it does not divide), and each section keeps its count of evenly strided
    indices, rounded with Python's round (ties to even). E.g. (1000, 100) -> 0, 10, 20, 30,
    40, 50, 61, ... 999 and (1000, 10) -> 0, 111, 222, ... 999.
    """
    if isinstance(section_counts, str):
        if section_counts.startswith("ddim"):
            raise ValueError(f"DDIM striding is not supported, got section_counts={section_counts!r}")
        counts = [int(x) for x in section_counts.split(",")] if section_counts else [num_timesteps]
    elif isinstance(section_counts, int):
        counts = [section_counts]
    else:
        counts = [int(x) for x in section_counts]
    size_per = num_timesteps // len(counts)
    extra = num_timesteps % len(counts)
    start_idx = 0
    kept: set[int] = set()
    for i, count in enumerate(counts):
        size = size_per + (1 if i < extra else 0)
        if size < count:
            raise ValueError(f"cannot divide a section of {size} steps into {count}")
        if count < 1:
            raise ValueError(f"each section needs at least one step, got {count}")
        frac_stride = 1 if count <= 1 else (size - 1) / (count - 1)
        cur_idx = 0.0
        for _ in range(count):
            kept.add(start_idx + round(cur_idx))
            cur_idx += frac_stride  # accumulated, as the reference does (not i * stride)
        start_idx += size
    return sorted(kept)


@dataclass(frozen=True)
class DiffusionTables:
    """Per-step constants of one (possibly respaced) Gaussian diffusion, each [K] in one dtype.

    `timestep_map[k]` (int64) is the original timestep the model receives at index k.
    """

    timestep_map: Tensor
    betas: Tensor
    log_betas: Tensor
    alphas_cumprod: Tensor
    alphas_cumprod_prev: Tensor
    sqrt_alphas_cumprod: Tensor
    sqrt_one_minus_alphas_cumprod: Tensor
    sqrt_recip_alphas_cumprod: Tensor
    sqrt_recipm1_alphas_cumprod: Tensor
    posterior_variance: Tensor
    posterior_log_variance_clipped: Tensor
    posterior_mean_coef1: Tensor
    posterior_mean_coef2: Tensor

    @property
    def num_steps(self) -> int:
        return self.betas.shape[0]


def diffusion_tables(
    base_betas: Tensor, use_timesteps: Sequence[int], dtype: torch.dtype = torch.float32
) -> DiffusionTables:
    """Tables of the diffusion respaced to `use_timesteps` (sorted original indices).

    The respaced betas beta'_k = 1 - abar[tau_k] / abar[tau_{k-1}] are computed in float64
    from the float64 base schedule, then cast to `dtype`; every other table is computed from
    them in `dtype` (see the module docstring for why this matters).
    """
    abar_base = torch.cumprod(1.0 - base_betas.double(), dim=0)  # [N] float64
    kept = sorted({int(i) for i in use_timesteps})
    if len(kept) < 2:
        raise ValueError(f"a respaced diffusion needs at least 2 steps (the k = 0 log-variance uses k = 1), got {kept}")
    new_betas, last = [], 1.0
    for i in kept:
        a = abar_base[i].item()
        new_betas.append(1 - a / last)
        last = a
    betas = torch.tensor(new_betas, dtype=torch.float64).to(dtype)  # [K]

    alphas = 1.0 - betas
    abar = torch.cumprod(alphas, dim=0)
    abar_prev = torch.cat([torch.ones(1, dtype=dtype), abar[:-1]])
    posterior_variance = betas * (1.0 - abar_prev) / (1.0 - abar)
    # the first entry (0 at k = 0) is replaced by the second before the log
    clipped = torch.cat([posterior_variance[1:2], posterior_variance[1:]])
    return DiffusionTables(
        timestep_map=torch.tensor(kept, dtype=torch.int64),
        betas=betas,
        log_betas=torch.log(betas),
        alphas_cumprod=abar,
        alphas_cumprod_prev=abar_prev,
        sqrt_alphas_cumprod=torch.sqrt(abar),
        sqrt_one_minus_alphas_cumprod=torch.sqrt(1.0 - abar),
        sqrt_recip_alphas_cumprod=torch.sqrt(1.0 / abar),
        sqrt_recipm1_alphas_cumprod=torch.sqrt(1.0 / abar - 1),
        posterior_variance=posterior_variance,
        posterior_log_variance_clipped=torch.log(clipped),
        posterior_mean_coef1=betas * torch.sqrt(abar_prev) / (1.0 - abar),
        posterior_mean_coef2=(1.0 - abar_prev) * torch.sqrt(alphas) / (1.0 - abar),
    )


def _extract(table: Tensor, t: Tensor, ndim: int) -> Tensor:
    """table[t] as float32, shaped [B, 1, ..., 1] to broadcast against an ndim tensor."""
    values = table.to(t.device)[t.long()].float()
    return values.reshape(-1, *([1] * (ndim - 1)))


# --------------------------------------------------------------------------------------------
# Gaussian helpers (closed forms used by the variational bound)
# --------------------------------------------------------------------------------------------


def normal_kl(mean1: Tensor, logvar1: Tensor, mean2: Tensor, logvar2: Tensor) -> Tensor:
    """Elementwise KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)) in nats."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def approx_standard_normal_cdf(x: Tensor) -> Tensor:
    """The tanh approximation of the standard normal CDF."""
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3))))


def discretized_gaussian_log_likelihood(x: Tensor, means: Tensor, log_scales: Tensor) -> Tensor:
    """Elementwise log-likelihood (nats) of x under a Gaussian discretised to 256 bins on [-1, 1].

    The bins at the edges (x < -0.999, x > 0.999) extend to -inf / +inf.
    """
    centered = x - means
    inv_stdv = torch.exp(-log_scales)
    cdf_plus = approx_standard_normal_cdf(inv_stdv * (centered + 1.0 / 255.0))
    cdf_min = approx_standard_normal_cdf(inv_stdv * (centered - 1.0 / 255.0))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    log_cdf_delta = torch.log((cdf_plus - cdf_min).clamp(min=1e-12))
    return torch.where(x < -0.999, log_cdf_plus, torch.where(x > 0.999, log_one_minus_cdf_min, log_cdf_delta))


def guided_output(out: Tensor, guidance_scale: float, cfg_channel: int) -> Tensor:
    """Classifier-free guidance of IDDPM on a [cond; uncond] model output [2B, 2C, ...] -> [B, 2C, ...].

    Channels [:cfg_channel] are guided, eps = uncond + g * (cond - uncond); the others (the
    unguided eps channels and all variance channels) keep the conditional half's values.
    This is the first half of the reference's result (which puts the guided eps in both halves).
    """
    cond, uncond = out.chunk(2, dim=0)
    eps = uncond[:, :cfg_channel] + guidance_scale * (cond[:, :cfg_channel] - uncond[:, :cfg_channel])
    return torch.cat([eps, cond[:, cfg_channel:]], dim=1)


# --------------------------------------------------------------------------------------------
# The scheduler object: settings + tables + per-step math
# --------------------------------------------------------------------------------------------


@dataclass
class IDDPM:
    """Settings and tables of the learned-sigma IDDPM, with the official field names.

    Defaults are those of the v1.0 / v1.1 inference configs: 100 sampling steps and guidance
    on eps channels 0-2 (`cfg_channel=3`: the v1.1 config's value, hard-coded in v1.0). The
    official constructor's own default is `cfg_channel=None` (all eps channels), available
    as `cfg_channel=None`. As for `RectifiedFlow`, the guidance scale is the sampler's argument.

    `table_dtype` selects the official precision: float32 for v1.1, float64 for v1.0 (module
    docstring). Only the configuration Open-Sora uses is implemented: linear betas, learned
    range sigma, eps prediction, MSE + VB loss (`use_kl=False`, `rescale_learned_sigmas=False`).

    `tables` is the respaced sampling chain (`num_sampling_steps` steps; None = all
    `diffusion_steps`); `train_tables` always spans all `diffusion_steps` (training uses
    `timestep_respacing=""`).
    """

    num_sampling_steps: int | None = 100
    timestep_respacing: str | None = None
    diffusion_steps: int = 1000
    cfg_channel: int | None = 3
    table_dtype: torch.dtype = torch.float32
    tables: DiffusionTables = field(init=False, repr=False)
    train_tables: DiffusionTables = field(init=False, repr=False)

    def __post_init__(self):
        if self.table_dtype not in (torch.float32, torch.float64):
            raise ValueError(f"table_dtype must be torch.float32 (v1.1) or torch.float64 (v1.0), got {self.table_dtype}")
        if self.num_sampling_steps is not None and self.timestep_respacing is not None:
            raise ValueError(
                "give num_sampling_steps or timestep_respacing, not both "
                f"(got {self.num_sampling_steps!r} and {self.timestep_respacing!r})"
            )
        respacing = self.timestep_respacing
        if self.num_sampling_steps is not None:
            if int(self.num_sampling_steps) != self.num_sampling_steps or not 2 <= self.num_sampling_steps <= self.diffusion_steps:
                raise ValueError(
                    f"num_sampling_steps must be an integer in [2, {self.diffusion_steps}], got {self.num_sampling_steps!r}"
                )
            respacing = str(int(self.num_sampling_steps))
        betas = linear_betas(self.diffusion_steps)
        kept = space_timesteps(self.diffusion_steps, respacing or str(self.diffusion_steps))
        self.tables = diffusion_tables(betas, kept, self.table_dtype)
        self.train_tables = diffusion_tables(betas, range(self.diffusion_steps), self.table_dtype)

    @property
    def num_steps(self) -> int:
        """K, the number of steps of the sampling chain."""
        return self.tables.num_steps

    @property
    def timestep_map(self) -> Tensor:
        """[K] int64: respaced index k -> original timestep tau_k given to the model."""
        return self.tables.timestep_map

    # ---- forward process and posterior ---------------------------------------------------------

    @staticmethod
    def q_sample(tables: DiffusionTables, x_start: Tensor, t: Tensor, noise: Tensor) -> Tensor:
        """x_t = sqrt(abar_t) * x_start + sqrt(1 - abar_t) * noise; t [B] indexes `tables`."""
        n = x_start.dim()
        return _extract(tables.sqrt_alphas_cumprod, t, n) * x_start + _extract(
            tables.sqrt_one_minus_alphas_cumprod, t, n
        ) * noise

    @staticmethod
    def q_posterior(tables: DiffusionTables, x_start: Tensor, x_t: Tensor, t: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Mean, variance and clipped log-variance of q(x_{t-1} | x_t, x_start)."""
        n = x_t.dim()
        mean = _extract(tables.posterior_mean_coef1, t, n) * x_start + _extract(tables.posterior_mean_coef2, t, n) * x_t
        var = _extract(tables.posterior_variance, t, n)
        log_var = _extract(tables.posterior_log_variance_clipped, t, n)
        return mean, var, log_var

    @staticmethod
    def p_mean_variance(tables: DiffusionTables, model_output: Tensor, x_t: Tensor, t: Tensor) -> dict[str, Tensor]:
        """From the 2C-channel model output at x_t [B, C, ...]: mean, log_variance, pred_xstart of p(x_{t-1} | x_t)."""
        C = x_t.shape[1]
        if model_output.shape[1] != 2 * C:
            raise ValueError(
                f"IDDPM needs a learned-sigma output with 2 * {C} = {2 * C} channels, got {tuple(model_output.shape)}"
            )
        n = x_t.dim()
        eps, var_values = model_output[:, :C], model_output[:, C:]
        min_log = _extract(tables.posterior_log_variance_clipped, t, n)
        max_log = _extract(tables.log_betas, t, n)
        frac = (var_values + 1) / 2
        log_variance = frac * max_log + (1 - frac) * min_log
        pred_xstart = _extract(tables.sqrt_recip_alphas_cumprod, t, n) * x_t - _extract(
            tables.sqrt_recipm1_alphas_cumprod, t, n
        ) * eps
        mean, _, _ = IDDPM.q_posterior(tables, pred_xstart, x_t, t)
        return {"mean": mean, "log_variance": log_variance, "pred_xstart": pred_xstart}

    def step(self, model_output: Tensor, x_t: Tensor, k: int, noise: Tensor) -> tuple[Tensor, Tensor]:
        """One ancestral step of the sampling chain at respaced index k. Returns (x_{k-1}, pred_xstart).

        model_output [B, 2C, ...] (already guided), x_t and noise [B, C, ...]; no noise at k = 0.
        """
        t = torch.full((x_t.shape[0],), k, dtype=torch.int64, device=x_t.device)
        out = self.p_mean_variance(self.tables, model_output, x_t, t)
        nonzero = float(k != 0)
        sample = out["mean"] + nonzero * torch.exp(0.5 * out["log_variance"]) * noise
        return sample, out["pred_xstart"]

    # ---- training ----------------------------------------------------------------------------

    def sample_training_timesteps(
        self, batch: int, *, generator: torch.Generator | None = None, device: torch.device | str | None = None
    ) -> Tensor:
        """t ~ randint(0, diffusion_steps), [batch] int64."""
        return torch.randint(0, self.diffusion_steps, (batch,), generator=generator, device=device)

    def training_losses(
        self,
        model_fn: ModelFn,
        x_start: Tensor,
        t: Tensor,
        noise: Tensor | None = None,
        model_kwargs: dict | None = None,
        mask: Tensor | None = None,
        *,
        generator: torch.Generator | None = None,
    ) -> dict[str, Tensor]:
        """Per-sample IDDPM losses (spec 5.3): {"loss", "mse", "vb"}, each [B]; `.mean()` for the batch.

        loss = mse + vb with
            mse = mean_flat((eps - eps_hat)^2)
            vb  = KL(q(x_{t-1} | x_t, x_0) || p(x_{t-1} | x_t)) / ln 2 (bits per dim), the
                  decoder NLL of x_0 at t = 0; the model's eps is detached in it, so the
                  bound trains only the variance channels.
        Args:
            model_fn: `model_fn(x_t, t, **model_kwargs) -> [B, 2C, T, H, W]` (t: the original
                timestep, int64).
            x_start: clean latents [B, C, T, H, W].
            t: [B] original timesteps in [0, diffusion_steps) (see `sample_training_timesteps`).
            noise: [B, C, T, H, W]; None draws it from `generator`.
            mask: [B, T] bool, True = generated frame. False frames get q_sample(x_0, 0) (the
                same noise at level 0), are passed as `x_mask=mask`, and are left out of both
                the mse and the vb means.
        """
        tables = self.train_tables
        kwargs = dict(model_kwargs or {})
        if noise is None:
            noise = torch.randn(x_start.shape, generator=generator, device=x_start.device, dtype=x_start.dtype)
        if noise.shape != x_start.shape:
            raise ValueError(f"noise shape {tuple(noise.shape)} must equal x_start shape {tuple(x_start.shape)}")
        if t.shape != (x_start.shape[0],):
            raise ValueError(f"t must have shape [{x_start.shape[0]}], got {tuple(t.shape)}")
        if t.min() < 0 or t.max() >= self.diffusion_steps:
            raise ValueError(f"t must lie in [0, {self.diffusion_steps}), got {t.tolist()}")
        t = t.long()
        x_t = self.q_sample(tables, x_start, t, noise)
        if mask is not None:
            mask = mask.bool()
            x_t0 = self.q_sample(tables, x_start, torch.zeros_like(t), noise)
            x_t = torch.where(mask[:, None, :, None, None], x_t, x_t0)
            kwargs["x_mask"] = mask

        out = model_fn(x_t, t, **kwargs)
        C = x_start.shape[1]
        if out.shape != (x_start.shape[0], 2 * C, *x_start.shape[2:]):
            raise ValueError(f"model output must be [B, 2C, ...] = {(x_start.shape[0], 2 * C, *x_start.shape[2:])}, got {tuple(out.shape)}")
        eps_hat = out[:, :C]
        frozen = torch.cat([eps_hat.detach(), out[:, C:]], dim=1)  # the VB term trains only the variance
        vb = self.vb_terms_bpd(frozen, x_start, x_t, t, mask=mask)
        mse = mean_flat((noise - eps_hat) ** 2, mask=mask)
        return {"loss": mse + vb, "mse": mse, "vb": vb}

    def vb_terms_bpd(
        self, model_output: Tensor, x_start: Tensor, x_t: Tensor, t: Tensor, mask: Tensor | None = None
    ) -> Tensor:
        """The variational-bound term in bits per dim, [B]: KL at t > 0, decoder NLL at t = 0.

        t indexes the full (training) schedule.
        """
        tables = self.train_tables
        true_mean, _, true_log_var = self.q_posterior(tables, x_start, x_t, t)
        out = self.p_mean_variance(tables, model_output, x_t, t)
        kl = normal_kl(true_mean, true_log_var, out["mean"], out["log_variance"])
        kl = mean_flat(kl, mask=mask) / math.log(2.0)
        nll = -discretized_gaussian_log_likelihood(x_start, out["mean"], 0.5 * out["log_variance"])
        nll = mean_flat(nll, mask=mask) / math.log(2.0)
        return torch.where(t == 0, nll, kl)


# --------------------------------------------------------------------------------------------
# The sampling loop
# --------------------------------------------------------------------------------------------


def _cfg_kwargs(kwargs: dict, batch: int) -> dict:
    """Repeat per-sample tensors (first dim == batch) for the [cond; uncond] batch."""
    return {
        k: torch.cat([v, v], 0) if isinstance(v, Tensor) and v.dim() > 0 and v.shape[0] == batch else v
        for k, v in kwargs.items()
    }


def sample_iddpm(
    model_fn: ModelFn,
    z: Tensor,
    diffusion: IDDPM,
    *,
    y: Tensor,
    y_null: Tensor | None = None,
    y_mask: Tensor | None = None,
    guidance_scale: float = 7.0,
    frame_mask: Tensor | None = None,
    model_kwargs: dict | None = None,
    generator: torch.Generator | None = None,
    noise_sampler: NoiseSampler | None = None,
    callback: Callback | None = None,
) -> Tensor:
    """Run the respaced IDDPM chain from z (at k = K-1) to the data (spec 5.3), as the official loop.

        for k = K-1 .. 0 (tau_k = timestep_map[k]):
            [frame_mask] x0 = x; frames with mask_k == k: q_sample(x0, k, draw); x_mask = mask_k > k
            out = model([x; x], [tau_k; tau_k], y=[y; y_null], mask=[m; m])  # [2B, 2C, ...]
            out = guided_output(out, g, cfg_channel)                        # eps[:cfg_channel] guided
            x = posterior_mean(x0_hat, x) + [k > 0] * sigma_k * draw
            [frame_mask] frames with mask_k < k back to x0
        with mask_k = int(frame_mask * K).

    Random draws follow the official order and shapes: the official chain holds 2B rows
    ([z; z]) under guidance, of which only the first half is ever used, so every draw has
    the chain's shape ([2B, C, T, H, W], else [B, ...]) and its first B rows are used. Each
    step draws once (also at k = 0); with a frame mask, each step first draws the re-noising
    noise, then the step noise.

    Args:
        model_fn: `model_fn(x, t, *, y, mask, x_mask, **model_kwargs) -> [N, 2C, T, H, W]`
            with t [N] int64 (the original timestep tau_k). N = 2B with guidance, else B.
        z: [B, C, T, H, W] the starting latent (the caller's noise). Not modified.
        diffusion: the `IDDPM` whose respaced tables drive the chain.
        y, y_null, y_mask: prompt embedding [B, 1, L, D], unconditional embedding (None
            disables guidance), text mask [B, L] used for both halves.
        guidance_scale: g, applied to eps channels [:diffusion.cfg_channel] (all C when None).
        frame_mask: [B, T] float, 1 = generate, values < 1 condition frames (see above);
            passed to the model as x_mask ([N, T] bool). None: x_mask=None.
        model_kwargs: more model arguments; per-sample tensors are repeated to 2B.
        generator: source of every draw. noise_sampler: `noise_sampler(i, like)` replaces the
            i-th draw (call order, from 0) by a tensor like `like` (e.g. recorded noise).
        callback: `callback(step, total, latent, denoised)` after each step (step 0..K-1 in
            loop order) with the latent after the step and pred_xstart, both [B, C, T, H, W].
            Return False (or raise `SamplingInterrupted`) to stop: `SamplingInterrupted`
            carrying the step and the latent is raised.
    Returns:
        [B, C, T, H, W] float32 latent.
    """
    # imported here, not at the top: opensora_sdk.sampling imports this package
    from opensora_sdk.sampling import SamplingInterrupted

    if z.dim() != 5:
        raise ValueError(f"z must be [B, C, T, H, W], got shape {tuple(z.shape)}")
    B, C, T = z.shape[:3]
    if y.shape[0] != B:
        raise ValueError(f"y must have batch {B} like z, got shape {tuple(y.shape)}")
    if y_null is not None and y_null.shape != y.shape:
        raise ValueError(f"y_null shape {tuple(y_null.shape)} must equal y shape {tuple(y.shape)}")
    if frame_mask is not None and frame_mask.shape != (B, T):
        raise ValueError(f"frame_mask must be [B, T] = [{B}, {T}], got {tuple(frame_mask.shape)}")
    kwargs = dict(model_kwargs or {})
    for reserved in ("y", "mask", "x_mask"):
        if reserved in kwargs:
            raise ValueError(f"model_kwargs must not contain {reserved!r}: pass it as an argument of sample_iddpm()")

    cfg = y_null is not None
    rows = 2 * B if cfg else B
    if cfg:
        kwargs = _cfg_kwargs(kwargs, B)
        kwargs["y"] = torch.cat([y, y_null], 0)
        kwargs["mask"] = None if y_mask is None else torch.cat([y_mask, y_mask], 0)
    else:
        kwargs["y"], kwargs["mask"] = y, y_mask
    cfg_channel = C if diffusion.cfg_channel is None else diffusion.cfg_channel

    draws = 0

    def draw(like_shape: tuple[int, ...]) -> Tensor:
        nonlocal draws
        if noise_sampler is not None:
            like = torch.empty(like_shape, dtype=torch.float32, device=z.device)
            noise = noise_sampler(draws, like)
        else:
            noise = torch.randn(like_shape, generator=generator, dtype=torch.float32, device=z.device)
        draws += 1
        return noise[:B].to(z.device)

    K = diffusion.num_steps
    tables = diffusion.tables
    timestep_map = tables.timestep_map.to(z.device)
    mask_k = None if frame_mask is None else (frame_mask * K).int()  # [B, T]
    chain_shape = (rows, *z.shape[1:])
    x = z.float()
    for step, k in enumerate(range(K - 1, -1, -1)):
        x_mask = x0 = None
        if mask_k is not None:
            x0 = x.clone()
            t_vec = torch.full((B,), k, dtype=torch.int64, device=z.device)
            x_noise = IDDPM.q_sample(tables, x0, t_vec, draw(chain_shape))
            x = torch.where((mask_k == k)[:, None, :, None, None], x_noise, x0)
            x_mask = mask_k > k  # [B, T]
        t_model = timestep_map[k].repeat(rows)  # [N] int64
        if cfg:
            x_mask_in = None if x_mask is None else x_mask.repeat(2, 1)
            out = model_fn(torch.cat([x, x], 0), t_model, x_mask=x_mask_in, **kwargs)
            out = guided_output(out.float(), guidance_scale, cfg_channel)
        else:
            out = model_fn(x, t_model, x_mask=x_mask, **kwargs).float()
        x, pred_xstart = diffusion.step(out, x, k, draw(chain_shape))
        if mask_k is not None:
            x = torch.where((mask_k < k)[:, None, :, None, None], x0, x)

        if callback is not None:
            try:
                keep_going = callback(step, K, x, pred_xstart)
            except SamplingInterrupted as stop:
                raise SamplingInterrupted(step, x, str(stop) or None) from stop
            if keep_going is False:
                raise SamplingInterrupted(step, x)
    return x


__all__ = [
    "IDDPM",
    "DiffusionTables",
    "approx_standard_normal_cdf",
    "diffusion_tables",
    "discretized_gaussian_log_likelihood",
    "guided_output",
    "linear_betas",
    "normal_kl",
    "sample_iddpm",
    "space_timesteps",
]
