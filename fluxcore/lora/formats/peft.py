"""diffusers / PEFT layout (diffusers training scripts, SimpleTuner, ai-toolkit, fal).

Keys: `transformer.<diffusers module>.lora_A.weight` (r, in) / `.lora_B.weight` (out, r), optional
`.lora_B.bias`, `.alpha`, `.lora_magnitude_vector` (DoRA); `text_encoder.` (CLIP) and
`text_encoder_2.` (T5) with Hugging Face module names; bare diffusers names (old files) count as
transformer keys. A `lora_adapter_metadata` header (JSON of the LoraConfig, keys prefixed by the
component) gives lora_alpha / alpha_pattern / use_rslora and wins over stored `.alpha` keys.
Scale s = alpha / rows(A) (alpha/√rows with use_rslora); no alpha anywhere → s = 1.
diffusers q/k/v (and single-block proj_mlp) pieces write their own rows of the fused BFL tensor;
`norm_out.linear` rows are swapped into BFL's (shift, scale) order.
"""

from __future__ import annotations

import json
import re

from fluxcore.lora.formats._common import Problems, strip_prefix
from fluxcore.lora.patch import LoraError, Patch, build_patch, group_keys

NAME = "diffusers/peft"
PREFIXES = {"transformer.": "transformer", "text_encoder.": "clip", "text_encoder_2.": "t5"}
_BARE = (
    "transformer_blocks.",
    "single_transformer_blocks.",
    "x_embedder.",
    "context_embedder.",
    "time_text_embed.",
    "norm_out.",
    "proj_out.",
)


def claims(key: str) -> bool:
    return key.startswith(tuple(PREFIXES)) or key.startswith(_BARE)


strong = claims


def _split(key: str) -> tuple[str, str]:
    hit = strip_prefix(key, sorted(PREFIXES, key=len, reverse=True))
    return (PREFIXES[hit[0]], hit[1]) if hit else ("transformer", key)


def _config(metadata: dict, component_prefix: str) -> dict | None:
    raw = (metadata or {}).get("lora_adapter_metadata")
    if not raw:
        return None
    try:
        data = json.loads(raw)
    except ValueError as e:
        raise LoraError(f"the lora_adapter_metadata header is not JSON: {e}") from None
    p = component_prefix
    cfg = {k[len(p) :]: v for k, v in data.items() if k.startswith(p)}
    return cfg or None


def _pattern_value(patterns: dict, module: str, default):
    """PEFT's rule: a pattern matches a module name it ends (as whole dotted parts)."""
    for pattern, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({pattern})$", module):
            return value
    return default


def convert(sd, metadata, targets) -> list[Patch]:
    groups, rest = group_keys(sd)
    problems = Problems(NAME)
    configs = {c: _config(metadata, p) for p, c in PREFIXES.items()}
    patches: list[Patch] = []
    for module_key, roles in groups.items():
        component, name = _split(module_key)
        cfg = configs.get(component)
        alpha, rslora = None, False
        if cfg is not None and "lora_alpha" in cfg:
            alpha = float(_pattern_value(cfg.get("alpha_pattern"), name, cfg["lora_alpha"]))
            rslora = bool(cfg.get("use_rslora", False))
        rows, swap, target = None, False, name
        if component == targets.component == "transformer":
            if name not in targets.diffusers:
                problems.add(module_key, f"no diffusers FLUX transformer module {name!r}")
                continue
            target, rows, swap = targets.diffusers[name]
        elif component == targets.component:
            target = targets.resolve(name)
            if target is None:
                problems.add(module_key, f"the {component} has no module {name!r}")
                continue
        patches.append(
            build_patch(
                module_key,
                roles,
                sd,
                component=component,
                target=target,
                alpha=alpha,
                rows=rows,
                swap_halves=swap,
                rslora=rslora,
            )
        )
    for key in rest:
        component, name = _split(key)
        if component != targets.component:
            patches.append(Patch(key, component, name, "replace", tensors={"value": sd[key]}))
        elif component == "transformer" and name in targets.diffusers_params:
            patches.append(
                Patch(key, component, targets.diffusers_params[name], "replace", tensors={"value": sd[key]})
            )
        else:
            problems.add(key, "neither a LoRA tensor nor a QK-norm scale the model has")
    problems.raise_if_any()
    return patches
