"""BFL-named layout: the model's own module paths plus a LoRA suffix, no prefix. This is how BFL
ships its control LoRAs (FLUX.1-Canny/Depth-dev-lora) and what fal's Kontext trainer writes under
`base_model.model.` (handled by `comfy`, which strips prefixes and calls `convert_names`).

    <module>.lora_A.weight (r, in) / .lora_B.weight (out, r) / .lora_B.bias (out,)   s = 1
    (also lora_down/lora_up + .alpha, and .diff / .diff_b / lokr / hada tensors)
    <...>.norm.{query,key}_norm.scale (head_dim,)   replaces the model's value (control LoRAs)

A control LoRA's `img_in.lora_A.weight` is (r, 128): the loader widens the model's img_in from
64 to 128 input channels (zero columns) and the model becomes a control model.
"""

from __future__ import annotations

from fluxcore.lora.formats._common import Problems
from fluxcore.lora.patch import Patch, build_patch, group_keys

NAME = "bfl"
_ROOTS = (
    "double_blocks.",
    "single_blocks.",
    "img_in.",
    "txt_in.",
    "time_in.",
    "vector_in.",
    "guidance_in.",
    "final_layer.",
)


def claims(key: str) -> bool:
    return key.startswith(_ROOTS) and ".processor." not in key


strong = claims


def convert_names(names: dict[str, str], sd, targets, fmt: str, components: dict[str, str] | None = None):
    """names: file key → (component, model-side key) is given as {file key: model key}; `components`
    says which component each file key is for (default: the transformer)."""
    components = components or {}
    mapped = {names[k]: k for k in names}
    groups, rest = group_keys(mapped)
    problems = Problems(fmt)
    patches = []
    for module, roles in groups.items():
        file_roles = {role: mapped[key] for role, key in roles.items()}
        component = components.get(next(iter(file_roles.values())), "transformer")
        if component == targets.component and module not in targets.linears:
            problems.add(file_roles[next(iter(file_roles))], f"the {component} has no module {module!r}")
            continue
        patches.append(build_patch(module, file_roles, sd, component=component, target=module))
    for key in rest:
        fkey = mapped[key]
        component = components.get(fkey, "transformer")
        if component == targets.component and key not in targets.params:
            problems.add(fkey, f"the {component} has no parameter {key!r} and it has no LoRA suffix")
            continue
        patches.append(Patch(fkey, component, key, "replace", tensors={"value": sd[fkey]}))
    problems.raise_if_any()
    return patches


def convert(sd, metadata, targets) -> list[Patch]:
    return convert_names({k: k for k in sd}, sd, targets, NAME)
