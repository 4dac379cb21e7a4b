"""fluxcore.weights.io: safetensors headers, memory-mapped checkpoints, shard indexes, load_into.

The oracle for reading is the `safetensors` package itself (written by others): what it writes we
must read back bit for bit, and for hand-made files we compare with its `safe_open`.
"""

import json
import struct

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from fluxcore.errors import WeightsError
from fluxcore.weights import (
    CheckpointNotFoundError,
    CorruptCheckpointError,
    KeyMismatchError,
    ShapeMismatchError,
    UnsupportedDtypeError,
    load_into,
    open_checkpoint,
    read_header,
)


def sample_tensors():
    g = torch.Generator().manual_seed(0)
    return {
        "f32": torch.randn(3, 5, generator=g),
        "f16": torch.randn(7, generator=g).half(),
        "bf16": torch.randn(2, 3, 4, generator=g).bfloat16(),
        "e4m3": torch.randn(4, 4, generator=g).to(torch.float8_e4m3fn),
        "e5m2": torch.randn(5, generator=g).to(torch.float8_e5m2),
        "i64": torch.arange(6).reshape(2, 3),
        "u8": torch.arange(5, dtype=torch.uint8),
        "bool": torch.tensor([True, False, True]),
        "scalar": torch.tensor(3.5),
        "empty": torch.zeros(0, 4),
    }


def raw_file(path, header: dict, data: bytes, pad=True):
    """A safetensors file written by hand (to control offsets/alignment/corruption)."""
    raw = json.dumps(header).encode()
    if pad:
        raw += b" " * (-len(raw) % 8)
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    return path


def test_reads_what_safetensors_writes(tmp_path):
    tensors = sample_tensors()
    path = tmp_path / "a.safetensors"
    save_file(tensors, str(path), metadata={"who": "test"})
    header = read_header(path)
    assert header["__metadata__"] == {"who": "test"}
    with open_checkpoint(path) as ck:
        assert sorted(ck.keys()) == sorted(tensors)
        assert ck.metadata == {"who": "test"}
        assert ck.files == [path]
        for k, t in tensors.items():
            assert ck.shape(k) == tuple(t.shape)
            assert ck.dtype(k) == t.dtype
            got = ck.get(k)
            assert got.dtype == t.dtype and got.shape == t.shape
            assert torch.equal(
                got.view(torch.uint8) if t.dtype.itemsize == 1 else got,
                t.view(torch.uint8) if t.dtype.itemsize == 1 else t,
            )


def test_unaligned_offsets_match_safe_open(tmp_path):
    # A 3-byte uint8 tensor first puts the following float32/bf16 data off element alignment.
    a = torch.arange(3, dtype=torch.uint8)
    b = torch.randn(5)
    c = torch.randn(3).bfloat16()
    data = a.numpy().tobytes() + b.numpy().tobytes() + c.view(torch.int16).numpy().tobytes()
    header = {
        "a": {"dtype": "U8", "shape": [3], "data_offsets": [0, 3]},
        "b": {"dtype": "F32", "shape": [5], "data_offsets": [3, 23]},
        "c": {"dtype": "BF16", "shape": [3], "data_offsets": [23, 29]},
    }
    path = raw_file(tmp_path / "u.safetensors", header, data)
    with safe_open(str(path), framework="pt") as ref, open_checkpoint(path) as ck:
        for k in "abc":
            assert torch.equal(ck.get(k), ref.get_tensor(k))


def test_stream_release_keeps_values_and_writes_stay_private(tmp_path):
    tensors = {f"t{i}": torch.randn(1000 + i) for i in range(5)}
    path = tmp_path / "s.safetensors"
    save_file(tensors, str(path))
    before = path.read_bytes()
    with open_checkpoint(path) as ck:
        seen = dict(ck.stream())
        assert list(seen) == sorted(seen, key=lambda k: ck.offset(k))  # file order
        for k, t in tensors.items():  # pages dropped by stream() fault back in from the file
            assert torch.equal(seen[k], t)
        ck.get("t0").fill_(7.0)  # copy-on-write: never reaches the file
    assert path.read_bytes() == before


def test_header_errors(tmp_path):
    p = tmp_path / "x.safetensors"
    with pytest.raises(CheckpointNotFoundError, match="no such file") as e:
        read_header(tmp_path / "missing.safetensors")
    assert isinstance(e.value, FileNotFoundError)
    p.write_bytes(b"123")
    with pytest.raises(CorruptCheckpointError, match="3 bytes"):
        read_header(p)
    p.write_bytes(b"PK\x03\x04" + b"\0" * 100)
    with pytest.raises(CorruptCheckpointError, match=r"\.pt/\.ckpt"):
        read_header(p)
    p.write_bytes(b"version https://git-lfs.github.com/spec/v1\noid sha256:abc\nsize 23802932552\n")
    with pytest.raises(CorruptCheckpointError, match="Git LFS pointer"):
        read_header(p)
    p.write_bytes(struct.pack("<Q", 4) + b"[1,]")
    with pytest.raises(CorruptCheckpointError, match="not valid UTF-8 JSON"):
        read_header(p)
    p.write_bytes(struct.pack("<Q", 4) + b"[12]")
    with pytest.raises(CorruptCheckpointError, match="expected a JSON object, found list"):
        read_header(p)
    with pytest.raises(UnsupportedDtypeError, match="'F4'"):
        raw_file(p, {"w": {"dtype": "F4", "shape": [2], "data_offsets": [0, 1]}}, b"\0")
        read_header(p)
    with pytest.raises(CorruptCheckpointError, match=r"needs 8 bytes but data_offsets \[0, 4\] span 4"):
        raw_file(p, {"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 4]}}, b"\0" * 8)
        read_header(p)
    with pytest.raises(CorruptCheckpointError, match="truncated: tensor 'w' ends at data byte 8"):
        raw_file(p, {"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 5)
        read_header(p)
    with pytest.raises(CorruptCheckpointError, match="shape must be a list"):
        raw_file(p, {"w": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 0]}}, b"")
        read_header(p)
    with pytest.raises(CorruptCheckpointError, match="not a file"):
        read_header(tmp_path)


def test_truncated_real_file(tmp_path):
    p = tmp_path / "t.safetensors"
    save_file({"a": torch.randn(100), "b": torch.randn(100)}, str(p))
    p.write_bytes(p.read_bytes()[:-10])
    with pytest.raises(CorruptCheckpointError, match="truncated"):
        open_checkpoint(p)


def write_index(folder, weight_map, name="model.safetensors.index.json"):
    (folder / name).write_text(json.dumps({"metadata": {"total_size": 1}, "weight_map": weight_map}))


def test_folders_and_indexes(tmp_path):
    save_file({"a": torch.ones(2)}, str(tmp_path / "s1.safetensors"))
    save_file({"b": torch.zeros(3), "c": torch.ones(1)}, str(tmp_path / "s2.safetensors"))
    with pytest.raises(WeightsError, match=r"2 \.safetensors files .* no shard index"):
        open_checkpoint(tmp_path)
    write_index(tmp_path, {"a": "s1.safetensors", "b": "s2.safetensors", "c": "s2.safetensors"})
    with open_checkpoint(tmp_path) as ck:
        assert ck.keys() == ["a", "b", "c"]
        assert ck.metadata["total_size"] == "1"
        assert ck.file_of("b").name == "s2.safetensors"
        assert torch.equal(ck.get("b"), torch.zeros(3))
    # several indexes: ask which; index_name picks one
    write_index(tmp_path, {"a": "s1.safetensors"}, name="other.safetensors.index.json")
    with pytest.raises(WeightsError, match="index_name="):
        open_checkpoint(tmp_path)
    with open_checkpoint(tmp_path, index_name="other.safetensors.index.json") as ck:
        assert ck.keys() == ["a"]
    (tmp_path / "other.safetensors.index.json").unlink()
    # a shard named by the index is missing
    write_index(tmp_path, {"a": "s1.safetensors", "b": "gone.safetensors"})
    with pytest.raises(CheckpointNotFoundError, match="gone.safetensors"):
        open_checkpoint(tmp_path)
    # the index names a key its shard lacks
    write_index(tmp_path, {"a": "s1.safetensors", "zz": "s2.safetensors"})
    with pytest.raises(CorruptCheckpointError, match="'zz' in s2.safetensors"):
        open_checkpoint(tmp_path)
    (tmp_path / "model.safetensors.index.json").write_text("{not json")
    with pytest.raises(CorruptCheckpointError, match="shard index"):
        open_checkpoint(tmp_path)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(CheckpointNotFoundError, match="no .safetensors"):
        open_checkpoint(empty)
    save_file({"x": torch.ones(1)}, str(empty / "only.safetensors"))
    with open_checkpoint(empty) as ck:
        assert ck.keys() == ["x"]


# --- load_into --------------------------------------------------------------------------------


class Toy(nn.Module):
    """Tied embedding (two names, one Parameter), a linear, a persistent int buffer and a
    non-persistent buffer (never in checkpoints)."""

    def __init__(self, n_extra=0):
        super().__init__()
        self.shared = nn.Embedding(10, 4)
        self.encoder = nn.Module()
        self.encoder.embed_tokens = self.shared
        self.lin = nn.Linear(4, 3)
        self.extra = nn.ParameterList(nn.Parameter(torch.zeros(2)) for _ in range(n_extra))
        self.register_buffer("steps", torch.zeros(2, dtype=torch.int64))
        self.register_buffer("cache", torch.zeros(2), persistent=False)


def toy_weights(tied_name="shared.weight"):
    g = torch.Generator().manual_seed(0)
    return {
        tied_name: torch.randn(10, 4, generator=g),
        "lin.weight": torch.randn(3, 4, generator=g),
        "lin.bias": torch.randn(3, generator=g),
        "steps": torch.tensor([5, 6]),
    }


def meta_toy(n_extra=0):
    with torch.device("meta"):
        return Toy(n_extra)


def all_meta(m):
    return all(p.is_meta for p in m.parameters()) and m.steps.is_meta


@pytest.mark.parametrize("tied_name", ["shared.weight", "encoder.embed_tokens.weight"])
def test_load_into_fills_tied_once_from_either_name(tied_name):
    w = toy_weights(tied_name)
    m = load_into(meta_toy(), w, source="toy")
    assert m.shared.weight is m.encoder.embed_tokens.weight
    assert torch.equal(m.shared.weight, w[tied_name])
    assert torch.equal(m.lin.weight, w["lin.weight"]) and m.steps.tolist() == [5, 6]
    assert m.lin.weight.data_ptr() != w["lin.weight"].data_ptr()  # a copy, never the source's memory
    assert isinstance(m.lin.weight, nn.Parameter) and m.lin.weight.requires_grad
    # both names present (T5 stores both): fine, filled once
    both = {**w, "encoder.embed_tokens.weight": w[tied_name], "shared.weight": w[tied_name]}
    m = load_into(meta_toy(), list(both.items()), source="toy")
    assert m.shared.weight is m.encoder.embed_tokens.weight


def test_load_into_dtypes():
    w = toy_weights()
    w["lin.weight"] = w["lin.weight"].to(torch.float8_e4m3fn)
    m = load_into(meta_toy(), w, source="toy")
    assert m.lin.weight.dtype == torch.bfloat16  # float8 upcast by default
    assert m.lin.bias.dtype == torch.float32  # others keep theirs
    assert torch.equal(m.lin.weight.float(), w["lin.weight"].float())  # e4m3 → bf16 is exact
    m = load_into(meta_toy(), w, source="toy", dtype=torch.float16)
    assert {p.dtype for p in m.parameters()} == {torch.float16}
    assert m.steps.dtype == torch.int64  # integer buffers are never cast
    w["lin.bias"] = torch.tensor([1, 2, 3])
    with pytest.raises(UnsupportedDtypeError, match=r"'lin.bias' has dtype torch.int64, expected a floating"):
        load_into(meta_toy(), w, source="toy")


def test_load_into_errors_name_keys_and_leave_module_untouched():
    w = toy_weights()
    m = meta_toy()
    with pytest.raises(ShapeMismatchError, match=r"toy: 'lin.bias' has shape \[4\], but Toy expects \[3\]"):
        load_into(m, {**w, "lin.bias": torch.zeros(4)}, source="toy")
    assert all_meta(m)
    m = meta_toy(n_extra=7)
    with pytest.raises(KeyMismatchError) as e:
        load_into(m, iter(w.items()), source="toy")
    msg = str(e.value)
    assert "7 key(s) missing" in msg and "'extra.4.weight'" not in msg and "'extra.0'" in msg
    assert msg.count("'extra.") == 5
    assert all_meta(m)
    unexpected = {**w, **{f"junk.{i}": torch.zeros(1) for i in range(6)}}
    for source in (unexpected, iter(unexpected.items())):
        m = meta_toy()
        with pytest.raises(KeyMismatchError, match=r"6 unexpected key\(s\) for Toy: 'junk.0'"):
            load_into(m, source, source="toy")
        assert all_meta(m)
    del w["steps"]  # persistent buffers are required; non-persistent ones are not
    with pytest.raises(KeyMismatchError, match=r"1 key\(s\) missing for Toy: 'steps'"):
        load_into(meta_toy(), w, source="toy")


def test_load_into_from_checkpoint_stream(tmp_path):
    w = toy_weights()
    path = tmp_path / "toy.safetensors"
    save_file(w, str(path))
    with open_checkpoint(path) as ck:
        m = load_into(meta_toy(), ck.stream(), source=str(path), dtype=torch.float64)
    for k, t in w.items():
        got = m.get_parameter(k) if k != "steps" else m.steps
        assert torch.equal(got, t.to(got.dtype))
    assert m.lin.weight.dtype == torch.float64
