"""BFL ↔ diffusers conversion of FLUX transformer state dicts, as pure functions. The key map
itself is the diffusers layout (`fluxcore.weights.layouts.diffusers`); this module is the stable
import path for the functions built on it."""

from fluxcore.weights.layouts.diffusers import (
    bfl_key_to_diffusers,
    bfl_to_diffusers,
    diffusers_key_to_bfl,
    diffusers_to_bfl,
    fused_pieces,
    single_linear1_sizes,
)

__all__ = [
    "bfl_key_to_diffusers",
    "bfl_to_diffusers",
    "diffusers_key_to_bfl",
    "diffusers_to_bfl",
    "fused_pieces",
    "single_linear1_sizes",
]
