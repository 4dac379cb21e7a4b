"""The BFL layout: the official single files (`flux1-dev.safetensors`, ...), whose keys are the
model's own parameter names (`img_in.weight`, `double_blocks.0.img_attn.qkv.weight`, ...), so
loading is an identity mapping. Community and all-in-one files (ComfyUI checkpoints holding the
VAE and text encoders too) put the same keys under a prefix such as `model.diffusion_model.`;
the prefix is found from the keys, never from the file name.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping

from torch import Tensor

from fluxcore.weights.layouts.base import Plan, find_prefix

name = "bfl"

# The layout is told apart from diffusers by fused names: BFL keeps q/k/v in one `qkv`.
_MARK = "img_in.weight"
_TAILS = (
    "final_layer.linear.weight",
    "double_blocks.0.img_attn.qkv.weight",
    "single_blocks.0.linear1.weight",
)


def detect(keys: Collection[str]) -> str | None:
    """The prefix of the BFL keys ('' for official files), or None if `keys` are not BFL."""
    return find_prefix(keys, _MARK, _TAILS)


def plan(keys: Collection[str], prefix: str = "") -> dict[str, Plan]:
    """Every key under `prefix` is the BFL key without it (unknown ones too: the model check then
    names them as unexpected)."""
    return {k[len(prefix) :]: Plan((k,)) for k in keys}


def export(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """BFL is the model's own naming: the same tensors under the same keys."""
    return dict(state_dict)
