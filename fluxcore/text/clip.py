"""CLIP ViT-L/14 text encoder (openai/clip-vit-large-patch14, FLUX's `text_encoder`), Hugging Face names.

    input_ids [B, L ≤ 77] ─ token_embedding + position_embedding ─ x [B, L, 768]
    x ─ 12 × ( x += causal_attn(ln1(x)) ; x += fc2(quick_gelu(fc1(ln2(x)))) ) ─ final_layer_norm
    ─ last_hidden_state [B, L, 768];  pooled [B, 768] = last_hidden_state at the end-of-text token

FLUX uses only the pooled vector (`vec`, the transformer's `y`). State-dict keys are those of
`CLIPTextModel` files: `text_model.embeddings.token_embedding.weight`,
`text_model.encoder.layers.N.self_attn.{q,k,v,out}_proj.{weight,bias}`, `...layer_norm1`, `...mlp.fc1`, ...
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fluxcore.errors import ConfigError

# The eos_token_id that CLIP configs written before transformers PR #24773 carry (the official
# openai/clip-vit-large-patch14 and FLUX `text_encoder/config.json` among them). With it, the
# pooled position is the argmax of the ids — the end-of-text token has the largest id in the
# real vocabulary — and with any other value it is the first position holding that id.
LEGACY_EOS_TOKEN_ID = 2


# Upper bounds on sizes read from a config.json: far above CLIP-L (vocab 49408, width 768, 12
# layers, 77 positions), low enough that a corrupt or hostile value fails here, not in an allocation.
_CLIP_LIMITS = {
    "vocab_size": 1 << 22,
    "hidden_size": 1 << 16,
    "intermediate_size": 1 << 18,
    "num_hidden_layers": 512,
    "num_attention_heads": 1 << 10,
    "max_position_embeddings": 1 << 16,
}


@dataclass(frozen=True)
class CLIPTextConfig:
    """Frozen CLIP text-tower hyper-parameters, named as in transformers' `CLIPTextConfig`.

    Defaults are openai/clip-vit-large-patch14 as shipped in FLUX's `text_encoder/config.json`
    (including its legacy `eos_token_id=2`, see LEGACY_EOS_TOKEN_ID).
    hidden_act: "quick_gelu" (x·σ(1.702x), CLIP-L) or "gelu".
    """

    vocab_size: int = 49408
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    max_position_embeddings: int = 77
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    eos_token_id: int = LEGACY_EOS_TOKEN_ID

    def __post_init__(self):
        for name, hi in _CLIP_LIMITS.items():
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= hi:
                raise ConfigError(f"CLIPTextConfig.{name} must be an int in [1, {hi}], got {value!r}")
        eps = self.layer_norm_eps
        if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not 0 < eps < 1:
            raise ConfigError(f"CLIPTextConfig.layer_norm_eps must be a number in (0, 1), got {eps!r}")
        eos = self.eos_token_id
        if isinstance(eos, bool) or not isinstance(eos, int) or not 0 <= eos < self.vocab_size:
            # The pooled vector is read at the first position holding this id: outside the
            # vocabulary, no position ever does and every prompt would pool the wrong token.
            raise ConfigError(
                f"CLIPTextConfig.eos_token_id must be a token id in [0, vocab_size={self.vocab_size}), got {eos!r}"
            )
        if self.hidden_size % self.num_attention_heads:
            raise ConfigError(
                f"CLIPTextConfig: hidden_size {self.hidden_size} is not divisible by "
                f"num_attention_heads {self.num_attention_heads}"
            )
        if self.hidden_act not in ("quick_gelu", "gelu"):
            raise ConfigError(
                f"CLIPTextConfig.hidden_act must be 'quick_gelu' or 'gelu', got {self.hidden_act!r}"
            )

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def replace(self, **changes) -> CLIPTextConfig:
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_hf_dict(cls, d: dict) -> CLIPTextConfig:
        """From a transformers `config.json` of a CLIPTextModel (or a CLIPModel's `text_config`).
        Values of the wrong type or out of bounds raise ConfigError."""
        if isinstance(d, dict) and "text_config" in d and "hidden_size" not in d:
            d = d["text_config"]
        if not isinstance(d, dict):
            raise ConfigError(f"a CLIP text config must be a JSON object, got {type(d).__name__}")
        if d.get("model_type", "clip_text_model") not in ("clip_text_model", "clip"):
            raise ConfigError(
                f"config.json has model_type {d.get('model_type')!r}; expected 'clip_text_model'"
            )
        fields = {f.name for f in dataclasses.fields(cls)}
        kw = {k: d[k] for k in fields if k in d}
        if isinstance(kw.get("eos_token_id"), list) and kw["eos_token_id"]:
            kw["eos_token_id"] = kw["eos_token_id"][0]
        # transformers' own default when the key is absent.
        kw.setdefault("eos_token_id", 49407)
        return cls(**kw)

    def to_hf_dict(self) -> dict:
        """A transformers-compatible config.json dict for `CLIPTextModel`."""
        d = dataclasses.asdict(self)
        d.update(
            architectures=["CLIPTextModel"],
            model_type="clip_text_model",
            bos_token_id=0,
            pad_token_id=1,
            attention_dropout=0.0,
            projection_dim=self.hidden_size,
        )
        return d


CLIP_PRESETS: dict[str, CLIPTextConfig] = {
    "clip-vit-large-patch14": CLIPTextConfig(),
    # The full vocabulary and 77 positions, so the official tokenizer works with it.
    "tiny": CLIPTextConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4),
}


def quick_gelu(x: Tensor) -> Tensor:
    """x · sigmoid(1.702 x), the GELU approximation CLIP was trained with."""
    return x * torch.sigmoid(1.702 * x)


def eos_positions(input_ids: Tensor, eos_token_id: int) -> Tensor:
    """[B] int64: where each row's pooled vector is read (see LEGACY_EOS_TOKEN_ID)."""
    ids = input_ids.to(torch.int32)  # argmax over int32, as the reference does
    if eos_token_id == LEGACY_EOS_TOKEN_ID:
        return ids.argmax(dim=-1)
    return (ids == eos_token_id).int().argmax(dim=-1)


class CLIPTextEmbeddings(nn.Module):
    def __init__(self, config: CLIPTextConfig):
        super().__init__()
        self.token_embedding = nn.Embedding(config.vocab_size, config.hidden_size)
        self.position_embedding = nn.Embedding(config.max_position_embeddings, config.hidden_size)

    def forward(self, input_ids: Tensor) -> Tensor:
        L = input_ids.shape[1]
        if L > self.position_embedding.num_embeddings:
            raise ValueError(
                f"CLIP takes at most {self.position_embedding.num_embeddings} tokens; got input_ids of length {L}"
            )
        return self.token_embedding(input_ids) + self.position_embedding.weight[:L]


class CLIPAttention(nn.Module):
    def __init__(self, config: CLIPTextConfig):
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.head_dim = config.head_dim
        D = config.hidden_size
        self.q_proj = nn.Linear(D, D)
        self.k_proj = nn.Linear(D, D)
        self.v_proj = nn.Linear(D, D)
        self.out_proj = nn.Linear(D, D)

    def forward(self, x: Tensor) -> Tensor:
        """Causal multi-head attention, scale 1/√head_dim. x [B, L, D] → [B, L, D]."""
        B, L, D = x.shape
        q, k, v = (
            proj(x).view(B, L, self.num_heads, self.head_dim).transpose(1, 2)
            for proj in (self.q_proj, self.k_proj, self.v_proj)
        )
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.out_proj(out.transpose(1, 2).reshape(B, L, D))


class CLIPMLP(nn.Module):
    def __init__(self, config: CLIPTextConfig):
        super().__init__()
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)
        self.act = quick_gelu if config.hidden_act == "quick_gelu" else F.gelu

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class CLIPEncoderLayer(nn.Module):
    def __init__(self, config: CLIPTextConfig):
        super().__init__()
        self.self_attn = CLIPAttention(config)
        self.layer_norm1 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = CLIPMLP(config)
        self.layer_norm2 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class CLIPEncoder(nn.Module):
    def __init__(self, config: CLIPTextConfig):
        super().__init__()
        self.layers = nn.ModuleList(CLIPEncoderLayer(config) for _ in range(config.num_hidden_layers))

    def forward(self, x: Tensor) -> Tensor:
        for layer in self.layers:
            x = layer(x)
        return x


class CLIPTextTransformer(nn.Module):
    def __init__(self, config: CLIPTextConfig):
        super().__init__()
        self.embeddings = CLIPTextEmbeddings(config)
        self.encoder = CLIPEncoder(config)
        self.final_layer_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)


class CLIPTextOutput(NamedTuple):
    last_hidden_state: Tensor  # [B, L, hidden_size]
    pooler_output: Tensor  # [B, hidden_size]


class CLIPTextEncoder(nn.Module):
    """The CLIP text tower: `forward(input_ids [B, L ≤ 77] int64) -> CLIPTextOutput(last_hidden_state
    [B, L, D], pooler_output [B, D])`, both in the model's dtype. No attention mask beyond the
    causal one (FLUX passes none; padding comes after the end-of-text token, which only looks back).
    """

    def __init__(self, config: CLIPTextConfig):
        super().__init__()
        self.config = config
        self.text_model = CLIPTextTransformer(config)

    def forward(self, input_ids: Tensor) -> CLIPTextOutput:
        if input_ids.ndim != 2:
            raise ValueError(f"input_ids must be [B, L]; got shape {tuple(input_ids.shape)}")
        tm = self.text_model
        x = tm.final_layer_norm(tm.encoder(tm.embeddings(input_ids)))
        rows = torch.arange(x.shape[0], device=x.device)
        pooled = x[rows, eos_positions(input_ids, self.config.eos_token_id).to(x.device)]
        return CLIPTextOutput(x, pooled)

    @property
    def dtype(self) -> torch.dtype:
        return self.text_model.embeddings.token_embedding.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.text_model.embeddings.token_embedding.weight.device
