"""ComfyUI scaled-fp8 transformer files: BFL keys (usually under `model.diffusion_model.`), each
quantized Linear `X` stored as `X.weight` in float8 with `X.scale_weight` (legacy, marked by a
`scaled_fp8` tensor) or `X.weight_scale` (+ `X.comfy_quant` / `_quantization_metadata`), and an
optional input scale. Plain float8 files without scales are the BFL layout (upcast on load).

A quantized layout: `plan` refuses and `load` keeps the weights float8 (`fluxcore.quant`).
"""

from __future__ import annotations

from collections.abc import Collection

from fluxcore.weights.layouts.base import Plan, find_prefix

name = "scaled_fp8"
quantized = True
_TAILS = (
    "final_layer.linear.weight",
    "double_blocks.0.img_attn.qkv.weight",
    "single_blocks.0.linear1.weight",
)
# Legacy files are marked by the `scaled_fp8` tensor (a lone `.scale_weight` without it is an
# unknown key of a BFL file, reported as such); newer files by their per-layer keys.
_MARKS = (".weight_scale", ".comfy_quant")


def detect(keys: Collection[str]) -> str | None:
    prefix = find_prefix(keys, "img_in.weight", _TAILS)
    if prefix is None:
        return None
    if prefix + "scaled_fp8" in keys or any(k.startswith(prefix) and k.endswith(_MARKS) for k in keys):
        return prefix
    return None


def plan(keys: Collection[str], prefix: str = "") -> dict[str, Plan]:
    raise KeyError(
        "scaled fp8 weights need their scales applied per layer: load this file with "
        "fluxcore.quant.load_quantized_flux (it keeps them float8)"
    )


def load(source, *, config=None, device=None, dtype=None):
    from fluxcore.quant import load_quantized_flux

    return load_quantized_flux(source, config=config, device=device, **({"dtype": dtype} if dtype else {}))
