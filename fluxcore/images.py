"""Images in and out of the pipeline: PIL images or tensors → float tensors, decoded tensors → outputs.

Inside fluxcore an image is float32 [B, 3, H, W] in [−1, 1] (the autoencoder's range) and a mask
is float32 [B, 1, H, W] in [0, 1] with 1 = the region to generate. PIL and numpy are imported
lazily: importing fluxcore does not need them.
"""

from __future__ import annotations

import warnings

import torch
from torch import Tensor

from fluxcore.errors import ConfigError

MAX_SIDE = 8192  # FLUX is trained up to ~2 MP; a side above this is a typo, not a request
OUTPUT_TYPES = ("pil", "np", "pt", "latent")


def check_side(name: str, value, stacklevel: int = 5) -> int:
    """An image side in pixels, rounded down to a multiple of 16 (one packed token is 16x16 pixels)
    with a warning; a ConfigError for non-integers and sides outside [16, MAX_SIDE]. `stacklevel`
    points the warning at the user's call (the default fits `FluxPipeline.__call__`)."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{name} must be an integer number of pixels; got {value!r}")
    if value <= 0 or value > MAX_SIDE:
        raise ConfigError(f"{name} must be in [16, {MAX_SIDE}] pixels; got {value}")
    rounded = 16 * (value // 16)
    if rounded < 16:
        raise ConfigError(f"{name} must be at least 16 pixels (one packed latent token); got {value}")
    if rounded != value:
        warnings.warn(
            f"{name} {value} is not a multiple of 16; rounded down to {rounded}", stacklevel=stacklevel
        )
    return rounded


def image_size(image) -> tuple[int, int]:
    """(width, height) of a PIL image or a [..., H, W] tensor."""
    if isinstance(image, Tensor):
        return int(image.shape[-1]), int(image.shape[-2])
    return image.size


def to_rgb_tensor(image, width: int, height: int, what: str = "image") -> Tensor:
    """PIL image or tensor [3, H, W] / [B, 3, H, W] in [−1, 1] → float32 [B, 3, height, width] in
    [−1, 1]. PIL images are resized with Lanczos (as the reference does); tensors must match.
    `what` names the argument in errors."""
    if isinstance(image, Tensor):
        x = image[None] if image.ndim == 3 else image
        if x.ndim != 4 or x.shape[1] != 3:
            raise ConfigError(
                f"{what} tensor must be [3, H, W] or [B, 3, H, W] in [-1, 1]; got {tuple(image.shape)}"
            )
        if tuple(x.shape[-2:]) != (height, width):
            raise ConfigError(
                f"{what} tensor is {x.shape[-1]}x{x.shape[-2]} (WxH); expected {width}x{height}"
            )
        lo, hi = x.min().item(), x.max().item()
        if lo < -1 - 1e-3 or hi > 1 + 1e-3:
            raise ConfigError(f"{what} tensor values must lie in [-1, 1]; found [{lo:.4g}, {hi:.4g}]")
        return x.float()
    import numpy as np
    from PIL import Image

    if not isinstance(image, Image.Image):
        raise ConfigError(f"{what} must be a PIL image or a torch tensor; got {type(image).__name__}")
    image = image.convert("RGB")
    if image.size != (width, height):
        image = image.resize((width, height), Image.Resampling.LANCZOS)
    x = torch.from_numpy(np.array(image)).float() / 127.5 - 1.0
    return x.permute(2, 0, 1)[None]


def to_mask_tensor(mask, width: int, height: int) -> Tensor:
    """PIL image (grayscale 0–255) or tensor [H, W] / [B, H, W] / [B, 1, H, W] in [0, 1] → float32
    [B, 1, height, width] in [0, 1]; 1 = the region to generate."""
    if isinstance(mask, Tensor):
        m = mask.reshape(1, 1, *mask.shape) if mask.ndim == 2 else mask
        if m.ndim == 3:
            m = m[:, None]
        if tuple(m.shape[-2:]) != (height, width):
            raise ConfigError(
                f"mask_image tensor is {m.shape[-1]}x{m.shape[-2]} (WxH); expected {width}x{height}"
            )
        lo, hi = m.min().item(), m.max().item()
        if lo < 0 or hi > 1:
            raise ConfigError(
                f"mask_image tensor values must lie in [0, 1] (1 = generate); found [{lo:.4g}, {hi:.4g}]"
            )
        return m.float()
    import numpy as np
    from PIL import Image

    if not isinstance(mask, Image.Image):
        raise ConfigError(f"mask_image must be a PIL image or a torch tensor; got {type(mask).__name__}")
    mask = mask.convert("L")
    if mask.size != (width, height):
        mask = mask.resize((width, height), Image.Resampling.LANCZOS)
    return (torch.from_numpy(np.array(mask)).float() / 255.0)[None, None]


def to_pil(images: Tensor) -> list:
    """[B, 3, H, W] in [−1, 1] → PIL images, as the reference saves them: clamp, 127.5·(x + 1),
    truncate to uint8."""
    from PIL import Image

    x = images.float().clamp(-1, 1)
    x = (127.5 * (x + 1.0)).permute(0, 2, 3, 1).cpu().byte().numpy()
    return [Image.fromarray(a) for a in x]


def check_output_type(output_type: str) -> str:
    if output_type not in OUTPUT_TYPES:
        raise ConfigError(f"output_type must be 'pil', 'np', 'pt' or 'latent'; got {output_type!r}")
    return output_type


def to_output(decoded: Tensor, output_type: str):
    """Decoded images [B, 3, H, W] in [−1, 1] → "pil": a list of PIL images; "pt": float [B, 3, H, W]
    in [0, 1]; "np": a float numpy array [B, H, W, 3] in [0, 1]."""
    if check_output_type(output_type) == "pil":
        return to_pil(decoded)
    if output_type == "pt":
        return (decoded + 1) / 2
    if output_type == "np":
        return ((decoded + 1) / 2).permute(0, 2, 3, 1).cpu().numpy()
    raise ConfigError(f"output_type {output_type!r} is not an image type; latents are not decoded")
