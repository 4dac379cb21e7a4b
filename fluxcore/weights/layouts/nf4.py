"""bitsandbytes 4-bit (NF4/FP4) transformer files: BFL keys (any `model.diffusion_model.` prefix),
each quantized Linear `X` stored as `X.weight` (packed codes) + `X.weight.absmax`,
`X.weight.quant_map`, optional `X.weight.nested_*`, and `X.weight.quant_state.bitsandbytes__nf4`.

A quantized layout: its weights are not plain tensors, so `plan` refuses and `load` builds the
model with `fluxcore.quant` modules that keep the weights packed (docs/memory.md).
"""

from __future__ import annotations

from collections.abc import Collection

from fluxcore.weights.layouts.base import Plan, find_prefix

name = "nf4"
quantized = True
_TAILS = (
    "final_layer.linear.weight",
    "double_blocks.0.img_attn.qkv.weight",
    "single_blocks.0.linear1.weight",
)


def detect(keys: Collection[str]) -> str | None:
    from fluxcore.quant.nf4 import is_bnb4

    if not is_bnb4(keys):
        return None
    return find_prefix(keys, "img_in.weight", _TAILS)


def plan(keys: Collection[str], prefix: str = "") -> dict[str, Plan]:
    raise KeyError(
        "bitsandbytes 4-bit weights are packed, not plain tensors: load this file with "
        "fluxcore.quant.load_quantized_flux (it keeps them 4-bit)"
    )


def load(source, *, config=None, device=None, dtype=None):
    from fluxcore.quant import load_quantized_flux

    return load_quantized_flux(source, config=config, device=device, **({"dtype": dtype} if dtype else {}))
