"""Plans: how each BFL tensor is built from a checkpoint's own tensors, and the three things that
read a plan — header shapes (`plan_shapes`), streaming from a file (`read_plan`) and in-memory
conversion (`convert`) — so the three can never disagree.

A layout (see `fluxcore.weights.layouts`) turns a checkpoint's keys into {BFL key: Plan}. A Plan
lists source keys whose tensors are stacked along dim 0 in that order (one key: a rename; several:
the row blocks of a fused tensor such as qkv = [q; k; v]), then an optional Transform of the
stacked tensor (e.g. the final adaLN, stored as (scale, shift) by diffusers and (shift, scale) by
BFL).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass

import torch
from torch import Tensor

from fluxcore.weights.errors import KeyMismatchError
from fluxcore.weights.header import FLOAT8_DTYPES


@dataclass(frozen=True)
class Transform:
    """A change of a stacked tensor between a stored layout and BFL.

    forward: stored → BFL (on the stacked tensor; may return new memory).
    inverse: BFL → stored (what an exporter applies before splitting rows).
    shape:   the BFL shape of a stacked shape (identity for reorderings).
    """

    name: str
    forward: Callable[[Tensor], Tensor]
    inverse: Callable[[Tensor], Tensor]
    shape: Callable[[tuple[int, ...]], tuple[int, ...]] = tuple


def _swap_halves(t: Tensor) -> Tensor:
    a, b = t.chunk(2, dim=0)
    return torch.cat([b, a], dim=0)


# [A; B] ↔ [B; A] along dim 0 (its own inverse).
SWAP_HALVES = Transform("swap_halves", _swap_halves, _swap_halves)


@dataclass(frozen=True)
class Plan:
    """One BFL tensor = Transform(stack of `sources` along dim 0, in order).

    sources:   checkpoint keys (with any prefix), top row block first.
    transform: None, or applied to the stacked tensor.
    """

    sources: tuple[str, ...]
    transform: Transform | None = None


def find_prefix(keys: Collection[str], mark: str, tails: tuple[str, ...]) -> str | None:
    """The prefix ('' or ending in '.') under which `mark` and at least one of `tails` sit, or None.
    Community and all-in-one files put a whole model under such a prefix (`model.diffusion_model.`);
    asking for a second key keeps a lone look-alike key from deciding."""
    keys = keys if isinstance(keys, (set, frozenset, Mapping)) else set(keys)
    for k in keys:
        if k.endswith(mark):
            prefix = k[: -len(mark)]
            if (not prefix or prefix.endswith(".")) and any(prefix + t in keys for t in tails):
                return prefix
    return None


def plan_shapes(
    plans: Mapping[str, Plan], shape_of: Callable[[str], tuple[int, ...]], source: str = "checkpoint"
) -> dict[str, tuple[int, ...]]:
    """BFL key → shape from source shapes alone (headers; no tensor, not even on meta). Raises
    KeyMismatchError naming the BFL key when row blocks do not stack (different trailing dims, or
    a 0-dim piece)."""
    shapes: dict[str, tuple[int, ...]] = {}
    for bfl_key, plan in plans.items():
        parts = [tuple(shape_of(k)) for k in plan.sources]
        if len(parts) == 1:
            shape = parts[0]
        else:
            first = parts[0]
            if not first or any(len(s) < 1 or s[1:] != first[1:] for s in parts):
                found = {k: list(s) for k, s in zip(plan.sources, parts)}
                raise KeyMismatchError(f"{source}: the pieces of {bfl_key!r} do not fit together: {found}")
            shape = (sum(s[0] for s in parts), *first[1:])
        shapes[bfl_key] = plan.transform.shape(shape) if plan.transform else shape
    return shapes


def stack_rows(parts: list[Tensor]) -> Tensor:
    """torch.cat along dim 0, also for pieces of different dtypes: torch.cat cannot promote float8
    (a quantiser may leave to_v in bf16 beside float8 to_q/to_k), so every piece first goes to the
    widest non-float8 dtype among them (loading casts on from there)."""
    if len(parts) == 1:
        return parts[0]
    if len({t.dtype for t in parts}) > 1:
        wide = [t.dtype for t in parts if t.dtype not in FLOAT8_DTYPES] or [torch.bfloat16]
        target = functools.reduce(torch.promote_types, wide)
        parts = [t.to(target) for t in parts]
    return torch.cat(parts, dim=0)


def convert(plans: Mapping[str, Plan], tensors: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """In-memory conversion: {BFL key: tensor} from a state dict in the plans' source layout. A
    rename keeps the tensor itself; stacking and transforms make new tensors."""
    out = {}
    for bfl_key, plan in plans.items():
        t = stack_rows([tensors[k] for k in plan.sources])
        out[bfl_key] = plan.transform.forward(t) if plan.transform else t
    return out


def read_plan(checkpoint, plan: Plan, empty: Callable[[tuple[int, ...], torch.dtype], Tensor]) -> Tensor:
    """One BFL tensor read from `checkpoint` (a fluxcore.weights.io.Checkpoint) by `plan`.

    `empty(shape, dtype)` gives the memory to read into (load_flux passes a reused staging buffer
    for tensors it will cast anyway). Row blocks of one dtype are read straight into their rows of
    that memory: no concatenation temporary. Pieces of mixed dtypes are read one by one and
    stacked by `stack_rows`."""
    keys = plan.sources
    dtypes = {checkpoint.dtype(k) for k in keys}
    if len(dtypes) > 1:
        t = stack_rows([checkpoint.read(k) for k in keys])
    else:
        dtype = dtypes.pop()
        shapes = [checkpoint.shape(k) for k in keys]
        t = empty((sum(s[0] for s in shapes), *shapes[0][1:]) if len(keys) > 1 else shapes[0], dtype)
        row = 0
        for k, s in zip(keys, shapes):
            checkpoint.read(k, t[row : row + s[0]] if len(keys) > 1 else t)
            row += s[0] if s else 0
    return plan.transform.forward(t) if plan.transform else t
