"""Stochastic samplers: each step draws fresh noise (none where eta = 0), from
`noise_sampler(s, t)` when given (k-diffusion's hook) or from `generator` (one, or one per batch
row; see `noise_like`), never from the global RNG, so a seed reproduces an image on any device.

`sample_euler_ancestral` (DDPM's posterior step), the DPM-Solver++ SDE samplers
`sample_dpmpp_2m_sde` / `sample_dpmpp_3m_sde` (ComfyUI's names), and `sample_lcm` (re-noising, for
consistency-distilled models). All in flow form, data prediction: α_t = 1 − t, σ_t = t,
λ = log(α/σ) = `log_snr`. λ is −∞ at t = 1 and +∞ at t = 0, so the step leaving t = 1 and the step
into t = 0 are taken at first order (the finite-difference history needs finite λ), as
`sample_dpmpp_2m` does.
"""

from __future__ import annotations

import math

import torch

from fluxcore.errors import ConfigError
from fluxcore.sampling.denoisers import denoise
from fluxcore.sampling.helpers import end_step, flow_times, log_snr, noise_source, report, step_range


@torch.no_grad()
def sample_euler_ancestral(
    model,
    x,
    sigmas,
    extra_args=None,
    callback=None,
    disable=None,
    eta=1.0,
    generator=None,
    noise_sampler=None,
    step_end=None,
):
    """Ancestral (stochastic) sampler in flow form: the DDPM posterior step q(x_t | x_s, x0 = D(x_s))
    for the path x_t = (1 − t)·x0 + t·ε, with its noise scaled by `eta`.

        ε̂ = (x_s − (1 − s)·D) / s,   c = eta·t·√(1 − ((1 − s)·t / ((1 − t)·s))²)
        x_t = (1 − t)·D + √(t² − c²)·ε̂ + c·z,   z ~ N(0, I)

    eta = 0 is DDIM, i.e. Euler; eta = 1 is DDPM ancestral sampling. Noise comes from
    `noise_sampler(s, t)` when given, else from `generator` (one, or one per batch row; see
    `noise_like`), never from the global RNG. 1 evaluation per step."""
    extra_args = extra_args or {}
    ts = flow_times(sigmas)
    draw = noise_source(generator, noise_sampler)
    for i in step_range(len(ts) - 1, disable):
        s, t = ts[i], ts[i + 1]
        x0 = denoise(model, x, s, **extra_args)
        report(callback, x, i, s, x0)
        if t == 0:
            x = end_step(step_end, i, x0, t)
            continue
        eps = (x - (1 - s) * x0) / s
        ratio = (1 - s) * t / ((1 - t) * s)
        c = eta * t * math.sqrt(max(0.0, 1 - ratio * ratio))
        x = (1 - t) * x0 + math.sqrt(max(0.0, t * t - c * c)) * eps
        if c > 0:
            x = x + c * draw(x, s, t)
        x = end_step(step_end, i, x, t)
    return x


def _sde_coefficients(s: float, t: float, eta: float) -> tuple[float, float, float, float]:
    """(h, ηh, x coefficient, noise coefficient) of the DPM-Solver++ SDE step s → t (0 < t < s ≤ 1):
    x_t = (σ_t/σ_s)·e^(−ηh)·x_s + α_t·(1 − e^(−h−ηh))·D + σ_t·√(1 − e^(−2ηh))·z."""
    h = log_snr(t) - log_snr(s)
    eta_h = 0.0 if eta == 0 else eta * h
    return h, eta_h, (t / s) * math.exp(-eta_h), t * math.sqrt(-math.expm1(-2 * eta_h))


@torch.no_grad()
def sample_dpmpp_2m_sde(
    model,
    x,
    sigmas,
    extra_args=None,
    callback=None,
    disable=None,
    eta=1.0,
    s_noise=1.0,
    generator=None,
    noise_sampler=None,
    solver_type="midpoint",
    step_end=None,
):
    """DPM-Solver++(2M) SDE (Lu et al. 2022; k-diffusion's and ComfyUI's "dpmpp_2m_sde") in flow form:

        x_t = (σ_t/σ_s)·e^(−ηh)·x_s + α_t·(1 − e^(−h−ηh))·D_s + σ_t·√(1 − e^(−2ηh))·s_noise·z
        + α_t·(1 − e^(−h−ηh))·(D_s − D_prev)/(2r)       ("midpoint"; r = h_prev/h)

    eta = 0 is the ODE solver `sample_dpmpp_2m` exactly; eta = 1 adds the SDE's fresh noise.
    solver_type "heun" replaces the ½ by (1 − (1 − e^(−h−ηh))/(h + ηh))/(1 − e^(−h−ηh)).
    Noise: `noise_sampler(s, t)` or `generator` (see `noise_like`). 1 evaluation per step."""
    if solver_type not in ("midpoint", "heun"):
        raise ConfigError(f"solver_type must be 'midpoint' or 'heun', got {solver_type!r}")
    extra_args = extra_args or {}
    ts = flow_times(sigmas)
    draw = noise_source(generator, noise_sampler)
    x0_prev, h_prev = None, math.inf
    for i in step_range(len(ts) - 1, disable):
        s, t = ts[i], ts[i + 1]
        x0 = denoise(model, x, s, **extra_args)
        report(callback, x, i, s, x0)
        if t == 0:
            x = end_step(step_end, i, x0, t)
            continue
        h, eta_h, cx, cz = _sde_coefficients(s, t, eta)
        phi = -math.expm1(-h - eta_h)  # 1 − e^(−h−ηh)
        x = cx * x + (1 - t) * phi * x0
        if x0_prev is not None and math.isfinite(h) and math.isfinite(h_prev):
            r = h_prev / h
            if solver_type == "midpoint":
                x = x + (1 - t) * 0.5 * phi / r * (x0 - x0_prev)
            else:
                x = x + (1 - t) * (1 - phi / (h + eta_h)) / r * (x0 - x0_prev)
        if cz > 0:
            x = x + cz * s_noise * draw(x, s, t)
        x0_prev, h_prev = x0, h
        x = end_step(step_end, i, x, t)
    return x


@torch.no_grad()
def sample_dpmpp_3m_sde(
    model,
    x,
    sigmas,
    extra_args=None,
    callback=None,
    disable=None,
    eta=1.0,
    s_noise=1.0,
    generator=None,
    noise_sampler=None,
    step_end=None,
):
    """DPM-Solver++(3M) SDE (k-diffusion's and ComfyUI's "dpmpp_3m_sde") in flow form: the 2M SDE
    step with D extrapolated from the last three x0s by divided differences in λ,

        x_t = (σ_t/σ_s)·e^(−ηh)·x_s + α_t·[(1 − e^(−ĥ))·D_s + φ₂·d₁ − φ₃·d₂] + σ_t·√(1 − e^(−2ηh))·z,
        ĥ = (1 + η)·h,  φ₂ = (1 − e^(−ĥ))/ĥ − 1 ... (k-diffusion's φ₂ = expm1(−ĥ)/ĥ + 1, φ₃ = φ₂/ĥ − ½)

    eta = 0 is a third-order multistep ODE solver. 1 evaluation per step."""
    extra_args = extra_args or {}
    ts = flow_times(sigmas)
    draw = noise_source(generator, noise_sampler)
    x0_1 = x0_2 = None
    h_1 = h_2 = math.inf
    for i in step_range(len(ts) - 1, disable):
        s, t = ts[i], ts[i + 1]
        x0 = denoise(model, x, s, **extra_args)
        report(callback, x, i, s, x0)
        if t == 0:
            x = end_step(step_end, i, x0, t)
            continue
        h, eta_h, cx, cz = _sde_coefficients(s, t, eta)
        h_eta = h + eta_h
        x = cx * x + (1 - t) * -math.expm1(-h_eta) * x0
        if math.isfinite(h) and math.isfinite(h_1):
            phi_2 = math.expm1(-h_eta) / h_eta + 1
            if math.isfinite(h_2):
                r0, r1 = h_1 / h, h_2 / h
                d1_0 = (x0 - x0_1) / r0
                d1_1 = (x0_1 - x0_2) / r1
                d1 = d1_0 + (d1_0 - d1_1) * r0 / (r0 + r1)
                d2 = (d1_0 - d1_1) / (r0 + r1)
                phi_3 = phi_2 / h_eta - 0.5
                x = x + (1 - t) * (phi_2 * d1 - phi_3 * d2)
            else:
                x = x + (1 - t) * phi_2 * (x0 - x0_1) / (h_1 / h)
        if cz > 0:
            x = x + cz * s_noise * draw(x, s, t)
        x0_1, x0_2, h_1, h_2 = x0, x0_1, h, h_1
        x = end_step(step_end, i, x, t)
    return x


@torch.no_grad()
def sample_lcm(
    model,
    x,
    sigmas,
    extra_args=None,
    callback=None,
    disable=None,
    generator=None,
    noise_sampler=None,
    step_end=None,
):
    """Latent Consistency Model sampling (ComfyUI's "lcm"): each step jumps to the model's x0 and
    re-noises it to the next flow time with fresh noise, x_t = (1 − t)·D + t·z, for few-step
    (consistency-distilled) models. 1 evaluation per step; noise from `noise_sampler` or `generator`."""
    extra_args = extra_args or {}
    ts = flow_times(sigmas)
    draw = noise_source(generator, noise_sampler)
    for i in step_range(len(ts) - 1, disable):
        s, t = ts[i], ts[i + 1]
        x0 = denoise(model, x, s, **extra_args)
        report(callback, x, i, s, x0)
        x = x0 if t == 0 else (1 - t) * x0 + t * draw(x0, s, t)
        x = end_step(step_end, i, x, t)
    return x
