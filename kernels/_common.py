"""What every kernel launcher needs to know: interpreter or GPU, and input checks."""

from __future__ import annotations

import os

import torch
import triton

# triton.jit decides at decoration time whether a kernel is compiled or interpreted, so the value
# seen when this package is imported is the one that holds for every kernel in it.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

# Tests set this so every output starts as NaN: an element a kernel forgets to write then fails.
POISON_OUTPUTS = False


def empty(*shape: int, like: torch.Tensor) -> torch.Tensor:
    """A new contiguous output on like's device, in like's dtype (NaN-filled if POISON_OUTPUTS)."""
    out = torch.empty(*shape, device=like.device, dtype=like.dtype)
    if POISON_OUTPUTS:
        out.fill_(float("nan"))
    return out


def device_unsupported_reason(x: torch.Tensor) -> str | None:
    """None if the Triton kernels can run on x's device and dtype, else a sentence saying why not."""
    if x.dtype not in FLOAT_DTYPES:
        return f"dtype {x.dtype} is not supported (float32, bfloat16 or float16 only)"
    if x.device.type == "cpu":
        if INTERPRET:
            return None
        return (
            "the Triton kernels need a CUDA device, and the tensors are on the CPU "
            "(set TRITON_INTERPRET=1 before importing triton to run them in the interpreter)"
        )
    if x.device.type != "cuda":
        return f"the Triton kernels need a CUDA device, not {x.device.type!r}"
    if INTERPRET:
        return "TRITON_INTERPRET=1 is set: the interpreter runs on CPU tensors only"
    if torch.version.hip is None and torch.cuda.get_device_capability(x.device) < (8, 0):
        major, minor = torch.cuda.get_device_capability(x.device)
        return f"the Triton kernels need compute capability 8.0 or newer, found {major}.{minor}"
    return None


def check_inputs(name: str, *tensors: torch.Tensor) -> None:
    """Raise ValueError unless the tensors share one supported device and dtype."""
    first = tensors[0]
    reason = device_unsupported_reason(first)
    if reason is not None:
        raise ValueError(f"{name}: {reason}")
    for t in tensors[1:]:
        if t.device != first.device or t.dtype != first.dtype:
            raise ValueError(
                f"{name}: all inputs must share device and dtype, found {first.device}/{first.dtype} "
                f"and {t.device}/{t.dtype}"
            )


# Elements per program in the memory-bound kernels. The interpreter pays per program, not per
# element, so it gets bigger tiles; on a GPU, 4096 keeps thousands of programs in flight at FLUX
# sizes (an untuned choice: the benchmarks measure it).
TILE = 16384 if INTERPRET else 4096


def warps_for(elements: int) -> int:
    """Warps for a program owning `elements` values: about 16 per thread, 1 to 16 warps."""
    return max(1, min(16, elements // 512))


def next_pow2(n: int) -> int:
    return triton.next_power_of_2(n)
