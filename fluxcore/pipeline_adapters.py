"""What a FluxPipeline loads on top of its models — LoRAs, ControlNets, an XLabs IP-Adapter, Redux —
and the sampler denoiser a call builds from them. Plain functions of the pipeline; FluxPipeline's
methods of the same (diffusers') names call them.

The denoiser of one call, innermost first (each wrapper consumes its own keys of the sampler's
extra_args, so CFGDenoiser's `negative` can carry other values for the negative prompt):

    FlowDenoiser(transformer)
    ControlledDenoiser     ControlNet residuals for this evaluation (the blocks are wrapped for the call)
    IPAdapterDenoiser      extra_args["ip_tokens"]: the image prompt's tokens
    CFGDenoiser            true CFG with the negative prompt's inputs
    MaskedDenoiser         extra_args["inpaint_x0"], ["inpaint_mask"]: masked img2img on a base model
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
from torch import Tensor, nn

from fluxcore import lora
from fluxcore.errors import ConfigError
from fluxcore.images import to_mask_tensor
from fluxcore.latents import pack
from fluxcore.sampling import CFGDenoiser, FlowDenoiser

# --- LoRA ------------------------------------------------------------------------------------------


def lora_models(pipe) -> dict[str, nn.Module]:
    """The models a LoRA file may have parts for, under fluxcore.lora's component names."""
    models = {"transformer": pipe.transformer, "clip": pipe.clip, "t5": pipe.t5}
    return {k: m for k, m in models.items() if m is not None}


def _with_adapters(pipe) -> list[nn.Module]:
    return [m for m in lora_models(pipe).values() if lora.list_adapters(m)]


def lora_file(source, weight_name: str | None = None):
    """A LoRA source as diffusers names it: a file, a dict of tensors, or a folder with
    `weight_name` (default pytorch_lora_weights.safetensors, or the folder's only .safetensors)."""
    if not isinstance(source, (str, os.PathLike)):
        return source
    path = Path(source)
    if weight_name is not None:
        return path / weight_name
    if not path.is_dir():
        return path
    files = sorted(path.glob("*.safetensors"))
    default = path / "pytorch_lora_weights.safetensors"
    if default.is_file():
        return default
    if len(files) != 1:
        raise ConfigError(
            f"LoRA folder {path} holds {len(files)} .safetensors files; name one with weight_name="
        )
    return files[0]


def load_lora_weights(
    pipe, source, adapter_name=None, weight: float = 1.0, *, weight_name=None, hotswap=False
):
    """Load a LoRA (any format docs/lora.md lists; a folder with `weight_name`, as diffusers) into
    the transformer and, for the parts the file has, the text encoders. Returns the adapter: its
    name (a str) with `.format`, `.targets`, ... A control LoRA widens img_in (in_channels 64 →
    128), so `pipe.mode` becomes "control" and calls take control_image= as Canny/Depth models do.
    `joint_attention_kwargs={"scale": s}` scales every loaded LoRA for one call."""
    loaded = lora.load_lora_components(
        lora_models(pipe), lora_file(source, weight_name), adapter_name=adapter_name, weight=weight,
        hotswap=hotswap,
    )  # fmt: skip
    return loaded.get("transformer") or next(iter(loaded.values()))


def set_adapters(pipe, adapter_names, adapter_weights=None) -> None:
    """Make `adapter_names` the active adapters of every model that has them, with strengths
    `adapter_weights` (a number, a list, or None: each adapter's current strength)."""
    names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
    weights = (
        list(adapter_weights)
        if isinstance(adapter_weights, (list, tuple))
        else [adapter_weights] * len(names)
    )
    if len(weights) != len(names):
        raise ConfigError(f"{len(names)} adapter names but {len(weights)} adapter weights")
    loaded = {m: lora.list_adapters(m) for m in _with_adapters(pipe)}
    unknown = [n for n in names if not any(n in have for have in loaded.values())]
    if unknown:
        raise ConfigError(
            f"no LoRA adapters named {unknown}; loaded: {sorted(set().union(*loaded.values()))}"
        )
    for m, have in loaded.items():
        pick = [(n, have[n] if w is None else w) for n, w in zip(names, weights) if n in have]
        lora.set_adapters(m, [n for n, _ in pick], [w for _, w in pick])


def fuse_lora(pipe, lora_scale: float = 1.0, adapter_names=None) -> None:
    """Merge the active (or the named) adapters, times lora_scale, into the weights."""
    for m in _with_adapters(pipe):
        have = lora.list_adapters(m)
        names = None if adapter_names is None else [n for n in adapter_names if n in have]
        lora.fuse_lora(m, names, lora_scale)


def unfuse_lora(pipe) -> None:
    """Put back the exact weights `fuse_lora` replaced (bit for bit); the adapters run live again."""
    for m in _with_adapters(pipe):
        lora.unfuse_lora(m)


def unload_lora_weights(pipe) -> None:
    """Remove every adapter: the models hold the very same modules and tensors as before loading."""
    for m in _with_adapters(pipe):
        lora.unload_lora(m)


def disable_lora(pipe) -> None:
    """Run the base models; the adapters stay loaded (`enable_lora`)."""
    for m in _with_adapters(pipe):
        lora.disable_lora(m)


def enable_lora(pipe) -> None:
    for m in _with_adapters(pipe):
        lora.enable_lora(m)


def get_active_adapters(pipe) -> list[str]:
    """The transformer's active adapters ([] while disabled)."""
    return lora.get_active_adapters(pipe.transformer)


# --- ControlNets, IP-Adapter, Redux ----------------------------------------------------------------


def load_controlnet(pipe, path_or_paths):
    """Load ControlNet(s) (InstantX, Union, Union-Pro 2.0, XLabs; docs/control.md), replacing any
    loaded ones; calls then take control_image (and control_mode, controlnet_conditioning_scale,
    control_guidance_start/end, each a value or one per net, as diffusers)."""
    from fluxcore.controlnet import load_controlnet as read

    paths = [path_or_paths] if isinstance(path_or_paths, (str, os.PathLike)) else list(path_or_paths)
    device = "cpu" if pipe._offload_device else pipe.transformer.device
    nets = [read(p, device=device, dtype=pipe.transformer.dtype) for p in paths]
    for net in nets:
        net.check_base(pipe.transformer.config)
    pipe.controlnets = nets
    return pipe


def controls(pipe, control_image, mode, scale, start, end, width: int, height: int) -> list:
    """The call's ControlNet keywords → `fluxcore.controlnet.Control`s (diffusers' broadcasting)."""
    from fluxcore.controlnet import build_controls

    with pipe._stage(*pipe.controlnets):
        return build_controls(
            pipe.controlnets, control_image, control_mode=mode, scale=scale, start=start, end=end,
            width=width, height=height, encode=pipe._encode_image,
        )  # fmt: skip


def load_ip_adapter(pipe, path, image_encoder=None, scale: float = 1.0):
    """Attach an XLabs FLUX IP-Adapter (ip_adapter.safetensors; image_encoder: a CLIP ViT-L/14
    folder or module), replacing a loaded one; calls then take ip_adapter_image (and, with true
    CFG, negative_ip_adapter_image: default XLabs' zero-image tokens). `pipe.ip_adapter` is its handle."""
    from fluxcore.ip_adapter import load_ip_adapter as attach

    unload_ip_adapter(pipe)
    pipe.ip_adapter = attach(pipe.transformer, path, image_encoder, scale=scale)
    return pipe


def set_ip_adapter_scale(pipe, scale: float) -> None:
    if pipe.ip_adapter is None:
        raise ConfigError("no IP-Adapter loaded: call load_ip_adapter first")
    pipe.ip_adapter.scale = scale


def unload_ip_adapter(pipe) -> None:
    """Put the transformer's own double blocks back."""
    if pipe.ip_adapter is not None:
        pipe.ip_adapter.remove()
        pipe.ip_adapter = None


def ip_tokens(pipe, image, negative_image, n: int, negative: bool) -> tuple[Tensor, Tensor | None]:
    """(IP tokens [n, N_ip, 4096] of the image prompt, those of the negative image prompt — zero
    image embeds when none is given, as XLabs — or None without true CFG)."""
    handle = pipe.ip_adapter
    with pipe._stage(handle.image_encoder):
        tokens = pipe._batch(handle.tokens_for(image), n)
        if not negative:
            return tokens, None
        neg = handle.tokens_for(negative_image) if negative_image is not None else handle.negative_tokens(1)
        return tokens, pipe._batch(neg, n)


def load_redux(pipe, path, image_encoder=None):
    """Load FLUX.1-Redux's projector (flux1-redux-dev.safetensors): enables image_embeds= (SigLIP
    embeddings); with image_encoder (FLUX.1-Redux-dev's image_encoder/, SigLIP) also redux_image=
    (PIL images). Redux tokens are appended to the T5 tokens in any mode."""
    from fluxcore.conditioning import load_redux as read
    from fluxcore.vision import load_siglip

    device, dtype = ("cpu" if pipe._offload_device else pipe.device), pipe.transformer.dtype
    pipe.redux = read(path, device=device, dtype=dtype)
    if image_encoder is not None:
        pipe.siglip = (
            image_encoder
            if isinstance(image_encoder, nn.Module)
            else load_siglip(image_encoder, device=device, dtype=dtype)
        )
    return pipe


def redux_tokens(pipe, image_embeds: Tensor | None, image) -> Tensor:
    """Redux tokens [B or 1, N, 4096] from SigLIP `image_embeds`, or from PIL image(s) through the
    pipeline's SigLIP encoder."""
    from fluxcore.conditioning import redux_inputs
    from fluxcore.vision import redux_tokens as from_images

    with pipe._stage(pipe.redux, pipe.siglip):
        if image is not None:
            return from_images(image, pipe.siglip, pipe.redux, device=pipe.device)
        return redux_inputs(pipe.redux, image_embeds, pipe.device)


# --- masked img2img on a base model ----------------------------------------------------------------


def inpaint_inputs(x_init: Tensor, mask_image, width: int, height: int) -> dict[str, Tensor]:
    """The masked-img2img inputs of a text-mode model, as diffusers' FluxInpaintPipeline prepares
    them: the mask resized to width x height, binarised at 0.5 (1 = generate), resized to the
    latent grid (nearest), repeated over the 16 latent channels and packed → [B, L, 64]."""
    mask = (to_mask_tensor(mask_image, width, height) >= 0.5).float()
    mask = torch.nn.functional.interpolate(mask, size=(2 * (height // 16), 2 * (width // 16)))
    return {"inpaint_x0": x_init, "inpaint_mask": pack(mask.repeat(1, 16, 1, 1)).to(x_init)}


class MaskedDenoiser:
    """Keeps the unmasked region on the path of the init latents: x0 = mask·x0 + (1 − mask)·x_init.
    With the Euler step x_{i+1} = x0 + (t_{i+1}/t_i)(x_i − x0), a known token at
    t_i·ε + (1 − t_i)·x_init moves to t_{i+1}·ε + (1 − t_{i+1})·x_init — exactly the re-noised
    init diffusers' FluxInpaintPipeline pastes in after each step."""

    def __init__(self, denoiser):
        self.denoiser = denoiser

    def __call__(self, x: Tensor, sigma, *, inpaint_x0: Tensor, inpaint_mask: Tensor, **cond) -> Tensor:
        x0 = self.denoiser(x, sigma, **cond)
        return inpaint_mask * x0 + (1 - inpaint_mask) * inpaint_x0.to(x0)


# --- the call's denoiser ---------------------------------------------------------------------------


@contextlib.contextmanager
def denoiser(
    pipe, timesteps: Sequence[float], extra: dict, *, controls=(), negative=None, true_cfg_scale=1.0
) -> Iterator:
    """The sampler's model for one call (module docstring); ControlNets are attached to the
    transformer only while it is in use."""
    from fluxcore.controlnet import ControlledDenoiser, attach_controlnets
    from fluxcore.ip_adapter import IPAdapterDenoiser

    model = FlowDenoiser(pipe.transformer)
    handle = attach_controlnets(pipe.transformer, controls) if controls else None
    try:
        if handle is not None:
            model = ControlledDenoiser(model, handle, timesteps)
        if pipe.ip_adapter is not None:
            model = IPAdapterDenoiser(model, pipe.ip_adapter)
        if negative is not None:
            model = CFGDenoiser(model, true_cfg_scale, negative)
        if "inpaint_mask" in extra:
            model = MaskedDenoiser(model)
        yield model
    finally:
        if handle is not None:
            handle.remove()
