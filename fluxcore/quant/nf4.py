"""bitsandbytes 4-bit weights (NF4 and FP4), read and written without bitsandbytes.

Per quantized Linear `X` a file holds:

    X.weight                                   uint8, two 4-bit codes per byte: element 2j in the
                                               high nibble of byte j, element 2j+1 in the low one
    X.weight.absmax                            one scale per `blocksize` elements (float32), or
                                               uint8 codes when double-quantized ("nested")
    X.weight.quant_map                         float32[16]: the code book (NF4 below, or FP4)
    X.weight.nested_absmax, .nested_quant_map  double quantization only: float32 scale per
                                               `nested_blocksize` absmax codes, float32[256] map
    X.weight.quant_state.bitsandbytes__nf4     uint8 bytes of a JSON object: quant_type, blocksize,
                                               dtype, shape, and when nested: nested_blocksize,
                                               nested_dtype, nested_offset

Decoding (row-major over the original [out, in] weight):

    absmax[k] = nested_quant_map[code_k] · nested_absmax[k // nested_blocksize] + nested_offset  (nested)
    W.flat[i] = quant_map[code_i] · absmax[i // blocksize]
"""

from __future__ import annotations

import json

import torch
from torch import Tensor

from fluxcore.errors import WeightsError
from fluxcore.quant.linear import NF4Linear

# The 16 NF4 levels: quantiles of N(0, 1) scaled to [-1, 1], with an exact zero (QLoRA, Dettmers et al. 2023).
NF4_CODEBOOK = torch.tensor([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
])  # fmt: skip

STATE_SUFFIXES = (".quant_state.bitsandbytes__nf4", ".quant_state.bitsandbytes__fp4")
EXTRA_SUFFIXES = (".absmax", ".quant_map", ".nested_absmax", ".nested_quant_map")


def state_suffix(key: str) -> str | None:
    return next((s for s in STATE_SUFFIXES if key.endswith(s)), None)


def is_bnb4(keys) -> bool:
    return any(state_suffix(k) for k in keys)


def parse_state(t: Tensor, key: str = "quant_state") -> dict:
    try:
        state = json.loads(bytes(t.reshape(-1).to(torch.uint8).tolist()).decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise WeightsError(f"{key}: not a bitsandbytes quant-state JSON ({e})") from None
    for field in ("blocksize", "shape"):
        if field not in state:
            raise WeightsError(f"{key}: the quant state has no {field!r} (found {sorted(state)})")
    return state


def layer_keys(weight_key: str, keys) -> dict[str, str]:
    """{role: file key} of the 4-bit Linear whose weight is `weight_key`."""
    out = {"weight": weight_key}
    for s in EXTRA_SUFFIXES:
        if weight_key + s in keys:
            out[s[1:]] = weight_key + s
    for s in STATE_SUFFIXES:
        if weight_key + s in keys:
            out["quant_state"] = weight_key + s
    return out


def linear_from_tensors(t: dict[str, Tensor], bias: Tensor | None = None, key: str = "weight") -> NF4Linear:
    """NF4Linear from a layer's tensors keyed by role (weight, absmax, quant_map, quant_state,
    nested_absmax, nested_quant_map)."""
    for role in ("absmax", "quant_map", "quant_state"):
        if role not in t:
            raise WeightsError(f"{key}: 4-bit weight without its .{role}")
    state = parse_state(t["quant_state"], key)
    nested = "nested_absmax" in t
    if nested and "nested_quant_map" not in t:
        raise WeightsError(f"{key}: nested_absmax without nested_quant_map")
    return NF4Linear(
        t["weight"], t["absmax"], t["quant_map"], state, bias=bias,
        nested_absmax=t.get("nested_absmax"), nested_quant_map=t.get("nested_quant_map"),
    )  # fmt: skip


def quantize_nf4(
    w: Tensor, blocksize: int = 64, nested: bool = False, nested_blocksize: int = 256
) -> dict[str, Tensor]:
    """A [out, in] float weight → the tensors of a bitsandbytes-layout NF4 Linear, keyed by role
    (round to the nearest NF4 level of w / absmax per block). With `nested`, absmax is stored as
    8-bit codes of a signed linear map over [-1, 1] per `nested_blocksize` block, after subtracting
    its mean (nested_offset) — the decoder reads whatever map the file holds."""
    out_f, in_f = w.shape
    flat = w.float().reshape(-1, blocksize)
    absmax = flat.abs().amax(dim=1).clamp(min=1e-12)
    codes = (
        ((flat / absmax[:, None])[..., None] - NF4_CODEBOOK).abs().argmin(dim=-1).to(torch.uint8).reshape(-1)
    )
    packed = (codes[0::2] << 4) | codes[1::2]
    state = {
        "quant_type": "nf4",
        "blocksize": blocksize,
        "dtype": str(w.dtype).removeprefix("torch."),
        "shape": [out_f, in_f],
    }
    t = {"weight": packed.reshape(-1, 1), "quant_map": NF4_CODEBOOK.clone()}
    if nested:
        offset = absmax.mean()
        centred = absmax - offset
        pad = (-centred.numel()) % nested_blocksize
        blocks = torch.nn.functional.pad(centred, (0, pad)).reshape(-1, nested_blocksize)
        nabs = blocks.abs().amax(dim=1).clamp(min=1e-12)
        nmap = torch.linspace(-1, 1, 256)
        ncodes = ((blocks / nabs[:, None])[..., None] - nmap).abs().argmin(dim=-1).to(torch.uint8).reshape(-1)
        t.update(absmax=ncodes[: centred.numel()], nested_absmax=nabs, nested_quant_map=nmap)
        state.update(nested_blocksize=nested_blocksize, nested_dtype="float32", nested_offset=float(offset))
    else:
        t["absmax"] = absmax
    t["quant_state"] = torch.frombuffer(bytearray(json.dumps(state).encode()), dtype=torch.uint8)
    return t


def to_file_tensors(prefix: str, t: dict[str, Tensor]) -> dict[str, Tensor]:
    """Role-keyed tensors → file keys under the Linear `prefix` ("double_blocks.0.img_attn.qkv")."""
    w = f"{prefix}.weight"
    out = {w: t["weight"]}
    for role, v in t.items():
        if role == "quant_state":
            qt = parse_state(v).get("quant_type", "nf4")
            out[f"{w}.quant_state.bitsandbytes__{qt}"] = v
        elif role != "weight":
            out[f"{w}.{role}"] = v
    return out
