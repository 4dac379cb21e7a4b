"""Writing safetensors: one file (`write_safetensors`), or a Hugging Face sharded set with its index
(`write_sharded`). Tensors are written one at a time, never gathered into a second copy."""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import Tensor

from fluxcore.atomic import atomic_folder, atomic_write, atomic_write_json
from fluxcore.errors import ConfigError
from fluxcore.weights.errors import UnsupportedDtypeError
from fluxcore.weights.header import TORCH_TO_SAFETENSORS


def write_safetensors(path, tensors: Mapping[str, Tensor], metadata: Mapping[str, str] | None = None) -> int:
    """Write `tensors` as one safetensors file, streaming tensor by tensor (never a second copy of
    the whole set in memory; CUDA tensors come to the host one at a time). The file appears under
    its name only when complete (`fluxcore.atomic.atomic_write`: temp file, fsync, rename); a failed
    save raises SaveError and leaves what was at `path` before. Returns the number of bytes written."""
    path = Path(path)
    entries: dict[str, dict] = {}
    offset = 0
    for key, t in tensors.items():
        if t.dtype not in TORCH_TO_SAFETENSORS:
            raise UnsupportedDtypeError(f"cannot save {key!r}: safetensors has no dtype {t.dtype}")
        nbytes = t.numel() * t.element_size()
        entries[key] = {
            "dtype": TORCH_TO_SAFETENSORS[t.dtype],
            "shape": list(t.shape),
            "data_offsets": [offset, offset + nbytes],
        }
        offset += nbytes
    head = {"__metadata__": dict(metadata)} if metadata else {}
    raw = json.dumps({**head, **entries}, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)  # data starts 8-byte aligned, so every tensor can be viewed in place
    with atomic_write(path) as f:
        f.write(len(raw).to_bytes(8, "little"))
        f.write(raw)
        for t in tensors.values():
            if t.numel():
                t = t.detach().to("cpu").contiguous().reshape(-1)
                f.write(t.view(torch.uint8).numpy().data)
    return 8 + len(raw) + offset


def parse_size(size) -> int:
    """A byte count from an int or a string like '10GB', '512MiB', '100KB' (decimal or binary units)."""
    if isinstance(size, int) and not isinstance(size, bool) and size > 0:
        return size
    if isinstance(size, str):
        m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]i?B|B)?\s*", size, flags=re.IGNORECASE)
        if m:
            unit = (m.group(2) or "B").upper()
            scale = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}
            value = int(float(m.group(1)) * scale[unit])
            if value > 0:
                return value
    raise ConfigError(f"max_shard_size must be a positive byte count or a string like '10GB', got {size!r}")


def _shards(tensors: Mapping[str, Tensor], limit: int) -> list[list[str]]:
    """Keys split, in order, into runs of at most `limit` bytes (a bigger tensor gets a run alone)."""
    shards: list[list[str]] = [[]]
    size = 0
    for key, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > limit:
            shards.append([])
            size = 0
        shards[-1].append(key)
        size += nbytes
    return shards


def write_sharded(
    folder, tensors: Mapping[str, Tensor], filename: str, max_shard_size: int | str
) -> list[Path]:
    """Write `tensors` into `folder` as `filename` (e.g. diffusion_pytorch_model.safetensors), or, when
    they exceed `max_shard_size` bytes, as `<stem>-0000k-of-0000n.safetensors` shards plus the standard
    index `<filename>.index.json` ({"metadata": {"total_size"}, "weight_map": {key: shard}}).
    Atomic as a whole (`fluxcore.atomic.atomic_folder`): the new files are written beside the
    folder, swapped in together, and earlier `<stem>*` weight files go only after that; other
    files in the folder are kept. Returns the files written (under `folder`)."""
    folder = Path(folder)
    limit = parse_size(max_shard_size)
    stem = filename.removesuffix(".safetensors")
    with atomic_folder(folder, replace=(f"{stem}*.safetensors*",)) as tmp:
        names = write_shards(tmp, tensors, filename, limit)
    return [folder / n for n in names]


def write_shards(
    folder, tensors: Mapping[str, Tensor], filename: str, max_shard_size: int | str
) -> list[str]:
    """`write_sharded`'s files, written into an existing (staging) `folder` file by file, each
    atomically, without touching anything else there. Returns the file names written."""
    folder = Path(folder)
    limit = parse_size(max_shard_size)
    stem = filename.removesuffix(".safetensors")
    shards = _shards(tensors, limit)
    if len(shards) == 1:
        write_safetensors(folder / filename, tensors, {"format": "pt"})
        return [filename]
    weight_map, total, written = {}, 0, []
    for i, keys in enumerate(shards, 1):
        name = f"{stem}-{i:05d}-of-{len(shards):05d}.safetensors"
        part = {k: tensors[k] for k in keys}
        write_safetensors(folder / name, part, {"format": "pt"})
        total += sum(t.numel() * t.element_size() for t in part.values())
        weight_map.update(dict.fromkeys(keys, name))
        written.append(name)
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    atomic_write_json(folder / f"{filename}.index.json", index)
    return written
