"""Loading, switching, fusing and removing LoRA adapters: plain functions on a built model.

Every function works on a fluxcore.Flux, a CLIPTextEncoder or a T5Encoder. `load_lora` wraps each
targeted Linear-like module in a `LoraLinear` (state-dict keys unchanged), applies parameter
replacements (control LoRAs' QK-norm scales) and, for control LoRAs, widens `img_in`; everything is
recorded so `unload_lora` puts back the very same modules and tensors.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from fluxcore.lora.detect import plan, read_lora
from fluxcore.lora.layer import Adapter, LoraLinear
from fluxcore.lora.patch import LoraError, Patch
from fluxcore.lora.targets import component_of, linear_modules

_STATE = "_fluxcore_lora"


# --- state -------------------------------------------------------------------------------------
@dataclass
class _Record:
    weight: float
    targets: list[str]
    replaced: dict[str, Tensor]
    widened: bool
    format: str


@dataclass
class _State:
    adapters: dict[str, _Record] = field(default_factory=dict)
    active: list[str] = field(default_factory=list)
    enabled: bool = True
    fused: bool = False
    originals: dict[str, Tensor] = field(default_factory=dict)  # replaced parameter → its own tensor
    widen: tuple | None = None  # (original img_in module, original config)
    max_rank: int | None = None


def _state(model: nn.Module, create: bool = False) -> _State | None:
    st = model.__dict__.get(_STATE)
    if st is None and create:
        st = _State()
        model.__dict__[_STATE] = st
    return st


def _need_state(model) -> _State:
    st = _state(model)
    if st is None or not st.adapters:
        raise LoraError("the model has no LoRA adapters loaded")
    return st


def _set_module(model: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, leaf = path.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, module)


def _wrappers(model) -> dict[str, LoraLinear]:
    return {p: m for p, m in model.named_modules() if isinstance(m, LoraLinear)}


class LoadedAdapter(str):
    """The adapter's name (a str), carrying what `load_lora` did: `format`, `targets` (wrapped
    module paths), `replaced` (parameters set from the file), `widened` (img_in widened to a
    control model's input width), `skipped` ({component: patch count} meant for other models)."""

    format: str
    targets: list[str]
    replaced: list[str]
    widened: bool
    skipped: dict[str, int]


def _capacity(path: str, max_rank: int) -> int:
    return max_rank * (3 if path.endswith(".qkv") else 4 if path.endswith("linear1") else 1)


class _Read(tuple):
    """(tensors, metadata, name) already read, so one file feeds several components."""


def load_lora_components(
    components: Mapping[str, nn.Module | None],
    source,
    *,
    adapter_name: str | None = None,
    weight: float = 1.0,
    hotswap: bool = False,
) -> dict[str, LoadedAdapter]:
    """Load one LoRA file into a pipeline's models, e.g. {"transformer": flux, "clip": clip,
    "t5": t5}: the file is read once and each model gets its own part under one adapter name.
    A part whose model is missing (None or absent) is an error; so is a file with no part for
    any of them. Returns {component: LoadedAdapter} for the components that got something."""
    read = _Read(read_lora(source))
    sd, metadata, src = read
    models = {c: m for c, m in components.items() if m is not None}
    if not models:
        raise LoraError("load_lora_components needs at least one model")
    first_name, first = next(iter(models.items()))
    _, patches = plan(first, sd, metadata, src, first_name)
    wanted = {p.component for p in patches}
    missing = sorted(wanted - set(models))
    if missing:
        raise LoraError(f"{src}: the LoRA has parts for {missing}, and no such model was given")
    if adapter_name is None:
        taken = set().union(*(list_adapters(m) for m in models.values()))
        adapter_name = next(f"default_{i}" for i in range(len(taken) + 1) if f"default_{i}" not in taken)
    out = {}
    for comp in [c for c in models if c in wanted]:
        out[comp] = load_lora(
            models[comp], read, adapter_name=adapter_name, weight=weight, component=comp, hotswap=hotswap
        )
    return out


def load_lora(
    model: nn.Module,
    source,
    *,
    adapter_name: str | None = None,
    weight: float = 1.0,
    component: str | None = None,
    hotswap: bool = False,
) -> LoadedAdapter:
    """Load a LoRA file (path to .safetensors, or a dict of tensors) onto `model` as an adapter.

    The adapter is added to the active set with strength `weight`. Patches for other components
    of the pipeline are skipped and counted in the result's `skipped`; a file with nothing for
    `model` is an error. `hotswap=True` replaces the tensors of the existing adapter
    `adapter_name` in place (after `prepare_hotswap`), so a compiled model does not recompile.
    """
    sd, metadata, src = source if isinstance(source, _Read) else read_lora(source)
    component = component or component_of(model)
    fmt, patches = plan(model, sd, metadata, src, component)
    mine = [p for p in patches if p.component == component]
    skipped: dict[str, int] = {}
    for p in patches:
        if p.component != component:
            skipped[p.component] = skipped.get(p.component, 0) + 1
    if not mine:
        raise LoraError(
            f"{src}: the {fmt} LoRA has nothing for the {component} "
            f"(it targets {sorted(skipped)}); load it into that model instead"
        )
    st = _state(model, create=True)
    if st.fused:
        raise LoraError("adapters are fused into the weights; call unfuse_lora before loading another")
    if hotswap:
        return _hotswap(model, st, mine, adapter_name, weight, fmt, skipped)
    name = adapter_name or next(
        f"default_{i}" for i in range(len(st.adapters) + 1) if f"default_{i}" not in st.adapters
    )
    if "." in name or not name:
        raise LoraError(f"adapter name {name!r}: must be non-empty and contain no '.'")
    if name in st.adapters:
        raise LoraError(f"an adapter named {name!r} is loaded already; unload it or pick another name")

    by_target: dict[str, list[Patch]] = {}
    replaced: dict[str, Tensor] = {}
    for p in mine:
        if p.kind == "replace":
            replaced[p.target] = p.tensors["value"]
        else:
            by_target.setdefault(p.target, []).append(p)
    modules = linear_modules(model)
    widened = False
    if "img_in" in by_target:
        need = max(p.in_features or 0 for p in by_target["img_in"])
        if need > modules["img_in"].in_features:
            _widen_img_in(model, st, need)
            modules = linear_modules(model)
            widened = True
    for path, plist in by_target.items():
        m = modules[path]
        if not isinstance(m, LoraLinear):
            m = LoraLinear(m)
            _set_module(model, path, m)
        w = m.base.weight if hasattr(m.base, "weight") else None
        dtype = (
            w.dtype if w is not None and w.is_floating_point() and w.element_size() >= 2 else torch.float32
        )
        device = w.device if w is not None else None
        cap = None if st.max_rank is None else _capacity(path, st.max_rank)
        m.adapters[name] = Adapter(
            plist, m.out_features, m.in_features, weight=weight, dtype=dtype, device=device, rank_capacity=cap
        )
    params = dict(model.named_parameters())
    for pname, value in replaced.items():
        param = params[pname] if pname in params else model.get_parameter(pname)
        st.originals.setdefault(pname, param.data)
        replaced[pname] = value.to(dtype=param.dtype, device=param.device)
    st.adapters[name] = _Record(weight, sorted(by_target), replaced, widened, fmt)
    st.active.append(name)
    _sync(model, st)
    out = LoadedAdapter(name)
    out.format, out.targets, out.replaced, out.widened, out.skipped = (
        fmt,
        sorted(by_target),
        sorted(replaced),
        widened,
        skipped,
    )
    return out


def _widen_img_in(model, st: _State, width: int) -> None:
    """Control LoRAs: img_in takes cat(latents, control latents); the base weight gets zero
    columns so the base model's output is unchanged on the first in_channels inputs."""
    old = model.img_in
    if isinstance(old, LoraLinear) or not isinstance(old, nn.Linear):
        raise LoraError("a control LoRA widens img_in; load it before any other LoRA that targets img_in")
    new = nn.Linear(
        width, old.out_features, bias=old.bias is not None, device=old.weight.device, dtype=old.weight.dtype
    )
    with torch.no_grad():
        new.weight.zero_()
        new.weight[:, : old.in_features] = old.weight
        if old.bias is not None:
            new.bias.copy_(old.bias)
    new.requires_grad_(old.weight.requires_grad)
    st.widen = (old, model.config if hasattr(model, "config") else None)
    model.img_in = new
    if hasattr(model, "config"):
        model.config = dataclasses.replace(model.config, in_channels=width)
    if hasattr(model, "in_channels"):
        model.in_channels = width


def _hotswap(model, st, patches, name, weight, fmt, skipped) -> LoadedAdapter:
    if st.max_rank is None:
        raise LoraError("hotswap needs prepare_hotswap(model, max_rank=...) before the first load_lora")
    if name not in st.adapters:
        raise LoraError(
            f"hotswap replaces an existing adapter; {name!r} is not loaded ({sorted(st.adapters)})"
        )
    rec = st.adapters[name]
    wrappers = _wrappers(model)
    by_target: dict[str, list[Patch]] = {}
    for p in patches:
        if p.kind != "lowrank" or p.magnitude is not None:
            raise LoraError(
                f"{p.key!r}: hotswap takes plain low-rank LoRAs only; found {p.kind}"
                f"{' with DoRA' if p.magnitude is not None else ''}"
            )
        by_target.setdefault(p.target, []).append(p)
    extra = sorted(set(by_target) - set(rec.targets))
    if extra:
        raise LoraError(
            f"hotswap: the new LoRA targets modules the loaded one does not ({extra[:10]}); "
            "that changes the compiled graph; load the widest LoRA first"
        )
    new = {}
    for path in rec.targets:
        m = wrappers[path]
        old = m.adapters[name]
        a = Adapter(
            by_target.get(path, []),
            m.out_features,
            m.in_features,
            weight=weight,
            dtype=old.A.dtype,
            device=old.A.device,
            rank_capacity=old.A.shape[0],
        )
        if a.bias is not None and old.bias is None:
            raise LoraError(f"hotswap: the new LoRA has a bias delta on {path!r} and the loaded one has none")
        new[path] = a
    with torch.no_grad():
        for path, a in new.items():
            old = wrappers[path].adapters[name]
            old.A.copy_(a.A)
            old.B.copy_(a.B)
            old.weight.fill_(weight)
            if old.bias is not None:
                old.bias.copy_(a.bias if a.bias is not None else torch.zeros_like(old.bias))
    rec.weight, rec.format = weight, fmt
    out = LoadedAdapter(name)
    out.format, out.targets, out.replaced, out.widened, out.skipped = (
        fmt,
        sorted(by_target),
        [],
        False,
        skipped,
    )
    return out


def prepare_hotswap(model: nn.Module, max_rank: int) -> None:
    """Declare the largest rank any later LoRA will have; call before the first `load_lora`.
    Every adapter's matrices are then zero-padded to max_rank (× 3 for `qkv`, × 4 for `linear1`,
    room for split q/k/v(/mlp) pieces) and strengths live in tensors, so `load_lora(...,
    hotswap=True)` and `set_adapters` only copy numbers into existing buffers."""
    st = _state(model, create=True)
    if st.adapters:
        raise LoraError("prepare_hotswap must come before the first load_lora")
    if max_rank < 1:
        raise LoraError(f"max_rank must be >= 1, got {max_rank}")
    st.max_rank = int(max_rank)


# --- switching ---------------------------------------------------------------------------------
def _sync(model, st: _State) -> None:
    """Push the state (active set, strengths, enabled) into every wrapper and replaced parameter."""
    for m in _wrappers(model).values():
        m.active = tuple(n for n in st.active if n in m.adapters)
        m.enabled = st.enabled
        with torch.no_grad():
            for n in m.active:
                m.adapters[n].weight.fill_(st.adapters[n].weight)
    params = dict(model.named_parameters())
    for pname, orig in st.originals.items():
        value = orig
        if st.enabled:
            for n in st.active:
                value = st.adapters[n].replaced.get(pname, value)
        params[pname].data = value


def set_adapters(model: nn.Module, names, weights=None) -> None:
    """Make `names` (a name or a list) the active adapters with strengths `weights` (a number,
    a list, or None for each adapter's current strength). Costs no recompilation when only
    the strengths change."""
    st = _need_state(model)
    if st.fused:
        raise LoraError("adapters are fused into the weights; call unfuse_lora before set_adapters")
    names = [names] if isinstance(names, str) else list(names)
    unknown = [n for n in names if n not in st.adapters]
    if unknown:
        raise LoraError(f"no adapters named {unknown}; loaded: {sorted(st.adapters)}")
    if weights is None:
        weights = [st.adapters[n].weight for n in names]
    elif isinstance(weights, (int, float)):
        weights = [float(weights)] * len(names)
    weights = list(weights)
    if len(weights) != len(names):
        raise LoraError(f"{len(names)} adapter names but {len(weights)} weights")
    for n, w in zip(names, weights):
        st.adapters[n].weight = float(w)
    st.active = names
    _sync(model, st)


def get_active_adapters(model: nn.Module) -> list[str]:
    st = _state(model)
    return list(st.active) if st is not None and st.enabled else []


def list_adapters(model: nn.Module) -> dict[str, float]:
    """Every loaded adapter and its strength, active or not."""
    st = _state(model)
    return {} if st is None else {n: r.weight for n, r in st.adapters.items()}


def disable_lora(model: nn.Module) -> None:
    """Run the base model (adapters stay loaded; replaced parameters go back to the originals)."""
    st = _need_state(model)
    if st.fused:
        raise LoraError("adapters are fused into the weights; call unfuse_lora first")
    st.enabled = False
    _sync(model, st)


def enable_lora(model: nn.Module) -> None:
    st = _need_state(model)
    st.enabled = True
    _sync(model, st)


# --- fusing ------------------------------------------------------------------------------------
def fuse_lora(model: nn.Module, adapter_names=None, lora_scale: float = 1.0) -> list[str]:
    """Merge adapters (default: the active ones) into the base weights: W ← round(W + Σ ΔW) with the
    sum in float32 and one rounding to W's dtype. Returns the modules changed."""
    st = _need_state(model)
    if st.fused:
        raise LoraError("already fused; call unfuse_lora first")
    names = tuple(
        st.active
        if adapter_names is None
        else ([adapter_names] if isinstance(adapter_names, str) else adapter_names)
    )
    unknown = [n for n in names if n not in st.adapters]
    if unknown:
        raise LoraError(f"no adapters named {unknown}; loaded: {sorted(st.adapters)}")
    changed = []
    for path, m in _wrappers(model).items():
        if any(n in m.adapters for n in names):
            m.fuse(names, lora_scale)
            changed.append(path)
    st.fused = True
    return changed


def unfuse_lora(model: nn.Module) -> None:
    """Put back the exact base tensors `fuse_lora` replaced (bit for bit)."""
    st = _state(model)
    for m in _wrappers(model).values():
        m.unfuse()
    if st is not None:
        st.fused = False


# --- removing ----------------------------------------------------------------------------------
def unload_lora(model: nn.Module, adapter_name: str | None = None) -> list[str]:
    """Remove one adapter (or all). Modules left with no adapter become the original module objects
    again, replaced parameters get their original tensors, and a widened img_in (control LoRA)
    goes back to the original module and config. Returns the module paths restored."""
    st = _state(model)
    if st is None:
        return []
    unfuse_lora(model)
    names = list(st.adapters) if adapter_name is None else [adapter_name]
    unknown = [n for n in names if n not in st.adapters]
    if unknown:
        raise LoraError(f"no adapters named {unknown}; loaded: {sorted(st.adapters)}")
    restored = []
    for path, m in _wrappers(model).items():
        for n in names:
            if n in m.adapters:
                del m.adapters[n]
        if not len(m.adapters):
            _set_module(model, path, m.base)
            restored.append(path)
    for n in names:
        rec = st.adapters.pop(n)
        if n in st.active:
            st.active.remove(n)
        if rec.widened and st.widen is not None:
            old, config = st.widen
            if isinstance(model.img_in, LoraLinear):
                restored.append("img_in")
            model.img_in = old
            if config is not None:
                model.config = config
                model.in_channels = config.in_channels
            st.widen = None
    _sync(model, st)
    still = {p for r in st.adapters.values() for p in r.replaced}
    for pname in [p for p in st.originals if p not in still]:
        st.originals.pop(pname)
    if not st.adapters:
        model.__dict__.pop(_STATE, None)
    return restored
