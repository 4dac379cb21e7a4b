"""Checkpoint I/O: safetensors streaming, layout detection, key maps, load_*/save_* entry points."""

from fluxcore.weights.flux import (
    FluxCheckpoint,
    detect_variant,
    infer_config,
    inspect_flux,
    load_flux,
    save_flux,
    write_safetensors,
)
from fluxcore.weights.flux_keys import bfl_to_diffusers, diffusers_to_bfl
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
)

__all__ = [
    "Checkpoint",
    "FluxCheckpoint",
    "WeightsInfo",
    "CheckpointNotFoundError",
    "CorruptCheckpointError",
    "KeyMismatchError",
    "ShapeMismatchError",
    "UnknownVariantError",
    "UnsupportedDtypeError",
    "bfl_to_diffusers",
    "detect_variant",
    "diffusers_to_bfl",
    "infer_config",
    "info",
    "inspect_flux",
    "load_flux",
    "load_into",
    "open_checkpoint",
    "read_header",
    "save_flux",
    "write_safetensors",
]
