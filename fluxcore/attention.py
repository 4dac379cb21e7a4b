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

Built-in backends (docs/speed.md has the "auto" order and the published figures behind it):
"eager" (the oracle), "sdpa" (torch picks the kernel), "sdpa-cudnn" / "sdpa-flash" /
"sdpa-efficient" / "sdpa-math" (one SDPA kernel, explicitly), "triton" (fluxcore's kernel),
"flash3" (FlashAttention-3, package `flash_attn_interface`), "flash2" (FlashAttention-2, package
`flash_attn`), "sage" (SageAttention, package `sageattention`: 8-bit, never chosen by "auto") and
"flex" (torch's FlexAttention). Optional packages are imported the first time a backend is asked
whether it can run, never when fluxcore is imported; a missing package is the backend's reason.

Under "auto", a backend whose kernel fails when called (a Triton kernel that does not compile or
launch on this GPU, say) is skipped from then on for that device, dtype and head dim, with one
warning naming it, and the next backend in the order runs. A backend named explicitly raises.
(Inside a torch.compile trace the chosen backend is called without this safety net.)

`attention_backend(...)` contexts live in a context variable, so each thread (and each asyncio
task) sees only its own; `set_attention_backend` is the process-wide default. torch.compile cannot
read context variables, so compiled code reads a per-thread copy of the same value (dynamo guards
on it and recompiles when it changes); tasks that interleave different contexts on one thread
should not share a compiled model.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import importlib
import os
import threading
import warnings
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
_context_choice: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "fluxcore_attention", default=None
)
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


def selected_backend() -> str:
    """The backend name the settings select right now — context > global > environment > "auto" —
    before "auto" is resolved for any tensor. Wrapping backends (context parallel) call it to find
    the backend they wrap."""
    return _requested(None)


def _requested(backend: str | None) -> str:
    name = backend or _current_context() or _global_choice
    if name is None:
        name = os.environ.get(ENV_VAR) or AUTO
        if name not in _REGISTRY and name != AUTO:
            raise BackendError(
                f"unknown attention backend {name!r} (from {ENV_VAR}); known: {', '.join([AUTO, *sorted(_REGISTRY)])}"
            )
    return name


# (backend name, device, dtype, head dim) for which a backend's kernel failed under "auto".
_broken: set[tuple] = set()


def _broken_key(name: str, q: Tensor) -> tuple:
    return (name, str(q.device), q.dtype, q.shape[-1])


def _auto_candidates(q: Tensor) -> list[AttentionBackend]:
    return [
        b
        for b in sorted(_REGISTRY.values(), key=lambda b: -b.priority)
        if (b.name, str(q.device), q.dtype, q.shape[-1]) not in _broken
        and b.auto_ok(q)
        and b.why_not(q) is None
    ]


def resolve_backend(q: Tensor, backend: str | None = None) -> AttentionBackend:
    """The backend that `attention` would use for q under the current settings."""
    name = _requested(backend)
    if name == AUTO:
        candidates = _auto_candidates(q)
        if not candidates:
            raise BackendError(f"no attention backend can run on {q.device.type} tensors of dtype {q.dtype}")
        return candidates[0]
    _check_name(name)
    chosen = _REGISTRY[name]
    reason = chosen.why_not(q)
    if reason is not None:
        raise BackendError(f"attention backend {name!r} cannot run: {reason}")
    return chosen


def attention(q: Tensor, k: Tensor, v: Tensor, *, backend: str | None = None) -> Tensor:
    """Softmax attention over rotated q, k. q, k, v [B, H, L, D] → [B, L, H·D] in q's dtype."""
    if torch.compiler.is_compiling() or _requested(backend) != AUTO:
        return resolve_backend(q, backend).fn(q, k, v)
    for b in _auto_candidates(q):
        try:
            return b.fn(q, k, v)
        except torch.cuda.OutOfMemoryError:
            raise
        except Exception as e:  # a kernel that cannot compile or launch here: skip it from now on
            _broken.add(_broken_key(b.name, q))
            warnings.warn(
                f"attention backend {b.name!r} failed on {q.device} {q.dtype} head dim {q.shape[-1]} "
                f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
                '"auto" uses the next backend from now on',
                RuntimeWarning,
                stacklevel=2,
            )
    raise BackendError(f"no attention backend can run on {q.device.type} tensors of dtype {q.dtype}")


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


# --- optional backends: each imports its package only when first asked -------------------------


@functools.cache
def _import(module: str) -> tuple[object | None, str | None]:
    """(module, None) if it imports, else (None, a sentence saying why not)."""
    try:
        return importlib.import_module(module), None
    except ImportError as e:
        return None, f"package {module!r} is not installed ({e})"
    except Exception as e:  # a broken install (CUDA/ABI mismatch) is a reason too, not a crash
        return None, f"package {module!r} failed to import ({type(e).__name__}: {e})"


def _cuda_reason(
    q: Tensor, dtypes: tuple[torch.dtype, ...], min_cap: tuple[int, int], max_cap=None
) -> str | None:
    if q.device.type != "cuda":
        return f"it needs a CUDA device, and the tensors are on {q.device.type!r}"
    if q.dtype not in dtypes:
        return f"it takes {' or '.join(str(d).removeprefix('torch.') for d in dtypes)}, found {q.dtype}"
    cap = torch.cuda.get_device_capability(q.device)
    if cap < min_cap or (max_cap is not None and cap > max_cap):
        return f"compute capability {cap[0]}.{cap[1]} is not supported"
    return None


_HALF = (torch.bfloat16, torch.float16)


def _head_dim_reason(q: Tensor, allowed) -> str | None:
    d = q.shape[-1]
    return None if d in allowed else f"head dim {d} is not supported (supported: {sorted(allowed)})"


def _flash3(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    fa3, _ = _import("flash_attn_interface")
    out = fa3.flash_attn_func(*(t.transpose(1, 2) for t in (q, k, v)), causal=False)
    out = out[0] if isinstance(out, tuple) else out  # some releases also return the log-sum-exp
    return out.flatten(2)


def _flash3_why_not(q: Tensor) -> str | None:
    return (
        _cuda_reason(q, _HALF, (9, 0), (9, 9))
        or _head_dim_reason(q, range(8, 257, 8))
        or _import("flash_attn_interface")[1]
    )


def _flash2(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    fa2, _ = _import("flash_attn")
    return fa2.flash_attn_func(*(t.transpose(1, 2) for t in (q, k, v)), causal=False).flatten(2)


def _flash2_why_not(q: Tensor) -> str | None:
    return _cuda_reason(q, _HALF, (8, 0)) or _head_dim_reason(q, range(8, 257, 8)) or _import("flash_attn")[1]


def _sage(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    sage, _ = _import("sageattention")
    return rearrange(sage.sageattn(q, k, v, tensor_layout="HND", is_causal=False), "b h l d -> b l (h d)")


def _sage_why_not(q: Tensor) -> str | None:
    return _cuda_reason(q, _HALF, (8, 0)) or _head_dim_reason(q, (64, 96, 128)) or _import("sageattention")[1]


def _flex(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    flex, _ = _import("torch.nn.attention.flex_attention")
    if torch.compiler.is_compiling():  # inside a compiled block: traced into one fused kernel
        out = flex.flex_attention(q, k, v)
    elif q.is_cuda:  # eager flex is unfused; its own compiled form is the fast one
        out = _compiled_flex()(q, k, v)
    else:  # CPU: the unfused reference implementation (torch warns that it is unfused)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")
            out = flex.flex_attention(q, k, v)
    return rearrange(out, "b h l d -> b l (h d)")


@functools.cache
def _compiled_flex():
    flex, _ = _import("torch.nn.attention.flex_attention")
    return torch.compile(flex.flex_attention, dynamic=True)


def _flex_why_not(q: Tensor) -> str | None:
    return _import("torch.nn.attention.flex_attention")[1]


def _sdpa_kernel(kind: str) -> Callable[[Tensor, Tensor, Tensor], Tensor]:
    def fn(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        with sdpa_kernel([getattr(SDPBackend, kind)]):
            return sdpa_attention(q, k, v)

    fn.__name__ = f"sdpa_{kind.lower()}"
    return fn


def _sdpa_why_not(kind: str) -> Callable[[Tensor], str | None]:
    def why_not(q: Tensor) -> str | None:
        if kind == "MATH":
            return None
        if kind == "EFFICIENT_ATTENTION":
            return _cuda_reason(q, (*_HALF, torch.float32), (5, 0))
        return _cuda_reason(q, _HALF, (8, 0)) or _head_dim_reason(q, range(8, 257, 8))

    return why_not


def _is_hopper_or_newer(q: Tensor) -> bool:
    return q.is_cuda and torch.cuda.get_device_capability(q.device) >= (9, 0)


# Priorities: "auto" tries the highest first. The order follows published H100 bf16 forward
# figures at head dim 128, 4k-8k tokens (FlashAttention-3 paper): FA3 ≈ 640 TFLOP/s, cuDNN ≈ 600,
# Triton (tutorial-style kernels like ours) ≈ 390-470, FA2 ≈ 370. cuDNN is preferred only on
# Hopper and newer, where those figures were measured. SageAttention (8-bit) changes numerics and
# FlexAttention (~90 % of FA2) is for masks, so "auto" never picks either.
register_backend("eager", eager_attention, priority=0)
register_backend(
    "sdpa-math", _sdpa_kernel("MATH"), _sdpa_why_not("MATH"), priority=1, auto_ok=lambda q: False
)
register_backend("flex", _flex, _flex_why_not, priority=2, auto_ok=lambda q: False)
register_backend("sdpa", sdpa_attention, priority=10)
register_backend(
    "sdpa-efficient", _sdpa_kernel("EFFICIENT_ATTENTION"), _sdpa_why_not("EFFICIENT_ATTENTION"), priority=11,
    auto_ok=lambda q: False,
)  # fmt: skip
register_backend(
    "sdpa-flash", _sdpa_kernel("FLASH_ATTENTION"), _sdpa_why_not("FLASH_ATTENTION"), priority=12,
    auto_ok=lambda q: False,
)  # fmt: skip
register_backend("flash2", _flash2, _flash2_why_not, priority=15)
# The interpreter can run it on CPU tensors (tests), but "auto" only picks it for CUDA tensors.
# "auto" takes the Triton kernel for inference only: its backward is checked in the interpreter and
# compiled for every GPU target, but until it is measured on a GPU training opts in by name.
register_backend(
    "triton",
    _triton_attention,
    _triton_why_not,
    priority=20,
    auto_ok=lambda q: q.is_cuda and not (q.requires_grad and torch.is_grad_enabled()),
)
register_backend(
    "sdpa-cudnn", _sdpa_kernel("CUDNN_ATTENTION"), _sdpa_why_not("CUDNN_ATTENTION"), priority=30,
    auto_ok=_is_hopper_or_newer,
)  # fmt: skip
register_backend("flash3", _flash3, _flash3_why_not, priority=40)
register_backend("sage", _sage, _sage_why_not, priority=50, auto_ok=lambda q: False)
