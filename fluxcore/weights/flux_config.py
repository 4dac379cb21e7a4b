"""FLUX transformer configs read from checkpoints, in one place: tensor shapes → FluxConfig
(`infer_config`), checked against a diffusers config.json and completed from the metadata that
`save_flux` writes; the PRESETS variant a config is (`detect_variant`); and the config.json that
diffusers needs (`diffusers_config`). Used by `inspect_flux`, hence by `load_flux` and `info`.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path

from fluxcore.config import PRESETS, FluxConfig
from fluxcore.errors import ConfigError, WeightsError
from fluxcore.weights.errors import ConfigMismatchError, KeyMismatchError, UnknownVariantError

CONFIG_METADATA_KEY = "fluxcore_config"  # FluxConfig as JSON in files written by save_flux(format="bfl")
# Words in file/folder names that tell apart variants whose shapes are identical.
_VARIANT_WORDS = ("schnell", "krea", "kontext", "fill", "canny", "depth")


def _axes_for(head_dim: int) -> tuple[int, ...] | None:
    for cfg in PRESETS.values():
        if cfg.head_dim == head_dim:
            return cfg.axes_dim
    return None


def infer_config(
    shapes: Mapping[str, tuple[int, ...]],
    *,
    config_json: dict | None = None,
    metadata: Mapping | None = None,
    source: str = "checkpoint",
) -> FluxConfig:
    """The FluxConfig that BFL-keyed `shapes` fit. Shapes give every size; the RoPE split
    (axes_dim) and theta are not stored in the weights, so they come from config.json or
    fluxcore metadata, else from the preset with the same head dim (official: 16/56/56).
    Raises UnknownVariantError / KeyMismatchError when the shapes fit no FLUX model, and
    WeightsError when config.json contradicts them."""

    def dim(key: str, ndim: int, axis: int) -> int:
        if key not in shapes:
            raise KeyMismatchError(f"{source}: cannot infer the FLUX config: tensor {key!r} is missing")
        if len(shapes[key]) != ndim:
            raise UnknownVariantError(
                f"{source}: {key!r} has shape {list(shapes[key])}, expected {ndim} dimension(s)"
            )
        return shapes[key][axis]

    def count(kind: str) -> int:
        idx = {int(m.group(1)) for k in shapes if (m := re.match(rf"{kind}\.(\d{{1,6}})\.", k))}
        if idx and max(idx) + 1 != len(idx):
            raise KeyMismatchError(
                f"{source}: {kind} are numbered up to {max(idx)} but only {len(idx)} are present"
            )
        return len(idx)

    hidden, in_channels = dim("img_in.weight", 2, 0), dim("img_in.weight", 2, 1)
    depth, depth_single = count("double_blocks"), count("single_blocks")
    if depth:
        head_dim = dim("double_blocks.0.img_attn.norm.query_norm.scale", 1, 0)
        mlp_hidden = dim("double_blocks.0.img_mlp.0.weight", 2, 0)
        qkv_bias = "double_blocks.0.img_attn.qkv.bias" in shapes
    elif depth_single:
        head_dim = dim("single_blocks.0.norm.query_norm.scale", 1, 0)
        mlp_hidden = dim("single_blocks.0.linear1.weight", 2, 0) - 3 * hidden
        qkv_bias = True
    else:
        raise UnknownVariantError(f"{source}: no double_blocks and no single_blocks: not a FLUX transformer")
    if hidden <= 0 or head_dim <= 0 or hidden % head_dim or mlp_hidden <= 0:
        raise UnknownVariantError(
            f"{source}: hidden size {hidden}, head dim {head_dim} and MLP width {mlp_hidden} fit no FLUX model"
        )
    meta_cfg: dict = {}
    if metadata and CONFIG_METADATA_KEY in metadata:
        try:
            meta_cfg = json.loads(metadata[CONFIG_METADATA_KEY])
        except (ValueError, RecursionError):
            meta_cfg = {}
        meta_cfg = meta_cfg if isinstance(meta_cfg, dict) else {}
    if config_json and isinstance(config_json.get("axes_dims_rope"), list):
        axes = config_json["axes_dims_rope"]
    elif isinstance(meta_cfg.get("axes_dim"), list):
        axes = meta_cfg["axes_dim"]
    else:
        axes = _axes_for(head_dim)
    if axes is None:
        raise UnknownVariantError(
            f"{source}: head dim {head_dim} matches no known FLUX config and the RoPE split (axes_dim) is not "
            "stored in the weights; pass config=FluxConfig(...)"
        )
    theta = meta_cfg.get("theta", 10_000)
    if isinstance(theta, bool) or not isinstance(theta, (int, float)) or not 1 < theta < float("inf"):
        raise ConfigMismatchError(
            f"{source}: metadata {CONFIG_METADATA_KEY!r} states theta={theta!r}; expected a finite number > 1"
        )
    try:
        config = FluxConfig(
            in_channels=in_channels,
            out_channels=dim("final_layer.linear.weight", 2, 0),
            vec_in_dim=dim("vector_in.in_layer.weight", 2, 1),
            context_in_dim=dim("txt_in.weight", 2, 1),
            hidden_size=hidden,
            mlp_ratio=mlp_hidden / hidden,
            num_heads=hidden // head_dim,
            depth=depth,
            depth_single_blocks=depth_single,
            axes_dim=tuple(axes),
            theta=theta,
            qkv_bias=qkv_bias,
            guidance_embed="guidance_in.in_layer.weight" in shapes,
        )
    except (ConfigError, TypeError, ValueError, ArithmeticError) as e:
        raise UnknownVariantError(
            f"{source}: the shapes give no valid FLUX config ({e}); pass config="
        ) from None
    if config_json:
        _check_config_json(config, config_json, source)
    return config


def _check_config_json(config: FluxConfig, cj: dict, source: str) -> None:
    stated = {
        "in_channels": config.in_channels,
        "out_channels": config.out_channels,
        "num_layers": config.depth,
        "num_single_layers": config.depth_single_blocks,
        "attention_head_dim": config.head_dim,
        "num_attention_heads": config.num_heads,
        "joint_attention_dim": config.context_in_dim,
        "pooled_projection_dim": config.vec_in_dim,
        "guidance_embeds": config.guidance_embed,
    }
    wrong = [
        f"{k}={cj[k]!r} (weights: {v!r})" for k, v in stated.items() if cj.get(k) is not None and cj[k] != v
    ]
    if wrong:
        raise WeightsError(f"{source}: config.json disagrees with the weights: {', '.join(wrong)}")


def detect_variant(config: FluxConfig, hints: str = "") -> tuple[str, str]:
    """(PRESETS name or "custom", a note on how it was decided). Shapes decide up to the groups
    that share them (dev/Krea/Kontext; Canny/Depth); words in `hints` (file and folder names,
    config.json, metadata) pick within a group."""
    kind = (
        "fill-type (inpainting)"
        if config.in_channels == 384
        else "control-type (Canny/Depth)"
        if config.in_channels == 128
        else "dev-type (guidance-distilled)"
        if config.guidance_embed
        else "schnell-type (timestep-distilled)"
    )
    matches = [name for name, cfg in PRESETS.items() if cfg == config]
    if not matches:
        return "custom", f"no preset has these sizes; {kind}, inferred from tensor shapes"
    words = [w for w in _VARIANT_WORDS if re.search(rf"(?<![a-z]){w}(?![a-z])", hints)]
    named = [m for m in matches if any(w in m.split("-") for w in words)]
    contradicting = [w for w in words if not any(w in m.split("-") for m in matches)]
    note = ""
    if contradicting:
        note = f"; the name mentions {', '.join(contradicting)} but the shapes say {kind}"
    if len(named) == 1:
        return named[0], f"{kind}; {named[0]} by name among same-shape {', '.join(matches)}{note}" if len(
            matches
        ) > 1 else f"{kind}, from shapes{note}"
    if len(matches) == 1:
        return matches[0], f"{kind}, from shapes{note}"
    return matches[0], (
        f"{kind}; {', '.join(matches)} have identical shapes and no file/folder name or config told them apart{note}"
    )


def variant_hints(
    source: Path, resolved: Path, files: list[Path], config_json: dict | None, metadata: Mapping[str, str]
) -> str:
    """Lower-case text in which variant names may appear: the path given and the one it resolved
    to (last four parts each), the weight file names, config.json's _name_or_path, and safetensors
    metadata (except fluxcore's own config, which holds no names)."""
    parts = list(source.resolve().parts[-4:]) + list(resolved.resolve().parts[-4:])
    parts += [p.name for p in files]
    if config_json:
        parts.append(str(config_json.get("_name_or_path", "")))
    parts += [v for k, v in metadata.items() if k != CONFIG_METADATA_KEY and len(v) < 500]
    return " ".join(parts).lower()


def diffusers_config(config: FluxConfig) -> dict:
    """config.json for diffusers' FluxTransformer2DModel: its field names for the same sizes;
    theta, mlp_ratio and qkv_bias are fixed there, so configs that change them are refused."""
    unsupported = {
        "mlp_ratio": (config.mlp_ratio, 4.0),
        "theta": (config.theta, 10_000),
        "qkv_bias": (config.qkv_bias, True),
    }
    bad = [f"{k}={v!r} (diffusers fixes {fixed!r})" for k, (v, fixed) in unsupported.items() if v != fixed]
    if bad:
        raise ConfigError(
            f"diffusers' FluxTransformer2DModel cannot represent {', '.join(bad)}; save with format='bfl'"
        )
    return {
        "_class_name": "FluxTransformer2DModel",
        "_diffusers_version": "0.32.0",
        "patch_size": 1,
        "in_channels": config.in_channels,
        "out_channels": config.out_channels,
        "num_layers": config.depth,
        "num_single_layers": config.depth_single_blocks,
        "attention_head_dim": config.head_dim,
        "num_attention_heads": config.num_heads,
        "joint_attention_dim": config.context_in_dim,
        "pooled_projection_dim": config.vec_in_dim,
        "guidance_embeds": config.guidance_embed,
        "axes_dims_rope": list(config.axes_dim),
    }
