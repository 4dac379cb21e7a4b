"""T5 and CLIP tokenizers as FLUX calls them: a prompt batch → int64 ids [B, max_length].

Both pad to `max_length` and truncate longer prompts, exactly as transformers' T5TokenizerFast /
CLIPTokenizer do with `padding="max_length", truncation=True`:

    T5:   pieces[: max_length − 1] + [</s>] + [<pad>] * ...            (tokenizer_2/)
    CLIP: [<|startoftext|>] + pieces[: max_length − 2] + [<|endoftext|>] + [pad] * ...   (tokenizer/)

A prompt that loses tokens to truncation raises a `PromptTruncatedWarning` saying how many.

Backends: T5 reads `tokenizer.json` with the `tokenizers` library, or `spiece.model` with
`sentencepiece`; CLIP builds a byte-level BPE from `vocab.json` + `merges.txt` with CLIP's text
clean-up (NFC, runs of whitespace → one space, lower case) and its word-splitting pattern, or reads
`tokenizer.json` alone (what transformers >= 5 saves) with the `tokenizers` library.
"""

from __future__ import annotations

import json
import re
import warnings
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor

from fluxcore.errors import ConfigError, WeightsError


class PromptTruncatedWarning(UserWarning):
    """A prompt was longer than the tokenizer's max_length and lost tokens."""


def _as_list(prompts: str | Sequence[str]) -> list[str]:
    if isinstance(prompts, str):
        return [prompts]
    prompts = list(prompts)
    if not all(isinstance(p, str) for p in prompts):
        raise TypeError(
            f"prompts must be a str or a sequence of str; got {[type(p).__name__ for p in prompts][:5]}"
        )
    return prompts


def _token_str(value, default: str) -> str:
    """A special token as tokenizer configs store it: a string or {"content": str, ...}."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else default


def _special_tokens(folder: Path) -> dict:
    """Merged special-token settings of a Hugging Face tokenizer folder (tokenizer_config.json wins)."""
    from fluxcore.weights.io import read_json  # weights imports this package: import at call time

    files = ("special_tokens_map.json", "tokenizer_config.json")
    return read_json(folder / files[0], missing_ok=True) | read_json(folder / files[1], missing_ok=True)


# transformers writes int(1e30) as model_max_length for "no limit"; anything this large means that.
_UNBOUNDED = 10**29
# Longer than any text encoder FLUX uses (T5: 512, CLIP: 77) by far, short enough that a padded
# batch and its attention stay allocatable: a larger stated length is a corrupt file.
MAX_MODEL_MAX_LENGTH = 1 << 16
# T5 ships 100 sentinel tokens; each one becomes a special token and part of a regex.
MAX_EXTRA_IDS = 1000


def _bad_config(message: str) -> Exception:
    from fluxcore.weights.errors import ConfigMismatchError  # weights imports this package

    return ConfigMismatchError(message)


def _model_max_length(config: dict, default: int, where="tokenizer_config.json") -> int:
    """The folder's `model_max_length`: `default` when absent or transformers' "unbounded"
    placeholder (~1e30); else an int in [2, MAX_MODEL_MAX_LENGTH] (a start or end token and one
    more), or a ConfigMismatchError naming the folder."""
    value = config.get("model_max_length")
    if value is None:
        return default
    if not isinstance(value, bool) and isinstance(value, (int, float)) and value >= _UNBOUNDED:
        return default
    if isinstance(value, bool) or not isinstance(value, int) or not 2 <= value <= MAX_MODEL_MAX_LENGTH:
        raise _bad_config(
            f"{where}: model_max_length={value!r:.60}; expected an int in [2, {MAX_MODEL_MAX_LENGTH}] "
            "(or transformers' 1e30 for 'no limit')"
        )
    return value


def _extra_ids(config: dict, where) -> int:
    """T5's sentinel count `extra_ids` (default 100), an int in [0, MAX_EXTRA_IDS]."""
    value = config.get("extra_ids", 100)
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_EXTRA_IDS:
        raise _bad_config(
            f"{where}: extra_ids={value!r:.60}; expected an int in [0, {MAX_EXTRA_IDS}] (T5: 100)"
        )
    return value


def _check_clip_files(vocab, merges: list, vocab_path: Path, merges_path: Path) -> None:
    """vocab.json must map token strings to distinct ids 0..n-1 and merges.txt must hold merges:
    an empty or header-only merges.txt would tokenize every word into single bytes without error."""
    if not isinstance(vocab, dict) or not vocab:
        raise _bad_config(f"{vocab_path}: expected a non-empty JSON object {{token: id}}")
    n = len(vocab)
    ids = vocab.values()
    if (
        not all(not isinstance(i, bool) and isinstance(i, int) and 0 <= i < n for i in ids)
        or len(set(ids)) != n
    ):
        raise _bad_config(f"{vocab_path}: token ids must be distinct ints in [0, {n}) (one per token)")
    if not merges:
        raise _bad_config(
            f"{merges_path} holds no merges (empty, or only its '#version' line): a truncated download? "
            "CLIP-L's has 48894"
        )
    # The BPE library panics (a BaseException, not an error) on a merge naming an unknown token.
    for n, (a, b) in enumerate(merges, 1):
        unknown = [t for t in (a, b, a + b) if t not in vocab]
        if unknown:
            raise _bad_config(
                f"{merges_path}: merge {n} ({a!r} + {b!r}) uses {unknown[0]!r}, which {vocab_path.name} lacks"
            )


def _pad_and_truncate(
    rows: list[list[int]],
    *,
    prefix: list[int],
    suffix: list[int],
    pad_id: int,
    max_length: int,
    name: str,
    decode,
    prompts: list[str],
) -> Tensor:
    room = max_length - len(prefix) - len(suffix)
    if room < 0:
        raise ConfigError(
            f"{name}: max_length={max_length} leaves no room for the {len(prefix) + len(suffix)} special tokens"
        )
    out = torch.full((len(rows), max_length), pad_id, dtype=torch.int64)
    for i, ids in enumerate(rows):
        if len(ids) > room:
            lost = ids[room:]
            snippet = decode(lost)
            snippet = snippet if len(snippet) <= 80 else snippet[:77] + "..."
            warnings.warn(
                f"{name}: prompt {i} ({prompts[i][:40]!r}{'...' if len(prompts[i]) > 40 else ''}) has "
                f"{len(ids)} tokens but max_length={max_length} keeps {room} (plus {len(prefix) + len(suffix)} "
                f"special): {len(lost)} tokens were dropped: {snippet!r}",
                PromptTruncatedWarning,
                stacklevel=3,
            )
            ids = ids[:room]
        row = prefix + ids + suffix
        out[i, : len(row)] = torch.tensor(row, dtype=torch.int64)
    return out


# ---------------------------------------------------------------------------------------------
# T5


class T5Tokenizer:
    """`tok(prompts, max_length=None) -> ids [B, max_length] int64`: T5 pieces, then `</s>`, then
    `<pad>` up to max_length (FLUX: 256 schnell, 512 dev, 128 fill). Build with `from_folder`
    (`fluxcore.load_t5_tokenizer`).

    Special-token strings typed in a prompt (`</s>`, `<pad>`, `<unk>`, `<extra_id_N>`) map to their
    ids, as in transformers.
    """

    def __init__(
        self, encode_batch, decode, *, pad_id: int, eos_id: int, max_length: int = 512, source: str = "T5"
    ):
        self._encode_batch = encode_batch
        self._decode = decode
        self.pad_id = pad_id
        self.eos_id = eos_id
        self.max_length = max_length
        self.source = source

    def __repr__(self) -> str:
        return f"T5Tokenizer({self.source!r}, max_length={self.max_length})"

    @classmethod
    def from_folder(cls, folder, *, max_length: int | None = None) -> T5Tokenizer:
        """From a Hugging Face T5 tokenizer folder (FLUX's `tokenizer_2/`): `tokenizer.json` when
        present (read with `tokenizers`), else `spiece.model` (read with `sentencepiece`).
        `max_length` default: the folder's `model_max_length` (512 in FLUX's), else 512; FLUX
        schnell uses 256 and fill 128, so pass it per call or here."""
        folder = Path(folder)
        if not folder.is_dir():
            raise WeightsError(
                f"T5 tokenizer: {folder} is not a folder (expected tokenizer_2/ with tokenizer.json or spiece.model)"
            )
        config = _special_tokens(folder)
        pad = _token_str(config.get("pad_token"), "<pad>")
        eos = _token_str(config.get("eos_token"), "</s>")
        unk = _token_str(config.get("unk_token"), "<unk>")
        if (folder / "tokenizer.json").is_file():
            from tokenizers import Tokenizer

            tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
            tok.no_padding()
            tok.no_truncation()
            ids = {t: tok.token_to_id(t) for t in (pad, eos)}
            if None in ids.values():
                raise WeightsError(
                    f"{folder / 'tokenizer.json'} has no id for {[t for t, i in ids.items() if i is None]}"
                )

            def encode_batch(texts):
                return [e.ids for e in tok.encode_batch(texts, add_special_tokens=False)]

            def decode(ids_):
                return tok.decode(ids_, skip_special_tokens=False)

            return cls(
                encode_batch,
                decode,
                pad_id=ids[pad],
                eos_id=ids[eos],
                max_length=max_length or _model_max_length(config, 512, folder),
                source=str(folder / "tokenizer.json"),
            )
        if (folder / "spiece.model").is_file():
            return cls._from_sentencepiece(folder, config, pad, eos, unk, max_length)
        raise WeightsError(f"T5 tokenizer: {folder} holds neither tokenizer.json nor spiece.model")

    @classmethod
    def _from_sentencepiece(cls, folder, config, pad, eos, unk, max_length) -> T5Tokenizer:
        import sentencepiece

        path = folder / "spiece.model"
        try:
            sp = sentencepiece.SentencePieceProcessor(model_file=str(path))
        except (OSError, RuntimeError) as e:
            raise WeightsError(f"cannot read sentencepiece model {path}: {e}") from None
        n = sp.get_piece_size()
        special = {}
        for piece in (pad, eos, unk):
            i = sp.piece_to_id(piece)
            if sp.id_to_piece(i) != piece:
                raise WeightsError(f"{path} has no piece {piece!r}")
            special[piece] = i
        # T5's sentinels follow the sentencepiece vocabulary in reverse: <extra_id_0> is the last id.
        extra = _extra_ids(config, folder / "tokenizer_config.json")
        for k in range(extra):
            special[f"<extra_id_{k}>"] = n + extra - 1 - k
        # Leftmost-longest match, so <extra_id_10> is not read as <extra_id_1> + "0".
        splitter = re.compile(
            "(" + "|".join(re.escape(s) for s in sorted(special, key=len, reverse=True)) + ")"
        )

        def encode_one(text: str) -> list[int]:
            ids: list[int] = []
            # Each stretch between special tokens is tokenized on its own, as transformers does.
            for j, part in enumerate(splitter.split(text)):
                if j % 2:
                    ids.append(special[part])
                elif part:
                    ids.extend(sp.encode(part))
            return ids

        def decode(ids_):
            inverse = {v: k for k, v in special.items()}
            return " ".join(inverse[i] if i in inverse and i >= n else sp.decode([i]) for i in ids_)

        return cls(
            lambda texts: [encode_one(t) for t in texts],
            decode,
            pad_id=special[pad],
            eos_id=special[eos],
            max_length=max_length or _model_max_length(config, 512, folder),
            source=str(path),
        )

    def __call__(self, prompts: str | Sequence[str], max_length: int | None = None) -> Tensor:
        prompts = _as_list(prompts)
        max_length = max_length or self.max_length
        return _pad_and_truncate(
            self._encode_batch(prompts),
            prefix=[],
            suffix=[self.eos_id],
            pad_id=self.pad_id,
            max_length=max_length,
            name="T5 tokenizer",
            decode=self._decode,
            prompts=prompts,
        )


# ---------------------------------------------------------------------------------------------
# CLIP

# CLIP's word pattern: its two special tokens, English contractions, letter runs, single digits,
# and runs of anything else that is not whitespace.
CLIP_PATTERN = (
    r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
)


def _clip_backend(vocab: dict[str, int], merges: list[tuple[str, str]], unk: str, specials: list[str]):
    """A `tokenizers.Tokenizer` doing CLIP's BPE without its start/end tokens (added by the caller)."""
    from tokenizers import Regex, Tokenizer, decoders, normalizers, pre_tokenizers
    from tokenizers.models import BPE

    tok = Tokenizer(
        BPE(
            vocab=vocab,
            merges=merges,
            end_of_word_suffix="</w>",
            continuing_subword_prefix="",
            unk_token=unk,
            fuse_unk=False,
            dropout=None,
        )
    )
    # CLIP's clean-up: unicode NFC, every whitespace run becomes one space, lower case.
    tok.normalizer = normalizers.Sequence(
        [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()]
    )
    # Keep the pattern's matches as words (dropping what is between them: whitespace), then map
    # bytes to the printable stand-ins the BPE vocabulary is written in.
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(CLIP_PATTERN), behavior="removed", invert=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(specials)
    return tok


class CLIPTokenizer:
    """`tok(prompts, max_length=None) -> ids [B, max_length] int64`: `<|startoftext|>`, BPE pieces,
    `<|endoftext|>`, then the pad token (`<|endoftext|>` in FLUX's tokenizer/) up to max_length (77).
    Build with `from_folder` (`fluxcore.load_clip_tokenizer`)."""

    def __init__(
        self, backend, *, bos_id: int, eos_id: int, pad_id: int, max_length: int = 77, source: str = "CLIP"
    ):
        self.backend = backend
        self.bos_id = bos_id
        self.eos_id = eos_id
        self.pad_id = pad_id
        self.max_length = max_length
        self.source = source

    def __repr__(self) -> str:
        return f"CLIPTokenizer({self.source!r}, max_length={self.max_length})"

    @classmethod
    def from_folder(cls, folder, *, max_length: int | None = None) -> CLIPTokenizer:
        """From a Hugging Face CLIP tokenizer folder (FLUX's `tokenizer/`: vocab.json + merges.txt,
        special_tokens_map.json, tokenizer_config.json). max_length default: the folder's
        `model_max_length`, else 77."""
        folder = Path(folder)
        vocab_path, merges_path = folder / "vocab.json", folder / "merges.txt"
        if (not vocab_path.is_file() or not merges_path.is_file()) and (folder / "tokenizer.json").is_file():
            return cls._from_tokenizer_json(folder, max_length)
        if not vocab_path.is_file() or not merges_path.is_file():
            raise WeightsError(
                f"CLIP tokenizer: {folder} needs vocab.json + merges.txt, or tokenizer.json; found "
                f"{sorted(p.name for p in folder.iterdir()) if folder.is_dir() else 'no such folder'}"
            )
        config = _special_tokens(folder)
        bos = _token_str(config.get("bos_token"), "<|startoftext|>")
        eos = _token_str(config.get("eos_token"), "<|endoftext|>")
        pad = _token_str(config.get("pad_token"), "<|endoftext|>")
        unk = _token_str(config.get("unk_token"), "<|endoftext|>")
        try:
            vocab = json.loads(vocab_path.read_text(encoding="utf-8"))
            lines = merges_path.read_text(encoding="utf-8").splitlines()
        except (OSError, ValueError) as e:
            raise WeightsError(f"cannot read the CLIP vocabulary in {folder}: {e}") from None
        if not isinstance(vocab, dict):
            _check_clip_files(vocab, [], vocab_path, merges_path)
        merges = []
        for n, line in enumerate(lines):
            if not line.strip() or (n == 0 and line.startswith("#version")):
                continue
            parts = line.split()
            if len(parts) != 2:
                raise WeightsError(f"{merges_path}:{n + 1}: expected two symbols per merge, found {line!r}")
            merges.append((parts[0], parts[1]))
        _check_clip_files(vocab, merges, vocab_path, merges_path)
        missing = [t for t in dict.fromkeys((bos, eos, pad, unk)) if t not in vocab]
        if missing:
            raise WeightsError(f"{vocab_path} lacks the special tokens {missing}")
        backend = _clip_backend(vocab, merges, unk, list(dict.fromkeys((bos, eos, pad, unk))))
        return cls(
            backend,
            bos_id=vocab[bos],
            eos_id=vocab[eos],
            pad_id=vocab[pad],
            max_length=max_length or _model_max_length(config, 77, folder),
            source=str(folder),
        )

    @classmethod
    def _from_tokenizer_json(cls, folder: Path, max_length: int | None) -> CLIPTokenizer:
        """From `tokenizer.json` alone (what transformers >= 5 saves for CLIP): its BPE model,
        normaliser and pre-tokeniser as stored; the start/end tokens are added here, so its
        post-processor, padding and truncation are switched off."""
        from tokenizers import Tokenizer

        path = folder / "tokenizer.json"
        try:
            tok = Tokenizer.from_file(str(path))
        except Exception as e:  # the tokenizers library raises its own exception type
            raise WeightsError(f"cannot read the CLIP tokenizer {path}: {e}") from None
        model = json.loads(tok.to_str()).get("model", {})
        if model.get("type") != "BPE" or model.get("end_of_word_suffix") != "</w>":
            raise WeightsError(
                f"{path} is not a CLIP tokenizer: expected a BPE model with '</w>' word ends, found "
                f"{model.get('type')!r} with end_of_word_suffix {model.get('end_of_word_suffix')!r}"
            )
        tok.post_processor = None
        tok.no_padding()
        tok.no_truncation()
        config = _special_tokens(folder)
        names = {
            "bos": _token_str(config.get("bos_token"), "<|startoftext|>"),
            "eos": _token_str(config.get("eos_token"), "<|endoftext|>"),
            "pad": _token_str(config.get("pad_token"), "<|endoftext|>"),
        }
        ids = {k: tok.token_to_id(v) for k, v in names.items()}
        missing = [names[k] for k, i in ids.items() if i is None]
        if missing:
            raise WeightsError(f"{path} lacks the special tokens {missing}")
        return cls(
            tok,
            bos_id=ids["bos"],
            eos_id=ids["eos"],
            pad_id=ids["pad"],
            max_length=max_length or _model_max_length(config, 77),
            source=str(path),
        )

    def __call__(self, prompts: str | Sequence[str], max_length: int | None = None) -> Tensor:
        prompts = _as_list(prompts)
        max_length = max_length or self.max_length
        rows = [e.ids for e in self.backend.encode_batch(prompts, add_special_tokens=False)]
        return _pad_and_truncate(
            rows,
            prefix=[self.bos_id],
            suffix=[self.eos_id],
            pad_id=self.pad_id,
            max_length=max_length,
            name="CLIP tokenizer",
            decode=lambda ids: self.backend.decode(ids).replace("</w>", " ").strip(),
            prompts=prompts,
        )
