"""Rectified-flow training: the loss, timestep sampling, EMA and a minimal loop.

The flow (FLUX, SD3): a clean sample x0 and Gaussian noise ε are joined by a straight line,

    x_t = (1 − t)·x0 + t·ε,        t ∈ [0, 1]  (t = 1 is pure noise, as in the sampler)

and the model learns its constant velocity v = dx_t/dt = ε − x0 by mean squared error. The sampler
(`fluxcore.sampling`) integrates the same v from t = 1 down to t = 0.

Timesteps: uniform, or logit-normal (t = sigmoid(n), n ~ N(mean, std): SD3's choice, which puts
more training on the middle of the path), optionally moved toward noise for large images by the
same resolution-dependent shift the FLUX sampler uses (μ from the packed token count).

`train` is a plain loop (no framework) for any `FluxConfig`: pass an iterable of batches and,
when conditioning must stay in the autograd graph (text encoders trained jointly, an autoencoder
applied on the fly), a `condition` function that turns a raw batch into model inputs.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from fluxcore.errors import ConfigError, TrainingDivergedError
from fluxcore.latents import make_img_ids, pack
from fluxcore.sampling import get_lin_function, time_shift

# --- timesteps --------------------------------------------------------------------------------


def sample_timesteps(
    n: int,
    method: str = "logit_normal",
    *,
    mean: float = 0.0,
    std: float = 1.0,
    image_seq_len: int | None = None,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> Tensor:
    """Training flow times: [n] float32 in (0, 1).

    method: "uniform" (t ~ U(0, 1)) or "logit_normal" (t = sigmoid(N(mean, std))).
    image_seq_len: when given, move t toward noise by the FLUX sampler's resolution shift,
    time_shift(μ, 1, t) with μ on the line through (256 tokens, 0.5) and (4096 tokens, 1.15).
    The draw happens on the generator's device (CPU unless a CUDA generator is passed), so a
    seed gives the same times everywhere; the result is then moved to `device`.
    """
    gen_device = generator.device if generator is not None else "cpu"
    if method == "uniform":
        t = torch.rand(n, generator=generator, device=gen_device)
    elif method == "logit_normal":
        t = torch.sigmoid(torch.normal(mean, std, size=(n,), generator=generator, device=gen_device))
    else:
        raise ConfigError(f"timestep sampling method must be 'uniform' or 'logit_normal'; got {method!r}")
    if image_seq_len is not None:
        t = time_shift(get_lin_function()(image_seq_len), 1.0, t)
    return t.to(device=device if device is not None else t.device, dtype=torch.float32)


# --- the loss ---------------------------------------------------------------------------------


def interpolate(x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
    """x_t = (1 − t)·x0 + t·ε; t [B] broadcasts over the remaining dims of x0 [B, ...]."""
    t = t.reshape(-1, *([1] * (x0.ndim - 1))).to(x0.dtype)
    return (1 - t) * x0 + t * noise


def velocity_target(x0: Tensor, noise: Tensor) -> Tensor:
    """v = ε − x0, the constant velocity of the straight path."""
    return noise - x0


def flow_loss(
    model: nn.Module,
    img: Tensor,
    img_ids: Tensor,
    txt: Tensor,
    txt_ids: Tensor,
    y: Tensor,
    t: Tensor,
    noise: Tensor | None = None,
    guidance: Tensor | None = None,
    img_cond: Tensor | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Mean squared error between the model's velocity and ε − x0, a float32 scalar.

    img [B, L, C] clean packed latents (x0); img_ids [B, L, 3]; txt [B, L_txt, ctx];
    txt_ids [B, L_txt, 3]; y [B, vec]; t [B] in [0, 1]; noise like img (drawn from `generator`
    when None); guidance [B] for guidance-embedded models; img_cond [B, L, C'] is concatenated to
    the noisy latents on the channel axis (fill/canny/depth models, in_channels = C + C').
    """
    if noise is None:
        noise = torch.randn(img.shape, generator=generator, device=img.device, dtype=img.dtype)
    x_t = interpolate(img, noise, t)
    inp = x_t if img_cond is None else torch.cat((x_t, img_cond.to(x_t.dtype)), dim=-1)
    v = model(inp, img_ids, txt, txt_ids, t, y, guidance)
    return (v.float() - velocity_target(img, noise).float()).square().mean()


# --- EMA --------------------------------------------------------------------------------------


class EMA:
    """Exponential moving average of a model's floating-point parameters and buffers.

    `ema.model` is a frozen deep copy (eval mode) usable anywhere the model is: sample with it,
    save it. decay ramps up as min(decay, (1 + n) / (10 + n)) so early averages do not remember
    the random initialisation for thousands of steps.
    """

    def __init__(self, model: nn.Module, decay: float = 0.999):
        if not 0.0 < decay < 1.0:
            raise ConfigError(f"EMA decay must lie in (0, 1); got {decay}")
        self.decay, self.num_updates = decay, 0
        self.model = copy.deepcopy(model).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        self.num_updates += 1
        d = min(self.decay, (1 + self.num_updates) / (10 + self.num_updates))
        src = dict(model.state_dict())
        for name, shadow in self.model.state_dict().items():
            if shadow.is_floating_point():
                shadow.lerp_(src[name].detach().to(shadow.dtype), 1.0 - d)
            else:
                shadow.copy_(src[name])


# --- the loop ---------------------------------------------------------------------------------


@dataclass
class TrainConfig:
    """Hyper-parameters of `train`.

    steps: optimizer steps. lr, weight_decay, betas: AdamW. warmup: linear LR warm-up steps;
    then constant, or cosine to lr·min_lr_ratio when cosine=True. grad_clip: global norm (None: off).
    timesteps, logit_mean, logit_std: see `sample_timesteps`; resolution_shift: apply the FLUX
    shift for the batch's token count. guidance: the value fed to guidance-embedded models when a
    batch has none. seed: noise and timesteps.
    log_every: print a line every N steps (0: silent). max_seconds: stop early after this much
    wall time (for fixed compute budgets; the LR schedule still assumes `steps`).
    checkpoint_every, checkpoint_path: save the model with `save_checkpoint` (atomically) every N
    steps and after the last one (0: never).
    Every value is checked when the config is made and again when `train` starts (ConfigError
    naming the field, the value and the valid range).
    """

    steps: int = 1000
    lr: float = 1e-4
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    warmup: int = 0
    cosine: bool = False
    min_lr_ratio: float = 0.1
    grad_clip: float | None = 1.0
    timesteps: str = "logit_normal"
    logit_mean: float = 0.0
    logit_std: float = 1.0
    resolution_shift: bool = True
    guidance: float = 1.0
    seed: int = 0
    log_every: int = 0
    max_seconds: float | None = None
    checkpoint_every: int = 0
    checkpoint_path: str | Path | None = None

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        """Raise ConfigError for the first value out of range."""

        def num(v) -> bool:
            return not isinstance(v, bool) and isinstance(v, (int, float)) and math.isfinite(v)

        def integer(v) -> bool:
            return not isinstance(v, bool) and isinstance(v, int)

        betas = self.betas
        checks = [
            ("steps", integer(self.steps) and self.steps >= 1, "an int >= 1"),
            ("lr", num(self.lr) and self.lr > 0, "a finite number > 0"),
            ("weight_decay", num(self.weight_decay) and self.weight_decay >= 0, "a finite number >= 0"),
            (
                "betas",
                isinstance(betas, (tuple, list))
                and len(betas) == 2
                and all(num(b) and 0 <= b < 1 for b in betas),
                "two numbers in [0, 1)",
            ),
            ("warmup", integer(self.warmup) and self.warmup >= 0, "an int >= 0"),
            ("cosine", isinstance(self.cosine, bool), "a bool"),
            ("min_lr_ratio", num(self.min_lr_ratio) and 0 <= self.min_lr_ratio <= 1, "a number in [0, 1]"),
            (
                "grad_clip",
                self.grad_clip is None or (num(self.grad_clip) and self.grad_clip > 0),
                "None or a finite number > 0",
            ),
            ("timesteps", self.timesteps in ("uniform", "logit_normal"), "'uniform' or 'logit_normal'"),
            ("logit_mean", num(self.logit_mean), "a finite number"),
            ("logit_std", num(self.logit_std) and self.logit_std > 0, "a finite number > 0"),
            ("resolution_shift", isinstance(self.resolution_shift, bool), "a bool"),
            ("guidance", num(self.guidance), "a finite number"),
            ("seed", integer(self.seed), "an int"),
            ("log_every", integer(self.log_every) and self.log_every >= 0, "an int >= 0"),
            (
                "max_seconds",
                self.max_seconds is None
                or (
                    not isinstance(self.max_seconds, bool)
                    and isinstance(self.max_seconds, (int, float))
                    and self.max_seconds > 0
                ),
                "None or a number > 0",
            ),
            (
                "checkpoint_every",
                integer(self.checkpoint_every) and self.checkpoint_every >= 0,
                "an int >= 0",
            ),
        ]
        for name, ok, expected in checks:
            if not ok:
                raise ConfigError(f"TrainConfig.{name} must be {expected}, got {getattr(self, name)!r:.80}")
        if self.checkpoint_every and self.checkpoint_path is None:
            raise ConfigError("TrainConfig.checkpoint_every is set but checkpoint_path is None")


def lr_at(step: int, config: TrainConfig) -> float:
    """Learning rate for optimizer step `step` (0-based)."""
    if config.warmup and step < config.warmup:
        return config.lr * (step + 1) / config.warmup
    if not config.cosine:
        return config.lr
    progress = (step - config.warmup) / max(1, config.steps - config.warmup)
    floor = config.lr * config.min_lr_ratio
    return floor + 0.5 * (config.lr - floor) * (1 + math.cos(math.pi * min(1.0, progress)))


def prepare_batch(batch: dict, model: nn.Module, guidance: float = 1.0) -> dict:
    """Fill in what a batch may leave out, in the model's layout.

    batch keys: "latents" [B, 16, h, w] (packed here) or "img" [B, L, C] with "img_ids";
    "txt" [B, L_txt, ctx]; "y" [B, vec]; optional "txt_ids" (zeros), "guidance" [B],
    "img_cond" [B, L, C'] (already packed) or "cond_latents" [B, C'', h, w] (packed here).
    """
    out = dict(batch)
    if "img" not in out:
        if "latents" not in out:
            raise ConfigError(
                f"a training batch needs 'latents' [B, C, h, w] or 'img' [B, L, C]; got keys {sorted(batch)}"
            )
        lat = out.pop("latents")
        b, _, h, w = lat.shape
        out["img"] = pack(lat)
        # make_img_ids takes pixel sizes: the latent grid is 8x smaller than the image
        out["img_ids"] = make_img_ids(b, 8 * h, 8 * w, device=lat.device)
    if "cond_latents" in out:
        out["img_cond"] = pack(out.pop("cond_latents"))
    img, txt = out["img"], out["txt"]
    if "txt_ids" not in out:
        # float32 like the image ids (make_img_ids); text sits at position (0, 0, 0)
        out["txt_ids"] = torch.zeros(txt.shape[0], txt.shape[1], 3, device=txt.device)
    if getattr(model, "config", None) is not None and model.config.guidance_embed and "guidance" not in out:
        out["guidance"] = torch.full((img.shape[0],), float(guidance), device=img.device, dtype=img.dtype)
    return out


def _forever(batches: Iterable) -> Iterator:
    passes = 0
    while True:
        n = 0
        for batch in batches:
            n += 1
            yield batch
        if n == 0:
            if passes == 0:
                raise ConfigError("the training data yielded no batches")
            # A generator or iterator runs dry after one pass; say so instead of "no batches".
            raise ConfigError(
                f"the training data was exhausted after one pass and cannot be re-iterated "
                f"({type(batches).__name__}); pass a list, a DataLoader, or anything iterable more than once"
            )
        passes += 1


def train(
    model: nn.Module,
    batches: Iterable,
    config: TrainConfig | None = None,
    *,
    condition: Callable[[object], dict] | None = None,
    extra_params: Iterable[nn.Parameter] = (),
    optimizer: torch.optim.Optimizer | None = None,
    ema: EMA | None = None,
    on_step: Callable[[int, float], None] | None = None,
) -> list[float]:
    """Train `model` (a `Flux`, or anything with its forward signature) by the rectified-flow loss.

    batches: iterable of batches, re-iterated until `config.steps` steps are done. A batch is a
    dict as `prepare_batch` describes, or anything `condition(batch)` turns into one; `condition`
    runs inside the autograd graph, so modules it uses (text encoders) train too when their
    parameters are passed in `extra_params`.
    optimizer: default AdamW over model + extra parameters (its LR is set each step from config).
    ema: an `EMA(model, decay)` to update after every step (sample and save with `ema.model`).
    on_step(step, loss): called after every step. Returns the per-step losses (floats).

    A NaN/Inf loss or gradient norm stops training with TrainingDivergedError naming the step,
    before that step touches the weights, the EMA or the checkpoint: the model (and the file at
    `config.checkpoint_path`) keep the last finite step's weights.
    """
    config = config or TrainConfig()
    config.validate()
    params = [p for p in model.parameters() if p.requires_grad] + list(extra_params)
    if optimizer is None:
        optimizer = torch.optim.AdamW(
            params, lr=config.lr, betas=config.betas, weight_decay=config.weight_decay
        )
    gen = torch.Generator().manual_seed(config.seed)
    model.train()
    losses: list[float] = []
    start = time.perf_counter()
    for step, raw in zip(range(config.steps), _forever(batches)):
        batch = prepare_batch(condition(raw) if condition else raw, model, config.guidance)
        img = batch["img"]
        t = sample_timesteps(
            img.shape[0],
            config.timesteps,
            mean=config.logit_mean,
            std=config.logit_std,
            image_seq_len=img.shape[1] if config.resolution_shift else None,
            generator=gen,
            device=img.device,
        )
        noise = torch.randn(img.shape, generator=gen, dtype=torch.float32).to(img.device, img.dtype)
        loss = flow_loss(
            model,
            img,
            batch["img_ids"],
            batch["txt"],
            batch["txt_ids"],
            batch["y"],
            t,
            noise=noise,
            guidance=batch.get("guidance"),
            img_cond=batch.get("img_cond"),
        )
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, config)
        value = loss.item()
        if not math.isfinite(value):
            raise TrainingDivergedError(_diverged(step, f"the loss is {value}", config), step)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grads = [p.grad for p in params if p.grad is not None]
        if config.grad_clip is not None:
            norm = torch.nn.utils.clip_grad_norm_(params, config.grad_clip)
        else:
            norm = torch.nn.utils.get_total_norm(grads) if grads else torch.zeros(())
        if not bool(torch.isfinite(norm)):
            optimizer.zero_grad(set_to_none=True)
            raise TrainingDivergedError(
                _diverged(step, f"the loss is {value:.4g} but the gradient norm is {float(norm)}", config),
                step,
            )
        optimizer.step()
        if ema is not None:
            ema.update(model)
        losses.append(value)
        done = step + 1
        if config.checkpoint_every and (done % config.checkpoint_every == 0 or done == config.steps):
            save_checkpoint(model, config.checkpoint_path)
        if on_step is not None:
            on_step(step, losses[-1])
        if config.log_every and (step + 1) % config.log_every == 0:
            recent = losses[-config.log_every :]
            print(
                f"step {step + 1}/{config.steps}  loss {sum(recent) / len(recent):.4f}  "
                f"lr {lr_at(step, config):.2e}  {time.perf_counter() - start:.0f}s",
                flush=True,
            )
        if config.max_seconds is not None and time.perf_counter() - start > config.max_seconds:
            if config.log_every:
                print(f"stopping at step {step + 1}: max_seconds={config.max_seconds:g} reached", flush=True)
            break
    return losses


def _diverged(step: int, what: str, config: TrainConfig) -> str:
    kept = f"; {config.checkpoint_path} holds the last checkpoint saved" if config.checkpoint_every else ""
    return (
        f"training diverged at step {step} (0-based): {what}. The step was not applied: the model keeps the "
        f"weights after step {step - 1}{kept}. Try a lower lr (now {config.lr:g}), warmup, or grad_clip"
    )


def save_checkpoint(model: nn.Module, path: str | Path, **save_options) -> Path:
    """Write the transformer's weights where `fluxcore.load_flux` (and the reference loaders)
    read them: a BFL single file by default; `save_options` go to `fluxcore.save_flux`
    (e.g. format="diffusers"). Pass `ema.model` to save the averaged weights.
    Atomic: a reader sees the previous checkpoint or this one, never a mix; weights holding
    NaN/Inf are refused (NonFiniteWeightsError) and the previous checkpoint stays."""
    from fluxcore.weights import save_flux

    save_flux(model, path, **save_options)
    return Path(path)
