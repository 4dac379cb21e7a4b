"""BFL `ae.safetensors` ↔ diffusers `AutoencoderKL` (`vae/`) key map, as pure
functions in both directions, for any number of levels and blocks.

    encoder.down.{i}.block.{j}.*            ↔ encoder.down_blocks.{i}.resnets.{j}.*   (nin_shortcut ↔ conv_shortcut)
    encoder.down.{i}.downsample.conv        ↔ encoder.down_blocks.{i}.downsamplers.0.conv
    decoder.up.{k}.block.{j}.*              ↔ decoder.up_blocks.{n−1−k}.resnets.{j}.*  (level order reversed)
    decoder.up.{k}.upsample.conv            ↔ decoder.up_blocks.{n−1−k}.upsamplers.0.conv
    {en,de}coder.mid.block_{1,2}            ↔ {en,de}coder.mid_block.resnets.{0,1}
    {en,de}coder.mid.attn_1.{norm,q,k,v,proj_out}
                                            ↔ {en,de}coder.mid_block.attentions.0.{group_norm,to_q,to_k,to_v,to_out.0}
    {en,de}coder.norm_out                   ↔ {en,de}coder.conv_norm_out
    conv_in / conv_out                      unchanged

The attention projections are 1×1 convs in BFL ([C, C, 1, 1]) and linears in diffusers ([C, C]);
`convert_tensor` reshapes them (a view, no copy). Older diffusers files name the attention
`query/key/value/proj_attn`; they are read too.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

from torch import Tensor

_ATTN_TO_DIFF = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}
_ATTN_TO_BFL = {v: k for k, v in _ATTN_TO_DIFF.items()} | {
    "query": "q",
    "key": "k",
    "value": "v",
    "proj_attn": "proj_out",
}

_BFL_LEVEL = re.compile(
    r"^(encoder\.down|decoder\.up)\.(\d+)\.(block\.(\d+)\.(.+)|downsample\.(.+)|upsample\.(.+))$"
)
_DIFF_LEVEL = re.compile(
    r"^(encoder\.down_blocks|decoder\.up_blocks)\.(\d+)\.(resnets\.(\d+)\.(.+)|downsamplers\.0\.(.+)|upsamplers\.0\.(.+))$"
)
_BFL_MID = re.compile(r"^(encoder|decoder)\.mid\.(block_1|block_2|attn_1)\.(.+)$")
_DIFF_MID = re.compile(r"^(encoder|decoder)\.mid_block\.(resnets\.[01]|attentions\.0)\.(.+)$")


def num_levels(keys) -> int:
    """Number of resolution levels in a BFL or diffusers autoencoder state dict (from the decoder keys)."""
    idx = set()
    for k in keys:
        m = re.match(r"^decoder\.(?:up|up_blocks)\.(\d+)\.", k)
        if m:
            idx.add(int(m.group(1)))
    if not idx:
        raise KeyError("no decoder.up.* / decoder.up_blocks.* keys: not an autoencoder state dict")
    return max(idx) + 1


def _split(rest: str) -> tuple[str, str]:
    module, _, suffix = rest.rpartition(".")
    return module, suffix


def bfl_to_diffusers_key(name: str, levels: int) -> str:
    """One BFL key → its diffusers name. `levels`: number of resolution levels (4 for FLUX)."""
    m = _BFL_LEVEL.match(name)
    if m:
        part, i, _, j, block_rest, down_rest, up_rest = m.groups()
        side = "encoder.down_blocks" if part == "encoder.down" else "decoder.up_blocks"
        i = int(i) if part == "encoder.down" else levels - 1 - int(i)
        if block_rest is not None:
            return f"{side}.{i}.resnets.{j}.{block_rest.replace('nin_shortcut', 'conv_shortcut')}"
        resample = "downsamplers" if down_rest is not None else "upsamplers"
        return f"{side}.{i}.{resample}.0.{down_rest if down_rest is not None else up_rest}"
    m = _BFL_MID.match(name)
    if m:
        side, what, rest = m.groups()
        if what == "attn_1":
            module, suffix = _split(rest)
            if module not in _ATTN_TO_DIFF:
                raise KeyError(f"not a BFL autoencoder key: {name!r}")
            return f"{side}.mid_block.attentions.0.{_ATTN_TO_DIFF[module]}.{suffix}"
        index = 0 if what == "block_1" else 1
        return f"{side}.mid_block.resnets.{index}.{rest.replace('nin_shortcut', 'conv_shortcut')}"
    for side in ("encoder", "decoder"):
        for stem in ("conv_in.", "conv_out."):
            if name.startswith(f"{side}.{stem}"):
                return name
        if name.startswith(f"{side}.norm_out."):
            return f"{side}.conv_norm_out." + name[len(f"{side}.norm_out.") :]
    raise KeyError(f"not a BFL autoencoder key: {name!r}")


def diffusers_to_bfl_key(name: str, levels: int) -> str:
    """One diffusers `AutoencoderKL` key → its BFL name (inverse of `bfl_to_diffusers_key`)."""
    m = _DIFF_LEVEL.match(name)
    if m:
        part, i, _, j, block_rest, down_rest, up_rest = m.groups()
        side = "encoder.down" if part == "encoder.down_blocks" else "decoder.up"
        i = int(i) if part == "encoder.down_blocks" else levels - 1 - int(i)
        if block_rest is not None:
            return f"{side}.{i}.block.{j}.{block_rest.replace('conv_shortcut', 'nin_shortcut')}"
        resample = "downsample" if down_rest is not None else "upsample"
        return f"{side}.{i}.{resample}.{down_rest if down_rest is not None else up_rest}"
    m = _DIFF_MID.match(name)
    if m:
        side, what, rest = m.groups()
        if what == "attentions.0":
            module, suffix = _split(rest)
            if module not in _ATTN_TO_BFL:
                raise KeyError(f"not a diffusers AutoencoderKL key: {name!r}")
            return f"{side}.mid.attn_1.{_ATTN_TO_BFL[module]}.{suffix}"
        block = "block_1" if what == "resnets.0" else "block_2"
        return f"{side}.mid.{block}.{rest.replace('conv_shortcut', 'nin_shortcut')}"
    for side in ("encoder", "decoder"):
        for stem in ("conv_in.", "conv_out."):
            if name.startswith(f"{side}.{stem}"):
                return name
        if name.startswith(f"{side}.conv_norm_out."):
            return f"{side}.norm_out." + name[len(f"{side}.conv_norm_out.") :]
    raise KeyError(f"not a diffusers AutoencoderKL key: {name!r}")


def _is_attn_projection_weight(bfl_name: str) -> bool:
    return bool(re.match(r"^(encoder|decoder)\.mid\.attn_1\.(q|k|v|proj_out)\.weight$", bfl_name))


def convert_tensor(bfl_name: str, t: Tensor, *, to: str) -> Tensor:
    """Reshape a tensor for the layout `to` ("bfl" or "diffusers"): attention projection weights are
    [C, C, 1, 1] in BFL and [C, C] in diffusers; everything else passes through unchanged."""
    if not _is_attn_projection_weight(bfl_name):
        return t
    if to == "diffusers":
        return t.reshape(t.shape[0], t.shape[1]) if t.ndim == 4 else t
    if to == "bfl":
        return t.reshape(t.shape[0], t.shape[1], 1, 1) if t.ndim == 2 else t
    raise ValueError(f"to must be 'bfl' or 'diffusers', got {to!r}")


def bfl_to_diffusers(sd: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """BFL autoencoder state dict → diffusers `AutoencoderKL` state dict (views, no copies).
    Raises KeyError on a key that is not part of the BFL layout."""
    levels = num_levels(sd)
    return {bfl_to_diffusers_key(k, levels): convert_tensor(k, t, to="diffusers") for k, t in sd.items()}


def diffusers_to_bfl(sd: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """diffusers `AutoencoderKL` state dict → BFL layout (views, no copies). Exact inverse of
    `bfl_to_diffusers`. Raises KeyError on keys FLUX's autoencoder lacks (e.g. quant_conv)."""
    levels = num_levels(sd)
    out = {}
    for k, t in sd.items():
        bfl = diffusers_to_bfl_key(k, levels)
        out[bfl] = convert_tensor(bfl, t, to="bfl")
    return out
