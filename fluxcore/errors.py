"""One error hierarchy for fluxcore.

Every message names the file, key or value at fault, what was expected and what was found.
"""


class FluxcoreError(Exception):
    """Base class of every error fluxcore raises on purpose."""


class ConfigError(FluxcoreError, ValueError):
    """A configuration value is inconsistent or out of range."""


class BackendError(FluxcoreError, RuntimeError):
    """An attention (or kernel) backend that was asked for by name cannot run here."""


class WeightsError(FluxcoreError):
    """A checkpoint file or folder is missing, corrupt, or not what the model needs."""


class SaveError(FluxcoreError, OSError):
    """A save could not complete (disk full, file size limit, permissions, ...). Saves are atomic:
    whatever was at the target path before is left as it was, and no partial file is left behind."""


class NonFiniteError(FluxcoreError, FloatingPointError):
    """A tensor that must be finite holds NaN or Inf: loaded weights, a decoded image, a training
    loss or gradient. The message names the part, the first bad key or step, and the likely cause."""


def describe_nonfinite(t) -> str:
    """'3 NaN, 1 +Inf, 0 -Inf of 4096 values' for a tensor known to hold non-finite values."""
    import torch  # errors.py is imported everywhere; keep its import free of torch

    t = t.detach()
    nan = int(torch.isnan(t).sum())
    pos = int(torch.isposinf(t).sum())
    neg = int(torch.isneginf(t).sum())
    return f"{nan} NaN, {pos} +Inf, {neg} -Inf of {t.numel()} values"


def nonfinite_output(ae, op: str, given, out) -> str:
    """The message for an autoencoder `op` ("encode"/"decode") whose output `out` holds NaN/Inf,
    naming the most likely cause: non-finite scale/shift factors, non-finite input, or weights."""
    import math

    import torch

    factors = {"scale_factor": ae.scale_factor, "shift_factor": ae.shift_factor}
    bad = [f"{k}={v!r}" for k, v in factors.items() if not math.isfinite(float(v))]
    if bad:
        cause = f"its {' and '.join(bad)} (from its config) are not finite"
    elif not bool(torch.isfinite(given).all()):
        what = "latents" if op == "decode" else "images"
        cause = f"the {what} given hold {describe_nonfinite(given)} (upstream: the sampler or transformer)"
    else:
        cause = f"its weights or {ae.dtype} overflow (try float32 or bfloat16)"
    return f"AutoEncoder.{op} produced {describe_nonfinite(out)}: {cause}"


class TrainingDivergedError(NonFiniteError):
    """The training loss or gradient norm became NaN/Inf; `.step` is the (0-based) step. The model
    keeps the weights of the last finite step: the bad step is never applied."""

    def __init__(self, message: str, step: int):
        super().__init__(message)
        self.step = step
