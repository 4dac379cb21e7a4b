"""The fused-kernel transform: swap exact-type FLUX modules for Triton twins, and back.

    apply(model) -> list[str]     module paths replaced (empty when there is nothing left to fuse)
    remove(model) -> list[str]    module paths restored to the plain modules

    AdaLayerNorm   → FusedAdaLayerNorm   LayerNorm + adaLN modulate in one pass
    QKNorm         → FusedQKNorm         both RMSNorms + RoPE + head-major layout in one pass
    GatedResidual  → FusedGatedResidual  x + gate·y in one pass
    ParallelJoin   → FusedParallelJoin   GELU(tanh) + concatenation in one pass

Only modules whose type is exactly the fluxcore class are replaced (a QKNorm also needs both of
its RMSNorms to be exact), so anything a user subclassed or swapped in keeps running as written,
and a module swapped in after `apply` is honoured because the fused twin is simply gone. Each twin
is a subclass with the same children and parameters, so state-dict keys, parameter objects and
optimizer state are unchanged, and applying twice is a no-op.

A twin runs its kernel only where the kernel can: on a supported CUDA device (or under
TRITON_INTERPRET=1 on CPU) and when no input needs a gradient (the kernels are forward-only).
Anywhere else it runs the plain module's math, so moving a transformed model to the CPU or
training it stays exact. Unlike the kernel ops in this package, this file imports fluxcore: it is
the binding between the kernels and fluxcore's modules.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from fluxcore.layers import AdaLayerNorm, GatedResidual, ParallelJoin, QKNorm, RMSNorm
from fluxcore.transforms import exact_modules, replace_module

from ._common import device_unsupported_reason
from .modulation import adaln_modulate, gated_residual, gelu_concat
from .rope import qk_norm_rope


def _kernel_ok(*activations: Tensor, params: tuple[Tensor, ...] = ()) -> bool:
    """Whether a forward-only kernel may run: a supported device, one device and one activation
    dtype, and nothing that needs a gradient (else the plain math runs, autograd included)."""
    if torch.is_grad_enabled() and any(t.requires_grad for t in (*activations, *params)):
        return False
    first = activations[0]
    if device_unsupported_reason(first) is not None:
        return False
    same_dtype = all(t.dtype == first.dtype for t in activations)
    return same_dtype and all(t.device == first.device for t in (*activations, *params))


class FusedAdaLayerNorm(AdaLayerNorm):
    def forward(self, x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
        if _kernel_ok(x, shift, scale):
            return adaln_modulate(x, shift, scale, self.eps)
        return super().forward(x, shift, scale)

    @classmethod
    def fuse(cls, plain: AdaLayerNorm) -> FusedAdaLayerNorm:
        return cls(plain.dim, plain.eps)

    def unfuse(self) -> AdaLayerNorm:
        return AdaLayerNorm(self.dim, self.eps)


class FusedQKNorm(QKNorm):
    def forward(self, q: Tensor, k: Tensor, v: Tensor, pe: Tensor) -> tuple[Tensor, Tensor]:
        qs, ks = self.query_norm.scale, self.key_norm.scale
        d = q.shape[-1]
        # The kernel rotates power-of-two head dims and writes q's dtype (the plain path casts to v's).
        if d & (d - 1) == 0 and _kernel_ok(q, k, v, params=(qs, ks, pe)):
            return qk_norm_rope(q, k, pe, qs, ks)
        return super().forward(q, k, v, pe)

    @classmethod
    def fuse(cls, plain: QKNorm) -> FusedQKNorm:
        return _adopt(cls, plain)

    def unfuse(self) -> QKNorm:
        return _adopt(QKNorm, self)


class FusedGatedResidual(GatedResidual):
    def forward(self, x: Tensor, gate: Tensor, y: Tensor) -> Tensor:
        if _kernel_ok(x, gate, y):
            return gated_residual(x, gate, y)
        return super().forward(x, gate, y)

    @classmethod
    def fuse(cls, plain: GatedResidual) -> FusedGatedResidual:
        return cls()

    def unfuse(self) -> GatedResidual:
        return GatedResidual()


class FusedParallelJoin(ParallelJoin):
    def forward(self, attn: Tensor, mlp: Tensor, act: nn.Module) -> Tensor:
        # The activation is the block's own module: only the exact GELU(tanh) has a fused form.
        if type(act) is nn.GELU and act.approximate == "tanh" and _kernel_ok(attn, mlp):
            return gelu_concat(attn, mlp)
        return super().forward(attn, mlp, act)

    @classmethod
    def fuse(cls, plain: ParallelJoin) -> FusedParallelJoin:
        return cls()

    def unfuse(self) -> ParallelJoin:
        return ParallelJoin()


def _adopt(cls: type[QKNorm], source: QKNorm) -> QKNorm:
    """A `cls` holding source's own RMSNorm children (same parameter objects, no new tensors)."""
    module = cls.__new__(cls)
    nn.Module.__init__(module)
    module.query_norm, module.key_norm = source.query_norm, source.key_norm
    return module


# plain class → fused twin; a module is replaced only if its type is exactly the key.
FUSED: dict[type[nn.Module], type[nn.Module]] = {
    AdaLayerNorm: FusedAdaLayerNorm,
    QKNorm: FusedQKNorm,
    GatedResidual: FusedGatedResidual,
    ParallelJoin: FusedParallelJoin,
}


def _fusable(module: nn.Module) -> bool:
    if type(module) is QKNorm:  # a swapped RMSNorm inside must keep its own math
        return type(module.query_norm) is RMSNorm and type(module.key_norm) is RMSNorm
    return True


def apply(model: nn.Module) -> list[str]:
    """Replace every exact-type fusable module of `model` (in place) by its fused twin.

    Returns the replaced module paths, e.g. ["double_blocks.0.img_norm1", ...]. Subclassed or
    swapped modules are left alone and not listed; a second call returns [].
    """
    targets = [(path, m) for path, m in exact_modules(model, *FUSED) if _fusable(m)]
    for path, module in targets:
        replace_module(model, path, FUSED[type(module)].fuse(module))
    return [path for path, _ in targets]


def remove(model: nn.Module) -> list[str]:
    """Undo `apply`: every fused twin in `model` becomes its plain module again (same parameters).
    Returns the restored module paths."""
    targets = exact_modules(model, *FUSED.values())
    for path, module in targets:
        replace_module(model, path, module.unfuse())
    return [path for path, _ in targets]


def unsupported_reason(model: nn.Module) -> str | None:
    """None if the fused kernels can run for `model` where its parameters are (a supported CUDA
    device, or the interpreter on CPU), else a sentence saying why not."""
    param = next(model.parameters(), None)
    if param is None:
        return "the model has no parameters to tell its device and dtype"
    return device_unsupported_reason(param)
