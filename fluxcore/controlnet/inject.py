"""ControlNet injection as a transform: wrappers around the base model's blocks that add this
step's residuals, the denoiser that computes them, and the pipeline's keywords → Controls."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from fluxcore.config import FluxConfig
from fluxcore.controlnet.model import per_sample, residual_index
from fluxcore.errors import ConfigError
from fluxcore.transforms import KeyPreservingWrapper

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


class ControlledDoubleBlock(KeyPreservingWrapper):
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


class ControlledSingleBlock(KeyPreservingWrapper):
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
    t = per_sample(sigma, b, x)
    g = None if guidance is None else per_sample(guidance, b, x)
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
