"""What `FluxPipeline.__call__` checks before any model runs, and the small objects around it.

`validate` turns the call's keywords into a `Request` (defaults filled in, every misuse a
ConfigError naming the argument); `Scheduler` is `pipe.scheduler` (the schedule's config under
diffusers' field names); `lora_scale` applies `joint_attention_kwargs={"scale": s}`.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from fluxcore.conditioning import check_inputs, kontext_size
from fluxcore.errors import ConfigError
from fluxcore.images import check_output_type, check_side
from fluxcore.sampling import get_sampler
from fluxcore.schedules import ScheduleConfig, get_scheduler

# The tensors `callback_on_step_end` may read and replace (diffusers' FluxPipeline has the same two).
CALLBACK_TENSOR_INPUTS = ("latents", "prompt_embeds")


@dataclass(frozen=True)
class Request:
    """A call's arguments after validation and defaulting."""

    prompts: list[str] | None  # CLIP prompts (None when prompt_embeds are given)
    prompts_2: list[str] | None  # T5 prompts
    negative: list[str] | None  # negative CLIP prompts, when true CFG runs from text
    negative_2: list[str] | None
    batch: int  # prompts (or prompt_embeds rows)
    n: int  # images: batch × num_images_per_prompt
    mode: str
    height: int
    width: int
    steps: int
    sample: Callable
    true_cfg: bool


class Scheduler:
    """`pipe.scheduler`: the schedule as diffusers' FlowMatchEulerDiscreteScheduler describes it.

    `config` is a dict with diffusers' field names (use_dynamic_shifting, shift, base_shift,
    max_shift, base_image_seq_len, max_image_seq_len); assigning `pipe.scheduler` a diffusers
    scheduler, a dict or a `ScheduleConfig` sets `pipe.schedule`. The solver is the call's `sampler=`."""

    def __init__(self, schedule: ScheduleConfig):
        self.schedule = schedule

    @property
    def config(self) -> dict:
        s = self.schedule
        return {
            "_class_name": "FlowMatchEulerDiscreteScheduler",
            "use_dynamic_shifting": s.use_dynamic_shifting,
            "shift": s.shift,
            "base_shift": s.base_shift,
            "max_shift": s.max_shift,
            "base_image_seq_len": s.base_image_seq_len,
            "max_image_seq_len": s.max_image_seq_len,
        }

    def __repr__(self) -> str:
        return f"Scheduler({self.schedule})"

    @staticmethod
    def to_schedule(value) -> ScheduleConfig:
        if isinstance(value, Scheduler):
            return value.schedule
        if isinstance(value, ScheduleConfig):
            return value
        config = getattr(value, "config", value)
        if isinstance(config, dict) or hasattr(config, "keys"):
            return ScheduleConfig.from_scheduler_config(dict(config))
        raise ConfigError(
            f"pipe.scheduler takes a ScheduleConfig, a scheduler config dict or an object with .config; "
            f"got {type(value).__name__}"
        )


@contextlib.contextmanager
def lora_scale(models, joint_attention_kwargs: dict | None):
    """diffusers' `joint_attention_kwargs`: only {"scale": s} (the LoRA scale) means something
    here; it multiplies the strength of every live adapter of `models` (the transformer and the
    text encoders; None entries are skipped) for the call. Other keys are refused."""
    kwargs = dict(joint_attention_kwargs or {})
    unknown = sorted(set(kwargs) - {"scale"})
    if unknown:
        raise ConfigError(
            f"joint_attention_kwargs: fluxcore has no attention processors; only {{'scale': s}} (the LoRA "
            f"scale) is accepted, got keys {unknown}. Swap attention with fluxcore.set_attention_backend"
        )
    scale = kwargs.get("scale", 1.0)
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise ConfigError(f"joint_attention_kwargs['scale'] must be a number, got {scale!r}")
    buffers = []
    if scale != 1.0:
        from fluxcore.lora.layer import Adapter

        if isinstance(models, nn.Module):
            models = [models]
        buffers = [a.weight for m in models if m is not None for a in m.modules() if isinstance(a, Adapter)]
    saved = [b.clone() for b in buffers]
    for b in buffers:
        b.mul_(float(scale))
    try:
        yield
    finally:
        for b, s in zip(buffers, saved):
            b.copy_(s)


def _prompt_list(value, name: str) -> list[str]:
    if isinstance(value, str):
        value = [value]
    elif value is None or isinstance(value, bytes) or not isinstance(value, Sequence) or not len(value):
        raise ConfigError(f"{name} must be a string or a non-empty list of strings; got {value!r}")
    if not all(isinstance(p, str) for p in value):
        raise ConfigError(f"every {name} must be a string; got types {[type(p).__name__ for p in value][:5]}")
    for p in value:
        try:
            p.encode("utf-8")  # the tokenizers take UTF-8; a lone surrogate cannot be encoded
        except UnicodeEncodeError as e:
            raise ConfigError(
                f"{name} {p!r} is not valid Unicode text ({e.reason} at position {e.start})"
            ) from None
    return list(value)


def _matching(value, batch: int, name: str, default: list[str] | None) -> list[str] | None:
    """A second prompt list (prompt_2, negative prompts): one string for all, or one per prompt."""
    if value is None:
        return default
    out = [value] * batch if isinstance(value, str) else _prompt_list(value, name)
    if len(out) != batch:
        raise ConfigError(f"got {len(out)} {name}s for {batch} prompts; give one per prompt or one string")
    return out


def _embeds(prompt_embeds, pooled, name: str, pooled_name: str) -> int:
    if not isinstance(prompt_embeds, Tensor) or prompt_embeds.ndim != 3:
        raise ConfigError(
            f"{name} must be a tensor [B, L, 4096] (T5 output); got {getattr(prompt_embeds, 'shape', prompt_embeds)!r}"
        )
    if not isinstance(pooled, Tensor) or pooled.ndim != 2:
        raise ConfigError(
            f"{name} needs {pooled_name} as well: a tensor [B, 768] (CLIP pooled output), as diffusers requires"
        )
    if pooled.shape[0] != prompt_embeds.shape[0]:
        raise ConfigError(f"{name} has batch {prompt_embeds.shape[0]} but {pooled_name} {pooled.shape[0]}")
    return prompt_embeds.shape[0]


# More steps than any schedule needs; far larger counts only allocate schedules and hang.
MAX_STEPS = 1000


def validate(pipe, a: dict) -> Request:
    """Check every argument of `FluxPipeline.__call__` (its keywords as the dict `a`) and fill in the defaults."""
    for name in ("guidance_scale", "true_cfg_scale"):  # a NaN here would surface as NaN latents
        v = a[name]
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise ConfigError(f"{name} must be a finite number, got {v!r}")
    if a["sampler_options"] is not None and not (
        isinstance(a["sampler_options"], dict) and all(isinstance(k, str) for k in a["sampler_options"])
    ):
        raise ConfigError(
            f"sampler_options must be a dict of keyword arguments; got {a['sampler_options']!r}"
        )
    if a["callback"] is not None and not callable(a["callback"]):
        raise ConfigError(f"callback must be callable(step_dict); got {type(a['callback']).__name__}")
    if a["prompt_embeds"] is not None:
        if a["prompt"] is not None or a["prompt_2"] is not None:
            raise ConfigError("pass either prompt (and prompt_2) or prompt_embeds, not both")
        batch = _embeds(
            a["prompt_embeds"], a["pooled_prompt_embeds"], "prompt_embeds", "pooled_prompt_embeds"
        )
        prompts = prompts_2 = None
    else:
        if a["pooled_prompt_embeds"] is not None:
            raise ConfigError("pooled_prompt_embeds goes with prompt_embeds; got it without")
        prompts = _prompt_list(a["prompt"], "prompt")
        batch = len(prompts)
        prompts_2 = _matching(a["prompt_2"], batch, "prompt_2", prompts)
    if a["latents"] is not None and not isinstance(a["latents"], Tensor):
        raise ConfigError(
            f"latents must be a torch.Tensor of packed noise; got {type(a['latents']).__name__}"
        )
    k = a["num_images_per_prompt"]
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ConfigError(f"num_images_per_prompt must be an integer >= 1, got {k!r}")
    true_cfg = a["true_cfg_scale"] > 1 and (
        a["negative_prompt"] is not None or a["negative_prompt_embeds"] is not None
    )
    negative = negative_2 = None
    if a["negative_prompt_embeds"] is not None:
        if a["negative_prompt"] is not None:
            raise ConfigError("pass either negative_prompt or negative_prompt_embeds, not both")
        nb = _embeds(
            a["negative_prompt_embeds"], a["negative_pooled_prompt_embeds"],
            "negative_prompt_embeds", "negative_pooled_prompt_embeds",
        )  # fmt: skip
        if nb != batch:
            raise ConfigError(f"negative_prompt_embeds has batch {nb}, prompts {batch}")
    elif true_cfg:
        negative = _matching(a["negative_prompt"], batch, "negative_prompt", None)
        negative_2 = _matching(a["negative_prompt_2"], batch, "negative_prompt_2", negative)
    mode = pipe.mode
    image = a["image"]
    _check_adapter_inputs(pipe, a, mode)
    check_inputs(
        mode, pipe.transformer.config.in_channels, image, a["strength"],
        None if mode == "text" else a["mask_image"], None if pipe.controlnets else a["control_image"],
    )  # fmt: skip
    height, width = a["height"], a["width"]
    if mode == "kontext" and image is not None:
        ref_w, ref_h = kontext_size(image, a["kontext_auto_resize"])
        height = ref_h if height is None else height
        width = ref_w if width is None else width
    height = check_side("height", 1024 if height is None else height, stacklevel=5)
    width = check_side("width", 1024 if width is None else width, stacklevel=5)
    steps = a["num_inference_steps"]
    if a["sigmas"] is not None:
        sig = a["sigmas"]
        if not isinstance(sig, (Tensor, Sequence)) or isinstance(sig, (str, bytes)):
            raise ConfigError(f"sigmas must be a list of flow times in (0, 1]; got {type(sig).__name__}")
        sig = sig.tolist() if isinstance(sig, Tensor) else list(sig)
        if not sig or not all(isinstance(s, (int, float)) and 0 < s <= 1 for s in sig):
            raise ConfigError(f"sigmas must be flow times in (0, 1] (the final 0 is appended); got {sig!r}")
        if any(a_ <= b_ for a_, b_ in zip(sig, sig[1:])):
            raise ConfigError(f"sigmas must decrease strictly; got {sig!r}")
        steps = len(sig)
    steps = (4 if pipe.is_schnell else 28) if steps is None else steps
    if isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= MAX_STEPS:
        raise ConfigError(
            f"num_inference_steps must be an integer >= 1 and <= {MAX_STEPS}, got {a['num_inference_steps']!r}"
        )
    sampler = a["sampler"]
    sample = get_sampler(sampler) if isinstance(sampler, str) else sampler
    if not callable(sample):
        raise ConfigError(f"sampler must be a name or a callable; got {type(sampler).__name__}")
    if a["scheduler"] is not None:
        if a["sigmas"] is not None:
            raise ConfigError("pass either sigmas= or scheduler=, not both")
        get_scheduler(a["scheduler"])
    msl = a["max_sequence_length"]
    if msl is not None and (isinstance(msl, bool) or not isinstance(msl, int) or not 1 <= msl <= 512):
        raise ConfigError(f"max_sequence_length must be an integer in [1, 512], got {msl!r}")
    if a["callback_on_step_end"] is not None:
        if not callable(a["callback_on_step_end"]):
            raise ConfigError(
                "callback_on_step_end must be callable(pipe, step, timestep, callback_kwargs) -> dict"
            )
        bad = [k for k in a["callback_on_step_end_tensor_inputs"] if k not in CALLBACK_TENSOR_INPUTS]
        if bad:
            raise ConfigError(
                f"callback_on_step_end_tensor_inputs must be among {list(CALLBACK_TENSOR_INPUTS)}; got {bad}"
            )
        import inspect

        try:
            params = inspect.signature(sample).parameters
        except (TypeError, ValueError):
            params = {}
        if "step_end" not in params:
            raise ConfigError(
                "callback_on_step_end needs a sampler with a step_end= hook (every sampler in SAMPLERS has one)"
            )
    check_output_type(a["output_type"])
    return Request(
        prompts,
        prompts_2,
        negative,
        negative_2,
        batch,
        batch * k,
        mode,
        height,
        width,
        steps,
        sample,
        true_cfg,
    )


def _check_adapter_inputs(pipe, a: dict, mode: str) -> None:
    """The inputs of what is loaded on top (ControlNets, IP-Adapter, Redux) and masked img2img."""
    if pipe.controlnets and a["control_image"] is None:
        raise ConfigError(f"{len(pipe.controlnets)} ControlNet(s) loaded: pass control_image=")
    if pipe.controlnets and mode == "control":
        raise ConfigError(
            "ControlNets run on a base model; this is a Canny/Depth model (it takes control_image itself)"
        )
    if pipe.ip_adapter is not None and a["ip_adapter_image"] is None:
        raise ConfigError("an IP-Adapter is loaded: pass ip_adapter_image= (or call unload_ip_adapter())")
    if pipe.ip_adapter is None and (
        a["ip_adapter_image"] is not None or a["negative_ip_adapter_image"] is not None
    ):
        raise ConfigError(
            "ip_adapter_image= needs an IP-Adapter: call pipe.load_ip_adapter(path, image_encoder) first"
        )
    if a["image_embeds"] is not None and a["redux_image"] is not None:
        raise ConfigError("pass either image_embeds= or redux_image=, not both")
    if (a["image_embeds"] is not None or a["redux_image"] is not None) and pipe.redux is None:
        raise ConfigError(
            "image_embeds= / redux_image= need the Redux projector: call pipe.load_redux('flux1-redux-dev.safetensors') first"
        )
    if a["redux_image"] is not None and pipe.siglip is None:
        raise ConfigError(
            "redux_image= needs the SigLIP image encoder: pipe.load_redux(path, image_encoder=...)"
        )
    if mode == "text" and a["mask_image"] is not None and a["image"] is None:
        raise ConfigError("mask_image on a text-to-image model inpaints image=: pass image= as well")


def repeat_embeds(t: Tensor, k: int, device, dtype=None) -> Tensor:
    """Given embeddings [B, ...] → [B·k, ...], each row repeated k times in a row (diffusers' order)."""
    t = t.to(device=device, dtype=dtype or t.dtype)
    return t.repeat_interleave(k, dim=0) if k > 1 else t


def step_timestep(sigma: float, device) -> Tensor:
    """The `timestep` diffusers hands `callback_on_step_end`: 1000·σ as a 0-d float32 tensor."""
    return torch.tensor(1000.0 * sigma, dtype=torch.float32, device=device)


def step_end_hook(pipe, fn: Callable, names: Sequence[str], timesteps: list[float], extra: dict) -> Callable:
    """The sampler's step_end hook that calls diffusers' `callback_on_step_end(pipe, i, t, kwargs)` and
    applies its edits: returned "latents" replace the sampler's, "prompt_embeds" the text input."""

    def hook(i: int, x: Tensor, sigma_next: float) -> Tensor:
        kwargs = {"latents": x} if "latents" in names else {}
        if "prompt_embeds" in names:
            kwargs["prompt_embeds"] = extra["txt"]
        out = fn(pipe, i, step_timestep(timesteps[i], x.device), kwargs) or {}
        if "prompt_embeds" in out:
            extra["txt"] = out["prompt_embeds"].to(extra["txt"])
        return out["latents"].to(x) if "latents" in out else x

    return hook


def cap_sequence_length(requested: int, trained: int | None) -> int:
    """`requested` T5 tokens, or the tokenizer's trained length `trained` with a warning when above it."""
    if trained is not None and requested > trained:
        import warnings

        warnings.warn(
            f"max_sequence_length {requested} is above the {trained} tokens the T5 tokenizer was trained for; "
            f"using {trained}",
            stacklevel=5,
        )
        return trained
    return requested


def apply_kernels(transformer: nn.Module, wanted: bool | None) -> list[str]:
    """The fused-kernel transform as the pipeline's default (see FluxPipeline): the module paths replaced."""
    if wanted is False or (wanted is None and not torch.cuda.is_available()):
        return []
    try:
        from fluxcore import kernels
    except ImportError as e:  # triton missing or unable to load here
        if wanted:
            raise ConfigError(
                f"fused_kernels=True needs the Triton kernels, which cannot be imported: {e}"
            ) from None
        return []
    return kernels.apply(transformer)


def _sampler_seed(seed: int) -> int:
    # derived from (not equal to) the noise seed, so the two streams are independent
    return (seed * 6364136223846793005 + 1442695040888963407) % 2**64


def noise_generators(generator, seeds: list[int] | None):
    """The sampler's noise source for a call's `generator`: the same torch.Generator(s) that drew the
    latents; for seeds, CPU generators derived from them — one per image for a list of seeds (so a
    batch image equals the same seed alone), one for the batch for a single seed."""
    if isinstance(generator, torch.Generator):
        return generator
    if (
        isinstance(generator, (list, tuple))
        and generator
        and all(isinstance(g, torch.Generator) for g in generator)
    ):
        return list(generator)
    if not seeds:
        return None
    gens = [torch.Generator().manual_seed(_sampler_seed(s)) for s in seeds]
    return gens[0] if len(gens) == 1 and not isinstance(generator, (list, tuple)) else gens
