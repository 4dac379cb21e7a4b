"""The safetensors file format: dtype names, and `read_header`, which parses and validates a file's
header (never its tensor data).

Layout of a file: 8 bytes little-endian header length n, n bytes of JSON
({key: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {str: str}}), then the data
section, into which the offsets point.
"""

from __future__ import annotations

import json
import math
import os
import struct
from pathlib import Path

import torch

from fluxcore.weights.errors import CheckpointNotFoundError, CorruptCheckpointError, UnsupportedDtypeError

# safetensors cap (the reference implementation refuses larger headers too): a bigger number in
# the first 8 bytes means the file is something else or is corrupt.
MAX_HEADER_BYTES = 100_000_000

# safetensors dtype name → torch dtype. Anything else is reported as unsupported.
SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "U16": torch.uint16,
    "U32": torch.uint32,
    "U64": torch.uint64,
    "BOOL": torch.bool,
}
TORCH_TO_SAFETENSORS = {v: k for k, v in SAFETENSORS_DTYPES.items()}
FLOAT8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)


def _sniff(head: bytes) -> str:
    """A hint for files that are obviously some other format."""
    if head.startswith(b"PK"):
        return " It looks like a PyTorch .pt/.ckpt (zip/pickle) file; fluxcore reads only .safetensors."
    if head.startswith(b"GGUF"):
        return " It is a GGUF file, which fluxcore does not read; use the .safetensors release."
    if head.startswith(b"version https://git-lfs"):
        return " It is a Git LFS pointer, not the weights: fetch the real file (`git lfs pull`)."
    if head.startswith(b"\x80"):
        return " It looks like a Python pickle; fluxcore reads only .safetensors."
    return ""


def read_header(path) -> dict:
    """The parsed safetensors header of `path`: {key: {"dtype", "shape", "data_offsets"}, and
    "__metadata__": {str: str} when present}. Reads only the header bytes, never tensor data.

    Validates everything a later read relies on, with the rules of the reference implementation:
    no duplicate keys; dtype names known; shapes lists of non-negative ints; each byte range of
    exactly numel × itemsize bytes; the ranges, sorted, tile the data section exactly (no overlap,
    no gap, nothing past the end, no bytes left over). Raises a WeightsError subclass naming the
    file and what is wrong; nothing else escapes.
    """
    with open_file(Path(path)) as f:
        return _read_header(Path(path), f)[0]


def open_file(path: Path):
    """`path` opened for unbuffered binary reads, or the WeightsError saying why it cannot be."""
    if not path.exists():
        raise CheckpointNotFoundError(f"no such file: {path}")
    if not path.is_file():
        raise CorruptCheckpointError(f"{path} is not a file (expected a .safetensors file)")
    try:
        return open(path, "rb", buffering=0)  # noqa: SIM115 (the caller closes it)
    except FileNotFoundError:
        raise CheckpointNotFoundError(f"no such file: {path}") from None
    except OSError as e:
        raise CorruptCheckpointError(f"cannot open {path}: {e}") from None


def _unique_keys(path: Path):
    def hook(pairs):
        out = {}
        for k, v in pairs:
            if k in out:
                raise CorruptCheckpointError(f"{path}: corrupt safetensors header: key {k!r} appears twice")
            out[k] = v
        return out

    return hook


def _read_header(path: Path, f) -> tuple[dict, int]:
    """(header, header length n) read from the open file `f` of `path`; data starts at 8 + n."""
    try:
        size = os.fstat(f.fileno()).st_size
        f.seek(0)
        head = f.read(8)
        if len(head) < 8:
            raise CorruptCheckpointError(
                f"{path} is not a safetensors file: it has {size} bytes, fewer than the 8-byte header length"
            )
        (n,) = struct.unpack("<Q", head)
        if n > MAX_HEADER_BYTES or n + 8 > size:
            head += f.read(32)
            raise CorruptCheckpointError(
                f"{path} is not a safetensors file or is truncated: its first 8 bytes declare a "
                f"{n}-byte header, but the file has {size} bytes in all.{_sniff(head)}"
            )
        raw = bytearray()
        while len(raw) < n:
            chunk = f.read(n - len(raw))
            if not chunk:
                break
            raw += chunk
    except OSError as e:
        raise CorruptCheckpointError(f"cannot read {path}: {e}") from None
    if len(raw) != n:
        raise CorruptCheckpointError(f"{path} is truncated: expected a {n}-byte header, read {len(raw)}")
    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=_unique_keys(path))
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise CorruptCheckpointError(
            f"{path}: corrupt safetensors header ({n} bytes are not valid UTF-8 JSON: {e}).{_sniff(head)}"
        ) from None
    if not isinstance(header, dict):
        raise CorruptCheckpointError(
            f"{path}: corrupt safetensors header: expected a JSON object, found {type(header).__name__}"
        )
    data_size = size - 8 - n
    for key, info in header.items():
        if key == "__metadata__":
            if not isinstance(info, dict) or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in info.items()
            ):
                raise CorruptCheckpointError(
                    f"{path}: corrupt header: __metadata__ must map strings to strings"
                )
            continue
        _check_entry(path, key, info, data_size)
    _check_coverage(path, header, data_size)
    return header, n


def _check_coverage(path: Path, header: dict, data_size: int) -> None:
    """The byte ranges, in order, must tile [0, data_size): each starts where the last ended."""
    ranges = sorted(
        (tuple(info["data_offsets"]), key) for key, info in header.items() if key != "__metadata__"
    )
    end, last = 0, None
    for (b, e), key in ranges:
        if b < end:
            raise CorruptCheckpointError(
                f"{path}: corrupt safetensors header: tensor {key!r} (data bytes {b}..{e}) overlaps "
                f"{last!r}, which ends at {end}"
            )
        if b > end:
            raise CorruptCheckpointError(
                f"{path}: corrupt safetensors header: data bytes {end}..{b} belong to no tensor "
                f"(a gap before {key!r})"
            )
        end, last = e, key
    if end != data_size:
        raise CorruptCheckpointError(
            f"{path}: the data section has {data_size} bytes but its tensors cover only {end}: "
            f"{data_size - end} trailing bytes belong to no tensor (a corrupt or concatenated file?)"
        )


def _check_entry(path: Path, key: str, info, data_size: int) -> None:
    where = f"{path}: tensor {key!r}"
    if not isinstance(info, dict):
        raise CorruptCheckpointError(
            f"{where}: corrupt header entry (expected an object, found {info!r:.80})"
        )
    dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
    if not isinstance(dtype, str):
        raise CorruptCheckpointError(f"{where}: corrupt header entry, dtype is {dtype!r:.80}")
    if dtype not in SAFETENSORS_DTYPES:
        raise UnsupportedDtypeError(
            f"{where} has dtype {dtype!r}, which fluxcore cannot load; supported: "
            f"{', '.join(SAFETENSORS_DTYPES)}"
        )
    if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
        raise CorruptCheckpointError(
            f"{where}: corrupt header entry, shape must be a list of non-negative ints, found {shape!r:.80}"
        )
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(type(o) is int for o in offsets)
        or not 0 <= offsets[0] <= offsets[1]
    ):
        raise CorruptCheckpointError(
            f"{where}: corrupt header entry, data_offsets must be [begin, end] with 0 <= begin <= end, "
            f"found {offsets!r:.80}"
        )
    nbytes = math.prod(shape) * SAFETENSORS_DTYPES[dtype].itemsize
    if offsets[1] - offsets[0] != nbytes:
        raise CorruptCheckpointError(
            f"{where}: corrupt header entry, {dtype} {shape} needs {nbytes} bytes but data_offsets "
            f"{offsets} span {offsets[1] - offsets[0]}"
        )
    if offsets[1] > data_size:
        raise CorruptCheckpointError(
            f"{path} is truncated: tensor {key!r} ends at data byte {offsets[1]}, but the file holds "
            f"only {data_size} data bytes"
        )
