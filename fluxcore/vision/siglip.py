"""SigLIP vision tower (google/siglip-so400m-patch14-384, what FLUX.1 Redux reads), Hugging Face
`SiglipVisionModel` names and semantics.

    pixel_values [B, 3, 384, 384] ─ patch_embedding (conv 14x14 stride 14, with bias) ─ [B, 729, D]
    ─ + position_embedding ─ 27 pre-norm layers ─ post_layernorm ─ last_hidden_state [B, 729, 1152]
    ─ head (attention pooling: probe, MultiheadAttention, layernorm, mlp) ─ pooler_output [B, D]

Redux uses last_hidden_state. Keys: vision_model.embeddings.{patch_embedding, position_embedding},
vision_model.encoder.layers.N.*, vision_model.post_layernorm, vision_model.head.{probe,
attention.in_proj_weight, attention.in_proj_bias, attention.out_proj, layernorm, mlp.fc1, mlp.fc2}.
Preprocessing (`siglip_preprocess`, the Redux feature_extractor's): resize to 384x384 (bicubic,
no crop), /255, mean 0.5, std 0.5.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fluxcore.errors import ConfigError
from fluxcore.vision.common import VisionEncoder, VisionMLP, count_layers, load_vision, need, preprocess

SIGLIP_MEAN = (0.5, 0.5, 0.5)
SIGLIP_STD = (0.5, 0.5, 0.5)


@dataclass(frozen=True)
class SiglipVisionConfig:
    """transformers' SiglipVisionConfig fields; defaults are google/siglip-so400m-patch14-384."""

    hidden_size: int = 1152
    intermediate_size: int = 4304
    num_hidden_layers: int = 27
    num_attention_heads: int = 16
    num_channels: int = 3
    image_size: int = 384
    patch_size: int = 14
    hidden_act: str = "gelu_pytorch_tanh"
    layer_norm_eps: float = 1e-6
    vision_use_head: bool = True

    def __post_init__(self):
        if self.image_size < self.patch_size:
            raise ConfigError(f"image_size {self.image_size} is smaller than patch_size {self.patch_size}")

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @classmethod
    def from_hf_dict(cls, d: dict) -> SiglipVisionConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


class SiglipVisionOutput(NamedTuple):
    last_hidden_state: Tensor  # [B, patches, hidden_size]
    pooler_output: Tensor | None  # [B, hidden_size] (None without the head)


class SiglipVisionEmbeddings(nn.Module):
    def __init__(self, c: SiglipVisionConfig):
        super().__init__()
        self.patch_embedding = nn.Conv2d(c.num_channels, c.hidden_size, c.patch_size, stride=c.patch_size)
        self.position_embedding = nn.Embedding(c.num_patches, c.hidden_size)

    def forward(self, pixel_values: Tensor) -> Tensor:
        x = (
            self.patch_embedding(pixel_values.to(self.patch_embedding.weight.dtype))
            .flatten(2)
            .transpose(1, 2)
        )
        if x.shape[1] != self.position_embedding.num_embeddings:
            raise ConfigError(
                f"pixel_values {tuple(pixel_values.shape)} give {x.shape[1]} patches; this tower takes "
                f"{self.position_embedding.num_embeddings} (use siglip_preprocess)"
            )
        return x + self.position_embedding.weight


class SiglipAttentionPool(nn.Module):
    """One learned query (probe) attends over the tokens; + MLP with a residual. → [B, D]."""

    def __init__(self, c: SiglipVisionConfig):
        super().__init__()
        self.num_heads = c.num_attention_heads
        self.probe = nn.Parameter(torch.zeros(1, 1, c.hidden_size))
        self.attention = nn.MultiheadAttention(c.hidden_size, c.num_attention_heads, batch_first=True)
        self.layernorm = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)
        self.mlp = VisionMLP(c.hidden_size, c.intermediate_size, c.hidden_act)

    def forward(self, h: Tensor) -> Tensor:
        B, N, D = h.shape
        a = self.attention
        wq, wk, wv = a.in_proj_weight.chunk(3)
        bq, bk, bv = a.in_proj_bias.chunk(3)
        q = F.linear(self.probe.expand(B, -1, -1), wq, bq).view(B, 1, self.num_heads, -1).transpose(1, 2)
        k = F.linear(h, wk, bk).view(B, N, self.num_heads, -1).transpose(1, 2)
        v = F.linear(h, wv, bv).view(B, N, self.num_heads, -1).transpose(1, 2)
        x = a.out_proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, 1, D))
        x = x + self.mlp(self.layernorm(x))
        return x[:, 0]


class SiglipVisionTransformer(nn.Module):
    def __init__(self, c: SiglipVisionConfig):
        super().__init__()
        self.embeddings = SiglipVisionEmbeddings(c)
        self.encoder = VisionEncoder(
            c.num_hidden_layers,
            c.hidden_size,
            c.num_attention_heads,
            c.intermediate_size,
            c.hidden_act,
            c.layer_norm_eps,
        )
        self.post_layernorm = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)
        if c.vision_use_head:
            self.head = SiglipAttentionPool(c)


class SiglipVisionEncoder(nn.Module):
    """`forward(pixel_values [B, 3, S, S]) -> SiglipVisionOutput(last_hidden_state, pooler_output)`
    in the model's dtype; `encode_images(PIL images)` → last_hidden_state of preprocessed images.
    `pooled=False` skips the head (Redux does not use it)."""

    def __init__(self, config: SiglipVisionConfig | None = None):
        super().__init__()
        self.config = config = config or SiglipVisionConfig()
        self.vision_model = SiglipVisionTransformer(config)

    def forward(self, pixel_values: Tensor, pooled: bool = True) -> SiglipVisionOutput:
        vm = self.vision_model
        h = vm.post_layernorm(vm.encoder(vm.embeddings(pixel_values)))
        pool = vm.head(h) if pooled and self.config.vision_use_head else None
        return SiglipVisionOutput(h, pool)

    def encode_images(self, images) -> Tensor:
        """last_hidden_state [B, patches, D] of PIL image(s) (or a [B, 3, H, W] tensor in [-1, 1])."""
        pixels = siglip_preprocess(images, self.config.image_size)
        return self(pixels.to(self.device), pooled=False).last_hidden_state

    @property
    def dtype(self) -> torch.dtype:
        return self.vision_model.post_layernorm.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.vision_model.post_layernorm.weight.device


def siglip_preprocess(images, size: int = 384) -> Tensor:
    """SiglipImageProcessor's pixel_values: resize to size x size (bicubic), /255, mean/std 0.5.
    → float32 [B, 3, size, size]."""
    return preprocess(images, size=(size, size), crop=None, mean=SIGLIP_MEAN, std=SIGLIP_STD)


def _build(hf: dict, shapes, source) -> SiglipVisionEncoder:
    if hf:
        config = SiglipVisionConfig.from_hf_dict(hf)
    else:
        what = "SigLIP vision"
        hidden, channels, patch, _ = need(
            shapes, "vision_model.embeddings.patch_embedding.weight", source, what
        )
        patches = need(shapes, "vision_model.embeddings.position_embedding.weight", source, what)[0]
        config = SiglipVisionConfig(
            hidden_size=hidden, num_channels=channels, patch_size=patch,
            intermediate_size=need(shapes, "vision_model.encoder.layers.0.mlp.fc1.weight", source, what)[0],
            num_hidden_layers=count_layers(shapes), num_attention_heads=16 if hidden == 1152 else max(1, hidden // 64),
            image_size=round(patches**0.5) * patch, vision_use_head="vision_model.head.probe" in shapes,
        )  # fmt: skip
    return SiglipVisionEncoder(config)


def load_siglip(source, *, device=None, dtype: torch.dtype | None = None) -> SiglipVisionEncoder:
    """SiglipVisionEncoder from an `image_encoder/` folder (FLUX.1-Redux-dev's; config.json +
    model.safetensors), a model root holding one, a full SiglipModel folder (text tower skipped) or
    a .safetensors file (config from shapes). Eval mode, frozen; dtype default bf16 on CUDA, else fp32."""
    return load_vision(source, _build, "SigLIP vision", device=device, dtype=dtype)


def redux_tokens(image, siglip: SiglipVisionEncoder, projector: nn.Module, *, device=None) -> Tensor:
    """FLUX.1 Redux's image prompt: PIL image(s) (or a [B, 3, H, W] tensor in [-1, 1]) →
    siglip_preprocess → SigLIP last_hidden_state [B, 729, 1152] → `projector` (a
    fluxcore.ReduxProjector, `load_redux`) → tokens [B, 729, 4096] in the projector's dtype on
    `device` (default the projector's). Append them to the T5 tokens with
    `fluxcore.conditioning.append_redux(txt, txt_ids, tokens)` (their ids are zeros)."""
    from fluxcore.conditioning import redux_inputs

    p = next(projector.parameters())
    with torch.no_grad():
        emb = siglip.encode_images(image)
        return redux_inputs(projector, emb, device=p.device if device is None else device)
