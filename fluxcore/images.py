"""Images in and out of the pipeline: PIL images or tensors → float tensors, decoded tensors → outputs.

Inside fluxcore an image is float32 [B, 3, H, W] in [−1, 1] (the autoencoder's range) and a mask
is float32 [B, 1, H, W] in [0, 1] with 1 = the region to generate. Inputs follow diffusers'
conventions: PIL images, numpy arrays and tensors in [0, 1] (tensors/arrays with negative values
are taken as [−1, 1]), or lists of them. PIL and numpy are imported
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


def _is_pil(image) -> bool:
    try:
        from PIL import Image
    except ImportError:  # pragma: no cover - pillow is a dependency
        return False
    return isinstance(image, Image.Image)


def image_size(image) -> tuple[int, int]:
    """(width, height) of an image input: a PIL image, a [..., H, W] tensor, a numpy array
    [H, W], [H, W, C] or [B, H, W, C], or a non-empty list of those (its first item)."""
    if isinstance(image, (list, tuple)):
        if not image:
            raise ConfigError("an image list must not be empty")
        return image_size(image[0])
    if isinstance(image, Tensor):
        return int(image.shape[-1]), int(image.shape[-2])
    if _is_pil(image):
        return image.size
    shape = getattr(image, "shape", None)
    if shape is not None and len(shape) in (2, 3, 4):
        if len(shape) == 2:
            return int(shape[1]), int(shape[0])
        return (
            (int(shape[-2]), int(shape[-3])) if shape[-1] in (1, 3, 4) else (int(shape[-1]), int(shape[-2]))
        )
    raise ConfigError(f"expected a PIL image, numpy array or torch tensor; got {type(image).__name__}")


def _to_unit_batch(image, what: str, channels: int) -> Tensor | list:
    """Tensors and numpy arrays (and lists of them) → float32 [B, C, H, W] as given (diffusers'
    `VaeImageProcessor`: numpy [H, W, C] / [B, H, W, C], tensors [C, H, W] / [B, C, H, W]; lists are
    concatenated along the batch). A list of PIL images comes back as that list."""
    import numpy as np

    items = list(image) if isinstance(image, (list, tuple)) else [image]
    if not items:
        raise ConfigError(f"{what}: an empty list")
    if all(_is_pil(i) for i in items):
        return items
    out = []
    for item in items:
        if isinstance(item, np.ndarray):
            a = torch.from_numpy(np.ascontiguousarray(item)).float()
            if a.ndim == 2:
                a = a[None, ..., None]
            elif a.ndim == 3:
                a = a[None] if a.shape[-1] in (1, 3, 4) else a[..., None]
            if a.ndim != 4:
                raise ConfigError(f"{what} array must be [H, W], [H, W, C] or [B, H, W, C]; got {item.shape}")
            out.append(a.permute(0, 3, 1, 2))
        elif isinstance(item, Tensor):
            t = item.float()
            if t.ndim == 2:
                t = t[None, None]
            elif t.ndim == 3:
                t = t[None] if channels == 3 or t.shape[0] in (1, 3) else t[:, None]
            if t.ndim != 4:
                raise ConfigError(f"{what} tensor must be [C, H, W] or [B, C, H, W]; got {tuple(item.shape)}")
            out.append(t.cpu())
        else:
            raise ConfigError(
                f"{what} must be a PIL image, a numpy array, a torch tensor or a list of them; got "
                f"{type(item).__name__}"
            )
    if len({tuple(t.shape[1:]) for t in out}) > 1:
        raise ConfigError(
            f"{what}: the list's arrays/tensors differ in shape: {[tuple(t.shape) for t in out]}"
        )
    return torch.cat(out)


def to_rgb_tensor(image, width: int, height: int, what: str = "image") -> Tensor:
    """An image input → float32 [B, 3, height, width] in [−1, 1], as diffusers' VaeImageProcessor:

    * PIL images (or a list): RGB, resized with Lanczos, /255, then 2x − 1;
    * numpy arrays [H, W, 3] / [B, H, W, 3] and tensors [3, H, W] / [B, 3, H, W] (or lists of them):
      values in [0, 1], mapped by 2x − 1 — unless the minimum is below 0, when they are taken to be
      in [−1, 1] already (diffusers' rule); resized with nearest-neighbour interpolation when the
      size differs (torch's `interpolate` default, as diffusers).
    Values outside [−1, 1] are refused. `what` names the argument in errors."""
    import numpy as np

    batch = _to_unit_batch(image, what, 3)
    if isinstance(batch, list):  # PIL
        from PIL import Image

        arrays = []
        for im in batch:
            im = im.convert("RGB")
            if im.size != (width, height):
                im = im.resize((width, height), Image.Resampling.LANCZOS)
            arrays.append(np.array(im).astype(np.float32) / 255.0)
        return 2.0 * torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2) - 1.0
    if batch.shape[1] != 3:
        raise ConfigError(
            f"{what} must have 3 channels (RGB); got shape {tuple(batch.shape)} as [B, C, H, W]"
        )
    lo, hi = batch.min().item(), batch.max().item()
    if lo < -1 - 1e-3 or hi > 1 + 1e-3:
        raise ConfigError(
            f"{what} values must lie in [0, 1] (or [-1, 1]) as in diffusers; found [{lo:.4g}, {hi:.4g}]"
        )
    if tuple(batch.shape[-2:]) != (height, width):
        batch = torch.nn.functional.interpolate(batch, size=(height, width))
    return batch if lo < 0 else 2.0 * batch - 1.0


def to_mask_tensor(mask, width: int, height: int) -> Tensor:
    """A mask input → float32 [B, 1, height, width] in [0, 1]; 1 = the region to generate.
    PIL images: grayscale /255, resized with Lanczos (the reference's Fill preparation; not
    binarised). Arrays and tensors ([H, W], [B, H, W], [B, 1, H, W], numpy [H, W, 1], lists): values
    in [0, 1] (never rescaled), nearest-neighbour resized to the output size."""
    import numpy as np

    batch = _to_unit_batch(mask, "mask_image", 1)
    if isinstance(batch, list):
        from PIL import Image

        arrays = []
        for im in batch:
            im = im.convert("L")
            if im.size != (width, height):
                im = im.resize((width, height), Image.Resampling.LANCZOS)
            arrays.append(np.array(im).astype(np.float32) / 255.0)
        return torch.from_numpy(np.stack(arrays))[:, None]
    if batch.shape[1] != 1:
        raise ConfigError(f"mask_image must have 1 channel; got shape {tuple(batch.shape)} as [B, C, H, W]")
    lo, hi = batch.min().item(), batch.max().item()
    if lo < 0 or hi > 1:
        raise ConfigError(f"mask_image values must lie in [0, 1] (1 = generate); found [{lo:.4g}, {hi:.4g}]")
    if tuple(batch.shape[-2:]) != (height, width):
        batch = torch.nn.functional.interpolate(batch, size=(height, width))
    return batch


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
