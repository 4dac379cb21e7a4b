"""The diffusers layout: `FluxTransformer2DModel` folders (`transformer/` with config.json and
diffusion_pytorch_model.safetensors or its shards), as key-map data plus small pure functions.

BFL fuses what diffusers keeps apart: double-block q/k/v (`qkv` = [to_q; to_k; to_v] by rows),
single-block q/k/v/mlp-in (`linear1` = [to_q; to_k; to_v; proj_mlp], rows (D, D, D, mlp width));
and the final adaLN is (shift, scale) in BFL but (scale, shift) in diffusers. Everything else is a
rename. Widths come from tensor shapes, so any model size converts.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Mapping

import torch
from torch import Tensor

from fluxcore.weights.layouts.base import SWAP_HALVES, Plan, Transform, convert, find_prefix

name = "diffusers"

# BFL module → its diffusers pieces, in row order (one piece: a rename). Norm scales are listed by
# full parameter name, since BFL calls them `.scale` and diffusers `.weight`.
_TOP = {
    "img_in": ("x_embedder",),
    "txt_in": ("context_embedder",),
    "time_in.in_layer": ("time_text_embed.timestep_embedder.linear_1",),
    "time_in.out_layer": ("time_text_embed.timestep_embedder.linear_2",),
    "vector_in.in_layer": ("time_text_embed.text_embedder.linear_1",),
    "vector_in.out_layer": ("time_text_embed.text_embedder.linear_2",),
    "guidance_in.in_layer": ("time_text_embed.guidance_embedder.linear_1",),
    "guidance_in.out_layer": ("time_text_embed.guidance_embedder.linear_2",),
    "final_layer.linear": ("proj_out",),
    "final_layer.adaLN_modulation.1": ("norm_out.linear",),
}
_TRANSFORMS: dict[str, Transform] = {"final_layer.adaLN_modulation.1": SWAP_HALVES}
_DOUBLE = {  # double_blocks.{i}.* ↔ transformer_blocks.{i}.*
    "img_mod.lin": ("norm1.linear",),
    "txt_mod.lin": ("norm1_context.linear",),
    "img_attn.qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
    "txt_attn.qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
    "img_attn.norm.query_norm.scale": ("attn.norm_q.weight",),
    "img_attn.norm.key_norm.scale": ("attn.norm_k.weight",),
    "txt_attn.norm.query_norm.scale": ("attn.norm_added_q.weight",),
    "txt_attn.norm.key_norm.scale": ("attn.norm_added_k.weight",),
    "img_attn.proj": ("attn.to_out.0",),
    "txt_attn.proj": ("attn.to_add_out",),
    "img_mlp.0": ("ff.net.0.proj",),
    "img_mlp.2": ("ff.net.2",),
    "txt_mlp.0": ("ff_context.net.0.proj",),
    "txt_mlp.2": ("ff_context.net.2",),
}
_SINGLE = {  # single_blocks.{j}.* ↔ single_transformer_blocks.{j}.*
    "modulation.lin": ("norm.linear",),
    "linear1": ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"),
    "norm.query_norm.scale": ("attn.norm_q.weight",),
    "norm.key_norm.scale": ("attn.norm_k.weight",),
    "linear2": ("proj_out",),
}
_BLOCKS = {
    "double_blocks": ("transformer_blocks", _DOUBLE),
    "single_blocks": ("single_transformer_blocks", _SINGLE),
}


def _inverse(table: dict[str, tuple[str, ...]]) -> dict[str, tuple[str, int, int]]:
    """diffusers piece → (BFL name, row-block position, number of blocks)."""
    return {p: (bfl, i, len(pieces)) for bfl, pieces in table.items() for i, p in enumerate(pieces)}


_TOP_INV = _inverse(_TOP)
_BLOCKS_INV = {diff: (bfl, _inverse(table)) for bfl, (diff, table) in _BLOCKS.items()}
_BFL_BLOCK = re.compile(r"^(double_blocks|single_blocks)\.(\d+)\.(.+)$")
_DIFF_BLOCK = re.compile(r"^(transformer_blocks|single_transformer_blocks)\.(\d+)\.(.+)$")

# Told apart from BFL by its names: diffusers keeps q/k/v apart.
_MARK = "x_embedder.weight"
_TAILS = (
    "proj_out.weight",
    "transformer_blocks.0.attn.to_q.weight",
    "single_transformer_blocks.0.attn.to_q.weight",
)


def _split_param(key: str) -> tuple[str, str]:
    """'a.b.weight' → ('a.b', 'weight'); anything else (norm scales) is one name with suffix ''."""
    if key.endswith((".weight", ".bias")):
        module, _, suffix = key.rpartition(".")
        return module, suffix
    return key, ""


def _join(module: str, suffix: str) -> str:
    return f"{module}.{suffix}" if suffix else module


def bfl_key_to_diffusers(bfl_key: str) -> tuple[tuple[str, ...], Transform | None]:
    """(diffusers keys of the row blocks of `bfl_key`, top first; the transform between the two),
    e.g. 'double_blocks.0.img_attn.qkv.bias' → (('transformer_blocks.0.attn.to_q.bias', ...), None).
    Raises KeyError for a key that is not a BFL FLUX transformer key."""
    module, suffix = _split_param(bfl_key)
    if module in _TOP:
        return tuple(_join(p, suffix) for p in _TOP[module]), _TRANSFORMS.get(module)
    m = _BFL_BLOCK.match(module)
    if m is not None and m.group(3) in _BLOCKS[m.group(1)][1]:
        diff, table = _BLOCKS[m.group(1)]
        return tuple(f"{diff}.{m.group(2)}.{_join(p, suffix)}" for p in table[m.group(3)]), None
    raise KeyError(f"not a BFL FLUX transformer key: {bfl_key!r}")


def _locate(key: str) -> tuple[str, int, int, str]:
    """Where the diffusers tensor `key` goes: (BFL key, row-block position, number of blocks,
    the piece's module name inside its block). Raises KeyError for a non-FLUX key."""
    module, suffix = _split_param(key)
    if module in _TOP_INV:
        bfl, pos, n = _TOP_INV[module]
        return _join(bfl, suffix), pos, n, module
    m = _DIFF_BLOCK.match(module)
    if m is not None:
        kind, idx, rest = m.groups()
        bfl_kind, inv = _BLOCKS_INV[kind]
        whole = _join(rest, suffix)
        if whole in inv:  # a norm scale: named in full on both sides
            bfl, pos, n = inv[whole]
            return f"{bfl_kind}.{idx}.{bfl}", pos, n, rest
        if rest in inv:
            bfl, pos, n = inv[rest]
            return f"{bfl_kind}.{idx}.{_join(bfl, suffix)}", pos, n, rest
    raise KeyError(f"not a diffusers FLUX transformer key: {key!r}")


def diffusers_key_to_bfl(key: str) -> tuple[str, str | None]:
    """Where the diffusers tensor `key` goes in the BFL layout: (BFL key, piece), where piece is
    None for a one-to-one rename (the final adaLN also swaps halves) and otherwise the diffusers
    module name of one row block of a fused BFL tensor (`attn.to_q`, ..., `proj_mlp`).
    Raises KeyError on a key that is not a diffusers FLUX transformer key."""
    bfl, _, n, piece = _locate(key)
    return bfl, (piece if n > 1 else None)


def fused_pieces(bfl_key: str) -> tuple[str, ...]:
    """The diffusers pieces of a fused BFL key in row order, e.g. 'single_blocks.3.linear1.bias' →
    ('attn.to_q', 'attn.to_k', 'attn.to_v', 'proj_mlp'); () for keys that are not fused."""
    m = _BFL_BLOCK.match(_split_param(bfl_key)[0])
    if m is None:
        return ()
    pieces = _BLOCKS[m.group(1)][1].get(m.group(3), ())
    return pieces if len(pieces) > 1 else ()


def single_linear1_sizes(linear1_rows: int, hidden_size: int) -> tuple[int, int, int, int]:
    """Row split of a single block's linear1: (q, k, v, mlp)."""
    return (hidden_size, hidden_size, hidden_size, linear1_rows - 3 * hidden_size)


# --- the layout -----------------------------------------------------------------------------------


def detect(keys: Collection[str]) -> str | None:
    """The prefix of the diffusers keys ('' in diffusers' own folders), or None if not diffusers."""
    return find_prefix(keys, _MARK, _TAILS)


def plan(keys: Collection[str], prefix: str = "") -> dict[str, Plan]:
    """{BFL key: Plan} for the diffusers keys under `prefix`. Raises KeyError naming a key that is
    no diffusers FLUX key, or a fused BFL tensor with row blocks missing."""
    slots: dict[str, list[str | None]] = {}
    for k in keys:
        bfl, pos, n, _ = _locate(k[len(prefix) :])
        slots.setdefault(bfl, [None] * n)[pos] = k
    plans = {}
    for bfl, sources in slots.items():
        if None in sources:
            want = bfl_key_to_diffusers(bfl)[0]
            missing = [prefix + w for w, s in zip(want, sources) if s is None]
            raise KeyError(f"cannot rebuild {bfl!r}: diffusers pieces {missing} are missing")
        plans[bfl] = Plan(tuple(sources), bfl_key_to_diffusers(bfl)[1])
    return plans


def export(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """BFL state dict → diffusers `FluxTransformer2DModel` state dict. Row blocks are views of the
    input (no copies); only the final adaLN's swapped halves are new memory. Raises KeyError on a
    key that is not a BFL FLUX transformer key."""
    hidden = state_dict["img_in.weight"].shape[0]
    out: dict[str, Tensor] = {}
    for bfl_key, t in state_dict.items():
        names, transform = bfl_key_to_diffusers(bfl_key)
        if transform is not None:
            t = transform.inverse(t)
        if len(names) == 1:
            out[names[0]] = t
            continue
        sizes = (hidden,) * 3 if len(names) == 3 else single_linear1_sizes(t.shape[0], hidden)
        out.update(zip(names, torch.split(t, sizes, dim=0)))
    return out


def bfl_to_diffusers(sd: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """BFL-layout transformer state dict → diffusers layout (`export`)."""
    return export(sd)


def diffusers_to_bfl(sd: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """diffusers `FluxTransformer2DModel` state dict → BFL layout, by the same plan that loading
    streams (row blocks stacked in order, final adaLN halves swapped back). Exact inverse of
    `bfl_to_diffusers`; raises KeyError on an unknown key or a fused tensor with pieces missing."""
    return convert(plan(sd.keys()), sd)
