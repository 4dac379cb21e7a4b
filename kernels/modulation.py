"""Fused elementwise passes of the FLUX blocks, each one read and one write of the activations:

    adaln_modulate(x, shift, scale)  LayerNorm (no affine, eps 1e-6), then (1 + scale)·x + shift
    gated_residual(x, gate, y)       x + gate·y
    gelu_concat(a, h)                cat(a, GELU_tanh(h)) along channels (the single block's
                                     linear2 input: GELU and the concatenation in one pass)

x, y, a, h: [B, L, C] with any batch/row strides (channels contiguous); shift, scale, gate:
[B, 1, C] (batch 1 broadcasts). All inputs share one dtype; math is float32 and the result is
rounded to the input dtype wherever the PyTorch reference rounds, so bfloat16 outputs match it.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor
from torch.library import triton_op, wrap_triton

from ._common import INTERPRET, TILE, check_inputs, empty, next_pow2, warps_for


@triton.jit
def _row_coords(BLOCK_R: tl.constexpr, L):
    """This program's rows of the flattened [B·L, C] and their (batch, position), as int64 for the
    address arithmetic. The division is done in int32 (B·L is an int32 argument): a 64-bit integer
    division compiles to a subroutine call on NVIDIA GPUs, whose calling convention made ptxas
    spill registers in these kernels."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    return rows.to(tl.int64), (rows // L).to(tl.int64), (rows % L).to(tl.int64)


@triton.jit
def _adaln_write(xc, rstd, SHIFT, SCALE, O, r, b, c, ok, stride_shb, stride_scb, C):
    """Store (1 + scale)·(xc·rstd) + shift at rows r, channels c (xc: x minus the row mean),
    rounding where the reference does."""
    dt = O.dtype.element_ty
    n = (xc * rstd[:, None]).to(dt).to(tl.float32)
    scale = tl.load(SCALE + (b * stride_scb)[:, None] + c[None, :], mask=ok, other=0.0).to(tl.float32)
    shift = tl.load(SHIFT + (b * stride_shb)[:, None] + c[None, :], mask=ok, other=0.0).to(tl.float32)
    y = ((1.0 + scale).to(dt).to(tl.float32) * n).to(dt).to(tl.float32) + shift
    tl.store(O + r[:, None] * C + c[None, :], y.to(dt), mask=ok)


@triton.jit
def _adaln_kernel(
    X, SHIFT, SCALE, O, stride_xb, stride_xl, stride_shb, stride_scb, R, L, C, eps,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, WHOLE_ROW: tl.constexpr,
):  # fmt: skip
    """BLOCK_R rows per program. WHOLE_ROW (BLOCK_C ≥ C): each row sits in registers, so its
    statistics need one read. Otherwise (rows wider than a program holds without spilling) the
    program walks the row in BLOCK_C chunks three times: the mean, the centred sum of squares, and
    the output, the same formulas in float32 with partial sums kept per lane."""
    r, b, l = _row_coords(BLOCK_R, L)
    c = tl.arange(0, BLOCK_C)
    row_ok = r[:, None] < R
    x_rows = X + (b * stride_xb + l * stride_xl)[:, None]
    if WHOLE_ROW:
        ok = row_ok & (c[None, :] < C)
        x = tl.load(x_rows + c[None, :], mask=ok, other=0.0).to(tl.float32)
        mean = tl.sum(x, 1) / C
        xc = tl.where(ok, x - mean[:, None], 0.0)
        rstd = tl.rsqrt(tl.sum(xc * xc, 1) / C + eps)
        _adaln_write(xc, rstd, SHIFT, SCALE, O, r, b, c, ok, stride_shb, stride_scb, C)
    else:
        acc = tl.zeros((BLOCK_R, BLOCK_C), tl.float32)
        for start in range(0, C, BLOCK_C):
            ok = row_ok & (start + c[None, :] < C)
            acc += tl.load(x_rows + start + c[None, :], mask=ok, other=0.0).to(tl.float32)
        mean = tl.sum(acc, 1) / C
        acc = tl.zeros((BLOCK_R, BLOCK_C), tl.float32)
        for start in range(0, C, BLOCK_C):
            ok = row_ok & (start + c[None, :] < C)
            x = tl.load(x_rows + start + c[None, :], mask=ok, other=0.0).to(tl.float32)
            xc = tl.where(ok, x - mean[:, None], 0.0)
            acc += xc * xc
        rstd = tl.rsqrt(tl.sum(acc, 1) / C + eps)
        for start in range(0, C, BLOCK_C):
            ok = row_ok & (start + c[None, :] < C)
            x = tl.load(x_rows + start + c[None, :], mask=ok, other=0.0).to(tl.float32)
            xc = tl.where(ok, x - mean[:, None], 0.0)
            _adaln_write(xc, rstd, SHIFT, SCALE, O, r, b, start + c, ok, stride_shb, stride_scb, C)


@triton.jit
def _gated_residual_kernel(
    X, G, Y, O, stride_xb, stride_xl, stride_gb, stride_yb, stride_yl, R, L, C,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    """Program (i, j) owns rows i·BLOCK_R.. and channels j·BLOCK_C.. of the flattened [B·L, C]."""
    dt = O.dtype.element_ty
    r, b, l = _row_coords(BLOCK_R, L)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    ok = (r[:, None] < R) & (c[None, :] < C)
    x = tl.load(X + (b * stride_xb + l * stride_xl)[:, None] + c[None, :], mask=ok).to(tl.float32)
    g = tl.load(G + (b * stride_gb)[:, None] + c[None, :], mask=ok).to(tl.float32)
    y = tl.load(Y + (b * stride_yb + l * stride_yl)[:, None] + c[None, :], mask=ok).to(tl.float32)
    gy = (g * y).to(dt).to(tl.float32)  # the reference rounds gate·y before adding
    tl.store(O + r[:, None] * C + c[None, :], (x + gy).to(dt), mask=ok)


@triton.jit
def _gelu_concat_kernel(
    A, Hid, O, stride_ab, stride_al, stride_hb, stride_hl, R, L, CA, CH,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    """Program (i, j) owns rows i·BLOCK_R.. and output channels j·BLOCK_C.. of [B·L, CA + CH]."""
    dt = O.dtype.element_ty
    r, b, l = _row_coords(BLOCK_R, L)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    row_ok = r[:, None] < R
    in_a = row_ok & (c[None, :] < CA)
    in_h = row_ok & (c[None, :] >= CA) & (c[None, :] < CA + CH)
    a = tl.load(A + (b * stride_ab + l * stride_al)[:, None] + c[None, :], mask=in_a, other=0.0)
    h_ptrs = Hid + (b * stride_hb + l * stride_hl)[:, None] + (c[None, :] - CA)
    h = tl.load(h_ptrs, mask=in_h, other=0.0).to(tl.float32)
    # 0.5·h·(1 + tanh(u)) = h·sigmoid(2u), u = √(2/π)·(h + 0.044715·h³); no tanh needed
    gelu = h * tl.sigmoid(1.5957691216057308 * (h + 0.044715 * h * h * h))
    out = tl.where(in_a, a.to(tl.float32), gelu)
    tl.store(O + r[:, None] * (CA + CH) + c[None, :], out.to(dt), mask=in_a | in_h)


# The widest row (elements, a power of two) an adaLN program holds whole in registers: 8192 values
# over 16 warps, 16 per thread (as at FLUX's width). Twice that compiled to up to 128 registers in
# float32 (the most 512 threads can have: no margin), so wider rows are walked in chunks.
ADALN_ROW_MAX = 8192


def adaln_launch(columns: int) -> dict:
    """The adaLN kernel's meta-parameters (constexprs and num_warps) for rows of `columns` channels."""
    block_c = next_pow2(columns)
    if block_c <= ADALN_ROW_MAX:  # whole rows: the statistics need every channel
        block_r = max(1, min(16, TILE // block_c))
        warps = warps_for(block_r * block_c)
        return {"BLOCK_R": block_r, "BLOCK_C": block_c, "WHOLE_ROW": True, "num_warps": warps}
    return {"BLOCK_R": 1, "BLOCK_C": TILE, "WHOLE_ROW": False, "num_warps": warps_for(TILE)}


def elementwise_launch(columns: int) -> dict:
    """Meta-parameters (BLOCK_R, BLOCK_C, num_warps) of gated_residual and gelu_concat for rows of
    `columns` channels: a [BLOCK_R, BLOCK_C] tile of TILE elements, at most 1024 channels wide."""
    block_c = min(1024, next_pow2(columns))
    block_r = max(1, TILE // block_c)
    return {"BLOCK_R": block_r, "BLOCK_C": block_c, "num_warps": warps_for(block_r * block_c)}


def _rows(name: str, x: Tensor) -> Tensor:
    if x.ndim != 3:
        raise ValueError(f"{name}: expected [B, L, C], found shape {tuple(x.shape)}")
    return x if x.stride(-1) == 1 else x.contiguous()


def _per_batch(name: str, t: Tensor, B: int, C: int) -> tuple[Tensor, int]:
    """A [B, 1, C] (or [1, 1, C]) modulation tensor and its batch stride (0 when broadcast)."""
    if t.ndim != 3 or t.shape[1] != 1 or t.shape[2] != C or t.shape[0] not in (1, B):
        raise ValueError(f"{name}: expected a [{B}, 1, {C}] modulation tensor, found {tuple(t.shape)}")
    t = t if t.stride(-1) == 1 else t.contiguous()
    return t, (t.stride(0) if t.shape[0] == B else 0)


@triton_op("fluxcore::adaln_modulate", mutates_args=())
def adaln_modulate(x: Tensor, shift: Tensor, scale: Tensor, eps: float = 1e-6) -> Tensor:
    """(1 + scale)·LayerNorm(x) + shift. x [B, L, C]; shift, scale [B, 1, C] → contiguous [B, L, C]."""
    check_inputs("adaln_modulate", x, shift, scale)
    x = _rows("adaln_modulate", x)
    B, L, C = x.shape
    shift, stride_sh = _per_batch("adaln_modulate", shift, B, C)
    scale, stride_sc = _per_batch("adaln_modulate", scale, B, C)
    out = empty(B, L, C, like=x)
    meta = adaln_launch(C)
    wrap_triton(_adaln_kernel)[(triton.cdiv(B * L, meta["BLOCK_R"]),)](
        x, shift, scale, out, x.stride(0), x.stride(1), stride_sh, stride_sc, B * L, L, C, eps, **meta,
    )  # fmt: skip
    return out


@triton_op("fluxcore::gated_residual", mutates_args=())
def gated_residual(x: Tensor, gate: Tensor, y: Tensor) -> Tensor:
    """x + gate·y. x, y [B, L, C]; gate [B, 1, C] → contiguous [B, L, C]."""
    check_inputs("gated_residual", x, gate, y)
    x, y = _rows("gated_residual", x), _rows("gated_residual", y)
    B, L, C = x.shape
    if y.shape != x.shape:
        raise ValueError(f"gated_residual: x and y must share one shape, found {x.shape} and {y.shape}")
    gate, stride_g = _per_batch("gated_residual", gate, B, C)
    out = empty(B, L, C, like=x)
    meta = elementwise_launch(C)
    grid = (triton.cdiv(B * L, meta["BLOCK_R"]), triton.cdiv(C, meta["BLOCK_C"]))
    wrap_triton(_gated_residual_kernel)[grid](
        x, gate, y, out, x.stride(0), x.stride(1), stride_g, y.stride(0), y.stride(1), B * L, L, C, **meta,
    )  # fmt: skip
    return out


@triton_op("fluxcore::gelu_concat", mutates_args=())
def gelu_concat(a: Tensor, h: Tensor) -> Tensor:
    """cat(a, GELU_tanh(h), dim=-1). a [B, L, CA], h [B, L, CH] → contiguous [B, L, CA + CH]."""
    check_inputs("gelu_concat", a, h)
    a, h = _rows("gelu_concat", a), _rows("gelu_concat", h)
    B, L, CA = a.shape
    if h.shape[:2] != (B, L):
        raise ValueError(f"gelu_concat: a and h must share [B, L], found {a.shape} and {h.shape}")
    CH = h.shape[2]
    out = empty(B, L, CA + CH, like=a)
    meta = elementwise_launch(CA + CH)
    grid = (triton.cdiv(B * L, meta["BLOCK_R"]), triton.cdiv(CA + CH, meta["BLOCK_C"]))
    wrap_triton(_gelu_concat_kernel)[grid](
        a, h, out, a.stride(0), a.stride(1), h.stride(0), h.stride(1), B * L, L, CA, CH, **meta,
    )  # fmt: skip
    return out


# --- pure-PyTorch references (the blocks' plain path computes exactly these) --------------------


def adaln_modulate_reference(x: Tensor, shift: Tensor, scale: Tensor, eps: float = 1e-6) -> Tensor:
    return (1 + scale) * torch.nn.functional.layer_norm(x, x.shape[-1:], eps=eps) + shift


def gated_residual_reference(x: Tensor, gate: Tensor, y: Tensor) -> Tensor:
    return x + gate * y


def gelu_concat_reference(a: Tensor, h: Tensor) -> Tensor:
    return torch.cat((a, torch.nn.functional.gelu(h, approximate="tanh")), dim=-1)


if INTERPRET:  # interpreted kernels cannot run on fake tensors; torch.compile gets shapes from the reference
    adaln_modulate.register_fake(adaln_modulate_reference)
    gated_residual.register_fake(gated_residual_reference)
    gelu_concat.register_fake(gelu_concat_reference)
