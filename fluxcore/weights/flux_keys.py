"""BFL ↔ diffusers state-dict conversion for the FLUX transformer (FLUX_SPEC §7.4), as data plus
small pure functions. Both directions work for any size: widths are read from tensor shapes.

BFL fuses what diffusers keeps apart: double-block q/k/v (`qkv`), single-block q/k/v/mlp-in
(`linear1`); and the final adaLN is (shift, scale) in BFL but (scale, shift) in diffusers.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch
from torch import Tensor

# One-to-one renames, BFL module path → diffusers module path ({i}: block index).
_TOP = {
    "img_in": "x_embedder",
    "txt_in": "context_embedder",
    "time_in.in_layer": "time_text_embed.timestep_embedder.linear_1",
    "time_in.out_layer": "time_text_embed.timestep_embedder.linear_2",
    "vector_in.in_layer": "time_text_embed.text_embedder.linear_1",
    "vector_in.out_layer": "time_text_embed.text_embedder.linear_2",
    "guidance_in.in_layer": "time_text_embed.guidance_embedder.linear_1",
    "guidance_in.out_layer": "time_text_embed.guidance_embedder.linear_2",
    "final_layer.linear": "proj_out",
}
_DOUBLE = {
    "img_mod.lin": "norm1.linear",
    "txt_mod.lin": "norm1_context.linear",
    "img_attn.norm.query_norm.scale": "attn.norm_q.weight",
    "img_attn.norm.key_norm.scale": "attn.norm_k.weight",
    "txt_attn.norm.query_norm.scale": "attn.norm_added_q.weight",
    "txt_attn.norm.key_norm.scale": "attn.norm_added_k.weight",
    "img_attn.proj": "attn.to_out.0",
    "txt_attn.proj": "attn.to_add_out",
    "img_mlp.0": "ff.net.0.proj",
    "img_mlp.2": "ff.net.2",
    "txt_mlp.0": "ff_context.net.0.proj",
    "txt_mlp.2": "ff_context.net.2",
}
_SINGLE = {
    "modulation.lin": "norm.linear",
    "norm.query_norm.scale": "attn.norm_q.weight",
    "norm.key_norm.scale": "attn.norm_k.weight",
    "linear2": "proj_out",
}
# Fused BFL tensors and the diffusers pieces they split into, in row order.
_DOUBLE_FUSED = {
    "img_attn.qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
    "txt_attn.qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
}
_SINGLE_FUSED = {"linear1": ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp")}
_FINAL_ADALN = ("final_layer.adaLN_modulation.1", "norm_out.linear")

_BLOCK = re.compile(r"^(double_blocks|single_blocks)\.(\d+)\.(.+)$")
_DIFF_BLOCK = re.compile(r"^(transformer_blocks|single_transformer_blocks)\.(\d+)\.(.+)$")


def _split_param(name: str) -> tuple[str, str]:
    """'a.b.weight' → ('a.b', 'weight'); norm scales keep their full name (suffix '')."""
    if name.endswith((".weight", ".bias")):
        module, _, suffix = name.rpartition(".")
        return module, suffix
    return name, ""


def _join(module: str, suffix: str) -> str:
    return f"{module}.{suffix}" if suffix else module


def _swap_halves(t: Tensor) -> Tensor:
    a, b = t.chunk(2, dim=0)
    return torch.cat([b, a], dim=0)


def single_linear1_sizes(linear1_rows: int, hidden_size: int) -> tuple[int, int, int, int]:
    """Row split of a single block's linear1: (q, k, v, mlp)."""
    return (hidden_size, hidden_size, hidden_size, linear1_rows - 3 * hidden_size)


def bfl_to_diffusers(sd: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """BFL-layout transformer state dict → diffusers `FluxTransformer2DModel` layout.

    Splits are views of the input tensors (no copies) except the final-layer half swap.
    Raises KeyError on a key that belongs to neither layout.
    """
    hidden = sd["img_in.weight"].shape[0]
    out: dict[str, Tensor] = {}
    for name, t in sd.items():
        module, suffix = _split_param(name)
        if module == _FINAL_ADALN[0]:
            out[_join(_FINAL_ADALN[1], suffix)] = _swap_halves(t)
            continue
        if module in _TOP:
            out[_join(_TOP[module], suffix)] = t
            continue
        m = _BLOCK.match(module)
        if m is None:
            raise KeyError(f"not a BFL FLUX transformer key: {name!r}")
        kind, idx, rest = m.groups()
        prefix = "transformer_blocks" if kind == "double_blocks" else "single_transformer_blocks"
        renames, fused = (_DOUBLE, _DOUBLE_FUSED) if kind == "double_blocks" else (_SINGLE, _SINGLE_FUSED)
        if rest in fused:
            sizes = (hidden,) * 3 if kind == "double_blocks" else single_linear1_sizes(t.shape[0], hidden)
            for piece, part in zip(fused[rest], torch.split(t, sizes, dim=0)):
                out[f"{prefix}.{idx}.{_join(piece, suffix)}"] = part
        elif rest in renames or _join(rest, suffix) in renames:
            key = _join(rest, suffix)
            target = renames[key] if key in renames else _join(renames[rest], suffix)
            out[f"{prefix}.{idx}.{target}"] = t
        else:
            raise KeyError(f"not a BFL FLUX transformer key: {name!r}")
    return out


_TOP_INV = {v: k for k, v in _TOP.items()}
_DOUBLE_INV = {v: k for k, v in _DOUBLE.items()}
_SINGLE_INV = {v: k for k, v in _SINGLE.items()}


def diffusers_key_to_bfl(name: str) -> tuple[str, str | None]:
    """Where the diffusers tensor `name` goes in the BFL layout: (BFL key, piece), where piece is
    None for a one-to-one rename (the final adaLN also swaps halves) and otherwise the diffusers
    module name of one row block of a fused BFL tensor (`attn.to_q`, ..., `proj_mlp`).
    Raises KeyError on a key that is not a diffusers FLUX transformer key."""
    module, suffix = _split_param(name)
    if module == _FINAL_ADALN[1]:
        return _join(_FINAL_ADALN[0], suffix), None
    if module in _TOP_INV:
        return _join(_TOP_INV[module], suffix), None
    m = _DIFF_BLOCK.match(module)
    if m is None:
        raise KeyError(f"not a diffusers FLUX transformer key: {name!r}")
    kind, idx, _ = m.groups()
    rest = module[len(f"{kind}.{idx}.") :]
    prefix = "double_blocks" if kind == "transformer_blocks" else "single_blocks"
    renames, fused = (
        (_DOUBLE_INV, _DOUBLE_FUSED) if kind == "transformer_blocks" else (_SINGLE_INV, _SINGLE_FUSED)
    )
    for bfl_module, pieces in fused.items():
        if rest in pieces:
            return f"{prefix}.{idx}.{_join(bfl_module, suffix)}", rest
    key = _join(rest, suffix)
    if key in renames:
        return f"{prefix}.{idx}.{renames[key]}", None
    if rest in renames:
        return f"{prefix}.{idx}.{_join(renames[rest], suffix)}", None
    raise KeyError(f"not a diffusers FLUX transformer key: {name!r}")


def fused_pieces(bfl_key: str) -> tuple[str, ...]:
    """The diffusers pieces of a fused BFL key in row order, e.g. 'single_blocks.3.linear1.bias' →
    ('attn.to_q', 'attn.to_k', 'attn.to_v', 'proj_mlp'); () for keys that are not fused."""
    m = _BLOCK.match(_split_param(bfl_key)[0])
    if m is None:
        return ()
    return (_DOUBLE_FUSED | _SINGLE_FUSED).get(m.group(3), ())


def diffusers_to_bfl(sd: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """diffusers `FluxTransformer2DModel` state dict → BFL layout (concatenates q/k/v(/mlp) in row
    order and swaps the final adaLN halves back). Exact inverse of `bfl_to_diffusers`."""
    out: dict[str, Tensor] = {}
    pending: dict[str, dict[str, Tensor]] = {}  # fused BFL key → {diffusers piece: tensor}
    for name, t in sd.items():
        bfl_key, piece = diffusers_key_to_bfl(name)
        if piece is not None:
            pending.setdefault(bfl_key, {})[piece] = t
        elif bfl_key.startswith(_FINAL_ADALN[0] + "."):
            out[bfl_key] = _swap_halves(t)
        else:
            out[bfl_key] = t
    for bfl_key, parts in pending.items():
        order = fused_pieces(bfl_key)
        missing = [p for p in order if p not in parts]
        if missing:
            raise KeyError(f"cannot rebuild {bfl_key!r}: diffusers pieces {missing} are missing")
        out[bfl_key] = torch.cat([parts[p] for p in order], dim=0)
    return out
