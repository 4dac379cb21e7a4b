"""What the T5 and CLIP tokenizers share: reading a Hugging Face tokenizer folder's special-token
settings and `model_max_length` (validated: a corrupt file is a ConfigMismatchError naming it), the
prompt batch as a list, and `pad_and_truncate` — FLUX's padded, truncated id rows with a
`PromptTruncatedWarning` for every prompt that lost tokens.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor

from fluxcore.errors import ConfigError


class PromptTruncatedWarning(UserWarning):
    """A prompt was longer than the tokenizer's max_length and lost tokens."""


def as_list(prompts: str | Sequence[str]) -> list[str]:
    """One prompt or a sequence of prompts as a list of str; a TypeError for anything else."""
    if isinstance(prompts, str):
        return [prompts]
    prompts = list(prompts)
    if not all(isinstance(p, str) for p in prompts):
        raise TypeError(
            f"prompts must be a str or a sequence of str; got {[type(p).__name__ for p in prompts][:5]}"
        )
    return prompts


def token_str(value, default: str) -> str:
    """A special token as tokenizer configs store it: a string or {"content": str, ...}."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else default


def special_tokens(folder: Path) -> dict:
    """Merged special-token settings of a Hugging Face tokenizer folder (tokenizer_config.json wins)."""
    from fluxcore.weights.io import read_json  # weights imports this package: import at call time

    files = ("special_tokens_map.json", "tokenizer_config.json")
    return read_json(folder / files[0], missing_ok=True) | read_json(folder / files[1], missing_ok=True)


# transformers writes int(1e30) as model_max_length for "no limit"; anything this large means that.
_UNBOUNDED = 10**29
# Longer than any text encoder FLUX uses (T5: 512, CLIP: 77) by far, short enough that a padded
# batch and its attention stay allocatable: a larger stated length is a corrupt file.
MAX_MODEL_MAX_LENGTH = 1 << 16


def bad_config(message: str) -> Exception:
    """The ConfigMismatchError to raise for a corrupt tokenizer file."""
    from fluxcore.weights.errors import ConfigMismatchError  # weights imports this package

    return ConfigMismatchError(message)


def model_max_length(config: dict, default: int, where="tokenizer_config.json") -> int:
    """The folder's `model_max_length`: `default` when absent or transformers' "unbounded"
    placeholder (~1e30); else an int in [2, MAX_MODEL_MAX_LENGTH] (a start or end token and one
    more), or a ConfigMismatchError naming the folder."""
    value = config.get("model_max_length")
    if value is None:
        return default
    if not isinstance(value, bool) and isinstance(value, (int, float)) and value >= _UNBOUNDED:
        return default
    if isinstance(value, bool) or not isinstance(value, int) or not 2 <= value <= MAX_MODEL_MAX_LENGTH:
        raise bad_config(
            f"{where}: model_max_length={value!r:.60}; expected an int in [2, {MAX_MODEL_MAX_LENGTH}] "
            "(or transformers' 1e30 for 'no limit')"
        )
    return value


def pad_and_truncate(
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
    """Token rows → ids [B, max_length] int64: prefix + ids + suffix, then pad_id. A row longer than
    the room left by the special tokens is cut, with a PromptTruncatedWarning showing (via
    `decode`) what was dropped."""
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
                stacklevel=3,  # point at the code that called the tokenizer
            )
            ids = ids[:room]
        row = prefix + ids + suffix
        out[i, : len(row)] = torch.tensor(row, dtype=torch.int64)
    return out
