"""One entry point for FLUX attention, and the registry of backends behind it.

    attention(q, k, v) -> [B, L, H·D]

q, k, v: [B, H, L, D], with q and k already normalised and rotated by RoPE (the blocks' QKNorm
step does that). Every backend is pure attention: non-causal, unmasked softmax attention with
scale 1/√D, returning the head-major [B, L, H·D] layout that the next projection reads. So a new
backend (FlashAttention-3, cuDNN, FlexAttention, a context-parallel one) is one function.

Which backend runs: the `backend=` argument > the innermost `attention_backend(...)` context >
`set_attention_backend(...)` > the environment variable FLUXCORE_ATTENTION > "auto". "auto" picks
the highest-priority backend that can run on the given tensors. A backend named explicitly raises
BackendError with its reason when it cannot run; auto never picks one that cannot.

`attention_backend(...)` contexts live in a context variable, so each thread (and each asyncio
task) sees only its own; `set_attention_backend` is the process-wide default. torch.compile cannot
read context variables, so compiled code reads a per-thread copy of the same value (dynamo guards
on it and recompiles when it changes); tasks that interleave different contexts on one thread
should not share a compiled model.
"""

from __future__ import annotations

import contextlib
import contextvars
import os
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor

from fluxcore.errors import BackendError

AUTO = "auto"
ENV_VAR = "FLUXCORE_ATTENTION"


@dataclass(frozen=True)
class AttentionBackend:
    """name: registry key; fn(q, k, v) -> [B, L, H·D]; why_not(q) -> None if it can run on
    tensors like q, else a sentence saying why not; priority: higher wins under "auto";
    auto_ok(q): whether "auto" may consider it for q at all (a backend can run but not be
    worth choosing, e.g. Triton's CPU interpreter)."""

    name: str
    fn: Callable[[Tensor, Tensor, Tensor], Tensor]
    why_not: Callable[[Tensor], str | None]
    priority: int = 0
    auto_ok: Callable[[Tensor], bool] = lambda q: True


_REGISTRY: dict[str, AttentionBackend] = {}
_global_choice: str | None = None
# The innermost attention_backend(...) name of the running thread / task (None outside any).
_context_choice: contextvars.ContextVar[str | None] = contextvars.ContextVar("fluxcore_attention", default=None)
_thread_choice = threading.local()  # the same value per thread, for compiled code


def register_backend(
    name: str,
    fn: Callable[[Tensor, Tensor, Tensor], Tensor],
    why_not: Callable[[Tensor], str | None] = lambda q: None,
    priority: int = 0,
    auto_ok: Callable[[Tensor], bool] = lambda q: True,
) -> None:
    """Add (or replace) a backend. Research code can register its own attention this way."""
    if name == AUTO:
        raise BackendError(f"{AUTO!r} is reserved for automatic selection")
    _REGISTRY[name] = AttentionBackend(name, fn, why_not, priority, auto_ok)


def available_backends(q: Tensor | None = None) -> list[str]:
    """Names of the registered backends that can run (on tensors like `q`, if given), best first."""
    probe = q if q is not None else torch.empty(1, 1, 1, 64)
    ok = [b for b in _REGISTRY.values() if b.why_not(probe) is None]
    return [b.name for b in sorted(ok, key=lambda b: -b.priority)]


def set_attention_backend(name: str | None) -> None:
    """Choose the backend globally (None or "auto" restores automatic selection)."""
    global _global_choice
    _check_name(name)
    _global_choice = None if name in (None, AUTO) else name


@contextlib.contextmanager
def attention_backend(name: str) -> Iterator[None]:
    """Use backend `name` inside the block; contexts nest, the innermost wins. Other threads and
    tasks are not affected."""
    _check_name(name)
    token = _context_choice.set(name)
    outer, _thread_choice.name = getattr(_thread_choice, "name", None), name
    try:
        yield
    finally:
        _context_choice.reset(token)
        _thread_choice.name = outer


def _current_context() -> str | None:
    if torch.compiler.is_compiling():
        return getattr(_thread_choice, "name", None)
    return _context_choice.get()


def resolve_backend(q: Tensor, backend: str | None = None) -> AttentionBackend:
    """The backend that `attention` would use for q under the current settings."""
    name = backend or _current_context() or _global_choice
    if name is None:
        name = os.environ.get(ENV_VAR) or AUTO
        if name not in _REGISTRY and name != AUTO:
            raise BackendError(
                f"unknown attention backend {name!r} (from {ENV_VAR}); known: {', '.join([AUTO, *sorted(_REGISTRY)])}"
            )
    if name == AUTO:
        for b in sorted(_REGISTRY.values(), key=lambda b: -b.priority):
            if b.auto_ok(q) and b.why_not(q) is None:
                return b
        raise BackendError(f"no attention backend can run on {q.device.type} tensors of dtype {q.dtype}")
    _check_name(name)
    chosen = _REGISTRY[name]
    reason = chosen.why_not(q)
    if reason is not None:
        raise BackendError(f"attention backend {name!r} cannot run: {reason}")
    return chosen


def attention(q: Tensor, k: Tensor, v: Tensor, *, backend: str | None = None) -> Tensor:
    """Softmax attention over rotated q, k. q, k, v [B, H, L, D] → [B, L, H·D] in q's dtype."""
    return resolve_backend(q, backend).fn(q, k, v)


def _check_name(name: str | None) -> None:
    if name in (None, AUTO) or name in _REGISTRY:
        return
    raise BackendError(f"unknown attention backend {name!r}; known: {', '.join([AUTO, *sorted(_REGISTRY)])}")


# --- built-in backends --------------------------------------------------------------------------


def eager_attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """The oracle: scores and softmax in float32, written out step by step."""
    scale = q.shape[-1] ** -0.5
    scores = torch.einsum("bhqd,bhkd->bhqk", q.float(), k.float()) * scale
    out = torch.einsum("bhqk,bhkd->bhqd", scores.softmax(dim=-1), v.float()).to(q.dtype)
    return rearrange(out, "b h l d -> b l (h d)")


def sdpa_attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """The reference's path: torch's scaled_dot_product_attention (whichever kernel it picks)."""
    return rearrange(F.scaled_dot_product_attention(q, k, v), "b h l d -> b l (h d)")


def _triton_attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    from fluxcore.kernels import flash_attention  # triton is imported only when this runs

    return flash_attention(q, k, v)


def _triton_why_not(q: Tensor) -> str | None:
    # Import lazily: importing fluxcore must not import triton.
    try:
        from fluxcore.kernels import attention_unsupported_reason
    except ImportError as e:  # triton missing, or the kernels cannot load on this platform
        return f"fluxcore.kernels could not be imported ({e})"
    return attention_unsupported_reason(q)


register_backend("eager", eager_attention, priority=0)
register_backend("sdpa", sdpa_attention, priority=10)
# The interpreter can run it on CPU tensors (tests), but "auto" only picks it for CUDA tensors.
register_backend("triton", _triton_attention, _triton_why_not, priority=20, auto_ok=lambda q: q.is_cuda)
