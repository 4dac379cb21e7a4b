"""Config files and tokenizer files are input: every value read from config.json,
tokenizer_config.json, vocab.json / merges.txt or file metadata is bounded and checked against
the tensors on disk before anything is built. Out-of-range values ("config bombs") fail fast with a
named error, under a memory limit; a hypothesis run shows only fluxcore errors ever escape.
"""

from __future__ import annotations

import atexit
import json
import os
import shutil
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_reliability_models import ROOT, clip, t5, vae

import fluxcore.weights.errors as WE
from fluxcore.errors import ConfigError, FluxcoreError
from fluxcore.text.clip import CLIPTextConfig
from fluxcore.text.tokenizers import CLIPTokenizer, T5Tokenizer
from fluxcore.weights.encoders import (
    load_autoencoder,
    load_clip,
    load_t5,
    save_autoencoder,
    save_clip,
    save_t5,
)

sys.path.insert(0, str(Path(__file__).parent))
from tiny_snapshot import _bytes_to_unicode, _spiece_model  # noqa: E402

_DIR = Path(tempfile.mkdtemp(prefix="fluxcore-reliability-"))  # hypothesis cannot use tmp_path
atexit.register(shutil.rmtree, _DIR, True)


def _folders() -> dict[str, Path]:
    """One saved tiny model / tokenizer of each kind; tests copy and edit them."""
    out = {"t5": _DIR / "t5", "clip": _DIR / "clip", "vae": _DIR / "vae"}
    save_t5(t5(), out["t5"])
    save_clip(clip(), out["clip"])
    save_autoencoder(vae(), out["vae"], format="diffusers")
    tok = out["t5_tok"] = _DIR / "t5_tok"
    tok.mkdir()
    (tok / "spiece.model").write_bytes(_spiece_model())
    (tok / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 32, "extra_ids": 4}))
    tok = out["clip_tok"] = _DIR / "clip_tok"
    tok.mkdir()
    alphabet = list(_bytes_to_unicode().values())
    vocab = alphabet + [c + "</w>" for c in alphabet] + ["ph", "pho", "to</w>", "photo</w>"]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    (tok / "vocab.json").write_text(json.dumps({w: i for i, w in enumerate(vocab)}, ensure_ascii=False))
    (tok / "merges.txt").write_text("#version: 0.2\np h\nph o\nt o</w>\npho to</w>\n", encoding="utf-8")
    (tok / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 16}))
    return out


BASE = _folders()


def variant(kind: str, file: str, **changes) -> Path:
    """A copy of BASE[kind] whose `file` (a JSON object) has `changes` applied."""
    folder = Path(tempfile.mkdtemp(dir=_DIR))
    shutil.copytree(BASE[kind], folder, dirs_exist_ok=True)
    data = json.loads((folder / file).read_text())
    data.update(changes)
    (folder / file).write_text(json.dumps(data))
    return folder


# --- bounds and agreement with the tensors ------------------------------------------------------

_CONTRADICTIONS = [
    ("t5", load_t5, {"num_layers": 3}),
    ("t5", load_t5, {"d_model": 32}),
    ("t5", load_t5, {"num_heads": 2, "d_kv": 8}),
    ("t5", load_t5, {"vocab_size": 65}),
    ("clip", load_clip, {"num_hidden_layers": 1}),
    ("clip", load_clip, {"hidden_size": 64, "num_attention_heads": 1}),
    ("clip", load_clip, {"max_position_embeddings": 77}),
    ("vae", load_autoencoder, {"layers_per_block": 2}),
    (
        "vae",
        load_autoencoder,
        {
            "block_out_channels": [8, 16, 16],
            "down_block_types": ["DownEncoderBlock2D"] * 3,
            "up_block_types": ["UpDecoderBlock2D"] * 3,
        },
    ),
    ("vae", load_autoencoder, {"latent_channels": 16}),
]


@pytest.mark.parametrize("kind,load,changes", _CONTRADICTIONS)
def test_config_json_contradicting_the_tensors_is_named(kind, load, changes):
    with pytest.raises(WE.ConfigMismatchError, match="disagrees with the tensors"):
        load(variant(kind, "config.json", **changes))


@pytest.mark.parametrize(
    "kind,load,changes",
    [
        ("t5", load_t5, {"layer_norm_epsilon": -1}),
        ("t5", load_t5, {"relative_attention_max_distance": 10**12}),
        ("t5", load_t5, {"num_layers": "2"}),
        ("clip", load_clip, {"eos_token_id": 10**6}),
        ("clip", load_clip, {"eos_token_id": -1}),
        ("clip", load_clip, {"layer_norm_eps": float("nan")}),
        ("vae", load_autoencoder, {"scaling_factor": float("nan")}),
        ("vae", load_autoencoder, {"shift_factor": float("inf")}),
        ("vae", load_autoencoder, {"norm_num_groups": 0}),
    ],
)
def test_out_of_range_config_values_are_named(kind, load, changes):
    with pytest.raises(WE.ConfigMismatchError, match=next(iter(changes))):
        load(variant(kind, "config.json", **changes))


def test_clip_eos_outside_the_vocabulary():
    with pytest.raises(ConfigError, match="eos_token_id"):
        CLIPTextConfig(vocab_size=100, eos_token_id=100)


# --- config bombs under a memory limit ----------------------------------------------------------

_BOMBS = {
    "t5 num_layers": ("t5", "config.json", {"num_layers": 10**6}),
    "t5 d_model": ("t5", "config.json", {"d_model": 10**9}),
    "t5 vocab_size": ("t5", "config.json", {"vocab_size": 10**12}),
    "t5 num_heads": ("t5", "config.json", {"num_heads": 10**7}),
    "clip num_hidden_layers": ("clip", "config.json", {"num_hidden_layers": 10**7}),
    "clip max_position_embeddings": ("clip", "config.json", {"max_position_embeddings": 10**9}),
    "clip hidden_size": ("clip", "config.json", {"hidden_size": 10**8, "num_attention_heads": 1}),
    "vae layers_per_block": ("vae", "config.json", {"layers_per_block": 10**6}),
    "vae block_out_channels": ("vae", "config.json", {"block_out_channels": [8] * 10**5}),
    "vae latent_channels": ("vae", "config.json", {"latent_channels": 10**9}),
    "t5 tokenizer extra_ids": ("t5_tok", "tokenizer_config.json", {"extra_ids": 10**9}),
    "t5 tokenizer model_max_length": ("t5_tok", "tokenizer_config.json", {"model_max_length": 10**12}),
    "clip tokenizer model_max_length": ("clip_tok", "tokenizer_config.json", {"model_max_length": 10**12}),
}

_UNDER_LIMIT = """
import json, resource, sys, time
from pathlib import Path
import fluxcore
from fluxcore.errors import FluxcoreError
from fluxcore.text.tokenizers import CLIPTokenizer, T5Tokenizer
from fluxcore.weights.encoders import load_autoencoder, load_clip, load_t5
resource.setrlimit(resource.RLIMIT_AS, (4 << 30, resource.getrlimit(resource.RLIMIT_AS)[1]))
load = {"t5": load_t5, "clip": load_clip, "vae": load_autoencoder,
        "t5_tok": lambda p: T5Tokenizer.from_folder(p)("a photo"),
        "clip_tok": lambda p: CLIPTokenizer.from_folder(p)("a photo")}
for line in sys.stdin:
    name, kind, folder = json.loads(line)
    start = time.perf_counter()
    try:
        load[kind](folder)
        result = "loaded"
    except FluxcoreError as e:
        result = type(e).__name__
    except BaseException as e:
        result = "unnamed " + type(e).__name__
    print(json.dumps({name: [result, round(time.perf_counter() - start, 2)]}), flush=True)
"""


def test_config_bombs_fail_fast_with_named_errors_under_a_memory_limit():
    jobs = [
        json.dumps([name, kind, str(variant(kind, file, **changes))])
        for name, (kind, file, changes) in _BOMBS.items()
    ]
    proc = subprocess.run(
        [sys.executable, "-c", _UNDER_LIMIT],
        input="\n".join(jobs) + "\n",
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"},
    )
    results = {}
    for line in proc.stdout.splitlines():
        results.update(json.loads(line))
    assert set(results) == set(_BOMBS), proc.stderr[-2000:]
    for name, (result, seconds) in results.items():
        assert result in ("ConfigMismatchError", "ConfigError"), (name, result)
        assert seconds < 5, (name, seconds)


# --- tokenizer files ----------------------------------------------------------------------------


def _clip_tok(**files) -> Path:
    folder = variant("clip_tok", "tokenizer_config.json")
    for name, text in files.items():
        (folder / name.replace("_", ".")).write_text(text, encoding="utf-8")
    return folder


@pytest.mark.parametrize("merges", ["", "#version: 0.2\n", "\n\n"])
def test_empty_or_header_only_merges_is_named(merges):
    with pytest.raises(WE.ConfigMismatchError, match="holds no merges"):
        CLIPTokenizer.from_folder(_clip_tok(merges_txt=merges))


@pytest.mark.parametrize("merge", ["p x", "x h", "ph h"])
def test_merges_naming_unknown_tokens_are_named(merge):
    """The BPE library would panic (PanicException, a BaseException) on these."""
    with pytest.raises(WE.ConfigMismatchError, match="lacks"):
        CLIPTokenizer.from_folder(_clip_tok(merges_txt=f"#version: 0.2\np h\n{merge}\n"))


def test_clip_vocab_ids_must_be_in_range():
    vocab = json.loads((BASE["clip_tok"] / "vocab.json").read_text())
    vocab["<|endoftext|>"] = 10**9  # eos outside the vocabulary: an index error inside CLIP later
    with pytest.raises(WE.ConfigMismatchError, match="token ids"):
        CLIPTokenizer.from_folder(_clip_tok(vocab_json=json.dumps(vocab)))


@pytest.mark.parametrize("value", [0, 1, -5, 10**9, "77", 7.5, True, [77]])
@pytest.mark.parametrize("kind", ["t5_tok", "clip_tok"])
def test_model_max_length_bounds(kind, value):
    folder = variant(kind, "tokenizer_config.json", model_max_length=value)
    cls = T5Tokenizer if kind == "t5_tok" else CLIPTokenizer
    with pytest.raises(WE.ConfigMismatchError, match="model_max_length"):
        cls.from_folder(folder)


def test_model_max_length_unbounded_placeholder_means_default():
    folder = variant("clip_tok", "tokenizer_config.json", model_max_length=int(1e30))
    assert CLIPTokenizer.from_folder(folder).max_length == 77


@pytest.mark.parametrize("value", [-1, 10**9, "100", 1.5, None])
def test_extra_ids_bounds(value):
    folder = variant("t5_tok", "tokenizer_config.json", extra_ids=value)
    with pytest.raises(WE.ConfigMismatchError, match="extra_ids"):
        T5Tokenizer.from_folder(folder)


# --- property: only fluxcore errors escape ------------------------------------------------------

SETTINGS = settings(max_examples=25, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
_VALUES = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(10**20), 10**20),
    st.integers(-3, 70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=6),
    st.lists(st.integers(-2, 40), max_size=5),
    st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
)
_KEYS = {
    "t5": [
        "vocab_size",
        "d_model",
        "d_kv",
        "d_ff",
        "num_layers",
        "num_heads",
        "relative_attention_num_buckets",
        "relative_attention_max_distance",
        "layer_norm_epsilon",
        "feed_forward_proj",
        "model_type",
        "is_gated_act",
        "dense_act_fn",
    ],
    "clip": [
        "vocab_size",
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "max_position_embeddings",
        "hidden_act",
        "layer_norm_eps",
        "eos_token_id",
        "model_type",
        "text_config",
    ],
    "vae": [
        "block_out_channels",
        "layers_per_block",
        "in_channels",
        "out_channels",
        "latent_channels",
        "norm_num_groups",
        "scaling_factor",
        "shift_factor",
        "sample_size",
        "use_quant_conv",
        "act_fn",
        "down_block_types",
        "_class_name",
    ],
    "t5_tok": ["model_max_length", "extra_ids", "pad_token", "eos_token", "unk_token"],
    "clip_tok": ["model_max_length", "bos_token", "eos_token", "pad_token", "unk_token"],
}
_LOAD = {
    "t5": load_t5,
    "clip": load_clip,
    "vae": load_autoencoder,
    "t5_tok": lambda p: T5Tokenizer.from_folder(p)(["a photo", ""]),
    "clip_tok": lambda p: CLIPTokenizer.from_folder(p)(["a photo", ""]),
}


@pytest.mark.parametrize("kind", list(_KEYS))
@SETTINGS
@given(data=st.data())
def test_only_fluxcore_errors_escape(kind, data):
    changes = data.draw(st.dictionaries(st.sampled_from(_KEYS[kind]), _VALUES, min_size=1, max_size=3))
    file = "tokenizer_config.json" if kind.endswith("_tok") else "config.json"
    folder = variant(kind, file, **changes)
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            _LOAD[kind](folder)
    except FluxcoreError:
        pass
    finally:
        shutil.rmtree(folder, ignore_errors=True)
