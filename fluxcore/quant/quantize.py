"""Weight-only quantization and fp8 compute as a transform on a built model.

    quantize(model, "fp8")           weights float8_e4m3fn, one scale per tensor (or per row);
                                     each Linear dequantizes to the activation dtype and multiplies
    quantize(model, "int8")          weights int8, one scale per output row (or per tensor)
    quantize(model, "fp8-dynamic")   fp8 weights and fp8 activations: the input of each Linear is
                                     scaled per tensor (or per row) on the fly and multiplied with
                                     torch._scaled_mm; where no fp8 GPU is present the layer
                                     dequantizes instead (the CPU runs _scaled_mm, slowly, for tests)
    dequantize(model)                back to nn.Linear with the dequantized weights (lossy: the
                                     rounding stays); biases are the very same Parameters

Only exact `nn.Linear` modules are replaced. Left in full precision by default (`skip`):
the input embedders `img_in`, `txt_in`, `time_in`, `vector_in`, `guidance_in` and the `final_layer`.
They are small (about 0.1 B of 11.9 B parameters) and sit where precision matters most: the
embedders see raw latents, text features and sinusoidal time features whose ranges differ by
orders of magnitude, and the final layer writes the velocity directly (GGUF converters and fp8
stacks make the same choice). Modulation Linears are quantized unless `modulation=False`:
they are 27 % of the weights, but they act only on the conditioning vector, so their error shifts
every token at once — keep them in bf16 when quality matters, or precompute them per prompt
(`fluxcore.modulation_cache`) and move them off the GPU instead.
"""

from __future__ import annotations

import re

import torch
from torch import nn

from fluxcore.errors import ConfigError
from fluxcore.quant.linear import QuantLinear, ScaledLinear
from fluxcore.quant.scaled_fp8 import quantize_int8, quantize_scaled_fp8
from fluxcore.transforms import exact_modules, replace_module

MODES = ("fp8", "int8", "fp8-dynamic")
DEFAULT_SKIP = (
    r"^img_in$",
    r"^txt_in$",
    r"^time_in\.",
    r"^vector_in\.",
    r"^guidance_in\.",
    r"^final_layer\.",
)
MODULATION = r"(_mod\.lin|\.modulation\.lin|adaLN_modulation\.\d+)$"


def quantize(
    model: nn.Module,
    mode: str = "fp8",
    *,
    granularity: str | None = None,
    modulation: bool = True,
    skip: tuple[str, ...] = DEFAULT_SKIP,
    activation_granularity: str | None = None,
) -> list[str]:
    """Quantize every exact nn.Linear of `model` whose path matches none of the `skip` regexes.

    granularity: "tensor" or "row" weight scales (default: "tensor" for fp8, "row" for int8 and
                 fp8-dynamic). activation_granularity ("fp8-dynamic"): "tensor" or "row" (default
                 = granularity; "row" needs row weight scales).
    Returns the replaced paths; a second call replaces nothing (they are no longer nn.Linear)."""
    if mode not in MODES:
        raise ConfigError(f"quantize: mode must be one of {MODES}, got {mode!r}")
    gran = granularity or ("tensor" if mode == "fp8" else "row")
    if gran not in ("tensor", "row"):
        raise ConfigError(f"quantize: granularity must be 'tensor' or 'row', got {granularity!r}")
    act = activation_granularity or gran
    if act == "row" and gran != "row":
        raise ConfigError(
            "quantize: per-row activation scales need per-row weight scales (granularity='row')"
        )
    patterns = [re.compile(p) for p in skip]
    if not modulation:
        patterns.append(re.compile(MODULATION))
    done = []
    for path, lin in exact_modules(model, nn.Linear):
        if any(p.search(path) for p in patterns):
            continue
        with torch.no_grad():
            if mode == "int8":
                w, s = quantize_int8(lin.weight, per_row=gran == "row")
            else:
                w, s = quantize_scaled_fp8(lin.weight, per_row=gran == "row")
        new = ScaledLinear(
            w, s, bias=None, compute="fp8" if mode == "fp8-dynamic" else "dequant", act_granularity=act
        )
        new.bias = lin.bias  # the very same Parameter (or None)
        new.source_dtype = lin.weight.dtype
        replace_module(model, path, new)
        done.append(path)
    return done


def dequantize(model: nn.Module, dtype: torch.dtype | None = None) -> list[str]:
    """Replace every quantized Linear (ScaledLinear, GGUFLinear, NF4Linear) with an nn.Linear
    holding its dequantized weight (in `dtype`, default the bias's dtype or bf16). Returns paths."""
    done = []
    for path, q in [(p, m) for p, m in model.named_modules() if p and isinstance(m, QuantLinear)]:
        want = dtype or getattr(q, "source_dtype", None) or q.compute_dtype
        w = q.dequantized_weight(want)
        lin = nn.Linear(q.in_features, q.out_features, bias=q.bias is not None, device="meta")
        lin.weight = nn.Parameter(w, requires_grad=False)
        if q.bias is not None:
            lin.bias = q.bias
        replace_module(model, path, lin)
        done.append(path)
    return done
