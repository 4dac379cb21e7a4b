"""`LoraLinear`: the live (unfused) form of one or more adapters on one Linear-like module.

    y = base(x) + Σ_active w_i · Δ_i(x)

with Δ_i(x) = B_i(A_i x) + b_i + Σ dense pieces (full deltas, LoKr, LoHa) for a plain adapter, and
PEFT's DoRA form (g − 1)·(W x) + g·w·ΔW x, g = m / ‖W + w·ΔW‖_row, for a DoRA adapter. The base
module is called as is (any module with in_features/out_features: float8, quantised, ...) and its
state-dict keys stay exactly the base's own (no `.base.` in the keys).

Low-rank pieces that write row slices of a fused target (q/k/v into `qkv`) are stored as one
block-sparse pair: A = rows of every piece's A stacked (Σr, in), B (out, Σr) with each piece's
s·B in its own rows and rank columns. A shared down matrix therefore stays one block.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fluxcore.lora.patch import LoraError, Patch, swap_rows


def base_weight(module: nn.Module) -> Tensor:
    """The base weight as a float tensor (dequantised when the module offers `dequantize()`)."""
    if hasattr(module, "dequantize"):
        return module.dequantize()
    w = module.weight
    if not w.is_floating_point() or w.element_size() == 1:
        raise LoraError(
            f"{type(module).__name__} stores its weight as {w.dtype} and has no dequantize(); "
            "DoRA and fusing need a floating-point base weight"
        )
    return w


class DensePiece(nn.Module):
    """A non-low-rank delta (full, LoKr, LoHa) on rows [start, start + length) of the target."""

    def __init__(self, patch: Patch, out_features: int, dtype: torch.dtype):
        super().__init__()
        self.kind, self.scale, self.swap = patch.kind, patch.scale, patch.swap_halves
        self.start = patch.rows[0] if patch.rows else 0
        self.length = patch.out_features
        self.out_features = out_features
        self.names = sorted(patch.tensors)
        for name in self.names:
            self.register_buffer(name, patch.tensors[name].to(dtype), persistent=False)

    def delta(self) -> Tensor:
        """ΔW (out_features, in) in float32 with zero rows outside this piece."""
        p = Patch(
            "",
            "",
            "",
            self.kind,
            scale=self.scale,
            swap_halves=self.swap,
            tensors={n: getattr(self, n) for n in self.names},
        )
        d = p.delta()
        return F.pad(d, (0, 0, self.start, self.out_features - self.start - self.length))


class Adapter(nn.Module):
    """One adapter's tensors on one target. Buffers (never in the state dict): `weight` (0-d, the
    user's strength), `A` (R, in), `B` (out, R), `bias` (out,), `magnitude` and `has_magnitude` (out,)."""

    def __init__(
        self,
        patches: list[Patch],
        out_features: int,
        in_features: int,
        *,
        weight: float,
        dtype: torch.dtype,
        device,
        rank_capacity: int | None = None,
    ):
        super().__init__()
        self.register_buffer(
            "weight", torch.tensor(float(weight), dtype=torch.float32, device=device), persistent=False
        )
        low = [p for p in patches if p.kind == "lowrank"]
        rank = sum(p.rank for p in low)
        if rank_capacity is not None:
            if rank > rank_capacity:
                raise LoraError(
                    f"{low[0].key!r}: total rank {rank} on this target exceeds the hot-swap capacity {rank_capacity}"
                )
            rank = rank_capacity
        A = B = bias = magnitude = has_mag = None
        if low or rank_capacity is not None:
            A = torch.zeros(rank, in_features, dtype=torch.float32, device=device)
            B = torch.zeros(out_features, rank, dtype=torch.float32, device=device)
            col = 0
            for p in low:
                r0 = p.rows[0] if p.rows else 0
                up = p.tensors["up"].float() * p.scale
                up = swap_rows(up) if p.swap_halves else up
                A[col : col + p.rank] = p.tensors["down"].float()
                B[r0 : r0 + p.out_features, col : col + p.rank] = up
                col += p.rank
            A, B = A.to(dtype), B.to(dtype)
        for p in patches:
            r0 = p.rows[0] if p.rows else 0
            n = p.out_features
            if p.bias is not None:
                if bias is None:
                    bias = torch.zeros(out_features, dtype=torch.float32, device=device)
                bias[r0 : r0 + n] += swap_rows(p.bias.float()) if p.swap_halves else p.bias.float()
            if p.magnitude is not None:
                if magnitude is None:
                    magnitude = torch.ones(out_features, dtype=torch.float32, device=device)
                    has_mag = torch.zeros(out_features, dtype=torch.bool, device=device)
                m = swap_rows(p.magnitude.float()) if p.swap_halves else p.magnitude.float()
                magnitude[r0 : r0 + n] = m
                has_mag[r0 : r0 + n] = True
        self.register_buffer("A", A, persistent=False)
        self.register_buffer("B", B, persistent=False)
        self.register_buffer("bias", None if bias is None else bias.to(dtype), persistent=False)
        self.register_buffer("magnitude", magnitude, persistent=False)
        self.register_buffer("has_magnitude", has_mag, persistent=False)
        self.dense = nn.ModuleList(
            DensePiece(p, out_features, dtype) for p in patches if p.kind in ("full", "lokr", "loha")
        )
        self.rank = 0 if A is None else A.shape[0]

    def delta_weight(self) -> Tensor:
        """Σ ΔW of this adapter in float32, (out, in), strength not applied."""
        d = None
        if self.A is not None:
            d = self.B.float() @ self.A.float()
        for piece in self.dense:
            d = piece.delta() if d is None else d + piece.delta()
        return d

    def delta_out(self, x: Tensor) -> Tensor | None:
        """ΔW x (no bias, no strength) in the adapter's dtype."""
        y = None
        if self.A is not None:
            y = F.linear(F.linear(x, self.A), self.B)
        for piece in self.dense:
            d = F.linear(x, piece.delta().to(x.dtype))
            y = d if y is None else y + d
        return y

    def contribution(self, x: Tensor, base: nn.Module) -> Tensor:
        dtype = (
            self.A.dtype if self.A is not None else (self.bias.dtype if self.bias is not None else x.dtype)
        )
        if self.dense:
            dtype = getattr(self.dense[0], self.dense[0].names[0]).dtype
        x = x.to(dtype)
        w = self.weight.to(dtype)
        d = self.delta_out(x)
        if self.magnitude is not None:
            W = base_weight(base)
            norm = (W.float() + self.weight * self.delta_weight()).norm(dim=1)
            g = torch.where(self.has_magnitude, self.magnitude / norm, torch.ones_like(norm)).to(dtype)
            y = (g - 1) * F.linear(x, W.to(dtype)) + g * w * d
        else:
            y = w * d if d is not None else None
        if self.bias is not None:
            y = w * self.bias if y is None else y + w * self.bias
        return y

    def fused_delta(self, W: Tensor, strength: float) -> tuple[Tensor | None, Tensor | None]:
        """(ΔW, Δb) in float32 for merging at `strength` × this adapter's weight into base weight W."""
        w = self.weight.float() * strength
        dW = self.delta_weight()
        if dW is not None and self.magnitude is not None:
            Wf = W.float()
            merged = Wf + w * dW
            g = torch.where(self.has_magnitude, self.magnitude / merged.norm(dim=1), torch.ones(()))
            dW = g[:, None] * merged - Wf
        elif dW is not None:
            dW = w * dW
        db = None if self.bias is None else w * self.bias.float()
        return dW, db


class LoraLinear(nn.Module):
    """Wraps a Linear-like `base`; holds adapters by name. `active` (tuple of names) and `enabled`
    select what runs; fused adapters are already in the base weight and are skipped here."""

    def __init__(self, base: nn.Module):
        super().__init__()
        if not (hasattr(base, "in_features") and hasattr(base, "out_features")):
            raise LoraError(f"cannot wrap {type(base).__name__}: it has no in_features/out_features")
        self.base = base
        self.in_features, self.out_features = base.in_features, base.out_features
        self.adapters = nn.ModuleDict()
        self.active: tuple[str, ...] = ()
        self.enabled = True
        self.fused: tuple[str, ...] = ()
        self._unfused: tuple[Tensor, Tensor | None, bool] | None = None

    @property
    def weight(self) -> Tensor:
        return self.base.weight

    @property
    def bias(self) -> Tensor | None:
        return self.base.bias

    def extra_repr(self) -> str:
        return f"adapters={list(self.adapters)}, active={list(self.active)}, fused={list(self.fused)}"

    def forward(self, x: Tensor) -> Tensor:
        y = self.base(x)
        if not self.enabled:
            return y
        for name in self.active:
            if name in self.fused:
                continue
            c = self.adapters[name].contribution(x, self.base)
            if c is not None:
                y = y + c.to(y.dtype)
        return y

    # --- fusing -------------------------------------------------------------------------------
    def fuse(self, names: tuple[str, ...], strength: float) -> None:
        """W ← round(W + Σ ΔW_i in float32) once; the original tensors are kept for `unfuse`."""
        if self.fused:
            raise LoraError("this module is already fused; call unfuse_lora first")
        names = tuple(n for n in names if n in self.adapters)
        if not names:
            return
        W = base_weight(self.base)
        if W is not self.base.weight:
            raise LoraError(
                f"cannot fuse into a {type(self.base).__name__} (quantised weight); use the live form"
            )
        dW = torch.zeros(W.shape, dtype=torch.float32, device=W.device)
        db = None
        for n in names:
            d, b = self.adapters[n].fused_delta(W, strength)
            if d is not None:
                dW += d
            if b is not None:
                db = b if db is None else db + b
        orig_w, orig_b = self.base.weight.data, None if self.base.bias is None else self.base.bias.data
        self.base.weight.data = (W.float() + dW).to(W.dtype)
        added_bias = False
        if db is not None:
            if self.base.bias is None:
                self.base.bias = nn.Parameter(db.to(W.dtype), requires_grad=False)
                added_bias = True
            else:
                self.base.bias.data = (orig_b.float() + db).to(orig_b.dtype)
        self._unfused = (orig_w, orig_b, added_bias)
        self.fused = names

    def unfuse(self) -> None:
        """Put back the exact tensors `fuse` replaced."""
        if self._unfused is None:
            return
        orig_w, orig_b, added_bias = self._unfused
        self.base.weight.data = orig_w
        if added_bias:
            self.base.bias = None
        elif orig_b is not None:
            self.base.bias.data = orig_b
        self._unfused, self.fused = None, ()

    # --- state dict: the base's own keys, never the adapters' ---------------------------------
    def state_dict(self, *args, destination=None, prefix="", keep_vars=False):
        return self.base.state_dict(destination=destination, prefix=prefix, keep_vars=keep_vars)

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ):
        for key in [k for k in state_dict if k.startswith(prefix) and not k.startswith(prefix + "base.")]:
            state_dict[prefix + "base." + key[len(prefix) :]] = state_dict.pop(key)
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )
