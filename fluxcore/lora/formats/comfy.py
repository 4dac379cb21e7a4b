"""ComfyUI-style prefixed BFL names (and fal's `base_model.model.`).

    diffusion_model.<BFL module>.<suffix>       transformer: lora_A/lora_B, lora_down/lora_up (+alpha),
                                                .diff/.diff_b, lokr/hada, dora_scale
    base_model.model.<BFL module>.<suffix>      fal Kontext LoRAs (same)
    text_encoders.clip_l.transformer.<HF name>  CLIP-L
    text_encoders.t5xxl.transformer.<HF name>   T5-XXL
Scale s = alpha / rows(down) when `.alpha` is stored, else 1 (ComfyUI's rule).
"""

from __future__ import annotations

from fluxcore.lora.formats import bfl
from fluxcore.lora.formats._common import Problems, strip_prefix
from fluxcore.lora.patch import Patch

NAME = "comfyui"
PREFIXES = {
    "diffusion_model.": "transformer",
    "base_model.model.": "transformer",
    "text_encoders.clip_l.transformer.": "clip",
    "text_encoders.t5xxl.transformer.": "t5",
}


def claims(key: str) -> bool:
    return key.startswith(tuple(PREFIXES)) and ".processor." not in key


strong = claims


def convert(sd, metadata, targets) -> list[Patch]:
    names, components = {}, {}
    problems = Problems(NAME)
    for key in sd:
        hit = strip_prefix(key, PREFIXES)
        if hit is None:
            problems.add(key, f"expected one of the prefixes {sorted(PREFIXES)}")
            continue
        names[key], components[key] = hit[1], PREFIXES[hit[0]]
    problems.raise_if_any()
    return bfl.convert_names(names, sd, targets, NAME, components)
