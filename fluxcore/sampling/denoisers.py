"""The model side of the sampler protocol: the FLUX transformer as a denoiser, true
classifier-free guidance, and the two ways a sampler calls a model at a flow time σ —
`velocity` (dx/dt) and `denoise` (x0), both over `per_sample` (σ as the [B] tensor the protocol
passes). x0 and v are tied by x0 = x − σ·v on the flow path x_σ = (1 − σ)·x0 + σ·ε.
"""

from __future__ import annotations

import torch
from torch import Tensor

from fluxcore.errors import ConfigError


def per_sample(sigma: float | Tensor, x: Tensor) -> Tensor:
    """σ as a [B] tensor in x's dtype on x's device, B = x.shape[0]: what the protocol passes to
    `model(x, sigma)` (the reference builds t with torch.full in the latents' dtype)."""
    if isinstance(sigma, Tensor) and sigma.ndim == 1:
        return sigma.to(device=x.device, dtype=x.dtype)
    return torch.full((x.shape[0],), float(sigma), dtype=x.dtype, device=x.device)


def _bcast(s: Tensor, x: Tensor) -> Tensor:
    return s.reshape(-1, *([1] * (x.ndim - 1)))


class FlowDenoiser:
    """A FLUX transformer behind the sampler protocol.

    `velocity(x, sigma, **cond)` is the transformer's output v [B, L, 64] (model dtype);
    `__call__(x, sigma, **cond)` is the denoised x0 = x − σ·v in x's dtype.

    x: packed latents [B, L, 64]. sigma: a float or a [B] tensor of flow times.
    cond (the sampler's `extra_args`): img_ids [B, L, 3], txt [B, L_txt, ctx], txt_ids [B, L_txt, 3],
    y [B, vec] and, as the conditioning modes need them,
      guidance       float or [B] (dev-type models; ignored by schnell-type models),
      img_cond       [B, L, C] concatenated on channels (Fill: 320, Canny/Depth: 64),
      img_cond_seq   [B, L_ref, 64] with img_cond_seq_ids [B, L_ref, 3] appended to the sequence
                     (Kontext reference tokens; their outputs are dropped).
    """

    def __init__(self, flux: torch.nn.Module):
        self.flux = flux

    def velocity(
        self,
        x: Tensor,
        sigma: float | Tensor,
        *,
        img_ids: Tensor,
        txt: Tensor,
        txt_ids: Tensor,
        y: Tensor,
        guidance: float | Tensor | None = None,
        img_cond: Tensor | None = None,
        img_cond_seq: Tensor | None = None,
        img_cond_seq_ids: Tensor | None = None,
    ) -> Tensor:
        t = per_sample(sigma, x)
        if guidance is not None:
            guidance = per_sample(guidance, x)
        img, ids = x, img_ids
        if img_cond is not None:
            img = torch.cat((img, img_cond.to(x.dtype)), dim=-1)
        if img_cond_seq is not None:
            if img_cond_seq_ids is None:
                raise ConfigError("img_cond_seq (Kontext reference tokens) needs img_cond_seq_ids; got None")
            img = torch.cat((img, img_cond_seq.to(img.dtype)), dim=1)
            ids = torch.cat((ids, img_cond_seq_ids), dim=1)
        v = self.flux(img=img, img_ids=ids, txt=txt, txt_ids=txt_ids, timesteps=t, y=y, guidance=guidance)
        return v[:, : x.shape[1]]

    def __call__(self, x: Tensor, sigma: float | Tensor, **cond) -> Tensor:
        v = self.velocity(x, sigma, **cond)
        return x - _bcast(per_sample(sigma, x), x) * v


def velocity(model, x: Tensor, sigma: float | Tensor, **extra_args) -> Tensor:
    """dx/dt of `model` at (x, σ): its own `velocity` when it has one, else (x − x0)/σ (σ > 0)."""
    if hasattr(model, "velocity"):
        return model.velocity(x, sigma, **extra_args)
    s = per_sample(sigma, x)
    return (x - model(x, s, **extra_args)) / _bcast(s, x)


class CFGDenoiser:
    """True classifier-free guidance with a negative prompt: out = uncond + scale·(cond − uncond).

    `negative` holds the extra_args that differ for the negative prompt (txt, txt_ids, y); the
    rest is shared. This runs the transformer twice per evaluation, so it doubles the cost.
    FLUX.1-dev is guidance-distilled (its `guidance` input already steers towards the prompt), so
    true CFG is optional there; it is what gives schnell/dev a negative prompt at all. Guidance is
    linear, so guiding x0 and guiding v give the same sampler steps.
    """

    def __init__(self, model, scale: float, negative: dict):
        self.model = model
        self.scale = float(scale)
        self.negative = dict(negative)

    def velocity(self, x: Tensor, sigma: float | Tensor, **cond) -> Tensor:
        v_pos = velocity(self.model, x, sigma, **cond)
        v_neg = velocity(self.model, x, sigma, **{**cond, **self.negative})
        return v_neg + self.scale * (v_pos - v_neg)

    def __call__(self, x: Tensor, sigma: float | Tensor, **cond) -> Tensor:
        pos = self.model(x, sigma, **cond)
        neg = self.model(x, sigma, **{**cond, **self.negative})
        return neg + self.scale * (pos - neg)


def denoise(model, x: Tensor, sigma: float | Tensor, **extra_args) -> Tensor:
    """The model's x0 at (x, σ): `model(x, per_sample(σ, x), **extra_args)`, the protocol's call."""
    return model(x, per_sample(sigma, x), **extra_args)
