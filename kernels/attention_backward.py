"""Flash attention backward for FLUX (FlashAttention-2 style): the kernels, their tile tables and the
PyTorch reference. kernels/attention.py launches them and wires them into autograd.

    delta = rowsum(dO · O)                                  _attention_bwd_preprocess_kernel
    dK, dV: each program owns BLOCK_N keys, loops over queries    _attention_bwd_dkdv_kernel
    dQ:     each program owns BLOCK_M queries, loops over keys    _attention_bwd_dq_kernel

With P = exp(q kᵀ/√D − lse) recomputed from the forward's log-sum-exp:
    dV = Pᵀ dO,   dP = dO Vᵀ,   dS = P ∘ (dP − delta),   dQ = dS K / √D,   dK = dSᵀ Q / √D.
Two passes (dK/dV, then dQ) instead of one pass with atomic adds into dQ: every element is written
by one program in a fixed order, so gradients are bit-for-bit deterministic.

Layouts: q, k, v [B, H, L, D] with any strides (channel dim contiguous); O and dO [B, L, H·D] (the
forward's output layout, channel dim contiguous); lse, delta [B, H, L] float32 contiguous; dq, dk,
dv [B, H, L, D] contiguous in the input dtype. Accumulation is float32. As in the forward, P and dS
are rounded to the input dtype before their matmuls; float32 inputs use true float32 products.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from torch import Tensor

LOG2E = 1.4426950408889634
_LOG2E = tl.constexpr(LOG2E)  # kernels may read only constexpr globals


@triton.jit
def _dot_over_head_dim(
    acc, a_ptrs, b_ptrs, b_mask,
    HEAD_DIM: tl.constexpr, D_CHUNK: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    """acc + a @ b for a [R, HEAD_DIM], b [HEAD_DIM, C], both read from memory D_CHUNK channels at
    a time: a_ptrs [R, D_CHUNK] and b_ptrs [D_CHUNK, C] point at the first slice (channels are
    contiguous in both; a's rows are always in bounds, b's columns are masked by b_mask unless it is
    None). Tiles with D_CHUNK < HEAD_DIM use this instead of holding a loop-invariant [R, HEAD_DIM]
    operand in registers, which makes ptxas spill: every float32 tile (its products run on CUDA
    cores as FMAs, operands in registers whole) and the large-head-dim backward tiles."""
    for d0 in tl.static_range(0, HEAD_DIM, D_CHUNK):
        a = tl.load(a_ptrs + d0)
        if b_mask is None:
            b = tl.load(b_ptrs + d0)
        else:
            b = tl.load(b_ptrs + d0, mask=b_mask, other=0.0)
        if UPCAST:  # the interpreter cannot multiply bfloat16 tiles; the values are exact in float32
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
    return acc


@triton.jit
def _attention_bwd_preprocess_kernel(
    Out, DO, Delta,
    stride_ob, stride_ol, stride_dob, stride_dol,
    H, L,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr,
):  # fmt: skip
    """Program (m, b·H + h): delta[b, h, rows] = Σ_d O·dO in float32 for BLOCK_M rows of head h."""
    start_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = h * HEAD_DIM + tl.arange(0, HEAD_DIM)
    row_ok = offs_m < L
    o = tl.load(Out + b * stride_ob + offs_m[:, None] * stride_ol + offs_d[None, :], mask=row_ok[:, None])
    do = tl.load(DO + b * stride_dob + offs_m[:, None] * stride_dol + offs_d[None, :], mask=row_ok[:, None])
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(Delta + bh.to(tl.int64) * L + offs_m, delta, mask=row_ok)


@triton.jit
def _dkdv_block(
    dk, dv, k, v, k_slices, v_slices, qT_ptrs, q_ptrs, do_ptrs, doT_ptrs, lse_ptrs, delta_ptrs, start_m, L,
    qk_scale,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, D_CHUNK: tl.constexpr,
    MASKED: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    """Add one query block's share to this program's dK, dV [BLOCK_N, HEAD_DIM]. Works in the
    transposed frame (sᵀ = k qᵀ, [BLOCK_N, BLOCK_M]) so that no [BLOCK_M, BLOCK_N] tile needs a
    transpose. MASKED only for the ragged last query block: its rows past L read q = dO = lse =
    delta = 0, so their pᵀ column is 1 but dO = 0 and dSᵀ = 1·(0 − 0) = 0 — they add nothing, with
    no extra mask. The two paths order their loads differently: each order is the one that
    compiled without spills for its tiles (tests/test_kernels_aot.py)."""
    q_ok = (start_m + tl.arange(0, BLOCK_M)) < L
    if D_CHUNK >= HEAD_DIM:
        # k, v held in registers. Each load just before its first use (qᵀ, lse; dO; delta).
        if MASKED:
            qT = tl.load(qT_ptrs, mask=q_ok[None, :], other=0.0)
            lse2 = tl.load(lse_ptrs, mask=q_ok, other=0.0) * _LOG2E
        else:
            qT = tl.load(qT_ptrs)
            lse2 = tl.load(lse_ptrs) * _LOG2E
        if UPCAST:  # the interpreter cannot multiply bfloat16 tiles; the values are exact in float32
            qT = qT.to(tl.float32)
        pT = tl.math.exp2(tl.dot(k, qT, input_precision=PRECISION) * qk_scale - lse2[None, :])
        if MASKED:
            do = tl.load(do_ptrs, mask=q_ok[:, None], other=0.0)
        else:
            do = tl.load(do_ptrs)
        dt = do.dtype
        if UPCAST:
            do = do.to(tl.float32)
            dv = tl.dot(pT.to(dt).to(tl.float32), do, dv, input_precision=PRECISION)
        else:  # as in the forward, P (and dS below) are rounded to the input dtype for the matmuls
            dv = tl.dot(pT.to(dt), do, dv, input_precision=PRECISION)
        if MASKED:
            delta = tl.load(delta_ptrs, mask=q_ok, other=0.0)
        else:
            delta = tl.load(delta_ptrs)
        dsT = pT * (tl.dot(v, tl.trans(do), input_precision=PRECISION) - delta[None, :])
        q = tl.trans(qT)
    else:
        # k, v, qᵀ and dOᵀ re-read in head-dim slices (see _dot_over_head_dim); q, dO read whole.
        zero = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
        if MASKED:
            lse2 = tl.load(lse_ptrs, mask=q_ok, other=0.0) * _LOG2E
            delta = tl.load(delta_ptrs, mask=q_ok, other=0.0)
            do = tl.load(do_ptrs, mask=q_ok[:, None], other=0.0)
            q = tl.load(q_ptrs, mask=q_ok[:, None], other=0.0)
            qmask = q_ok[None, :]
        else:
            lse2 = tl.load(lse_ptrs) * _LOG2E
            delta = tl.load(delta_ptrs)
            do = tl.load(do_ptrs)
            q = tl.load(q_ptrs)
            qmask = None
        dt = do.dtype
        sT = _dot_over_head_dim(zero, k_slices, qT_ptrs, qmask, HEAD_DIM, D_CHUNK, UPCAST, PRECISION)
        dpT = _dot_over_head_dim(zero, v_slices, doT_ptrs, qmask, HEAD_DIM, D_CHUNK, UPCAST, PRECISION)
        pT = tl.math.exp2(sT * qk_scale - lse2[None, :])
        dsT = pT * (dpT - delta[None, :])
        if UPCAST:
            do = do.to(tl.float32)
            q = q.to(tl.float32)
            dv = tl.dot(pT.to(dt).to(tl.float32), do, dv, input_precision=PRECISION)
        else:
            dv = tl.dot(pT.to(dt), do, dv, input_precision=PRECISION)
    dsT = dsT.to(dt)
    if UPCAST:
        dsT = dsT.to(tl.float32)
    dk = tl.dot(dsT, q, dk, input_precision=PRECISION)
    return dk, dv


@triton.jit
def _attention_bwd_dkdv_kernel(
    Q, K, V, DO, LSE, Delta, DK, DV,
    stride_qb, stride_qh, stride_ql,
    stride_kb, stride_kh, stride_kl,
    stride_vb, stride_vh, stride_vl,
    stride_dob, stride_dol,
    H, L, qk_scale, sm_scale,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, D_CHUNK: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    """Program (n, b·H + h) owns BLOCK_N keys of head h in batch b and loops over every query block."""
    start_n = tl.program_id(0) * BLOCK_N
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    key_ok = offs_n[:, None] < L
    Q += b * stride_qb + h * stride_qh
    K += b * stride_kb + h * stride_kh
    V += b * stride_vb + h * stride_vh
    DO += b * stride_dob + h * HEAD_DIM
    LSE += bh.to(tl.int64) * L
    Delta += bh.to(tl.int64) * L

    if D_CHUNK >= HEAD_DIM:
        # Keys past L are read as zeros; their dK, dV rows are computed but never stored.
        k = tl.load(K + offs_n[:, None] * stride_kl + offs_d[None, :], mask=key_ok, other=0.0)
        v = tl.load(V + offs_n[:, None] * stride_vl + offs_d[None, :], mask=key_ok, other=0.0)
        if UPCAST:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        # qᵀ is read transposed ([HEAD_DIM, BLOCK_M]) so that sᵀ = k qᵀ needs no tl.trans.
        qT_ptrs = Q + offs_m[None, :] * stride_ql + offs_d[:, None]
        doT_ptrs = DO  # unused
        k_slices = K
        v_slices = V
    else:
        offs_c = tl.arange(0, D_CHUNK)
        # The key rows are clamped instead of masked: rows past L are never stored.
        rows = tl.minimum(offs_n, L - 1)
        k_slices = K + rows[:, None] * stride_kl + offs_c[None, :]
        v_slices = V + rows[:, None] * stride_vl + offs_c[None, :]
        k = None  # not held in registers
        v = None
        qT_ptrs = Q + offs_m[None, :] * stride_ql + offs_c[:, None]
        doT_ptrs = DO + offs_m[None, :] * stride_dol + offs_c[:, None]
    q_ptrs = Q + offs_m[:, None] * stride_ql + offs_d[None, :]
    do_ptrs = DO + offs_m[:, None] * stride_dol + offs_d[None, :]

    dk = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    m_full = L - L % BLOCK_M  # full query blocks need no bounds checks
    for start_m in range(0, m_full, BLOCK_M):
        dk, dv = _dkdv_block(
            dk, dv, k, v, k_slices, v_slices,
            qT_ptrs + start_m * stride_ql, q_ptrs + start_m * stride_ql, do_ptrs + start_m * stride_dol,
            doT_ptrs + start_m * stride_dol, LSE + start_m + offs_m, Delta + start_m + offs_m, start_m, L,
            qk_scale, BLOCK_M, BLOCK_N, HEAD_DIM, D_CHUNK, False, UPCAST, PRECISION,
        )  # fmt: skip
    if m_full < L:
        dk, dv = _dkdv_block(
            dk, dv, k, v, k_slices, v_slices,
            qT_ptrs + m_full * stride_ql, q_ptrs + m_full * stride_ql, do_ptrs + m_full * stride_dol,
            doT_ptrs + m_full * stride_dol, LSE + m_full + offs_m, Delta + m_full + offs_m, m_full, L,
            qk_scale, BLOCK_M, BLOCK_N, HEAD_DIM, D_CHUNK, True, UPCAST, PRECISION,
        )  # fmt: skip

    out = bh.to(tl.int64) * L * HEAD_DIM + offs_n[:, None] * HEAD_DIM + offs_d[None, :]
    tl.store(DK + out, (dk * sm_scale).to(DK.dtype.element_ty), mask=key_ok)
    tl.store(DV + out, dv.to(DV.dtype.element_ty), mask=key_ok)


@triton.jit
def _dq_block(
    dq, q, do, lse2, delta, kT_ptrs, vT_ptrs, k_ptrs, q_slices, do_slices, start_n, L, qk_scale,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, D_CHUNK: tl.constexpr,
    MASKED: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    """Add one key block's share to this program's dQ [BLOCK_M, HEAD_DIM]; MASKED only for the
    ragged last key block."""
    k_ok = (start_n + tl.arange(0, BLOCK_N)) < L
    if D_CHUNK >= HEAD_DIM:  # q, dO held in registers
        if MASKED:
            kT = tl.load(kT_ptrs, mask=k_ok[None, :], other=0.0)
            vT = tl.load(vT_ptrs, mask=k_ok[None, :], other=0.0)
        else:
            kT = tl.load(kT_ptrs)
            vT = tl.load(vT_ptrs)
        dt = kT.dtype
        if UPCAST:
            kT = kT.to(tl.float32)
            vT = vT.to(tl.float32)
        s = tl.dot(q, kT, input_precision=PRECISION)
        dp = tl.dot(do, vT, input_precision=PRECISION)
        k = tl.trans(kT)
    else:  # q, dO, kᵀ and vᵀ re-read in head-dim slices (see _dot_over_head_dim)
        if MASKED:
            kmask = k_ok[None, :]
            k = tl.load(k_ptrs, mask=k_ok[:, None], other=0.0)
        else:
            kmask = None
            k = tl.load(k_ptrs)
        zero = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        s = _dot_over_head_dim(zero, q_slices, kT_ptrs, kmask, HEAD_DIM, D_CHUNK, UPCAST, PRECISION)
        dp = _dot_over_head_dim(zero, do_slices, vT_ptrs, kmask, HEAD_DIM, D_CHUNK, UPCAST, PRECISION)
        dt = k.dtype
        if UPCAST:
            k = k.to(tl.float32)
    p = tl.math.exp2(s * qk_scale - lse2[:, None])
    if MASKED:  # keys past L read k = 0, so p = exp(−lse): inf when every score is below −88
        p = tl.where(k_ok[None, :], p, 0.0)
    ds = (p * (dp - delta[:, None])).to(dt)
    if UPCAST:
        ds = ds.to(tl.float32)
    return tl.dot(ds, k, dq, input_precision=PRECISION)


@triton.jit
def _attention_bwd_dq_kernel(
    Q, K, V, DO, LSE, Delta, DQ,
    stride_qb, stride_qh, stride_ql,
    stride_kb, stride_kh, stride_kl,
    stride_vb, stride_vh, stride_vl,
    stride_dob, stride_dol,
    H, L, qk_scale, sm_scale,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, D_CHUNK: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    """Program (m, b·H + h) owns BLOCK_M queries of head h in batch b and loops over every key block."""
    start_m = tl.program_id(0) * BLOCK_M
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = offs_m < L
    Q += b * stride_qb + h * stride_qh
    K += b * stride_kb + h * stride_kh
    V += b * stride_vb + h * stride_vh
    DO += b * stride_dob + h * HEAD_DIM
    # Rows past L read lse = delta = 0; their dQ rows are computed but never stored.
    lse2 = tl.load(LSE + bh.to(tl.int64) * L + offs_m, mask=row_ok, other=0.0) * _LOG2E
    delta = tl.load(Delta + bh.to(tl.int64) * L + offs_m, mask=row_ok, other=0.0)

    k_ptrs = K + offs_n[:, None] * stride_kl + offs_d[None, :]
    if D_CHUNK >= HEAD_DIM:
        q = tl.load(Q + offs_m[:, None] * stride_ql + offs_d[None, :], mask=row_ok[:, None], other=0.0)
        do = tl.load(DO + offs_m[:, None] * stride_dol + offs_d[None, :], mask=row_ok[:, None], other=0.0)
        if UPCAST:
            q = q.to(tl.float32)
            do = do.to(tl.float32)
        # kᵀ, vᵀ are read transposed ([HEAD_DIM, BLOCK_N]) so that s = q kᵀ needs no tl.trans.
        kT_ptrs = K + offs_n[None, :] * stride_kl + offs_d[:, None]
        vT_ptrs = V + offs_n[None, :] * stride_vl + offs_d[:, None]
        q_slices = Q  # unused
        do_slices = DO
    else:
        offs_c = tl.arange(0, D_CHUNK)
        q = None  # not held in registers
        do = None
        # The query rows are clamped instead of masked: rows past L are never stored.
        rows = tl.minimum(offs_m, L - 1)
        q_slices = Q + rows[:, None] * stride_ql + offs_c[None, :]
        do_slices = DO + rows[:, None] * stride_dol + offs_c[None, :]
        kT_ptrs = K + offs_n[None, :] * stride_kl + offs_c[:, None]
        vT_ptrs = V + offs_n[None, :] * stride_vl + offs_c[:, None]

    dq = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    n_full = L - L % BLOCK_N  # full key blocks need no bounds checks
    for start_n in range(0, n_full, BLOCK_N):
        dq = _dq_block(
            dq, q, do, lse2, delta, kT_ptrs + start_n * stride_kl, vT_ptrs + start_n * stride_vl,
            k_ptrs + start_n * stride_kl, q_slices, do_slices, start_n, L, qk_scale,
            BLOCK_M, BLOCK_N, HEAD_DIM, D_CHUNK, False, UPCAST, PRECISION,
        )  # fmt: skip
    if n_full < L:
        dq = _dq_block(
            dq, q, do, lse2, delta, kT_ptrs + n_full * stride_kl, vT_ptrs + n_full * stride_vl,
            k_ptrs + n_full * stride_kl, q_slices, do_slices, n_full, L, qk_scale,
            BLOCK_M, BLOCK_N, HEAD_DIM, D_CHUNK, True, UPCAST, PRECISION,
        )  # fmt: skip

    out = bh.to(tl.int64) * L * HEAD_DIM + offs_m[:, None] * HEAD_DIM + offs_d[None, :]
    tl.store(DQ + out, (dq * sm_scale).to(DQ.dtype.element_ty), mask=row_ok[:, None])


def _cfg(block_m: int, block_n: int, warps: int, stages: int, d_chunk: int = 256) -> triton.Config:
    """A tile; d_chunk < head dim makes the head-dim products run over slices (see _dot_over_head_dim)."""
    return triton.Config(
        {"BLOCK_M": block_m, "BLOCK_N": block_n, "D_CHUNK": d_chunk}, num_warps=warps, num_stages=stages
    )


# Backward tiles per GPU family and head-dim bucket: (dK/dV kernel candidates, dQ kernel candidates).
# In the dK/dV kernel BLOCK_N is the keys a program owns and BLOCK_M the query step; in the dQ kernel
# the other way round. Not timed on any GPU yet (the autotuner picks among them on first use); each
# entry compiles without register spills and fits shared memory on every GPU of its family
# (tests/test_kernels_aot.py). What the ahead-of-time sweep found, bf16:
#   - Hopper (wgmma) holds k, v (dK/dV) or q, dO (dQ) in registers across the loop at head dims 64
#     and 128 without spills; at 256 every such tile spills, so 256 uses d_chunk = 64 (k, v or q, dO
#     re-read in 64-channel slices, see _dot_over_head_dim).
#   - Ampere-class MMA (sm_80, sm_86, sm_89, sm_120) spills with those tiles from head dim 128 on
#     (even dK/dV 16×64 and 32×32 with 4 warps): 128 and 256 use d_chunk 64 or 32 there.
#   - sm_86's 99 KB rule out the 64×64-key dK/dV tile that sm_80 (163 KB) takes; sm_120 spills a
#     few bytes in dK/dV (32,64,4w,2) at 128 with d_chunk 32 or 64, which sm_86 and sm_89 do not.
_BWD_CONFIGS = {
    # H100/H200, B200
    "sm90": {
        64: ([_cfg(32, 128, 8, 2), _cfg(32, 64, 4, 2)], [_cfg(128, 32, 8, 2), _cfg(64, 32, 4, 2)]),
        128: ([_cfg(32, 128, 8, 2), _cfg(32, 64, 8, 2)], [_cfg(128, 32, 8, 2), _cfg(64, 32, 4, 2)]),
        256: (
            [_cfg(16, 32, 8, 2, 64), _cfg(32, 32, 8, 2, 64)],
            [_cfg(64, 32, 8, 2, 64), _cfg(32, 32, 4, 2, 64)],
        ),
    },
    # A100
    "sm80": {
        64: ([_cfg(32, 128, 8, 2), _cfg(32, 64, 4, 2)], [_cfg(128, 32, 8, 2), _cfg(64, 32, 4, 2)]),
        128: (
            [_cfg(64, 64, 8, 2, 64), _cfg(32, 32, 4, 2, 64)],
            [_cfg(128, 32, 8, 2, 64), _cfg(64, 32, 4, 2, 64)],
        ),
        256: (
            [_cfg(32, 64, 8, 2, 64), _cfg(16, 32, 4, 2, 32)],
            [_cfg(64, 32, 8, 2, 64), _cfg(32, 32, 4, 2, 64)],
        ),
    },
    # RTX 3090/4090/5090, A10, L4, L40 (99 KB)
    "sm86": {
        64: ([_cfg(32, 128, 8, 2), _cfg(32, 64, 4, 2)], [_cfg(128, 32, 8, 2), _cfg(64, 32, 4, 2)]),
        128: (
            [_cfg(32, 64, 8, 2, 64), _cfg(32, 32, 4, 2, 64)],
            [_cfg(128, 32, 8, 2, 64), _cfg(64, 32, 4, 2, 64)],
        ),
        256: ([], []),  # the forward has no tile for head dim 256 on these GPUs
    },
}
# float32 (true float32 products on CUDA cores): one table for every GPU, small tiles and head-dim
# slices (the float32 forward's table in attention.py explains why). Rejected (spills on some GPU):
# dK/dV 32×32 at 64 and 128 (8 warps), every dK/dV tile larger than 16×16 at 256, dK/dV 16×16 with
# d_chunk 16 at 256 (sm_80); dQ (16,16,8w) with d_chunk 32 at 256 (sm_80), (32,16,4w) at 128, 256.
_FP32_BWD_CONFIGS = {
    64: ([_cfg(16, 32, 8, 1, 32), _cfg(16, 16, 8, 1, 32)], [_cfg(32, 32, 8, 1, 16), _cfg(16, 16, 8, 1, 32)]),
    128: ([_cfg(16, 32, 8, 1, 32), _cfg(16, 16, 8, 1, 32)], [_cfg(32, 32, 8, 1, 32), _cfg(16, 16, 8, 1, 32)]),
    256: ([_cfg(16, 16, 8, 1, 32)], [_cfg(16, 16, 8, 1, 16), _cfg(16, 16, 4, 1, 16)]),
}


def backward_configs(fam: str, head_dim: int, fp32: bool = False) -> tuple[list, list]:
    """(dK/dV candidates, dQ candidates) autotuned for one GPU family ("sm90", "sm80", "sm86"), head
    dim and dtype class; head dims ≤ 64 share a list. An empty list: no tile compiles without
    register spills there, and the Triton backend is not used when a gradient is needed."""
    bucket = max(64, head_dim)
    dkdv, dq = _FP32_BWD_CONFIGS[bucket] if fp32 else _BWD_CONFIGS[fam][bucket]
    return list(dkdv), list(dq)


def preprocess_block(head_dim: int) -> int:
    """Rows per program of the delta kernel (4 warps): about 8K elements of O and of dO."""
    return max(16, min(128, 8192 // head_dim))


def flash_attention_backward_reference(
    dout: Tensor, q: Tensor, k: Tensor, v: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """Pure-PyTorch gradients of flash_attention written out in float32: dout [B, L, H·D] →
    (dq, dk, dv) [B, H, L, D] in q's dtype. The same formulas as the kernels, without tiling."""
    B, H, L, D = q.shape
    scale = 1.0 / math.sqrt(D)
    qf, kf, vf = q.float(), k.float(), v.float()
    do = dout.float().unflatten(-1, (H, D)).transpose(1, 2)  # [B, H, L, D]
    p = (torch.einsum("bhqd,bhkd->bhqk", qf, kf) * scale).softmax(dim=-1)
    o = torch.einsum("bhqk,bhkd->bhqd", p, vf)
    dv = torch.einsum("bhqk,bhqd->bhkd", p, do)
    dp = torch.einsum("bhqd,bhkd->bhqk", do, vf)
    ds = p * (dp - (do * o).sum(-1, keepdim=True))
    dq = torch.einsum("bhqk,bhkd->bhqd", ds, kf) * scale
    dk = torch.einsum("bhqk,bhqd->bhkd", ds, qf) * scale
    return dq.to(q.dtype), dk.to(q.dtype), dv.to(q.dtype)
