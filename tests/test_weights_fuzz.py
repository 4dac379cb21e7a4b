"""Property: whatever is done to a checkpoint's bytes (truncation, flipped bytes, rewritten
headers, broken shard indexes), reading, inspecting and loading it either succeeds or raises
WeightsError, and never anything else (no crash, no ValueError/RuntimeError/KeyError)."""

import atexit
import json
import os
import shutil
import struct
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fluxcore import Flux, FluxConfig, info, load_flux, save_flux
from fluxcore.errors import WeightsError
from fluxcore.weights import open_checkpoint

# Smallest real structure (head dim 16 like tiny-dev, so the RoPE split is known).
CFG = FluxConfig(
    in_channels=4,
    out_channels=4,
    vec_in_dim=8,
    context_in_dim=8,
    hidden_size=16,
    num_heads=1,
    depth=1,
    depth_single_blocks=1,
    axes_dim=(4, 6, 6),
)
# FLUXCORE_FUZZ_EXAMPLES=5000 for a long, randomised run; the default keeps CI fast and repeatable.
_LONG = int(os.environ.get("FLUXCORE_FUZZ_EXAMPLES", 0))
SETTINGS = settings(
    max_examples=_LONG or 60, deadline=None, derandomize=not _LONG, suppress_health_check=list(HealthCheck)
)
_DIR = Path(tempfile.mkdtemp(prefix="fluxcore-fuzz-"))  # hypothesis cannot use function-scoped tmp_path
atexit.register(shutil.rmtree, _DIR, True)


def _base() -> bytes:
    torch.manual_seed(0)
    save_flux(Flux(CFG), _DIR / "base.safetensors")
    return (_DIR / "base.safetensors").read_bytes()


BASE = _base()
HEADER_LEN = struct.unpack("<Q", BASE[:8])[0]
HEADER = json.loads(BASE[8 : 8 + HEADER_LEN])


def exercise(path: Path) -> None:
    """Everything a user can do with a path; only WeightsError may escape."""
    try:
        with open_checkpoint(path) as ck:
            for k in ck.keys():
                ck.shape(k), ck.dtype(k)
                ck.get(k).float().sum()
    except WeightsError:
        pass
    for fn in (info, load_flux):
        try:
            fn(path)
        except WeightsError:
            pass


def write(data: bytes) -> Path:
    path = _DIR / "case.safetensors"
    path.write_bytes(data)
    return path


def with_header(header) -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + BASE[8 + HEADER_LEN :]


@SETTINGS
@given(st.integers(0, len(BASE)))
def test_truncated(n):
    exercise(write(BASE[:n]))


@SETTINGS
@given(st.lists(st.tuples(st.integers(0, HEADER_LEN + 8 - 1), st.integers(0, 255)), min_size=1, max_size=8))
def test_flipped_header_bytes(edits):
    data = bytearray(BASE)
    for pos, value in edits:
        data[pos] = value
    exercise(write(bytes(data)))


@SETTINGS
@given(st.integers(0, 2**64 - 1), st.binary(max_size=64))
def test_random_length_prefix_and_bytes(n, tail):
    exercise(write(struct.pack("<Q", n) + tail + BASE[8:]))


_json = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
_fields = st.sampled_from(["dtype", "shape", "data_offsets"])


@SETTINGS
@given(st.data())
def test_mutated_header_entries(data):
    header = json.loads(json.dumps(HEADER))
    keys = sorted(k for k in header if k != "__metadata__")
    for _ in range(data.draw(st.integers(1, 4))):
        key = data.draw(st.sampled_from(keys))
        what = data.draw(st.sampled_from(["field", "dtype", "shape", "rename", "drop", "metadata"]))
        if what == "field":
            header[key][data.draw(_fields)] = data.draw(_json)
        elif what == "dtype":
            header[key]["dtype"] = data.draw(
                st.sampled_from(["F32", "F16", "BF16", "F8_E4M3", "I64", "BOOL", "U8"])
            )
        elif what == "shape":
            header[key]["shape"] = data.draw(st.lists(st.integers(0, 70), max_size=3))
        elif what == "rename":
            header[data.draw(st.text(max_size=30))] = header.pop(key)
            keys = sorted(k for k in header if k != "__metadata__")
        elif what == "drop" and len(keys) > 1:
            del header[key]
            keys.remove(key)
        elif what == "metadata":
            header["__metadata__"] = {
                "fluxcore_config": data.draw(st.text(max_size=40) | _json.map(json.dumps))
            }
    exercise(write(with_header(header)))


@SETTINGS
@given(_json)
def test_arbitrary_json_header(header):
    exercise(write(with_header(header)))


@SETTINGS
@given(st.data())
def test_broken_diffusers_folders(data):
    folder = _DIR / "diffusers"
    if not folder.exists():
        torch.manual_seed(0)
        save_flux(Flux(CFG), folder, "diffusers", max_shard_size=8_000)
    index_path = folder / "diffusion_pytorch_model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    config = (folder / "config.json").read_text()
    try:
        what = data.draw(st.sampled_from(["index", "weight_map", "config", "config_value"]))
        if what == "index":
            index_path.write_text(data.draw(st.text(max_size=40) | _json.map(json.dumps)))
        elif what == "weight_map":
            key = data.draw(st.sampled_from(sorted(index["weight_map"])))
            bad = dict(index, weight_map={**index["weight_map"], key: data.draw(st.text(max_size=20))})
            index_path.write_text(json.dumps(bad))
        elif what == "config":
            (folder / "config.json").write_text(data.draw(st.text(max_size=40) | _json.map(json.dumps)))
        else:
            cj = json.loads(config)
            cj[data.draw(st.sampled_from(sorted(cj)))] = data.draw(_json)
            (folder / "config.json").write_text(json.dumps(cj))
        exercise(folder)
    finally:
        index_path.write_text(json.dumps(index))
        (folder / "config.json").write_text(config)


def test_the_base_file_loads():
    """The fuzz cases start from a valid file (otherwise they would test nothing)."""
    assert isinstance(load_flux(write(BASE)), Flux)


@pytest.mark.parametrize("n", [0, 7, 8, 100, len(BASE) - 1])
def test_truncations_are_reported_as_weights_errors(n):
    with pytest.raises(WeightsError):
        load_flux(write(BASE[:n]))
