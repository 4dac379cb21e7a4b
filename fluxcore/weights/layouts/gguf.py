"""GGUF transformer files (city96's FLUX.1 conversions): BFL keys, ggml block formats, shapes
stored innermost-first. Not safetensors, so never found by keys: `sniff(path)` checks the file's
magic, and `load` builds the model with `fluxcore.quant.GGUFLinear` modules that keep the blocks
packed (docs/memory.md).
"""

from __future__ import annotations

from collections.abc import Collection

from fluxcore.weights.layouts.base import Plan

name = "gguf"
quantized = True


def sniff(path) -> bool:
    from fluxcore.quant.gguf import is_gguf

    return is_gguf(path)


def detect(keys: Collection[str]) -> str | None:
    return None  # GGUF is recognised by its magic bytes (`sniff`), never from safetensors keys


def plan(keys: Collection[str], prefix: str = "") -> dict[str, Plan]:
    raise KeyError("GGUF files are read with fluxcore.quant.load_quantized_flux")


def load(source, *, config=None, device=None, dtype=None):
    from fluxcore.quant import load_quantized_flux

    return load_quantized_flux(source, config=config, device=device, **({"dtype": dtype} if dtype else {}))
