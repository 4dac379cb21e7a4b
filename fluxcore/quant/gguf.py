"""GGUF (ggml) weights: the block formats, their dequantization in PyTorch, and reading `.gguf`
files with the `gguf` package's `GGUFReader` (city96's FLUX transformer files, T5 encoder files).

Block formats (one row of a weight is a whole number of blocks; little-endian; f16 = IEEE half):

    type   elements  bytes  fields, in order                                   value
    Q8_0   32        34     d f16, q int8[32]                                  d·q
    Q4_0   32        18     d f16, nibbles[16] (low = elem 0-15, high = 16-31) d·(q − 8)
    Q4_1   32        20     d f16, m f16, nibbles[16]                          d·q + m
    Q5_0   32        22     d f16, qh u32 (bit i = 5th bit of elem i), nibbles d·(q − 16)
    Q5_1   32        24     d f16, m f16, qh u32, nibbles[16]                  d·q + m
    Q2_K   256       84     scales[16] (lo 4 bits scale, hi 4 bits min), qs[64] 2-bit, d, dmin
    Q3_K   256       110    hmask[32], qs[64] 2-bit, scales[12] (16 × 6 bit, −32), d
    Q4_K   256       144    d, dmin, scales[12] (8 × 6-bit scale + 8 × 6-bit min), qs[128]
    Q5_K   256       176    d, dmin, scales[12], qh[32], qs[128]
    Q6_K   256       210    ql[128], qh[64], scales int8[16], d

K-quant sub-blocks hold 16 (Q2_K, Q3_K, Q6_K) or 32 (Q4_K, Q5_K) elements, each with its own scale
(and min), all times the super-block's d (and dmin). Every decoder below works on a whole tensor at
once: raw uint8 [..., n_blocks·bytes] → float32 [..., n_blocks·elements], in float32 with the same
order of operations as ggml's reference decoder, so results are bit-identical to it.

GGUF stores shapes innermost-first (ggml `ne[0]` = a row's length): a torch Linear weight
[out, in] is a GGUF tensor of shape (in, out). `GGUFReader` already reverses them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from fluxcore.errors import WeightsError

# ggml type id → (name, elements per block, bytes per block)
GGML_TYPES: dict[int, tuple[str, int, int]] = {
    0: ("F32", 1, 4),
    1: ("F16", 1, 2),
    2: ("Q4_0", 32, 18),
    3: ("Q4_1", 32, 20),
    6: ("Q5_0", 32, 22),
    7: ("Q5_1", 32, 24),
    8: ("Q8_0", 32, 34),
    10: ("Q2_K", 256, 84),
    11: ("Q3_K", 256, 110),
    12: ("Q4_K", 256, 144),
    13: ("Q5_K", 256, 176),
    14: ("Q6_K", 256, 210),
    30: ("BF16", 1, 2),
}
TYPE_IDS = {name: i for i, (name, _, _) in GGML_TYPES.items()}
FLOAT_TYPES = ("F32", "F16", "BF16")


def _f16(b: Tensor) -> Tensor:
    """uint8 [..., 2k] → float32 [..., k], reading little-endian halves."""
    return b.contiguous().view(torch.float16).float()


def _u32(b: Tensor) -> Tensor:
    """uint8 [..., 4] → int64 [..., 1] (little-endian u32)."""
    b = b.long()
    return b[..., 0:1] | (b[..., 1:2] << 8) | (b[..., 2:3] << 16) | (b[..., 3:4] << 24)


def _nibbles(qs: Tensor) -> Tensor:
    """[n, 16] bytes → [n, 32] values: low nibbles first (elements 0-15), then high (16-31)."""
    return torch.cat((qs & 0x0F, qs >> 4), dim=-1)


def _q8_0(b: Tensor) -> Tensor:
    d = _f16(b[:, :2])
    return d * b[:, 2:].contiguous().view(torch.int8).float()


def _q4_0(b: Tensor) -> Tensor:
    d = _f16(b[:, :2])
    return d * (_nibbles(b[:, 2:]).float() - 8)


def _q4_1(b: Tensor) -> Tensor:
    d, m = _f16(b[:, :2]), _f16(b[:, 2:4])
    return d * _nibbles(b[:, 4:]).float() + m


def _high_bits(qh: Tensor) -> Tensor:
    """u32 [n, 1] → the 5th bit of each of 32 elements, [n, 32] (bit i for element i), times 16."""
    return ((qh >> torch.arange(32, device=qh.device)) & 1) << 4


def _q5_0(b: Tensor) -> Tensor:
    d = _f16(b[:, :2])
    q = _nibbles(b[:, 6:]).long() | _high_bits(_u32(b[:, 2:6]))
    return d * (q - 16).float()


def _q5_1(b: Tensor) -> Tensor:
    d, m = _f16(b[:, :2]), _f16(b[:, 2:4])
    q = _nibbles(b[:, 8:]).long() | _high_bits(_u32(b[:, 4:8]))
    return d * q.float() + m


def _shifts(device, *steps: int) -> Tensor:
    """uint8 shift amounts (an evenly spaced range) made on `device` itself: no host copy, no sync."""
    step = steps[1] - steps[0] if len(steps) > 1 else 1
    return torch.arange(steps[0], steps[-1] + 1, step, dtype=torch.uint8, device=device)


def _q2_k(b: Tensor) -> Tensor:
    n = b.shape[0]
    scales, qs = b[:, :16], b[:, 16:80]
    d, dmin = _f16(b[:, 80:82]), _f16(b[:, 82:84])
    dl = (d * (scales & 0x0F).float())[:, :, None]  # [n, 16, 1]
    ml = (dmin * (scales >> 4).float())[:, :, None]
    # Each half of 128 elements: 4 bit-planes (shift 0,2,4,6) of the same 32 bytes.
    q = (qs.reshape(n, 2, 1, 32) >> _shifts(b.device, 0, 2, 4, 6).reshape(1, 1, 4, 1)) & 3
    q = q.reshape(n, 16, 16).float()
    return (dl * q - ml).reshape(n, 256)


def _scales_6bit_q3(s: Tensor) -> Tensor:
    """Q3_K scales[12] → 16 signed scales: low 4 bits from bytes 0-7 (low nibbles for 0-7, high
    for 8-15), high 2 bits from bytes 8-11 (pair j//4... of byte 8 + j%4)."""
    low = torch.cat((s[:, :8] & 0x0F, s[:, :8] >> 4), dim=1)  # [n, 16]
    hi_src = s[:, 8:12].repeat(1, 4)  # scale i takes byte 8 + i % 4
    shift = (torch.arange(16, device=s.device) // 4 * 2).to(torch.uint8)
    high = (hi_src >> shift) & 3
    return (low | (high << 4)).float() - 32


def _q3_k(b: Tensor) -> Tensor:
    n = b.shape[0]
    hmask, qs, scales = b[:, :32], b[:, 32:96], b[:, 96:108]
    d = _f16(b[:, 108:110])
    sc = _scales_6bit_q3(scales)
    dl = (d * sc)[:, :, None]  # [n, 16, 1]
    q = (qs.reshape(n, 2, 1, 32) >> _shifts(b.device, 0, 2, 4, 6).reshape(1, 1, 4, 1)) & 3  # [n, 2, 4, 32]
    # The high bit of element (half h, plane j, l) is bit 4h + j of hmask[l]; a clear bit subtracts 4.
    hbit = (hmask.reshape(n, 1, 32) >> _shifts(b.device, *range(8)).reshape(1, 8, 1)) & 1  # [n, 8, 32]
    q = q.reshape(n, 8, 32).to(torch.int16) - 4 * (1 - hbit.to(torch.int16))
    return (dl * q.reshape(n, 16, 16).float()).reshape(n, 256)


def _scale_min_k4(s: Tensor) -> tuple[Tensor, Tensor]:
    """Q4_K/Q5_K scales[12] → 8 scales and 8 mins (6 bits each), as float32 [n, 8]."""
    s = s.long()
    sc = torch.cat((s[:, 0:4] & 63, (s[:, 8:12] & 0x0F) | ((s[:, 0:4] >> 6) << 4)), dim=1)
    mn = torch.cat((s[:, 4:8] & 63, (s[:, 8:12] >> 4) | ((s[:, 4:8] >> 6) << 4)), dim=1)
    return sc.float(), mn.float()


def _q4_k(b: Tensor) -> Tensor:
    n = b.shape[0]
    d, dmin = _f16(b[:, 0:2]), _f16(b[:, 2:4])
    sc, mn = _scale_min_k4(b[:, 4:16])
    qs = b[:, 16:144].reshape(n, 4, 1, 32)
    q = (qs >> _shifts(b.device, 0, 4).reshape(1, 1, 2, 1)) & 0x0F  # sub-block 2k low, 2k+1 high
    q = q.reshape(n, 8, 32).float()
    return ((d * sc)[:, :, None] * q - (dmin * mn)[:, :, None]).reshape(n, 256)


def _q5_k(b: Tensor) -> Tensor:
    n = b.shape[0]
    d, dmin = _f16(b[:, 0:2]), _f16(b[:, 2:4])
    sc, mn = _scale_min_k4(b[:, 4:16])
    qh, qs = b[:, 16:48], b[:, 48:176]
    low = (qs.reshape(n, 4, 1, 32) >> _shifts(b.device, 0, 4).reshape(1, 1, 2, 1)) & 0x0F
    high = (qh.reshape(n, 1, 32) >> _shifts(b.device, *range(8)).reshape(1, 8, 1)) & 1  # sub-block s: bit s
    q = (low.reshape(n, 8, 32) | (high << 4)).float()
    return ((d * sc)[:, :, None] * q - (dmin * mn)[:, :, None]).reshape(n, 256)


def _q6_k(b: Tensor) -> Tensor:
    n = b.shape[0]
    ql, qh = b[:, :128].reshape(n, 2, 64), b[:, 128:192].reshape(n, 2, 1, 32)
    sc = b[:, 192:208].contiguous().view(torch.int8).float()  # [n, 16]
    d = _f16(b[:, 208:210])
    # Per half: quarters k = 0..3 take low nibbles of ql[0:32], ql[32:64], then high nibbles.
    low = torch.stack(
        (ql[:, :, :32] & 0x0F, ql[:, :, 32:] & 0x0F, ql[:, :, :32] >> 4, ql[:, :, 32:] >> 4), dim=2
    )  # [n, 2, 4, 32]
    high = (qh >> _shifts(b.device, 0, 2, 4, 6).reshape(1, 1, 4, 1)) & 3
    q = ((low | (high << 4)).to(torch.int16) - 32).reshape(n, 16, 16).float()
    return ((d * sc)[:, :, None] * q).reshape(n, 256)


_DECODERS = {
    "Q8_0": _q8_0, "Q4_0": _q4_0, "Q4_1": _q4_1, "Q5_0": _q5_0, "Q5_1": _q5_1,
    "Q2_K": _q2_k, "Q3_K": _q3_k, "Q4_K": _q4_k, "Q5_K": _q5_k, "Q6_K": _q6_k,
}  # fmt: skip


def type_name(qtype: int | str) -> str:
    if isinstance(qtype, str):
        if qtype not in TYPE_IDS:
            raise WeightsError(f"unsupported GGUF tensor type {qtype!r}; supported: {sorted(TYPE_IDS)}")
        return qtype
    if qtype not in GGML_TYPES:
        raise WeightsError(
            f"unsupported GGUF tensor type id {qtype}; supported: "
            + ", ".join(f"{n} ({i})" for i, (n, _, _) in GGML_TYPES.items())
        )
    return GGML_TYPES[qtype][0]


def row_bytes(qtype: int | str, row_len: int) -> int:
    """Bytes one row of `row_len` elements takes in `qtype`."""
    _, block, size = GGML_TYPES[TYPE_IDS[type_name(qtype)]]
    if row_len % block:
        raise WeightsError(f"a {type_name(qtype)} row must be a multiple of {block} elements, got {row_len}")
    return row_len // block * size


def dequantize(
    raw: Tensor, qtype: int | str, shape: tuple[int, ...], dtype: torch.dtype = torch.float32
) -> Tensor:
    """Raw GGUF bytes (uint8, any shape whose total is the tensor's byte size) → a `dtype` tensor of
    `shape` (torch order). Decoding is in float32; the cast to `dtype` comes last.

    On a CUDA tensor of a type `fluxcore.kernels.dequant` covers (every block type here) the Triton
    kernel decodes it in one pass, with the same result bit for bit; anywhere else, or without
    triton, `dequantize_torch` does."""
    name = type_name(qtype)
    if name not in FLOAT_TYPES and name not in _KERNEL_BROKEN and _use_kernel(raw):
        out = _dequantize_kernel(raw, name, shape, dtype)
        if out is not None:
            return out
    return dequantize_torch(raw, name, shape, dtype)


# Types whose kernel failed to launch on this machine: they take the PyTorch path from then on.
_KERNEL_BROKEN: set[str] = set()


def _use_kernel(raw: Tensor) -> bool:
    """Whether to try the Triton kernel: CUDA tensors only (a function so tests can route
    interpreter runs on CPU tensors through the same dispatch)."""
    return raw.is_cuda


def _dequantize_kernel(raw: Tensor, name: str, shape: tuple[int, ...], dtype: torch.dtype) -> Tensor | None:
    """The Triton kernel's result, or None where it cannot run (no triton, an uncovered type or
    dtype, or a launch that failed: that one warns once, naming the type, and is not retried)."""
    try:
        from fluxcore.kernels import dequant
    except ImportError:  # triton is optional: the PyTorch decoders need nothing else
        _KERNEL_BROKEN.update(n for n, _, _ in GGML_TYPES.values())
        return None
    if raw.dtype != torch.uint8:
        raw = raw.view(torch.uint8)
    if dequant.unsupported_reason(raw, name, dtype) is not None:
        return None
    numel = 1
    for s in shape:
        numel *= s
    _, block, size = GGML_TYPES[TYPE_IDS[name]]
    if raw.numel() * block != numel * size:
        return None  # dequantize_torch raises the size error
    try:
        return dequant.dequantize_gguf(raw, name, dtype).reshape(shape)
    except Exception as e:  # a GPU or driver the compiled kernel does not support
        import warnings

        _KERNEL_BROKEN.add(name)
        warnings.warn(
            f"the Triton GGUF {name} dequantization kernel failed ({type(e).__name__}: {str(e)[:300]}); "
            f"{name} weights are decoded by the PyTorch path from now on",
            RuntimeWarning,
            stacklevel=3,
        )
        return None


def dequantize_torch(
    raw: Tensor, qtype: int | str, shape: tuple[int, ...], dtype: torch.dtype = torch.float32
) -> Tensor:
    """`dequantize` in PyTorch alone, on any device (the reference the Triton kernel equals)."""
    name = type_name(qtype)
    _, block, size = GGML_TYPES[TYPE_IDS[name]]
    raw = raw.reshape(-1)
    if raw.dtype != torch.uint8:
        raw = raw.view(torch.uint8)
    numel = 1
    for s in shape:
        numel *= s
    if raw.numel() * block != numel * size:
        raise WeightsError(
            f"GGUF {name} tensor of shape {list(shape)} needs {numel * size // block} bytes, got {raw.numel()}"
        )
    if name == "F32":
        out = raw.view(torch.float32)
    elif name == "F16":
        out = raw.view(torch.float16)
    elif name == "BF16":
        out = raw.view(torch.bfloat16)
    else:
        out = _DECODERS[name](raw.reshape(-1, size))
    return out.reshape(shape).to(dtype)


# --- files ----------------------------------------------------------------------------------------


@dataclass
class GGUFTensor:
    """One tensor of a GGUF file: name, type name, torch-order shape, raw bytes (uint8, a view of
    the file's memory map until copied), and where those bytes start in the file (None when the
    tensor did not come from a file)."""

    name: str
    qtype: str
    shape: tuple[int, ...]
    data: Tensor
    offset: int | None = None

    def dequantize(self, dtype: torch.dtype = torch.float32) -> Tensor:
        return dequantize(self.data, self.qtype, self.shape, dtype)


def is_gguf(path) -> bool:
    path = Path(path)
    if not path.is_file():
        return False
    with open(path, "rb") as f:
        return f.read(4) == b"GGUF"


def read_gguf(path) -> tuple[dict[str, GGUFTensor], dict[str, object]]:
    """({name: GGUFTensor}, {metadata key: value}) of a .gguf file. Tensor bytes stay memory-mapped
    (nothing is read until used). Shapes are torch order; `comfy.gguf.orig_shape.<name>` metadata,
    where present, overrides a tensor's shape."""
    try:
        from gguf import GGUFReader
    except ImportError as e:  # pragma: no cover - gguf is a dependency
        raise WeightsError("reading .gguf files needs the `gguf` package (pip install gguf)") from e
    path = Path(path)
    if not is_gguf(path):
        raise WeightsError(f"{path} is not a GGUF file (no GGUF magic)")
    try:
        reader = GGUFReader(str(path), "c")  # copy-on-write: torch needs a writable array
    except Exception as e:
        raise WeightsError(f"cannot read GGUF file {path}: {e}") from None
    meta: dict[str, object] = {}
    for name, field in reader.fields.items():
        if name.startswith("GGUF."):
            continue
        try:
            meta[name] = field.contents()
        except Exception:  # a field type this gguf version cannot decode: skip it
            pass
    tensors = {}
    for t in reader.tensors:
        qtype = type_name(int(t.tensor_type))
        shape = tuple(int(s) for s in reversed(t.shape.tolist()))
        orig = meta.get(f"comfy.gguf.orig_shape.{t.name}")
        if orig is not None:
            shape = tuple(int(s) for s in orig)
        data = torch.from_numpy(np.asarray(t.data).view(np.uint8).reshape(-1))
        tensors[t.name] = GGUFTensor(t.name, qtype, shape, data, int(t.data_offset))
    return tensors, meta
