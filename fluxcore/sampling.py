"""Flow-matching schedules and samplers.

Flow time t runs from 1 (pure noise) to 0 (data); x_t = (1 − t)·x0 + t·ε and the transformer
predicts the velocity v = ε − x0 = dx_t/dt. Schedules (`get_schedule`) are kept apart from
solvers, and every solver has k-diffusion's signature

    sample_x(model, x, sigmas, extra_args=None, callback=None, disable=None, **options) -> x

where `model(x, sigma, **extra_args)` returns the denoised x0 and `sigmas` is the flow-time grid
(1 → 0, ending at 0; a list of floats or a 1-D tensor). σ here *is* the flow time t. A model may
also offer `model.velocity(x, sigma, **extra_args)`; first-order steps then use v directly, which
makes `sample_euler` the reference's denoise loop bit for bit. `FlowDenoiser(flux)` turns the
FLUX transformer into such a model; `CFGDenoiser` adds true classifier-free guidance.

A new sampler is a small function over `model`, `x` and the floats of `sigmas`, built from the
public helpers the samplers here use: `flow_times` (sigmas → floats), `step_range` (the loop, with
a progress bar), `velocity` / `denoise` (the model's v or x0 at a flow time), `report` (the step
callback, which `nan_guard` watches), `noise_like` and `log_snr`. Register it in `SAMPLERS` to make
it reachable by name from the pipeline and the command line.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from fluxcore.errors import ConfigError, FluxcoreError

# Schedules live in fluxcore.schedules; these names stay importable from here.
from fluxcore.schedules import (  # noqa: E402, F401
    SCHEDULERS,
    ScheduleConfig,
    get_lin_function,
    get_schedule,
    get_scheduler,
    make_schedule,
    time_shift,
)

# --- the FLUX transformer as a denoiser ----------------------------------------------------


def per_sample(sigma: float | Tensor, x: Tensor) -> Tensor:
    """σ as a [B] tensor in x's dtype on x's device, B = x.shape[0]: what the protocol passes to
    `model(x, sigma)` (the reference builds t with torch.full in the latents' dtype)."""
    if isinstance(sigma, Tensor) and sigma.ndim == 1:
        return sigma.to(device=x.device, dtype=x.dtype)
    return torch.full((x.shape[0],), float(sigma), dtype=x.dtype, device=x.device)


def _bcast(s: Tensor, x: Tensor) -> Tensor:
    return s.reshape(-1, *([1] * (x.ndim - 1)))


class FlowDenoiser:
    """A FLUX transformer behind the sampler protocol.

    `velocity(x, sigma, **cond)` is the transformer's output v [B, L, 64] (model dtype);
    `__call__(x, sigma, **cond)` is the denoised x0 = x − σ·v in x's dtype.

    x: packed latents [B, L, 64]. sigma: a float or a [B] tensor of flow times.
    cond (the sampler's `extra_args`): img_ids [B, L, 3], txt [B, L_txt, ctx], txt_ids [B, L_txt, 3],
    y [B, vec] and, as the conditioning modes need them,
      guidance       float or [B] (dev-type models; ignored by schnell-type models),
      img_cond       [B, L, C] concatenated on channels (Fill: 320, Canny/Depth: 64),
      img_cond_seq   [B, L_ref, 64] with img_cond_seq_ids [B, L_ref, 3] appended to the sequence
                     (Kontext reference tokens; their outputs are dropped).
    """

    def __init__(self, flux: torch.nn.Module):
        self.flux = flux

    def velocity(
        self,
        x: Tensor,
        sigma: float | Tensor,
        *,
        img_ids: Tensor,
        txt: Tensor,
        txt_ids: Tensor,
        y: Tensor,
        guidance: float | Tensor | None = None,
        img_cond: Tensor | None = None,
        img_cond_seq: Tensor | None = None,
        img_cond_seq_ids: Tensor | None = None,
    ) -> Tensor:
        t = per_sample(sigma, x)
        if guidance is not None:
            guidance = per_sample(guidance, x)
        img, ids = x, img_ids
        if img_cond is not None:
            img = torch.cat((img, img_cond.to(x.dtype)), dim=-1)
        if img_cond_seq is not None:
            if img_cond_seq_ids is None:
                raise ConfigError("img_cond_seq (Kontext reference tokens) needs img_cond_seq_ids; got None")
            img = torch.cat((img, img_cond_seq.to(img.dtype)), dim=1)
            ids = torch.cat((ids, img_cond_seq_ids), dim=1)
        v = self.flux(img=img, img_ids=ids, txt=txt, txt_ids=txt_ids, timesteps=t, y=y, guidance=guidance)
        return v[:, : x.shape[1]]

    def __call__(self, x: Tensor, sigma: float | Tensor, **cond) -> Tensor:
        v = self.velocity(x, sigma, **cond)
        return x - _bcast(per_sample(sigma, x), x) * v


def velocity(model, x: Tensor, sigma: float | Tensor, **extra_args) -> Tensor:
    """dx/dt of `model` at (x, σ): its own `velocity` when it has one, else (x − x0)/σ (σ > 0)."""
    if hasattr(model, "velocity"):
        return model.velocity(x, sigma, **extra_args)
    s = per_sample(sigma, x)
    return (x - model(x, s, **extra_args)) / _bcast(s, x)


class CFGDenoiser:
    """True classifier-free guidance with a negative prompt: out = uncond + scale·(cond − uncond).

    `negative` holds the extra_args that differ for the negative prompt (txt, txt_ids, y); the
    rest is shared. This runs the transformer twice per evaluation, so it doubles the cost.
    FLUX.1-dev is guidance-distilled (its `guidance` input already steers towards the prompt), so
    true CFG is optional there; it is what gives schnell/dev a negative prompt at all. Guidance is
    linear, so guiding x0 and guiding v give the same sampler steps.
    """

    def __init__(self, model, scale: float, negative: dict):
        self.model = model
        self.scale = float(scale)
        self.negative = dict(negative)

    def velocity(self, x: Tensor, sigma: float | Tensor, **cond) -> Tensor:
        v_pos = velocity(self.model, x, sigma, **cond)
        v_neg = velocity(self.model, x, sigma, **{**cond, **self.negative})
        return v_neg + self.scale * (v_pos - v_neg)

    def __call__(self, x: Tensor, sigma: float | Tensor, **cond) -> Tensor:
        pos = self.model(x, sigma, **cond)
        neg = self.model(x, sigma, **{**cond, **self.negative})
        return neg + self.scale * (pos - neg)


# --- building blocks for samplers (public: a new sampler uses them) -------------------------


def flow_times(sigmas: Sequence[float] | Tensor) -> list[float]:
    """The sampler's `sigmas` (a list or a 1-D tensor of flow times, 1 → 0) as Python floats;
    a ConfigError when there are fewer than 2 (a start and an end)."""
    ts = sigmas.tolist() if isinstance(sigmas, Tensor) else [float(s) for s in sigmas]
    if len(ts) < 2:
        raise ConfigError(f"sigmas needs at least 2 flow times (start and end), got {len(ts)}")
    return ts


def step_range(n: int, disable: bool | None = None):
    """range(n) for the step loop, shown as a tqdm bar unless `disable` is True (None: a bar only
    when stderr is a terminal, tqdm's rule)."""
    if disable is True:
        return range(n)
    from tqdm.auto import trange  # lazy: importing fluxcore stays cheap

    return trange(n, disable=disable, desc="sampling", leave=False)


def report(
    callback: Callable[[dict], None] | None, x: Tensor, i: int, sigma: float, denoised: Tensor
) -> None:
    """Call `callback` (if any) with k-diffusion's step dict {"x", "i", "sigma", "sigma_hat",
    "denoised"}: the latents at step i, its flow time and the model's x0 there. Call it once per step,
    after the step's first model evaluation; `nan_guard` (below) hangs on it."""
    if callback is not None:
        callback({"x": x, "i": i, "sigma": sigma, "sigma_hat": sigma, "denoised": denoised})


def denoise(model, x: Tensor, sigma: float | Tensor, **extra_args) -> Tensor:
    """The model's x0 at (x, σ): `model(x, per_sample(σ, x), **extra_args)`, the protocol's call."""
    return model(x, per_sample(sigma, x), **extra_args)


# --- samplers --------------------------------------------------------------------------------


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


def log_snr(t: float) -> float:
    """λ(t) = log(α_t/σ_t) = log((1 − t)/t) for the flow path α_t = 1 − t, σ_t = t
    (+inf at t = 0, −inf at t = 1): the time variable of DPM-Solver-type samplers."""
    if t <= 0:
        return math.inf
    if t >= 1:
        return -math.inf
    return math.log1p(-t) - math.log(t)


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


def noise_like(x: Tensor, generator: torch.Generator | Sequence[torch.Generator] | None = None) -> Tensor:
    """Standard normal noise shaped like x, in x's dtype on x's device, for stochastic samplers.

    generator: one torch.Generator for the whole batch, or a list with one per row of x (row i is
    drawn from generator i, so an image's noise does not depend on the rest of its batch). Drawn on
    the generator's device (CPU for a CPU generator), so a seed gives the same samples on any
    device. Never the global RNG: without a generator the noise comes from a fresh CPU generator
    seeded 0 (reproducible; pass generators to vary it)."""
    if generator is None:
        generator = torch.Generator().manual_seed(0)
    if isinstance(generator, torch.Generator):
        return torch.randn(x.shape, generator=generator, dtype=x.dtype, device=generator.device).to(x.device)
    gens = list(generator)
    if len(gens) != x.shape[0]:
        raise ConfigError(f"got {len(gens)} generators for a batch of {x.shape[0]}; give one per row or one")
    rows = [torch.randn(x.shape[1:], generator=g, dtype=x.dtype, device=g.device).to(x.device) for g in gens]
    return torch.stack(rows)


def noise_source(generator=None, noise_sampler=None) -> Callable[[Tensor, float, float], Tensor]:
    """`draw(x, s, t)`: the noise of a step s → t: `noise_sampler(s, t)` when given (k-diffusion's
    hook), else `noise_like(x, generator)`. Each draw advances the generator(s)."""
    if noise_sampler is not None:
        return lambda x, s, t: noise_sampler(s, t)
    if generator is None:
        generator = torch.Generator().manual_seed(0)
    return lambda x, s, t: noise_like(x, generator)


def end_step(step_end: Callable | None, i: int, x: Tensor, sigma_next: float) -> Tensor:
    """After step i (now at flow time sigma_next): `step_end(i, x, sigma_next)` may return new latents
    (None keeps x). This is how the pipeline's `callback_on_step_end` edits latents; every sampler
    here calls it once per step, last thing."""
    if step_end is None:
        return x
    out = step_end(i, x, sigma_next)
    return x if out is None else out


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


# --- SDE and higher-order multistep samplers (ComfyUI's names) ------------------------------
#
# All in flow form, data prediction: α_t = 1 − t, σ_t = t, λ = log(α/σ) = `log_snr`. λ is −∞ at
# t = 1 and +∞ at t = 0, so the step leaving t = 1 and the step into t = 0 are taken at first order
# (the finite-difference history needs finite λ), as `sample_dpmpp_2m` does.


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


SAMPLERS: dict[str, Callable] = {
    "euler": sample_euler,
    "heun": sample_heun,
    "dpmpp_2m": sample_dpmpp_2m,
    "euler_ancestral": sample_euler_ancestral,
    "dpmpp_2m_sde": sample_dpmpp_2m_sde,
    "dpmpp_3m_sde": sample_dpmpp_3m_sde,
    "uni_pc": sample_uni_pc,
    "uni_pc_bh2": functools.partial(sample_uni_pc, variant="bh2"),
    "deis": sample_deis,
    "lcm": sample_lcm,
}


def get_sampler(name: str) -> Callable:
    """The sampler registered under `name` in SAMPLERS; a ConfigError listing the known names otherwise."""
    try:
        return SAMPLERS[name]
    except (KeyError, TypeError):
        raise ConfigError(f"unknown sampler {name!r}; known samplers: {', '.join(SAMPLERS)}") from None


def nan_guard(callback: Callable | None = None, num_steps: int | None = None) -> Callable:
    """A sampler callback that stops sampling when the latents (or the model's x0) stop being finite,
    naming the step and flow time, then calls `callback`."""

    def check(info: dict) -> None:
        if not torch.isfinite(info["denoised"]).all():
            of = f" of {num_steps}" if num_steps else ""
            raise FluxcoreError(
                f"the latents became NaN or infinite at sampling step {info['i'] + 1}{of} "
                f"(t = {info['sigma']:.4f}); expected finite values. Common causes: fp16 weights "
                "(FLUX activations overflow fp16; use bf16 or fp32) or corrupt weights."
            )
        if callback is not None:
            callback(info)

    return check
