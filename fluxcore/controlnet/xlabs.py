"""The XLabs FLUX ControlNet (XLabs-AI/flux-controlnet-*: canny, depth, hed, v3), BFL key names.

    control image [B, 3, H, W] in [-1, 1] (pixels, not latents)
      ─ input_hint_block: 8 convs 3x3 (3→16, then 16→16; the 3rd, 5th and 7th with stride 2), SiLU
        between them ─ [B, 16, H/8, W/8] ─ pack 2x2 ─ [B, L_img, 64] ─ pos_embed_input ─┐
    img [B, L_img, 64] ─ img_in ──────────────────────────────────────────────────────── + ─ x
    x, txt_in(txt), vec ─ double_blocks (2 in the released files) ─ controlnet_blocks[i](img stream)

The base model adds residual[k % n] after every double block k and nothing to single blocks; the
official scale (`controlnet_gs`) is 0.7. Files: `double_blocks.N.*`, `controlnet_blocks.N.*`,
`pos_embed_input.*`, `input_hint_block.{0,2,...,14}.*`, `img_in`, `txt_in`, `time_in`,
`vector_in`, `guidance_in` — the names of this module.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from fluxcore.config import FluxConfig
from fluxcore.controlnet.model import ControlNetOutput, ControlTrunk, base_config, default_axes
from fluxcore.errors import ConfigError, WeightsError
from fluxcore.latents import pack


def hint_block(channels: int = 16) -> nn.Sequential:
    """The XLabs hint encoder: [B, 3, H, W] → [B, channels, H/8, W/8]; conv indices 0, 2, ..., 14."""
    layers: list[nn.Module] = [nn.Conv2d(3, channels, 3, padding=1)]
    for stride in (1, 2, 1, 2, 1, 2, 1):
        layers += [nn.SiLU(), nn.Conv2d(channels, channels, 3, padding=1, stride=stride)]
    return nn.Sequential(*layers)


class XLabsControlNet(ControlTrunk):
    """XLabs ControlNet: `config.depth` double blocks (no single blocks), a pixel-space hint
    encoder and pos_embed_input. `load_controlnet` reads the official files."""

    injection = "repeat"
    pixel_condition = True  # `prepare_control_image` hands it pixels, not latents

    def __init__(self, config: FluxConfig):
        super().__init__(config)
        if config.in_channels % 4:
            raise ConfigError(
                f"XLabs ControlNet needs in_channels divisible by 4 (2x2 packing); got {config.in_channels}"
            )
        self.pos_embed_input = nn.Linear(config.in_channels, config.hidden_size)
        self.input_hint_block = hint_block(config.in_channels // 4)

    def mode_index(self, mode) -> None:
        if mode is not None:
            raise ConfigError(f"control_mode={mode!r} given, but XLabs ControlNets have no control modes")
        return None

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
        mode=None,
    ) -> ControlNetOutput:
        """The base model's step inputs (as FluxControlNet) plus cond [B or 1, 3, H, W] in [-1, 1],
        H x W the output image size (16 x the token grid). → ControlNetOutput(double: depth ×
        [B, L_img, D], single: ())."""
        self.mode_index(mode)
        if cond.ndim != 4 or cond.shape[1] != 3:
            raise ConfigError(
                f"XLabs ControlNet condition must be pixels [B, 3, H, W] in [-1, 1]; got {tuple(cond.shape)}"
            )
        x, txt, vec = self.embed_inputs(img, txt, timesteps, y, guidance)
        hint = pack(self.input_hint_block(cond.to(x.dtype)))
        if hint.shape[1] != x.shape[1]:
            raise ConfigError(
                f"control image {cond.shape[-1]}x{cond.shape[-2]} gives {hint.shape[1]} tokens; the latents "
                f"have {x.shape[1]} (the control image must be the output size)"
            )
        x = x + self.pos_embed_input(hint)
        pe = self.pe_embedder(torch.cat((txt_ids, img_ids), dim=1))
        double = []
        for block, out in zip(self.double_blocks, self.controlnet_blocks):
            x, txt = block(img=x, txt=txt, vec=vec, pe=pe)
            double.append(out(x))
        return ControlNetOutput(tuple(double), ())


def xlabs_config(
    shapes: dict[str, tuple[int, ...]], source: str, axes_dim: Sequence[int] | None = None
) -> FluxConfig:
    """FluxConfig of an XLabs ControlNet file from its tensor shapes."""

    def shape(key):
        if key not in shapes:
            raise WeightsError(f"{source}: no tensor {key!r}; not an XLabs FLUX ControlNet")
        return shapes[key]

    hidden, in_ch = shape("img_in.weight")
    head_dim = shape("double_blocks.0.img_attn.norm.query_norm.scale")[0]
    depth = len({k.split(".")[1] for k in shapes if k.startswith("double_blocks.")})
    if any(k.startswith("single_blocks.") for k in shapes):
        raise WeightsError(f"{source}: XLabs ControlNets have no single blocks, but this file has some")
    return base_config(
        in_channels=in_ch,
        vec_in_dim=shape("vector_in.in_layer.weight")[1],
        context_in_dim=shape("txt_in.weight")[1],
        hidden_size=hidden,
        mlp_ratio=shape("double_blocks.0.img_mlp.0.weight")[0] / hidden,
        num_heads=hidden // head_dim,
        depth=depth,
        depth_single_blocks=0,
        axes_dim=default_axes(head_dim, axes_dim, source),
        qkv_bias="double_blocks.0.img_attn.qkv.bias" in shapes,
        guidance_embed="guidance_in.in_layer.weight" in shapes,
    )


def diffusers_hint_key(key: str, source: str = "ControlNet") -> str:
    """diffusers' name of a hint-block tensor (ControlNetConditioningEmbedding: conv_in, blocks.K,
    conv_out) → the XLabs index: conv_in → 0, blocks.K → 2(K + 1), conv_out → 14."""
    parts = key.split(".")
    if parts[1] == "conv_in":
        idx, rest = 0, parts[2:]
    elif parts[1] == "conv_out":
        idx, rest = 14, parts[2:]
    elif parts[1] == "blocks" and parts[2].isdigit():
        idx, rest = 2 * (int(parts[2]) + 1), parts[3:]
    else:
        raise WeightsError(f"{source}: unexpected hint-block key {key!r}")
    return ".".join(["input_hint_block", str(idx), *rest])


def xlabs_to_diffusers_hint_key(key: str) -> str:
    """Inverse of `diffusers_hint_key` (for writing diffusers-layout files and tests)."""
    idx = int(key.split(".")[1])
    rest = key.split(".", 2)[2]
    name = "conv_in" if idx == 0 else "conv_out" if idx == 14 else f"blocks.{idx // 2 - 1}"
    return f"input_hint_block.{name}.{rest}"


__all__ = [
    "XLabsControlNet",
    "diffusers_hint_key",
    "hint_block",
    "xlabs_config",
    "xlabs_to_diffusers_hint_key",
]
