"""Latent noise, 2x2 patch packing and the RoPE position ids of FLUX.1.

Sizes are given in pixels, as in the reference: an H x W image has a latent grid of
2·⌈H/16⌉ x 2·⌈W/16⌉ (16 channels, the autoencoder downsamples 8x) and a packed grid of
⌈H/16⌉ x ⌈W/16⌉ tokens of 16·2·2 = 64 channels.
"""

from __future__ import annotations

import math
import random

import torch
from einops import rearrange
from torch import Tensor

from fluxcore.errors import ConfigError

LATENT_CHANNELS = 16


def latent_size(height: int, width: int) -> tuple[int, int]:
    """(h, w) of the latent grid for an image of height x width pixels: 2·⌈H/16⌉, 2·⌈W/16⌉."""
    return 2 * math.ceil(height / 16), 2 * math.ceil(width / 16)


def get_noise(
    num_samples: int,
    height: int,
    width: int,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.bfloat16,
    seed: int = 0,
) -> Tensor:
    """The reference's starting noise: [num_samples, 16, 2⌈H/16⌉, 2⌈W/16⌉] in `dtype`.

    Drawn on the CPU with a `torch.Generator` seeded by `seed`, directly in `dtype` (the
    reference uses bf16), then moved to `device`: a seed gives the same noise on every device.
    """
    h, w = latent_size(height, width)
    generator = torch.Generator(device="cpu").manual_seed(int(seed))
    noise = torch.randn(num_samples, LATENT_CHANNELS, h, w, dtype=dtype, generator=generator)
    return noise.to(device) if device is not None else noise


def draw_noise(
    generator,
    num_samples: int,
    height: int,
    width: int,
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.bfloat16,
) -> tuple[Tensor, list[int] | None]:
    """Packed starting noise [num_samples, ⌈H/16⌉·⌈W/16⌉, 64] in `dtype` on `device`, and the seeds used.

    generator: None (a random seed is drawn), an int seed (the reference's noise, `get_noise`, for
    the whole batch), a torch.Generator (drawn on its device), or a list with one seed or
    generator per sample. Seeds come back as [seed] for one seed, one per sample for a list of
    seeds, None for generators.
    """
    if generator is None:
        generator = random.SystemRandom().randrange(2**32)
    items = list(generator) if isinstance(generator, (list, tuple)) else None
    if items is not None and len(items) != num_samples:
        raise ConfigError(
            f"got {len(items)} seeds/generators for {num_samples} images (prompts × num_images_per_prompt); "
            "give one per image or a single one"
        )

    def from_generator(g: torch.Generator, n: int) -> Tensor:
        x = torch.randn(
            n, LATENT_CHANNELS, *latent_size(height, width), generator=g, device=g.device, dtype=dtype
        )
        return pack(x.to(device))

    if items is None:
        if isinstance(generator, torch.Generator):
            return from_generator(generator, num_samples), None
        seed = _seed(generator)
        return pack(get_noise(num_samples, height, width, device, dtype, seed)), [seed]
    if all(isinstance(g, torch.Generator) for g in items):
        return torch.cat([from_generator(g, 1) for g in items]), None
    seeds = [_seed(g) for g in items]
    return torch.cat([pack(get_noise(1, height, width, device, dtype, s)) for s in seeds]), seeds


def _seed(value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ConfigError(f"a seed must be a non-negative integer (or a torch.Generator); got {value!r}")
    return value


def pack(x: Tensor) -> Tensor:
    """[B, C, h, w] latents → [B, (h/2)·(w/2), 4C] tokens (2x2 patches, row-major tokens,
    channel index c·4 + ph·2 + pw). h and w must be even."""
    return rearrange(x, "b c (h ph) (w pw) -> b (h w) (c ph pw)", ph=2, pw=2)


def unpack(x: Tensor, height: int, width: int) -> Tensor:
    """Inverse of `pack` for an image of height x width pixels: [B, L, 4C] → [B, C, 2⌈H/16⌉, 2⌈W/16⌉]."""
    return rearrange(
        x,
        "b (h w) (c ph pw) -> b c (h ph) (w pw)",
        h=math.ceil(height / 16),
        w=math.ceil(width / 16),
        ph=2,
        pw=2,
    )


def make_img_ids(
    batch: int,
    height: int,
    width: int,
    *,
    index: int = 0,
    device: torch.device | str | None = None,
) -> Tensor:
    """Position ids of the packed image tokens: [batch, ⌈H/16⌉·⌈W/16⌉, 3] float32.

    Token (row r, col c) gets (index, r, c). index 0 is the image being generated; Kontext
    reference images use index 1 over their own grid (no spatial offset), as the reference does.
    """
    gh, gw = math.ceil(height / 16), math.ceil(width / 16)
    ids = torch.zeros(gh, gw, 3, device=device)
    ids[..., 0] = float(index)
    ids[..., 1] = torch.arange(gh, device=device, dtype=torch.float32)[:, None]
    ids[..., 2] = torch.arange(gw, device=device, dtype=torch.float32)[None, :]
    return ids.reshape(1, gh * gw, 3).repeat(batch, 1, 1)


def make_txt_ids(batch: int, length: int, *, device: torch.device | str | None = None) -> Tensor:
    """Position ids of text tokens (T5 and any Redux tokens appended to them): zeros [batch, length, 3] float32."""
    return torch.zeros(batch, length, 3, device=device)


def image_seq_len(height: int, width: int) -> int:
    """Number of packed image tokens for height x width pixels, ⌈H/16⌉·⌈W/16⌉ (the `image_seq_len`
    of `get_schedule`)."""
    return math.ceil(height / 16) * math.ceil(width / 16)
