"""The FLUX autoencoder: images [B, 3, H, W] in [−1, 1] ↔ latents [B, 16, H/8, W/8].

    encode: conv_in ─ levels (ResnetBlocks, Downsample after all but the last) ─ mid (res, attn, res)
            ─ norm ─ swish ─ conv_out → [mean ‖ logvar] ─ mean ─ scale · (mean − shift)
    decode: z / scale + shift ─ conv_in ─ mid ─ levels in reverse (num_res_blocks + 1 ResnetBlocks,
            Upsample after all but the last) ─ norm ─ swish ─ conv_out

Parameter names are the BFL `ae.safetensors` keys (`encoder.down.0.block.0.norm1.weight`,
`decoder.up.3.upsample.conv.weight`, `encoder.mid.attn_1.q.weight`, ...). `decoder.up[0]` is the
highest-resolution level, as in the file. diffusers' `vae/` layout converts through
`fluxcore.weights.vae_keys`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from fluxcore.errors import ConfigError, NonFiniteError, nonfinite_output


@dataclass(frozen=True)
class AutoEncoderConfig:
    """Frozen autoencoder hyper-parameters with BFL's `AutoEncoderParams` names, plus `norm_groups`
    (GroupNorm groups, 32 in FLUX; smaller for tiny test models whose widths are below 32).

    Defaults are FLUX.1's (every variant): ch 128, ch_mult (1, 2, 4, 4), 2 res blocks, 16 latent
    channels, scale 0.3611, shift 0.1159. `resolution` is nominal and unused at run time.
    """

    resolution: int = 256
    in_channels: int = 3
    ch: int = 128
    out_ch: int = 3
    ch_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    z_channels: int = 16
    scale_factor: float = 0.3611
    shift_factor: float = 0.1159
    norm_groups: int = 32

    def __post_init__(self):
        object.__setattr__(self, "ch_mult", tuple(int(m) for m in self.ch_mult))
        if not self.ch_mult or min(self.ch_mult) < 1:
            raise ConfigError(
                f"AutoEncoderConfig.ch_mult must be a non-empty list of positive ints, got {self.ch_mult}"
            )
        for name in ("in_channels", "ch", "out_ch", "num_res_blocks", "z_channels", "norm_groups"):
            if int(getattr(self, name)) < 1:
                raise ConfigError(f"AutoEncoderConfig.{name} must be >= 1, got {getattr(self, name)}")
        bad = [c for c in self.block_channels if c % self.norm_groups]
        if bad:
            raise ConfigError(
                f"AutoEncoderConfig: GroupNorm with norm_groups={self.norm_groups} needs every level width to be "
                f"divisible by it; widths are {list(self.block_channels)}"
            )
        if self.scale_factor == 0:
            raise ConfigError("AutoEncoderConfig.scale_factor must be non-zero")

    @property
    def block_channels(self) -> tuple[int, ...]:
        """Width of each resolution level, highest resolution first (diffusers' block_out_channels)."""
        return tuple(self.ch * m for m in self.ch_mult)

    @property
    def downsample_factor(self) -> int:
        """Pixels per latent along each side (8 for FLUX)."""
        return 2 ** (len(self.ch_mult) - 1)

    def replace(self, **changes) -> AutoEncoderConfig:
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_diffusers_dict(cls, d: dict) -> AutoEncoderConfig:
        """From a diffusers `AutoencoderKL` `vae/config.json` dict. Raises ConfigError for options the
        FLUX autoencoder does not have (quant convs, per-level attention, other block types)."""
        boc = [int(c) for c in d.get("block_out_channels", (64,))]
        ch = boc[0]
        if any(c % ch for c in boc):
            raise ConfigError(
                f"vae config: block_out_channels {boc} are not multiples of the first width {ch}"
            )
        for key in ("use_quant_conv", "use_post_quant_conv"):
            if d.get(key, True):
                raise ConfigError(
                    f"vae config: {key}={d.get(key, True)} but the FLUX autoencoder has no quant convs"
                )
        if not d.get("mid_block_add_attention", True):
            raise ConfigError(
                "vae config: mid_block_add_attention=False but the FLUX autoencoder has mid attention"
            )
        if d.get("act_fn", "silu") != "silu":
            raise ConfigError(f"vae config: act_fn={d.get('act_fn')!r}; the FLUX autoencoder uses 'silu'")
        for key, want in (("down_block_types", "DownEncoderBlock2D"), ("up_block_types", "UpDecoderBlock2D")):
            got = d.get(key, [want] * len(boc))
            if len(got) != len(boc) or any(t != want for t in got):
                raise ConfigError(f"vae config: {key}={got}; expected {len(boc)} × {want!r}")
        if d.get("scaling_factor") is None or d.get("shift_factor") is None:
            raise ConfigError(
                "vae config: needs scaling_factor and shift_factor (FLUX: 0.3611, 0.1159); "
                f"got {d.get('scaling_factor')} and {d.get('shift_factor')}"
            )
        size = d.get("sample_size", 256)  # nominal only; an int or [h, w]
        return cls(
            resolution=int(size[0] if isinstance(size, (list, tuple)) else size),
            in_channels=int(d.get("in_channels", 3)),
            ch=ch,
            out_ch=int(d.get("out_channels", 3)),
            ch_mult=tuple(c // ch for c in boc),
            num_res_blocks=int(d.get("layers_per_block", 1)),
            z_channels=int(d.get("latent_channels", 4)),
            scale_factor=float(d["scaling_factor"]),
            shift_factor=float(d["shift_factor"]),
            norm_groups=int(d.get("norm_num_groups", 32)),
        )

    def to_diffusers_dict(self) -> dict:
        """A diffusers-compatible `vae/config.json` dict (`AutoencoderKL`)."""
        n = len(self.ch_mult)
        return {
            "_class_name": "AutoencoderKL",
            "act_fn": "silu",
            "block_out_channels": list(self.block_channels),
            "down_block_types": ["DownEncoderBlock2D"] * n,
            "up_block_types": ["UpDecoderBlock2D"] * n,
            "in_channels": self.in_channels,
            "out_channels": self.out_ch,
            "latent_channels": self.z_channels,
            "layers_per_block": self.num_res_blocks,
            "norm_num_groups": self.norm_groups,
            "sample_size": self.resolution,
            "scaling_factor": self.scale_factor,
            "shift_factor": self.shift_factor,
            "use_quant_conv": False,
            "use_post_quant_conv": False,
            "mid_block_add_attention": True,
            "force_upcast": True,
        }


AE_PRESETS: dict[str, AutoEncoderConfig] = {
    "flux": AutoEncoderConfig(),
    # Same structure (4 levels, 8× down, mid attention, 16 latent channels), widths 8/16/16/16.
    "tiny": AutoEncoderConfig(ch=8, ch_mult=(1, 2, 2, 2), num_res_blocks=1, norm_groups=4),
}


def swish(x: Tensor) -> Tensor:
    return x * torch.sigmoid(x)


def _norm(channels: int, groups: int) -> nn.GroupNorm:
    return nn.GroupNorm(num_groups=groups, num_channels=channels, eps=1e-6, affine=True)


class ResnetBlock(nn.Module):
    """skip(x) + conv2(swish(norm2(conv1(swish(norm1(x)))))); skip is a 1×1 `nin_shortcut` when the
    width changes."""

    def __init__(self, in_channels: int, out_channels: int, groups: int):
        super().__init__()
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.norm1 = _norm(in_channels, groups)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = _norm(out_channels, groups)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        if in_channels != out_channels:
            self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv1(swish(self.norm1(x)))
        h = self.conv2(swish(self.norm2(h)))
        skip = self.nin_shortcut(x) if self.in_channels != self.out_channels else x
        return skip + h


class AttnBlock(nn.Module):
    """Single-head self-attention over all H·W positions (scale 1/√C), with 1×1-conv projections."""

    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.norm = _norm(channels, groups)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        B, C, H, W = x.shape
        h = self.norm(x)
        q, k, v = (rearrange(p(h), "b c h w -> b 1 (h w) c") for p in (self.q, self.k, self.v))
        h = chunked_attention(q, k, v)
        h = rearrange(h, "b 1 (h w) c -> b c h w", h=H, w=W)
        return x + self.proj_out(h)


# Query rows per attention call: at most 2^26 scores (256 MB in float32) per call. A 2048² image
# has 65536 latent positions, and a kernel that materialises the scores (SDPA on the CPU, the math
# backend) would need 17 GB for them at once.
_MAX_SCORES = 1 << 26


def chunked_attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """softmax(q kᵀ/√C) v for [B, 1, L, C] tensors, in chunks of query rows (each row's softmax is
    its own, so the chunks compute exactly the rows of the whole); one call when L² is small."""
    rows = max(1, _MAX_SCORES // k.shape[-2])
    if q.shape[-2] <= rows:
        return F.scaled_dot_product_attention(q, k, v)
    return torch.cat([F.scaled_dot_product_attention(c, k, v) for c in q.split(rows, dim=-2)], dim=-2)


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x: Tensor) -> Tensor:
        # Asymmetric zero pad (right and bottom only), then a stride-2 conv without padding.
        return self.conv(F.pad(x, (0, 1, 0, 1), mode="constant", value=0))


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class _Mid(nn.Module):
    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels, groups)
        self.attn_1 = AttnBlock(channels, groups)
        self.block_2 = ResnetBlock(channels, channels, groups)

    def forward(self, x: Tensor) -> Tensor:
        return self.block_2(self.attn_1(self.block_1(x)))


class _Level(nn.Module):
    """One resolution level: `block` (ResnetBlocks), empty `attn` (FLUX has no level attention), and
    `downsample` / `upsample` when the level changes resolution."""

    def __init__(self, blocks: list[ResnetBlock], resample: nn.Module | None, name: str):
        super().__init__()
        self.block = nn.ModuleList(blocks)
        self.attn = nn.ModuleList()
        if resample is not None:
            setattr(self, name, resample)


class Encoder(nn.Module):
    """[B, in_channels, H, W] → [B, 2·z_channels, H/f, W/f] (mean ‖ logvar), f = 2^(levels−1)."""

    def __init__(self, config: AutoEncoderConfig):
        super().__init__()
        g, widths = config.norm_groups, config.block_channels
        self.conv_in = nn.Conv2d(config.in_channels, config.ch, 3, padding=1)
        self.down = nn.ModuleList()
        block_in = config.ch
        for i, width in enumerate(widths):
            blocks = []
            for _ in range(config.num_res_blocks):
                blocks.append(ResnetBlock(block_in, width, g))
                block_in = width
            last = i == len(widths) - 1
            self.down.append(_Level(blocks, None if last else Downsample(width), "downsample"))
        self.mid = _Mid(block_in, g)
        self.norm_out = _norm(block_in, g)
        self.conv_out = nn.Conv2d(block_in, 2 * config.z_channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv_in(x)
        for level in self.down:
            for block in level.block:
                h = block(h)
            if hasattr(level, "downsample"):
                h = level.downsample(h)
        h = self.mid(h)
        return self.conv_out(swish(self.norm_out(h)))


class Decoder(nn.Module):
    """[B, z_channels, h, w] → [B, out_ch, h·f, w·f]."""

    def __init__(self, config: AutoEncoderConfig):
        super().__init__()
        g, widths = config.norm_groups, config.block_channels
        block_in = widths[-1]
        self.conv_in = nn.Conv2d(config.z_channels, block_in, 3, padding=1)
        self.mid = _Mid(block_in, g)
        levels: list[_Level] = []
        for i in reversed(range(len(widths))):
            blocks = []
            for _ in range(config.num_res_blocks + 1):
                blocks.append(ResnetBlock(block_in, widths[i], g))
                block_in = widths[i]
            levels.insert(0, _Level(blocks, None if i == 0 else Upsample(block_in), "upsample"))
        # up[0] is the highest resolution, as in the checkpoint; it runs last.
        self.up = nn.ModuleList(levels)
        self.norm_out = _norm(block_in, g)
        self.conv_out = nn.Conv2d(block_in, config.out_ch, 3, padding=1)

    def forward(self, z: Tensor) -> Tensor:
        h = self.mid(self.conv_in(z))
        # The reference casts here so that a mixed-precision decoder runs its levels in their own dtype.
        h = h.to(self.conv_out.weight.dtype)
        for level in reversed(self.up):
            for block in level.block:
                h = block(h)
            if hasattr(level, "upsample"):
                h = level.upsample(h)
        return self.conv_out(swish(self.norm_out(h)))


class AutoEncoder(nn.Module):
    """The FLUX autoencoder with BFL `ae.safetensors` parameter names.

    encode(images [B, in_channels, H, W] in [−1, 1]) → latents [B, z_channels, H/8, W/8]
        = scale_factor · (mean − shift_factor)   (the distribution's mean; nothing is sampled)
    decode(latents [B, z_channels, h, w]) → images [B, out_ch, 8h, 8w], roughly in [−1, 1] (not clamped)

    H and W must be multiples of 8 (`config.downsample_factor`). Inputs are cast to the weights'
    dtype; outputs come back in it. Load weights with `fluxcore.load_autoencoder`.
    """

    def __init__(self, config: AutoEncoderConfig | None = None):
        super().__init__()
        self.config = config = config or AutoEncoderConfig()
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        self.scale_factor = config.scale_factor
        self.shift_factor = config.shift_factor
        self.use_tiling = False
        self.use_slicing = False
        self.tile_sample_size = 512
        self.tile_overlap = 0.25

    def _check(self, x: Tensor, channels: int, what: str, multiple: int) -> None:
        if x.ndim != 4 or x.shape[1] != channels:
            raise ValueError(f"{what} must be [B, {channels}, H, W]; got shape {tuple(x.shape)}")
        if x.shape[2] % multiple or x.shape[3] % multiple:
            raise ValueError(
                f"{what} height and width must be multiples of {multiple}; got {x.shape[2]}×{x.shape[3]} "
                f"(shape {tuple(x.shape)}). Crop or resize, e.g. to "
                f"{x.shape[2] // multiple * multiple}×{x.shape[3] // multiple * multiple}"
            )

    def encode_moments(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Unscaled (mean, logvar), each [B, z_channels, H/8, W/8]."""
        self._check(x, self.config.in_channels, "images", self.config.downsample_factor)
        x = x.to(self.dtype)
        if self.use_slicing and x.shape[0] > 1:
            moments = torch.cat([self._encode_one(xi) for xi in x.split(1)])
        else:
            moments = self._encode_one(x)
        mean, logvar = moments.chunk(2, dim=1)
        return mean, logvar

    def encode(self, x: Tensor) -> Tensor:
        mean, _ = self.encode_moments(x)
        z = self.scale_factor * (mean - self.shift_factor)
        if not bool(torch.isfinite(z).all()):
            raise NonFiniteError(nonfinite_output(self, "encode", x, z))
        return z

    def decode(self, z: Tensor) -> Tensor:
        self._check(z, self.config.z_channels, "latents", 1)
        z = z.to(self.dtype) / self.scale_factor + self.shift_factor
        if self.use_slicing and z.shape[0] > 1:
            out = torch.cat([self._decode_one(zi) for zi in z.split(1)])
        else:
            out = self._decode_one(z)
        if not bool(torch.isfinite(out).all()):
            raise NonFiniteError(nonfinite_output(self, "decode", z, out))
        return out

    def forward(self, x: Tensor) -> Tensor:
        return self.decode(self.encode(x))

    # --- memory: slicing and tiling -------------------------------------------------------------
    #
    # Slicing runs a batch one image at a time. Tiling runs the network on overlapping tiles of
    # `tile_sample_size` pixels, `tile_overlap` of a tile shared with each neighbour, and blends the
    # overlaps linearly (a weighted average whose weights ramp across the overlap), so the compute
    # device holds one tile's activations whatever the image size. Images no larger than a tile are
    # not tiled.
    #
    # GroupNorm normalises over the whole image, so a tile normalised on its own statistics drifts
    # in colour and contrast. Decoding with `shared_norm=True` (the default) avoids that by not
    # tiling the network but each layer: the latent-resolution part (conv_in and the mid block with
    # its attention, small) runs whole; every later 3×3 convolution runs over non-overlapping
    # blocks of the whole image with a one-pixel halo, and every GroupNorm uses statistics summed
    # over the blocks. The result is the untiled decode's (no seams, `tile_overlap` unused); the
    # device holds one block's activations and the whole images between layers (about four
    # full-resolution activations) wait in host memory when the decoder is on a GPU.
    # `shared_norm=False` and tiled encoding run the whole network per overlapping tile and
    # normalise per tile (the usual tiled VAE: the least memory anywhere, visible drift).

    def enable_tiling(
        self, tile_sample_size: int | None = None, tile_overlap: float | None = None, shared_norm: bool = True
    ) -> None:
        """Decode and encode in overlapping tiles of `tile_sample_size` pixels (a multiple of the
        downsample factor, default 512), `tile_overlap` of a tile (in [0, 0.5), default 0.25)."""
        if tile_sample_size is not None:
            f = self.config.downsample_factor
            if tile_sample_size % f or tile_sample_size < 2 * f:
                raise ValueError(
                    f"tile_sample_size must be a multiple of {f} and at least {2 * f}, got {tile_sample_size}"
                )
            self.tile_sample_size = int(tile_sample_size)
        if tile_overlap is not None:
            if not 0 <= tile_overlap < 0.5:
                raise ValueError(f"tile_overlap must be in [0, 0.5), got {tile_overlap}")
            self.tile_overlap = float(tile_overlap)
        self.shared_norm = bool(shared_norm)
        self.use_tiling = True

    def disable_tiling(self) -> None:
        self.use_tiling = False

    def enable_slicing(self) -> None:
        """Encode and decode a batch one image at a time."""
        self.use_slicing = True

    def disable_slicing(self) -> None:
        self.use_slicing = False

    def _decode_one(self, z: Tensor) -> Tensor:
        if not self.use_tiling:
            return self.decoder(z)
        tile = self.tile_sample_size // self.config.downsample_factor
        if getattr(self, "shared_norm", True) and self._shared_norm_ok():
            return self._decode_shared_norm(z, tile)
        return self._tiled(self.decoder, z, tile, self.config.downsample_factor)

    def _encode_one(self, x: Tensor) -> Tensor:
        if not self.use_tiling:
            return self.encoder(x)
        return self._tiled(self.encoder, x, self.tile_sample_size, 1 / self.config.downsample_factor)

    def _grid(self, n: int, tile: int) -> list[int]:
        """Tile starts along one axis of n input pixels; the last tile ends at n."""
        if n <= tile:
            return [0]
        stride = max(1, tile - int(tile * self.tile_overlap))
        return [*range(0, n - tile, stride), n - tile]

    def _blend(self, outs, rows, cols, tile, n_rows, n_cols, scale) -> Tensor:
        """Weighted average of tile outputs (outs[i][j] at rows[i], cols[j], in input pixels):
        weights rise linearly over the overlap from a tile's inner edges, never reach 0."""
        ov = max(1, int(int(tile * self.tile_overlap) * scale))

        def ramp(start, size, n, device):
            w = torch.ones(int(size * scale), device=device)
            r = (torch.arange(ov, device=device, dtype=torch.float32) + 0.5) / ov
            if start > 0:
                w[:ov] = torch.minimum(w[:ov], r[: w.numel()])
            if start + size < n:
                w[-ov:] = torch.minimum(w[-ov:], r.flip(0)[-w.numel() :])
            return w

        out = weight = None
        for i, top in enumerate(rows):
            for j, left in enumerate(cols):
                y = outs[i][j].float()
                if out is None:
                    out = torch.zeros(*y.shape[:2], int(n_rows * scale), int(n_cols * scale), device=y.device)
                    weight = torch.zeros(out.shape[-2:], device=y.device)
                th, tw = min(tile, n_rows), min(tile, n_cols)
                w = ramp(top, th, n_rows, y.device)[:, None] * ramp(left, tw, n_cols, y.device)[None, :]
                t0, l0 = int(top * scale), int(left * scale)
                out[..., t0 : t0 + y.shape[-2], l0 : l0 + y.shape[-1]] += y * w
                weight[t0 : t0 + y.shape[-2], l0 : l0 + y.shape[-1]] += w
        return out / weight

    def _tiled(self, net: nn.Module, x: Tensor, tile: int, scale: float) -> Tensor:
        """net over overlapping tile × tile crops of x, blended; `scale` = output px per input px."""
        H, W = x.shape[-2:]
        if H <= tile and W <= tile:
            return net(x)
        rows, cols = self._grid(H, tile), self._grid(W, tile)
        outs = [[net(x[..., t : t + tile, l : l + tile]) for l in cols] for t in rows]
        return self._blend(outs, rows, cols, tile, H, W, scale).to(x.dtype)

    def _shared_norm_ok(self) -> bool:
        """The exact tiled decode reaches into the upsampling path's layers: only for the modules
        it knows (a swapped-in block or norm gets the per-tile decode, which calls the modules)."""
        dec = self.decoder
        if type(dec.norm_out) is not nn.GroupNorm or type(dec.conv_out) is not nn.Conv2d:
            return False
        for level in dec.up:
            if len(level.attn) or any(type(b) is not ResnetBlock for b in level.block):
                return False
            parts = [(type(b.norm1), type(b.norm2), type(b.conv1), type(b.conv2)) for b in level.block]
            if any(p != (nn.GroupNorm, nn.GroupNorm, nn.Conv2d, nn.Conv2d) for p in parts):
                return False
            up = getattr(level, "upsample", None)
            if up is not None and (type(up) is not Upsample or type(up.conv) is not nn.Conv2d):
                return False
        return True

    def _decode_shared_norm(self, z: Tensor, tile: int) -> Tensor:
        """The untiled decode computed block by block. The latent-resolution part (conv_in, mid
        block with attention) runs whole. Each later layer reads the whole image from the store
        (host memory when the decoder is on a GPU) in non-overlapping blocks with a one-pixel halo
        (zeros at the image border, as the convolution's padding), runs on the device, and writes
        its block of the next whole image; GroupNorm statistics are summed (float64) over the
        blocks as they are written. So the result is the untiled decode's, with no seams, while
        the device holds one block's activations and the store about four whole images."""
        dec = self.decoder
        dev, dtype = z.device, dec.conv_out.weight.dtype
        h = dec.mid(dec.conv_in(z)).to(dtype)
        if max(h.shape[-2:]) <= tile:
            return dec(z)
        store = torch.device("cpu") if dev.type != "cpu" else dev
        groups = dec.norm_out.num_groups

        def stats(x: Tensor) -> tuple[Tensor, Tensor, int]:
            part = x.float().reshape(x.shape[0], groups, -1)  # sums in float64, no float64 copy
            return (
                part.sum(-1, dtype=torch.float64),
                (part * part).sum(-1, dtype=torch.float64),
                part.shape[-1],
            )

        def norm_swish(gn: nn.GroupNorm, st):
            # GroupNorm as one per-channel affine map y = x·a + b, a and b from the float64 sums:
            # a block needs one float32 temporary, not a float64 copy per step
            total, sq, count = st
            mean = total / count
            rstd = torch.rsqrt((sq / count - mean * mean).clamp(min=0) + gn.eps)
            per = gn.num_channels // groups
            a = rstd.repeat_interleave(per, dim=1) * gn.weight.double()  # [B, C]
            b = gn.bias.double() - mean.repeat_interleave(per, dim=1) * a
            a, b = a.float()[..., None, None], b.float()[..., None, None]

            def apply(x: Tensor) -> Tensor:
                return swish(torch.addcmul(b.to(x.device), x.float(), a.to(x.device)).to(x.dtype))

            return apply

        def layer(src: Tensor, conv: nn.Conv2d, pre=None, up: bool = False, skip=None, out=None):
            """out = conv(pre(src)) (after a 2× nearest upsample if `up`) + fn(the same block of
            image) for skip = (fn, image), block by block; returns (out, statistics of out)."""
            B, _, H, W = src.shape
            f = 2 if up else 1
            if out is None:
                out = torch.empty(B, conv.out_channels, H * f, W * f, dtype=src.dtype, device=store)
            acc = None
            for r0 in range(0, H, tile):
                r1 = min(r0 + tile, H)
                for c0 in range(0, W, tile):
                    c1 = min(c0 + tile, W)
                    a, b, c, d = max(r0 - 1, 0), min(r1 + 1, H), max(c0 - 1, 0), min(c1 + 1, W)
                    x = src[..., a:b, c:d].to(dev)
                    if pre is not None:
                        x = pre(x)
                    # one pixel of halo on each side at the output resolution; zeros outside
                    pad = [int(c0 == 0), int(c1 == W), int(r0 == 0), int(r1 == H)]
                    if up:
                        x = F.interpolate(x, scale_factor=2.0, mode="nearest")
                        x = x[
                            ..., 1 - pad[2] : x.shape[-2] - 1 + pad[3], 1 - pad[0] : x.shape[-1] - 1 + pad[1]
                        ]
                    y = F.conv2d(F.pad(x, pad), conv.weight, conv.bias)
                    if skip is not None:
                        y = y + skip[0](skip[1][..., r0:r1, c0:c1].to(dev))
                    st = stats(y)
                    acc = st if acc is None else (acc[0] + st[0], acc[1] + st[1], acc[2] + st[2])
                    out[..., r0 * f : r1 * f, c0 * f : c1 * f] = y.to(out.device)
            return out, acc

        x, st = h.to(store), stats(h)
        del h
        for level in reversed(dec.up):
            for block in level.block:
                hs, hst = layer(x, block.conv1, norm_swish(block.norm1, st))
                shortcut = block.nin_shortcut if block.in_channels != block.out_channels else nn.Identity()
                x, st = layer(hs, block.conv2, norm_swish(block.norm2, hst), skip=(shortcut, x))
                del hs
            if hasattr(level, "upsample"):
                x, st = layer(x, level.upsample.conv, up=True)
                tile *= 2  # a block covers the same part of the image at twice the resolution
        out = torch.empty(x.shape[0], dec.conv_out.out_channels, *x.shape[-2:], dtype=x.dtype, device=dev)
        out, _ = layer(x, dec.conv_out, norm_swish(dec.norm_out, st), out=out)
        return out

    @property
    def dtype(self) -> torch.dtype:
        return self.encoder.conv_in.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.encoder.conv_in.weight.device
