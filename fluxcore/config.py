"""FluxConfig: the transformer's hyper-parameters, with the reference's (BFL `FluxParams`) field names.

PRESETS holds every official FLUX.1 variant under the reference's config names, plus small
configurations for tests and experiments on a CPU.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from fluxcore.errors import ConfigError

# A packed token is a 2x2 patch of latent pixels, and a latent pixel covers 8x8 image pixels, so a
# token covers 16x16 image pixels. Fill models see the inpainting mask at full resolution: one
# channel per pixel under the token.
PATCH_SIZE = 2
AE_DOWNSAMPLE = 8
FILL_MASK_CHANNELS = (PATCH_SIZE * AE_DOWNSAMPLE) ** 2  # 256


@dataclass(frozen=True)
class FluxConfig:
    """Flat and frozen; defaults are FLUX.1-dev. Derive variants with `dataclasses.replace`.

    in_channels:  packed input channels: the noisy latents (out_channels) plus any condition
                  concatenated on channels; `conditioning` names the mode this implies.
    out_channels: packed output channels (the velocity): 16 latent ch x 2x2 = 64 for every
                  official variant.
    vec_in_dim:   pooled text vector width (CLIP-L: 768).
    context_in_dim: text token width (T5-XXL: 4096).
    hidden_size, num_heads: width and heads; head dim = hidden_size / num_heads = sum(axes_dim).
    depth, depth_single_blocks: number of double- and single-stream blocks.
    axes_dim: RoPE dims per position axis (index, row, col); theta: RoPE base (10 000 in every
                  official variant; an int or a float, kept exactly as given).
    guidance_embed: the model takes a distilled guidance strength (dev-type) or not (schnell).
    """

    in_channels: int = 64
    out_channels: int = 64
    vec_in_dim: int = 768
    context_in_dim: int = 4096
    hidden_size: int = 3072
    mlp_ratio: float = 4.0
    num_heads: int = 24
    depth: int = 19
    depth_single_blocks: int = 38
    axes_dim: tuple[int, ...] = (16, 56, 56)
    theta: int | float = 10_000
    qkv_bias: bool = True
    guidance_embed: bool = True

    def __post_init__(self):
        object.__setattr__(self, "axes_dim", tuple(int(a) for a in self.axes_dim))
        if self.hidden_size % self.num_heads:
            raise ConfigError(
                f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}"
            )
        if sum(self.axes_dim) != self.head_dim:
            raise ConfigError(
                f"sum(axes_dim) = sum({list(self.axes_dim)}) = {sum(self.axes_dim)} must equal the head dim "
                f"hidden_size / num_heads = {self.head_dim}"
            )
        if any(a % 2 for a in self.axes_dim):
            raise ConfigError(
                f"every entry of axes_dim must be even (RoPE rotates pairs), got {list(self.axes_dim)}"
            )
        for name in ("in_channels", "out_channels", "vec_in_dim", "context_in_dim", "depth_single_blocks"):
            if getattr(self, name) < (0 if name == "depth_single_blocks" else 1):
                raise ConfigError(f"{name} must be positive, got {getattr(self, name)}")
        if self.depth < 0:
            raise ConfigError(f"depth must be >= 0, got {self.depth}")
        if (
            isinstance(self.theta, bool)
            or not isinstance(self.theta, (int, float))
            or not math.isfinite(self.theta)
            or self.theta <= 1
        ):
            raise ConfigError(f"theta (the RoPE base) must be a finite number > 1, got {self.theta!r}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def mlp_hidden_dim(self) -> int:
        return int(self.hidden_size * self.mlp_ratio)

    @property
    def conditioning(self) -> str:
        """The conditioning mode the channel counts imply, with C = out_channels:

        "text"     in = C:           the noisy latents alone (text-to-image, img2img, Redux, Kontext)
        "control"  in = 2·C:         ‖ the encoded control image (Canny, Depth)
        "fill"     in = 2·C + 256:   ‖ the encoded masked image ‖ the mask, one channel per pixel of
                                     the 16x16 pixels under a token (FILL_MASK_CHANNELS)

        For FLUX (C = 64) that is 64, 128 and 384. Kontext has text's shapes: it is a property of the
        weights (the pipeline's `kontext` flag), not of the config. Other counts raise ConfigError.
        """
        c = self.out_channels
        modes = {c: "text", 2 * c: "control", 2 * c + FILL_MASK_CHANNELS: "fill"}
        try:
            return modes[self.in_channels]
        except KeyError:
            raise ConfigError(
                f"in_channels {self.in_channels} with out_channels {c} matches no conditioning mode; "
                f"expected {c} (text), {2 * c} (control: + control-image latent) or "
                f"{2 * c + FILL_MASK_CHANNELS} (fill: + masked-image latent + {FILL_MASK_CHANNELS} mask channels)"
            ) from None

    def replace(self, **changes) -> FluxConfig:
        return dataclasses.replace(self, **changes)


_DEV = FluxConfig()

PRESETS: dict[str, FluxConfig] = {
    "flux-dev": _DEV,
    "flux-dev-krea": _DEV,
    "flux-dev-kontext": _DEV,
    "flux-schnell": _DEV.replace(guidance_embed=False),
    "flux-dev-fill": _DEV.replace(in_channels=384),
    "flux-dev-canny": _DEV.replace(in_channels=128),
    "flux-dev-depth": _DEV.replace(in_channels=128),
    # Small configurations with the real structure (double + single blocks, 3-axis RoPE),
    # for tests and CPU experiments. head dim 16 = 4 + 6 + 6.
    "tiny-dev": FluxConfig(
        in_channels=64,
        out_channels=64,
        vec_in_dim=32,
        context_in_dim=48,
        hidden_size=64,
        mlp_ratio=4.0,
        num_heads=4,
        depth=2,
        depth_single_blocks=2,
        axes_dim=(4, 6, 6),
        theta=10_000,
        qkv_bias=True,
        guidance_embed=True,
    ),
}
PRESETS["tiny-schnell"] = PRESETS["tiny-dev"].replace(guidance_embed=False)
PRESETS["tiny-fill"] = PRESETS["tiny-dev"].replace(in_channels=384)
PRESETS["tiny-canny"] = PRESETS["tiny-dev"].replace(in_channels=128)

OFFICIAL_VARIANTS = (
    "flux-schnell",
    "flux-dev",
    "flux-dev-krea",
    "flux-dev-kontext",
    "flux-dev-fill",
    "flux-dev-canny",
    "flux-dev-depth",
)


def get_config(name: str) -> FluxConfig:
    """The preset called `name`; a clear error listing the known names otherwise."""
    try:
        return PRESETS[name]
    except KeyError:
        raise ConfigError(f"unknown FLUX config {name!r}; known: {', '.join(sorted(PRESETS))}") from None
