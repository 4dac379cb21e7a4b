"""GGUF (ggml) block dequantization on the GPU: packed bytes straight to bf16 / fp16 / fp32.

    dequantize_gguf(raw, qtype, dtype) -> Tensor        [n_blocks · elements] in `dtype`
    dequantize_gguf_reference(raw, qtype, dtype)        fluxcore.quant.gguf's PyTorch decoder

raw: uint8, contiguous, a whole number of blocks of `qtype` (e.g. a GGUFLinear's weight
[out, row bytes]; rows are whole blocks, so the blocks can be taken flat). Covered: Q8_0, Q4_0,
Q4_1, Q5_0, Q5_1, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K (`TYPES`); the block layouts are described in
fluxcore/quant/gguf.py.

Exactness: every value is computed in float32 with the PyTorch decoder's operations in its order
(e.g. Q4_K: (d·sc)·q − dmin·m, each product and the difference rounded on its own), with FMA
contraction disabled at compile time, so the float32 result is bit-identical to the PyTorch path
(itself bit-identical to gguf's reference decoder). The cast to bf16 rounds to nearest even by
integer arithmetic rather than a conversion instruction, because Triton's interpreter truncates
there: the same code then runs, and is tested bit-for-bit, on CPU and GPU. fp16 uses the
conversion (round to nearest even in both). Unlike the other ops here, the reference imports
fluxcore: the kernel's contract is to equal that decoder.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor
from torch.library import triton_op, wrap_triton

from . import _common
from ._common import INTERPRET, TILE, warps_for

# name → (ggml type id, elements per block, bytes per block); the id selects the kernel's branch
TYPES: dict[str, tuple[int, int, int]] = {
    "Q4_0": (2, 32, 18), "Q4_1": (3, 32, 20), "Q5_0": (6, 32, 22), "Q5_1": (7, 32, 24), "Q8_0": (8, 32, 34),
    "Q2_K": (10, 256, 84), "Q3_K": (11, 256, 110), "Q4_K": (12, 256, 144), "Q5_K": (13, 256, 176),
    "Q6_K": (14, 256, 210),
}  # fmt: skip
OUT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def blocks_per_program(qtype: str) -> int:
    """Blocks one program decodes: TILE elements (a power of two, so the tile is one)."""
    return TILE // TYPES[qtype][1]


@triton.jit
def _byte(P, off, ok):
    """The uint8 at P + off (masked to 0), as int32 so shifts and masks stay in one type."""
    return tl.load(P + off, mask=ok, other=0).to(tl.int32)


@triton.jit
def _half(P, off, ok):
    """The little-endian fp16 at P + off, from its two bytes (fields are only 2-byte aligned
    inside a block, and the blocks are a byte stream), exactly as float32."""
    lo = tl.load(P + off, mask=ok, other=0).to(tl.uint16)
    hi = tl.load(P + off + 1, mask=ok, other=0).to(tl.uint16)
    return (lo | (hi << 8)).to(tl.float16, bitcast=True).to(tl.float32)


@triton.jit
def _store(O, offs, v, ok):
    """Store float32 v in O's dtype; bf16 is rounded to nearest even by hand (see the module doc)."""
    dt = O.dtype.element_ty
    if dt == tl.bfloat16:
        bits = v.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        bits = tl.where(v != v, 0x7FC0, bits)  # NaN stays NaN (the carry could make it infinity)
        tl.store(O + offs, bits.to(tl.uint16).to(tl.bfloat16, bitcast=True), mask=ok)
    else:
        tl.store(O + offs, v.to(dt), mask=ok)


@triton.jit
def _dequant_32_kernel(Q, O, n_blocks, QTYPE: tl.constexpr, BYTES: tl.constexpr, BLOCKS: tl.constexpr):
    """Q4_0, Q4_1, Q5_0, Q5_1, Q8_0: program i decodes blocks i·BLOCKS.. as a [BLOCKS, 32] tile
    (element e of a block in column e). Q: *u8 [n_blocks·BYTES]; O: [n_blocks·32]."""
    blk = tl.program_id(0).to(tl.int64) * BLOCKS + tl.arange(0, BLOCKS)[:, None]
    ok = blk < n_blocks
    e = tl.arange(0, 32)[None, :]
    B = Q + blk * BYTES
    d = _half(B, 0, ok)
    if QTYPE == 8:  # Q8_0: d·q, q int8
        q = tl.load(B + 2 + e, mask=ok, other=0).to(tl.int8, bitcast=True).to(tl.float32)
        v = d * q
    else:
        # a nibble: elements 0-15 are the low halves of the 16 bytes, 16-31 the high halves
        qs = 8 if QTYPE == 7 else (6 if QTYPE == 6 else (4 if QTYPE == 3 else 2))
        q = (_byte(B, qs + (e & 15), ok) >> ((e >> 4) * 4)) & 15
        if QTYPE == 6 or QTYPE == 7:  # the 5th bit of element e is bit e of a little-endian u32
            o = 2 if QTYPE == 6 else 4
            qh = _byte(B, o, ok) | (_byte(B, o + 1, ok) << 8) | (_byte(B, o + 2, ok) << 16)
            qh = qh.to(tl.uint32) | (_byte(B, o + 3, ok).to(tl.uint32) << 24)  # read once per block
            q = q | (((qh >> e) & 1) << 4).to(tl.int32)
        if QTYPE == 2:
            v = d * (q.to(tl.float32) - 8.0)
        elif QTYPE == 6:
            v = d * (q - 16).to(tl.float32)
        else:  # Q4_1, Q5_1: d·q + m, two roundings (no FMA)
            v = d * q.to(tl.float32) + _half(B, 2, ok)
    _store(O, blk * 32 + e, v, ok)


@triton.jit
def _dequant_k_kernel(Q, O, n_blocks, QTYPE: tl.constexpr, BYTES: tl.constexpr, BLOCKS: tl.constexpr):
    """Q2_K, Q3_K, Q4_K, Q5_K, Q6_K: program i decodes super-blocks i·BLOCKS.. as a
    [BLOCKS, 8, 32] tile: group g of 32 consecutive elements (elements 32g..32g+31), lane l.
    Per-group fields are loaded as [BLOCKS, 8, 1] and broadcast. Q: *u8; O: [n_blocks·256]."""
    blk = tl.program_id(0).to(tl.int64) * BLOCKS + tl.arange(0, BLOCKS)[:, None, None]
    ok = blk < n_blocks
    g = tl.arange(0, 8)[None, :, None]
    l = tl.arange(0, 32)[None, None, :]
    B = Q + blk * BYTES
    if QTYPE == 12 or QTYPE == 13:
        # Q4_K / Q5_K: d, dmin, scales[12] at 4, then (Q5_K) qh[32], then qs[128]. Group g is
        # sub-block g, with a 6-bit scale and min packed as in ggml's get_scale_min_k4.
        d, dmin = _half(B, 0, ok), _half(B, 2, ok)
        a, b, c = _byte(B, 4 + g, ok), _byte(B, 8 + g, ok), _byte(B, g, ok)
        low = g < 4
        sc = tl.where(low, a & 63, (b & 15) | ((c >> 6) << 4))
        mn = tl.where(low, b & 63, (b >> 4) | ((a >> 6) << 4))
        qs = 48 if QTYPE == 13 else 16
        q = (_byte(B, qs + 32 * (g >> 1) + l, ok) >> ((g & 1) * 4)) & 15  # 2k low, 2k+1 high
        if QTYPE == 13:
            q = q | (((_byte(B, 16 + l, ok) >> g) & 1) << 4)
        v = (d * sc.to(tl.float32)) * q.to(tl.float32) - dmin * mn.to(tl.float32)
    elif QTYPE == 14:
        # Q6_K: ql[128], qh[64], int8 scales[16], d. Half h = g // 4, quarter k = g % 4: low 4
        # bits from ql[64h + 32(k%2) + l] (low nibble for k < 2), high 2 from qh[32h + l] >> 2k;
        # 16-element sub-block 2g + l // 16.
        h, k = g >> 2, g & 3
        q = (_byte(B, 64 * h + 32 * (k & 1) + l, ok) >> ((k >> 1) * 4)) & 15
        q = q | (((_byte(B, 128 + 32 * h + l, ok) >> (2 * k)) & 3) << 4)
        sc = tl.load(B + 192 + 2 * g + (l >> 4), mask=ok, other=0).to(tl.int8, bitcast=True)
        d = _half(B, 208, ok)
        v = (d * sc.to(tl.float32)) * (q - 32).to(tl.float32)
    else:
        # Q2_K (scales[16], qs[64], d, dmin) and Q3_K (hmask[32], qs[64], scales[12], d): 2 low
        # bits from qs[32h + l] >> 2k (h = g // 4, k = g % 4); 16-element sub-block s = 2g + l // 16.
        h, k = g >> 2, g & 3
        s = 2 * g + (l >> 4)
        qs = 16 if QTYPE == 10 else 32
        q = (_byte(B, qs + 32 * h + l, ok) >> (2 * k)) & 3
        if QTYPE == 10:
            sb = _byte(B, s, ok)
            d, dmin = _half(B, 80, ok), _half(B, 82, ok)
            v = (d * (sb & 15).to(tl.float32)) * q.to(tl.float32) - dmin * (sb >> 4).to(tl.float32)
        else:
            # the high bit is bit g of hmask[l]; a clear bit subtracts 4. The 6-bit scale s: low 4
            # bits from scales[s % 8] (high nibble for s ≥ 8), high 2 from scales[8 + s % 4] >> 2(s // 4)
            q = q - 4 * (1 - ((_byte(B, l, ok) >> g) & 1))
            lo = (_byte(B, 96 + (s & 7), ok) >> ((s >> 3) * 4)) & 15
            hi = (_byte(B, 104 + (s & 3), ok) >> ((s >> 2) * 2)) & 3
            d = _half(B, 108, ok)
            v = (d * ((lo | (hi << 4)).to(tl.float32) - 32.0)) * q.to(tl.float32)
    _store(O, blk * 256 + 32 * g + l, v, ok)


def unsupported_reason(raw: Tensor, qtype: str, dtype: torch.dtype) -> str | None:
    """None if `dequantize_gguf` can decode these bytes to `dtype` here, else why not."""
    if qtype not in TYPES:
        return f"GGUF type {qtype} has no Triton kernel (covered: {', '.join(TYPES)})"
    if dtype not in OUT_DTYPES:
        return f"output dtype {dtype} is not supported (bfloat16, float16 or float32)"
    if raw.dtype != torch.uint8:
        return f"raw GGUF bytes must be uint8, found {raw.dtype}"
    if INTERPRET:
        return None if raw.device.type == "cpu" else "TRITON_INTERPRET=1 runs on CPU tensors only"
    if raw.device.type != "cuda":
        return f"the Triton kernels need a CUDA device, not {raw.device.type!r}"
    return None


@triton_op("fluxcore::dequantize_gguf", mutates_args=())
def dequantize_gguf(raw: Tensor, qtype: str, dtype: torch.dtype, blocks: int = 0) -> Tensor:
    """Packed GGUF blocks → their values, flat.

    raw: uint8 (any shape, contiguous or not) holding n_blocks whole blocks of `qtype`;
    dtype: bfloat16, float16 or float32; blocks: blocks per program (a power of two; 0 = the
    default, `blocks_per_program`). Returns a contiguous [n_blocks · elements] `dtype` tensor on
    raw's device, equal bit for bit to `dequantize_gguf_reference`."""
    reason = unsupported_reason(raw, qtype, dtype)
    if reason is not None:
        raise ValueError(f"dequantize_gguf: {reason}")
    type_id, elements, size = TYPES[qtype]
    if raw.numel() % size:
        raise ValueError(f"dequantize_gguf: {raw.numel()} bytes are not a whole number of {qtype} blocks")
    raw = raw.reshape(-1).contiguous()
    n_blocks = raw.numel() // size
    out = torch.empty(n_blocks * elements, dtype=dtype, device=raw.device)
    if _common.POISON_OUTPUTS:
        out.fill_(float("nan"))
    if n_blocks == 0:
        return out
    per = blocks or blocks_per_program(qtype)
    if per & (per - 1):
        raise ValueError(f"dequantize_gguf: blocks per program must be a power of two, got {per}")
    kernel = _dequant_32_kernel if elements == 32 else _dequant_k_kernel
    # FMA contraction would fuse d·q + m into one rounding; the PyTorch decoder rounds twice
    wrap_triton(kernel)[(triton.cdiv(n_blocks, per),)](
        raw, out, n_blocks, QTYPE=type_id, BYTES=size, BLOCKS=per,
        num_warps=warps_for(per * elements), enable_fp_fusion=False,
    )  # fmt: skip
    return out


def dequantize_gguf_reference(raw: Tensor, qtype: str, dtype: torch.dtype, blocks: int = 0) -> Tensor:
    """fluxcore's PyTorch decoder (float32, then the cast), flat: what the kernel must equal."""
    from fluxcore.quant.gguf import dequantize_torch

    _, elements, size = TYPES[qtype]
    return dequantize_torch(raw, qtype, (raw.numel() // size * elements,), dtype)


if INTERPRET:  # interpreted kernels cannot run on fake tensors; torch.compile gets shapes from here

    @dequantize_gguf.register_fake
    def _(raw: Tensor, qtype: str, dtype: torch.dtype, blocks: int = 0) -> Tensor:
        _, elements, size = TYPES[qtype]
        return raw.new_empty(raw.numel() // size * elements, dtype=dtype)
