"""CLIP ViT vision tower with projection (openai/clip-vit-large-patch14's image side, what the
XLabs IP-Adapter reads), Hugging Face `CLIPVisionModelWithProjection` names and semantics.

    pixel_values [B, 3, 224, 224] ─ patch_embedding (conv 14x14 stride 14, no bias) ─ [B, 256, D]
    ─ cat(class_embedding, ·) + position_embedding ─ pre_layrnorm ─ 24 pre-norm layers
    ─ last_hidden_state [B, 257, D];  image_embeds [B, P] = visual_projection(post_layernorm(CLS))

Keys: vision_model.embeddings.{class_embedding, patch_embedding.weight, position_embedding.weight},
vision_model.pre_layrnorm (sic), vision_model.encoder.layers.N.*, vision_model.post_layernorm,
visual_projection.weight. Preprocessing (`clip_preprocess`): shorter side to 224 (bicubic),
centre crop 224, /255, OpenAI mean/std.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor, nn

from fluxcore.errors import ConfigError
from fluxcore.vision.common import VisionEncoder, count_layers, load_vision, need, preprocess

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True)
class CLIPVisionConfig:
    """transformers' CLIPVisionConfig fields; defaults are openai/clip-vit-large-patch14."""

    hidden_size: int = 1024
    intermediate_size: int = 4096
    num_hidden_layers: int = 24
    num_attention_heads: int = 16
    num_channels: int = 3
    image_size: int = 224
    patch_size: int = 14
    projection_dim: int = 768
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5

    def __post_init__(self):
        if self.image_size % self.patch_size:
            raise ConfigError(
                f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}"
            )

    @property
    def num_positions(self) -> int:
        return (self.image_size // self.patch_size) ** 2 + 1

    @classmethod
    def from_hf_dict(cls, d: dict) -> CLIPVisionConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


class CLIPVisionOutput(NamedTuple):
    image_embeds: Tensor  # [B, projection_dim]
    last_hidden_state: Tensor  # [B, 1 + patches, hidden_size]


class CLIPVisionEmbeddings(nn.Module):
    def __init__(self, c: CLIPVisionConfig):
        super().__init__()
        self.class_embedding = nn.Parameter(torch.zeros(c.hidden_size))
        self.patch_embedding = nn.Conv2d(
            c.num_channels, c.hidden_size, c.patch_size, stride=c.patch_size, bias=False
        )
        self.position_embedding = nn.Embedding(c.num_positions, c.hidden_size)

    def forward(self, pixel_values: Tensor) -> Tensor:
        x = (
            self.patch_embedding(pixel_values.to(self.patch_embedding.weight.dtype))
            .flatten(2)
            .transpose(1, 2)
        )
        if x.shape[1] + 1 != self.position_embedding.num_embeddings:
            raise ConfigError(
                f"pixel_values {tuple(pixel_values.shape)} give {x.shape[1]} patches; this tower takes "
                f"{self.position_embedding.num_embeddings - 1} (use clip_preprocess)"
            )
        cls = self.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        return torch.cat((cls, x), dim=1) + self.position_embedding.weight


class CLIPVisionTransformer(nn.Module):
    def __init__(self, c: CLIPVisionConfig):
        super().__init__()
        self.embeddings = CLIPVisionEmbeddings(c)
        self.pre_layrnorm = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)
        self.encoder = VisionEncoder(
            c.num_hidden_layers,
            c.hidden_size,
            c.num_attention_heads,
            c.intermediate_size,
            c.hidden_act,
            c.layer_norm_eps,
        )
        self.post_layernorm = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)


class CLIPVisionEncoder(nn.Module):
    """`forward(pixel_values [B, 3, S, S]) -> CLIPVisionOutput(image_embeds [B, P], last_hidden_state)`
    in the model's dtype; `encode_images(PIL images)` preprocesses first."""

    def __init__(self, config: CLIPVisionConfig | None = None):
        super().__init__()
        self.config = config = config or CLIPVisionConfig()
        self.vision_model = CLIPVisionTransformer(config)
        self.visual_projection = nn.Linear(config.hidden_size, config.projection_dim, bias=False)

    def forward(self, pixel_values: Tensor) -> CLIPVisionOutput:
        vm = self.vision_model
        h = vm.encoder(vm.pre_layrnorm(vm.embeddings(pixel_values)))
        return CLIPVisionOutput(self.visual_projection(vm.post_layernorm(h[:, 0])), h)

    def encode_images(self, images) -> Tensor:
        """image_embeds [B, projection_dim] of PIL image(s) (or a [B, 3, H, W] tensor in [-1, 1])."""
        pixels = clip_preprocess(images, self.config.image_size)
        return self(pixels.to(self.device)).image_embeds

    @property
    def dtype(self) -> torch.dtype:
        return self.visual_projection.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.visual_projection.weight.device


def clip_preprocess(images, size: int = 224) -> Tensor:
    """CLIPImageProcessor's pixel_values: shorter side → size (bicubic), centre crop size x size,
    /255, OpenAI mean/std. → float32 [B, 3, size, size]."""
    return preprocess(images, size=size, crop=(size, size), mean=OPENAI_CLIP_MEAN, std=OPENAI_CLIP_STD)


def _build(hf: dict, shapes, source) -> CLIPVisionEncoder:
    if hf:
        config = CLIPVisionConfig.from_hf_dict(hf)
    else:
        what = "CLIP vision"
        hidden, channels, patch, _ = need(
            shapes, "vision_model.embeddings.patch_embedding.weight", source, what
        )
        positions = need(shapes, "vision_model.embeddings.position_embedding.weight", source, what)[0]
        heads = 16 if hidden == 1024 else max(1, hidden // 64)
        config = CLIPVisionConfig(
            hidden_size=hidden, num_channels=channels, patch_size=patch,
            intermediate_size=need(shapes, "vision_model.encoder.layers.0.mlp.fc1.weight", source, what)[0],
            num_hidden_layers=count_layers(shapes), num_attention_heads=heads,
            image_size=round((positions - 1) ** 0.5) * patch,
            projection_dim=need(shapes, "visual_projection.weight", source, what)[0],
        )  # fmt: skip
    return CLIPVisionEncoder(config)


def load_clip_vision(source, *, device=None, dtype: torch.dtype | None = None) -> CLIPVisionEncoder:
    """CLIPVisionEncoder from an `image_encoder/` folder (config.json + model.safetensors, a
    CLIPVisionModelWithProjection), a model root holding one, a full CLIPModel folder (its text
    tower is skipped) or a .safetensors file (config from shapes; heads = hidden / 64). Eval mode,
    frozen; dtype default bf16 on CUDA, else fp32."""
    return load_vision(source, _build, "CLIP vision", device=device, dtype=dtype)
