"""LyCORIS files as SimpleTuner and ai-toolkit (legacy LoKr) save them: `lycoris_<diffusers module
with . → _>.lokr_w1` ... (LoKr), `.hada_w1_a` ... (LoHa), `.lora_down/up` (LoCon on Linear), `.alpha`.

LoKr:  ΔW = s·kron(W1, W2), W1 = lokr_w1 or lokr_w1_a@lokr_w1_b, W2 = lokr_w2 or lokr_w2_a@lokr_w2_b
       (or the Tucker form with lokr_t2); s = alpha / rows(w2_b) (w1_b when W2 is full);
       s = 1 when both W1 and W2 are stored in full, or when there is no alpha.
LoHa:  ΔW = s·(hada_w1_a@hada_w1_b) ⊙ (hada_w2_a@hada_w2_b), s = alpha / rows(hada_w1_b).
The same tensor names under kohya (`lora_unet_`) or ComfyUI (`diffusion_model.`) module names are
read by those formats with this math (fluxcore.lora.patch).
"""

from __future__ import annotations

from fluxcore.lora.formats import kohya
from fluxcore.lora.formats._common import Problems
from fluxcore.lora.formats.onetrainer import resolve_diffusers
from fluxcore.lora.patch import Patch, group_keys

NAME = "lycoris"
PREFIXES = {"lycoris_": "transformer"}


def claims(key: str) -> bool:
    return key.startswith("lycoris_")


strong = claims


def convert(sd, metadata, targets) -> list[Patch]:
    groups, rest = group_keys(sd)
    if rest:
        p = Problems(NAME)
        for k in rest:
            p.add(k, "not a LyCORIS tensor")
        p.raise_if_any()
    return kohya.convert_keys(groups, sd, targets, PREFIXES, NAME, resolve_diffusers)
