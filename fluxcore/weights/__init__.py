"""Checkpoint I/O: safetensors streaming, layout detection, key maps, load_*/save_* entry points."""

from fluxcore.weights.flux_keys import bfl_to_diffusers, diffusers_to_bfl

__all__ = ["bfl_to_diffusers", "diffusers_to_bfl"]
