"""The WeightsError family: what can be wrong with a checkpoint, one class per kind, so callers can
catch the kind they handle. Every message names the file, the key, what was expected and what was
found."""

from fluxcore.errors import ConfigError, NonFiniteError, WeightsError


class CheckpointNotFoundError(WeightsError, FileNotFoundError):
    """The path (or a shard named by an index) does not exist."""


class CorruptCheckpointError(WeightsError):
    """Not a safetensors file, truncated, or its header/index is malformed."""


class UnsupportedDtypeError(WeightsError):
    """A tensor has a dtype fluxcore cannot load (or cannot cast to the one asked for)."""


class KeyMismatchError(WeightsError):
    """Keys missing from, or unexpected in, a checkpoint for the module being loaded."""


class ShapeMismatchError(WeightsError):
    """A tensor's shape differs from the parameter it should fill."""


class UnknownVariantError(WeightsError):
    """The checkpoint's layout or model variant is not one fluxcore recognises."""


class ConfigMismatchError(WeightsError, ConfigError):
    """A config file (config.json, tokenizer_config.json, metadata) states a value that is out of
    bounds or contradicts the tensors on disk."""


class NonFiniteWeightsError(WeightsError, NonFiniteError):
    """Loaded (or about to be saved) weights hold NaN or Inf."""
