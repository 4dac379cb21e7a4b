"""Flash attention forward for FLUX: non-causal, unmasked, one pass over the keys with an online
softmax in float32, writing the [B, L, H·D] layout the output projection reads.

    flash_attention(q, k, v) -> [B, L, H·D]        q, k already rotated by RoPE

q, k, v: [B, H, L, D] with any strides (the channel dim must be contiguous, else it is copied);
bfloat16, float16 or float32; D a power of two in [16, 256]; any L (the last key block is masked).
"""

from __future__ import annotations

import functools
import math

import torch
import triton
import triton.language as tl
from torch import Tensor
from torch.library import triton_op, wrap_triton

from ._common import INTERPRET, check_inputs, device_unsupported_reason, empty

LOG2E = 1.4426950408889634


@triton.jit
def _attend_block(
    acc, l_i, m_i, q, k_ptrs, v_ptrs, start_n, L, qk_scale,
    BLOCK_N: tl.constexpr, MASKED: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    """One key/value block of the online softmax; MASKED only for the ragged last block."""
    if MASKED:
        valid = (start_n + tl.arange(0, BLOCK_N)) < L
        k = tl.load(k_ptrs, mask=valid[None, :], other=0.0)
        v = tl.load(v_ptrs, mask=valid[:, None], other=0.0)
    else:
        k = tl.load(k_ptrs)
        v = tl.load(v_ptrs)
    if UPCAST:  # the interpreter cannot multiply bfloat16 tiles; the values are exact in float32
        k = k.to(tl.float32)
    s = tl.dot(q, k, input_precision=PRECISION) * qk_scale  # log2-scaled scores [BLOCK_M, BLOCK_N]
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
    Q, K, V, Out,
    stride_qb, stride_qh, stride_ql,
    stride_kb, stride_kh, stride_kl,
    stride_vb, stride_vh, stride_vl,
    stride_ob, stride_ol,
    H, L, qk_scale,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    """Program (m, b·H + h) owns BLOCK_M queries of head h in batch b."""
    start_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = offs_m[:, None] < L

    q_ptrs = Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_ql + offs_d[None, :]
    q = tl.load(q_ptrs, mask=row_ok, other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
    # K is read transposed ([HEAD_DIM, BLOCK_N]) so that s = q @ k needs no tl.trans.
    k_ptrs = K + b * stride_kb + h * stride_kh + offs_n[None, :] * stride_kl + offs_d[:, None]
    v_ptrs = V + b * stride_vb + h * stride_vh + offs_n[:, None] * stride_vl + offs_d[None, :]

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)

    n_full = L - L % BLOCK_N  # full blocks need no bounds checks
    for start_n in range(0, n_full, BLOCK_N):
        acc, l_i, m_i = _attend_block(
            acc, l_i, m_i, q, k_ptrs + start_n * stride_kl, v_ptrs + start_n * stride_vl, start_n, L,
            qk_scale, BLOCK_N, False, UPCAST, PRECISION,
        )  # fmt: skip
    if n_full < L:
        acc, l_i, m_i = _attend_block(
            acc, l_i, m_i, q, k_ptrs + n_full * stride_kl, v_ptrs + n_full * stride_vl, n_full, L,
            qk_scale, BLOCK_N, True, UPCAST, PRECISION,
        )  # fmt: skip

    out = acc / l_i[:, None]
    o_ptrs = Out + b * stride_ob + offs_m[:, None] * stride_ol + h * HEAD_DIM + offs_d[None, :]
    tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=row_ok)


# Autotuning candidates per GPU family and head-dim bucket. They are chosen from the published
# Triton/FlashAttention tunings for these GPUs, not measured here: the autotuner times them on
# first use and keeps the fastest per head dim, dtype and L. Every entry is compiled ahead of time
# for each GPU of its family by tests/test_kernels_aot.py, which checks shared memory against the
# GPU's limit and that ptxas spills no registers; entries that failed were removed (see comments).
def _cfg(block_m: int, block_n: int, warps: int, stages: int) -> triton.Config:
    return triton.Config({"BLOCK_M": block_m, "BLOCK_N": block_n}, num_warps=warps, num_stages=stages)


# The last resort for head dims ≤ 128: compiles without spills for every GPU checked.
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


def family(capability: tuple[int, int]) -> str:
    """The autotune table for a CUDA compute capability: "sm90" (9.x, 10.x), "sm80" (8.0) or
    "sm86" (8.6, 8.7, 8.9, 12.x and other parts with ~99 KB of shared memory per block)."""
    major, minor = capability
    if major in (9, 10):
        return "sm90"
    if (major, minor) == (8, 0):
        return "sm80"
    return "sm86"


def autotune_configs(fam: str, head_dim: int) -> list[triton.Config]:
    """The candidates autotuned for one GPU family and head dim (head dims ≤ 64 share a list);
    empty when no tile compiles without register spills there."""
    bucket = max(64, head_dim)
    return _CONFIGS[fam][bucket] + ([_FALLBACK] if bucket <= 128 else [])


@functools.cache
def _tuned_kernel(fam: str, head_dim: int):
    # L in the key: the best tile differs between 1.5k and 17k tokens; one tuning per resolution.
    return triton.autotune(configs=autotune_configs(fam, head_dim), key=["HEAD_DIM", "L"])(
        _flash_attention_kernel
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


def attention_unsupported_reason(q: Tensor) -> str | None:
    """None if flash_attention can run on tensors like q [B, H, L, D], else why not (a sentence)."""
    reason = device_unsupported_reason(q) or _shape_reason(q)
    if reason is None and q.is_cuda and not INTERPRET:
        cap = torch.cuda.get_device_capability(q.device)
        if not autotune_configs(family(cap), q.shape[-1]):
            reason = (
                f"no tile for head dim {q.shape[-1]} compiles without register spills on compute "
                f"capability {cap[0]}.{cap[1]}"
            )
    if reason is None and q.requires_grad and torch.is_grad_enabled():
        # No backward kernel: training falls back to another backend under "auto".
        reason = "the Triton attention kernel is forward-only and q requires grad"
    return reason


@triton_op("fluxcore::flash_attention", mutates_args=())
def flash_attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """Softmax(q kᵀ / √D) v for q, k, v [B, H, L, D] (RoPE already applied) → [B, L, H·D], q's dtype."""
    check_inputs("flash_attention", q, k, v)
    if q.shape != k.shape or q.shape != v.shape:
        raise ValueError(
            f"flash_attention: q, k, v must share one shape, found {q.shape}, {k.shape}, {v.shape}"
        )
    reason = _shape_reason(q)
    if reason is not None:
        raise ValueError(f"flash_attention: {reason}")
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    B, H, L, D = q.shape
    out = empty(B, L, H * D, like=q)
    args = (
        q, k, v, out,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        out.stride(0), out.stride(1),
        H, L, LOG2E / math.sqrt(D),
    )  # fmt: skip
    # float32 inputs get true float32 products (TF32 would cost ~1e-3 relative error).
    precision = "ieee" if q.dtype == torch.float32 else "tf32"
    if INTERPRET:
        grid = (triton.cdiv(L, 64), B * H)
        wrap_triton(_flash_attention_kernel)[grid](
            *args, HEAD_DIM=D, BLOCK_M=64, BLOCK_N=64, UPCAST=True, PRECISION=precision
        )
    else:
        kernel = _tuned_kernel(_arch(q.device), D)
        grid = lambda meta: (triton.cdiv(L, meta["BLOCK_M"]), B * H)
        wrap_triton(kernel)[grid](*args, HEAD_DIM=D, UPCAST=False, PRECISION=precision)
    return out


def flash_attention_reference(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """Pure-PyTorch flash_attention: scores and softmax in float32, [B, H, L, D] → [B, L, H·D]."""
    scores = torch.einsum("bhqd,bhkd->bhqk", q.float(), k.float()) / math.sqrt(q.shape[-1])
    out = torch.einsum("bhqk,bhkd->bhqd", scores.softmax(dim=-1), v.float()).to(q.dtype)
    return out.transpose(1, 2).flatten(2)


if INTERPRET:  # interpreted kernels cannot run on fake tensors; torch.compile gets shapes from the reference
    flash_attention.register_fake(flash_attention_reference)
