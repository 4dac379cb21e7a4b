"""Loading a FluxPipeline's parts: from a snapshot folder or Hub id (`load_pretrained`) and from single
files (`load_single_file`). Each returns the keyword arguments of `FluxPipeline(...)`."""

from __future__ import annotations

from pathlib import Path

import torch

from fluxcore.errors import WeightsError
from fluxcore.schedules import ScheduleConfig
from fluxcore.weights.io import default_dtype, read_json

_PARTS = {
    "text_encoder": "CLIP text encoder folder text_encoder/ (config.json + model.safetensors)",
    "text_encoder_2": "T5 encoder folder text_encoder_2/ (config.json + weights)",
    "tokenizer": "CLIP tokenizer folder tokenizer/ (vocab.json + merges.txt)",
    "tokenizer_2": "T5 tokenizer folder tokenizer_2/ (tokenizer.json or spiece.model)",
}


def _missing_parts(root: Path) -> list[str]:
    missing = [f"{name}/: {what}" for name, what in _PARTS.items() if not (root / name).is_dir()]
    if not (root / "ae.safetensors").is_file() and not (root / "vae").is_dir():
        missing.append("autoencoder: ae.safetensors (BFL) or vae/ (diffusers)")
    if not (root / "transformer").is_dir() and not list(root.glob("*.safetensors")):
        missing.append("transformer: transformer/ (diffusers) or flux1-*.safetensors (BFL)")
    return missing


def load_pretrained(
    path, *, torch_dtype=None, device=None, kontext=None, revision=None, variant=None, subfolder=None,
    token=None, cache_dir=None, local_files_only=False, force_download=False,
) -> dict:  # fmt: skip
    """The parts of `FluxPipeline.from_pretrained` (see there)."""
    from fluxcore.weights import load_flux
    from fluxcore.weights.encoders import (
        load_autoencoder,
        load_clip,
        load_clip_tokenizer,
        load_t5,
        load_t5_tokenizer,
    )
    from fluxcore.weights.hub import check_snapshot, is_hub_id, resolve_model, variant_file

    root = resolve_model(
        path, revision=revision, token=token, cache_dir=cache_dir, local_files_only=local_files_only,
        force_download=force_download, variant=variant, subfolder=subfolder,
    )  # fmt: skip
    if not root.is_dir():
        raise WeightsError(f"model folder {root} does not exist or is not a folder")
    if is_hub_id(path):
        check_snapshot(root, str(path))
    missing = _missing_parts(root)
    if missing:
        raise WeightsError(f"model folder {root} is missing: " + "; ".join(missing))

    def part(name: str) -> Path:
        return variant_file(root / name, variant) if variant and (root / name).is_dir() else root

    dtype = torch_dtype or default_dtype(device)
    transformer = load_flux(part("transformer"), device=device, dtype=dtype)
    # The reference keeps the autoencoder's weights in fp32 (ae.safetensors is fp32) and runs it
    # under bf16 autocast on the GPU (see `_ae_autocast`).
    ae = load_autoencoder(part("vae"), device=device, dtype=torch.float32)
    t5 = load_t5(part("text_encoder_2"), device=device, dtype=dtype)
    clip = load_clip(part("text_encoder"), device=device, dtype=dtype)
    t5_tok = load_t5_tokenizer(root)
    clip_tok = load_clip_tokenizer(root)
    if kontext is None:
        cls_name = str(read_json(root / "model_index.json", missing_ok=True).get("_class_name", ""))
        kontext = "Kontext" in cls_name or "kontext" in str(getattr(transformer, "variant", ""))
    scheduler = read_json(root / "scheduler" / "scheduler_config.json", missing_ok=True)
    schedule = ScheduleConfig.from_scheduler_config(scheduler) if scheduler else None
    return dict(
        transformer=transformer,
        ae=ae,
        t5=t5,
        clip=clip,
        t5_tokenizer=t5_tok,
        clip_tokenizer=clip_tok,
        kontext=kontext,
        schedule=schedule,
    )


def load_single_file(
    transformer_file, *, t5=None, clip=None, ae=None, tokenizers=None, torch_dtype=None, device=None,
    kontext=None, token=None, cache_dir=None, local_files_only=False,
) -> dict:  # fmt: skip
    """The parts of `FluxPipeline.from_single_file` (see there)."""
    from fluxcore.single_file import load_part, load_tokenizers
    from fluxcore.weights import load_flux

    file = Path(transformer_file)
    if not file.is_file():
        raise WeightsError(f"from_single_file: {file} is not a file")
    dtype = torch_dtype or default_dtype(device)
    hub = dict(token=token, cache_dir=cache_dir, local_files_only=local_files_only)
    t5_tok, clip_tok = load_tokenizers(tokenizers, **hub)
    parts = {
        "t5": load_part("t5", t5, file, device=device, dtype=dtype),
        "clip": load_part("clip", clip, file, device=device, dtype=dtype),
        "ae": load_part("ae", ae, file, device=device, dtype=torch.float32),
    }
    transformer = load_flux(file, device=device, dtype=dtype)
    if kontext is None:
        kontext = "kontext" in str(getattr(transformer, "variant", "")) or "kontext" in file.name.lower()
    return dict(
        transformer=transformer,
        ae=parts["ae"],
        t5=parts["t5"],
        clip=parts["clip"],
        t5_tokenizer=t5_tok,
        clip_tokenizer=clip_tok,
        kontext=kontext,
    )
