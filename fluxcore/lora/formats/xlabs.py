"""XLabs (x-flux) layout: LoRA processors on attention.

    double_blocks.N.processor.qkv_lora1.{down,up}.weight → double_blocks.N.img_attn.qkv  (lora1 = image)
    double_blocks.N.processor.proj_lora1                  → double_blocks.N.img_attn.proj
    double_blocks.N.processor.{qkv,proj}_lora2            → txt_attn.{qkv,proj}         (lora2 = text)
    single_blocks.N.processor.qkv_lora                    → single_blocks.N.linear1 rows [0, 3·hidden)
    single_blocks.N.processor.proj_lora                   → single_blocks.N.linear2
No alpha is stored: s = 1 (a stored `.alpha` is honoured). x-flux's own loader multiplies both
matrices by the strength (effective w²); fluxcore, like diffusers, applies w once.
"""

from __future__ import annotations

import re

from fluxcore.lora.formats._common import Problems
from fluxcore.lora.patch import Patch, build_patch, group_keys

NAME = "xlabs"
_DOUBLE = {
    "qkv_lora1": "img_attn.qkv",
    "proj_lora1": "img_attn.proj",
    "qkv_lora2": "txt_attn.qkv",
    "proj_lora2": "txt_attn.proj",
}
_SINGLE = {"qkv_lora": "linear1", "proj_lora": "linear2"}
_KEY = re.compile(r"^(?:diffusion_model\.)?(double_blocks|single_blocks)\.(\d+)\.processor\.(\w+)$")


def claims(key: str) -> bool:
    return ".processor." in key


strong = claims


def convert(sd, metadata, targets) -> list[Patch]:
    # "qkv_lora.down.weight" must not read as module "qkv" + suffix "_lora.down.weight"
    names = {}
    for k in sd:
        for end, new in ((".down.weight", ".lora_down.weight"), (".up.weight", ".lora_up.weight")):
            if k.endswith(end):
                names[k[: -len(end)] + new] = k
                break
        else:
            names[k] = k
    groups, rest = group_keys(names)
    groups = {m: {role: names[key] for role, key in roles.items()} for m, roles in groups.items()}
    rest = [names[k] for k in rest]
    problems = Problems(NAME)
    for k in rest:
        problems.add(k, "not an XLabs LoRA tensor ({down,up}.weight)")
    patches = []
    for module_key, roles in groups.items():
        m = _KEY.match(module_key)
        table = _DOUBLE if m and m.group(1) == "double_blocks" else _SINGLE
        if m is None or m.group(3) not in table:
            problems.add(
                module_key, f"expected <double|single>_blocks.N.processor.<{'|'.join([*_DOUBLE, *_SINGLE])}>"
            )
            continue
        target = f"{m.group(1)}.{m.group(2)}.{table[m.group(3)]}"
        if target not in targets.linears:
            problems.add(module_key, f"the model has no module {target!r}")
            continue
        rows = None
        if table[m.group(3)] == "linear1":
            rows = (0, 3 * targets.linears[target][1])
        patches.append(build_patch(module_key, roles, sd, component="transformer", target=target, rows=rows))
    problems.raise_if_any()
    return patches
