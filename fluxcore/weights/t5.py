"""T5 encoder (FLUX's `text_encoder_2/`) and its tokenizer (`tokenizer_2/`): config from the
tensor shapes, `load_t5`, `save_t5` (transformers' T5EncoderModel layout), `load_t5_tokenizer`.
Shared loader conventions: weights/components.py.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import torch
from torch import Tensor

from fluxcore.atomic import atomic_folder, atomic_write_json
from fluxcore.text.t5 import T5Config, T5Encoder, keep_wo_in_fp32
from fluxcore.text.tokenizers import T5Tokenizer
from fluxcore.weights.components import (
    check_agrees,
    component_path,
    config_from,
    frozen,
    layer_indices,
    need_shape,
    weights_to_save,
)
from fluxcore.weights.errors import ConfigMismatchError
from fluxcore.weights.io import (
    Checkpoint,
    default_dtype,
    load_into,
    open_checkpoint,
    read_json,
    write_safetensors,
)


def infer_t5_config(ckpt: Checkpoint) -> T5Config:
    """T5Config from tensor shapes (relative_attention_max_distance and eps take T5's defaults)."""
    emb = "shared.weight" if "shared.weight" in ckpt else "encoder.embed_tokens.weight"
    vocab, d_model = need_shape(ckpt, emb, "T5 encoder")
    layers = layer_indices(ckpt.keys(), r"^encoder\.block\.(\d+)\.")
    buckets, heads = need_shape(
        ckpt, "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight", "T5 encoder"
    )
    inner = need_shape(ckpt, "encoder.block.0.layer.0.SelfAttention.q.weight", "T5 encoder")[0]
    wi_0 = "encoder.block.0.layer.1.DenseReluDense.wi_0.weight"
    d_ff = need_shape(ckpt, wi_0, "T5 v1.1 (gated) encoder")[0]
    if inner % heads:
        raise ConfigMismatchError(
            f"{ckpt.source}: inner width {inner} is not a multiple of the {heads} heads"
        )
    fields = dict(
        vocab_size=vocab,
        d_model=d_model,
        d_kv=inner // heads,
        d_ff=d_ff,
        num_layers=len(layers),
        num_heads=heads,
        relative_attention_num_buckets=buckets,
    )
    return config_from(lambda f: T5Config(**f), fields, ckpt.source)


# The config fields the tensor shapes determine: a config.json must agree with them.
_T5_SHAPE_FIELDS = (
    "vocab_size",
    "d_model",
    "inner_dim",
    "d_ff",
    "num_layers",
    "num_heads",
    "relative_attention_num_buckets",
)


def _t5_tensors(ckpt: Checkpoint, cast) -> Iterator[tuple[str, Tensor]]:
    """The checkpoint's tensors under T5Encoder's names: the tied embedding may be stored as
    `shared.weight`, as `encoder.embed_tokens.weight`, or as both (then `shared` is used)."""
    has_shared = "shared.weight" in ckpt
    for key, t in ckpt.stream():
        if key == "encoder.embed_tokens.weight":
            if has_shared:
                continue
            key = "shared.weight"
        yield key, cast(key, t)


def load_t5(
    source, *, config: T5Config | None = None, device=None, dtype: torch.dtype | None = None
) -> T5Encoder:
    """T5 encoder from `text_encoder_2/` (config.json + model.safetensors or a shard index), a
    model root holding it, or a .safetensors file (config from `config=` or the tensor shapes).

    dtype: float32 / bfloat16 as asked (default bf16 on CUDA, fp32 otherwise). float16 follows
    transformers: the `wo` projections stay float32 (fp16 overflows there); see T5Encoder.
    A T5 GGUF file (llama.cpp names) or a (scaled) fp8 file loads with its weights kept quantized;
    `dtype` is then the compute dtype. Returns an eval-mode, frozen T5Encoder on `device` (default CPU).
    """
    path = component_path(source, "text_encoder_2", "load_t5")
    folder = path if path.is_dir() else path.parent
    dtype = default_dtype(device) if dtype is None else dtype
    if path.is_file():  # a T5 .gguf or fp8 file stays quantized (fluxcore.quant, dequantized per layer)
        from fluxcore.quant import detect_format, load_quantized_t5

        if detect_format(path) is not None:
            return load_quantized_t5(path, device=device, dtype=dtype)
    with open_checkpoint(path) as ckpt:
        shaped = infer_t5_config(ckpt)
        if config is None:
            hf = read_json(folder / "config.json", missing_ok=True)
            config = config_from(T5Config.from_hf_dict, hf, folder / "config.json") if hf else shaped
        check_agrees(config, shaped, _T5_SHAPE_FIELDS, ckpt.source, "T5")
        with torch.device("meta"):
            model = T5Encoder(config)
        if dtype == torch.float16:
            keep_wo_in_fp32(model.to(dtype))

            def cast(key, t):
                return t.to(torch.float32 if key.endswith("DenseReluDense.wo.weight") else torch.float16)

            load_into(model, _t5_tensors(ckpt, cast), source=ckpt.source, device=device, dtype=None)
        else:
            load_into(
                model, _t5_tensors(ckpt, lambda k, t: t), source=ckpt.source, device=device, dtype=dtype
            )
    return frozen(model)


def save_t5(model: T5Encoder, folder) -> Path:
    """Write `folder/config.json` + `folder/model.safetensors` as transformers' T5EncoderModel
    does (the tied embedding once, as `shared.weight`). Returns the folder. Atomic: both files
    are swapped in together (`fluxcore.atomic.atomic_folder`); other files in the folder stay."""
    folder = Path(folder)
    sd = weights_to_save(model, "T5Encoder", folder)
    with atomic_folder(folder, replace=("model*.safetensors*", "config.json")) as tmp:
        write_safetensors(tmp / "model.safetensors", sd, {"format": "pt"})
        atomic_write_json(tmp / "config.json", model.config.to_hf_dict())
    return folder


def load_t5_tokenizer(source, *, max_length: int | None = None) -> T5Tokenizer:
    """T5 tokenizer from `tokenizer_2/` (tokenizer.json, else spiece.model) or a model root holding
    it. `max_length` is the default padded length (else the folder's model_max_length, else 512;
    FLUX schnell uses 256, fill 128)."""
    return T5Tokenizer.from_folder(
        component_path(source, "tokenizer_2", "load_t5_tokenizer"), max_length=max_length
    )
