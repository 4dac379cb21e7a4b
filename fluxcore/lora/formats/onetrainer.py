"""OneTrainer layout: kohya-style suffixes on diffusers module names.

Keys: `lora_transformer_<diffusers module with . → _>.lora_down.weight` / `.lora_up.weight` /
`.alpha`; CLIP-L `lora_te1_`, T5 `lora_te2_` (HF names, dots as _). Scale s = alpha / rows(down).
"""

from __future__ import annotations

from fluxcore.lora.formats import kohya
from fluxcore.lora.formats._common import Problems
from fluxcore.lora.patch import Patch, group_keys

NAME = "onetrainer"
PREFIXES = {"lora_transformer_": "transformer", "lora_te1_": "clip", "lora_te2_": "t5", "lora_te3_": "t5"}


def claims(key: str) -> bool:
    return key.startswith(tuple(PREFIXES))


def strong(key: str) -> bool:
    return key.startswith("lora_transformer_")


def resolve_diffusers(name: str, component: str, targets):
    """Underscored diffusers name → (BFL path, rows, swap_halves); HF names for text encoders."""
    if component != targets.component:
        return name
    if component != "transformer":
        return targets.resolve(name, underscored=True)
    dotted = targets.diffusers_underscored.get(name)
    return None if dotted is None else targets.diffusers[dotted]


def convert(sd, metadata, targets) -> list[Patch]:
    groups, rest = group_keys(sd)
    if rest:
        p = Problems(NAME)
        for k in rest:
            p.add(k, "not a LoRA tensor")
        p.raise_if_any()
    return kohya.convert_keys(groups, sd, targets, PREFIXES, NAME, resolve_diffusers)
