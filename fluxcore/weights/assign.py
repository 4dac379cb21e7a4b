"""`load_into`: fill a module built on the meta device from (key, tensor) pairs, one tensor at a
time, checking every key, shape and dtype before anything is assigned."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor, nn

from fluxcore.weights.errors import KeyMismatchError, ShapeMismatchError, UnsupportedDtypeError
from fluxcore.weights.finite import is_finite, nonfinite_error
from fluxcore.weights.header import FLOAT8_DTYPES


def _targets(module: nn.Module) -> tuple[dict[str, tuple], dict[int, list[str]]]:
    """name → (owner module, attribute, original tensor, is_param) for every parameter and
    persistent buffer, under every name (tied parameters appear once per name); and the names that
    share each tensor (by id)."""
    targets: dict[str, tuple] = {}
    aliases: dict[int, list[str]] = {}
    for prefix, mod in module.named_modules(remove_duplicate=False):
        dot = f"{prefix}." if prefix else ""
        for attr, p in mod._parameters.items():
            if p is not None:
                targets[dot + attr] = (mod, attr, p, True)
        for attr, b in mod._buffers.items():
            if b is not None and attr not in mod._non_persistent_buffers_set:
                targets[dot + attr] = (mod, attr, b, False)
    for name, (_, _, t, _) in targets.items():
        aliases.setdefault(id(t), []).append(name)
    return targets, aliases


def _few(names: list[str]) -> str:
    more = f", … ({len(names)} in all)" if len(names) > 5 else f" ({len(names)} in all)"
    return ", ".join(repr(n) for n in names[:5]) + more


def _materialise(
    t: Tensor, key: str, source: str, dtype, device, target_dtype: torch.dtype, copy: bool
) -> Tensor:
    """`t` in the wanted dtype on the wanted device; never `t`'s own memory when `copy`."""
    if target_dtype.is_floating_point:
        if not t.dtype.is_floating_point:
            raise UnsupportedDtypeError(
                f"{source}: {key!r} has dtype {t.dtype}, expected a floating-point tensor"
            )
        want = dtype if dtype is not None else (torch.bfloat16 if t.dtype in FLOAT8_DTYPES else t.dtype)
    else:
        if t.dtype != target_dtype:
            raise UnsupportedDtypeError(f"{source}: {key!r} has dtype {t.dtype}, expected {target_dtype}")
        want = t.dtype
    device = torch.device(device) if device is not None else torch.device("cpu")
    if device.type == "cpu":
        return t.to(dtype=want, copy=copy)
    # Move the raw bytes first (fewer of them for float8/bf16), then cast on the device.
    return t.to(device=device).to(dtype=want)


def load_into(
    module: nn.Module,
    tensors,
    *,
    source: str,
    device=None,
    dtype=None,
    copy: bool = True,
    check_finite: bool = True,
) -> nn.Module:
    """Fill `module` (built on the meta device) from `tensors` and return it.

    tensors: a Mapping or an iterable of (key, tensor) pairs named like `module.state_dict()`.
      Each tensor is cast/moved (and copied, see `copy`) before the next one is requested, so a
      source may drop a tensor's memory once the iterator resumes.
    copy:   True (default): the module never shares memory with the tensors passed (needed for
      `Checkpoint.get`'s memory-mapped views). False: a tensor that needs no cast or move becomes
      the parameter as it is, like `load_state_dict(assign=True)`; use it with tensors nobody
      else holds, e.g. `load_into(m, ckpt.stream(), copy=False)` (the fastest way).
    device: where the weights go (default CPU); CUDA loads go tensor by tensor to the device.
    dtype:  floating-point dtype of the loaded weights; default: each tensor's own dtype, except
      float8 (e4m3fn, e5m2), which is upcast to bfloat16. Integer/bool buffers keep theirs.
    Parameters tied under several names are filled once from whichever name comes first.
    check_finite: scan each floating-point tensor for NaN/Inf as it arrives, in its loaded dtype
      (~0.1 s/GB on one CPU core; on a GPU a reduction at memory bandwidth); the first bad one
      raises NonFiniteWeightsError naming the module class, the key and whether a cast overflowed.

    Raises WeightsError (never returns a half-filled module, and leaves `module` untouched on
    error): shape mismatch (key, expected, found), unsupported dtype, missing or unexpected keys
    (up to five named, and the count), non-finite values.
    """
    targets, aliases = _targets(module)
    if isinstance(tensors, Mapping):
        unexpected = [k for k in tensors if k not in targets]
        if unexpected:
            raise KeyMismatchError(
                f"{source}: {len(unexpected)} unexpected key(s) for {type(module).__name__}: {_few(unexpected)}"
            )
        tensors = tensors.items()
    filled: dict[int, Tensor] = {}
    unexpected: list[str] = []
    for key, t in tensors:
        target = targets.get(key)
        if target is None:
            unexpected.append(key)
            continue
        orig = target[2]
        if tuple(t.shape) != tuple(orig.shape):
            raise ShapeMismatchError(
                f"{source}: {key!r} has shape {list(t.shape)}, but {type(module).__name__} expects "
                f"{list(orig.shape)} (wrong variant or config?)"
            )
        if id(orig) in filled:  # a tied parameter already filled under another name
            continue
        value = _materialise(t, key, source, dtype, device, orig.dtype, copy)
        if check_finite and not is_finite(value):
            raise nonfinite_error(source, type(module).__name__, key, value, stored=t)
        filled[id(orig)] = value
        del t  # let the source drop this tensor's bytes before the next one is read
    if unexpected:
        raise KeyMismatchError(
            f"{source}: {len(unexpected)} unexpected key(s) for {type(module).__name__}: {_few(unexpected)}"
        )
    missing = [names[0] for tid, names in aliases.items() if tid not in filled]
    if missing:
        raise KeyMismatchError(
            f"{source}: {len(missing)} key(s) missing for {type(module).__name__}: {_few(missing)}"
        )
    # All checks passed: assign (the module held only meta tensors, so nothing is duplicated).
    # One new object per original tensor, so tied names stay one Parameter.
    new: dict[int, Tensor] = {}
    for mod, attr, orig, is_param in targets.values():
        if id(orig) not in new:
            value = filled[id(orig)]
            new[id(orig)] = nn.Parameter(value, requires_grad=orig.requires_grad) if is_param else value
        (mod._parameters if is_param else mod._buffers)[attr] = new[id(orig)]
    return module
