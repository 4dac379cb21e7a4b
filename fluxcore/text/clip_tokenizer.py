"""CLIP tokenizer as FLUX calls it (`tokenizer/`): a prompt batch → int64 ids [B, max_length],
exactly as transformers' CLIPTokenizer with `padding="max_length", truncation=True`:

    [<|startoftext|>] + pieces[: max_length − 2] + [<|endoftext|>] + [pad] * ...

Backends: a byte-level BPE built from `vocab.json` + `merges.txt` with CLIP's text clean-up (NFC,
runs of whitespace → one space, lower case) and its word-splitting pattern, or `tokenizer.json`
alone (what transformers >= 5 saves) read with the `tokenizers` library.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from torch import Tensor

from fluxcore.errors import WeightsError
from fluxcore.text.tokenizer_common import (
    as_list,
    bad_config,
    model_max_length,
    pad_and_truncate,
    special_tokens,
    token_str,
)

# CLIP's word pattern: its two special tokens, English contractions, letter runs, single digits,
# and runs of anything else that is not whitespace.
CLIP_PATTERN = (
    r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
)


def _check_clip_files(vocab, merges: list, vocab_path: Path, merges_path: Path) -> None:
    """vocab.json must map token strings to distinct ids 0..n-1 and merges.txt must hold merges:
    an empty or header-only merges.txt would tokenize every word into single bytes without error."""
    if not isinstance(vocab, dict) or not vocab:
        raise bad_config(f"{vocab_path}: expected a non-empty JSON object {{token: id}}")
    n = len(vocab)
    ids = vocab.values()
    if (
        not all(not isinstance(i, bool) and isinstance(i, int) and 0 <= i < n for i in ids)
        or len(set(ids)) != n
    ):
        raise bad_config(f"{vocab_path}: token ids must be distinct ints in [0, {n}) (one per token)")
    if not merges:
        raise bad_config(
            f"{merges_path} holds no merges (empty, or only its '#version' line): a truncated download? "
            "CLIP-L's has 48894"
        )
    # The BPE library panics (a BaseException, not an error) on a merge naming an unknown token.
    for n, (a, b) in enumerate(merges, 1):
        unknown = [t for t in (a, b, a + b) if t not in vocab]
        if unknown:
            raise bad_config(
                f"{merges_path}: merge {n} ({a!r} + {b!r}) uses {unknown[0]!r}, which {vocab_path.name} lacks"
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
        config = special_tokens(folder)
        bos = token_str(config.get("bos_token"), "<|startoftext|>")
        eos = token_str(config.get("eos_token"), "<|endoftext|>")
        pad = token_str(config.get("pad_token"), "<|endoftext|>")
        unk = token_str(config.get("unk_token"), "<|endoftext|>")
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
            max_length=max_length or model_max_length(config, 77, folder),
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
        config = special_tokens(folder)
        names = {
            "bos": token_str(config.get("bos_token"), "<|startoftext|>"),
            "eos": token_str(config.get("eos_token"), "<|endoftext|>"),
            "pad": token_str(config.get("pad_token"), "<|endoftext|>"),
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
            max_length=max_length or model_max_length(config, 77),
            source=str(path),
        )

    def __call__(self, prompts: str | Sequence[str], max_length: int | None = None) -> Tensor:
        prompts = as_list(prompts)
        max_length = max_length or self.max_length
        rows = [e.ids for e in self.backend.encode_batch(prompts, add_special_tokens=False)]
        return pad_and_truncate(
            rows,
            prefix=[self.bos_id],
            suffix=[self.eos_id],
            pad_id=self.pad_id,
            max_length=max_length,
            name="CLIP tokenizer",
            decode=lambda ids: self.backend.decode(ids).replace("</w>", " ").strip(),
            prompts=prompts,
        )
