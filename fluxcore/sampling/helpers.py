"""The loop side of a sampler: the public building blocks every sampler here is made of, and that
a new sampler uses — `flow_times` (sigmas → floats), `step_range` (the loop, with a progress bar),
`report` (the step callback, which `nan_guard` watches), `end_step` (the step_end hook),
`noise_like` / `noise_source` (seeded noise for stochastic samplers) and `log_snr` (the time
variable of DPM-Solver-type methods). The model side (`velocity`, `denoise`) is in denoisers.py.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from fluxcore.errors import ConfigError, FluxcoreError


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


def end_step(step_end: Callable | None, i: int, x: Tensor, sigma_next: float) -> Tensor:
    """After step i (now at flow time sigma_next): `step_end(i, x, sigma_next)` may return new latents
    (None keeps x). This is how the pipeline's `callback_on_step_end` edits latents; every sampler
    here calls it once per step, last thing."""
    if step_end is None:
        return x
    out = step_end(i, x, sigma_next)
    return x if out is None else out


def log_snr(t: float) -> float:
    """λ(t) = log(α_t/σ_t) = log((1 − t)/t) for the flow path α_t = 1 − t, σ_t = t
    (+inf at t = 0, −inf at t = 1): the time variable of DPM-Solver-type samplers."""
    if t <= 0:
        return math.inf
    if t >= 1:
        return -math.inf
    return math.log1p(-t) - math.log(t)


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
