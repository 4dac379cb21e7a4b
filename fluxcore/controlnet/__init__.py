"""FLUX ControlNets: the networks, their official files, and their injection into a built Flux.

Two families, each a small FLUX trunk (fluxcore's own DoubleStreamBlock / SingleStreamBlock) that
reads the same step inputs as the base model plus a control condition and returns one residual
per trunk block:

    FluxControlNet  (diffusers layout: InstantX, InstantX/Shakker Union with control modes,
                    Union-Pro 2.0 without modes). The condition is the control image encoded by
                    the autoencoder and packed, [B, L_img, 64]; it enters as
                    img_in(x) + controlnet_x_embedder(cond). Union nets prepend one text token,
                    controlnet_mode_embedder(mode). Residuals: controlnet_blocks[i](image tokens
                    after double block i), controlnet_single_blocks[j](image tokens after single
                    block j). Base block k gets residual[k // ceil(depth / n)]  ("interval").
    XLabsControlNet (fluxcore.controlnet.xlabs; BFL key names). The condition is the control image
                    in pixel space, [B, 3, H, W] in [-1, 1], through an 8-conv hint block (H/8),
                    packed 2x2 and pos_embed_input. Double blocks only; base double block k gets
                    residual[k % n]  ("repeat").

Injection is a transform (docs/transforms.md): `attach_controlnets(flux, controls)` wraps every
entry of `flux.double_blocks` / `flux.single_blocks` in a module that adds its block's residual
for the current step (image tokens only) and returns a handle; `handle.remove()` puts the very
same block modules back. The residuals are computed once per model evaluation by
`ControlledDenoiser`, which wraps a sampler denoiser (e.g. FlowDenoiser) and runs every active
ControlNet on that evaluation's inputs first. Several ControlNets sum; each has its own scale and
its own [start, end] window over the sampling steps.

Shapes: B batch, L_img image tokens, L_txt text tokens, D = hidden_size.

Files: model.py (the networks, the residual indexing rule), xlabs.py (the XLabs network), inject.py
(the transform, the denoiser, the pipeline's keywords), load.py (official files).
"""

from fluxcore.controlnet.inject import (
    Control,
    ControlledDenoiser,
    ControlNetHandle,
    attach_controlnets,
    build_controls,
    control_keep,
    controlnet_residuals,
    prepare_control_image,
)
from fluxcore.controlnet.load import load_controlnet
from fluxcore.controlnet.model import (
    CONTROL_MODES,
    ControlNetOutput,
    ControlTrunk,
    FluxControlNet,
    residual_index,
)
from fluxcore.controlnet.xlabs import XLabsControlNet

__all__ = [
    "CONTROL_MODES",
    "Control",
    "ControlNetHandle",
    "ControlNetOutput",
    "ControlTrunk",
    "ControlledDenoiser",
    "FluxControlNet",
    "XLabsControlNet",
    "attach_controlnets",
    "build_controls",
    "control_keep",
    "controlnet_residuals",
    "load_controlnet",
    "prepare_control_image",
    "residual_index",
]
