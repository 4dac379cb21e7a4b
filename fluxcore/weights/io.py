"""safetensors streaming: headers, memory-mapped checkpoints (single files or HF shard indexes), and
`load_into`, which fills a module built on the meta device one tensor at a time.

Memory model: nothing is read until a tensor is asked for, and then only that tensor. Two ways:
`Checkpoint.get` returns a view of a copy-on-write memory map (zero-copy, bytes fault in on first
touch; `release` drops them again), and `Checkpoint.read` / `Checkpoint.stream` read a tensor with
plain file reads into fresh memory the caller owns (no file page ever counts against the process,
and it is several times faster than faulting a mapping in and copying it). `load_flux` streams, so
peak host memory is the loaded model plus about one tensor.
"""

from __future__ import annotations

import json
import math
import mmap
import struct
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path

import torch
from torch import Tensor, nn

from fluxcore.errors import WeightsError

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


# --- the WeightsError family --------------------------------------------------------------------


class CheckpointNotFoundError(WeightsError, FileNotFoundError):
    """The path (or a shard named by an index) does not exist."""


class CorruptCheckpointError(WeightsError):
    """Not a safetensors file, truncated, or its header/index is malformed."""


class UnsupportedDtypeError(WeightsError):
    """A tensor has a dtype fluxcore cannot load (or cannot cast to the one asked for)."""


class KeyMismatchError(WeightsError):
    """Keys missing from, or unexpected in, a checkpoint for the module being loaded."""


class ShapeMismatchError(WeightsError):
    """A tensor's shape differs from the parameter it should fill."""


class UnknownVariantError(WeightsError):
    """The checkpoint's layout or model variant is not one fluxcore recognises."""


# --- headers ------------------------------------------------------------------------------------


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
    return torch.bfloat16 if torch.device(device if device is not None else "cpu").type == "cuda" else torch.float32


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

    Validates everything a later read relies on: dtype names, shapes (non-negative ints), byte
    ranges (inside the file, of exactly numel × itemsize bytes). Raises a WeightsError subclass
    naming the file and what is wrong; nothing else escapes.
    """
    return _read_header(Path(path))[0]


def _read_header(path: Path) -> tuple[dict, int]:
    """(header, header length n); tensor data starts at byte 8 + n."""
    if not path.exists():
        raise CheckpointNotFoundError(f"no such file: {path}")
    if not path.is_file():
        raise CorruptCheckpointError(f"{path} is not a file (expected a .safetensors file)")
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
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
            raw = f.read(n)
    except OSError as e:
        raise CorruptCheckpointError(f"cannot read {path}: {e}") from None
    if len(raw) != n:
        raise CorruptCheckpointError(f"{path} is truncated: expected a {n}-byte header, read {len(raw)}")
    try:
        header = json.loads(raw.decode("utf-8"))
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
    return header, n


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


# --- checkpoints --------------------------------------------------------------------------------


class _File:
    """One safetensors file: its validated header and a lazily opened copy-on-write mapping."""

    def __init__(self, path: Path):
        self.path = path
        header, n = _read_header(path)
        self.metadata: dict[str, str] = header.pop("__metadata__", {})
        self.entries: dict[str, dict] = header
        self.data_start = 8 + n
        self._map: mmap.mmap | None = None
        self._fd = None

    def _mapping(self) -> mmap.mmap:
        if self._map is None:
            try:
                with open(self.path, "rb") as f:
                    # ACCESS_COPY: private and writable, so torch gets a writable buffer and a write
                    # to a returned tensor can never reach the file.
                    self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
            except (OSError, ValueError) as e:
                raise CorruptCheckpointError(f"cannot memory-map {self.path}: {e}") from None
            expected = self.data_start + max((e["data_offsets"][1] for e in self.entries.values()), default=0)
            if len(self._map) < expected:  # the file shrank since its header was read
                raise CorruptCheckpointError(
                    f"{self.path} is truncated: {len(self._map)} bytes, need {expected}"
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
        try:
            if self._fd is None:
                self._fd = open(self.path, "rb", buffering=0)  # noqa: SIM115 (closed in close())
            self._fd.seek(self.data_start + begin)
            done = 0
            while done < end - begin:
                n = self._fd.readinto(view[done:])
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


# --- loading into a module ----------------------------------------------------------------------


def _targets(module: nn.Module) -> tuple[dict[str, tuple], dict[int, list[str]]]:
    """name → (owner module, attribute, original tensor, is_param) for every parameter and
    persistent buffer, under every name (tied parameters appear once per name); and the names that
    share each tensor (by id)."""
    targets: dict[str, tuple] = {}
    aliases: dict[int, list[str]] = {}
    for prefix, mod in module.named_modules(remove_duplicate=False):
        dot = f"{prefix}." if prefix else ""
        for attr, p in mod._parameters.items():
            if p is not None:
                targets[dot + attr] = (mod, attr, p, True)
        for attr, b in mod._buffers.items():
            if b is not None and attr not in mod._non_persistent_buffers_set:
                targets[dot + attr] = (mod, attr, b, False)
    for name, (_, _, t, _) in targets.items():
        aliases.setdefault(id(t), []).append(name)
    return targets, aliases


def _few(names: list[str]) -> str:
    more = f", … ({len(names)} in all)" if len(names) > 5 else f" ({len(names)} in all)"
    return ", ".join(repr(n) for n in names[:5]) + more


def _materialise(
    t: Tensor, key: str, source: str, dtype, device, target_dtype: torch.dtype, copy: bool
) -> Tensor:
    """`t` in the wanted dtype on the wanted device; never `t`'s own memory when `copy`."""
    if target_dtype.is_floating_point:
        if not t.dtype.is_floating_point:
            raise UnsupportedDtypeError(
                f"{source}: {key!r} has dtype {t.dtype}, expected a floating-point tensor"
            )
        want = dtype if dtype is not None else (torch.bfloat16 if t.dtype in FLOAT8_DTYPES else t.dtype)
    else:
        if t.dtype != target_dtype:
            raise UnsupportedDtypeError(f"{source}: {key!r} has dtype {t.dtype}, expected {target_dtype}")
        want = t.dtype
    device = torch.device(device) if device is not None else torch.device("cpu")
    if device.type == "cpu":
        return t.to(dtype=want, copy=copy)
    # Move the raw bytes first (fewer of them for float8/bf16), then cast on the device.
    return t.to(device=device).to(dtype=want)


def load_into(
    module: nn.Module, tensors, *, source: str, device=None, dtype=None, copy: bool = True
) -> nn.Module:
    """Fill `module` (built on the meta device) from `tensors` and return it.

    tensors: a Mapping or an iterable of (key, tensor) pairs named like `module.state_dict()`.
      Each tensor is cast/moved (and copied, see `copy`) before the next one is requested, so a
      source may drop a tensor's memory once the iterator resumes.
    copy:   True (default): the module never shares memory with the tensors passed (needed for
      `Checkpoint.get`'s memory-mapped views). False: a tensor that needs no cast or move becomes
      the parameter as it is, like `load_state_dict(assign=True)`; use it with tensors nobody
      else holds, e.g. `load_into(m, ckpt.stream(), copy=False)` (the fastest way).
    device: where the weights go (default CPU); CUDA loads go tensor by tensor to the device.
    dtype:  floating-point dtype of the loaded weights; default: each tensor's own dtype, except
      float8 (e4m3fn, e5m2), which is upcast to bfloat16. Integer/bool buffers keep theirs.
    Parameters tied under several names are filled once from whichever name comes first.

    Raises WeightsError (never returns a half-filled module, and leaves `module` untouched on
    error): shape mismatch (key, expected, found), unsupported dtype, missing or unexpected keys
    (up to five named, and the count).
    """
    targets, aliases = _targets(module)
    if isinstance(tensors, Mapping):
        unexpected = [k for k in tensors if k not in targets]
        if unexpected:
            raise KeyMismatchError(
                f"{source}: {len(unexpected)} unexpected key(s) for {type(module).__name__}: {_few(unexpected)}"
            )
        tensors = tensors.items()
    filled: dict[int, Tensor] = {}
    unexpected: list[str] = []
    for key, t in tensors:
        target = targets.get(key)
        if target is None:
            unexpected.append(key)
            continue
        orig = target[2]
        if tuple(t.shape) != tuple(orig.shape):
            raise ShapeMismatchError(
                f"{source}: {key!r} has shape {list(t.shape)}, but {type(module).__name__} expects "
                f"{list(orig.shape)} (wrong variant or config?)"
            )
        if id(orig) in filled:  # a tied parameter already filled under another name
            continue
        filled[id(orig)] = _materialise(t, key, source, dtype, device, orig.dtype, copy)
        del t  # let the source drop this tensor's bytes before the next one is read
    if unexpected:
        raise KeyMismatchError(
            f"{source}: {len(unexpected)} unexpected key(s) for {type(module).__name__}: {_few(unexpected)}"
        )
    missing = [names[0] for tid, names in aliases.items() if tid not in filled]
    if missing:
        raise KeyMismatchError(
            f"{source}: {len(missing)} key(s) missing for {type(module).__name__}: {_few(missing)}"
        )
    # All checks passed: assign (the module held only meta tensors, so nothing is duplicated).
    # One new object per original tensor, so tied names stay one Parameter.
    new: dict[int, Tensor] = {}
    for mod, attr, orig, is_param in targets.values():
        if id(orig) not in new:
            value = filled[id(orig)]
            new[id(orig)] = nn.Parameter(value, requires_grad=orig.requires_grad) if is_param else value
        (mod._parameters if is_param else mod._buffers)[attr] = new[id(orig)]
    return module
