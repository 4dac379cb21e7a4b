"""The FLUX.1 conditioning modes, as the reference builds them.

Each mode turns its inputs into the extra model inputs that `FlowDenoiser` takes:

    img2img      start from t·noise + (1 − t)·x_init at t = schedule[int((1 − strength)·N)]
    Kontext      reference-image tokens appended to the sequence, ids (1, row, col)  → img_cond_seq(_ids)
    Fill         masked-image latent ‖ 8x8-folded mask, on channels (64 + 256 = 320) → img_cond
    Canny/Depth  control-image latent on channels (64)                                → img_cond
    Redux        SigLIP image embeddings projected to T5 width, appended to the text  → txt

Two layers: formulas on latents (`img2img_start`, `kontext_tokens`, `fill_condition`,
`control_condition`, `append_redux`), and one function per mode on user inputs (`img2img_inputs`,
`kontext_inputs`, `fill_inputs`, `control_inputs`, `redux_inputs`) that converts the images
(`fluxcore.images`) and calls `encode`, the caller's autoencoder: images [B, 3, H, W] in [−1, 1]
→ scaled latents [B, 16, H/8, W/8]. Which mode applies is decided by the model
(`FluxConfig.conditioning`, and the Kontext flag of the pipeline).

Shapes: latents [B, 16, h, w] (h = H/8); packed tokens [B, (h/2)(w/2), C].
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from einops import rearrange
from torch import Tensor, nn

from fluxcore.errors import ConfigError, WeightsError
from fluxcore.images import image_size, to_mask_tensor, to_rgb_tensor
from fluxcore.latents import make_img_ids, pack

Encode = Callable[[Tensor], Tensor]  # images [B, 3, H, W] in [−1, 1] → latents [B, 16, H/8, W/8]


def check_inputs(mode: str, in_channels: int, image, strength, mask_image, control_image) -> None:
    """ConfigError unless the image inputs fit the mode ("text", "kontext", "fill", "control"):
    Fill needs image + mask_image, Canny/Depth control_image (and no image), strength goes with
    img2img (a text-mode model given an image). in_channels is named in the messages."""
    if mode == "fill" and (image is None or mask_image is None):
        raise ConfigError(
            f"this is a Fill model ({in_channels} input channels): pass image= and mask_image= (white = generate)"
        )
    if mode != "fill" and mask_image is not None:
        raise ConfigError(f"mask_image is for Fill models; this model's mode is {mode!r}")
    if mode == "control" and control_image is None:
        raise ConfigError(
            f"this is a Canny/Depth model ({in_channels} input channels): pass control_image= (the edge or depth map)"
        )
    if mode != "control" and control_image is not None:
        raise ConfigError(f"control_image is for Canny/Depth models; this model's mode is {mode!r}")
    if mode == "control" and image is not None:
        raise ConfigError("Canny/Depth models take control_image=, not image=")
    if strength is not None and (image is None or mode != "text"):
        raise ConfigError(f"strength is for img2img: pass image= with it (this model's mode is {mode!r})")
    if strength is not None and not 0 < strength <= 1:
        raise ConfigError(f"strength must be in (0, 1], got {strength}")


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


def img2img_inputs(encode: Encode, image, width: int, height: int) -> Tensor:
    """img2img's init latents: the image (PIL or tensor, resized to width x height) encoded and
    packed → [B, (H/16)(W/16), 64]; `img2img_start` then mixes them with the noise."""
    return pack(encode(to_rgb_tensor(image, width, height, "image")))


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


def kontext_size(image, auto_resize: bool = True) -> tuple[int, int]:
    """(width, height) the Kontext reference image is encoded at: the closest KONTEXT_RESOLUTIONS
    entry with `auto_resize` (the reference's behaviour), else its own size rounded down to 16."""
    w, h = image_size(image)
    return kontext_resolution(w, h) if auto_resize else (16 * (w // 16), 16 * (h // 16))


def kontext_inputs(encode: Encode, image, auto_resize: bool = True) -> dict[str, Tensor]:
    """Kontext: {"img_cond_seq": [B, L_ref, 64], "img_cond_seq_ids": [B, L_ref, 3] float32} from the
    reference image (PIL or tensor) encoded at `kontext_size(image, auto_resize)`."""
    ref_w, ref_h = kontext_size(image, auto_resize)
    seq, ids = kontext_tokens(encode(to_rgb_tensor(image, ref_w, ref_h, "image")))
    return {"img_cond_seq": seq, "img_cond_seq_ids": ids}


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


def fill_inputs(encode: Encode, image, mask_image, width: int, height: int) -> dict[str, Tensor]:
    """Fill: {"img_cond": [B, L, 320]} from the image and its mask (PIL or tensors, at width x height;
    white / 1 = generate): encode(image·(1 − mask)) ‖ the mask folded by `fill_condition`."""
    img = to_rgb_tensor(image, width, height, "image")
    mask = to_mask_tensor(mask_image, width, height)
    lat = encode(fill_masked_image(img, mask))
    return {"img_cond": fill_condition(lat, mask.to(lat.device))}


# --- Canny / Depth ---------------------------------------------------------------------------


def control_condition(control_latent: Tensor) -> Tensor:
    """Canny/Depth's channel condition: the packed latent of the control image [B, L, 64].

    The control image (an edge map or depth map, 3 channels in [−1, 1], at the output size) is
    the user's; the edge and depth estimators are out of scope."""
    return pack(control_latent)


def control_inputs(encode: Encode, control_image, width: int, height: int) -> dict[str, Tensor]:
    """Canny/Depth: {"img_cond": [B, L, 64]} from the control image (PIL or tensor, at width x height)."""
    return {
        "img_cond": control_condition(encode(to_rgb_tensor(control_image, width, height, "control_image")))
    }


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
    redux_up.{weight,bias}, redux_down.{weight,bias}); sizes are read from the shapes.
    dtype: default the file's own (float8 is upcast to bfloat16)."""
    from fluxcore.weights.io import ShapeMismatchError, load_into, open_checkpoint

    try:
        ckpt = open_checkpoint(path)
    except WeightsError as e:  # keep the kind (missing, corrupt, ...) and say what was being read
        raise type(e)(f"cannot read Redux weights: {e}") from None
    with ckpt:
        expected = {"redux_up.weight", "redux_up.bias", "redux_down.weight", "redux_down.bias"}
        keys = set(ckpt.keys())
        if keys != expected:
            raise WeightsError(
                f"{ckpt.source}: expected exactly the keys {sorted(expected)}; "
                f"missing {sorted(expected - keys)}, unexpected {sorted(keys - expected)[:5]}"
            )
        up, down = ckpt.shape("redux_up.weight"), ckpt.shape("redux_down.weight")
        if len(up) != 2 or len(down) != 2:
            raise ShapeMismatchError(
                f"{ckpt.source}: redux_up.weight {list(up)} and redux_down.weight {list(down)} must be 2-D"
            )
        (hidden, siglip_dim), txt_dim = up, down[0]
        with torch.device("meta"):
            proj = ReduxProjector(siglip_dim, txt_dim, hidden)
        return load_into(proj, ckpt.stream(), source=ckpt.source, device=device, dtype=dtype, copy=False)


def append_redux(txt: Tensor, txt_ids: Tensor, redux_tokens: Tensor) -> tuple[Tensor, Tensor]:
    """txt [B, L, D] ‖ redux_tokens [B or 1, N, D] along the sequence; txt_ids grow with zeros."""
    b = txt.shape[0]
    if redux_tokens.shape[0] == 1 and b > 1:
        redux_tokens = redux_tokens.expand(b, -1, -1)
    txt = torch.cat((txt, redux_tokens.to(txt)), dim=1)
    zeros = txt_ids.new_zeros(b, redux_tokens.shape[1], txt_ids.shape[-1])
    return txt, torch.cat((txt_ids, zeros), dim=1)


def redux_inputs(projector: nn.Module, image_embeds: Tensor, device=None) -> Tensor:
    """Redux tokens [B or 1, N, txt_dim] from SigLIP embeddings [N, siglip_dim] or
    [B, N, siglip_dim], computed in the projector's dtype on `device`; `append_redux` adds them
    to the text."""
    emb = image_embeds[None] if image_embeds.ndim == 2 else image_embeds
    dtype = next(projector.parameters()).dtype
    return projector(emb.to(device=device, dtype=dtype))
