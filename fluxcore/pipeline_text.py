"""Prompt encoding of a FluxPipeline: diffusers' `encode_prompt`, the reference's order
(`encode_prompt_reference`) and the T5 length a call uses. FluxPipeline's methods of these names
are these functions; its `encode_text` stage builds the model's text inputs on them."""

from __future__ import annotations

import torch
from torch import Tensor

from fluxcore.errors import ConfigError
from fluxcore.pipeline_inputs import cap_sequence_length, repeat_embeds
from fluxcore.pipeline_inputs import lora_scale as lora_scale_of


def default_max_sequence_length(pipe) -> int:
    # The reference's length, capped by the tokenizer's model_max_length (512 in FLUX's
    # tokenizer_2/; 24 in the shipped tiny model, which was trained with that padding).
    reference = 256 if pipe.is_schnell else 128 if pipe.mode == "fill" else 512
    return min(reference, getattr(pipe.t5_tokenizer, "max_length", reference))


def encode_prompt(
    pipe,
    prompt,
    prompt_2=None,
    device=None,
    num_images_per_prompt: int = 1,
    prompt_embeds: Tensor | None = None,
    pooled_prompt_embeds: Tensor | None = None,
    max_sequence_length: int | None = None,
    lora_scale: float | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """diffusers' `encode_prompt`: (prompt_embeds [N, L, 4096] T5, pooled_prompt_embeds [N, 768]
    CLIP, text_ids [L, 3] zeros) with N = prompts × num_images_per_prompt; CLIP reads `prompt`,
    T5 `prompt_2` (default `prompt`). Given embeddings are repeated, not recomputed.
    `lora_scale` scales the text encoders' LoRAs for this encoding, as diffusers."""
    device = torch.device(device) if device is not None else pipe.device
    if prompt_embeds is not None:
        if pooled_prompt_embeds is None:
            raise ConfigError("prompt_embeds needs pooled_prompt_embeds as well, as diffusers requires")
        txt = repeat_embeds(prompt_embeds, num_images_per_prompt, device)
        vec = repeat_embeds(pooled_prompt_embeds, num_images_per_prompt, device)
    else:
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        prompts_2 = (
            prompts
            if prompt_2 is None
            else [prompt_2] * len(prompts)
            if isinstance(prompt_2, str)
            else list(prompt_2)
        )
        with lora_scale_of([pipe.t5, pipe.clip], None if lora_scale is None else {"scale": lora_scale}):
            txt, vec = encode_texts(
                pipe, prompts, prompts_2, num_images_per_prompt, max_sequence_length, device
            )
    return txt, vec, torch.zeros(txt.shape[1], 3, device=device, dtype=txt.dtype)


def encode_prompt_reference(
    pipe, prompt, num_images_per_prompt: int = 1, max_sequence_length: int | None = None
) -> tuple[Tensor, Tensor, Tensor]:
    """The reference's order: (txt [N, L, 4096], txt_ids [N, L, 3] float32, vec [N, 768]) on the
    pipeline device, N = prompts × images per prompt (fluxcore's `encode_prompt` before it took
    diffusers' signature)."""
    prompts = [prompt] if isinstance(prompt, str) else list(prompt)
    txt, vec = encode_texts(pipe, prompts, prompts, num_images_per_prompt, max_sequence_length, pipe.device)
    return txt, torch.zeros(*txt.shape[:2], 3, device=txt.device), vec


def encode_texts(pipe, prompts, prompts_2, k, max_sequence_length, device) -> tuple[Tensor, Tensor]:
    """T5 over prompts_2 and CLIP over prompts → (txt [N, L, 4096], vec [N, 768]) on `device`."""
    length = pipe.cap_max_sequence_length(max_sequence_length)
    with pipe._stage(pipe.t5, pipe.clip):
        txt = pipe.t5(pipe.t5_tokenizer(prompts_2, max_length=length).to(pipe.t5.device)).to(device)
        vec = pipe.clip(pipe.clip_tokenizer(prompts).to(pipe.clip.device)).pooler_output.to(device)
    return repeat_embeds(txt, k, device), repeat_embeds(vec, k, device)


def cap_max_sequence_length(pipe, max_sequence_length: int | None) -> int:
    """The T5 length a call uses: the given one (default `default_max_sequence_length`), capped at
    the tokenizer's trained length (model_max_length) with a warning."""
    if max_sequence_length is None:
        return pipe.default_max_sequence_length()
    return cap_sequence_length(max_sequence_length, getattr(pipe.t5_tokenizer, "max_length", None))
