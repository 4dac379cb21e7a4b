"""Reading a LoRA source, detecting its format, and planning its patches on a model (dry runs;
nothing here changes a model)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from torch import Tensor, nn

from fluxcore.lora.formats import FORMATS
from fluxcore.lora.patch import LoraError, Patch
from fluxcore.lora.targets import Targets, component_of


def read_lora(source) -> tuple[dict[str, Tensor], dict[str, str], str]:
    """(tensors, header metadata, name for messages) from a .safetensors path or a dict of tensors."""
    if isinstance(source, Mapping):
        sd = dict(source)
        bad = [k for k, v in sd.items() if not isinstance(v, Tensor)]
        if bad:
            raise LoraError(f"a LoRA dict maps keys to tensors; {bad[:5]} are not tensors")
        return sd, {}, "<dict>"
    from fluxcore.weights.io import open_checkpoint

    with open_checkpoint(Path(source)) as ckpt:
        return {k: ckpt.read(k) for k in ckpt.keys()}, dict(ckpt.metadata), str(source)


def detect_format(keys) -> str:
    """The format's NAME (module `fluxcore.lora.formats.<...>`). Rule: each format has keys only it
    writes (`strong`); exactly one format may have such keys, and then every key must belong to it.
    A file with only shared keys (text-encoder `lora_te*_`) goes to the first format claiming all."""
    return _detect(list(keys)).NAME


def _detect(keys: list[str]):
    if not keys:
        raise LoraError("the LoRA holds no tensors")
    found = [f for f in FORMATS if any(f.strong(k) for k in keys)]
    if len(found) > 1:
        examples = {f.NAME: next(k for k in keys if f.strong(k)) for f in found}
        raise LoraError(
            f"the file mixes LoRA formats {[f.NAME for f in found]} (e.g. {examples}); "
            "load each part as its own file"
        )
    if not found:
        found = [f for f in FORMATS if all(f.claims(k) for k in keys)]
    if not found:
        raise LoraError(
            "not a LoRA file fluxcore knows: no key has a known layout (diffusers/PEFT `transformer.`, "
            "kohya `lora_unet_`, OneTrainer `lora_transformer_`, LyCORIS `lycoris_`, XLabs `.processor.`, "
            f"ComfyUI `diffusion_model.`, BFL module names); first keys: {keys[:8]}"
        )
    fmt = found[0]
    stray = [k for k in keys if not fmt.claims(k)]
    if stray:
        raise LoraError(
            f"{fmt.NAME} LoRA: {len(stray)} key(s) belong to no part of that format: {stray[:20]}"
        )
    return fmt


def plan_lora(model: nn.Module, source, *, component: str | None = None) -> tuple[str, list[Patch]]:
    """(format name, patches) for `source` on `model` without changing anything. Patches for
    other components (e.g. text-encoder keys when `model` is the transformer) are included with
    their `component`. Raises LoraError on unknown keys or shapes that do not fit."""
    sd, metadata, name = read_lora(source)
    return plan(model, sd, metadata, name, component)


def plan(model, sd, metadata, name, component):
    component = component or component_of(model)
    fmt = _detect(list(sd))
    targets = Targets(model, component)
    patches = fmt.convert(sd, metadata, targets)
    _check(patches, targets, name)
    return fmt.NAME, patches


def _check(patches: list[Patch], targets: Targets, source: str) -> None:
    problems = []
    for p in patches:
        if p.component != targets.component:
            continue
        if p.kind == "replace":
            want = targets.params.get(p.target)
            if want != tuple(p.tensors["value"].shape):
                problems.append(
                    f"{p.key!r}: replaces {p.target!r} of shape {want}, found {tuple(p.tensors['value'].shape)}"
                )
            continue
        out, inp = targets.linears[p.target]
        start, length = p.rows if p.rows else (0, out)
        if start + length > out or p.out_features != length:
            problems.append(
                f"{p.key!r}: target {p.target!r} rows [{start}, {start + length}) of {out}: "
                f"expected {length} output rows, found {p.out_features}"
            )
        fin = p.in_features
        if fin is not None and fin != inp and not (p.target == "img_in" and fin > inp):
            problems.append(f"{p.key!r}: target {p.target!r} has {inp} input features; found {fin}")
    if problems:
        raise LoraError(
            f"{source}: the LoRA does not fit the {targets.component}:\n  " + "\n  ".join(problems[:40])
        )


def describe_lora(source) -> dict:
    """What a LoRA file is, without a model (for `fluxcore info`): format, tensor count, ranks,
    components (by key prefix) and whether it carries DoRA, LoKr/LoHa, full deltas or norm scales."""
    sd, metadata, src = read_lora(source)
    fmt = _detect(list(sd))
    ranks = sorted(
        {
            tuple(v.shape)[0]
            for k, v in sd.items()
            if k.endswith(("lora_A.weight", "lora_down.weight", "down.weight")) and v.ndim == 2
        }
    )
    kinds = set()
    for k in sd:
        for tag, kind in (
            ("lokr_", "lokr"),
            ("hada_", "loha"),
            (".diff", "full"),
            ("magnitude", "dora"),
            ("dora_scale", "dora"),
            ("_norm.scale", "norm-scales"),
            ("norm_q", "norm-scales"),
        ):
            if tag in k:
                kinds.add(kind)
    comps = set()
    for k in sd:
        if k.startswith(("lora_te1_", "text_encoder.", "text_encoders.clip_l")):
            comps.add("clip")
        elif k.startswith(("lora_te2_", "lora_te3_", "text_encoder_2.", "text_encoders.t5xxl")):
            comps.add("t5")
        else:
            comps.add("transformer")
    control = any(k.endswith("img_in.lora_A.weight") and sd[k].shape[1] > 64 for k in sd)
    return {
        "source": src,
        "format": fmt.NAME,
        "tensors": len(sd),
        "ranks": ranks,
        "components": sorted(comps),
        "kinds": sorted(kinds or {"lora"}),
        "control": control,
        "metadata": sorted(metadata),
    }
