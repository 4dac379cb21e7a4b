"""Finding a FLUX transformer: which file or folder under a path holds it (`resolve`), whether a
file's keys are one (`looks_like_flux`), and for anything else a guess at what it is (`what_is`),
so errors and `info` can say "this is a VAE" instead of "unknown keys"."""

from __future__ import annotations

import re
from pathlib import Path

from fluxcore.errors import WeightsError
from fluxcore.weights.errors import CheckpointNotFoundError, UnknownVariantError
from fluxcore.weights.io import open_checkpoint, read_json
from fluxcore.weights.layouts import detect_layout

DIFFUSERS_WEIGHTS = "diffusion_pytorch_model.safetensors"
DIFFUSERS_INDEX = "diffusion_pytorch_model.safetensors.index.json"


def what_is(keys) -> str:
    """A guess, from key names only, at what a non-FLUX-transformer checkpoint holds."""
    ks = list(keys)
    joined = "\n".join(ks[:2000])
    guesses = [
        (r"^(first_stage_model\.|vae\.)?(encoder|decoder)\.conv_in\.", "an autoencoder (VAE)"),
        (r"^(encoder|decoder)\.(down|up)_blocks\.", "a diffusers autoencoder (VAE)"),
        (r"(^|\.)encoder\.block\.0\.layer\.0\.SelfAttention\.", "a T5 encoder"),
        (r"(^|\.)text_model\.encoder\.layers\.", "a CLIP text encoder"),
        (r"lora_(A|B|up|down)|\.lora\.", "a LoRA (apply it to a base model; it is not a model by itself)"),
        (r"redux_(up|down)", "a Redux image projector"),
        (r"(^|\.)input_blocks\.\d+\.", "a Stable Diffusion UNet"),
        (r"(^|\.)joint_blocks\.\d+\.", "a Stable Diffusion 3 MMDiT"),
    ]
    for pattern, what in guesses:
        if re.search(pattern, joined, flags=re.MULTILINE):
            return what
    return "something other than a FLUX.1 transformer"


def not_flux(source, keys) -> UnknownVariantError:
    """The error for a checkpoint no layout recognises, saying what it looks like instead."""
    sample = ", ".join(repr(k) for k in list(keys)[:3])
    return UnknownVariantError(
        f"{source} is not a FLUX.1 transformer checkpoint: it holds {len(keys)} tensors (e.g. {sample}); it "
        f"looks like {what_is(keys)}. Expected BFL keys ('img_in.weight', 'double_blocks.0....') or "
        "diffusers keys ('x_embedder.weight', 'transformer_blocks.0....')"
    )


def looks_like_flux(path: Path) -> bool:
    """Whether the safetensors file at `path` has the keys of a FLUX transformer in a known layout."""
    try:
        with open_checkpoint(path) as ck:
            keys = set(ck.keys())
    except WeightsError:
        return False
    return detect_layout(keys) is not None


def resolve(path: Path) -> tuple[Path, dict | None]:
    """The file or folder holding the transformer weights, and its diffusers config.json if any."""
    if not path.exists():
        raise CheckpointNotFoundError(f"no such file or folder: {path}")
    if path.is_file():
        if path.name == "config.json":
            return resolve(path.parent)
        return path, None
    if (path / DIFFUSERS_INDEX).is_file() or (path / DIFFUSERS_WEIGHTS).is_file():
        return path, read_json(path / "config.json", missing_ok=True) or None
    if (path / "transformer").is_dir():
        return resolve(path / "transformer")
    if list(path.glob("*.safetensors.index.json")):
        return path, read_json(path / "config.json", missing_ok=True) or None
    files = sorted(path.glob("*.safetensors"))
    if len(files) == 1:
        return files[0], None
    flux_files = [f for f in files if looks_like_flux(f)]
    if len(flux_files) == 1:
        return flux_files[0], None
    if not flux_files:
        raise CheckpointNotFoundError(
            f"{path} holds no FLUX transformer: no transformer/ folder, no {DIFFUSERS_WEIGHTS} or index, and "
            f"none of its .safetensors files {[f.name for f in files[:5]]} has FLUX transformer keys"
        )
    raise WeightsError(
        f"{path} holds {len(flux_files)} FLUX transformer files {[f.name for f in flux_files[:5]]}; pass the one you mean"
    )
