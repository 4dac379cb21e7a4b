"""CLIP-L text encoder (FLUX's `text_encoder/`) and its tokenizer (`tokenizer/`): config from the
tensor shapes, `load_clip`, `save_clip` (transformers' CLIPTextModel layout), `load_clip_tokenizer`.
Shared loader conventions: weights/components.py.
"""

from __future__ import annotations

from pathlib import Path

import torch

from fluxcore.atomic import atomic_folder, atomic_write_json
from fluxcore.text.clip import CLIPTextConfig, CLIPTextEncoder
from fluxcore.text.tokenizers import CLIPTokenizer
from fluxcore.weights.components import (
    check_agrees,
    component_path,
    config_from,
    frozen,
    layer_indices,
    shape_of,
    weights_to_save,
)
from fluxcore.weights.io import default_dtype, load_into, open_checkpoint, read_json, write_safetensors

# Saved by older transformers versions as a persistent buffer; it is always arange(77).
_CLIP_IGNORED = ("text_model.embeddings.position_ids",)


def _clip_name(key: str) -> str:
    """transformers >= 5 writes CLIPTextModel keys without the `text_model.` prefix that the
    official files (and this module) use; accept both."""
    return key if key.startswith("text_model.") else "text_model." + key


def infer_clip_config(shapes: dict[str, tuple[int, ...]], source: str = "CLIP") -> CLIPTextConfig:
    """CLIPTextConfig from tensor shapes (keys with the `text_model.` prefix). The head count is
    not in the shapes: CLIP uses 64-wide heads, so num_attention_heads = hidden_size / 64 (12 for
    CLIP-L); pass `config=` for other models. eos_token_id takes the official file's legacy 2."""

    def shape(key):
        return shape_of(shapes, key, "CLIP text", 2, source)

    vocab, hidden = shape("text_model.embeddings.token_embedding.weight")
    positions = shape("text_model.embeddings.position_embedding.weight")[0]
    layers = layer_indices(shapes, r"^text_model\.encoder\.layers\.(\d+)\.")
    inter = shape("text_model.encoder.layers.0.mlp.fc1.weight")[0]
    heads = hidden // 64 if hidden % 64 == 0 else 1
    fields = dict(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=inter,
        num_hidden_layers=len(layers),
        num_attention_heads=heads,
        max_position_embeddings=positions,
    )
    return config_from(lambda f: CLIPTextConfig(**f), fields, source)


_CLIP_SHAPE_FIELDS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "max_position_embeddings",
)


def load_clip(
    source, *, config: CLIPTextConfig | None = None, device=None, dtype: torch.dtype | None = None
) -> CLIPTextEncoder:
    """CLIP text encoder from `text_encoder/` (config.json + model.safetensors or a shard index), a
    model root holding it, or a .safetensors file (config from `config=` or the tensor shapes).
    Keys may carry the `text_model.` prefix (official files) or not (transformers >= 5).
    Returns an eval-mode, frozen CLIPTextEncoder on `device` in `dtype` (default bf16 on CUDA, else fp32)."""
    path = component_path(source, "text_encoder", "load_clip")
    folder = path if path.is_dir() else path.parent
    dtype = default_dtype(device) if dtype is None else dtype
    with open_checkpoint(path) as ckpt:
        shaped = infer_clip_config({_clip_name(k): ckpt.shape(k) for k in ckpt.keys()}, ckpt.source)
        if config is None:
            hf = read_json(folder / "config.json", missing_ok=True)
            config = config_from(CLIPTextConfig.from_hf_dict, hf, folder / "config.json") if hf else shaped
        check_agrees(config, shaped, _CLIP_SHAPE_FIELDS, ckpt.source, "CLIP text")
        with torch.device("meta"):
            model = CLIPTextEncoder(config)
        tensors = ((_clip_name(k), t) for k, t in ckpt.stream() if _clip_name(k) not in _CLIP_IGNORED)
        load_into(model, tensors, source=ckpt.source, device=device, dtype=dtype)
    return frozen(model)


def save_clip(model: CLIPTextEncoder, folder) -> Path:
    """Write `folder/config.json` + `folder/model.safetensors` as transformers' CLIPTextModel does.
    Atomic like `save_t5`."""
    folder = Path(folder)
    sd = weights_to_save(model, "CLIPTextEncoder", folder)
    with atomic_folder(folder, replace=("model*.safetensors*", "config.json")) as tmp:
        write_safetensors(tmp / "model.safetensors", sd, {"format": "pt"})
        atomic_write_json(tmp / "config.json", model.config.to_hf_dict())
    return folder


def load_clip_tokenizer(source, *, max_length: int | None = None) -> CLIPTokenizer:
    """CLIP tokenizer from `tokenizer/` (vocab.json + merges.txt) or a model root holding it.
    `max_length` default: the folder's model_max_length (77)."""
    path = Path(source)
    if path.is_dir() and not (path / "vocab.json").is_file() and (path / "tokenizer").is_dir():
        path = path / "tokenizer"
    return CLIPTokenizer.from_folder(path, max_length=max_length)
