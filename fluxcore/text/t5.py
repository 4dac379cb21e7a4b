"""T5 v1.1 encoder (google/t5-v1_1-xxl as FLUX uses it), with Hugging Face parameter names.

    input_ids [B, L] ─ shared (embedding) ─ x [B, L, d_model]
    position bias [1, H, L, L] from relative-position buckets (layer 0's table, shared by all layers)
    x ─ N × ( x += attn(rms_norm(x)) ; x += gated_gelu_ffn(rms_norm(x)) ) ─ rms_norm ─ [B, L, d_model]

T5 specifics that matter for exact outputs: RMS norm without mean or bias, eps 1e-6, computed in
float32; no 1/√d scaling inside attention (it is folded into the trained weights); a learned
bias per (head, bucket of relative distance) added to the attention logits; gated GELU (tanh).

State-dict keys are those of `T5EncoderModel` files (`shared.weight`,
`encoder.block.N.layer.0.SelfAttention.{q,k,v,o}.weight`, ...). The file's
`encoder.embed_tokens.weight` is the same tensor as `shared.weight` (tied); this module keeps only
`shared` and the loader accepts either name.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fluxcore.errors import ConfigError

# Tanh-approximated GELU under the names transformers' configs use for it.
_GATED_TANH_GELU = ("gated-gelu", "gated-gelu_new", "gated-gelu_pytorch_tanh", "gated-gelu_fast")


# Upper bounds on sizes read from a config.json: far above any released T5 (XXL: vocab 32128,
# d_model 4096, d_ff 10240, 24 layers, 64 heads), low enough that a corrupt or hostile value fails
# here instead of building millions of modules or allocating terabytes.
_T5_LIMITS = {
    "vocab_size": 1 << 22,
    "d_model": 1 << 16,
    "d_kv": 1 << 12,
    "d_ff": 1 << 18,
    "num_layers": 512,
    "num_heads": 1 << 10,
    "relative_attention_num_buckets": 1 << 12,
    "relative_attention_max_distance": 1 << 20,
}


@dataclass(frozen=True)
class T5Config:
    """Frozen T5 encoder hyper-parameters, named as in transformers' `T5Config` (config.json).

    Defaults are google/t5-v1_1-xxl (FLUX's `text_encoder_2`). inner dim = num_heads · d_kv.
    """

    vocab_size: int = 32128
    d_model: int = 4096
    d_kv: int = 64
    d_ff: int = 10240
    num_layers: int = 24
    num_heads: int = 64
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    layer_norm_epsilon: float = 1e-6
    feed_forward_proj: str = "gated-gelu"

    def __post_init__(self):
        for name, hi in _T5_LIMITS.items():
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= hi:
                raise ConfigError(f"T5Config.{name} must be an int in [1, {hi}], got {value!r}")
        eps = self.layer_norm_epsilon
        if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not 0 < eps < 1:
            raise ConfigError(f"T5Config.layer_norm_epsilon must be a number in (0, 1), got {eps!r}")
        if self.feed_forward_proj not in _GATED_TANH_GELU:
            raise ConfigError(
                f"T5Config.feed_forward_proj={self.feed_forward_proj!r}: only T5 v1.1's gated tanh-GELU "
                f"({', '.join(_GATED_TANH_GELU)}) is supported"
            )

    @property
    def inner_dim(self) -> int:
        return self.num_heads * self.d_kv

    def replace(self, **changes) -> T5Config:
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_hf_dict(cls, d: dict) -> T5Config:
        """From a transformers T5 `config.json` dict (unknown keys are ignored). Values of the
        wrong type or out of bounds raise ConfigError."""
        if not isinstance(d, dict):
            raise ConfigError(f"a T5 config must be a JSON object, got {type(d).__name__}")
        if d.get("model_type", "t5") != "t5":
            raise ConfigError(f"config.json has model_type {d.get('model_type')!r}; expected 't5'")
        ff = d.get("feed_forward_proj", "relu")
        if ff == "gated-gelu" or (
            d.get("is_gated_act") and d.get("dense_act_fn") in ("gelu_new", "gelu_pytorch_tanh")
        ):
            ff = "gated-gelu"
        fields = {f.name for f in dataclasses.fields(cls)} - {"feed_forward_proj"}
        return cls(**{k: d[k] for k in fields if k in d}, feed_forward_proj=ff)

    def to_hf_dict(self) -> dict:
        """A transformers-compatible config.json dict for `T5EncoderModel`."""
        d = dataclasses.asdict(self)
        d.update(
            architectures=["T5EncoderModel"],
            model_type="t5",
            is_encoder_decoder=True,
            dense_act_fn="gelu_new",
            is_gated_act=True,
            feed_forward_proj="gated-gelu",
            num_decoder_layers=self.num_layers,
            pad_token_id=0,
            eos_token_id=1,
            decoder_start_token_id=0,
            dropout_rate=0.1,
            tie_word_embeddings=True,
        )
        return d


T5_PRESETS: dict[str, T5Config] = {
    "t5-v1_1-xxl": T5Config(),
    # The full vocabulary, so the official tokenizer works with it; everything else tiny.
    "tiny": T5Config(d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4),
}


# ---------------------------------------------------------------------------------------------
# Pure functions


def relative_position_bucket(
    relative_position: Tensor, *, bidirectional: bool = True, num_buckets: int = 32, max_distance: int = 128
) -> Tensor:
    """Bucket index [same shape, int64] for each signed distance key_pos − query_pos (int64).

    Half the buckets (bidirectional) hold positive distances. Within a half, distances below
    n/2 get a bucket each; larger ones share log-spaced buckets up to `max_distance`, and all
    beyond share the last bucket.
    """
    buckets = torch.zeros_like(relative_position)
    if bidirectional:
        num_buckets //= 2
        buckets = buckets + (relative_position > 0).long() * num_buckets
        distance = relative_position.abs()
    else:
        distance = (-relative_position).clamp(min=0)
    exact = num_buckets // 2
    # Same float32 expression (and truncation toward zero) as the reference, so buckets agree exactly.
    log_ratio = torch.log(distance.float() / exact) / math.log(max_distance / exact)
    far = exact + (log_ratio * (num_buckets - exact)).long()
    far = far.clamp(max=num_buckets - 1)
    return buckets + torch.where(distance < exact, distance, far)


def t5_rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """T5 layer norm: x · rsqrt(mean(x², −1) + eps) · weight; statistics in float32.

    The result is cast to the weight's dtype when that is bf16/fp16 (as transformers does), else it
    stays float32.
    """
    variance = x.float().pow(2).mean(-1, keepdim=True)
    y = x * torch.rsqrt(variance + eps)
    if weight.dtype in (torch.float16, torch.bfloat16):
        y = y.to(weight.dtype)
    return weight * y


def clamp_fp16(x: Tensor) -> Tensor:
    """Keep fp16 activations finite the way transformers' T5 does: clamp to ±(max − 1000) if any
    value overflowed to inf, else to ±max. Other dtypes pass through."""
    if x.dtype != torch.float16:
        return x
    fmax = torch.finfo(torch.float16).max
    limit = torch.where(torch.isinf(x).any(), fmax - 1000, fmax)
    return torch.clamp(x, min=-limit, max=limit)


# ---------------------------------------------------------------------------------------------
# Modules (names follow the checkpoint)


class T5LayerNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        return t5_rms_norm(x, self.weight, self.eps)


class T5Attention(nn.Module):
    """Multi-head self-attention without logit scaling. Layer 0 also owns
    `relative_attention_bias` [num_buckets, num_heads], used by every layer."""

    def __init__(self, config: T5Config, has_relative_attention_bias: bool):
        super().__init__()
        self.num_heads = config.num_heads
        self.d_kv = config.d_kv
        self.num_buckets = config.relative_attention_num_buckets
        self.max_distance = config.relative_attention_max_distance
        self.q = nn.Linear(config.d_model, config.inner_dim, bias=False)
        self.k = nn.Linear(config.d_model, config.inner_dim, bias=False)
        self.v = nn.Linear(config.d_model, config.inner_dim, bias=False)
        self.o = nn.Linear(config.inner_dim, config.d_model, bias=False)
        if has_relative_attention_bias:
            self.relative_attention_bias = nn.Embedding(self.num_buckets, self.num_heads)

    def position_bias(self, length: int, device: torch.device) -> Tensor:
        """[1, H, L, L] additive logit bias (in the bias table's dtype) for a length-L sequence."""
        pos = torch.arange(length, dtype=torch.long, device=device)
        buckets = relative_position_bucket(
            pos[None, :] - pos[:, None],
            bidirectional=True,
            num_buckets=self.num_buckets,
            max_distance=self.max_distance,
        )
        return self.relative_attention_bias(buckets).permute(2, 0, 1).unsqueeze(0)

    def forward(self, x: Tensor, bias: Tensor) -> Tensor:
        """x [B, L, d_model], bias [1 or B, H, L, L] → [B, L, d_model]."""
        B, L, _ = x.shape
        q, k, v = (
            proj(x).view(B, L, self.num_heads, self.d_kv).transpose(1, 2) for proj in (self.q, self.k, self.v)
        )
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.to(q.dtype), scale=1.0)
        return self.o(out.transpose(1, 2).reshape(B, L, self.num_heads * self.d_kv))


class T5LayerSelfAttention(nn.Module):
    def __init__(self, config: T5Config, has_relative_attention_bias: bool):
        super().__init__()
        self.SelfAttention = T5Attention(config, has_relative_attention_bias)
        self.layer_norm = T5LayerNorm(config.d_model, config.layer_norm_epsilon)

    def forward(self, x: Tensor, bias: Tensor) -> Tensor:
        return x + self.SelfAttention(self.layer_norm(x), bias)


class T5DenseGatedActDense(nn.Module):
    """gelu_tanh(wi_0 x) · (wi_1 x) → wo. The input of `wo` is cast to wo's dtype, so that `wo` can
    stay float32 in an fp16 model (the activations it sees overflow fp16 in T5-XXL)."""

    def __init__(self, config: T5Config):
        super().__init__()
        self.wi_0 = nn.Linear(config.d_model, config.d_ff, bias=False)
        self.wi_1 = nn.Linear(config.d_model, config.d_ff, bias=False)
        self.wo = nn.Linear(config.d_ff, config.d_model, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        h = F.gelu(self.wi_0(x), approximate="tanh") * self.wi_1(x)
        # A quantized `wo` (fluxcore.quant) stores packed or float8 bytes: it takes h as it is and
        # dequantizes itself; only a plain float `wo` sets the dtype h is cast to.
        dtype = self.wo.weight.dtype
        return self.wo(h.to(dtype) if dtype.is_floating_point and dtype.itemsize >= 2 else h)


class T5LayerFF(nn.Module):
    def __init__(self, config: T5Config):
        super().__init__()
        self.DenseReluDense = T5DenseGatedActDense(config)
        self.layer_norm = T5LayerNorm(config.d_model, config.layer_norm_epsilon)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.DenseReluDense(self.layer_norm(x))


class T5Block(nn.Module):
    def __init__(self, config: T5Config, has_relative_attention_bias: bool):
        super().__init__()
        self.layer = nn.ModuleList(
            [T5LayerSelfAttention(config, has_relative_attention_bias), T5LayerFF(config)]
        )

    def forward(self, x: Tensor, bias: Tensor) -> Tensor:
        x = clamp_fp16(self.layer[0](x, bias))
        return clamp_fp16(self.layer[1](x))


class T5Stack(nn.Module):
    def __init__(self, config: T5Config):
        super().__init__()
        self.block = nn.ModuleList(
            T5Block(config, has_relative_attention_bias=(i == 0)) for i in range(config.num_layers)
        )
        self.final_layer_norm = T5LayerNorm(config.d_model, config.layer_norm_epsilon)

    def forward(self, x: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        bias = self.block[0].layer[0].SelfAttention.position_bias(x.shape[1], x.device)
        if attention_mask is not None:
            # Padding keys get the dtype's most negative value, like the reference's additive mask.
            keep = attention_mask.bool()[:, None, None, :]
            bias = bias.masked_fill(~keep, torch.finfo(bias.dtype).min)
        for block in self.block:
            x = block(x, bias)
        return self.final_layer_norm(x)


class T5Encoder(nn.Module):
    """The T5 v1.1 encoder: `forward(input_ids [B, L] int64, attention_mask=None) -> [B, L, d_model]`
    (the last hidden state, in the layer norms' dtype).

    FLUX calls it with `attention_mask=None`: padding tokens are attended to. Build full size on
    `torch.device("meta")` and load with `fluxcore.load_t5`.

    Precision: bf16 and fp32 run as is (norm statistics in fp32). fp16 overflows in T5-XXL's
    feed-forward; it is supported only the way transformers does it — every `wo` kept in float32
    (`keep_wo_in_fp32`, done by `load_t5(dtype=torch.float16)`) and activations clamped — and a
    fully-fp16 model is refused.
    """

    def __init__(self, config: T5Config):
        super().__init__()
        self.config = config
        self.shared = nn.Embedding(config.vocab_size, config.d_model)
        self.encoder = T5Stack(config)

    @property
    def embed_tokens(self) -> nn.Embedding:
        """`encoder.embed_tokens` in Hugging Face files: the same table as `shared`."""
        return self.shared

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        if input_ids.ndim != 2:
            raise ValueError(f"input_ids must be [B, L]; got shape {tuple(input_ids.shape)}")
        if (
            self.shared.weight.dtype == torch.float16
            and self.encoder.block[0].layer[1].DenseReluDense.wo.weight.dtype == torch.float16
        ):
            raise ConfigError(
                "T5 in float16 with float16 `wo` weights overflows (inf/NaN in the feed-forward output). "
                "Use bfloat16 or float32, or keep the `wo` projections in float32 with "
                "fluxcore.text.t5.keep_wo_in_fp32(model) (load_t5(dtype=torch.float16) does this)"
            )
        return self.encoder(self.shared(input_ids), attention_mask)

    @property
    def dtype(self) -> torch.dtype:
        return self.shared.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.shared.weight.device


def keep_wo_in_fp32(model: T5Encoder) -> T5Encoder:
    """Cast every feed-forward output projection `wo` to float32 (in place; returns the model).

    This is transformers' policy for fp16 T5 (`_keep_in_fp32_modules = ["wo"]`): the residual
    stream then runs in float32 from the first feed-forward on, while the other matmuls stay fp16.
    """
    for block in model.encoder.block:
        block.layer[1].DenseReluDense.wo.float()
    return model
