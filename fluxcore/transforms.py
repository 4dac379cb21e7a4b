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


class KeyPreservingWrapper(nn.Module):
    """Base for a transform's wrapper around one module, held in the attribute named by `wrapped`
    ("block" by default): the wrapper's state dict is the inner module's own, so the official keys
    stay what they were (a wrapped `double_blocks.0` still saves `double_blocks.0.img_attn.qkv.weight`)
    and official state dicts load into the wrapped model."""

    wrapped = "block"

    def state_dict(self, *args, destination=None, prefix="", keep_vars=False):
        inner = getattr(self, self.wrapped)
        return inner.state_dict(destination=destination, prefix=prefix, keep_vars=keep_vars)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing, unexpected, errors):
        inner = prefix + self.wrapped + "."
        for key in [k for k in state_dict if k.startswith(prefix) and not k.startswith(inner)]:
            state_dict[inner + key[len(prefix) :]] = state_dict.pop(key)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing, unexpected, errors)
