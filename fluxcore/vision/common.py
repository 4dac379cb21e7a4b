"""What the CLIP and SigLIP vision towers share: the pre-norm ViT encoder layer (Hugging Face
names: self_attn.{q,k,v,out}_proj, layer_norm1, mlp.fc1, mlp.fc2, layer_norm2), image
preprocessing (PIL resize, crop, normalise) and the loader of `image_encoder/` folders.

Shapes: B images, N tokens, D = hidden_size, H heads.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fluxcore.errors import ConfigError, WeightsError


def quick_gelu(x: Tensor) -> Tensor:
    return x * torch.sigmoid(1.702 * x)


ACTIVATIONS: dict[str, Callable[[Tensor], Tensor]] = {
    "quick_gelu": quick_gelu,
    "gelu": F.gelu,
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
}


def activation(name: str) -> Callable[[Tensor], Tensor]:
    if name not in ACTIVATIONS:
        raise ConfigError(f"unknown hidden_act {name!r}; known: {', '.join(ACTIVATIONS)}")
    return ACTIVATIONS[name]


class VisionAttention(nn.Module):
    """Bidirectional multi-head self-attention, scale 1/sqrt(head dim). x [B, N, D] → [B, N, D]."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        if dim % heads:
            raise ConfigError(f"hidden_size {dim} is not divisible by num_attention_heads {heads}")
        self.num_heads = heads
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = (nn.Linear(dim, dim) for _ in range(4))

    def forward(self, x: Tensor) -> Tensor:
        B, N, D = x.shape
        q, k, v = (
            p(x).view(B, N, self.num_heads, -1).transpose(1, 2)
            for p in (self.q_proj, self.k_proj, self.v_proj)
        )
        out = F.scaled_dot_product_attention(q, k, v)
        return self.out_proj(out.transpose(1, 2).reshape(B, N, D))


class VisionMLP(nn.Module):
    def __init__(self, dim: int, hidden: int, act: str):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)
        self.act = activation(act)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class VisionEncoderLayer(nn.Module):
    """x += attn(layer_norm1(x)); x += mlp(layer_norm2(x))."""

    def __init__(self, dim: int, heads: int, intermediate: int, act: str, eps: float):
        super().__init__()
        self.self_attn = VisionAttention(dim, heads)
        self.layer_norm1 = nn.LayerNorm(dim, eps=eps)
        self.mlp = VisionMLP(dim, intermediate, act)
        self.layer_norm2 = nn.LayerNorm(dim, eps=eps)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class VisionEncoder(nn.Module):
    def __init__(self, n_layers: int, dim: int, heads: int, intermediate: int, act: str, eps: float):
        super().__init__()
        self.layers = nn.ModuleList(
            VisionEncoderLayer(dim, heads, intermediate, act, eps) for _ in range(n_layers)
        )

    def forward(self, x: Tensor) -> Tensor:
        for layer in self.layers:
            x = layer(x)
        return x


# --- preprocessing -----------------------------------------------------------------------------------


def _to_pil_list(images) -> list:
    from PIL import Image

    if isinstance(images, Image.Image):
        return [images]
    if isinstance(images, Tensor):
        x = images[None] if images.ndim == 3 else images
        if x.ndim != 4 or x.shape[1] != 3:
            raise ConfigError(
                f"image tensor must be [3, H, W] or [B, 3, H, W] in [-1, 1]; got {tuple(images.shape)}"
            )
        arr = ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
        return [Image.fromarray(a) for a in arr]
    if isinstance(images, (list, tuple)) and images:
        return [im for item in images for im in _to_pil_list(item)]
    raise ConfigError(
        f"expected a PIL image, a list of them, or a [B, 3, H, W] tensor in [-1, 1]; got {type(images).__name__}"
    )


def preprocess(
    images,
    *,
    size: tuple[int, int] | int,
    crop: tuple[int, int] | None,
    mean: Sequence[float],
    std: Sequence[float],
) -> Tensor:
    """PIL image(s) (or a [B, 3, H, W] tensor in [-1, 1]) → pixel_values float32 [B, 3, h, w],
    as Hugging Face's image processors compute them: RGB; resize with PIL bicubic, to (h, w) when
    `size` is a pair, or so that the shorter side is `size` (the longer one int(size·long/short));
    centre crop to `crop` (h, w); x/255, then (x − mean) / std per channel."""
    import numpy as np
    from PIL import Image

    out = []
    for im in _to_pil_list(images):
        im = im.convert("RGB")
        w, h = im.size
        if isinstance(size, int):
            short, long = (w, h) if w <= h else (h, w)
            new_long = int(size * long / short)
            tw, th = (size, new_long) if w <= h else (new_long, size)
        else:
            th, tw = size
        if (tw, th) != (w, h):
            im = im.resize((tw, th), Image.Resampling.BICUBIC)
        x = np.asarray(im, dtype=np.float32)
        if crop is not None:
            ch, cw = crop
            top, left = (th - ch) // 2, (tw - cw) // 2
            if top < 0 or left < 0:
                raise ConfigError(f"image {tw}x{th} is smaller than the crop {cw}x{ch}")
            x = x[top : top + ch, left : left + cw]
        x = torch.from_numpy(np.ascontiguousarray(x)).permute(2, 0, 1) * (1 / 255)
        out.append((x - torch.tensor(mean)[:, None, None]) / torch.tensor(std)[:, None, None])
    return torch.stack(out)


# --- loading --------------------------------------------------------------------------------------------

# Keys of full CLIP / SigLIP checkpoints (both towers) that a vision tower does not use.
IGNORED_PREFIXES = (
    "text_model.",
    "text_projection.",
    "logit_scale",
    "logit_bias",
    "vision_model.embeddings.position_ids",
)


def component(source, subfolder: str = "image_encoder") -> Path:
    path = Path(source)
    if path.is_dir() and not (path / "config.json").is_file() and (path / subfolder).is_dir():
        return path / subfolder
    return path


def vision_config_dict(folder: Path) -> dict:
    """The vision part of a transformers config.json (a vision model's, or a two-tower model's
    `vision_config`); {} when there is none."""
    from fluxcore.weights.io import read_json

    hf = read_json(folder / "config.json", missing_ok=True)
    return hf.get("vision_config", hf) if "vision_config" in hf and "hidden_size" not in hf else hf


def load_vision(
    source,
    build: Callable[[dict, dict[str, tuple[int, ...]], str], nn.Module],
    what: str,
    *,
    device=None,
    dtype=None,
) -> nn.Module:
    """Open `source` (an `image_encoder/` folder, a model root holding one, or a .safetensors file),
    build the tower with `build(hf_config, shapes, source)` on meta and fill it strictly. Keys are
    taken with or without the `vision_model.` prefix (transformers >= 5 saves some towers without
    it); text-tower keys of full two-tower files are skipped."""
    from fluxcore.weights.io import default_dtype, load_into, open_checkpoint

    path = component(source)
    if not path.exists():
        from fluxcore.weights.errors import CheckpointNotFoundError

        raise CheckpointNotFoundError(f"{what}: no such file or folder: {path}")
    hf = vision_config_dict(path if path.is_dir() else path.parent)
    dtype = default_dtype(device) if dtype is None else dtype
    with open_checkpoint(path) as ckpt:

        def name(k: str) -> str:
            return k if k.startswith(("vision_model.", "visual_projection.")) else "vision_model." + k

        keys = [
            k
            for k in ckpt.keys()
            if not name(k).startswith(IGNORED_PREFIXES) and not k.startswith(IGNORED_PREFIXES)
        ]
        if not keys:
            raise WeightsError(f"{ckpt.source}: no vision-tower tensors; not a {what} checkpoint")
        shapes = {name(k): ckpt.shape(k) for k in keys}
        with torch.device("meta"):
            model = build(hf, shapes, ckpt.source)
        load_into(
            model,
            ((name(k), t) for k, t in ckpt.stream(keys)),
            source=ckpt.source,
            device=device,
            dtype=dtype,
            copy=False,
        )
    model.eval().requires_grad_(False)
    return model


def count_layers(shapes, prefix: str = "vision_model.encoder.layers.") -> int:
    return len({k[len(prefix) :].split(".")[0] for k in shapes if k.startswith(prefix)})


def need(shapes, key: str, source: str, what: str) -> tuple[int, ...]:
    if key not in shapes:
        raise WeightsError(f"{source}: no tensor {key!r}; not a {what} checkpoint")
    return shapes[key]


__all__ = [
    "VisionEncoder",
    "VisionEncoderLayer",
    "activation",
    "count_layers",
    "load_vision",
    "need",
    "preprocess",
    "quick_gelu",
]
