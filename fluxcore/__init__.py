"""fluxcore: FLUX.1 rectified-flow transformers from scratch in PyTorch + Triton.

Importing fluxcore only defines names: it sets nothing, writes nothing, and does not import
triton, transformers or diffusers.
"""

from fluxcore import errors
from fluxcore.attention import (
    attention,
    attention_backend,
    available_backends,
    register_backend,
    set_attention_backend,
)
from fluxcore.config import PRESETS, FluxConfig, get_config
from fluxcore.errors import BackendError, ConfigError, FluxcoreError, WeightsError
from fluxcore.math import apply_rope, modulate, rope, timestep_embedding
from fluxcore.model import Flux

# --- weights (issue 3) ---
# --- text encoders, tokenizers, autoencoder (issue 4) ---
# --- latents, sampling, pipeline (issue 5) ---
# --- training (issue 7) ---

__version__ = "0.1.0"
