"""FLUX autoencoder: `load_autoencoder` from `ae.safetensors` (BFL keys) or a diffusers `vae/`
folder (keys converted by `fluxcore.weights.vae_keys`), config from vae/config.json, the file's
metadata or the tensor shapes (with type and bound checks on every stated value), and
`save_autoencoder` in either layout. Shared loader conventions: weights/components.py.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from types import SimpleNamespace

import torch

from fluxcore.atomic import atomic_folder, atomic_write_json
from fluxcore.autoencoder import AutoEncoder, AutoEncoderConfig
from fluxcore.errors import ConfigError, WeightsError
from fluxcore.weights import vae_keys
from fluxcore.weights.components import (
    check_agrees,
    config_from,
    frozen,
    layer_indices,
    shape_of,
    weights_to_save,
)
from fluxcore.weights.errors import ConfigMismatchError
from fluxcore.weights.io import (
    CheckpointNotFoundError,
    default_dtype,
    load_into,
    open_checkpoint,
    read_json,
    write_safetensors,
)

# safetensors metadata key under which `save_autoencoder` records the config (norm_groups and the
# latent scale/shift cannot be read from tensor shapes).
AE_CONFIG_METADATA_KEY = "fluxcore.autoencoder_config"


def _ae_layout(keys) -> str:
    keys = list(keys)
    if any(k.startswith(("encoder.down_blocks.", "decoder.up_blocks.", "encoder.mid_block.")) for k in keys):
        return "diffusers"
    if any(k.startswith(("encoder.down.", "decoder.up.")) for k in keys):
        return "bfl"
    raise WeightsError(
        f"not an autoencoder checkpoint: expected BFL keys (encoder.down.*) or diffusers keys "
        f"(encoder.down_blocks.*); first keys: {keys[:3]}"
    )


def _ae_shape_fields(shapes: dict[str, tuple[int, ...]], source: str) -> dict:
    """The AutoEncoderConfig fields the BFL-named tensor shapes determine."""

    def shape(key, ndim=4):
        return shape_of(shapes, key, "FLUX autoencoder", ndim, source)

    ch, in_channels = shape("encoder.conv_in.weight")[:2]
    levels = layer_indices(shapes, r"^encoder\.down\.(\d+)\.")
    blocks = layer_indices(shapes, r"^encoder\.down\.0\.block\.(\d+)\.")
    return dict(
        in_channels=in_channels,
        ch=ch,
        ch_mult=tuple(shape(f"encoder.down.{i}.block.0.conv1.weight")[0] // ch for i in levels),
        num_res_blocks=len(blocks),
        z_channels=shape("decoder.conv_in.weight")[1],
        out_ch=shape("decoder.conv_out.weight")[0],
    )


def _number(value, *, integer: bool, lo: float, hi: float) -> bool:
    kinds = (int,) if integer else (int, float)
    return not isinstance(value, bool) and isinstance(value, kinds) and lo <= value <= hi


# Bounds on the autoencoder values a config.json or the file metadata may state (FLUX: widths
# 128..512, 4 levels, 2 res blocks, 16 latent channels, 32 groups).
_VAE_INTS = {
    "layers_per_block": 64,
    "in_channels": 1 << 10,
    "out_channels": 1 << 10,
    "latent_channels": 1 << 10,
    "norm_num_groups": 1 << 10,
    "norm_groups": 1 << 10,
    "resolution": 1 << 20,
}


def _check_vae_values(d, where: str) -> None:
    """Types and bounds of the values `d` (a vae/config.json or metadata dict) states."""
    if not isinstance(d, dict):
        raise ConfigMismatchError(f"{where}: expected a JSON object, found {type(d).__name__}")
    bad = [
        f"{k}={d[k]!r}"
        for k, hi in _VAE_INTS.items()
        if k in d and not _number(d[k], integer=True, lo=1, hi=hi)
    ]
    boc = d.get("block_out_channels", [64])
    if not (
        isinstance(boc, list)
        and 1 <= len(boc) <= 16
        and all(_number(c, integer=True, lo=1, hi=1 << 14) for c in boc)
    ):
        bad.append(f"block_out_channels={boc!r:.80}")
    for k in ("scaling_factor", "scale_factor", "shift_factor"):
        if k in d and not _number(d[k], integer=False, lo=-1e6, hi=1e6):
            bad.append(f"{k}={d[k]!r} (must be a finite number)")
    for k in ("scaling_factor", "scale_factor"):
        if d.get(k) == 0:
            bad.append(f"{k}=0")
    size = d.get("sample_size", 256)
    if not (
        _number(size, integer=True, lo=1, hi=1 << 20)
        or (isinstance(size, list) and size and all(_number(x, integer=True, lo=1, hi=1 << 20) for x in size))
    ):
        bad.append(f"sample_size={size!r:.80}")
    if bad:
        raise ConfigMismatchError(
            f"{where}: out-of-range or mistyped autoencoder config values: {', '.join(bad)}"
        )


def infer_autoencoder_config(
    shapes: dict[str, tuple[int, ...]], metadata: dict[str, str] | None = None, source: str = "autoencoder"
) -> AutoEncoderConfig:
    """AutoEncoderConfig from BFL-named tensor shapes. norm_groups, scale_factor and shift_factor
    are not in the shapes: they come from the file metadata that `save_autoencoder` writes, else
    FLUX's values (32 groups, 0.3611, 0.1159); widths that 32 does not divide need `config=`."""
    fields = config_from(lambda sh: _ae_shape_fields(sh, source), shapes, source)
    ch, ch_mult = fields["ch"], fields["ch_mult"]
    saved = (metadata or {}).get(AE_CONFIG_METADATA_KEY)
    if saved is not None:
        try:
            extra = json.loads(saved)
        except (ValueError, RecursionError):
            raise ConfigMismatchError(
                f"{source}: metadata {AE_CONFIG_METADATA_KEY!r} is not JSON: {saved[:80]!r}"
            ) from None
        _check_vae_values(extra, f"{source}: metadata {AE_CONFIG_METADATA_KEY!r}")
        for k in ("norm_groups", "scale_factor", "shift_factor", "resolution"):
            if k in extra:
                fields[k] = extra[k]
    elif any(c % 32 for c in (ch * m for m in ch_mult)):
        raise ConfigError(
            f"{source}: level widths {[ch * m for m in ch_mult]} are not all divisible by FLUX's 32 GroupNorm "
            "groups and the file does not record norm_groups; pass config=AutoEncoderConfig(..., norm_groups=N)"
        )
    return config_from(lambda f: AutoEncoderConfig(**f), fields, source)


_AE_SHAPE_FIELDS = ("in_channels", "ch", "ch_mult", "num_res_blocks", "z_channels", "out_ch")


def _ae_source(source) -> tuple[Path, dict | None]:
    """(weights path, diffusers config dict or None) for a root folder, vae/ folder or file."""
    path = Path(source)
    if not path.exists():
        raise CheckpointNotFoundError(f"load_autoencoder: no such file or folder: {path}")
    if path.is_file():
        sibling = read_json(path.parent / "config.json", missing_ok=True)
        return path, sibling if sibling and sibling.get("_class_name") == "AutoencoderKL" else None
    if (path / "ae.safetensors").is_file():
        return path / "ae.safetensors", None
    if not (path / "config.json").is_file() and (path / "vae").is_dir():
        path = path / "vae"
    cfg = read_json(path / "config.json", missing_ok=True) or None
    if cfg and cfg.get("_class_name", "AutoencoderKL") != "AutoencoderKL":
        raise WeightsError(
            f"{path / 'config.json'} describes a {cfg.get('_class_name')}, not an AutoencoderKL"
        )
    return path, cfg


def load_autoencoder(
    source, *, config: AutoEncoderConfig | None = None, device=None, dtype: torch.dtype | None = None
) -> AutoEncoder:
    """FLUX autoencoder from `ae.safetensors` (BFL keys), a diffusers `vae/` folder (config.json +
    diffusion_pytorch_model.safetensors, converted by `fluxcore.weights.vae_keys`), a model root
    holding either (ae.safetensors preferred), or any .safetensors file in either layout.

    Config: `config=` if given, else vae/config.json (diffusers layout), else the tensor shapes
    (see `infer_autoencoder_config`). Returns an eval-mode, frozen AutoEncoder on `device` in
    `dtype` (default bf16 on CUDA, else fp32).
    """
    path, diffusers_cfg = _ae_source(source)
    dtype = default_dtype(device) if dtype is None else dtype
    with open_checkpoint(path) as ckpt:
        layout = _ae_layout(ckpt.keys())
        if layout == "diffusers":
            levels = vae_keys.num_levels(ckpt.keys())
            try:
                names = {k: vae_keys.diffusers_to_bfl_key(k, levels) for k in ckpt.keys()}
            except KeyError as e:
                raise WeightsError(
                    f"{ckpt.source}: {e.args[0]} (the FLUX autoencoder has no such tensor)"
                ) from None
        else:
            names = {k: k for k in ckpt.keys()}
        shapes = {names[k]: ckpt.shape(k) for k in ckpt.keys()}
        shaped = SimpleNamespace(
            **config_from(lambda sh: _ae_shape_fields(sh, ckpt.source), shapes, ckpt.source)
        )
        if config is None:
            if diffusers_cfg is not None:
                where = f"{path if path.is_dir() else path.parent}/config.json"
                _check_vae_values(diffusers_cfg, where)
                config = config_from(AutoEncoderConfig.from_diffusers_dict, diffusers_cfg, where)
            else:
                config = infer_autoencoder_config(shapes, ckpt.metadata, ckpt.source)
        check_agrees(config, shaped, _AE_SHAPE_FIELDS, ckpt.source, "autoencoder")
        with torch.device("meta"):
            model = AutoEncoder(config)
        tensors = ((names[k], vae_keys.convert_tensor(names[k], t, to="bfl")) for k, t in ckpt.stream())
        load_into(model, tensors, source=ckpt.source, device=device, dtype=dtype)
    return frozen(model)


def save_autoencoder(model: AutoEncoder, path, *, format: str = "bfl") -> Path:
    """format="bfl": one `ae.safetensors`-style file at `path` (BFL keys; the config is recorded in
    its metadata so `load_autoencoder` rebuilds the same model). format="diffusers": a `vae/`-style
    folder at `path` (config.json + diffusion_pytorch_model.safetensors). Atomic either way."""
    path = Path(path)
    if format not in ("bfl", "diffusers"):
        raise ConfigError(f"format must be 'bfl' or 'diffusers', got {format!r}")
    sd = weights_to_save(model, "AutoEncoder", path)
    if format == "bfl":
        meta = {AE_CONFIG_METADATA_KEY: json.dumps(dataclasses.asdict(model.config)), "format": "pt"}
        path.parent.mkdir(parents=True, exist_ok=True)
        write_safetensors(path, sd, meta)
    else:
        with atomic_folder(path, replace=("diffusion_pytorch_model*.safetensors*", "config.json")) as tmp:
            write_safetensors(
                tmp / "diffusion_pytorch_model.safetensors", vae_keys.bfl_to_diffusers(sd), {"format": "pt"}
            )
            atomic_write_json(tmp / "config.json", model.config.to_diffusers_dict())
    return path
