"""Finite checks for weights: does a tensor hold NaN or Inf, and which of many is the first.

The scan is one sum per chunk of 16M elements (NaN and Inf survive a sum; a sum can also overflow,
and only then are the chunk's elements tested one by one), so it costs about as much as reading the
tensor once (measured ~0.1 s/GB on one shared CPU core; on a GPU one reduction per chunk, at
memory bandwidth) and allocates nothing big.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor

from fluxcore.errors import describe_nonfinite
from fluxcore.weights.errors import NonFiniteWeightsError

CHUNK = 1 << 24


def is_finite(t: Tensor) -> bool:
    """True when the floating-point tensor `t` holds no NaN/Inf (always True for other dtypes)."""
    if not t.is_floating_point() or t.numel() == 0 or t.device.type == "meta":
        return True
    flat = t.detach().reshape(-1)
    chunks = flat.split(CHUNK)
    if t.dtype.itemsize == 1:  # float8: no sum kernels; upcast a chunk at a time
        return all(bool(torch.isfinite(c.to(torch.bfloat16)).all()) for c in chunks)
    # In the tensor's own dtype (accumulated wider inside): 20x faster on CPU than sum(dtype=float32).
    sums = torch.stack([c.sum() for c in chunks])
    if bool(torch.isfinite(sums).all()):
        return True
    return all(bool(torch.isfinite(c).all()) for c in chunks)


def first_nonfinite(tensors: Iterable[tuple[str, Tensor]]) -> str | None:
    """The key of the first (key, tensor) pair holding NaN/Inf, or None."""
    for key, t in tensors:
        if not is_finite(t):
            return key
    return None


def nonfinite_error(
    source: str, part: str, key: str, t: Tensor, stored: Tensor | None = None
) -> NonFiniteWeightsError:
    """The error for weights `part` of `source` whose tensor `key` (`t`) is not finite. `stored`,
    the tensor as read before a cast, tells an overflow by the cast from corrupt bytes."""
    values = t.float() if t.dtype.itemsize == 1 else t
    cause = "the file's bytes are corrupt (or the model was saved after training diverged)"
    if stored is not None and stored.dtype != t.dtype and is_finite(stored):
        cause = f"the stored {stored.dtype} values are finite but overflow {t.dtype}: load in a wider dtype"
    return NonFiniteWeightsError(
        f"{source}: {part} weights are not finite: {key!r} ({t.dtype}, {list(t.shape)}) holds "
        f"{describe_nonfinite(values)}; {cause}"
    )


def check_finite(tensors: Iterable[tuple[str, Tensor]], *, source: str, part: str) -> None:
    """Raise NonFiniteWeightsError naming `part`, `source` and the first key holding NaN/Inf."""
    for key, t in tensors:
        if not is_finite(t):
            raise nonfinite_error(source, part, key, t)
