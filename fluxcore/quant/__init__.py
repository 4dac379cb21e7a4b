"""Quantized weights: files loaded as they are (GGUF, bitsandbytes NF4/FP4, ComfyUI scaled fp8),
weight-only quantization and fp8 compute as a transform, and the quantized Linear modules.
docs/memory.md describes the formats, names and numerics.
"""

from fluxcore.quant.linear import GGUFLinear, NF4Linear, QuantLinear, ScaledLinear, fp8_compute_supported
from fluxcore.quant.load import detect_format, load_quantized_flux, load_quantized_t5
from fluxcore.quant.quantize import DEFAULT_SKIP, MODES, dequantize, quantize

__all__ = [
    "DEFAULT_SKIP",
    "MODES",
    "GGUFLinear",
    "NF4Linear",
    "QuantLinear",
    "ScaledLinear",
    "detect_format",
    "dequantize",
    "fp8_compute_supported",
    "load_quantized_flux",
    "load_quantized_t5",
    "quantize",
]
