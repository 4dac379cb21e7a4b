"""Flux: the FLUX.1 MMDiT (19 double-stream + 38 single-stream blocks at full size).

Read top to bottom, `forward` is the whole model:

    img [B, L_img, in_ch] ─ img_in ─┐                          ┌─ double blocks ×depth ─ cat(txt, img)
    txt [B, L_txt, ctx]   ─ txt_in ─┴─ (img, txt), vec, pe ────┘  ─ single blocks ×depth_single
    t, guidance, y ─ sinusoid/MLPs ─ vec [B, D]                   ─ drop txt ─ final_layer → [B, L_img, out_ch]
    ids = cat(txt_ids, img_ids) ─ 3-axis RoPE ─ pe [B, 1, L, Dh/2, 2, 2]

State-dict keys and shapes are those of the official single-file checkpoints (BFL layout).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from fluxcore.config import FluxConfig
from fluxcore.errors import ConfigError
from fluxcore.layers import DoubleStreamBlock, EmbedND, LastLayer, MLPEmbedder, SingleStreamBlock
from fluxcore.math import timestep_embedding


class Flux(nn.Module):
    """The FLUX.1 transformer. Build full-size models under `torch.device("meta")` and load weights
    with `fluxcore.load_flux`; or construct directly for random initialisation.

    To try another block, subclass and override `double_block` / `single_block` (each called with
    the config, so a replacement can read new hyper-parameters from a config subclass), or replace
    entries of `double_blocks` / `single_blocks` / `pe_embedder` (or any smaller module) on a built
    model (docs/swapping.md). Speed, memory and adapters are transforms on the built model
    (docs/transforms.md); `forward` never changes.
    """

    double_block = DoubleStreamBlock
    single_block = SingleStreamBlock

    def __init__(self, config: FluxConfig):
        super().__init__()
        self.config = config
        self.in_channels = config.in_channels
        self.out_channels = config.out_channels
        self.hidden_size = config.hidden_size
        self.num_heads = config.num_heads
        self.pe_embedder = EmbedND(theta=config.theta, axes_dim=config.axes_dim)
        self.img_in = nn.Linear(config.in_channels, config.hidden_size, bias=True)
        self.time_in = MLPEmbedder(in_dim=256, hidden_dim=config.hidden_size)
        self.vector_in = MLPEmbedder(config.vec_in_dim, config.hidden_size)
        self.guidance_in = (
            MLPEmbedder(in_dim=256, hidden_dim=config.hidden_size) if config.guidance_embed else nn.Identity()
        )
        self.txt_in = nn.Linear(config.context_in_dim, config.hidden_size)
        self.double_blocks = nn.ModuleList(self.double_block(config) for _ in range(config.depth))
        self.single_blocks = nn.ModuleList(
            self.single_block(config) for _ in range(config.depth_single_blocks)
        )
        self.final_layer = LastLayer(config)

    def forward(
        self,
        img: Tensor,
        img_ids: Tensor,
        txt: Tensor,
        txt_ids: Tensor,
        timesteps: Tensor,
        y: Tensor,
        guidance: Tensor | None = None,
    ) -> Tensor:
        """Velocity of the packed latents.

        img [B, L_img, in_channels]   packed latents (plus any Kontext reference tokens, which
                                      pass through the sequence; the caller drops their outputs)
        img_ids [B, L_img, 3]         (index, row, col) per image token, float
        txt [B, L_txt, context_in_dim], txt_ids [B, L_txt, 3] (zeros for text)
        timesteps [B]                 flow time t in [0, 1] (t = 1 is pure noise)
        y [B, vec_in_dim]             pooled CLIP vector
        guidance [B]                  distilled guidance strength (dev-type models only)
        → [B, L_img, out_channels] in the model's dtype.

        Inputs are cast to the model's dtype first; like the reference sampler (which builds t in
        the latents' dtype), a bf16 model therefore rounds t and guidance to bf16 before × 1000.
        """
        if img.ndim != 3 or txt.ndim != 3:
            raise ValueError(
                f"img and txt must be 3-D [B, L, C]; got img {tuple(img.shape)} and txt {tuple(txt.shape)}"
            )
        if img.shape[-1] != self.in_channels:
            raise ValueError(
                f"img has {img.shape[-1]} channels; this model takes in_channels={self.in_channels}"
            )
        dtype = self.img_in.weight.dtype
        img = self.img_in(img.to(dtype))
        vec = self.time_in(timestep_embedding(timesteps.to(dtype), 256))
        if self.config.guidance_embed:
            if guidance is None:
                raise ConfigError(
                    "this model is guidance-distilled (guidance_embed=True) and needs `guidance` "
                    "(a [B] tensor of guidance strengths, e.g. 3.5); got None"
                )
            vec = vec + self.guidance_in(timestep_embedding(guidance.to(dtype), 256))
        vec = vec + self.vector_in(y.to(dtype))
        txt = self.txt_in(txt.to(dtype))

        pe = self.pe_embedder(torch.cat((txt_ids, img_ids), dim=1))

        for block in self.double_blocks:
            img, txt = block(img=img, txt=txt, vec=vec, pe=pe)

        x = torch.cat((txt, img), dim=1)
        for block in self.single_blocks:
            x = block(x, vec=vec, pe=pe)
        img = x[:, txt.shape[1] :, ...]

        return self.final_layer(img, vec)

    @property
    def dtype(self) -> torch.dtype:
        return self.img_in.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.img_in.weight.device
