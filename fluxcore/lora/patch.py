"""The one internal form every LoRA format converts to: a `Patch` per (adapter, target module).

A format file only turns checkpoint keys into patches (`group_keys` + `build_patch` do the
suffix parsing every format shares); `fluxcore.lora.core` applies them. Shapes: a target weight
W is (out, in); a low-rank pair is down A (r, in) and up B (out, r), ΔW = s·B@A.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor

from fluxcore.errors import FluxcoreError


class LoraError(FluxcoreError, ValueError):
    """A LoRA file that is not a LoRA, does not fit the model, or cannot be applied as asked."""


# Per-module key suffixes, longest first so that ".lora_B.bias" wins over ".bias"-like endings.
SUFFIXES: dict[str, str] = {
    ".lora_A.weight": "down",
    ".lora_B.weight": "up",
    ".lora_B.bias": "up_bias",
    ".lora_down.weight": "down",
    ".lora_up.weight": "up",
    ".lora.down.weight": "down",
    ".lora.up.weight": "up",
    ".lora_linear_layer.down.weight": "down",
    ".lora_linear_layer.up.weight": "up",
    "_lora.down.weight": "down",
    "_lora.up.weight": "up",
    ".down.weight": "down",
    ".up.weight": "up",
    ".alpha": "alpha",
    ".lora_magnitude_vector.weight": "magnitude",
    ".lora_magnitude_vector": "magnitude",
    ".dora_scale": "dora_scale",
    ".lokr_w1": "lokr_w1",
    ".lokr_w1_a": "lokr_w1_a",
    ".lokr_w1_b": "lokr_w1_b",
    ".lokr_w2": "lokr_w2",
    ".lokr_w2_a": "lokr_w2_a",
    ".lokr_w2_b": "lokr_w2_b",
    ".lokr_t2": "lokr_t2",
    ".hada_w1_a": "hada_w1_a",
    ".hada_w1_b": "hada_w1_b",
    ".hada_w2_a": "hada_w2_a",
    ".hada_w2_b": "hada_w2_b",
    ".diff": "diff",
    ".diff_b": "diff_b",
    ".lora_mid.weight": "unsupported",
    ".hada_t1": "unsupported",
    ".hada_t2": "unsupported",
}
_ORDERED = sorted(SUFFIXES, key=len, reverse=True)


def split_key(key: str, *, allow_bare_down_up: bool = False) -> tuple[str, str] | None:
    """'m.path.lora_A.weight' → ('m.path', 'down'); None when no LoRA suffix matches. The bare
    '.down.weight'/'.up.weight' endings (XLabs) count only when `allow_bare_down_up`."""
    for suffix in _ORDERED:
        if key.endswith(suffix):
            if suffix in (".down.weight", ".up.weight") and not allow_bare_down_up:
                continue
            return key[: -len(suffix)], SUFFIXES[suffix]
    return None


@dataclass
class Patch:
    """One adapter's change to one target of one model component.

    key:       the module prefix in the file (for messages)
    component: "transformer", "clip" or "t5"
    target:    module path in the component (dotted), or its underscored form when `underscored`
    kind:      "lowrank" (down, up) | "full" (diff) | "lokr" | "loha" | "bias" (bias delta only)
               | "replace" (a parameter's new value, e.g. a control LoRA's QK-norm scale)
    rows:      (start, length) of the target's output rows this patch writes, None for all
    scale:     s in ΔW = s·(...); the user's weight multiplies on top
    tensors:   the kind's tensors (down/up; diff; lokr_*/hada_*; value for "replace")
    bias:      bias delta (rows like the weight), or None
    magnitude: DoRA magnitude per output row (len rows), or None
    swap_halves: the file stores the output rows in the other half order (diffusers' final adaLN)
    """

    key: str
    component: str
    target: str
    kind: str
    rows: tuple[int, int] | None = None
    scale: float = 1.0
    tensors: dict[str, Tensor] = field(default_factory=dict)
    bias: Tensor | None = None
    magnitude: Tensor | None = None
    swap_halves: bool = False
    underscored: bool = False

    @property
    def in_features(self) -> int | None:
        t = self.tensors
        if self.kind == "lowrank":
            return t["down"].shape[1]
        if self.kind == "full":
            return t["diff"].shape[1]
        if self.kind == "lokr":
            return _lokr_factor(t, 1)[1] * _lokr_factor(t, 2)[1]
        if self.kind == "loha":
            return t["hada_w1_b"].shape[1]
        return None

    @property
    def out_features(self) -> int:
        t = self.tensors
        if self.kind == "lowrank":
            return t["up"].shape[0]
        if self.kind == "full":
            return t["diff"].shape[0]
        if self.kind == "lokr":
            return _lokr_factor(t, 1)[0] * _lokr_factor(t, 2)[0]
        if self.kind == "loha":
            return t["hada_w1_a"].shape[0]
        if self.kind == "bias":
            return self.bias.shape[0]
        return self.tensors["value"].shape[0]

    @property
    def rank(self) -> int | None:
        return self.tensors["down"].shape[0] if self.kind == "lowrank" else None

    def delta(self) -> Tensor:
        """ΔW = s·(...) in float32, (out rows of this patch, in), halves already in BFL order."""
        t = {k: v.float() for k, v in self.tensors.items()}
        if self.kind == "lowrank":
            d = t["up"] @ t["down"]
        elif self.kind == "full":
            d = t["diff"]
        elif self.kind == "lokr":
            d = torch.kron(_lokr_matrix(t, 1), _lokr_matrix(t, 2))
        elif self.kind == "loha":
            d = (t["hada_w1_a"] @ t["hada_w1_b"]) * (t["hada_w2_a"] @ t["hada_w2_b"])
        else:
            raise LoraError(f"{self.key}: a {self.kind!r} patch has no weight delta")
        d = d * self.scale
        return swap_rows(d) if self.swap_halves else d


def swap_rows(t: Tensor) -> Tensor:
    a, b = t.chunk(2, dim=0)
    return torch.cat([b, a], dim=0)


def _lokr_factor(t: dict, i: int) -> tuple[int, int]:
    if f"lokr_w{i}" in t:
        return tuple(t[f"lokr_w{i}"].shape)
    if i == 2 and "lokr_t2" in t:
        return t["lokr_w2_a"].shape[0], t["lokr_w2_b"].shape[1]
    return t[f"lokr_w{i}_a"].shape[0], t[f"lokr_w{i}_b"].shape[1]


def _lokr_matrix(t: dict, i: int) -> Tensor:
    if f"lokr_w{i}" in t:
        return t[f"lokr_w{i}"]
    if i == 2 and "lokr_t2" in t:
        # Tucker core (r, r, 1, 1) for a Linear: W2 = w2_a @ t2 @ w2_b
        core = t["lokr_t2"].reshape(t["lokr_t2"].shape[0], t["lokr_t2"].shape[1])
        return torch.einsum("ij,jr,ip->pr", core, t["lokr_w2_b"], t["lokr_w2_a"])
    return t[f"lokr_w{i}_a"] @ t[f"lokr_w{i}_b"]


def group_keys(keys, *, allow_bare_down_up: bool = False) -> tuple[dict[str, dict[str, str]], list[str]]:
    """{module prefix: {role: key}} and the keys with no LoRA suffix."""
    groups: dict[str, dict[str, str]] = {}
    rest: list[str] = []
    for key in keys:
        hit = split_key(key, allow_bare_down_up=allow_bare_down_up)
        if hit is None:
            rest.append(key)
            continue
        module, role = hit
        roles = groups.setdefault(module, {})
        if role in roles:
            raise LoraError(f"{key!r} and {roles[role]!r} both give the {role!r} tensor of {module!r}")
        roles[role] = key
    return groups, rest


_LOKR = {"lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2"}
_LOHA = {"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"}


def _scalar(key: str, t: Tensor) -> float:
    if t.numel() != 1:
        raise LoraError(f"{key!r}: alpha must be a single number; found shape {tuple(t.shape)}")
    return float(t.reshape(()).item()) if t.device.type != "meta" else 1.0


def build_patch(
    module: str,
    roles: dict[str, str],
    sd,
    *,
    component: str,
    target: str,
    alpha: float | None = None,
    rows: tuple[int, int] | None = None,
    swap_halves: bool = False,
    underscored: bool = False,
    rslora: bool = False,
) -> Patch:
    """The patch for one module group. `alpha` (from a file header) overrides a stored `.alpha`;
    with neither, s = 1. Scale = alpha / rows of the stored down matrix (α/√r with `rslora`)."""
    if "unsupported" in roles:
        raise LoraError(
            f"{roles['unsupported']!r}: convolution (LoCon/Tucker) LoRA tensors have no Linear target"
        )
    t = {role: sd[key] for role, key in roles.items()}
    if alpha is None and "alpha" in t:
        alpha = _scalar(roles["alpha"], t["alpha"])
    kinds = []
    if "down" in t or "up" in t:
        kinds.append("lowrank")
    if _LOKR & t.keys():
        kinds.append("lokr")
    if _LOHA & t.keys():
        kinds.append("loha")
    if "diff" in t:
        kinds.append("full")
    if len(kinds) > 1:
        raise LoraError(f"{module!r} mixes {kinds} tensors; one module holds one kind of adapter")
    kind = kinds[0] if kinds else ("bias" if "diff_b" in t or "up_bias" in t else None)
    if kind is None:
        raise LoraError(f"{module!r} has only {sorted(roles.values())}: no weight or bias delta")

    def need(*names):
        missing = [n for n in names if n not in t]
        if missing:
            raise LoraError(
                f"{module!r} is a {kind} adapter but lacks {missing}; found {sorted(roles.values())}"
            )

    def matrix(name):
        if t[name].ndim != 2:
            raise LoraError(f"{roles[name]!r}: expected a 2-D matrix, found shape {tuple(t[name].shape)}")

    scale = 1.0
    tensors: dict[str, Tensor] = {}
    if kind == "lowrank":
        need("down", "up")
        matrix("down")
        matrix("up")
        down, up = t["down"], t["up"]
        if up.shape[1] != down.shape[0]:
            raise LoraError(
                f"{roles['up']!r}: expected shape ({up.shape[0]}, {down.shape[0]}) to match the down matrix "
                f"{roles['down']!r} of rank {down.shape[0]}; found {tuple(up.shape)}"
            )
        r = down.shape[0]
        if alpha is not None:
            scale = alpha / (math.sqrt(r) if rslora else r)
        tensors = {"down": down, "up": up}
    elif kind == "full":
        matrix("diff")
        tensors = {"diff": t["diff"]}
    elif kind == "lokr":
        for i in (1, 2):
            if f"lokr_w{i}" not in t:
                need(f"lokr_w{i}_a", f"lokr_w{i}_b")
        tensors = {k: t[k] for k in _LOKR if k in t}
        full1, full2 = "lokr_w1" in t, "lokr_w2" in t
        if alpha is not None and not (full1 and full2):
            r = t["lokr_w2_b"].shape[0] if not full2 else t["lokr_w1_b"].shape[0]
            scale = alpha / r
    elif kind == "loha":
        need(*sorted(_LOHA))
        tensors = {k: t[k] for k in _LOHA}
        if alpha is not None:
            scale = alpha / t["hada_w1_b"].shape[0]
    bias = t.get("up_bias", t.get("diff_b"))
    if "up_bias" in t and "diff_b" in t:
        raise LoraError(f"{module!r} has both a lora_B.bias and a diff_b bias delta")
    if bias is not None and kind == "lowrank" and "up_bias" in t:
        bias = bias * scale  # PEFT scales the whole lora_B output, bias included
    magnitude = t.get("magnitude", t.get("dora_scale"))
    if magnitude is not None:
        if kind == "bias":
            raise LoraError(f"{module!r}: a DoRA magnitude needs a weight delta beside it")
        if "dora_scale" in t and magnitude.ndim == 2 and magnitude.shape[0] == 1 and magnitude.shape[1] != 1:
            raise LoraError(
                f"{roles['dora_scale']!r}: column-wise DoRA (shape (1, in)) is not supported; "
                "expected (out, 1) (LyCORIS wd_on_out=True)"
            )
        magnitude = magnitude.reshape(-1)
    patch = Patch(
        key=module,
        component=component,
        target=target,
        kind=kind,
        rows=rows,
        scale=scale,
        tensors=tensors,
        bias=bias,
        magnitude=magnitude,
        swap_halves=swap_halves,
        underscored=underscored,
    )
    for name, extra in (("bias", bias), ("magnitude", magnitude)):
        if extra is not None and kind != "bias" and extra.shape[0] != patch.out_features:
            raise LoraError(
                f"{module!r}: {name} has {extra.shape[0]} rows; expected {patch.out_features} like its weight delta"
            )
    return patch
