"""Prompt encoding for FLUX: prompts → (txt, txt_ids, vec), the transformer's text inputs
: T5's last hidden state per token, zero position ids for the text tokens, and
CLIP's pooled vector."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from fluxcore.text.clip import CLIPTextEncoder
from fluxcore.text.t5 import T5Encoder
from fluxcore.text.tokenizer_common import as_list
from fluxcore.text.tokenizers import CLIPTokenizer, T5Tokenizer


@torch.no_grad()
def encode_prompt(
    prompts: str | Sequence[str],
    *,
    t5: T5Encoder,
    clip: CLIPTextEncoder,
    t5_tokenizer: T5Tokenizer,
    clip_tokenizer: CLIPTokenizer,
    max_length: int | None = None,
    num_images_per_prompt: int = 1,
    device: torch.device | str | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Encode a prompt batch the way the reference does (no attention masks; padding is attended).

    prompts: one string or a sequence of B strings.
    max_length: T5 tokens (FLUX: 512 dev, 256 schnell, 128 fill); default the T5 tokenizer's.
      CLIP always uses its tokenizer's 77.
    num_images_per_prompt: repeat each prompt's encoding this many times (consecutively).
    device: where the outputs go; default T5's device. Each encoder runs where its weights are.

    Returns, with N = B · num_images_per_prompt:
      txt     [N, max_length, d_model]  T5 last hidden state, in T5's dtype (bf16 on GPU by default)
      txt_ids [N, max_length, 3]        float32 zeros (text tokens sit at position (0, 0, 0))
      vec     [N, clip hidden]          CLIP pooled output at the end-of-text token, in CLIP's dtype
    """
    prompts = as_list(prompts)
    if not prompts:
        raise ValueError("encode_prompt needs at least one prompt; got an empty list")
    if num_images_per_prompt < 1:
        raise ValueError(f"num_images_per_prompt must be >= 1, got {num_images_per_prompt}")
    device = torch.device(device) if device is not None else t5.device

    t5_ids = t5_tokenizer(prompts, max_length=max_length)
    txt = t5(t5_ids.to(t5.device)).to(device)
    clip_ids = clip_tokenizer(prompts)
    vec = clip(clip_ids.to(clip.device)).pooler_output.to(device)

    if num_images_per_prompt > 1:
        txt = txt.repeat_interleave(num_images_per_prompt, dim=0)
        vec = vec.repeat_interleave(num_images_per_prompt, dim=0)
    txt_ids = torch.zeros(txt.shape[0], txt.shape[1], 3, dtype=torch.float32, device=device)
    return txt, txt_ids, vec
