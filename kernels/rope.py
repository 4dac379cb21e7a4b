"""Fused QK-RMSNorm + adjacent-pair RoPE + layout change, one pass over q and k.

    qk_norm_rope(q, k, pe, q_scale=None, k_scale=None, eps=1e-6) -> (q', k')

q, k: [B, H, L, D] with any strides (typically views of a fused qkv projection's output);
pe: [B, 1, L, D/2, 2, 2] float32 rotation matrices. With scales, each of q and k is first
RMS-normalised over D in float32 and multiplied by its learnable scale [D]; then channel pairs
(2j, 2j+1) are rotated by pe in float32. Returns contiguous [B, H, L, D] tensors in q's dtype.

Rounding follows the PyTorch reference step by step (normalised x cast to the input dtype, times
the scale, cast again, rotated in float32, cast once more), so on a GPU bfloat16 results should
match it to within an ulp (float32 summation order).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor
from torch.library import triton_op, wrap_triton

from ._common import INTERPRET, TILE, check_inputs, empty, next_pow2, warps_for


@triton.jit
def _norm_rope_tile(
    X, S, O, stride_l, offs_l, row_ok, p00, p01, p10, p11, eps,
    BLOCK_L: tl.constexpr, HALF: tl.constexpr, NORM: tl.constexpr,
):  # fmt: skip
    """Normalise (optionally) and rotate a [BLOCK_L, D] tile of one head; rows are read and
    written whole, and split into even (x0) and odd (x1) channels in registers."""
    dt = O.dtype.element_ty
    c = tl.arange(0, 2 * HALF)
    x = tl.load(X + offs_l[:, None] * stride_l + c[None, :], mask=row_ok, other=0.0).to(tl.float32)
    if NORM:
        rrms = tl.rsqrt(tl.sum(x * x, 1) / (2 * HALF) + eps)
        scale = tl.load(S + c).to(tl.float32)
        x = ((x * rrms[:, None]).to(dt).to(tl.float32) * scale[None, :]).to(dt).to(tl.float32)
    x0, x1 = tl.split(tl.reshape(x, (BLOCK_L, HALF, 2)))
    out = tl.join(p00 * x0 + p01 * x1, p10 * x0 + p11 * x1)  # [BLOCK_L, HALF, 2]
    out = tl.reshape(out, (BLOCK_L, 2 * HALF))
    tl.store(O + offs_l[:, None] * (2 * HALF) + c[None, :], out.to(dt), mask=row_ok)


@triton.jit
def _qk_norm_rope_kernel(
    Q, K, QS, KS, PE, QO, KO,
    stride_qb, stride_qh, stride_ql,
    stride_kb, stride_kh, stride_kl,
    stride_pb, stride_pl,
    H, L, eps,
    HALF: tl.constexpr, BLOCK_L: tl.constexpr, NORM: tl.constexpr,
):  # fmt: skip
    """Program (l, b·H + h) owns BLOCK_L positions of head h in batch b, for q and for k, so the
    rotation matrices are read once for both."""
    pid_l = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    offs_l = pid_l * BLOCK_L + tl.arange(0, BLOCK_L)
    row_ok = offs_l[:, None] < L
    # pe[b, 0, l] is HALF contiguous 2×2 matrices [[p00, p01], [p10, p11]]:
    # out0 = p00·x0 + p01·x1, out1 = p10·x0 + p11·x1
    e = tl.arange(0, 4 * HALF)
    pe = tl.load(PE + b * stride_pb + offs_l[:, None] * stride_pl + e[None, :], mask=row_ok, other=0.0)
    col0, col1 = tl.split(tl.reshape(pe, (BLOCK_L, HALF, 2, 2)))  # [p00, p10] and [p01, p11]
    p00, p10 = tl.split(col0)
    p01, p11 = tl.split(col1)
    out_offset = bh.to(tl.int64) * L * (2 * HALF)
    _norm_rope_tile(
        Q + b * stride_qb + h * stride_qh, QS, QO + out_offset, stride_ql, offs_l, row_ok,
        p00, p01, p10, p11, eps, BLOCK_L, HALF, NORM,
    )  # fmt: skip
    _norm_rope_tile(
        K + b * stride_kb + h * stride_kh, KS, KO + out_offset, stride_kl, offs_l, row_ok,
        p00, p01, p10, p11, eps, BLOCK_L, HALF, NORM,
    )  # fmt: skip


def qk_norm_rope_launch(length: int, head_dim: int) -> dict:
    """The kernel's meta-parameters but NORM (HALF, BLOCK_L, num_warps) for L = `length` positions
    of head dim `head_dim`: up to TILE elements of a head per program, at least 16 positions."""
    block_l = min(max(16, next_pow2(length)), max(16, TILE // head_dim))
    return {"HALF": head_dim // 2, "BLOCK_L": block_l, "num_warps": warps_for(block_l * head_dim)}


@triton_op("fluxcore::qk_norm_rope", mutates_args=())
def qk_norm_rope(
    q: Tensor,
    k: Tensor,
    pe: Tensor,
    q_scale: Tensor | None = None,
    k_scale: Tensor | None = None,
    eps: float = 1e-6,
) -> tuple[Tensor, Tensor]:
    """(RMSNorm(q)·q_scale, RMSNorm(k)·k_scale) if scales are given, then RoPE by pe.

    q, k [B, H, L, D] any strides; pe [B, 1, L, D/2, 2, 2] float32 (batch may be broadcast);
    q_scale, k_scale [D] or None (both or neither). Returns contiguous [B, H, L, D] in q's dtype.
    """
    check_inputs("qk_norm_rope", q, k)
    B, H, L, D = q.shape
    if k.shape != q.shape:
        raise ValueError(f"qk_norm_rope: q and k must share one shape, found {q.shape} and {k.shape}")
    if D % 2 or D & (D - 1):
        raise ValueError(f"qk_norm_rope: head dim must be a power of two, found {D}")
    if pe.dtype != torch.float32 or pe.shape[1:] != (1, L, D // 2, 2, 2) or pe.shape[0] not in (1, B):
        raise ValueError(
            f"qk_norm_rope: expected float32 pe of shape [{B}, 1, {L}, {D // 2}, 2, 2], "
            f"found {pe.dtype} {tuple(pe.shape)}"
        )
    if (q_scale is None) != (k_scale is None):
        raise ValueError("qk_norm_rope: give both q_scale and k_scale, or neither")
    norm = q_scale is not None
    if norm and (q_scale.shape != (D,) or k_scale.shape != (D,)):
        raise ValueError(
            f"qk_norm_rope: scales must have shape [{D}], found {q_scale.shape}, {k_scale.shape}"
        )
    q, k = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k))
    if pe.stride()[-3:] != (4, 2, 1):
        pe = pe.contiguous()
    if norm:
        q_scale, k_scale = q_scale.contiguous(), k_scale.contiguous()
    else:  # placeholders: the kernel never reads them when NORM is off
        q_scale = k_scale = pe
    q_out = empty(B, H, L, D, like=q)
    k_out = empty(B, H, L, D, like=q)
    meta = qk_norm_rope_launch(L, D)
    grid = (triton.cdiv(L, meta["BLOCK_L"]), B * H)
    wrap_triton(_qk_norm_rope_kernel)[grid](
        q, k, q_scale, k_scale, pe, q_out, k_out,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        pe.stride(0) if pe.shape[0] == B else 0, pe.stride(2),
        H, L, eps,
        NORM=norm, **meta,
    )  # fmt: skip
    return q_out, k_out


def qk_norm_rope_reference(
    q: Tensor,
    k: Tensor,
    pe: Tensor,
    q_scale: Tensor | None = None,
    k_scale: Tensor | None = None,
    eps: float = 1e-6,
) -> tuple[Tensor, Tensor]:
    """Pure-PyTorch qk_norm_rope, the reference's operations in the reference's order."""

    def norm(x: Tensor, scale: Tensor) -> Tensor:
        xf = x.float()
        rrms = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
        return ((xf * rrms).to(x.dtype) * scale).to(x.dtype)

    def rotate(x: Tensor) -> Tensor:
        pairs = x.float().unflatten(-1, (-1, 1, 2))  # [B, H, L, D/2, 1, 2]
        return (pe[..., 0] * pairs[..., 0] + pe[..., 1] * pairs[..., 1]).flatten(-2).to(x.dtype)

    if q_scale is not None:
        q, k = norm(q, q_scale), norm(k, k_scale)
    return rotate(q).contiguous(), rotate(k).contiguous()


if INTERPRET:  # interpreted kernels cannot run on fake tensors; torch.compile gets shapes from the reference
    qk_norm_rope.register_fake(qk_norm_rope_reference)
