"""Flow-matching samplers.

Flow time t runs from 1 (pure noise) to 0 (data); x_t = (1 − t)·x0 + t·ε and the transformer
predicts the velocity v = ε − x0 = dx_t/dt. Schedules (`get_schedule`, in fluxcore.schedules and
re-exported here) are kept apart from solvers, and every solver has k-diffusion's signature

    sample_x(model, x, sigmas, extra_args=None, callback=None, disable=None, **options) -> x

where `model(x, sigma, **extra_args)` returns the denoised x0 and `sigmas` is the flow-time grid
(1 → 0, ending at 0; a list of floats or a 1-D tensor). σ here *is* the flow time t. A model may
also offer `model.velocity(x, sigma, **extra_args)`; first-order steps then use v directly, which
makes `sample_euler` the reference's denoise loop bit for bit. `FlowDenoiser(flux)` turns the
FLUX transformer into such a model; `CFGDenoiser` adds true classifier-free guidance.

    denoisers.py   FlowDenoiser, CFGDenoiser; calling a model: per_sample, velocity, denoise
    helpers.py     the loop's building blocks: flow_times, step_range, report, end_step,
                   noise_like, noise_source, log_snr, nan_guard
    ode.py         deterministic: euler, heun, dpmpp_2m, uni_pc, deis
    sde.py         stochastic: euler_ancestral, dpmpp_2m_sde, dpmpp_3m_sde, lcm

A new sampler is a small function over `model`, `x` and the floats of `sigmas`, built from the
public helpers the samplers here use: `flow_times` (sigmas → floats), `step_range` (the loop, with
a progress bar), `velocity` / `denoise` (the model's v or x0 at a flow time), `report` (the step
callback, which `nan_guard` watches), `noise_like` and `log_snr`. Register it in `SAMPLERS` to make
it reachable by name from the pipeline and the command line.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

from fluxcore.errors import ConfigError
from fluxcore.sampling.denoisers import CFGDenoiser, FlowDenoiser, denoise, per_sample, velocity
from fluxcore.sampling.helpers import (
    end_step,
    flow_times,
    log_snr,
    nan_guard,
    noise_like,
    noise_source,
    report,
    step_range,
)
from fluxcore.sampling.ode import sample_deis, sample_dpmpp_2m, sample_euler, sample_heun, sample_uni_pc
from fluxcore.sampling.sde import sample_dpmpp_2m_sde, sample_dpmpp_3m_sde, sample_euler_ancestral, sample_lcm

# Schedules live in fluxcore.schedules; these names stay importable from here.
from fluxcore.schedules import (
    SCHEDULERS,
    ScheduleConfig,
    get_lin_function,
    get_schedule,
    get_scheduler,
    make_schedule,
    time_shift,
)

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


__all__ = [
    "SAMPLERS",
    "SCHEDULERS",
    "CFGDenoiser",
    "FlowDenoiser",
    "ScheduleConfig",
    "denoise",
    "end_step",
    "flow_times",
    "get_lin_function",
    "get_sampler",
    "get_schedule",
    "get_scheduler",
    "log_snr",
    "make_schedule",
    "nan_guard",
    "noise_like",
    "noise_source",
    "per_sample",
    "report",
    "sample_deis",
    "sample_dpmpp_2m",
    "sample_dpmpp_2m_sde",
    "sample_dpmpp_3m_sde",
    "sample_euler",
    "sample_euler_ancestral",
    "sample_heun",
    "sample_lcm",
    "sample_uni_pc",
    "step_range",
    "time_shift",
    "velocity",
]
