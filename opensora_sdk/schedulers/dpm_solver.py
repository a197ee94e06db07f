"""DPM-Solver++ (multistep, order 2), the v1.0 fast sampler (`type="dpm-solver"`, spec 5.4).

The discrete IDDPM process (the same linear betas) is read as a continuous VP SDE:

    log alpha(t)   piecewise-linear interpolation of 0.5 * cumsum(log(1 - beta)) on the knots
                   t_n = (n + 1) / N, n = 0..N-1 (float32 tables, linear extrapolation)
    sigma(t)       sqrt(1 - alpha(t)^2);   lambda(t) = log alpha(t) - log sigma(t)
    timesteps      time-uniform: linspace(1, 1/N, steps + 1) (float32)
    model time     (t - 1/N) * 1000, the eps prediction = the model's channels [:C]
    data pred      x0 = (x - sigma_t * eps) / alpha_t

and integrated with the multistep DPM-Solver++ in data prediction form (h = lambda_t - lambda_s):

    order 1        x_t = sigma_t / sigma_s * x - alpha_t * (e^-h - 1) * x0_s
    order 2        x_t = sigma_t / sigma_s * x - alpha_t * (e^-h - 1) * (x0_s + 0.5 * D1),
                   D1 = (x0_s - x0_r) * h / h_prev   (r the step before s)

The first step is order 1; with fewer than 10 steps the last one is order 1 too
(`lower_order_final`). One model call per step; the last state is not evaluated. No random
draws (the initial noise is the caller's) and no frame masks.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from opensora_sdk.schedulers.iddpm import linear_betas

ModelFn = Callable[..., Tensor]
Callback = Callable[[int, int, Tensor, Tensor], "bool | None"]


# --------------------------------------------------------------------------------------------
# The discrete-time VP noise schedule: pure functions of t
# --------------------------------------------------------------------------------------------


def interpolate(x: Tensor, xp: Tensor, yp: Tensor) -> Tensor:
    """Piecewise-linear y(x) through the knots (xp, yp), extrapolated linearly outside. x [N], xp/yp [K] ascending."""
    K = xp.shape[0]
    j = (torch.searchsorted(xp, x.contiguous()) - 1).clamp(0, K - 2)  # segment [xp[j], xp[j+1]]
    x0, x1, y0, y1 = xp[j], xp[j + 1], yp[j], yp[j + 1]
    return y0 + (x - x0) * (y1 - y0) / (x1 - x0)


@dataclass(frozen=True)
class NoiseScheduleVP:
    """The discrete VP schedule of a beta sequence (DPM-Solver's `NoiseScheduleVP("discrete")`).

    `t_array` [N] = (n + 1) / N and `log_alpha_array` [N] = 0.5 * cumsum(log(1 - beta)),
    computed in float64 and stored in float32 as in the reference.
    """

    t_array: Tensor
    log_alpha_array: Tensor

    @classmethod
    def from_betas(cls, betas: Tensor) -> NoiseScheduleVP:
        log_alphas = 0.5 * torch.log(1 - betas.double()).cumsum(dim=0)
        t_array = torch.linspace(0.0, 1.0, betas.shape[0] + 1)[1:]
        return cls(t_array=t_array.float(), log_alpha_array=log_alphas.float())

    @property
    def total_n(self) -> int:
        return self.t_array.shape[0]

    def marginal_log_mean_coeff(self, t: Tensor) -> Tensor:
        """log alpha(t), t [N] in [1/N, 1]."""
        return interpolate(t, self.t_array.to(t.device), self.log_alpha_array.to(t.device))

    def marginal_alpha(self, t: Tensor) -> Tensor:
        return torch.exp(self.marginal_log_mean_coeff(t))

    def marginal_std(self, t: Tensor) -> Tensor:
        return torch.sqrt(1.0 - torch.exp(2.0 * self.marginal_log_mean_coeff(t)))

    def marginal_lambda(self, t: Tensor) -> Tensor:
        """Half log-SNR lambda(t) = log alpha - log sigma."""
        log_mean_coeff = self.marginal_log_mean_coeff(t)
        log_std = 0.5 * torch.log(1.0 - torch.exp(2.0 * log_mean_coeff))
        return log_mean_coeff - log_std

    def model_time(self, t: Tensor) -> Tensor:
        """The model's timestep input for continuous t: (t - 1/N) * 1000."""
        return (t - 1.0 / self.total_n) * 1000.0


def time_uniform_timesteps(num_steps: int, t_start: float = 1.0, t_end: float = 1e-3) -> Tensor:
    """linspace(t_start, t_end, num_steps + 1), float32 [num_steps + 1]."""
    return torch.linspace(t_start, t_end, num_steps + 1)


# --------------------------------------------------------------------------------------------
# Solver updates
# --------------------------------------------------------------------------------------------


def _col(v: Tensor, ndim: int) -> Tensor:
    return v.reshape(-1, *([1] * (ndim - 1)))


def first_order_update(ns: NoiseScheduleVP, x: Tensor, s: Tensor, t: Tensor, x0_s: Tensor) -> Tensor:
    """DPM-Solver++ 1 (= DDIM) from time s to t with the data prediction x0_s. s, t [B]."""
    n = x.dim()
    h = ns.marginal_lambda(t) - ns.marginal_lambda(s)
    sigma_s, sigma_t = ns.marginal_std(s), ns.marginal_std(t)
    alpha_t = torch.exp(ns.marginal_log_mean_coeff(t))
    phi_1 = torch.expm1(-h)
    return _col(sigma_t / sigma_s, n) * x - _col(alpha_t * phi_1, n) * x0_s


def second_order_update(
    ns: NoiseScheduleVP, x: Tensor, t_prev: tuple[Tensor, Tensor], t: Tensor, x0_prev: tuple[Tensor, Tensor]
) -> Tensor:
    """Multistep DPM-Solver++(2M) to t from (r, s) = t_prev with data predictions x0_prev = (x0_r, x0_s)."""
    n = x.dim()
    (t_r, t_s), (x0_r, x0_s) = t_prev, x0_prev
    lambda_r, lambda_s, lambda_t = ns.marginal_lambda(t_r), ns.marginal_lambda(t_s), ns.marginal_lambda(t)
    sigma_s, sigma_t = ns.marginal_std(t_s), ns.marginal_std(t)
    alpha_t = torch.exp(ns.marginal_log_mean_coeff(t))
    h_0 = lambda_s - lambda_r
    h = lambda_t - lambda_s
    r0 = h_0 / h
    d1 = _col(1.0 / r0, n) * (x0_s - x0_r)
    phi_1 = torch.expm1(-h)
    return _col(sigma_t / sigma_s, n) * x - _col(alpha_t * phi_1, n) * x0_s - 0.5 * _col(alpha_t * phi_1, n) * d1


# --------------------------------------------------------------------------------------------
# Settings and the sampling loop
# --------------------------------------------------------------------------------------------


@dataclass
class DPMSolver:
    """Settings of the v1.0 DPM-Solver sampler (official `DPMS` / `DMP_SOLVER` with its fixed choices).

    DPM-Solver++ multistep, `order` 2, time-uniform steps from t = 1 to 1/diffusion_steps,
    `lower_order_final` below 10 steps, eps prediction on the linear IDDPM betas. The step
    count has no default here (the family's defaults table owns it); the guidance scale is
    the sampler's argument.
    """

    num_sampling_steps: int
    diffusion_steps: int = 1000
    order: int = 2
    lower_order_final: bool = True
    schedule: NoiseScheduleVP = field(init=False, repr=False)

    def __post_init__(self):
        if self.order not in (1, 2):
            raise ValueError(f"order must be 1 or 2, got {self.order}")
        if int(self.num_sampling_steps) != self.num_sampling_steps or self.num_sampling_steps < self.order:
            raise ValueError(
                f"num_sampling_steps must be an integer >= order ({self.order}), got {self.num_sampling_steps!r}"
            )
        self.schedule = NoiseScheduleVP.from_betas(linear_betas(self.diffusion_steps))

    def timesteps(self) -> Tensor:
        """The num_sampling_steps + 1 continuous times, float32, from 1 down to 1/diffusion_steps."""
        return time_uniform_timesteps(int(self.num_sampling_steps), 1.0, 1.0 / self.schedule.total_n)

    def step_orders(self) -> list[int]:
        """The order of each of the num_sampling_steps updates."""
        K = int(self.num_sampling_steps)
        orders = []
        for step in range(1, K + 1):
            if step < self.order:
                orders.append(step)  # warm-up with lower orders
            elif self.lower_order_final and K < 10:
                orders.append(min(self.order, K + 1 - step))
            else:
                orders.append(self.order)
        return orders


def sample_dpm_solver(
    model_fn: ModelFn,
    z: Tensor,
    solver: DPMSolver,
    *,
    y: Tensor,
    y_null: Tensor | None = None,
    y_mask: Tensor | None = None,
    guidance_scale: float = 7.0,
    model_kwargs: dict | None = None,
    callback: Callback | None = None,
) -> Tensor:
    """Integrate from z (t = 1) to t = 1/N with DPM-Solver++(2M) (spec 5.4).

        ts = linspace(1, 1/N, K + 1)
        for i in 0..K-1:
            eps = model([x; x], (ts[i] - 1/N) * 1000, y=[y_null; y], mask=[m; m])[:, :C]  # [uncond; cond]
            eps = uncond + g * (cond - uncond);  x0_i = (x - sigma * eps) / alpha
            x = update of order 1 or 2 from ts[i] (and ts[i-1]) to ts[i+1]

    Args:
        model_fn: `model_fn(x, t, *, y, mask, x_mask, **model_kwargs) -> [N, C', T, H, W]`,
            t [N] float32 model time; the first C channels are eps. N = 2B with guidance,
            in the reference's order [uncond; cond]; x_mask is always None.
        z: [B, C, T, H, W] starting noise (the caller's draw). Not modified.
        solver: the `DPMSolver` settings.
        y, y_null, y_mask: prompt embedding, unconditional embedding (None disables
            guidance), text mask [B, L] used for both halves.
        guidance_scale: g, on all C eps channels.
        model_kwargs: more model arguments; per-sample tensors are repeated to 2B.
        callback: `callback(step, total, latent, denoised)` after each update with the
            latent [B, C, T, H, W] and the latest data prediction x0 (the one the update used).
            Return False (or raise `SamplingInterrupted`) to stop: `SamplingInterrupted` is raised.
    Returns:
        [B, C, T, H, W] float32 latent.
    """
    # imported here, not at the top: opensora_sdk.sampling imports this package
    from opensora_sdk.sampling import SamplingInterrupted

    if z.dim() != 5:
        raise ValueError(f"z must be [B, C, T, H, W], got shape {tuple(z.shape)}")
    B, C = z.shape[:2]
    if y.shape[0] != B:
        raise ValueError(f"y must have batch {B} like z, got shape {tuple(y.shape)}")
    if y_null is not None and y_null.shape != y.shape:
        raise ValueError(f"y_null shape {tuple(y_null.shape)} must equal y shape {tuple(y.shape)}")
    kwargs = dict(model_kwargs or {})
    for reserved in ("y", "mask", "x_mask"):
        if reserved in kwargs:
            raise ValueError(f"model_kwargs must not contain {reserved!r}: pass it as an argument of sample_dpm_solver()")
    cfg = y_null is not None
    if cfg:
        kwargs = {
            k: torch.cat([v, v], 0) if isinstance(v, Tensor) and v.dim() > 0 and v.shape[0] == B else v
            for k, v in kwargs.items()
        }
        kwargs["y"] = torch.cat([y_null, y], 0)  # the reference's order: [uncond; cond]
        kwargs["mask"] = None if y_mask is None else torch.cat([y_mask, y_mask], 0)
    else:
        kwargs["y"], kwargs["mask"] = y, y_mask
    ns = solver.schedule

    def data_prediction(x: Tensor, t: Tensor) -> Tensor:
        t_vec = t.to(x.device).expand(B)  # [B]
        t_model = ns.model_time(t_vec)
        if cfg:
            out = model_fn(torch.cat([x, x], 0), torch.cat([t_model, t_model], 0), x_mask=None, **kwargs)
            eps_uncond, eps_cond = out[:, :C].float().chunk(2, dim=0)
            eps = eps_uncond + guidance_scale * (eps_cond - eps_uncond)
        else:
            eps = model_fn(x, t_model, x_mask=None, **kwargs)[:, :C].float()
        n = x.dim()
        return (x - _col(ns.marginal_std(t_vec), n) * eps) / _col(ns.marginal_alpha(t_vec), n)

    ts = solver.timesteps().to(z.device)
    orders = solver.step_orders()
    total = len(orders)
    x = z.float()
    t_prev = [ts[0].expand(B)]
    x0_prev = [data_prediction(x, ts[0])]
    for i, order in enumerate(orders):
        t = ts[i + 1].expand(B)
        if order == 1:
            x = first_order_update(ns, x, t_prev[-1], t, x0_prev[-1])
        else:
            x = second_order_update(ns, x, (t_prev[-2], t_prev[-1]), t, (x0_prev[-2], x0_prev[-1]))
        t_prev = (t_prev + [t])[-2:]

        if callback is not None:
            try:
                keep_going = callback(i, total, x, x0_prev[-1])
            except SamplingInterrupted as stop:
                raise SamplingInterrupted(i, x, str(stop) or None) from stop
            if keep_going is False:
                raise SamplingInterrupted(i, x)
        if i + 1 < total:  # the final state is not evaluated
            x0_prev = (x0_prev + [data_prediction(x, ts[i + 1])])[-2:]
    return x


__all__ = [
    "DPMSolver",
    "NoiseScheduleVP",
    "first_order_update",
    "interpolate",
    "sample_dpm_solver",
    "second_order_update",
    "time_uniform_timesteps",
]
