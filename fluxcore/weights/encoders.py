"""Loading (and saving) the text encoders, their tokenizers and the autoencoder from the files that
ship with FLUX — one module per component, re-exported here:

    text_encoder_2/ (T5, config.json + shard index)   → load_t5            weights/t5.py
    text_encoder/   (CLIP-L, config.json + model.safetensors) → load_clip  weights/clip.py
    ae.safetensors (BFL keys) or vae/ (diffusers)     → load_autoencoder   weights/autoencoder.py
    tokenizer_2/ → load_t5_tokenizer        tokenizer/ → load_clip_tokenizer

Every loader takes the component's own folder or file, or the model's root folder (it then picks
the official sub-folder). The model's size comes from what is on disk — config.json where the
layout has one, else the tensor shapes — so tiny models saved in the official layout load with
the same calls. Models are built on the meta device and filled one tensor at a time
(`fluxcore.weights.io.load_into`): one copy of the weights, ever. Loaded models are in eval mode
with `requires_grad=False` (FLUX keeps all three frozen). What the loaders share is in
weights/components.py.

Default dtype: bfloat16 on CUDA, float32 elsewhere (CPU bf16 kernels are slow).
"""

from fluxcore.weights.autoencoder import (
    AE_CONFIG_METADATA_KEY,
    infer_autoencoder_config,
    load_autoencoder,
    save_autoencoder,
)
from fluxcore.weights.clip import infer_clip_config, load_clip, load_clip_tokenizer, save_clip
from fluxcore.weights.t5 import infer_t5_config, load_t5, load_t5_tokenizer, save_t5

__all__ = [
    "AE_CONFIG_METADATA_KEY",
    "infer_autoencoder_config",
    "infer_clip_config",
    "infer_t5_config",
    "load_autoencoder",
    "load_clip",
    "load_clip_tokenizer",
    "load_t5",
    "load_t5_tokenizer",
    "save_autoencoder",
    "save_clip",
    "save_t5",
]
