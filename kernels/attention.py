"""Flash attention for FLUX: non-causal, unmasked, one pass over the keys with an online softmax in
float32, writing the [B, L, H·D] layout the output projection reads; differentiable through the
Triton backward kernels in attention_backward.py.

    flash_attention(q, k, v) -> [B, L, H·D]        q, k already rotated by RoPE

q, k, v: [B, H, L, D] with any strides (the channel dim must be contiguous, else it is copied);
bfloat16, float16 or float32; D a power of two in [16, 256]; any L (the last key block is masked).
When a gradient is needed (grad mode on and any of q, k, v requiring grad) the forward also writes
the per-row log-sum-exp [B, H, L] (float32), and autograd runs the backward kernels; otherwise it
is the plain forward, as cheap as before.
"""

from __future__ import annotations

import functools
import math

import torch
import triton
import triton.language as tl
from torch import Tensor
from torch.library import triton_op, wrap_triton

from . import attention_backward as bwd
from ._common import INTERPRET, check_inputs, device_unsupported_reason, empty
from .attention_backward import _LOG2E, LOG2E, _dot_over_head_dim


@triton.jit
def _attend_block(
    acc, l_i, m_i, q, q_slices, k_ptrs, v_ptrs, start_n, L, qk_scale,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, D_CHUNK: tl.constexpr,
    MASKED: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    """One key/value block of the online softmax; MASKED only for the ragged last block.
    With D_CHUNK >= HEAD_DIM, q is the query tile held in registers and k_ptrs point at the whole
    [HEAD_DIM, BLOCK_N] kᵀ tile; otherwise q·kᵀ is summed over D_CHUNK-wide slices of q (q_slices)
    and kᵀ (k_ptrs), both re-read from memory (the float32 tiles; see _dot_over_head_dim)."""
    if MASKED:
        valid = (start_n + tl.arange(0, BLOCK_N)) < L
    if D_CHUNK >= HEAD_DIM:
        if MASKED:
            k = tl.load(k_ptrs, mask=valid[None, :], other=0.0)
            v = tl.load(v_ptrs, mask=valid[:, None], other=0.0)
        else:
            k = tl.load(k_ptrs)
            v = tl.load(v_ptrs)
        if UPCAST:  # the interpreter cannot multiply bfloat16 tiles; the values are exact in float32
            k = k.to(tl.float32)
        s = tl.dot(q, k, input_precision=PRECISION) * qk_scale  # log2-scaled scores [BLOCK_M, BLOCK_N]
    else:
        zero = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        if MASKED:
            s = _dot_over_head_dim(
                zero, q_slices, k_ptrs, valid[None, :], HEAD_DIM, D_CHUNK, UPCAST, PRECISION
            )
            v = tl.load(v_ptrs, mask=valid[:, None], other=0.0)
        else:
            s = _dot_over_head_dim(zero, q_slices, k_ptrs, None, HEAD_DIM, D_CHUNK, UPCAST, PRECISION)
            v = tl.load(v_ptrs)
        s = s * qk_scale
    if MASKED:
        s = tl.where(valid[None, :], s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    p = tl.math.exp2(s - m_new[:, None])
    alpha = tl.math.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, 1)
    # Like every flash kernel, P is rounded to the input dtype for the second matmul.
    p = p.to(v.dtype)
    if UPCAST:
        p = p.to(tl.float32)
        v = v.to(tl.float32)
    acc = tl.dot(p, v, acc * alpha[:, None], input_precision=PRECISION)
    return acc, l_i, m_new


@triton.jit
def _flash_attention_kernel(
    Q, K, V, Out, LSE,
    stride_qb, stride_qh, stride_ql,
    stride_kb, stride_kh, stride_kl,
    stride_vb, stride_vh, stride_vl,
    stride_ob, stride_ol,
    H, L, qk_scale,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, D_CHUNK: tl.constexpr,
    STORE_LSE: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    """Program (m, b·H + h) owns BLOCK_M queries of head h in batch b. With STORE_LSE it also
    writes their natural-log log-sum-exp to LSE [B, H, L] (float32) for the backward."""
    start_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = offs_m[:, None] < L

    Q += b * stride_qb + h * stride_qh
    K += b * stride_kb + h * stride_kh
    if D_CHUNK >= HEAD_DIM:
        q = tl.load(Q + offs_m[:, None] * stride_ql + offs_d[None, :], mask=row_ok, other=0.0)
        if UPCAST:
            q = q.to(tl.float32)
        q_slices = Q  # unused
        # K is read transposed ([HEAD_DIM, BLOCK_N]) so that s = q @ k needs no tl.trans.
        k_ptrs = K + offs_n[None, :] * stride_kl + offs_d[:, None]
    else:
        offs_c = tl.arange(0, D_CHUNK)
        q = None  # not held in registers
        # The query rows are clamped instead of masked: rows past L are never stored.
        q_slices = Q + tl.minimum(offs_m, L - 1)[:, None] * stride_ql + offs_c[None, :]
        k_ptrs = K + offs_n[None, :] * stride_kl + offs_c[:, None]
    v_ptrs = V + b * stride_vb + h * stride_vh + offs_n[:, None] * stride_vl + offs_d[None, :]

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)

    n_full = L - L % BLOCK_N  # full blocks need no bounds checks
    for start_n in range(0, n_full, BLOCK_N):
        acc, l_i, m_i = _attend_block(
            acc, l_i, m_i, q, q_slices, k_ptrs + start_n * stride_kl, v_ptrs + start_n * stride_vl,
            start_n, L, qk_scale, BLOCK_M, BLOCK_N, HEAD_DIM, D_CHUNK, False, UPCAST, PRECISION,
        )  # fmt: skip
    if n_full < L:
        acc, l_i, m_i = _attend_block(
            acc, l_i, m_i, q, q_slices, k_ptrs + n_full * stride_kl, v_ptrs + n_full * stride_vl,
            n_full, L, qk_scale, BLOCK_M, BLOCK_N, HEAD_DIM, D_CHUNK, True, UPCAST, PRECISION,
        )  # fmt: skip

    out = acc / l_i[:, None]
    o_ptrs = Out + b * stride_ob + offs_m[:, None] * stride_ol + h * HEAD_DIM + offs_d[None, :]
    tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=row_ok)
    if STORE_LSE:  # m_i is log2-scaled: lse = (m + log2 l) · ln 2
        lse = (m_i + tl.math.log2(l_i)) / _LOG2E
        tl.store(LSE + bh.to(tl.int64) * L + offs_m, lse, mask=offs_m < L)


# Autotuning candidates per GPU family and head-dim bucket. They are chosen from the published
# Triton/FlashAttention tunings for these GPUs, not measured here: the autotuner times them on
# first use and keeps the fastest per head dim, dtype and L. Every entry is compiled ahead of time
# for each GPU of its family by tests/test_kernels_aot.py, which checks shared memory against the
# GPU's limit and that ptxas spills no registers; entries that failed were removed (see comments).
_cfg = bwd._cfg


# The last resort for half-precision head dims ≤ 128: compiles without spills for every GPU checked.
_FALLBACK = _cfg(32, 32, 4, 1)
# Entries removed after the ahead-of-time check (bf16, the kernel as specialised for aligned
# tensors); "spills" = ptxas reported register spills on that GPU:
#   sm90  64: (128,128,4w,3) spills on sm_90 and sm_100
#   sm90 128: (128,64,4w,3), (64,128,4w,3) spill; (128,128,8w,4) needs 288 KB shared memory
#   sm90 256: (128,64,8w,2), (64,32,4w,2) spill on sm_100; (64,64,4w,2) spills; 32×32 4w spills
#   sm80  64: (128,128,4w,2) spills
#   sm80 128: (128,64,4w,3), (128,32,4w,3), (64,64,4w,3) spill (4 warps are too few for D = 128)
#   sm80 256: (64,64,4w,2), (64,32,4w,2), 32×32 4w/8w spill
#   sm86  64: (128,64,4w,3) and (128,128,4w,2) spill
#   sm86 128: as sm80
#   sm86 256: every tile tried spills (also (32,64,8w,2), (64,32,8w,2), (64,64,8w,2)): head dim
#             256 is left to other backends on these GPUs (attention_unsupported_reason says so)
_CONFIGS = {
    # Hopper and datacenter Blackwell (H100/H200, B200: 227 KB shared memory per block).
    "sm90": {
        64: [_cfg(128, 64, 4, 4), _cfg(128, 128, 8, 3), _cfg(64, 64, 4, 4)],
        128: [_cfg(128, 128, 8, 3), _cfg(128, 64, 8, 4)],
        256: [_cfg(64, 64, 8, 2), _cfg(64, 32, 8, 2)],
    },
    # A100 (163 KB): BLOCK_N 64 and shallower pipelines.
    "sm80": {
        64: [_cfg(128, 64, 4, 3), _cfg(64, 64, 4, 3)],
        128: [_cfg(128, 64, 8, 2)],
        256: [_cfg(32, 64, 8, 2)],
    },
    # Consumer Ampere/Ada/Blackwell (RTX 3090/4090/5090, A10, L4, L40: 99 KB per block).
    "sm86": {
        64: [_cfg(64, 64, 4, 3)],
        128: [_cfg(128, 64, 8, 2)],
        256: [],
    },
}
# float32 (true float32 products, which run on CUDA cores as FMAs): one table for every GPU.
# An FMA dot keeps its operands in registers whole, so every half-precision tile spills in float32
# (even 32×32 with 4 warps at head dim 64), and so does any tile that holds q [BLOCK_M, HEAD_DIM]
# in registers across the key loop at head dim 128. These tiles re-read q and kᵀ in 16- or
# 32-channel slices (d_chunk) for q·kᵀ; they compile without spills and fit 99 KB on every GPU
# checked. Rejected (a few bytes of spills on some GPU): (32,16,4w) at 64 and 128, (32,32,8w,2)
# with d_chunk 16 at 64 (sm_100), (16,16,4w) with d_chunk 16 at 128 (sm_86/89), (16,32,4w) and
# (32,16,4w) at 256; (32,32,8w,2) at 256 needs 100 KB.
_FP32_CONFIGS = {
    64: [_cfg(32, 32, 8, 1, 32), _cfg(16, 16, 8, 1, 32)],
    128: [_cfg(32, 32, 8, 2, 16), _cfg(16, 16, 8, 1, 32)],
    256: [_cfg(16, 16, 8, 1, 32), _cfg(16, 16, 4, 1, 16)],
}


def family(capability: tuple[int, int]) -> str:
    """The autotune table for a CUDA compute capability: "sm90" (9.x, 10.x), "sm80" (8.0) or
    "sm86" (8.6, 8.7, 8.9, 12.x and other parts with ~99 KB of shared memory per block)."""
    major, minor = capability
    if major in (9, 10):
        return "sm90"
    if (major, minor) == (8, 0):
        return "sm80"
    return "sm86"


def autotune_configs(fam: str, head_dim: int, fp32: bool = False) -> list[triton.Config]:
    """The forward candidates autotuned for one GPU family, head dim and dtype class (float32, or
    bfloat16/float16); head dims ≤ 64 share a list. Empty when no tile compiles without register
    spills there."""
    bucket = max(64, head_dim)
    if fp32:
        return list(_FP32_CONFIGS[bucket])
    return _CONFIGS[fam][bucket] + ([_FALLBACK] if bucket <= 128 else [])


@functools.cache
def _tuned_kernel(fam: str, head_dim: int, fp32: bool):
    # L in the key: the best tile differs between 1.5k and 17k tokens; one tuning per resolution.
    # STORE_LSE too: training and inference may prefer different tiles.
    configs = autotune_configs(fam, head_dim, fp32)
    return triton.autotune(configs=configs, key=["HEAD_DIM", "L", "STORE_LSE"])(_flash_attention_kernel)


@functools.cache
def _tuned_backward(fam: str, head_dim: int, fp32: bool):
    dkdv, dq = bwd.backward_configs(fam, head_dim, fp32)
    return (
        triton.autotune(configs=dkdv, key=["HEAD_DIM", "L"])(bwd._attention_bwd_dkdv_kernel),
        triton.autotune(configs=dq, key=["HEAD_DIM", "L"])(bwd._attention_bwd_dq_kernel),
    )


def _arch(device: torch.device) -> str:
    return family(torch.cuda.get_device_capability(device))


def _shape_reason(q: Tensor) -> str | None:
    if q.ndim != 4:
        return f"expected q of shape [B, H, L, D], found {tuple(q.shape)}"
    d = q.shape[-1]
    if d < 16 or d > 256 or d & (d - 1):
        return f"head dim must be a power of two between 16 and 256, found {d}"
    return None


def _tile_reason(q: Tensor, backward: bool) -> str | None:
    """On a GPU: why no forward (or backward) tile fits q's head dim and dtype there, else None."""
    if not q.is_cuda or INTERPRET:
        return None
    cap = torch.cuda.get_device_capability(q.device)
    d, fp32 = q.shape[-1], q.dtype == torch.float32
    kind = "float32 " if fp32 else ""
    if not autotune_configs(family(cap), d, fp32):
        return (
            f"no {kind}tile for head dim {d} compiles without register spills on compute "
            f"capability {cap[0]}.{cap[1]}"
        )
    if backward and not all(bwd.backward_configs(family(cap), d, fp32)):
        return (
            f"no {kind}backward tile for head dim {d} compiles without register spills on compute "
            f"capability {cap[0]}.{cap[1]}, and q requires grad"
        )
    return None


def _needs_grad(*tensors: Tensor) -> bool:
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def attention_unsupported_reason(q: Tensor) -> str | None:
    """None if flash_attention can run on tensors like q [B, H, L, D] (its backward too, when q
    requires grad), else why not (a sentence)."""
    return device_unsupported_reason(q) or _shape_reason(q) or _tile_reason(q, _needs_grad(q))


def _checked(q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    check_inputs("flash_attention", q, k, v)
    if q.shape != k.shape or q.shape != v.shape:
        raise ValueError(
            f"flash_attention: q, k, v must share one shape, found {q.shape}, {k.shape}, {v.shape}"
        )
    reason = _shape_reason(q)
    if reason is not None:
        raise ValueError(f"flash_attention: {reason}")
    return tuple(t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))


def _precision(q: Tensor) -> str:
    # float32 inputs get true float32 products (TF32 would cost ~1e-3 relative error).
    return "ieee" if q.dtype == torch.float32 else "tf32"


# Tiles under the interpreter, where a program costs the same whatever its size. Different BLOCK_M
# and BLOCK_N in the backward so that a mixed-up index fails the tests. float32 takes the head-dim
# slice path (D_CHUNK 16 < head dims 32, 64), half precision holds whole tiles in registers; tests
# swap these to run each dtype through the other path too.
INTERPRET_D_CHUNK = {torch.float32: 16, torch.bfloat16: 256, torch.float16: 256}


def _interpret_chunk(q: Tensor) -> int:
    return INTERPRET_D_CHUNK[q.dtype]


def _forward(q: Tensor, k: Tensor, v: Tensor, store_lse: bool) -> tuple[Tensor, Tensor]:
    """Launch the forward; returns (out [B, L, H·D], lse [B, H, L] float32, or an empty placeholder
    when store_lse is False)."""
    q, k, v = _checked(q, k, v)
    B, H, L, D = q.shape
    out = empty(B, L, H * D, like=q)
    lse = torch.empty((B, H, L) if store_lse else (0,), device=q.device, dtype=torch.float32)
    args = (
        q, k, v, out, lse if store_lse else out,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        out.stride(0), out.stride(1),
        H, L, LOG2E / math.sqrt(D),
    )  # fmt: skip
    const = dict(HEAD_DIM=D, STORE_LSE=store_lse, PRECISION=_precision(q))
    if INTERPRET:
        grid = (triton.cdiv(L, 64), B * H)
        wrap_triton(_flash_attention_kernel)[grid](
            *args, **const, BLOCK_M=64, BLOCK_N=64, D_CHUNK=_interpret_chunk(q), UPCAST=True
        )
    else:
        fam = _arch(q.device)
        if store_lse and not all(bwd.backward_configs(fam, D, q.dtype == torch.float32)):
            raise ValueError(f"flash_attention: {_tile_reason(q, backward=True)}")
        kernel = _tuned_kernel(fam, D, q.dtype == torch.float32)
        grid = lambda meta: (triton.cdiv(L, meta["BLOCK_M"]), B * H)
        wrap_triton(kernel)[grid](*args, **const, UPCAST=False)
    return out, lse


@triton_op("fluxcore::flash_attention", mutates_args=())
def _flash_attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """Softmax(q kᵀ / √D) v for q, k, v [B, H, L, D] (RoPE already applied) → [B, L, H·D], q's dtype."""
    return _forward(q, k, v, store_lse=False)[0]


@triton_op("fluxcore::flash_attention_lse", mutates_args=())
def _flash_attention_lse(q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
    """flash_attention that also returns the per-row log-sum-exp [B, H, L] (float32, natural log) of
    the scaled scores: the forward autograd records, the backward reads it."""
    return _forward(q, k, v, store_lse=True)


@triton_op("fluxcore::flash_attention_backward", mutates_args=())
def flash_attention_backward(
    dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients of flash_attention: dout, out [B, L, H·D], q, k, v [B, H, L, D], lse [B, H, L]
    float32 from the forward → (dq, dk, dv), contiguous [B, H, L, D] in q's dtype."""
    q, k, v = _checked(q, k, v)
    B, H, L, D = q.shape
    if dout.shape != (B, L, H * D) or out.shape != dout.shape or lse.shape != (B, H, L):
        raise ValueError(
            f"flash_attention_backward: expected dout, out [{B}, {L}, {H * D}] and lse [{B}, {H}, {L}], "
            f"found {tuple(dout.shape)}, {tuple(out.shape)}, {tuple(lse.shape)}"
        )
    dout = dout.to(q.dtype)
    dout, out = (t if t.stride(-1) == 1 else t.contiguous() for t in (dout, out))
    lse = lse.contiguous()
    delta = torch.empty(B, H, L, device=q.device, dtype=torch.float32)
    dq, dk, dv = (empty(B, H, L, D, like=q) for _ in range(3))
    block = 64 if INTERPRET else bwd.preprocess_block(D)
    wrap_triton(bwd._attention_bwd_preprocess_kernel)[(triton.cdiv(L, block), B * H)](
        out, dout, delta, out.stride(0), out.stride(1), dout.stride(0), dout.stride(1), H, L,
        HEAD_DIM=D, BLOCK_M=block, num_warps=4,
    )  # fmt: skip
    common = (
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        dout.stride(0), dout.stride(1),
        H, L, LOG2E / math.sqrt(D), 1.0 / math.sqrt(D),
    )  # fmt: skip
    const = dict(HEAD_DIM=D, PRECISION=_precision(q))
    if INTERPRET:
        chunk = _interpret_chunk(q)
        wrap_triton(bwd._attention_bwd_dkdv_kernel)[(triton.cdiv(L, 32), B * H)](
            q, k, v, dout, lse, delta, dk, dv, *common, **const, BLOCK_M=16, BLOCK_N=32, D_CHUNK=chunk,
            UPCAST=True,
        )  # fmt: skip
        wrap_triton(bwd._attention_bwd_dq_kernel)[(triton.cdiv(L, 32), B * H)](
            q, k, v, dout, lse, delta, dq, *common, **const, BLOCK_M=32, BLOCK_N=16, D_CHUNK=chunk,
            UPCAST=True,
        )  # fmt: skip
    else:
        dkdv_kernel, dq_kernel = _tuned_backward(_arch(q.device), D, q.dtype == torch.float32)
        grid_n = lambda meta: (triton.cdiv(L, meta["BLOCK_N"]), B * H)
        grid_m = lambda meta: (triton.cdiv(L, meta["BLOCK_M"]), B * H)
        wrap_triton(dkdv_kernel)[grid_n](q, k, v, dout, lse, delta, dk, dv, *common, **const, UPCAST=False)
        wrap_triton(dq_kernel)[grid_m](q, k, v, dout, lse, delta, dq, *common, **const, UPCAST=False)
    return dq, dk, dv


def _setup_context(ctx, inputs, output) -> None:
    q, k, v = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse)
    ctx.mark_non_differentiable(lse)


def _backward(ctx, dout: Tensor, _dlse: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
    q, k, v, out, lse = ctx.saved_tensors
    return flash_attention_backward(dout, q, k, v, out, lse)


_flash_attention_lse.register_autograd(_backward, setup_context=_setup_context)


def flash_attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """Softmax(q kᵀ / √D) v for q, k, v [B, H, L, D] (RoPE already applied) → [B, L, H·D], q's dtype.

    Differentiable: when grad mode is on and any input requires grad, the forward also records the
    log-sum-exp and autograd runs the Triton backward (torch.ops.fluxcore.flash_attention_lse);
    otherwise it is the forward-only op torch.ops.fluxcore.flash_attention."""
    if _needs_grad(q, k, v):
        return _flash_attention_lse(q, k, v)[0]
    return _flash_attention(q, k, v)


def flash_attention_reference(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """Pure-PyTorch flash_attention: scores and softmax in float32, [B, H, L, D] → [B, L, H·D]."""
    scores = torch.einsum("bhqd,bhkd->bhqk", q.float(), k.float()) / math.sqrt(q.shape[-1])
    out = torch.einsum("bhqk,bhkd->bhqd", scores.softmax(dim=-1), v.float()).to(q.dtype)
    return out.transpose(1, 2).flatten(2)


def _lse_reference(q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
    scores = torch.einsum("bhqd,bhkd->bhqk", q.float(), k.float()) / math.sqrt(q.shape[-1])
    return flash_attention_reference(q, k, v), scores.logsumexp(dim=-1)


def _backward_fake(dout, q, k, v, out, lse) -> tuple[Tensor, Tensor, Tensor]:
    return tuple(torch.empty(q.shape, device=q.device, dtype=q.dtype) for _ in range(3))


if INTERPRET:  # interpreted kernels cannot run on fake tensors; torch.compile gets shapes from the reference
    _flash_attention.register_fake(flash_attention_reference)
    _flash_attention_lse.register_fake(_lse_reference)
    flash_attention_backward.register_fake(_backward_fake)
