"""Transformer checkpoint layouts: one small module each, and the registry `load_flux`,
`inspect_flux`, `info` and `save_flux` consult.

A layout is any object (a module is simplest) with:

    name:    str, also the `format=` that `save_flux` accepts for it.
    detect(keys) -> str | None
             the key prefix under which this layout's transformer sits ('' for none), or None when
             the keys are not this layout. Headers only: keys, no shapes or data.
    plan(keys, prefix) -> {BFL key: Plan}
             for the checkpoint's keys under `prefix`: which source keys build each BFL tensor, in
             which row order, with which Transform (`fluxcore.weights.layouts.base`). Raises
             KeyError naming a key it cannot place. Shapes, streaming and in-memory conversion all
             read this plan.
    export(state_dict) -> dict   (optional; None for read-only layouts)
             BFL state dict → this layout's keys and tensors (views where possible).
    quantized, load(path, config=, device=, dtype=)   (quantized layouts only)
             weights that are not plain tensors (GGUF, NF4, scaled fp8): `plan` refuses, and
             `load_flux` hands the file to `load`, which keeps them packed (fluxcore.quant).

Detection tries layouts in `LAYOUTS` order and takes the first that answers: layouts registered
later come first, so a specific community layout wins over the generic BFL one it resembles.
"""

from __future__ import annotations

from collections.abc import Collection
from typing import Protocol

from fluxcore.errors import ConfigError
from fluxcore.weights.layouts import bfl, diffusers, gguf, nf4, scaled_fp8
from fluxcore.weights.layouts.base import SWAP_HALVES, Plan, Transform

__all__ = ["LAYOUTS", "SWAP_HALVES", "Layout", "Plan", "Transform", "detect_layout", "register_layout"]


class Layout(Protocol):
    name: str

    def detect(self, keys: Collection[str]) -> str | None: ...

    def plan(self, keys: Collection[str], prefix: str = "") -> dict[str, Plan]: ...


# name → layout, in detection order.
LAYOUTS: dict[str, Layout] = {}


def register_layout(layout: Layout) -> Layout:
    """Add `layout` (replacing one of the same name) ahead of those already registered, so that
    detection tries it first. `layout` is a module or an instance (not a class: detect and plan
    are called on it as plain functions). Returns it."""
    missing = [a for a in ("name", "detect", "plan") if not hasattr(layout, a)]
    if missing:
        raise ConfigError(
            f"register_layout: {layout!r} has no {', '.join(missing)}; a layout needs name, detect, plan"
        )
    rest = [(n, lay) for n, lay in LAYOUTS.items() if n != layout.name]
    LAYOUTS.clear()
    LAYOUTS.update([(layout.name, layout), *rest])
    return layout


def detect_layout(keys: Collection[str]) -> tuple[Layout, str] | None:
    """(the first layout in LAYOUTS that recognises `keys`, the prefix it found), or None."""
    keys = keys if isinstance(keys, (set, frozenset)) else set(keys)
    for layout in LAYOUTS.values():
        prefix = layout.detect(keys)
        if prefix is not None:
            return layout, prefix
    return None


# Built-ins. BFL is asked before diffusers: a file with the marker keys of both is read as BFL, as it
# always was. The quantized layouts (their own `load`; `quantized = True`) are asked before BFL,
# whose keys they share: they answer only for files with their packing's marker keys.
register_layout(diffusers)
register_layout(bfl)
register_layout(scaled_fp8)
register_layout(nf4)
register_layout(gguf)
