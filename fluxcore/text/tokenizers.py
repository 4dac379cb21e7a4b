"""T5 and CLIP tokenizers as FLUX calls them: a prompt batch → int64 ids [B, max_length].

Both pad to `max_length` and truncate longer prompts, exactly as transformers' T5TokenizerFast /
CLIPTokenizer do with `padding="max_length", truncation=True`:

    T5:   pieces[: max_length − 1] + [</s>] + [<pad>] * ...            (tokenizer_2/)
    CLIP: [<|startoftext|>] + pieces[: max_length − 2] + [<|endoftext|>] + [pad] * ...   (tokenizer/)

A prompt that loses tokens to truncation raises a `PromptTruncatedWarning` saying how many.

One module per tokenizer, re-exported here: `T5Tokenizer` in t5_tokenizer.py, `CLIPTokenizer` in
clip_tokenizer.py; what both share (a tokenizer folder's settings, padding and truncation) in
tokenizer_common.py.
"""

from fluxcore.text.clip_tokenizer import CLIP_PATTERN, CLIPTokenizer
from fluxcore.text.t5_tokenizer import MAX_EXTRA_IDS, T5Tokenizer
from fluxcore.text.tokenizer_common import MAX_MODEL_MAX_LENGTH, PromptTruncatedWarning

__all__ = [
    "CLIP_PATTERN",
    "MAX_EXTRA_IDS",
    "MAX_MODEL_MAX_LENGTH",
    "CLIPTokenizer",
    "PromptTruncatedWarning",
    "T5Tokenizer",
]
