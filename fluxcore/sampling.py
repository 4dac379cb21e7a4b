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

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from fluxcore.errors import ConfigError, FluxcoreError

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
def sample_euler(model, x, sigmas, extra_args=None, callback=None, disable=None):
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
        x = x + (t_prev - t_curr) * v
    return x


@torch.no_grad()
def sample_heun(model, x, sigmas, extra_args=None, callback=None, disable=None):
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
def sample_dpmpp_2m(model, x, sigmas, extra_args=None, callback=None, disable=None):
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
    return x


def noise_like(x: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """Standard normal noise shaped like x, in x's dtype and on x's device, for stochastic samplers."""
    if generator is None:
        return torch.randn_like(x)
    # Drawn on the generator's device (CPU for a CPU generator), so a seed is device-independent.
    return torch.randn(x.shape, generator=generator, dtype=x.dtype, device=generator.device).to(x.device)


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
):
    """Ancestral (stochastic) sampler in flow form: the DDPM posterior step q(x_t | x_s, x0 = D(x_s))
    for the path x_t = (1 − t)·x0 + t·ε, with its noise scaled by `eta`.

        ε̂ = (x_s − (1 − s)·D) / s,   c = eta·t·√(1 − ((1 − s)·t / ((1 − t)·s))²)
        x_t = (1 − t)·D + √(t² − c²)·ε̂ + c·z,   z ~ N(0, I)

    eta = 0 is DDIM, i.e. Euler; eta = 1 is DDPM ancestral sampling. Noise comes from
    `noise_sampler(s, t)` when given, else from `generator` (drawn on its device, so a CPU generator
    gives the same samples on any device), else from the global RNG. 1 evaluation per step."""
    extra_args = extra_args or {}
    ts = flow_times(sigmas)
    for i in step_range(len(ts) - 1, disable):
        s, t = ts[i], ts[i + 1]
        x0 = denoise(model, x, s, **extra_args)
        report(callback, x, i, s, x0)
        if t == 0:
            x = x0
            continue
        eps = (x - (1 - s) * x0) / s
        ratio = (1 - s) * t / ((1 - t) * s)
        c = eta * t * math.sqrt(max(0.0, 1 - ratio * ratio))
        x = (1 - t) * x0 + math.sqrt(max(0.0, t * t - c * c)) * eps
        if c > 0:
            z = noise_sampler(s, t) if noise_sampler is not None else noise_like(x, generator)
            x = x + c * z
    return x


SAMPLERS: dict[str, Callable] = {
    "euler": sample_euler,
    "heun": sample_heun,
    "dpmpp_2m": sample_dpmpp_2m,
    "euler_ancestral": sample_euler_ancestral,
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
