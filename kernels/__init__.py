"""fluxcore.kernels: Triton kernels for the FLUX transformer, each with its PyTorch reference,
and the transform that puts them into a built model.

    fluxcore.kernels.apply(model) -> list[str]    swap exact-type modules for fused twins
    fluxcore.kernels.remove(model) -> list[str]   undo it

The ops (attention.py, rope.py, modulation.py) depend on torch and triton only. Every op is a
torch.library op (`torch.ops.fluxcore.*`, registered with triton_op), so torch.compile traces
through it. Attention has a Triton backward (attention_backward.py); the elementwise kernels are
forward-only. Under TRITON_INTERPRET=1 (set before importing triton)
they run on CPU tensors in Triton's interpreter, which is how the tests check them without a GPU.

Attention backend contract (fluxcore.attention registers "triton" with these two):
    flash_attention(q, k, v) -> [B, L, H·D]       q, k already normalised and rotated
    attention_unsupported_reason(q) -> str | None
"""

from .attention import attention_unsupported_reason, flash_attention, flash_attention_reference
from .modulation import (
    adaln_modulate,
    adaln_modulate_reference,
    gated_residual,
    gated_residual_reference,
    gelu_concat,
    gelu_concat_reference,
)
from .rope import qk_norm_rope, qk_norm_rope_reference
from .transform import apply, remove, unsupported_reason

__all__ = [
    "adaln_modulate",
    "adaln_modulate_reference",
    "apply",
    "attention_unsupported_reason",
    "flash_attention",
    "flash_attention_reference",
    "gated_residual",
    "gated_residual_reference",
    "gelu_concat",
    "gelu_concat_reference",
    "qk_norm_rope",
    "qk_norm_rope_reference",
    "remove",
    "unsupported_reason",
]
