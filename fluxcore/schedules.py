"""Schedules: the flow times a sampler visits, kept apart from the solvers (`fluxcore.sampling`).

Flow time t runs from 1 (pure noise) to 0 (data). A schedule is a list of num_steps + 1 floats,
strictly decreasing from 1 to 0. Two independent choices make one:

* the *spacing* over flow time — a named scheduler, a function `fn(num_steps, shift) -> list[float]`
  in `SCHEDULERS`, under ComfyUI's names: "simple" (FLUX's own), "normal", "sgm_uniform",
  "karras", "exponential", "beta";
* the *shift* — how the model bends flow time towards noise (`ScheduleConfig`: FLUX.1-dev's
  resolution-dependent shift, a fixed shift, or none for schnell). Each scheduler places its points
  in unshifted time u ∈ [0, 1] and maps them through `shift`; "karras" and "exponential", which are
  defined by their end points, take the shifted ends σ_max = shift(1) = 1 and σ_min = shift(U_MIN).

`get_schedule(num_steps, image_seq_len, config=...)` is the reference's schedule ("simple").
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from fluxcore.errors import ConfigError

# --- schedule -------------------------------------------------------------------------------


def time_shift(mu: float, sigma: float, t: Tensor) -> Tensor:
    """The reference's resolution shift: e^μ / (e^μ + (1/t − 1)^σ). Maps 1 → 1 and 0 → 0."""
    return math.exp(mu) / (math.exp(mu) + (1 / t - 1) ** sigma)


def get_lin_function(
    x1: float = 256, y1: float = 0.5, x2: float = 4096, y2: float = 1.15
) -> Callable[[float], float]:
    """The line through (x1, y1) and (x2, y2): μ as a function of the packed image token count."""
    m = (y2 - y1) / (x2 - x1)
    b = y1 - m * x1
    return lambda x: m * x + b


# Keys of diffusers' FlowMatchEulerDiscreteScheduler config that change the schedule in ways this
# module does not implement, with the value that leaves the schedule alone.
_UNSUPPORTED_SCHEDULER_KEYS = {
    "shift_terminal": None,
    "use_karras_sigmas": False,
    "use_exponential_sigmas": False,
    "use_beta_sigmas": False,
    "invert_sigmas": False,
    "time_shift_type": "exponential",
}


@dataclass(frozen=True)
class ScheduleConfig:
    """How the flow times are shifted; the defaults are FLUX.1-dev's (the reference's).

    use_dynamic_shifting True: resolution-dependent shift t ← time_shift(μ, 1, t), with μ on the
      line through (base_image_seq_len, base_shift) and (max_image_seq_len, max_shift), evaluated
      at the packed token count.
    use_dynamic_shifting False: a fixed shift t ← shift·t / (1 + (shift − 1)·t); shift 1 leaves the
      schedule alone (FLUX.1-schnell: `ScheduleConfig.unshifted()`).

    The field names are those of diffusers' FlowMatchEulerDiscreteScheduler, whose
    scheduler/scheduler_config.json `from_scheduler_config` reads.
    """

    use_dynamic_shifting: bool = True
    shift: float = 1.0
    base_shift: float = 0.5
    max_shift: float = 1.15
    base_image_seq_len: int = 256
    max_image_seq_len: int = 4096

    def __post_init__(self):
        if not self.shift > 0:
            raise ConfigError(f"schedule shift must be > 0, got {self.shift}")
        if self.base_image_seq_len == self.max_image_seq_len:
            raise ConfigError(
                f"base_image_seq_len and max_image_seq_len must differ (they define the line of μ); "
                f"both are {self.base_image_seq_len}"
            )

    @classmethod
    def unshifted(cls) -> ScheduleConfig:
        """linspace(1, 0) as it is: FLUX.1-schnell's schedule."""
        return cls(use_dynamic_shifting=False, shift=1.0)

    @classmethod
    def from_scheduler_config(cls, config: dict) -> ScheduleConfig:
        """From a diffusers scheduler_config.json dict. Missing keys take diffusers' defaults
        (notably use_dynamic_shifting False, shift 1.0); other diffusers keys are ignored unless they
        ask for a schedule this module does not compute (shift_terminal, Karras/exponential/beta
        sigmas, inverted sigmas, a linear time shift), which is a ConfigError."""
        for key, neutral in _UNSUPPORTED_SCHEDULER_KEYS.items():
            value = config.get(key, neutral)
            if (value != neutral) if isinstance(neutral, str) else bool(value):
                raise ConfigError(
                    f"scheduler config sets {key}={config[key]!r}; fluxcore computes only the FLUX schedule "
                    f"({key}={neutral!r})"
                )
        defaults = {
            "use_dynamic_shifting": False,
            "shift": 1.0,
            "base_shift": 0.5,
            "max_shift": 1.15,
            "base_image_seq_len": 256,
            "max_image_seq_len": 4096,
        }
        values = {k: config.get(k, v) for k, v in defaults.items()}
        # diffusers allows null shifts (they only matter with dynamic shifting): take the defaults
        values = {k: defaults[k] if v is None else v for k, v in values.items()}
        try:
            return cls(
                use_dynamic_shifting=bool(values["use_dynamic_shifting"]),
                shift=float(values["shift"]),
                base_shift=float(values["base_shift"]),
                max_shift=float(values["max_shift"]),
                base_image_seq_len=int(values["base_image_seq_len"]),
                max_image_seq_len=int(values["max_image_seq_len"]),
            )
        except (TypeError, ValueError) as e:
            raise ConfigError(f"scheduler config has a value of the wrong type: {e}; got {values}") from None

    def mu(self, image_seq_len: int) -> float:
        """μ of the dynamic shift for `image_seq_len` packed tokens (diffusers' `calculate_shift`)."""
        line = get_lin_function(
            self.base_image_seq_len, self.base_shift, self.max_image_seq_len, self.max_shift
        )
        return line(image_seq_len)

    def apply(self, t: Tensor, image_seq_len: int) -> Tensor:
        """Shift flow times t (a float32 tensor, 1 → 0) for an image of `image_seq_len` packed tokens."""
        if self.use_dynamic_shifting:
            return time_shift(self.mu(image_seq_len), 1.0, t)
        if self.shift == 1.0:
            return t
        return self.shift * t / (1 + (self.shift - 1) * t)


def get_schedule(
    num_steps: int,
    image_seq_len: int,
    base_shift: float = 0.5,
    max_shift: float = 1.15,
    shift: bool = True,
    *,
    config: ScheduleConfig | None = None,
) -> list[float]:
    """num_steps + 1 flow times from 1 to 0 (the reference's `get_schedule`).

    linspace(1, 0, num_steps + 1) in float32, then shifted by `config` (a `ScheduleConfig`). Without
    `config`, the reference's arguments build one: if `shift`, time_shift(μ, 1, t) with μ on the line
    through (256 tokens, base_shift) and (4096 tokens, max_shift); FLUX.1-schnell is sampled
    unshifted (shift=False). image_seq_len = packed tokens = ⌈H/16⌉·⌈W/16⌉.
    """
    if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 1:
        raise ConfigError(f"num_steps must be an integer >= 1, got {num_steps!r}")
    if config is None:
        config = (
            ScheduleConfig(base_shift=base_shift, max_shift=max_shift)
            if shift
            else ScheduleConfig.unshifted()
        )
    elif (base_shift, max_shift, shift) != (0.5, 1.15, True):
        raise ConfigError(
            "get_schedule: pass either config= or base_shift/max_shift/shift, not both; "
            f"got config={config} with base_shift={base_shift}, max_shift={max_shift}, shift={shift}"
        )
    timesteps = config.apply(torch.linspace(1, 0, num_steps + 1), image_seq_len)
    return timesteps.tolist()


# --- named schedulers (ComfyUI's names), each a function over flow time ------------------------

# The smallest unshifted flow time the table-like schedulers visit before the final jump to 0
# (ComfyUI picks these schedules' points from a discrete table of flow times; here they are
# continuous functions with this floor).
U_MIN = 1e-3

Shift = Callable[[Tensor], Tensor]  # float64 flow times → shifted flow times (1 → 1)


def _no_shift(t: Tensor) -> Tensor:
    return t


def _finish(t: Tensor, shift: Shift) -> list[float]:
    """Shifted points + the final 0, as Python floats."""
    return shift(t.double()).tolist() + [0.0]


def _check_steps(num_steps) -> int:
    if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 1:
        raise ConfigError(f"num_steps must be an integer >= 1, got {num_steps!r}")
    return num_steps


def schedule_simple(num_steps: int, shift: Shift = _no_shift) -> list[float]:
    """Equal steps in unshifted time: shift(1 − i/N), i = 0…N (FLUX's and the reference's schedule;
    ComfyUI's "simple" picks the same points from its table of 1000). float32 linspace as the reference."""
    n = _check_steps(num_steps)
    return shift(torch.linspace(1, 0, n + 1)).tolist()


def schedule_sgm_uniform(num_steps: int, shift: Shift = _no_shift) -> list[float]:
    """N equal steps in unshifted time from 1 to U_MIN with the last point dropped, then 0
    (ComfyUI's "sgm_uniform": linspace(1, U_MIN, N + 1)[:-1])."""
    n = _check_steps(num_steps)
    return _finish(torch.linspace(1, U_MIN, n + 1, dtype=torch.float64)[:-1], shift)


def schedule_normal(num_steps: int, shift: Shift = _no_shift) -> list[float]:
    """N points equally spaced in unshifted time from 1 down to U_MIN, then 0 (ComfyUI's "normal")."""
    n = _check_steps(num_steps)
    if n == 1:
        return [1.0, 0.0]
    return _finish(torch.linspace(1, U_MIN, n, dtype=torch.float64), shift)


def _ends(shift: Shift) -> tuple[float, float]:
    ends = shift(torch.tensor([1.0, U_MIN], dtype=torch.float64)).tolist()
    return ends[0], ends[1]


def schedule_karras(num_steps: int, shift: Shift = _no_shift, rho: float = 7.0) -> list[float]:
    """Karras et al. (2022): σ_i = (σ_max^(1/ρ) + i/(N−1)·(σ_min^(1/ρ) − σ_max^(1/ρ)))^ρ, i = 0…N−1, then 0;
    in flow time with the shifted ends (σ_max = 1, σ_min = shift(U_MIN)); ρ = 7."""
    n = _check_steps(num_steps)
    hi, lo = _ends(shift)
    if n == 1:
        return [hi, 0.0]
    ramp = torch.linspace(0, 1, n, dtype=torch.float64)
    t = (hi ** (1 / rho) + ramp * (lo ** (1 / rho) - hi ** (1 / rho))) ** rho
    return t.tolist() + [0.0]


def schedule_exponential(num_steps: int, shift: Shift = _no_shift) -> list[float]:
    """Equal steps in log flow time from σ_max = 1 to σ_min = shift(U_MIN) (N points), then 0."""
    n = _check_steps(num_steps)
    hi, lo = _ends(shift)
    if n == 1:
        return [hi, 0.0]
    t = torch.linspace(math.log(hi), math.log(lo), n, dtype=torch.float64).exp()
    return t.tolist() + [0.0]


def _beta_ppf(q: Tensor, a: float, b: float) -> Tensor:
    """Quantiles of Beta(a, b) (a, b > 0) by inverting its CDF, integrated numerically on
    x = sin²θ, where the density becomes the bounded 2·sin^(2a−1)θ·cos^(2b−1)θ for a, b ≥ ½."""
    theta = torch.linspace(0, math.pi / 2, 200_001, dtype=torch.float64)
    dens = 2 * theta.sin().clamp_min(1e-300) ** (2 * a - 1) * theta.cos().clamp_min(1e-300) ** (2 * b - 1)
    cdf = torch.cat([torch.zeros(1, dtype=torch.float64), torch.cumulative_trapezoid(dens, theta)])
    cdf = cdf / cdf[-1]
    idx = torch.searchsorted(cdf, q.clamp(0, 1)).clamp(1, len(cdf) - 1)
    lo, hi = cdf[idx - 1], cdf[idx]
    frac = torch.where(hi > lo, (q - lo) / (hi - lo), torch.zeros_like(q))
    th = theta[idx - 1] + frac * (theta[idx] - theta[idx - 1])
    return th.sin() ** 2


def schedule_beta(
    num_steps: int, shift: Shift = _no_shift, alpha: float = 0.6, beta: float = 0.6
) -> list[float]:
    """ComfyUI's "beta" (Lee et al. 2024, "Beta Sampling is All You Need"): unshifted times at the
    Beta(α, β) quantiles of 1 − i/N (i = 0…N−1; α = β = 0.6 put more steps near both ends),
    clamped to [U_MIN, 1], then 0. α, β must be ≥ ½ here."""
    n = _check_steps(num_steps)
    if alpha < 0.5 or beta < 0.5:
        raise ConfigError(f"schedule_beta needs alpha, beta >= 0.5; got {alpha}, {beta}")
    q = 1 - torch.arange(n, dtype=torch.float64) / n
    return _finish(_beta_ppf(q, alpha, beta).clamp(U_MIN, 1.0), shift)


SCHEDULERS: dict[str, Callable[..., list[float]]] = {
    "simple": schedule_simple,
    "normal": schedule_normal,
    "karras": schedule_karras,
    "exponential": schedule_exponential,
    "beta": schedule_beta,
    "sgm_uniform": schedule_sgm_uniform,
}


def get_scheduler(name: str) -> Callable[..., list[float]]:
    """The scheduler registered under `name` in SCHEDULERS; a ConfigError listing the names otherwise."""
    try:
        return SCHEDULERS[name]
    except (KeyError, TypeError):
        raise ConfigError(f"unknown scheduler {name!r}; known schedulers: {', '.join(SCHEDULERS)}") from None


def make_schedule(
    name: str, num_steps: int, image_seq_len: int, config: ScheduleConfig | None = None
) -> list[float]:
    """num_steps + 1 flow times 1 → 0 from scheduler `name`, shifted by `config` (default FLUX.1-dev's)
    for an image of `image_seq_len` packed tokens. "simple" is `get_schedule`."""
    config = config or ScheduleConfig()
    if name == "simple":
        return get_schedule(num_steps, image_seq_len, config=config)
    return get_scheduler(name)(num_steps, lambda t: config.apply(t, image_seq_len))
