"""ComfyUI "scaled fp8" checkpoints (FLUX transformer and T5 files) and plain float8 files.

Legacy layout: a marker tensor `<prefix>scaled_fp8` (its dtype names the fp8 format; a marker with
2 elements means "dequantize, never multiply in fp8"); per Linear `X`:
`X.weight` float8_e4m3fn (or e5m2), `X.scale_weight` float32 scalar, optionally `X.scale_input`.

Newer layout: per layer `X.comfy_quant` (uint8 bytes of JSON {"format": "float8_e4m3fn" |
"float8_e5m2" | ..., "full_precision_matrix_mult": bool}) and/or the safetensors header metadata
`_quantization_metadata` (JSON {"layers": {name: {"format": ...}}}); the scales are named
`X.weight_scale` and `X.input_scale`.

Both mean W = weight · scale (weight upcast to float32 first). Float8 weights with no scale at all
(plain `flux1-dev-fp8` files) are read with scale 1. NVFP4 layers (`weight_scale_2`) are not
supported and raise.
"""

from __future__ import annotations

import json

import torch
from torch import Tensor

from fluxcore.errors import WeightsError
from fluxcore.weights.header import FLOAT8_DTYPES

WEIGHT_SCALE = ("scale_weight", "weight_scale")
INPUT_SCALE = ("scale_input", "input_scale")
MARKER = "scaled_fp8"


def is_scaled_fp8(keys, metadata=None, dtypes=None) -> bool:
    """Whether a file (its keys, header metadata, and {key: dtype}) is scaled or plain fp8."""
    keys = set(keys)
    if any(k == MARKER or k.endswith("." + MARKER) or k.endswith(".comfy_quant") for k in keys):
        return True
    if metadata and "_quantization_metadata" in metadata:
        return True
    if any(k.endswith(f".{s}") for k in keys for s in WEIGHT_SCALE):
        return True
    return bool(dtypes) and any(d in FLOAT8_DTYPES for d in dtypes.values())


def layer_formats(metadata) -> dict[str, dict]:
    """{layer name: {"format": ..., ...}} from `_quantization_metadata` (empty when absent)."""
    raw = (metadata or {}).get("_quantization_metadata")
    if not raw:
        return {}
    try:
        data = json.loads(raw)
    except ValueError as e:
        raise WeightsError(f"_quantization_metadata is not JSON: {e}") from None
    return dict(data.get("layers", {}))


def parse_comfy_quant(t: Tensor, key: str) -> dict:
    try:
        return json.loads(bytes(t.reshape(-1).to(torch.uint8).tolist()).decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise WeightsError(f"{key}: not a comfy_quant JSON ({e})") from None


def quantize_scaled_fp8(
    w: Tensor, dtype: torch.dtype = torch.float8_e4m3fn, per_row: bool = False
) -> tuple[Tensor, Tensor]:
    """float weight → (float8 weight, float32 scale) with W ≈ weight · scale; the scale is
    amax / fmax per tensor ([]), or per output row ([out, 1])."""
    fmax = torch.finfo(dtype).max
    w = w.float()
    amax = w.abs().amax(dim=1, keepdim=True) if per_row else w.abs().amax()
    scale = (amax / fmax).clamp(min=1e-12)
    return (w / scale).clamp(-fmax, fmax).to(dtype), scale


def quantize_int8(w: Tensor, per_row: bool = True) -> tuple[Tensor, Tensor]:
    """float weight → (int8 weight, float32 scale), symmetric, amax / 127 per row or per tensor."""
    w = w.float()
    amax = w.abs().amax(dim=1, keepdim=True) if per_row else w.abs().amax()
    scale = (amax / 127).clamp(min=1e-12)
    return torch.round(w / scale).clamp(-127, 127).to(torch.int8), scale
