"""Text side of FLUX: the T5-XXL and CLIP-L encoders, their tokenizers, and prompt encoding."""

from fluxcore.text.clip import CLIP_PRESETS, CLIPTextConfig, CLIPTextEncoder, CLIPTextOutput
from fluxcore.text.encode import encode_prompt
from fluxcore.text.t5 import T5_PRESETS, T5Config, T5Encoder, keep_wo_in_fp32
from fluxcore.text.tokenizers import CLIPTokenizer, PromptTruncatedWarning, T5Tokenizer

__all__ = [
    "CLIP_PRESETS",
    "CLIPTextConfig",
    "CLIPTextEncoder",
    "CLIPTextOutput",
    "CLIPTokenizer",
    "PromptTruncatedWarning",
    "T5Config",
    "T5Encoder",
    "T5Tokenizer",
    "T5_PRESETS",
    "encode_prompt",
    "keep_wo_in_fp32",
]
