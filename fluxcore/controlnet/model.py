"""The ControlNet networks: a small FLUX trunk built from fluxcore's own blocks, and the rule that
spreads its residuals over the base model's blocks."""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor, nn

from fluxcore.config import FluxConfig
from fluxcore.errors import ConfigError
from fluxcore.layers import DoubleStreamBlock, EmbedND, MLPEmbedder, SingleStreamBlock
from fluxcore.math import timestep_embedding

# Control modes of the Union ControlNets (InstantX Union and Shakker Union-Pro 1.0 model cards).
CONTROL_MODES: dict[str, int] = {"canny": 0, "tile": 1, "depth": 2, "blur": 3, "pose": 4, "gray": 5, "lq": 6}


class ControlNetOutput(NamedTuple):
    """Unscaled residuals of one ControlNet evaluation, each [B, L_img, D] in the net's dtype."""

    double: tuple[Tensor, ...]
    single: tuple[Tensor, ...]


def per_sample(value, batch: int, like: Tensor) -> Tensor:
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


FLUX_AXES = (16, 56, 56)


def base_config(**fields) -> FluxConfig:
    """A FluxConfig for a ControlNet trunk (out_channels defaults to in_channels)."""
    fields.setdefault("out_channels", fields["in_channels"])
    return FluxConfig(**fields)


def default_axes(head_dim: int, axes_dim, source: str) -> tuple[int, ...]:
    """RoPE dims per axis: as given, else FLUX's (16, 56, 56) for head dim 128, else an error."""
    if axes_dim is not None:
        return tuple(axes_dim)
    if head_dim == sum(FLUX_AXES):
        return FLUX_AXES
    raise ConfigError(f"{source}: head dim {head_dim} is not FLUX's 128; pass axes_dim= (RoPE dims per axis)")
