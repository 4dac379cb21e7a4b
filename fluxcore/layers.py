"""The FLUX building blocks. Attribute names are the official (BFL) checkpoint names, so the
official state dict maps onto these modules one to one.

Shapes: B batch, L tokens, D = hidden_size, H heads, Dh = D / H head dim.
"""

from __future__ import annotations

import torch
from einops import rearrange
from torch import Tensor, nn

from fluxcore.attention import attention, resolve_backend
from fluxcore.math import embed_positions, modulate, rms_norm


def use_fused_kernels(x: Tensor, num_heads: int) -> bool:
    """Whether attention over x's heads (x [B, L, H·Dh]) resolves to the "triton" backend. The blocks
    then run their `forward_fused` twins, built from fluxcore.kernels (the only path importing triton)."""
    return resolve_backend(rearrange(x, "B L (H D) -> B H L D", H=num_heads)).name == "triton"


class EmbedND(nn.Module):
    """3-axis RoPE tables: ids [B, L, 3] float32 → pe [B, 1, L, Dh/2, 2, 2] float32."""

    def __init__(self, dim: int, theta: int, axes_dim: tuple[int, ...]):
        super().__init__()
        self.dim, self.theta, self.axes_dim = dim, theta, tuple(axes_dim)

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
    """Separate RMSNorms for queries and keys; both results are cast to v's dtype."""

    def __init__(self, dim: int):
        super().__init__()
        self.query_norm = RMSNorm(dim)
        self.key_norm = RMSNorm(dim)

    def forward(self, q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        return self.query_norm(q).to(v), self.key_norm(k).to(v)


class SelfAttention(nn.Module):
    """Parameter holder for one stream's attention: fused qkv, QK-norm, output projection.

    The joint attention itself happens in the block, which concatenates the streams.
    """

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = False):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.norm = QKNorm(dim // num_heads)
        self.proj = nn.Linear(dim, dim)

    def qkv_heads(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """x [B, L, D] → normed q, k and v, each [B, H, L, Dh]."""
        q, k, v = rearrange(self.qkv(x), "B L (K H D) -> K B H L D", K=3, H=self.num_heads)
        q, k = self.norm(q, k, v)
        return q, k, v

    def qkv_heads_rope(self, x: Tensor, pe: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Fused twin of qkv_heads that also applies RoPE (pe [B, 1, L, Dh/2, 2, 2]) to q and k,
        QK-norm, rotation and the head-major layout in one Triton pass."""
        from fluxcore.kernels import qk_norm_rope

        q, k, v = rearrange(self.qkv(x), "B L (K H D) -> K B H L D", K=3, H=self.num_heads)
        q, k = qk_norm_rope(q, k, pe, self.norm.query_norm.scale, self.norm.key_norm.scale)
        return q, k, v


class Modulation(nn.Module):
    """adaLN parameters from the conditioning vector: vec [B, D] → 2 or 1 (shift, scale, gate) triples,
    each tensor [B, 1, D]. SiLU is applied here; the trunk's vec itself is never activated."""

    def __init__(self, dim: int, double: bool):
        super().__init__()
        self.is_double = double
        self.multiplier = 6 if double else 3
        self.lin = nn.Linear(dim, self.multiplier * dim, bias=True)

    def forward(self, vec: Tensor) -> tuple[tuple[Tensor, Tensor, Tensor], ...]:
        out = self.lin(nn.functional.silu(vec))[:, None, :].chunk(self.multiplier, dim=-1)
        return tuple(out[i : i + 3] for i in range(0, self.multiplier, 3))


class DoubleStreamBlock(nn.Module):
    """Image and text streams with their own weights, joined only inside attention.

    img [B, L_img, D], txt [B, L_txt, D], vec [B, D], pe [B, 1, L_txt + L_img, Dh/2, 2, 2]
    → (img, txt) with the same shapes. Attention order is [txt, img], as are the ids in pe.
    """

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float, qkv_bias: bool = False):
        super().__init__()
        mlp_hidden = int(hidden_size * mlp_ratio)
        self.num_heads = num_heads
        self.hidden_size = hidden_size
        self.img_mod = Modulation(hidden_size, double=True)
        self.img_norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.img_attn = SelfAttention(hidden_size, num_heads, qkv_bias=qkv_bias)
        self.img_norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.img_mlp = nn.Sequential(
            nn.Linear(hidden_size, mlp_hidden, bias=True),
            nn.GELU(approximate="tanh"),
            nn.Linear(mlp_hidden, hidden_size, bias=True),
        )
        self.txt_mod = Modulation(hidden_size, double=True)
        self.txt_norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.txt_attn = SelfAttention(hidden_size, num_heads, qkv_bias=qkv_bias)
        self.txt_norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.txt_mlp = nn.Sequential(
            nn.Linear(hidden_size, mlp_hidden, bias=True),
            nn.GELU(approximate="tanh"),
            nn.Linear(mlp_hidden, hidden_size, bias=True),
        )

    def forward(self, img: Tensor, txt: Tensor, vec: Tensor, pe: Tensor) -> tuple[Tensor, Tensor]:
        if use_fused_kernels(img, self.num_heads):
            return self.forward_fused(img, txt, vec, pe)
        (img_shift1, img_scale1, img_gate1), (img_shift2, img_scale2, img_gate2) = self.img_mod(vec)
        (txt_shift1, txt_scale1, txt_gate1), (txt_shift2, txt_scale2, txt_gate2) = self.txt_mod(vec)

        img_q, img_k, img_v = self.img_attn.qkv_heads(modulate(self.img_norm1(img), img_shift1, img_scale1))
        txt_q, txt_k, txt_v = self.txt_attn.qkv_heads(modulate(self.txt_norm1(txt), txt_shift1, txt_scale1))
        attn = attention(
            torch.cat((txt_q, img_q), dim=2),
            torch.cat((txt_k, img_k), dim=2),
            torch.cat((txt_v, img_v), dim=2),
            pe,
        )
        txt_attn, img_attn = attn[:, : txt.shape[1]], attn[:, txt.shape[1] :]

        img = img + img_gate1 * self.img_attn.proj(img_attn)
        img = img + img_gate2 * self.img_mlp(modulate(self.img_norm2(img), img_shift2, img_scale2))
        txt = txt + txt_gate1 * self.txt_attn.proj(txt_attn)
        txt = txt + txt_gate2 * self.txt_mlp(modulate(self.txt_norm2(txt), txt_shift2, txt_scale2))
        return img, txt

    def forward_fused(self, img: Tensor, txt: Tensor, vec: Tensor, pe: Tensor) -> tuple[Tensor, Tensor]:
        """forward() with fused Triton kernels: LayerNorm+modulate, QK-norm+RoPE, gate+residual."""
        from fluxcore import kernels as K

        (img_shift1, img_scale1, img_gate1), (img_shift2, img_scale2, img_gate2) = self.img_mod(vec)
        (txt_shift1, txt_scale1, txt_gate1), (txt_shift2, txt_scale2, txt_gate2) = self.txt_mod(vec)
        n_txt, eps = txt.shape[1], self.img_norm1.eps

        img_x = K.adaln_modulate(img, img_shift1, img_scale1, eps)
        txt_x = K.adaln_modulate(txt, txt_shift1, txt_scale1, eps)
        img_q, img_k, img_v = self.img_attn.qkv_heads_rope(img_x, pe[:, :, n_txt:])
        txt_q, txt_k, txt_v = self.txt_attn.qkv_heads_rope(txt_x, pe[:, :, :n_txt])
        q, k, v = (torch.cat(pair, dim=2) for pair in ((txt_q, img_q), (txt_k, img_k), (txt_v, img_v)))
        attn = K.flash_attention(q, k, v)  # q and k are already rotated
        txt_attn, img_attn = attn[:, :n_txt], attn[:, n_txt:]

        img = K.gated_residual(img, img_gate1, self.img_attn.proj(img_attn))
        img_mlp = self.img_mlp(K.adaln_modulate(img, img_shift2, img_scale2, eps))
        img = K.gated_residual(img, img_gate2, img_mlp)
        txt = K.gated_residual(txt, txt_gate1, self.txt_attn.proj(txt_attn))
        txt_mlp = self.txt_mlp(K.adaln_modulate(txt, txt_shift2, txt_scale2, eps))
        txt = K.gated_residual(txt, txt_gate2, txt_mlp)
        return img, txt


class SingleStreamBlock(nn.Module):
    """One stream over x = cat(txt, img): attention and MLP in parallel from one fused linear1,
    merged by one linear2 (the attention output has no projection of its own).

    x [B, L, D], vec [B, D], pe [B, 1, L, Dh/2, 2, 2] → x [B, L, D].
    """

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.hidden_dim = hidden_size
        self.num_heads = num_heads
        self.mlp_hidden_dim = int(hidden_size * mlp_ratio)
        self.linear1 = nn.Linear(hidden_size, hidden_size * 3 + self.mlp_hidden_dim)
        self.linear2 = nn.Linear(hidden_size + self.mlp_hidden_dim, hidden_size)
        self.norm = QKNorm(hidden_size // num_heads)
        self.pre_norm = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.mlp_act = nn.GELU(approximate="tanh")
        self.modulation = Modulation(hidden_size, double=False)

    def forward(self, x: Tensor, vec: Tensor, pe: Tensor) -> Tensor:
        if use_fused_kernels(x, self.num_heads):
            return self.forward_fused(x, vec, pe)
        ((shift, scale, gate),) = self.modulation(vec)
        qkv, mlp = torch.split(
            self.linear1(modulate(self.pre_norm(x), shift, scale)),
            [3 * self.hidden_dim, self.mlp_hidden_dim],
            dim=-1,
        )
        q, k, v = rearrange(qkv, "B L (K H D) -> K B H L D", K=3, H=self.num_heads)
        q, k = self.norm(q, k, v)
        attn = attention(q, k, v, pe)
        return x + gate * self.linear2(torch.cat((attn, self.mlp_act(mlp)), dim=2))

    def forward_fused(self, x: Tensor, vec: Tensor, pe: Tensor) -> Tensor:
        """forward() with fused Triton kernels; GELU and the concatenation are one pass."""
        from fluxcore import kernels as K

        ((shift, scale, gate),) = self.modulation(vec)
        qkv, mlp = torch.split(
            self.linear1(K.adaln_modulate(x, shift, scale, self.pre_norm.eps)),
            [3 * self.hidden_dim, self.mlp_hidden_dim],
            dim=-1,
        )
        q, k, v = rearrange(qkv, "B L (K H D) -> K B H L D", K=3, H=self.num_heads)
        q, k = K.qk_norm_rope(q, k, pe, self.norm.query_norm.scale, self.norm.key_norm.scale)
        attn = K.flash_attention(q, k, v)
        return K.gated_residual(x, gate, self.linear2(K.gelu_concat(attn, mlp)))


class LastLayer(nn.Module):
    """Final adaLN (shift first, scale second — the reverse of diffusers) and projection to the
    packed velocity: x [B, L_img, D], vec [B, D] → [B, L_img, out_channels]."""

    def __init__(self, hidden_size: int, patch_size: int, out_channels: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels, bias=True)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size, bias=True))

    def forward(self, x: Tensor, vec: Tensor) -> Tensor:
        shift, scale = self.adaLN_modulation(vec).chunk(2, dim=1)
        return self.linear(modulate(self.norm_final(x), shift[:, None, :], scale[:, None, :]))
