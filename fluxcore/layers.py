"""The FLUX building blocks. Attribute names are the official (BFL) checkpoint names, so the
official state dict maps onto these modules one to one.

Every step a fast path may want to replace is its own small module with one forward: the adaLN
norm (`AdaLayerNorm`), QK-norm + RoPE (`QKNorm`), the gated residual (`GatedResidual`) and the
single block's join of attention and MLP (`ParallelJoin`). Transforms such as
`fluxcore.kernels.apply` swap exact-type instances for fused twins with the same state-dict keys;
a module a user replaced is never touched, and the blocks themselves never look at backends.

Shapes: B batch, L tokens, D = hidden_size, H heads, Dh = D / H head dim.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from fluxcore.attention import attention
from fluxcore.config import FluxConfig
from fluxcore.math import apply_rope, embed_positions, modulate, rms_norm


class EmbedND(nn.Module):
    """3-axis RoPE tables: ids [B, L, 3] float32 → pe [B, 1, L, Dh/2, 2, 2] float32."""

    def __init__(self, theta: float, axes_dim: tuple[int, ...]):
        super().__init__()
        self.theta, self.axes_dim = theta, tuple(axes_dim)

    def forward(self, ids: Tensor) -> Tensor:
        return embed_positions(ids.float(), self.axes_dim, self.theta)


class MLPEmbedder(nn.Module):
    """Linear → SiLU → Linear, [B, in_dim] → [B, hidden_dim]."""

    def __init__(self, in_dim: int, hidden_dim: int):
        super().__init__()
        self.in_layer = nn.Linear(in_dim, hidden_dim, bias=True)
        self.silu = nn.SiLU()
        self.out_layer = nn.Linear(hidden_dim, hidden_dim, bias=True)

    def forward(self, x: Tensor) -> Tensor:
        return self.out_layer(self.silu(self.in_layer(x)))


class RMSNorm(nn.Module):
    """RMSNorm over the head dim with a learnable scale (key `scale`), computed in float32."""

    def __init__(self, dim: int):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        return rms_norm(x, self.scale)


class QKNorm(nn.Module):
    """The step that turns projected heads into attention-ready queries and keys: separate RMSNorms
    for q and k (results cast to v's dtype), then RoPE by pe, so attention backends see rotated q, k.

    q, k, v [B, H, L, Dh]; pe [B, 1, L, Dh/2, 2, 2] float32 → (q, k) [B, H, L, Dh] in v's dtype.
    """

    def __init__(self, dim: int):
        super().__init__()
        self.query_norm = RMSNorm(dim)
        self.key_norm = RMSNorm(dim)

    def forward(self, q: Tensor, k: Tensor, v: Tensor, pe: Tensor) -> tuple[Tensor, Tensor]:
        q, k = self.query_norm(q).to(v), self.key_norm(k).to(v)
        return apply_rope(q, pe), apply_rope(k, pe)


class AdaLayerNorm(nn.Module):
    """LayerNorm over channels without affine parameters, then the adaLN modulation
    (1 + scale)·x + shift. x [B, L, D]; shift, scale [B, 1, D] → [B, L, D] in x's dtype.

    No parameters, so it replaces the reference's `nn.LayerNorm(elementwise_affine=False)` under
    the same name without changing any state-dict key."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.dim, self.eps = dim, eps

    def forward(self, x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
        return modulate(F.layer_norm(x, (self.dim,), eps=self.eps), shift, scale)


class GatedResidual(nn.Module):
    """The adaLN-gated residual update x + gate·y. x, y [B, L, D]; gate [B, 1, D] → [B, L, D]."""

    def forward(self, x: Tensor, gate: Tensor, y: Tensor) -> Tensor:
        return x + gate * y


class ParallelJoin(nn.Module):
    """The single block's `linear2` input: the attention output beside the activated MLP hidden,
    cat(attn, act(mlp)) along channels. attn [B, L, D], mlp [B, L, M] → [B, L, D + M].

    The block passes its own `mlp_act` module, so a swapped activation is always the one applied
    (a fused join checks which activation it was given)."""

    def forward(self, attn: Tensor, mlp: Tensor, act: nn.Module) -> Tensor:
        return torch.cat((attn, act(mlp)), dim=-1)


class SelfAttention(nn.Module):
    """Parameter holder for one stream's attention: fused qkv, QK-norm (+ RoPE), output projection.

    The joint attention itself happens in the block, which concatenates the streams.
    """

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = False):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.norm = QKNorm(dim // num_heads)
        self.proj = nn.Linear(dim, dim)

    def qkv_heads(self, x: Tensor, pe: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """x [B, L, D], pe [B, 1, L, Dh/2, 2, 2] → normed and rotated q, k and v, each [B, H, L, Dh]."""
        q, k, v = rearrange(self.qkv(x), "B L (K H D) -> K B H L D", K=3, H=self.num_heads)
        q, k = self.norm(q, k, v, pe)
        return q, k, v


class Modulation(nn.Module):
    """adaLN parameters from the conditioning vector: vec [B, D] → 2 or 1 (shift, scale, gate) triples,
    each tensor [B, 1, D]. SiLU is applied here; the trunk's vec itself is never activated."""

    def __init__(self, dim: int, double: bool):
        super().__init__()
        self.multiplier = 6 if double else 3
        self.lin = nn.Linear(dim, self.multiplier * dim, bias=True)

    def forward(self, vec: Tensor) -> tuple[tuple[Tensor, Tensor, Tensor], ...]:
        out = self.lin(nn.functional.silu(vec))[:, None, :].chunk(self.multiplier, dim=-1)
        return tuple(out[i : i + 3] for i in range(0, self.multiplier, 3))


def _mlp(hidden_size: int, mlp_hidden: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(hidden_size, mlp_hidden, bias=True),
        nn.GELU(approximate="tanh"),
        nn.Linear(mlp_hidden, hidden_size, bias=True),
    )


class DoubleStreamBlock(nn.Module):
    """Image and text streams with their own weights, joined only inside attention.

    img [B, L_img, D], txt [B, L_txt, D], vec [B, D], pe [B, 1, L_txt + L_img, Dh/2, 2, 2]
    → (img, txt) with the same shapes. Attention order is [txt, img], as are the ids in pe.
    Built from the config, so a replacement block can read hyper-parameters of its own from it.
    """

    def __init__(self, config: FluxConfig):
        super().__init__()
        D = config.hidden_size
        self.num_heads = config.num_heads
        self.img_mod = Modulation(D, double=True)
        self.img_norm1 = AdaLayerNorm(D)
        self.img_attn = SelfAttention(D, config.num_heads, qkv_bias=config.qkv_bias)
        self.img_norm2 = AdaLayerNorm(D)
        self.img_mlp = _mlp(D, config.mlp_hidden_dim)
        self.txt_mod = Modulation(D, double=True)
        self.txt_norm1 = AdaLayerNorm(D)
        self.txt_attn = SelfAttention(D, config.num_heads, qkv_bias=config.qkv_bias)
        self.txt_norm2 = AdaLayerNorm(D)
        self.txt_mlp = _mlp(D, config.mlp_hidden_dim)
        self.residual = GatedResidual()

    def forward(self, img: Tensor, txt: Tensor, vec: Tensor, pe: Tensor) -> tuple[Tensor, Tensor]:
        (img_shift1, img_scale1, img_gate1), (img_shift2, img_scale2, img_gate2) = self.img_mod(vec)
        (txt_shift1, txt_scale1, txt_gate1), (txt_shift2, txt_scale2, txt_gate2) = self.txt_mod(vec)
        n_txt = txt.shape[1]

        # RoPE is per token, so each stream rotates with its own slice of pe ([txt, img] order).
        img_q, img_k, img_v = self.img_attn.qkv_heads(
            self.img_norm1(img, img_shift1, img_scale1), pe[:, :, n_txt:]
        )
        txt_q, txt_k, txt_v = self.txt_attn.qkv_heads(
            self.txt_norm1(txt, txt_shift1, txt_scale1), pe[:, :, :n_txt]
        )
        attn = attention(
            torch.cat((txt_q, img_q), dim=2),
            torch.cat((txt_k, img_k), dim=2),
            torch.cat((txt_v, img_v), dim=2),
        )
        txt_attn, img_attn = attn[:, :n_txt], attn[:, n_txt:]

        img = self.residual(img, img_gate1, self.img_attn.proj(img_attn))
        img = self.residual(img, img_gate2, self.img_mlp(self.img_norm2(img, img_shift2, img_scale2)))
        txt = self.residual(txt, txt_gate1, self.txt_attn.proj(txt_attn))
        txt = self.residual(txt, txt_gate2, self.txt_mlp(self.txt_norm2(txt, txt_shift2, txt_scale2)))
        return img, txt


class SingleStreamBlock(nn.Module):
    """One stream over x = cat(txt, img): attention and MLP in parallel from one fused linear1,
    merged by one linear2 (the attention output has no projection of its own).

    x [B, L, D], vec [B, D], pe [B, 1, L, Dh/2, 2, 2] → x [B, L, D]. Built from the config.
    """

    def __init__(self, config: FluxConfig):
        super().__init__()
        D, M = config.hidden_size, config.mlp_hidden_dim
        self.hidden_dim = D
        self.num_heads = config.num_heads
        self.mlp_hidden_dim = M
        self.linear1 = nn.Linear(D, D * 3 + M)
        self.linear2 = nn.Linear(D + M, D)
        self.norm = QKNorm(config.head_dim)
        self.pre_norm = AdaLayerNorm(D)
        self.mlp_act = nn.GELU(approximate="tanh")
        self.modulation = Modulation(D, double=False)
        self.join = ParallelJoin()
        self.residual = GatedResidual()

    def forward(self, x: Tensor, vec: Tensor, pe: Tensor) -> Tensor:
        ((shift, scale, gate),) = self.modulation(vec)
        qkv, mlp = torch.split(
            self.linear1(self.pre_norm(x, shift, scale)), [3 * self.hidden_dim, self.mlp_hidden_dim], dim=-1
        )
        q, k, v = rearrange(qkv, "B L (K H D) -> K B H L D", K=3, H=self.num_heads)
        q, k = self.norm(q, k, v, pe)
        attn = attention(q, k, v)
        return self.residual(x, gate, self.linear2(self.join(attn, mlp, self.mlp_act)))


class LastLayer(nn.Module):
    """Final adaLN (shift first, scale second — the reverse of diffusers) and projection to the
    packed velocity: x [B, L_img, D], vec [B, D] → [B, L_img, out_channels]."""

    def __init__(self, config: FluxConfig):
        super().__init__()
        D = config.hidden_size
        self.norm_final = AdaLayerNorm(D)
        self.linear = nn.Linear(D, config.out_channels, bias=True)  # patch size 1: packing is 2×2 already
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(D, 2 * D, bias=True))

    def forward(self, x: Tensor, vec: Tensor) -> Tensor:
        shift, scale = self.adaLN_modulation(vec)[:, None, :].chunk(2, dim=-1)
        return self.linear(self.norm_final(x, shift, scale))
