"""Quantized Linear modules: the weight stays in its stored (packed) form and is dequantized for
each forward, one layer at a time, so only one layer's full-precision weight exists at once.

Every module here has what a Linear user relies on: `in_features`, `out_features`, `bias`
(a float Parameter or None), `forward(x) = x @ W.T + b`, and `dequantized_weight(dtype)`, which
returns W as a dense tensor (LoRA wrappers and `fluxcore.quant.dequantize` use it).

State-dict names (what `state_dict()` returns and `load_state_dict` reads, per Linear `X`):

    GGUFLinear        X.weight            uint8 raw ggml blocks [out, bytes per row]
                      X.bias              float
    NF4Linear         X.weight            uint8 [out·in/2, 1], two 4-bit codes per byte
                      X.weight.absmax     float32 per block (uint8 when nested)
                      X.weight.quant_map  float32[16] codebook
                      X.weight.nested_absmax, X.weight.nested_quant_map   (double quantization only)
                      X.weight.quant_state.bitsandbytes__nf4   uint8 JSON (blocksize, shape, ...)
                      X.bias
    ScaledLinear      X.weight            float8_e4m3fn / float8_e5m2 / int8 [out, in]
                      X.scale_weight      float32 [] (per tensor) or [out, 1] (per row)
                      X.scale_input       float32 [] (static input scale; only when the file has one)
                      X.bias

These are the names bitsandbytes and ComfyUI write, so a state dict saved from a quantized model
loads back into one (and into those tools).
"""

from __future__ import annotations

import json

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fluxcore.errors import WeightsError
from fluxcore.quant import gguf as _gguf


class QuantLinear(nn.Module):
    """Base: y = F.linear(x, W, b) with W = dequantized_weight(x.dtype)."""

    in_features: int
    out_features: int

    def _init_bias(self, bias: Tensor | None) -> None:
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)

    def dequantized_weight(self, dtype: torch.dtype | None = None) -> Tensor:
        raise NotImplementedError

    def dequantize(self) -> Tensor:
        """The weight as a dense float tensor (the name LoRA's DoRA and fuse paths call)."""
        return self.dequantized_weight()

    @property
    def compute_dtype(self) -> torch.dtype:
        return self.bias.dtype if self.bias is not None else torch.bfloat16

    def forward(self, x: Tensor) -> Tensor:
        w = self.dequantized_weight(x.dtype)
        b = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, w, b)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        # the order of nn.Linear (weight, bias) with any scales between, whatever is a buffer
        items = [("weight", self.weight)]
        items += [(n, b) for n, b in self._buffers.items()
                  if n != "weight" and b is not None and n not in self._non_persistent_buffers_set]  # fmt: skip
        if self.bias is not None:
            items.append(("bias", self.bias))
        for name, t in items:
            destination[prefix + name] = t if keep_vars else t.detach()

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"
        )


class GGUFLinear(QuantLinear):
    """A Linear whose weight is raw GGUF blocks (any type of `fluxcore.quant.gguf.GGML_TYPES`).

    weight: uint8 [out_features, row bytes]; qtype: the ggml type name ("Q4_K", ...)."""

    def __init__(self, weight: Tensor, qtype: str, shape: tuple[int, int], bias: Tensor | None = None):
        super().__init__()
        self.qtype = _gguf.type_name(qtype)
        self.out_features, self.in_features = int(shape[0]), int(shape[1])
        rb = _gguf.row_bytes(self.qtype, self.in_features)
        if weight.numel() != self.out_features * rb:
            raise WeightsError(
                f"{self.qtype} weight of shape {list(shape)} needs {self.out_features * rb} bytes, got {weight.numel()}"
            )
        self.register_buffer("weight", weight.reshape(self.out_features, rb))
        self._init_bias(bias)

    def dequantized_weight(self, dtype: torch.dtype | None = None) -> Tensor:
        return _gguf.dequantize(
            self.weight, self.qtype, (self.out_features, self.in_features), dtype or self.compute_dtype
        )

    def extra_repr(self) -> str:
        return super().extra_repr() + f", qtype={self.qtype}"


class NF4Linear(QuantLinear):
    """A Linear stored the way bitsandbytes stores 4-bit (NF4 or FP4) weights.

    W.flatten()[i] = quant_map[code_i] · absmax[i // blocksize], code 2j in the high nibble of
    byte j and 2j+1 in the low nibble. With double quantization ("nested"), absmax itself is
    uint8 codes: absmax[k] = nested_quant_map[code_k] · nested_absmax[k // nested_blocksize]
    + nested_offset."""

    _EXTRA = ("absmax", "quant_map", "nested_absmax", "nested_quant_map")

    def __init__(
        self,
        weight: Tensor,
        absmax: Tensor,
        quant_map: Tensor,
        quant_state: dict,
        bias: Tensor | None = None,
        nested_absmax: Tensor | None = None,
        nested_quant_map: Tensor | None = None,
    ):
        super().__init__()
        shape = quant_state["shape"]
        self.out_features, self.in_features = int(shape[0]), int(shape[1])
        self.blocksize = int(quant_state["blocksize"])
        self.quant_type = quant_state.get("quant_type", "nf4")
        self.quant_state = dict(quant_state)
        self.nested = nested_absmax is not None
        self.nested_blocksize = int(quant_state.get("nested_blocksize", 256))
        self.nested_offset = float(quant_state.get("nested_offset", 0.0))
        n = self.out_features * self.in_features
        if weight.numel() * 2 != n:
            raise WeightsError(
                f"NF4 weight of shape {list(shape)} needs {n // 2} bytes, got {weight.numel()}"
            )
        self.register_buffer("weight", weight.reshape(-1, 1))
        self.register_buffer("weight_absmax", absmax.reshape(-1))
        self.register_buffer("weight_quant_map", quant_map.reshape(-1).float())
        if self.nested:
            self.register_buffer("weight_nested_absmax", nested_absmax.reshape(-1).float())
            self.register_buffer("weight_nested_quant_map", nested_quant_map.reshape(-1).float())
        self._init_bias(bias)

    @property
    def state_key(self) -> str:
        return f"weight.quant_state.bitsandbytes__{self.quant_type}"

    def absmax(self) -> Tensor:
        """float32 per-block scales (decoding the nested level when there is one)."""
        if not self.nested:
            return self.weight_absmax.float()
        codes = self.weight_absmax.long()
        idx = torch.arange(codes.numel(), device=codes.device) // self.nested_blocksize
        return self.weight_nested_quant_map[codes] * self.weight_nested_absmax[idx] + self.nested_offset

    def dequantized_weight(self, dtype: torch.dtype | None = None) -> Tensor:
        packed = self.weight.reshape(-1)
        codes = torch.stack((packed >> 4, packed & 0x0F), dim=-1).reshape(-1).long()
        values = self.weight_quant_map[codes].reshape(-1, self.blocksize) * self.absmax()[:, None]
        return values.reshape(self.out_features, self.in_features).to(dtype or self.compute_dtype)

    # the dotted bitsandbytes names in state dicts
    def _save_to_state_dict(self, destination, prefix, keep_vars):
        destination[prefix + "weight"] = self.weight if keep_vars else self.weight.detach()
        for name in self._EXTRA:
            t = getattr(self, f"weight_{name}", None)
            if t is not None:
                destination[f"{prefix}weight.{name}"] = t if keep_vars else t.detach()
        js = json.dumps(self.quant_state).encode()
        destination[prefix + self.state_key] = torch.frombuffer(bytearray(js), dtype=torch.uint8)
        if self.bias is not None:
            destination[prefix + "bias"] = self.bias if keep_vars else self.bias.detach()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing, unexpected, errors):
        names = {"weight": "weight", "bias": "bias"}
        names.update({f"weight.{n}": f"weight_{n}" for n in self._EXTRA})
        for key, attr in names.items():
            t = getattr(self, attr, None)
            if t is None:
                continue
            if prefix + key in state_dict:
                with torch.no_grad():
                    t.copy_(state_dict[prefix + key])
            elif strict:
                missing.append(prefix + key)
        state = prefix + self.state_key
        if state in state_dict:
            from fluxcore.quant.nf4 import parse_state

            qs = parse_state(state_dict[state], state)
            if [int(s) for s in qs["shape"]] != [self.out_features, self.in_features] or int(
                qs["blocksize"]
            ) != self.blocksize:
                errors.append(
                    f"{state}: shape/blocksize {qs['shape']}/{qs['blocksize']} do not match this layer"
                )
            self.quant_state = qs
            self.nested_offset = float(qs.get("nested_offset", 0.0))
            self.nested_blocksize = int(qs.get("nested_blocksize", self.nested_blocksize))
        elif strict:
            missing.append(state)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", {self.quant_type}, blocksize={self.blocksize}, nested={self.nested}"


def fp8_compute_supported(device) -> bool:
    """Whether torch._scaled_mm runs on `device`: a CUDA GPU of compute capability ≥ 8.9 (Ada,
    Hopper, Blackwell), or the CPU (slow; for tests)."""
    device = torch.device(device)
    if not hasattr(torch, "_scaled_mm"):
        return False
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.get_device_capability(device) >= (8, 9)
    return device.type == "cpu"


def _scaled_mm_ok(x: Tensor) -> bool:
    return fp8_compute_supported(x.device)


class ScaledLinear(QuantLinear):
    """A Linear whose weight is float8 (e4m3fn / e5m2) or int8 with a float32 scale per tensor
    ([]) or per output row ([out, 1]): W = weight · scale_weight.

    compute: "dequant" (default) dequantizes W to the input's dtype and runs a normal matmul.
             "fp8" (float8 weights only) quantizes the input on the fly to e4m3 with a dynamic
             scale — per tensor (`act_granularity="tensor"`) or per row of x ("row") — or the
             file's static `scale_input`, and multiplies with `torch._scaled_mm`. Needs an fp8
             GPU (compute capability ≥ 8.9) for speed; runs on CPU too, for tests.
    """

    def __init__(
        self,
        weight: Tensor,
        scale_weight: Tensor,
        bias: Tensor | None = None,
        scale_input: Tensor | None = None,
        compute: str = "dequant",
        act_granularity: str = "tensor",
    ):
        super().__init__()
        if weight.dtype not in (torch.float8_e4m3fn, torch.float8_e5m2, torch.int8):
            raise WeightsError(f"ScaledLinear weight must be float8 or int8, got {weight.dtype}")
        self.out_features, self.in_features = weight.shape
        self.register_buffer("weight", weight)
        self.register_buffer("scale_weight", scale_weight.float())
        if scale_input is not None:
            self.register_buffer("scale_input", scale_input.float())
        else:
            self.scale_input = None
        self._init_bias(bias)
        self.compute = compute
        self.act_granularity = act_granularity

    @property
    def per_row(self) -> bool:
        return self.scale_weight.numel() > 1

    def dequantized_weight(self, dtype: torch.dtype | None = None) -> Tensor:
        sw = self.scale_weight if self.per_row else self.scale_weight.reshape(())
        return (self.weight.float() * sw).to(dtype or self.compute_dtype)

    def forward(self, x: Tensor) -> Tensor:
        if self.compute == "fp8" and self.weight.dtype == torch.float8_e4m3fn and _scaled_mm_ok(x):
            return self._fp8_forward(x)
        return super().forward(x)

    def _fp8_forward(self, x: Tensor) -> Tensor:
        fmax = torch.finfo(torch.float8_e4m3fn).max
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        if self.scale_input is not None:
            sx = self.scale_input.reshape(1, 1).expand(1, 1)
        elif self.act_granularity == "row" and self.per_row:
            sx = (x2.abs().amax(dim=1, keepdim=True).float() / fmax).clamp(min=1e-12)
        else:
            sx = (x2.abs().amax().float() / fmax).clamp(min=1e-12).reshape(1, 1)
        xq = (x2.float() / sx).clamp(-fmax, fmax).to(torch.float8_e4m3fn)
        if self.per_row:
            sw = self.scale_weight.reshape(1, -1)
            if sx.numel() == 1:  # _scaled_mm needs both row-wise or both per-tensor
                sx = sx.expand(x2.shape[0], 1).contiguous()
        else:
            sw = (
                self.scale_weight.reshape(1, 1)
                if sx.numel() == 1
                else self.scale_weight.reshape(1, 1).expand(1, self.out_features).contiguous()
            )
        out_dtype = x.dtype if x.dtype in (torch.bfloat16, torch.float16, torch.float32) else torch.bfloat16
        bias = None if self.bias is None else self.bias.to(out_dtype)
        if sx.numel() == 1 and sw.numel() == 1:
            sx, sw = sx.reshape(()), sw.reshape(())
        y = torch._scaled_mm(xq, self.weight.t(), scale_a=sx, scale_b=sw, bias=bias, out_dtype=out_dtype)
        return y.reshape(*shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        gran = "row" if self.per_row else "tensor"
        return (
            super().extra_repr() + f", weight={self.weight.dtype}, scale per {gran}, compute={self.compute}"
        )
