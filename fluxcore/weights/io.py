"""The one safetensors stack of fluxcore: `open_checkpoint` / `Checkpoint` read single files and
Hugging Face shard indexes; the header parser (`header.py`), `load_into` (`assign.py`) and
`write_safetensors` (`writer.py`) are re-exported here, so every loader imports from this module.

Memory model: nothing is read until a tensor is asked for, and then only that tensor. Two ways:
`Checkpoint.get` returns a view of a copy-on-write memory map (zero-copy, bytes fault in on first
touch; `release` drops them again), and `Checkpoint.read` / `Checkpoint.stream` read a tensor with
plain file reads into fresh memory the caller owns (no file page ever counts against the process,
and it is several times faster than faulting a mapping in and copying it). `load_flux` streams, so
peak host memory is the loaded model plus about one tensor.

Each file is opened once, and its header, mapping and reads all use that one open file, so a
save that replaces it meanwhile cannot mix two files. `get` checks the file's size before it
hands out a mapped view (touching a mapped page past the end of a file truncated in place would
kill the process with SIGBUS); `read`/`stream` use plain reads and are immune to truncation.
"""

from __future__ import annotations

import json
import math
import mmap
import os
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path

import torch
from torch import Tensor

from fluxcore.errors import WeightsError

# The rest of the stack, importable from here too: errors, the header parser, load_into, the writer.
from fluxcore.weights.assign import load_into
from fluxcore.weights.errors import (
    CheckpointNotFoundError,
    CorruptCheckpointError,
    KeyMismatchError,
    ShapeMismatchError,
    UnknownVariantError,
    UnsupportedDtypeError,
)
from fluxcore.weights.header import (
    FLOAT8_DTYPES,
    SAFETENSORS_DTYPES,
    TORCH_TO_SAFETENSORS,
    _read_header,
    open_file,
    read_header,
)
from fluxcore.weights.writer import write_safetensors

__all__ = [
    "FLOAT8_DTYPES",
    "SAFETENSORS_DTYPES",
    "TORCH_TO_SAFETENSORS",
    "Checkpoint",
    "CheckpointNotFoundError",
    "CorruptCheckpointError",
    "KeyMismatchError",
    "ShapeMismatchError",
    "UnknownVariantError",
    "UnsupportedDtypeError",
    "default_dtype",
    "load_into",
    "open_checkpoint",
    "read_header",
    "read_json",
    "write_safetensors",
]


def read_json(path, *, missing_ok: bool = False) -> dict:
    """A JSON object from `path` (config.json, model_index.json, an index, tokenizer_config.json).

    A missing file is CheckpointNotFoundError, or {} with missing_ok; unreadable text, invalid JSON
    or a top-level value that is not an object is a WeightsError naming the file."""
    path = Path(path)
    if not path.is_file():
        if missing_ok:
            return {}
        raise CheckpointNotFoundError(f"no such file: {path}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as e:
        raise WeightsError(f"cannot read {path}: {e}") from None
    if not isinstance(data, dict):
        raise WeightsError(f"{path}: expected a JSON object, found {type(data).__name__}")
    return data


def default_dtype(device=None) -> torch.dtype:
    """The dtype loaders use when none is given: bfloat16 on CUDA (FLUX activations overflow
    float16), float32 elsewhere (CPU bfloat16 matmuls are slow and rarely what a test wants)."""
    return (
        torch.bfloat16
        if torch.device(device if device is not None else "cpu").type == "cuda"
        else torch.float32
    )


# --- checkpoints --------------------------------------------------------------------------------


class _File:
    """One safetensors file: its validated header and a lazily opened copy-on-write mapping."""

    def __init__(self, path: Path):
        self.path = path
        # One open file for the header, the mapping and the reads: a save that replaces the file
        # meanwhile (a rename) cannot pair this header with another file's bytes.
        self._fd = open_file(path)
        try:
            header, n = _read_header(path, self._fd)
        except BaseException:
            self._fd.close()
            raise
        self.metadata: dict[str, str] = header.pop("__metadata__", {})
        self.entries: dict[str, dict] = header
        self.data_start = 8 + n
        self.size = self.data_start + max((e["data_offsets"][1] for e in self.entries.values()), default=0)
        self._map: mmap.mmap | None = None

    def _check_size(self) -> None:
        """A mapped page past the end of a file that shrank would kill the process (SIGBUS) when
        touched: check the size before every mapped view is handed out."""
        try:
            size = os.fstat(self._file().fileno()).st_size
        except OSError as e:
            raise CorruptCheckpointError(f"cannot read {self.path}: {e}") from None
        if size < self.size:
            raise CorruptCheckpointError(
                f"{self.path} was truncated after it was opened: {size} bytes, need {self.size}"
            )

    def _file(self):
        if self._fd is None:
            raise CorruptCheckpointError(f"{self.path}: the checkpoint was closed")
        return self._fd

    def _mapping(self) -> mmap.mmap:
        self._check_size()
        if self._map is None:
            try:
                # ACCESS_COPY: private and writable, so torch gets a writable buffer and a write
                # to a returned tensor can never reach the file.
                self._map = mmap.mmap(self._file().fileno(), 0, access=mmap.ACCESS_COPY)
            except (OSError, ValueError) as e:
                raise CorruptCheckpointError(f"cannot memory-map {self.path}: {e}") from None
            if len(self._map) < self.size:  # the file shrank since its header was read
                raise CorruptCheckpointError(
                    f"{self.path} is truncated: {len(self._map)} bytes, need {self.size}"
                )
        return self._map

    def tensor(self, key: str) -> Tensor:
        e = self.entries[key]
        dtype = SAFETENSORS_DTYPES[e["dtype"]]
        shape = tuple(e["shape"])
        begin, end = e["data_offsets"]
        if end == begin:
            return torch.empty(shape, dtype=dtype)
        offset = self.data_start + begin
        buf = self._mapping()
        if offset % dtype.itemsize:
            # torch wants element-aligned storage; safetensors does not promise it. Copy the bytes
            # of this one tensor into aligned memory.
            out = torch.empty(shape, dtype=dtype)
            out.view(-1).view(torch.uint8).copy_(
                torch.frombuffer(buf, dtype=torch.uint8, count=end - begin, offset=offset)
            )
            return out
        flat = torch.frombuffer(buf, dtype=dtype, count=(end - begin) // dtype.itemsize, offset=offset)
        return flat.view(shape)

    def read(self, key: str, out: Tensor | None = None) -> Tensor:
        """The tensor `key` in fresh memory of its own (or in `out`: contiguous, same dtype and
        number of elements), filled by plain file reads: no page of the file enters this process's
        memory, and the kernel copies straight into the tensor (faster than faulting a mapping in,
        then copying)."""
        e = self.entries[key]
        shape, dtype = tuple(e["shape"]), SAFETENSORS_DTYPES[e["dtype"]]
        if out is None:
            out = torch.empty(shape, dtype=dtype)
        elif out.dtype != dtype or out.numel() != math.prod(shape) or not out.is_contiguous():
            raise ValueError(
                f"read({key!r}, out=...): out must be a contiguous {dtype} tensor of {list(shape)}"
            )
        begin, end = e["data_offsets"]
        if end == begin:
            return out
        view = out.view(-1).view(torch.uint8).numpy()
        fd = self._file()
        try:
            fd.seek(self.data_start + begin)
            done = 0
            while done < end - begin:
                n = fd.readinto(view[done:])
                if not n:
                    raise CorruptCheckpointError(
                        f"{self.path} is truncated: tensor {key!r} ends after {done} of {end - begin} bytes"
                    )
                done += n
        except OSError as e:
            raise CorruptCheckpointError(f"cannot read {key!r} from {self.path}: {e}") from None
        return out

    def release(self, key: str) -> None:
        """Drop this tensor's pages from the process (the page cache keeps them). Reads after this
        fault the bytes back in from the file; in-place writes to the tensor would be lost."""
        if self._map is None or not hasattr(self._map, "madvise"):
            return
        begin, end = self.entries[key]["data_offsets"]
        page = mmap.PAGESIZE
        # Only whole pages inside this tensor's range, so neighbours are not touched.
        lo = -(-(self.data_start + begin) // page) * page
        hi = (self.data_start + end) // page * page
        if hi > lo:
            try:
                self._map.madvise(mmap.MADV_DONTNEED, lo, hi - lo)
            except (OSError, ValueError):
                pass

    def close(self) -> None:
        if self._fd is not None:
            self._fd.close()
            self._fd = None
        if self._map is not None:
            try:
                self._map.close()
            except BufferError:  # tensors still view it; it closes when they are gone
                pass
            self._map = None


class Checkpoint:
    """A safetensors checkpoint: one file, or the shards of a Hugging Face index.

    files:    the .safetensors files, in order.
    metadata: the file's `__metadata__` (merged over shards), plus an index's "metadata" as strings.
    Tensors are memory-mapped copy-on-write and read lazily, one at a time; nothing is read until
    `get`. Use as a context manager or call `close()` to release the mappings.
    """

    def __init__(
        self,
        files: Iterable[Path],
        *,
        source: str,
        weight_map: Mapping[str, str] | None = None,
        metadata: Mapping[str, str] | None = None,
    ):
        self.files: list[Path] = [Path(p) for p in files]
        self.source = source
        self._files = {p.name if weight_map is not None else str(p): _File(p) for p in self.files}
        self.metadata: dict[str, str] = {}
        for f in self._files.values():
            self.metadata.update(f.metadata)
        self.metadata.update(metadata or {})
        self._where: dict[str, _File] = {}
        if weight_map is None:
            for f in self._files.values():
                for key in f.entries:
                    if key in self._where:
                        raise CorruptCheckpointError(
                            f"{source}: key {key!r} is in both {self._where[key].path.name} and {f.path.name}"
                        )
                    self._where[key] = f
        else:
            for key, shard in weight_map.items():
                f = self._files[shard]
                if key not in f.entries:
                    raise CorruptCheckpointError(
                        f"{source}: the index puts {key!r} in {shard}, but that shard has no such tensor"
                    )
                self._where[key] = f

    def __repr__(self) -> str:
        return f"Checkpoint({self.source!r}, {len(self._where)} tensors in {len(self.files)} file(s))"

    def __len__(self) -> int:
        return len(self._where)

    def __contains__(self, key) -> bool:
        return key in self._where

    def __enter__(self) -> Checkpoint:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def keys(self) -> list[str]:
        return list(self._where)

    def _entry(self, key: str) -> dict:
        try:
            return self._where[key].entries[key]
        except KeyError:
            raise KeyMismatchError(f"{self.source} has no tensor {key!r}") from None

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._entry(key)["shape"])

    def dtype(self, key: str) -> torch.dtype:
        return SAFETENSORS_DTYPES[self._entry(key)["dtype"]]

    def nbytes(self, key: str) -> int:
        begin, end = self._entry(key)["data_offsets"]
        return end - begin

    def offset(self, key: str) -> int:
        """Where `key`'s bytes start in the data section of its file."""
        return self._entry(key)["data_offsets"][0]

    def file_of(self, key: str) -> Path:
        self._entry(key)
        return self._where[key].path

    def get(self, key: str) -> Tensor:
        """The tensor `key`, memory-mapped (copy-on-write; bytes are read when first touched)."""
        self._entry(key)
        return self._where[key].tensor(key)

    def read(self, key: str, out: Tensor | None = None) -> Tensor:
        """The tensor `key` in fresh memory the caller owns (plain file reads, no mapping), or
        read into `out` (contiguous, same dtype and element count; e.g. a row block of a bigger
        tensor, which is how fused tensors are assembled without a temporary)."""
        self._entry(key)
        return self._where[key].read(key, out)

    def release(self, key: str) -> None:
        """Drop the pages `get(key)` mapped in from this process once its bytes were copied
        elsewhere (they stay in the page cache). Later reads of that tensor fault them back in;
        in-place writes made to it before would be lost."""
        self._entry(key)
        self._where[key].release(key)

    def stream(self, keys: Iterable[str] | None = None) -> Iterator[tuple[str, Tensor]]:
        """(key, tensor) pairs in file order, each read into fresh memory of its own (`read`), one
        at a time: the consumer may keep the tensors as they are (`load_into(..., copy=False)`)."""
        keys = self.keys() if keys is None else list(keys)
        order = {p: i for i, p in enumerate(self.files)}
        keys.sort(key=lambda k: (order[self._where[k].path], self.offset(k)))
        for key in keys:
            yield key, self.read(key)

    def close(self) -> None:
        for f in self._files.values():
            f.close()


def _index_candidates(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.safetensors.index.json"))


def open_checkpoint(path, *, index_name: str | None = None) -> Checkpoint:
    """Open a .safetensors file, a folder holding exactly one, or a folder with a Hugging Face
    shard index (`*.safetensors.index.json`; `index_name` picks one when there are several).

    Reads headers only. Raises WeightsError subclasses: path missing, not safetensors, truncated,
    corrupt header or index, a shard named by the index missing, an ambiguous folder.
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointNotFoundError(f"no such file or folder: {path}")
    if path.is_file():
        if path.name.endswith(".index.json"):
            return _open_index(path)
        return Checkpoint([path], source=str(path))
    if index_name is not None:
        index = path / index_name
        if not index.is_file():
            raise CheckpointNotFoundError(
                f"{path} has no index {index_name!r}; found: {[p.name for p in _index_candidates(path)]}"
            )
        return _open_index(index)
    indexes = _index_candidates(path)
    if len(indexes) == 1:
        return _open_index(indexes[0])
    if len(indexes) > 1:
        raise WeightsError(
            f"{path} holds several shard indexes {[p.name for p in indexes]}; pass index_name= to pick one"
        )
    files = sorted(path.glob("*.safetensors"))
    if len(files) == 1:
        return Checkpoint(files, source=str(files[0]))
    if not files:
        raise CheckpointNotFoundError(f"{path} holds no .safetensors file and no *.safetensors.index.json")
    raise WeightsError(
        f"{path} holds {len(files)} .safetensors files {[p.name for p in files[:5]]} and no shard index; "
        "pass the file you mean"
    )


def _open_index(index: Path) -> Checkpoint:
    try:
        data = json.loads(index.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as e:
        raise CorruptCheckpointError(f"cannot read shard index {index}: {e}") from None
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()
    ):
        raise CorruptCheckpointError(
            f"{index} is not a shard index: expected {{'weight_map': {{tensor key: shard file}}}}"
        )
    shards = list(dict.fromkeys(weight_map.values()))
    for shard in shards:
        if Path(shard).name != shard:
            raise CorruptCheckpointError(f"{index} names shard {shard!r}; shards must be plain file names")
    missing = [s for s in shards if not (index.parent / s).is_file()]
    if missing:
        raise CheckpointNotFoundError(
            f"{index} names {len(missing)} shard(s) missing from {index.parent}: {missing[:5]}"
            " (an incomplete download?)"
        )
    meta = data.get("metadata") or {}
    metadata = {str(k): str(v) for k, v in meta.items()} if isinstance(meta, dict) else {}
    return Checkpoint(
        [index.parent / s for s in shards], source=str(index), weight_map=weight_map, metadata=metadata
    )
