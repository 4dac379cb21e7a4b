"""Checkpoint I/O: safetensors streaming, layout detection, key maps, load_*/save_* entry points."""

from fluxcore.weights.flux import FluxCheckpoint, inspect_flux, load_flux, save_flux
from fluxcore.weights.flux_config import detect_variant, infer_config
from fluxcore.weights.flux_keys import bfl_to_diffusers, diffusers_key_to_bfl, diffusers_to_bfl, fused_pieces
from fluxcore.weights.info import WeightsInfo, info
from fluxcore.weights.io import (
    Checkpoint,
    CheckpointNotFoundError,
    CorruptCheckpointError,
    KeyMismatchError,
    ShapeMismatchError,
    UnknownVariantError,
    UnsupportedDtypeError,
    load_into,
    open_checkpoint,
    read_header,
    write_safetensors,
)
from fluxcore.weights.layouts import LAYOUTS, Plan, Transform, register_layout

__all__ = [
    "LAYOUTS",
    "Checkpoint",
    "FluxCheckpoint",
    "Plan",
    "Transform",
    "WeightsInfo",
    "CheckpointNotFoundError",
    "CorruptCheckpointError",
    "KeyMismatchError",
    "ShapeMismatchError",
    "UnknownVariantError",
    "UnsupportedDtypeError",
    "bfl_to_diffusers",
    "detect_variant",
    "diffusers_key_to_bfl",
    "diffusers_to_bfl",
    "fused_pieces",
    "infer_config",
    "info",
    "inspect_flux",
    "load_flux",
    "load_into",
    "open_checkpoint",
    "read_header",
    "register_layout",
    "save_flux",
    "write_safetensors",
]
