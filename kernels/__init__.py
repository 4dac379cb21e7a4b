"""fluxcore.kernels: Triton kernels for the FLUX transformer, each with its PyTorch reference.

Depends on torch and triton only (never on fluxcore). Every kernel is a torch.library op
(`torch.ops.fluxcore.*`, registered with triton_op), so torch.compile traces through it.
The kernels are forward-only. Under TRITON_INTERPRET=1 (set before importing triton) they run
on CPU tensors in Triton's interpreter, which is how the tests check them without a GPU.

Attention backend contract (fluxcore.attention registers "triton" with these two):
    flash_attention_rope(q, k, v, pe) -> [B, L, H·D]
    attention_unsupported_reason(q) -> str | None
"""

from .attention import (
    attention_unsupported_reason,
    flash_attention,
    flash_attention_reference,
    flash_attention_rope,
)
from .modulation import (
    adaln_modulate,
    adaln_modulate_reference,
    gated_residual,
    gated_residual_reference,
    gelu_concat,
    gelu_concat_reference,
)
from .rope import qk_norm_rope, qk_norm_rope_reference

__all__ = [
    "adaln_modulate",
    "adaln_modulate_reference",
    "attention_unsupported_reason",
    "flash_attention",
    "flash_attention_reference",
    "flash_attention_rope",
    "gated_residual",
    "gated_residual_reference",
    "gelu_concat",
    "gelu_concat_reference",
    "qk_norm_rope",
    "qk_norm_rope_reference",
]
