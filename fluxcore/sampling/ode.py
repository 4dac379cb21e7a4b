"""Deterministic solvers of the flow ODE dx/dt = v = (x − x0)/t, from t = 1 to t = 0.

First order: `sample_euler` (the reference's denoise loop). Higher order: `sample_heun` (2
evaluations per step), and the multistep data-prediction solvers that reuse earlier x0s at 1
evaluation per step — `sample_dpmpp_2m`, `sample_uni_pc` (histories in λ) and `sample_deis`
(history in t). In flow form α_t = 1 − t, σ_t = t and λ = `log_snr(t)` = log(α/σ), which is −∞ at
t = 1 and +∞ at t = 0: the λ-based solvers take the step leaving t = 1 and the step into t = 0 at
first order, because their finite-difference history needs finite λ.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from fluxcore.errors import ConfigError
from fluxcore.sampling.denoisers import denoise, velocity
from fluxcore.sampling.helpers import end_step, flow_times, log_snr, report, step_range


@torch.no_grad()
def sample_euler(model, x, sigmas, extra_args=None, callback=None, disable=None, step_end=None):
    """Euler on the flow ODE: x ← x + (t_next − t)·v. With a `FlowDenoiser` this is the reference's
    denoise loop step for step (same timestep tensors, same dtype, same update expression).
    1 model evaluation per step; global order 1."""
    extra_args = extra_args or {}
    ts = flow_times(sigmas)
    for i in step_range(len(ts) - 1, disable):
        t_curr, t_prev = ts[i], ts[i + 1]
        v = velocity(model, x, t_curr, **extra_args)
        if callback is not None:
            report(callback, x, i, t_curr, x - t_curr * v)
        x = end_step(step_end, i, x + (t_prev - t_curr) * v, t_prev)
    return x


@torch.no_grad()
def sample_heun(model, x, sigmas, extra_args=None, callback=None, disable=None, step_end=None):
    """Heun (explicit trapezoid) on the flow ODE: an Euler predictor, then the average of the
    velocities at both ends. The last step into t = 0 is a plain Euler step (k-diffusion's
    convention, which keeps x0-only models defined). 2 evaluations per step; global order 2."""
    extra_args = extra_args or {}
    ts = flow_times(sigmas)
    for i in step_range(len(ts) - 1, disable):
        t, t_next = ts[i], ts[i + 1]
        v = velocity(model, x, t, **extra_args)
        if callback is not None:
            report(callback, x, i, t, x - t * v)
        x_euler = x + (t_next - t) * v
        if t_next == 0:
            x = x_euler
        else:
            v_next = velocity(model, x_euler, t_next, **extra_args)
            x = x + (t_next - t) * ((v + v_next) / 2)
        x = end_step(step_end, i, x, t_next)
    return x


@torch.no_grad()
def sample_dpmpp_2m(model, x, sigmas, extra_args=None, callback=None, disable=None, step_end=None):
    """DPM-Solver++(2M) (Lu et al. 2022) in flow form: data prediction with α_t = 1 − t, σ_t = t,
    λ = log(α/σ), h = λ_next − λ.

        x_next = (σ_next/σ)·x − α_next·expm1(−h)·D,   D = (1 + 1/2r)·x0_i − (1/2r)·x0_{i−1}, r = h_{i−1}/h

    The first-order update (D = x0_i) equals Euler/DDIM in flow form. It is used at the first step,
    wherever the previous h is infinite (the step leaving t = 1, where α = 0), and for the last
    step into t = 0. 1 evaluation per step; global order 2."""
    extra_args = extra_args or {}
    ts = flow_times(sigmas)
    x0_prev, h_prev = None, None
    for i in step_range(len(ts) - 1, disable):
        t, t_next = ts[i], ts[i + 1]
        x0 = denoise(model, x, t, **extra_args)
        report(callback, x, i, t, x0)
        h = log_snr(t_next) - log_snr(t)
        if x0_prev is None or t_next == 0 or not math.isfinite(h_prev):
            d = x0
        else:
            r = h_prev / h
            d = (1 + 1 / (2 * r)) * x0 - (1 / (2 * r)) * x0_prev
        x = (t_next / t) * x - (1 - t_next) * math.expm1(-h) * d
        x0_prev, h_prev = x0, h
        x = end_step(step_end, i, x, t_next)
    return x


def _unipc_coefficients(rks: list[float], h: float, variant: str) -> tuple[list[float], float, float]:
    """UniPC's (b_k / B(h), k = 1…order; h·φ₁ = e^(−h) − 1; B(h)) for data prediction (hh = −h)."""
    hh = -h
    h_phi_1 = math.expm1(hh)
    h_phi_k = h_phi_1 / hh - 1
    b_h = hh if variant == "bh1" else math.expm1(hh)
    b, fact = [], 1
    for k in range(1, len(rks) + 1):
        b.append(h_phi_k * fact / b_h)
        fact *= k + 1
        h_phi_k = h_phi_k / hh - 1 / fact
    return b, h_phi_1, b_h


def _unipc_rhos(rks: list[float], b: list[float], corrector: bool) -> list[float]:
    """Solve R·ρ = b with R[i][j] = rks[j]^i (the predictor drops the last row and column)."""
    k = len(rks) if corrector else len(rks) - 1
    if k == 0:
        return []
    if k == 1:
        return [0.5]
    R = torch.tensor([[rks[j] ** i for j in range(k)] for i in range(k)], dtype=torch.float64)
    return torch.linalg.solve(R, torch.tensor(b[:k], dtype=torch.float64)).tolist()


@torch.no_grad()
def sample_uni_pc(
    model, x, sigmas, extra_args=None, callback=None, disable=None, order=3, variant="bh1", step_end=None
):
    """UniPC (Zhao et al. 2023; ComfyUI's "uni_pc" is variant "bh1", "uni_pc_bh2" is "bh2"): a
    multistep predictor (UniP) of order `order` plus a corrector (UniC) that reuses the model's
    evaluation at the new point, so one evaluation per step at order + 1 accuracy, in flow form with
    data prediction. The history holds the x0s at flow times with finite λ; the order warms up from
    1 and drops to 1 for the step into t = 0 (diffusers' `lower_order_final`)."""
    if variant not in ("bh1", "bh2"):
        raise ConfigError(f"variant must be 'bh1' or 'bh2', got {variant!r}")
    if isinstance(order, bool) or not isinstance(order, int) or not 1 <= order <= 3:
        raise ConfigError(f"order must be 1, 2 or 3, got {order!r}")
    extra_args = extra_args or {}
    ts = flow_times(sigmas)
    hist: list[tuple[float, Tensor]] = []  # (λ, x0) at the visited flow times, newest last
    x_prev = None  # x at the previous flow time (for the corrector)
    prev_order = 0
    for i in step_range(len(ts) - 1, disable):
        s, t = ts[i], ts[i + 1]
        x0 = denoise(model, x, s, **extra_args)
        report(callback, x, i, s, x0)
        lam_s = log_snr(s)
        if x_prev is not None and prev_order > 0:
            x = _unipc_update(x_prev, hist[-prev_order:], lam_s, s, x0, variant, corrector=True)
        hist.append((lam_s, x0))
        finite = [p for p in hist if math.isfinite(p[0])]
        k = min(order, len(finite)) if t > 0 and math.isfinite(lam_s) else 1
        x_prev = x
        if k == 1 or t == 0:
            x = x0 if t == 0 else _first_order(x, s, t, x0)
            prev_order = 1 if t > 0 and math.isfinite(lam_s) else 0
        else:
            x = _unipc_update(x, finite[-k:], log_snr(t), t, None, variant, corrector=False)
            prev_order = k
        x = end_step(step_end, i, x, t)
    return x


def _first_order(x: Tensor, s: float, t: float, x0: Tensor) -> Tensor:
    """DDIM / first-order DPM-Solver++ in flow form: x_t = (t/s)·x_s + (1 − t/s)·x0."""
    return (t / s) * x + (1 - t / s) * x0


def _unipc_update(x, hist, lam_t, t, x0_t, variant, corrector):
    """One UniP (corrector=False) or UniC (x0_t = the model's x0 at the new point) update from the
    newest history point (λ_s, x0_s) to flow time t; hist = the last k points with finite λ."""
    lam_s, m0 = hist[-1]
    s = 1 / (1 + math.exp(lam_s))  # t from λ = log((1 − t)/t)
    h = lam_t - lam_s
    rks = [(lam_i - lam_s) / h for lam_i, _ in reversed(hist[:-1])] + [1.0]
    d1s = [(m_i - m0) / rk for (_, m_i), rk in zip(reversed(hist[:-1]), rks)]
    b, h_phi_1, b_h = _unipc_coefficients(rks, h, variant)
    x_t = (t / s) * x - (1 - t) * h_phi_1 * m0
    rhos = _unipc_rhos(rks, b, corrector)
    res = sum((r * d for r, d in zip(rhos, d1s)), torch.zeros_like(x))
    if corrector:
        res = res + rhos[-1] * (x0_t - m0)
    return x_t - (1 - t) * b_h * res


def _lagrange_weights(
    nodes: list[float], a: float, b: float, weight: Callable[[Tensor], Tensor]
) -> list[float]:
    """∫_a^b L_j(τ)·weight(τ) dτ for the Lagrange basis L_j over `nodes`, by 64-point Gauss–Legendre
    (exact for the polynomial part; the weight here is smooth on [a, b])."""
    import numpy as np  # lazy: importing fluxcore stays cheap

    xs, ws = np.polynomial.legendre.leggauss(64)
    tau = torch.tensor(0.5 * (b - a) * xs + 0.5 * (b + a), dtype=torch.float64)
    w = torch.tensor(0.5 * (b - a) * ws, dtype=torch.float64) * weight(tau)
    out = []
    for j, nj in enumerate(nodes):
        basis = torch.ones_like(tau)
        for m, nm in enumerate(nodes):
            if m != j:
                basis = basis * (tau - nm) / (nj - nm)
        out.append(float((basis * w).sum()))
    return out


@torch.no_grad()
def sample_deis(model, x, sigmas, extra_args=None, callback=None, disable=None, max_order=3, step_end=None):
    """DEIS, time-based Adams–Bashforth (Zhang & Chen 2023, "tAB"; ComfyUI's "deis", max order 3), in
    flow form with data prediction: the exact solution of the flow ODE dx/dt = (x − x0)/t is

        x_t = (t/s)·x_s + t·∫_t^s x0(τ)/τ² dτ,

    and x0(τ) is replaced by the Lagrange polynomial in τ through the last `max_order` x0s (fewer
    while warming up), whose integrals against 1/τ² are the step's weights. The step into t = 0
    returns x0. 1 evaluation per step."""
    if isinstance(max_order, bool) or not isinstance(max_order, int) or not 1 <= max_order <= 4:
        raise ConfigError(f"max_order must be 1…4, got {max_order!r}")
    extra_args = extra_args or {}
    ts = flow_times(sigmas)
    hist: list[tuple[float, Tensor]] = []
    for i in step_range(len(ts) - 1, disable):
        s, t = ts[i], ts[i + 1]
        x0 = denoise(model, x, s, **extra_args)
        report(callback, x, i, s, x0)
        hist = (hist + [(s, x0)])[-max_order:]
        if t == 0:
            x = x0
        else:
            nodes = [p[0] for p in hist]
            weights = _lagrange_weights(nodes, t, s, lambda tau, t=t: t / tau**2)
            x = (t / s) * x + sum(w * m for w, (_, m) in zip(weights, hist))
        x = end_step(step_end, i, x, t)
    return x
