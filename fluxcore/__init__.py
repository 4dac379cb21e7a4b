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
from fluxcore.compile import compile_blocks
from fluxcore.config import PRESETS, FluxConfig, get_config
from fluxcore.errors import BackendError, ConfigError, FluxcoreError, WeightsError
from fluxcore.math import apply_rope, modulate, rope, timestep_embedding
from fluxcore.model import Flux

# --- weights ---
from fluxcore.weights import bfl_to_diffusers, diffusers_to_bfl, info, load_flux, save_flux

# --- text encoders, tokenizers, autoencoder ---
# isort: split
from fluxcore.autoencoder import AE_PRESETS, AutoEncoder, AutoEncoderConfig
from fluxcore.text import (
    CLIP_PRESETS,
    T5_PRESETS,
    CLIPTextConfig,
    CLIPTextEncoder,
    CLIPTokenizer,
    PromptTruncatedWarning,
    T5Config,
    T5Encoder,
    T5Tokenizer,
    encode_prompt,
)
from fluxcore.weights.encoders import (
    load_autoencoder,
    load_clip,
    load_clip_tokenizer,
    load_t5,
    load_t5_tokenizer,
    save_autoencoder,
    save_clip,
    save_t5,
)

# --- latents, sampling, pipeline ---
# isort: split
from fluxcore.conditioning import ReduxProjector, load_redux
from fluxcore.latents import get_noise, make_img_ids, make_txt_ids, pack, unpack
from fluxcore.pipeline import FluxPipeline, FluxPipelineOutput
from fluxcore.sampling import (
    SAMPLERS,
    CFGDenoiser,
    FlowDenoiser,
    get_sampler,
    sample_deis,
    sample_dpmpp_2m,
    sample_dpmpp_2m_sde,
    sample_dpmpp_3m_sde,
    sample_euler,
    sample_euler_ancestral,
    sample_heun,
    sample_lcm,
    sample_uni_pc,
)
from fluxcore.schedules import (
    SCHEDULERS,
    ScheduleConfig,
    get_schedule,
    get_scheduler,
    make_schedule,
    time_shift,
)

# --- adapters (LoRA) ---
# isort: split
from fluxcore import lora

# --- training ---
# isort: split
# The loop itself is `fluxcore.train.train` (the module keeps the name `fluxcore.train`).
from fluxcore import toydata, train
from fluxcore.train import EMA, TrainConfig, flow_loss, sample_timesteps, save_checkpoint

__version__ = "0.1.0"
