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
