"""Canny edge detection in PyTorch, as OpenCV's `cv2.Canny(image, low, high)` computes it (3x3
Sobel, L1 gradient magnitude), so edge-guided generation (Canny ControlNets, FLUX.1-Canny) runs
from a plain photo without OpenCV, on any device.

    pixels 0..255 ─ [optional Gaussian blur] ─ Sobel dx, dy (3x3, replicated border)
      ─ |dx| + |dy| per channel, the channel with the largest one wins (colour images)
      ─ non-maximum suppression along the gradient direction, quantised to 0/45/90/135 degrees
        with OpenCV's fixed-point tan(22.5) test and its tie rule (strictly greater than the
        neighbour before, at least the neighbour after)
      ─ double threshold: > high strong, > low weak ─ hysteresis: weak pixels 8-connected to a
        strong one are kept
    → edges, 255 on 0

OpenCV's Canny itself does not blur; `sigma` > 0 adds the Gaussian blur of the textbook algorithm
(kernel 2·ceil(3σ) + 1, replicated border) before the gradients.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from fluxcore.errors import ConfigError

_SHIFT = 15
_TG22 = int(0.4142135623730950488016887242097 * (1 << _SHIFT) + 0.5)  # tan(22.5°) in Q15, as OpenCV


def _gaussian_blur(x: Tensor, sigma: float) -> Tensor:
    r = math.ceil(3 * sigma)
    k = torch.exp(-((torch.arange(-r, r + 1, dtype=torch.float32, device=x.device) / sigma) ** 2) / 2)
    k = (k / k.sum()).to(x.dtype)
    c = x.shape[1]
    x = F.pad(x, (r, r, r, r), mode="replicate")
    x = F.conv2d(x, k.view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)
    return F.conv2d(x, k.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)


def _sobel(x: Tensor) -> tuple[Tensor, Tensor]:
    """3x3 Sobel of x [B, C, H, W] (replicated border) → dx, dy, each [B, C, H, W]."""
    kx = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]], dtype=x.dtype, device=x.device)
    c = x.shape[1]
    p = F.pad(x, (1, 1, 1, 1), mode="replicate")
    dx = F.conv2d(p, kx.view(1, 1, 3, 3).expand(c, 1, 3, 3), groups=c)
    dy = F.conv2d(p, kx.t().reshape(1, 1, 3, 3).expand(c, 1, 3, 3), groups=c)
    return dx, dy


def _shifted(m: Tensor, dy: int, dx: int) -> Tensor:
    """m[b, y + dy, x + dx] with zeros outside the image. m [B, H, W]."""
    H, W = m.shape[-2:]
    p = F.pad(m, (1, 1, 1, 1))
    return p[:, 1 + dy : 1 + dy + H, 1 + dx : 1 + dx + W]


def canny_edges(pixels: Tensor, low: float = 100, high: float = 200, *, sigma: float = 0.0) -> Tensor:
    """Canny edges of pixels [B, C, H, W] or [C, H, W] with values on the 0..255 scale (C = 1 or 3)
    → bool [B, H, W]. low, high: hysteresis thresholds on the L1 Sobel magnitude (OpenCV's)."""
    if low > high:
        low, high = high, low  # OpenCV swaps them too
    if low < 0:
        raise ConfigError(f"Canny thresholds must be >= 0; got {low}, {high}")
    x = pixels[None] if pixels.ndim == 3 else pixels
    if x.ndim != 4:
        raise ConfigError(f"canny_edges takes [B, C, H, W] or [C, H, W] pixels; got {tuple(pixels.shape)}")
    # float64 keeps the integer Sobel sums and the Q15 direction test exact.
    x = x.to(torch.float64)
    if sigma > 0:
        x = _gaussian_blur(x, sigma)
    dx, dy = _sobel(x)
    mag_c = dx.abs() + dy.abs()
    best = mag_c.argmax(dim=1, keepdim=True)  # colour images: the channel with the largest gradient
    mag = mag_c.gather(1, best)[:, 0]
    dx, dy = dx.gather(1, best)[:, 0], dy.gather(1, best)[:, 0]

    ax, ay = dx.abs().round(), dy.abs().round()
    tg22 = ax * _TG22
    tg67 = tg22 + ax * (1 << (_SHIFT + 1))
    yq = ay * (1 << _SHIFT)
    horizontal = yq < tg22
    vertical = ~horizontal & (yq > tg67)
    diagonal = ~horizontal & ~vertical
    s = torch.where((dx < 0) != (dy < 0), -1, 1)  # the diagonal's orientation
    keep_h = (mag > _shifted(mag, 0, -1)) & (mag >= _shifted(mag, 0, 1))
    keep_v = (mag > _shifted(mag, -1, 0)) & (mag >= _shifted(mag, 1, 0))
    # s = -1: neighbours (y-1, x+1) and (y+1, x-1); s = +1: (y-1, x-1) and (y+1, x+1).
    keep_d = torch.where(
        s < 0,
        (mag > _shifted(mag, -1, 1)) & (mag > _shifted(mag, 1, -1)),
        (mag > _shifted(mag, -1, -1)) & (mag > _shifted(mag, 1, 1)),
    )
    maximum = (horizontal & keep_h) | (vertical & keep_v) | (diagonal & keep_d)
    candidate = maximum & (mag > low)
    edges = candidate & (mag > high)

    # Hysteresis: grow the strong set through 8-connected candidates until nothing changes.
    cand = candidate[:, None].to(torch.float32)
    e = edges[:, None].to(torch.float32)
    while True:
        for _ in range(8):
            e = F.max_pool2d(e, 3, stride=1, padding=1) * cand
        grown = e.sum()
        e_next = F.max_pool2d(e, 3, stride=1, padding=1) * cand
        if e_next.sum() == grown:
            break
        e = e_next
    return e[:, 0] > 0


def canny(image, low: float = 100, high: float = 200, *, sigma: float = 0.0):
    """Canny edge map of a photo, in the form the control pipelines take.

    PIL image → PIL RGB image (white edges on black); tensor [3, H, W] or [B, 3, H, W] in [-1, 1]
    → tensor [B, 3, H, W] in {-1, 1}. Thresholds and sigma as `canny_edges` (OpenCV defaults)."""
    if isinstance(image, Tensor):
        x = image[None] if image.ndim == 3 else image
        pixels = ((x.float().clamp(-1, 1) + 1) * 127.5).round()
        e = canny_edges(pixels, low, high, sigma=sigma)
        return (e[:, None].float() * 2 - 1).expand(-1, 3, -1, -1).contiguous()
    import numpy as np
    from PIL import Image

    if not isinstance(image, Image.Image):
        raise ConfigError(f"canny takes a PIL image or a tensor in [-1, 1]; got {type(image).__name__}")
    arr = np.asarray(image.convert("RGB"))
    pixels = torch.from_numpy(arr.copy()).permute(2, 0, 1).float()
    e = canny_edges(pixels, low, high, sigma=sigma)[0]
    out = (e.to(torch.uint8) * 255).numpy()
    return Image.fromarray(out, mode="L").convert("RGB")
