"""Loading ControlNets from their official files (diffusers folders, single files, XLabs files)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
from torch import Tensor, nn

from fluxcore.config import FluxConfig
from fluxcore.controlnet.model import FLUX_AXES, FluxControlNet, base_config, default_axes
from fluxcore.controlnet.xlabs import XLabsControlNet, diffusers_hint_key, xlabs_config
from fluxcore.errors import WeightsError
from fluxcore.weights.flux_keys import diffusers_key_to_bfl, fused_pieces

# Keys of the diffusers layout that have no counterpart in the base model; they keep their names.
_CONTROL_PREFIXES = (
    "controlnet_blocks.",
    "controlnet_single_blocks.",
    "controlnet_x_embedder.",
    "controlnet_mode_embedder.",
)


def _diffusers_config(
    hf: dict, shapes: dict[str, tuple[int, ...]], source: str, axes_dim
) -> tuple[FluxConfig, dict]:
    """FluxConfig of a diffusers-layout ControlNet from its config.json (or, without one, from
    tensor shapes), plus the extras: num_modes and hint (XLabs-converted files)."""

    def shape(key):
        if key not in shapes:
            raise WeightsError(f"{source}: no tensor {key!r}; not a FLUX ControlNet in the diffusers layout")
        return shapes[key]

    if hf:
        heads, head_dim = hf.get("num_attention_heads", 24), hf.get("attention_head_dim", 128)
        config = base_config(
            in_channels=hf.get("in_channels", 64),
            vec_in_dim=hf.get("pooled_projection_dim", 768),
            context_in_dim=hf.get("joint_attention_dim", 4096),
            hidden_size=heads * head_dim,
            num_heads=heads,
            depth=hf.get("num_layers", 19),
            depth_single_blocks=hf.get("num_single_layers", 38),
            axes_dim=tuple(axes_dim or hf.get("axes_dims_rope", FLUX_AXES)),
            guidance_embed=bool(hf.get("guidance_embeds", False)),
        )
        return config, {"num_modes": hf.get("num_mode"), "hint": hf.get("conditioning_embedding_channels")}
    hidden, in_ch = shape("x_embedder.weight")
    head_dim = (
        shape("transformer_blocks.0.attn.norm_q.weight")[0]
        if "transformer_blocks.0.attn.norm_q.weight" in shapes
        else 128
    )
    count = lambda rx: len({k.split(".")[1] for k in shapes if k.startswith(rx)})  # noqa: E731
    config = base_config(
        in_channels=in_ch,
        vec_in_dim=shape("time_text_embed.text_embedder.linear_1.weight")[1],
        context_in_dim=shape("context_embedder.weight")[1],
        hidden_size=hidden,
        num_heads=hidden // head_dim,
        depth=count("transformer_blocks."),
        depth_single_blocks=count("single_transformer_blocks."),
        axes_dim=default_axes(head_dim, axes_dim, source),
        guidance_embed="time_text_embed.guidance_embedder.linear_1.weight" in shapes,
    )
    modes = shapes.get("controlnet_mode_embedder.weight")
    hint = shapes.get("input_hint_block.conv_out.weight")
    return config, {"num_modes": modes[0] if modes else None, "hint": hint[0] if hint else None}


def _diffusers_tensors(ckpt, hint: bool) -> Iterator[tuple[str, Tensor]]:
    """(our key, tensor) from a diffusers-layout ControlNet file, streamed; fused BFL tensors
    (qkv, linear1) are assembled from their pieces as soon as all of them were read."""

    pending: dict[str, dict[str, Tensor]] = {}
    for key, t in ckpt.stream():
        if key.startswith(_CONTROL_PREFIXES):
            if hint and key.startswith("controlnet_x_embedder."):  # XLabs-converted: pos_embed_input
                key = "pos_embed_input." + key.split(".", 1)[1]
            yield key, t
            continue
        if key.startswith("input_hint_block."):
            yield diffusers_hint_key(key, ckpt.source), t
            continue
        try:
            bfl, piece = diffusers_key_to_bfl(key)
        except KeyError:
            raise WeightsError(f"{ckpt.source}: unexpected key {key!r} for a FLUX ControlNet") from None
        if piece is None:
            yield bfl, t
            continue
        got = pending.setdefault(bfl, {})
        got[piece] = t
        order = fused_pieces(bfl)
        if len(got) == len(order):
            yield bfl, torch.cat([got[p] for p in order], dim=0)
            del pending[bfl]
    if pending:
        bfl, got = next(iter(pending.items()))
        missing = [p for p in fused_pieces(bfl) if p not in got]
        raise WeightsError(f"{ckpt.source}: cannot assemble {bfl!r}: pieces {missing} are missing")


def load_controlnet(
    path, *, device=None, dtype: torch.dtype | None = None, axes_dim: Sequence[int] | None = None
) -> nn.Module:
    """A FluxControlNet or XLabsControlNet from its official files, eval mode, frozen.

    path: a diffusers folder (config.json + diffusion_pytorch_model.safetensors or shards: InstantX,
          Union, Union-Pro 2.0, XLabs-converted), or a single .safetensors file in either layout
          (XLabs files use BFL names; the config is read from tensor shapes).
    dtype: default the file's own (float8 is upcast to bfloat16); pass the base model's dtype.
    axes_dim: RoPE split, needed only for single files whose head dim is not FLUX's 128.
    """
    from fluxcore.weights.io import load_into, open_checkpoint, read_json

    p = Path(path)
    hf = read_json(p / "config.json", missing_ok=True) if p.is_dir() else {}
    try:
        ckpt = open_checkpoint(p)
    except WeightsError as e:
        raise type(e)(f"cannot read ControlNet weights: {e}") from None
    with ckpt:
        shapes = {k: ckpt.shape(k) for k in ckpt.keys()}
        if "pos_embed_input.weight" in shapes and "double_blocks.0.img_attn.qkv.weight" in shapes:
            config = xlabs_config(shapes, ckpt.source, axes_dim)
            with torch.device("meta"):
                net = XLabsControlNet(config)
            tensors = ckpt.stream()
        elif "controlnet_x_embedder.weight" in shapes or "x_embedder.weight" in shapes:
            config, extra = _diffusers_config(hf, shapes, ckpt.source, axes_dim)
            with torch.device("meta"):
                if extra["hint"] is not None:
                    if config.depth_single_blocks:
                        raise WeightsError(
                            f"{ckpt.source}: a hint-block ControlNet with single blocks is not supported"
                        )
                    net = XLabsControlNet(config)
                else:
                    net = FluxControlNet(config, extra["num_modes"])
            tensors = _diffusers_tensors(ckpt, extra["hint"] is not None)
        else:
            raise WeightsError(
                f"{ckpt.source}: not a FLUX ControlNet (expected controlnet_x_embedder.weight (diffusers "
                f"layout) or pos_embed_input.weight (XLabs)); first keys: {list(shapes)[:4]}"
            )
        load_into(net, tensors, source=ckpt.source, device=device, dtype=dtype, copy=False)
    net.eval().requires_grad_(False)
    return net
