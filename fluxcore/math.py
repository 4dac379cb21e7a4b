"""Pure functions of the FLUX transformer: no parameters, no state.

These are the reference's fp32 islands (timestep sinusoid, RoPE, RMSNorm) and the adaLN
"modulate" step. Layers call them; kernels in fluxcore.kernels are checked against them.
"""

from __future__ import annotations

import math

import torch
from einops import rearrange
from torch import Tensor


def timestep_embedding(
    t: Tensor, dim: int, max_period: float = 10_000, time_factor: float = 1000.0
) -> Tensor:
    """Sinusoidal embedding of flow times, cos first.

    t: [B] in [0, 1] (any float dtype). The ×1000 happens in t's own dtype, as in the reference,
    so a bf16 t is rounded before scaling. Returns [B, dim] in t's dtype (float32 inside).
    """
    t = time_factor * t
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t[:, None].float() * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    if torch.is_floating_point(t):
        emb = emb.to(t.dtype)
    return emb


def rope(pos: Tensor, dim: int, theta: float) -> Tensor:
    """Rotation matrices for one position axis.

    pos: [B, L] positions (float32). Returns [B, L, dim/2, 2, 2] float32 with
    [[cos, -sin], [sin, cos]] of angle pos·theta^(-2k/dim), k = 0 .. dim/2 - 1.
    """
    assert dim % 2 == 0, f"RoPE dim must be even, got {dim}"
    scale = torch.arange(0, dim, 2, dtype=pos.dtype, device=pos.device) / dim
    omega = 1.0 / (theta**scale)
    angle = torch.einsum("...n,d->...nd", pos, omega)
    cos, sin = torch.cos(angle), torch.sin(angle)
    out = torch.stack([cos, -sin, sin, cos], dim=-1)
    return rearrange(out, "b n d (i j) -> b n d i j", i=2, j=2).float()


def embed_positions(ids: Tensor, axes_dim: tuple[int, ...], theta: float) -> Tensor:
    """RoPE for 3-axis position ids.

    ids: [B, L, n_axes] (index, row, col). Returns pe [B, 1, L, head_dim/2, 2, 2] float32:
    axis i owns axes_dim[i]/2 consecutive pair slots, concatenated in axis order.
    """
    pe = torch.cat([rope(ids[..., i], d, theta) for i, d in enumerate(axes_dim)], dim=-3)
    return pe.unsqueeze(1)


def apply_rope(x: Tensor, pe: Tensor) -> Tensor:
    """Rotate adjacent channel pairs (2j, 2j+1) of x by pe, in float32.

    x: [B, H, L, D]; pe: [B, 1, L, D/2, 2, 2]. Returns x's shape and dtype.
    """
    x_ = x.float().reshape(*x.shape[:-1], -1, 1, 2)
    out = pe[..., 0] * x_[..., 0] + pe[..., 1] * x_[..., 1]
    return out.reshape(*x.shape).type_as(x)


def rms_norm(x: Tensor, scale: Tensor, eps: float = 1e-6) -> Tensor:
    """x · rsqrt(mean(x², -1) + eps) in float32, cast back to x's dtype, then × scale."""
    x_dtype = x.dtype
    xf = x.float()
    rrms = torch.rsqrt(torch.mean(xf * xf, dim=-1, keepdim=True) + eps)
    return (xf * rrms).to(x_dtype) * scale


def modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    """adaLN: (1 + scale) · x + shift; shift/scale broadcast over the sequence ([B, 1, D])."""
    return (1 + scale) * x + shift
