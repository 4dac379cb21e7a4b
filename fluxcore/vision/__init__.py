"""Image encoders for image-conditioned FLUX: CLIP ViT-L/14 (XLabs IP-Adapter) and SigLIP
so400m-patch14-384 (FLUX.1 Redux), with Hugging Face parameter names and their preprocessing."""

from fluxcore.vision.clip_vision import (
    CLIPVisionConfig,
    CLIPVisionEncoder,
    CLIPVisionOutput,
    clip_preprocess,
    load_clip_vision,
)
from fluxcore.vision.siglip import (
    SiglipVisionConfig,
    SiglipVisionEncoder,
    SiglipVisionOutput,
    load_siglip,
    redux_tokens,
    siglip_preprocess,
)

__all__ = [
    "CLIPVisionConfig",
    "CLIPVisionEncoder",
    "CLIPVisionOutput",
    "SiglipVisionConfig",
    "SiglipVisionEncoder",
    "SiglipVisionOutput",
    "clip_preprocess",
    "load_clip_vision",
    "load_siglip",
    "redux_tokens",
    "siglip_preprocess",
]
