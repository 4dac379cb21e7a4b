"""The FLUX.1 conditioning modes, as the reference builds them, on latents.

The autoencoder work (image → latent) is the caller's; these functions turn latents, masks and
image embeddings into the extra model inputs that `FlowDenoiser` takes:

    img2img      start from t·noise + (1 − t)·x_init at t = schedule[int((1 − strength)·N)]
    Kontext      reference-image tokens appended to the sequence, ids (1, row, col)  → img_cond_seq(_ids)
    Fill         masked-image latent ‖ 8x8-folded mask, on channels (64 + 256 = 320) → img_cond
    Canny/Depth  control-image latent on channels (64)                                → img_cond
    Redux        SigLIP image embeddings projected to T5 width, appended to the text  → txt

Shapes: latents [B, 16, h, w] (h = H/8); packed tokens [B, (h/2)(w/2), C].
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from einops import rearrange
from torch import Tensor, nn

from fluxcore.errors import ConfigError, WeightsError
from fluxcore.latents import make_img_ids, pack

# (width, height) pairs Kontext was trained at (~1 megapixel, aspect 0.43 … 2.33), from the reference.
KONTEXT_RESOLUTIONS: tuple[tuple[int, int], ...] = (
    (672, 1568), (688, 1504), (720, 1456), (752, 1392), (800, 1328), (832, 1248),
    (880, 1184), (944, 1104), (1024, 1024), (1104, 944), (1184, 880), (1248, 832),
    (1328, 800), (1392, 752), (1456, 720), (1504, 688), (1568, 672),
)  # fmt: skip


# --- img2img ---------------------------------------------------------------------------------


def img2img_start(
    x_init: Tensor, noise: Tensor, timesteps: Sequence[float], strength: float
) -> tuple[Tensor, list[float]]:
    """Noise the packed init latents to the schedule point `strength` selects, as the reference does.

    x_init, noise: [B, L, 64] packed; timesteps: the full schedule (N + 1 flow times).
    t_idx = int((1 − strength)·N); returns (t·noise + (1 − t)·x_init in noise's dtype,
    timesteps[t_idx:]). strength 1 starts from pure noise; smaller keeps more of the image.
    """
    if not 0 < strength <= 1:
        raise ConfigError(f"strength must be in (0, 1], got {strength}")
    timesteps = [float(t) for t in timesteps]
    n = len(timesteps) - 1
    t_idx = int((1 - strength) * n)  # < n for strength > 0: at least one step runs
    t = timesteps[t_idx]
    x = t * noise + (1.0 - t) * x_init.to(noise.dtype)
    return x, timesteps[t_idx:]


# --- Kontext ---------------------------------------------------------------------------------


def kontext_resolution(width: int, height: int) -> tuple[int, int]:
    """The (width, height) from KONTEXT_RESOLUTIONS whose aspect ratio is closest to width/height."""
    if width <= 0 or height <= 0:
        raise ConfigError(f"image size must be positive, got {width}x{height}")
    aspect = width / height
    _, w, h = min((abs(aspect - w / h), w, h) for w, h in KONTEXT_RESOLUTIONS)
    return w, h


def kontext_tokens(ref_latent: Tensor) -> tuple[Tensor, Tensor]:
    """Kontext reference tokens from the encoded reference image.

    ref_latent [B, 16, h, w] → (img_cond_seq [B, (h/2)(w/2), 64], img_cond_seq_ids [B, (h/2)(w/2), 3]
    float32 with ids (1, row, col) over the reference's own grid — no spatial offset).
    """
    b, _, h, w = ref_latent.shape
    ids = make_img_ids(b, 8 * h, 8 * w, index=1, device=ref_latent.device)
    return pack(ref_latent), ids


# --- Fill ------------------------------------------------------------------------------------


def fill_masked_image(image: Tensor, mask: Tensor) -> Tensor:
    """The image the Fill model sees: image·(1 − mask). image [B, 3, H, W] in [−1, 1];
    mask [B, 1, H, W] in [0, 1], 1 = region to generate."""
    return image * (1 - mask.to(image.dtype))


def fill_condition(masked_latent: Tensor, mask: Tensor) -> Tensor:
    """Fill's channel condition: packed masked-image latent (64) ‖ packed mask (256) → [B, L, 320].

    masked_latent [B, 16, H/8, W/8] (the autoencoder's encoding of `fill_masked_image`);
    mask [B, 1, H, W] or [B, H, W] in [0, 1]. Each 8x8 pixel block of the mask becomes 64
    channels of one latent pixel, then 2x2 latent pixels are packed like the image (4·64 = 256).
    """
    if mask.ndim == 4:
        mask = mask[:, 0]
    b, h, w = masked_latent.shape[0], masked_latent.shape[-2], masked_latent.shape[-1]
    if mask.shape[-2:] != (8 * h, 8 * w):
        raise ConfigError(
            f"mask is {tuple(mask.shape[-2:])} pixels; the latent {tuple(masked_latent.shape)} needs {(8 * h, 8 * w)}"
        )
    mask = rearrange(mask.to(masked_latent.dtype), "b (h ph) (w pw) -> b (ph pw) h w", ph=8, pw=8)
    if mask.shape[0] == 1 and b > 1:
        mask = mask.expand(b, -1, -1, -1)
    return torch.cat((pack(masked_latent), pack(mask)), dim=-1)


# --- Canny / Depth ---------------------------------------------------------------------------


def control_condition(control_latent: Tensor) -> Tensor:
    """Canny/Depth's channel condition: the packed latent of the control image [B, L, 64].

    The control image (an edge map or depth map, 3 channels in [−1, 1], at the output size) is
    the user's; the edge and depth estimators are out of scope."""
    return pack(control_latent)


# --- Redux -----------------------------------------------------------------------------------


class ReduxProjector(nn.Module):
    """FLUX.1-Redux's image-embedding projector (BFL keys `redux_up`, `redux_down`).

    [B, N, siglip_dim] SigLIP so400m last_hidden_state (1152-d, 729 tokens at 384 px)
    → Linear(siglip_dim → 3·txt_dim) → SiLU → Linear(3·txt_dim → txt_dim) → [B, N, txt_dim],
    tokens that are appended to the T5 tokens (with zero position ids).
    """

    def __init__(self, siglip_dim: int = 1152, txt_dim: int = 4096, hidden_dim: int | None = None):
        super().__init__()
        hidden_dim = hidden_dim or 3 * txt_dim
        self.redux_up = nn.Linear(siglip_dim, hidden_dim)
        self.redux_down = nn.Linear(hidden_dim, txt_dim)

    def forward(self, image_embeds: Tensor) -> Tensor:
        return self.redux_down(nn.functional.silu(self.redux_up(image_embeds)))


def load_redux(path, *, device=None, dtype: torch.dtype | None = None) -> ReduxProjector:
    """A ReduxProjector from flux1-redux-dev.safetensors (or any file with exactly the keys
    redux_up.{weight,bias}, redux_down.{weight,bias}); sizes are read from the shapes."""
    from safetensors.torch import load_file

    try:
        sd = load_file(str(path))
    except Exception as e:  # a missing or corrupt file
        raise WeightsError(f"cannot read Redux weights {path}: {e}") from e
    expected = {"redux_up.weight", "redux_up.bias", "redux_down.weight", "redux_down.bias"}
    if set(sd) != expected:
        raise WeightsError(
            f"{path}: expected exactly the keys {sorted(expected)}; "
            f"missing {sorted(expected - set(sd))}, unexpected {sorted(set(sd) - expected)[:5]}"
        )
    hidden, siglip_dim = sd["redux_up.weight"].shape
    txt_dim = sd["redux_down.weight"].shape[0]
    with torch.device("meta"):
        proj = ReduxProjector(siglip_dim, txt_dim, hidden)
    proj.load_state_dict(sd, strict=True, assign=True)
    return proj.to(device=device, dtype=dtype)


def append_redux(txt: Tensor, txt_ids: Tensor, redux_tokens: Tensor) -> tuple[Tensor, Tensor]:
    """txt [B, L, D] ‖ redux_tokens [B or 1, N, D] along the sequence; txt_ids grow with zeros."""
    b = txt.shape[0]
    if redux_tokens.shape[0] == 1 and b > 1:
        redux_tokens = redux_tokens.expand(b, -1, -1)
    txt = torch.cat((txt, redux_tokens.to(txt)), dim=1)
    zeros = txt_ids.new_zeros(b, redux_tokens.shape[1], txt_ids.shape[-1])
    return txt, torch.cat((txt_ids, zeros), dim=1)
