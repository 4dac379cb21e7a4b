"""FLUX ControlNets: the networks, their official files, and their injection into a built Flux.

Two families, each a small FLUX trunk (fluxcore's own DoubleStreamBlock / SingleStreamBlock) that
reads the same step inputs as the base model plus a control condition and returns one residual
per trunk block:

    FluxControlNet  (diffusers layout: InstantX, InstantX/Shakker Union with control modes,
                    Union-Pro 2.0 without modes). The condition is the control image encoded by
                    the autoencoder and packed, [B, L_img, 64]; it enters as
                    img_in(x) + controlnet_x_embedder(cond). Union nets prepend one text token,
                    controlnet_mode_embedder(mode). Residuals: controlnet_blocks[i](image tokens
                    after double block i), controlnet_single_blocks[j](image tokens after single
                    block j). Base block k gets residual[k // ceil(depth / n)]  ("interval").
    XLabsControlNet (fluxcore.controlnet_xlabs; BFL key names). The condition is the control image
                    in pixel space, [B, 3, H, W] in [-1, 1], through an 8-conv hint block (H/8),
                    packed 2x2 and pos_embed_input. Double blocks only; base double block k gets
                    residual[k % n]  ("repeat").

Injection is a transform (docs/transforms.md): `attach_controlnets(flux, controls)` wraps every
entry of `flux.double_blocks` / `flux.single_blocks` in a module that adds its block's residual
for the current step (image tokens only) and returns a handle; `handle.remove()` puts the very
same block modules back. The residuals are computed once per model evaluation by
`ControlledDenoiser`, which wraps a sampler denoiser (e.g. FlowDenoiser) and runs every active
ControlNet on that evaluation's inputs first. Several ControlNets sum; each has its own scale and
its own [start, end] window over the sampling steps.

Shapes: B batch, L_img image tokens, L_txt text tokens, D = hidden_size.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import torch
from torch import Tensor, nn

from fluxcore.config import FluxConfig
from fluxcore.errors import ConfigError, WeightsError
from fluxcore.layers import DoubleStreamBlock, EmbedND, MLPEmbedder, SingleStreamBlock
from fluxcore.math import timestep_embedding

# Control modes of the Union ControlNets (InstantX Union and Shakker Union-Pro 1.0 model cards).
CONTROL_MODES: dict[str, int] = {"canny": 0, "tile": 1, "depth": 2, "blur": 3, "pose": 4, "gray": 5, "lq": 6}


class ControlNetOutput(NamedTuple):
    """Unscaled residuals of one ControlNet evaluation, each [B, L_img, D] in the net's dtype."""

    double: tuple[Tensor, ...]
    single: tuple[Tensor, ...]


def _per_sample(value, batch: int, like: Tensor) -> Tensor:
    """A float or a [B] / [1] / 0-d tensor → [B] on like's device (dtype float32)."""
    t = torch.as_tensor(value, dtype=torch.float32, device=like.device).reshape(-1)
    return t.expand(batch) if t.numel() == 1 else t


class ControlTrunk(nn.Module):
    """What every FLUX ControlNet shares with the base model: the embedders (BFL names img_in,
    time_in, vector_in, guidance_in, txt_in), RoPE and `config.depth` double blocks.

    config: a FluxConfig describing the ControlNet itself (depth / depth_single_blocks are its
    own block counts; widths must equal the base model's)."""

    injection = "interval"  # how base blocks index this net's residuals (see `residual_index`)

    def __init__(self, config: FluxConfig):
        super().__init__()
        self.config = config
        D = config.hidden_size
        self.pe_embedder = EmbedND(theta=config.theta, axes_dim=config.axes_dim)
        self.img_in = nn.Linear(config.in_channels, D)
        self.time_in = MLPEmbedder(256, D)
        self.vector_in = MLPEmbedder(config.vec_in_dim, D)
        self.guidance_in = MLPEmbedder(256, D) if config.guidance_embed else nn.Identity()
        self.txt_in = nn.Linear(config.context_in_dim, D)
        self.double_blocks = nn.ModuleList(DoubleStreamBlock(config) for _ in range(config.depth))
        self.controlnet_blocks = nn.ModuleList(nn.Linear(D, D) for _ in range(config.depth))

    @property
    def dtype(self) -> torch.dtype:
        return self.img_in.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.img_in.weight.device

    def embed_inputs(
        self, img: Tensor, txt: Tensor, timesteps: Tensor, y: Tensor, guidance: Tensor | None
    ) -> tuple[Tensor, Tensor, Tensor]:
        """(img_in(img), txt_in(txt), vec), as the base model computes them. Guidance is used only
        when this net was trained with it (`config.guidance_embed`), as diffusers does."""
        if img.ndim != 3 or txt.ndim != 3:
            raise ValueError(
                f"img and txt must be 3-D [B, L, C]; got img {tuple(img.shape)} and txt {tuple(txt.shape)}"
            )
        if img.shape[-1] != self.config.in_channels:
            raise ConfigError(
                f"the ControlNet takes {self.config.in_channels}-channel packed latents; got {img.shape[-1]}"
            )
        dtype = self.dtype
        vec = self.time_in(timestep_embedding(timesteps.to(dtype), 256))
        if self.config.guidance_embed:
            if guidance is None:
                raise ConfigError("this ControlNet is guidance-distilled and needs `guidance`; got None")
            vec = vec + self.guidance_in(timestep_embedding(guidance.to(dtype), 256))
        vec = vec + self.vector_in(y.to(dtype))
        return self.img_in(img.to(dtype)), self.txt_in(txt.to(dtype)), vec

    def check_base(self, base: FluxConfig) -> None:
        """ConfigError unless this ControlNet fits a base model with config `base`."""
        c = self.config
        for name in ("hidden_size", "num_heads", "context_in_dim", "vec_in_dim"):
            if getattr(c, name) != getattr(base, name):
                raise ConfigError(
                    f"this ControlNet has {name}={getattr(c, name)} but the base model has "
                    f"{name}={getattr(base, name)}: it was trained for another model"
                )


class FluxControlNet(ControlTrunk):
    """The diffusers-layout FLUX ControlNet (InstantX, Union, Union-Pro 2.0) with BFL-style names:
    img_in, time_in, vector_in, guidance_in, txt_in, double_blocks.N, single_blocks.N (as the base
    model) plus controlnet_blocks.N, controlnet_single_blocks.N, controlnet_x_embedder and, for
    Union nets, controlnet_mode_embedder. `load_controlnet` converts the official files.

    num_modes: size of the control-mode embedding (Union nets), None for single-purpose nets.
    """

    injection = "interval"

    def __init__(self, config: FluxConfig, num_modes: int | None = None):
        super().__init__(config)
        D = config.hidden_size
        self.num_modes = num_modes
        self.single_blocks = nn.ModuleList(
            SingleStreamBlock(config) for _ in range(config.depth_single_blocks)
        )
        self.controlnet_single_blocks = nn.ModuleList(
            nn.Linear(D, D) for _ in range(config.depth_single_blocks)
        )
        self.controlnet_x_embedder = nn.Linear(config.in_channels, D)
        if num_modes is not None:
            self.controlnet_mode_embedder = nn.Embedding(num_modes, D)

    def mode_index(self, mode) -> int | None:
        """A control mode (an int, or a name from CONTROL_MODES) checked against this net."""
        if self.num_modes is None:
            if mode is not None:
                raise ConfigError(
                    f"control_mode={mode!r} given, but this ControlNet has no control modes "
                    "(only Union ControlNets with a controlnet_mode_embedder take one)"
                )
            return None
        if mode is None:
            raise ConfigError(
                f"this is a Union ControlNet with {self.num_modes} control modes: pass control_mode "
                f"(0..{self.num_modes - 1} or a name: {', '.join(CONTROL_MODES)})"
            )
        if isinstance(mode, str):
            if mode not in CONTROL_MODES:
                raise ConfigError(f"unknown control_mode {mode!r}; known: {', '.join(CONTROL_MODES)}")
            mode = CONTROL_MODES[mode]
        if isinstance(mode, bool) or not isinstance(mode, int) or not 0 <= mode < self.num_modes:
            raise ConfigError(
                f"control_mode must be an int in [0, {self.num_modes}) for this ControlNet; got {mode!r}"
            )
        return mode

    def forward(
        self,
        img: Tensor,
        img_ids: Tensor,
        txt: Tensor,
        txt_ids: Tensor,
        timesteps: Tensor,
        y: Tensor,
        guidance: Tensor | None = None,
        *,
        cond: Tensor,
        mode: int | str | None = None,
    ) -> ControlNetOutput:
        """Residuals for one evaluation. The base model's inputs (img [B, L_img, 64] noisy packed
        latents, img_ids [B, L_img, 3], txt [B, L_txt, ctx], txt_ids [B, L_txt, 3], timesteps [B],
        y [B, vec], guidance [B]) plus cond [B or 1, L_img, 64], the packed latent of the control
        image, and mode (Union nets). → ControlNetOutput(double: depth × [B, L_img, D],
        single: depth_single_blocks × [B, L_img, D]), unscaled."""
        mode = self.mode_index(mode)
        if (
            cond.ndim != 3
            or cond.shape[1] != img.shape[1]
            or cond.shape[-1] != self.controlnet_x_embedder.in_features
        ):
            raise ConfigError(
                f"control condition must be the packed control latent [B, {img.shape[1]}, "
                f"{self.controlnet_x_embedder.in_features}] for these latents; got {tuple(cond.shape)}"
            )
        x, txt, vec = self.embed_inputs(img, txt, timesteps, y, guidance)
        x = x + self.controlnet_x_embedder(cond.to(x.dtype))
        if mode is not None:
            idx = torch.full((txt.shape[0], 1), mode, dtype=torch.long, device=txt.device)
            txt = torch.cat((self.controlnet_mode_embedder(idx).to(txt.dtype), txt), dim=1)
            txt_ids = torch.cat((txt_ids[:, :1], txt_ids), dim=1)
        pe = self.pe_embedder(torch.cat((txt_ids, img_ids), dim=1))

        double = []
        for block, out in zip(self.double_blocks, self.controlnet_blocks):
            x, txt = block(img=x, txt=txt, vec=vec, pe=pe)
            double.append(out(x))
        n_txt = txt.shape[1]
        h = torch.cat((txt, x), dim=1)
        single = []
        for block, out in zip(self.single_blocks, self.controlnet_single_blocks):
            h = block(h, vec=vec, pe=pe)
            single.append(out(h[:, n_txt:]))
        return ControlNetOutput(tuple(double), tuple(single))


def residual_index(block: int, n_blocks: int, n_residuals: int, injection: str) -> int:
    """Which of a ControlNet's n_residuals residuals base block `block` (of n_blocks) adds.

    "interval" (diffusers-layout nets): block // ceil(n_blocks / n_residuals), so consecutive base
    blocks share a residual (and trailing residuals may go unused: Union-Pro 2.0's 6 residuals
    over 19 blocks use 0-4). "repeat" (XLabs): block % n_residuals."""
    if injection == "repeat":
        return block % n_residuals
    return block // math.ceil(n_blocks / n_residuals)


# --- what the caller asks for ---------------------------------------------------------------------


@dataclass
class Control:
    """One ControlNet applied with one condition.

    net:   a FluxControlNet or XLabsControlNet (the same net may appear twice, e.g. a Union net with
           two control images and modes).
    cond:  its condition: `prepare_control_image(net, ...)` (packed latent [B or 1, L_img, 64] for
           diffusers-layout nets; pixels [B or 1, 3, H, W] in [-1, 1] for XLabs nets).
    mode:  Union control mode (int or a CONTROL_MODES name); None otherwise.
    scale: controlnet_conditioning_scale; start, end: the fraction of the sampling steps it acts
           on (control_guidance_start / control_guidance_end): step i of N is active unless
           i/N < start or (i+1)/N > end.
    """

    net: nn.Module
    cond: Tensor
    mode: int | str | None = None
    scale: float = 1.0
    start: float = 0.0
    end: float = 1.0

    def __post_init__(self):
        if not 0.0 <= self.start < self.end <= 1.0:
            raise ConfigError(
                f"control_guidance_start/end must satisfy 0 <= start < end <= 1; got {self.start}, {self.end}"
            )
        if hasattr(self.net, "mode_index"):
            self.net.mode_index(self.mode)  # a bad mode fails here, before sampling starts
        elif self.mode is not None:
            raise ConfigError(
                f"control_mode={self.mode!r} given, but {type(self.net).__name__} has no control modes"
            )

    def active(self, step: int, num_steps: int) -> bool:
        return not (step / num_steps < self.start or (step + 1) / num_steps > self.end)


def control_keep(step: int, num_steps: int, start: float, end: float) -> float:
    """1.0 if step i of num_steps lies in the [start, end] window, else 0.0 (diffusers' rule)."""
    return float(not (step / num_steps < start or (step + 1) / num_steps > end))


# --- the transform ----------------------------------------------------------------------------------


@dataclass
class _StepResiduals:
    """The residuals the wrappers add during one model evaluation (None outside one)."""

    double: list[Tensor | None] | None = None
    single: list[Tensor | None] | None = None
    n_txt: int = 0


def _add_to_image_tokens(h: Tensor, r: Tensor, start: int) -> Tensor:
    """h with r added to tokens [start, start + r.shape[1]) (the noisy image tokens; text tokens
    before them and any Kontext reference tokens after them are left as they are)."""
    r = r.to(h.dtype)
    if r.shape[0] != h.shape[0]:
        r = r.expand(h.shape[0], -1, -1)
    end = start + r.shape[1]
    if start == 0 and end == h.shape[1]:
        return h + r
    return torch.cat((h[:, :start], h[:, start:end] + r, h[:, end:]), dim=1)


class _KeepsKeys(nn.Module):
    """A wrapper whose state dict is its inner `block`'s own, so keys stay official."""

    def state_dict(self, *args, destination=None, prefix="", keep_vars=False):
        return self.block.state_dict(destination=destination, prefix=prefix, keep_vars=keep_vars)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing, unexpected, errors):
        for key in [k for k in state_dict if k.startswith(prefix) and not k.startswith(prefix + "block.")]:
            state_dict[prefix + "block." + key[len(prefix) :]] = state_dict.pop(key)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing, unexpected, errors)


class ControlledDoubleBlock(_KeepsKeys):
    """Runs `block` (whatever module sat at double_blocks.i) and adds this step's ControlNet
    residual to its image stream: img [B, L_img(+ref), D] → img + r on the first L_img tokens."""

    def __init__(self, block: nn.Module, state: _StepResiduals, index: int):
        super().__init__()
        self.block, self.index = block, index
        self._state = state

    def forward(self, img: Tensor, txt: Tensor, vec: Tensor, pe: Tensor) -> tuple[Tensor, Tensor]:
        img, txt = self.block(img=img, txt=txt, vec=vec, pe=pe)
        r = self._state.double[self.index] if self._state.double is not None else None
        return (img if r is None else _add_to_image_tokens(img, r, 0)), txt


class ControlledSingleBlock(_KeepsKeys):
    """Runs `block` (single_blocks.j) and adds this step's residual to the image tokens of
    x = cat(txt, img): x [B, L_txt + L_img, D]."""

    def __init__(self, block: nn.Module, state: _StepResiduals, index: int):
        super().__init__()
        self.block, self.index = block, index
        self._state = state

    def forward(self, x: Tensor, vec: Tensor, pe: Tensor) -> Tensor:
        x = self.block(x, vec=vec, pe=pe)
        r = self._state.single[self.index] if self._state.single is not None else None
        return x if r is None else _add_to_image_tokens(x, r, self._state.n_txt)


@dataclass
class ControlNetHandle:
    """What `attach_controlnets` did: the wrapped block paths, the controls (editable between
    evaluations: scales, windows, conditions), and `remove()`."""

    model: nn.Module
    controls: list[Control]
    paths: list[str]
    _state: _StepResiduals = field(default_factory=_StepResiduals, repr=False)

    def residuals(
        self,
        x: Tensor,
        sigma,
        *,
        img_ids: Tensor,
        txt: Tensor,
        txt_ids: Tensor,
        y: Tensor,
        guidance=None,
        step: int | None = None,
        num_steps: int | None = None,
    ) -> tuple[list[Tensor | None], list[Tensor | None]]:
        """Per base block, the summed scaled residual of every active control (None where none
        adds anything): (double [depth], single [depth_single_blocks]). step / num_steps select
        the active controls by their windows (all of them when step is None)."""
        return controlnet_residuals(
            self.model.config, self.controls, x, sigma, img_ids=img_ids, txt=txt, txt_ids=txt_ids,
            y=y, guidance=guidance, step=step, num_steps=num_steps,
        )  # fmt: skip

    @contextmanager
    def active(self, double, single, n_txt: int) -> Iterator[None]:
        """The wrappers add `double` / `single` (from `residuals`) inside this context."""
        self._state.double, self._state.single, self._state.n_txt = double, single, n_txt
        try:
            yield
        finally:
            self._state.double = self._state.single = None

    def remove(self) -> list[str]:
        """Put the original block modules back; returns the paths restored."""
        restored = []
        for name, wrapper_type in (
            ("double_blocks", ControlledDoubleBlock),
            ("single_blocks", ControlledSingleBlock),
        ):
            blocks = getattr(self.model, name)
            for i, m in enumerate(blocks):
                if type(m) is wrapper_type and m._state is self._state:
                    blocks[i] = m.block
                    restored.append(f"{name}.{i}")
        return restored


def attach_controlnets(model: nn.Module, controls: Sequence[Control]) -> ControlNetHandle:
    """Wrap every entry of model.double_blocks / model.single_blocks so that it adds its ControlNet
    residual (a transform: parameters and state-dict keys are untouched; `handle.remove()` undoes
    it). Residuals flow only inside `ControlledDenoiser` (or `handle.active(...)`); outside one the
    wrapped model computes exactly what it did before.

    Raises ConfigError when the model already has ControlNets attached, or a ControlNet does not
    fit the model (other width, heads or text widths)."""
    controls = list(controls)
    for c in controls:
        c.net.check_base(model.config)
    for m in list(model.double_blocks) + list(model.single_blocks):
        if isinstance(m, (ControlledDoubleBlock, ControlledSingleBlock)):
            raise ConfigError("this model already has ControlNets attached; call handle.remove() first")
    handle = ControlNetHandle(model, controls, [])
    for i, block in enumerate(model.double_blocks):
        model.double_blocks[i] = ControlledDoubleBlock(block, handle._state, i)
        handle.paths.append(f"double_blocks.{i}")
    for j, block in enumerate(model.single_blocks):
        model.single_blocks[j] = ControlledSingleBlock(block, handle._state, j)
        handle.paths.append(f"single_blocks.{j}")
    return handle


def controlnet_residuals(
    base: FluxConfig,
    controls: Sequence[Control],
    x: Tensor,
    sigma,
    *,
    img_ids: Tensor,
    txt: Tensor,
    txt_ids: Tensor,
    y: Tensor,
    guidance=None,
    step: int | None = None,
    num_steps: int | None = None,
) -> tuple[list[Tensor | None], list[Tensor | None]]:
    """Run every active control on one evaluation's inputs and spread the residuals over the base
    blocks: (double [base.depth], single [base.depth_single_blocks]) with entry k the sum over
    controls of scale · residual[residual_index(k, ...)], or None where nothing is added.

    x [B, L_img, 64] (the noisy latents only, without Fill/Canny channels or Kontext tokens),
    sigma a float or [B], the rest as FlowDenoiser takes them."""
    double: list[Tensor | None] = [None] * base.depth
    single: list[Tensor | None] = [None] * base.depth_single_blocks
    b = x.shape[0]
    t = _per_sample(sigma, b, x)
    g = None if guidance is None else _per_sample(guidance, b, x)
    for c in controls:
        if step is not None and not c.active(step, num_steps):
            continue
        if c.scale == 0:
            continue
        cond = c.cond.to(x.device)
        if cond.shape[0] == 1 and b > 1:
            cond = cond.expand(b, *cond.shape[1:])
        out = c.net(x, img_ids, txt, txt_ids, t, y, g, cond=cond, mode=c.mode)
        injection = c.net.injection
        for slots, res in ((double, out.double), (single, out.single)):
            if not res:
                continue
            for k in range(len(slots)):
                r = res[residual_index(k, len(slots), len(res), injection)] * c.scale
                slots[k] = r if slots[k] is None else slots[k] + r
    return double, single


class ControlledDenoiser:
    """A sampler denoiser (FlowDenoiser or anything with the same call) with ControlNets: each
    evaluation first runs the active ControlNets on its inputs, then the wrapped denoiser with the
    residuals in place. Put it inside CFGDenoiser, so the negative prompt gets its own residuals.

    sigmas: the schedule being sampled (the truncated one for img2img); it maps each evaluation's
    sigma to its step (the nearest schedule point) for the start/end windows. Without it, every
    control is active at every step (and windows other than [0, 1] are an error).
    """

    def __init__(self, denoiser, handle: ControlNetHandle, sigmas: Sequence[float] | Tensor | None = None):
        self.denoiser, self.handle = denoiser, handle
        self.sigmas = None if sigmas is None else [float(s) for s in sigmas]
        if self.sigmas is None and any((c.start, c.end) != (0.0, 1.0) for c in handle.controls):
            raise ConfigError(
                "control_guidance_start/end need the schedule: pass sigmas= to ControlledDenoiser"
            )

    def step_of(self, sigma) -> int:
        """The step (index into sigmas[:-1]) whose start time is nearest sigma."""
        s = float(torch.as_tensor(sigma).reshape(-1)[0])
        return min(range(len(self.sigmas) - 1), key=lambda i: abs(self.sigmas[i] - s))

    @contextmanager
    def _residuals(self, x: Tensor, sigma, cond: dict) -> Iterator[None]:
        step = num = None
        if self.sigmas is not None:
            step, num = self.step_of(sigma), len(self.sigmas) - 1
        double, single = self.handle.residuals(
            x, sigma, img_ids=cond["img_ids"], txt=cond["txt"], txt_ids=cond["txt_ids"], y=cond["y"],
            guidance=cond.get("guidance"), step=step, num_steps=num,
        )  # fmt: skip
        with self.handle.active(double, single, cond["txt"].shape[1]):
            yield

    def velocity(self, x: Tensor, sigma, **cond) -> Tensor:
        from fluxcore.sampling import velocity

        with self._residuals(x, sigma, cond):
            return velocity(self.denoiser, x, sigma, **cond)

    def __call__(self, x: Tensor, sigma, **cond) -> Tensor:
        with self._residuals(x, sigma, cond):
            return self.denoiser(x, sigma, **cond)


# --- conditions -------------------------------------------------------------------------------------


def prepare_control_image(
    net: nn.Module, image, width: int, height: int, encode: Callable[[Tensor], Tensor] | None = None
) -> Tensor:
    """The condition `net` takes, from a PIL image or a [3, H, W] / [B, 3, H, W] tensor in [-1, 1]
    (resized to width x height like every pipeline image):
    FluxControlNet: pack(encode(image)) [B, L_img, 64] (`encode` is the autoencoder's, scaled
    latents); XLabsControlNet: the pixels themselves [B, 3, height, width] in [-1, 1]."""
    from fluxcore.images import to_rgb_tensor
    from fluxcore.latents import pack

    pixels = to_rgb_tensor(image, width, height, "control_image")
    if getattr(net, "pixel_condition", False):
        return pixels
    if encode is None:
        raise ConfigError(
            f"{type(net).__name__} takes the encoded control image: pass encode= (the autoencoder's)"
        )
    return pack(encode(pixels))


# --- loading ----------------------------------------------------------------------------------------

# Keys of the diffusers layout that have no counterpart in the base model; they keep their names.
_CONTROL_PREFIXES = (
    "controlnet_blocks.",
    "controlnet_single_blocks.",
    "controlnet_x_embedder.",
    "controlnet_mode_embedder.",
)
_FLUX_AXES = (16, 56, 56)


def _base_config(**fields) -> FluxConfig:
    fields.setdefault("out_channels", fields["in_channels"])
    return FluxConfig(**fields)


def _default_axes(head_dim: int, axes_dim, source: str) -> tuple[int, ...]:
    if axes_dim is not None:
        return tuple(axes_dim)
    if head_dim == sum(_FLUX_AXES):
        return _FLUX_AXES
    raise ConfigError(f"{source}: head dim {head_dim} is not FLUX's 128; pass axes_dim= (RoPE dims per axis)")


def _diffusers_config(
    hf: dict, shapes: dict[str, tuple[int, ...]], source: str, axes_dim
) -> tuple[FluxConfig, dict]:
    """FluxConfig of a diffusers-layout ControlNet from its config.json (or, without one, from
    tensor shapes), plus the extras: num_modes and hint (XLabs-converted files)."""

    def shape(key):
        if key not in shapes:
            raise WeightsError(f"{source}: no tensor {key!r}; not a FLUX ControlNet in the diffusers layout")
        return shapes[key]

    if hf:
        heads, head_dim = hf.get("num_attention_heads", 24), hf.get("attention_head_dim", 128)
        config = _base_config(
            in_channels=hf.get("in_channels", 64),
            vec_in_dim=hf.get("pooled_projection_dim", 768),
            context_in_dim=hf.get("joint_attention_dim", 4096),
            hidden_size=heads * head_dim,
            num_heads=heads,
            depth=hf.get("num_layers", 19),
            depth_single_blocks=hf.get("num_single_layers", 38),
            axes_dim=tuple(axes_dim or hf.get("axes_dims_rope", _FLUX_AXES)),
            guidance_embed=bool(hf.get("guidance_embeds", False)),
        )
        return config, {"num_modes": hf.get("num_mode"), "hint": hf.get("conditioning_embedding_channels")}
    hidden, in_ch = shape("x_embedder.weight")
    head_dim = (
        shape("transformer_blocks.0.attn.norm_q.weight")[0]
        if "transformer_blocks.0.attn.norm_q.weight" in shapes
        else 128
    )
    count = lambda rx: len({k.split(".")[1] for k in shapes if k.startswith(rx)})  # noqa: E731
    config = _base_config(
        in_channels=in_ch,
        vec_in_dim=shape("time_text_embed.text_embedder.linear_1.weight")[1],
        context_in_dim=shape("context_embedder.weight")[1],
        hidden_size=hidden,
        num_heads=hidden // head_dim,
        depth=count("transformer_blocks."),
        depth_single_blocks=count("single_transformer_blocks."),
        axes_dim=_default_axes(head_dim, axes_dim, source),
        guidance_embed="time_text_embed.guidance_embedder.linear_1.weight" in shapes,
    )
    modes = shapes.get("controlnet_mode_embedder.weight")
    hint = shapes.get("input_hint_block.conv_out.weight")
    return config, {"num_modes": modes[0] if modes else None, "hint": hint[0] if hint else None}


def _diffusers_tensors(ckpt, hint: bool) -> Iterator[tuple[str, Tensor]]:
    """(our key, tensor) from a diffusers-layout ControlNet file, streamed; fused BFL tensors
    (qkv, linear1) are assembled from their pieces as soon as all of them were read."""
    from fluxcore.controlnet_xlabs import diffusers_hint_key
    from fluxcore.weights.flux_keys import diffusers_key_to_bfl, fused_pieces

    pending: dict[str, dict[str, Tensor]] = {}
    for key, t in ckpt.stream():
        if key.startswith(_CONTROL_PREFIXES):
            if hint and key.startswith("controlnet_x_embedder."):  # XLabs-converted: pos_embed_input
                key = "pos_embed_input." + key.split(".", 1)[1]
            yield key, t
            continue
        if key.startswith("input_hint_block."):
            yield diffusers_hint_key(key, ckpt.source), t
            continue
        try:
            bfl, piece = diffusers_key_to_bfl(key)
        except KeyError:
            raise WeightsError(f"{ckpt.source}: unexpected key {key!r} for a FLUX ControlNet") from None
        if piece is None:
            yield bfl, t
            continue
        got = pending.setdefault(bfl, {})
        got[piece] = t
        order = fused_pieces(bfl)
        if len(got) == len(order):
            yield bfl, torch.cat([got[p] for p in order], dim=0)
            del pending[bfl]
    if pending:
        bfl, got = next(iter(pending.items()))
        missing = [p for p in fused_pieces(bfl) if p not in got]
        raise WeightsError(f"{ckpt.source}: cannot assemble {bfl!r}: pieces {missing} are missing")


def load_controlnet(
    path, *, device=None, dtype: torch.dtype | None = None, axes_dim: Sequence[int] | None = None
) -> nn.Module:
    """A FluxControlNet or XLabsControlNet from its official files, eval mode, frozen.

    path: a diffusers folder (config.json + diffusion_pytorch_model.safetensors or shards: InstantX,
          Union, Union-Pro 2.0, XLabs-converted), or a single .safetensors file in either layout
          (XLabs files use BFL names; the config is read from tensor shapes).
    dtype: default the file's own (float8 is upcast to bfloat16); pass the base model's dtype.
    axes_dim: RoPE split, needed only for single files whose head dim is not FLUX's 128.
    """
    from fluxcore.controlnet_xlabs import XLabsControlNet, xlabs_config
    from fluxcore.weights.io import load_into, open_checkpoint, read_json

    p = Path(path)
    hf = read_json(p / "config.json", missing_ok=True) if p.is_dir() else {}
    try:
        ckpt = open_checkpoint(p)
    except WeightsError as e:
        raise type(e)(f"cannot read ControlNet weights: {e}") from None
    with ckpt:
        shapes = {k: ckpt.shape(k) for k in ckpt.keys()}
        if "pos_embed_input.weight" in shapes and "double_blocks.0.img_attn.qkv.weight" in shapes:
            config = xlabs_config(shapes, ckpt.source, axes_dim)
            with torch.device("meta"):
                net = XLabsControlNet(config)
            tensors = ckpt.stream()
        elif "controlnet_x_embedder.weight" in shapes or "x_embedder.weight" in shapes:
            config, extra = _diffusers_config(hf, shapes, ckpt.source, axes_dim)
            with torch.device("meta"):
                if extra["hint"] is not None:
                    if config.depth_single_blocks:
                        raise WeightsError(
                            f"{ckpt.source}: a hint-block ControlNet with single blocks is not supported"
                        )
                    net = XLabsControlNet(config)
                else:
                    net = FluxControlNet(config, extra["num_modes"])
            tensors = _diffusers_tensors(ckpt, extra["hint"] is not None)
        else:
            raise WeightsError(
                f"{ckpt.source}: not a FLUX ControlNet (expected controlnet_x_embedder.weight (diffusers "
                f"layout) or pos_embed_input.weight (XLabs)); first keys: {list(shapes)[:4]}"
            )
        load_into(net, tensors, source=ckpt.source, device=device, dtype=dtype, copy=False)
    net.eval().requires_grad_(False)
    return net


def build_controls(
    nets: Sequence[nn.Module],
    control_image,
    *,
    control_mode=None,
    scale=1.0,
    start=0.0,
    end=1.0,
    width: int,
    height: int,
    encode: Callable[[Tensor], Tensor] | None = None,
) -> list[Control]:
    """The pipeline's keywords → Controls, broadcast as diffusers does: with one net, a list of
    control images means one Union net run once per (image, mode); with several nets, one image
    (and mode, scale, start, end) per net. Scalars apply to every control."""
    images = list(control_image) if isinstance(control_image, (list, tuple)) else [control_image]
    nets = list(nets) * len(images) if len(nets) == 1 else list(nets)
    if len(images) != len(nets):
        raise ConfigError(f"{len(nets)} ControlNets but {len(images)} control images; pass one image per net")

    def per(value, name):
        vals = list(value) if isinstance(value, (list, tuple)) else [value] * len(nets)
        if len(vals) != len(nets):
            raise ConfigError(f"{name} has {len(vals)} entries for {len(nets)} controls")
        return vals

    return [
        Control(net, prepare_control_image(net, img, width, height, encode), mode=m, scale=s, start=a, end=b)
        for net, img, m, s, a, b in zip(
            nets,
            images,
            per(control_mode, "control_mode"),
            per(scale, "controlnet_conditioning_scale"),
            per(start, "control_guidance_start"),
            per(end, "control_guidance_end"),
        )
    ]
