"""kohya sd-scripts layout (`networks/lora_flux.py`), also written by ComfyUI "merge" exports.

Keys: `lora_unet_<BFL module path with . → _>.lora_down.weight` (r, in), `.lora_up.weight`
(out, r), `.alpha` (0-d); CLIP-L `lora_te1_<HF path>`, T5 `lora_te3_` (kohya) or `lora_te2_`
(OneTrainer). Optional `.dora_scale` (out, 1) and LyCORIS `lokr_*` / `hada_*` / `.diff` tensors
under the same names. Scale s = alpha / rows(down); no alpha → s = 1. A `split_qkv` file stores
q/k/v(/mlp) fused (down (3r or 4r, in), up block-diagonal), so it is one patch on the fused
target and its scale is alpha / (3r or 4r), the convention every loader follows.
"""

from __future__ import annotations

from fluxcore.lora.formats._common import Problems, strip_prefix
from fluxcore.lora.patch import Patch, build_patch, group_keys

NAME = "kohya"
PREFIXES = {"lora_unet_": "transformer", "lora_te1_": "clip", "lora_te2_": "t5", "lora_te3_": "t5"}
TE_PREFIXES = ("lora_te1_", "lora_te2_", "lora_te3_")


def claims(key: str) -> bool:
    return key.startswith(tuple(PREFIXES))


def strong(key: str) -> bool:
    return key.startswith("lora_unet_")


def resolve(name: str, component: str, targets) -> str | None:
    """Underscored module name → dotted path in the model, None if the model has no such module."""
    if component != targets.component:
        return name
    return targets.resolve(name, underscored=True)


def convert_keys(groups, sd, targets, prefixes: dict, fmt: str, resolver=resolve) -> list[Patch]:
    problems = Problems(fmt)
    patches = []
    for module_key, roles in groups.items():
        prefix, name = strip_prefix(module_key, sorted(prefixes, key=len, reverse=True)) or (None, None)
        if prefix is None:
            problems.add(module_key, f"expected one of the prefixes {sorted(prefixes)}")
            continue
        component = prefixes[prefix]
        hit = resolver(name, component, targets)
        if hit is None:
            problems.add(module_key, f"the {component} has no module {name!r} (dots written as _)")
            continue
        target, rows, swap = hit if isinstance(hit, tuple) else (hit, None, False)
        patches.append(
            build_patch(
                module_key,
                roles,
                sd,
                component=component,
                target=target,
                rows=rows,
                swap_halves=swap,
                underscored=component != targets.component,
            )
        )
    problems.raise_if_any()
    return patches


def convert(sd, metadata, targets) -> list[Patch]:
    groups, rest = group_keys(sd)
    if rest:
        p = Problems(NAME)
        for k in rest:
            p.add(k, "not a LoRA tensor (no lora_down/lora_up/alpha/lokr/hada/diff suffix)")
        p.raise_if_any()
    return convert_keys(groups, sd, targets, PREFIXES, NAME)
