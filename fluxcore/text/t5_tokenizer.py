"""T5 tokenizer as FLUX calls it (`tokenizer_2/`): a prompt batch → int64 ids [B, max_length],
exactly as transformers' T5TokenizerFast with `padding="max_length", truncation=True`:

    pieces[: max_length − 1] + [</s>] + [<pad>] * ...

Backends: `tokenizer.json` with the `tokenizers` library, or `spiece.model` with `sentencepiece`
(plus T5's `<extra_id_N>` sentinels).
"""

from __future__ import annotations

import re
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

# T5 ships 100 sentinel tokens; each one becomes a special token and part of a regex.
MAX_EXTRA_IDS = 1000


def _extra_ids(config: dict, where) -> int:
    """T5's sentinel count `extra_ids` (default 100), an int in [0, MAX_EXTRA_IDS]."""
    value = config.get("extra_ids", 100)
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_EXTRA_IDS:
        raise bad_config(
            f"{where}: extra_ids={value!r:.60}; expected an int in [0, {MAX_EXTRA_IDS}] (T5: 100)"
        )
    return value


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
        config = special_tokens(folder)
        pad = token_str(config.get("pad_token"), "<pad>")
        eos = token_str(config.get("eos_token"), "</s>")
        unk = token_str(config.get("unk_token"), "<unk>")
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
                max_length=max_length or model_max_length(config, 512, folder),
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
            max_length=max_length or model_max_length(config, 512, folder),
            source=str(path),
        )

    def __call__(self, prompts: str | Sequence[str], max_length: int | None = None) -> Tensor:
        prompts = as_list(prompts)
        max_length = max_length or self.max_length
        return pad_and_truncate(
            self._encode_batch(prompts),
            prefix=[],
            suffix=[self.eos_id],
            pad_id=self.pad_id,
            max_length=max_length,
            name="T5 tokenizer",
            decode=self._decode,
            prompts=prompts,
        )
