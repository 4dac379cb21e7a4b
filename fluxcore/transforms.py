"""The two operations every transform is made of: find modules of an exact type, and put another
module at a path. Transforms (fluxcore.kernels.apply, LoRA, quantization, ...) are plain functions
built from these; docs/transforms.md states the convention and the order they compose in.
"""

from __future__ import annotations

from torch import nn


def exact_modules(root: nn.Module, *types: type[nn.Module]) -> list[tuple[str, nn.Module]]:
    """(path, module) for every submodule of root whose type is exactly one of `types`.

    Exact, not isinstance: a subclass is a user's own module and a transform must leave it alone.
    The root itself is not included (a transform replaces children inside it)."""
    return [(path, m) for path, m in root.named_modules() if path and type(m) in types]


def replace_module(root: nn.Module, path: str, new: nn.Module) -> nn.Module:
    """Put `new` at `path` ("double_blocks.0.img_norm1") inside root; returns the module it replaced."""
    parent_path, _, name = path.rpartition(".")
    parent = root.get_submodule(parent_path) if parent_path else root
    old = getattr(parent, name)
    setattr(parent, name, new)
    return old
