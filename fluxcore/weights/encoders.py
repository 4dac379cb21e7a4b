"""Loading (and saving) the text encoders, their tokenizers and the autoencoder from the files that
ship with FLUX:

    text_encoder_2/ (T5, config.json + shard index)   → load_t5
    text_encoder/   (CLIP-L, config.json + model.safetensors) → load_clip
    ae.safetensors (BFL keys) or vae/ (diffusers)     → load_autoencoder
    tokenizer_2/ → load_t5_tokenizer        tokenizer/ → load_clip_tokenizer

Every loader takes the component's own folder or file, or the model's root folder (it then picks
the official sub-folder). The model's size comes from what is on disk — config.json where the
layout has one, else the tensor shapes — so tiny models saved in the official layout load with
the same calls. Models are built on the meta device and filled one tensor at a time
(`fluxcore.weights.io.load_into`): one copy of the weights, ever. Loaded models are in eval mode
with `requires_grad=False` (FLUX keeps all three frozen).

Default dtype: bfloat16 on CUDA, float32 elsewhere (CPU bf16 kernels are slow).
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import torch
from torch import Tensor

from fluxcore.atomic import atomic_folder, atomic_write_json
from fluxcore.autoencoder import AutoEncoder, AutoEncoderConfig
from fluxcore.errors import ConfigError, WeightsError
from fluxcore.text.clip import CLIPTextConfig, CLIPTextEncoder
from fluxcore.text.t5 import T5Config, T5Encoder, keep_wo_in_fp32
from fluxcore.text.tokenizers import CLIPTokenizer, T5Tokenizer
from fluxcore.weights import vae_keys
from fluxcore.weights.errors import ConfigMismatchError
from fluxcore.weights.finite import check_finite
from fluxcore.weights.io import (
    Checkpoint,
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


def _component(source, subfolder: str, what: str) -> Path:
    """The component's folder or file: `source` itself, or `source/subfolder` for a model root."""
    path = Path(source)
    if not path.exists():
        raise CheckpointNotFoundError(f"{what}: no such file or folder: {path}")
    if path.is_dir() and not (path / "config.json").is_file() and (path / subfolder).is_dir():
        return path / subfolder
    return path


def _indices(keys, pattern: str) -> list[int]:
    rx = re.compile(pattern.replace(r"(\d+)", r"(\d{1,6})"))
    return sorted({int(m.group(1)) for k in keys if (m := rx.match(k))})


def _shape(shapes, key: str, what: str, ndim: int, source) -> tuple[int, ...]:
    if key not in shapes:
        raise WeightsError(f"{source}: no tensor {key!r}, so this is not a {what} checkpoint")
    shape = tuple(shapes[key])
    if len(shape) != ndim or not all(shape):
        raise ConfigMismatchError(
            f"{source}: {key!r} has shape {list(shape)}; a {what} has {ndim} non-zero dims"
        )
    return shape


def _need(ckpt: Checkpoint, key: str, what: str, ndim: int = 2) -> tuple[int, ...]:
    return _shape({key: ckpt.shape(key)} if key in ckpt else {}, key, what, ndim, ckpt.source)


def _finish(model):
    model.eval()
    model.requires_grad_(False)
    return model


def _agree(stated, shapes, fields, source: str, what: str) -> None:
    """Every field in `fields` of the config `stated` (read from a file, or given) must equal
    the one the tensor shapes give; checked before the model is built, so a config.json that
    contradicts the weights (or states absurd sizes) fails here, naming each disagreement."""
    wrong = [
        f"{f}={getattr(stated, f)!r} (tensors: {getattr(shapes, f)!r})"
        for f in fields
        if getattr(stated, f) != getattr(shapes, f)
    ]
    if wrong:
        raise ConfigMismatchError(
            f"{source}: the {what} config disagrees with the tensors: {', '.join(wrong)}"
        )


def _from_file(build, data, path: Path):
    """`build(data)` for a config read from `path`; any bad value becomes a ConfigMismatchError
    naming the file."""
    try:
        return build(data)
    except (ConfigError, TypeError, ValueError, KeyError, IndexError, AttributeError, OverflowError) as e:
        raise ConfigMismatchError(f"{path}: invalid config: {e}") from None


# ---------------------------------------------------------------------------------------------
# T5


def infer_t5_config(ckpt: Checkpoint) -> T5Config:
    """T5Config from tensor shapes (relative_attention_max_distance and eps take T5's defaults)."""
    emb = "shared.weight" if "shared.weight" in ckpt else "encoder.embed_tokens.weight"
    vocab, d_model = _need(ckpt, emb, "T5 encoder")
    layers = _indices(ckpt.keys(), r"^encoder\.block\.(\d+)\.")
    buckets, heads = _need(
        ckpt, "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight", "T5 encoder"
    )
    inner = _need(ckpt, "encoder.block.0.layer.0.SelfAttention.q.weight", "T5 encoder")[0]
    d_ff = _need(ckpt, "encoder.block.0.layer.1.DenseReluDense.wi_0.weight", "T5 v1.1 (gated) encoder")[0]
    if inner % heads:
        raise ConfigMismatchError(
            f"{ckpt.source}: inner width {inner} is not a multiple of the {heads} heads"
        )
    fields = dict(
        vocab_size=vocab,
        d_model=d_model,
        d_kv=inner // heads,
        d_ff=d_ff,
        num_layers=len(layers),
        num_heads=heads,
        relative_attention_num_buckets=buckets,
    )
    return _from_file(lambda f: T5Config(**f), fields, ckpt.source)


# The config fields the tensor shapes determine: a config.json must agree with them.
_T5_SHAPE_FIELDS = (
    "vocab_size",
    "d_model",
    "inner_dim",
    "d_ff",
    "num_layers",
    "num_heads",
    "relative_attention_num_buckets",
)


def _t5_tensors(ckpt: Checkpoint, cast) -> Iterator[tuple[str, Tensor]]:
    """The checkpoint's tensors under T5Encoder's names: the tied embedding may be stored as
    `shared.weight`, as `encoder.embed_tokens.weight`, or as both (then `shared` is used)."""
    has_shared = "shared.weight" in ckpt
    for key, t in ckpt.stream():
        if key == "encoder.embed_tokens.weight":
            if has_shared:
                continue
            key = "shared.weight"
        yield key, cast(key, t)


def load_t5(
    source, *, config: T5Config | None = None, device=None, dtype: torch.dtype | None = None
) -> T5Encoder:
    """T5 encoder from `text_encoder_2/` (config.json + model.safetensors or a shard index), a
    model root holding it, or a .safetensors file (config from `config=` or the tensor shapes).

    dtype: float32 / bfloat16 as asked (default bf16 on CUDA, fp32 otherwise). float16 follows
    transformers: the `wo` projections stay float32 (fp16 overflows there); see T5Encoder.
    Returns an eval-mode, frozen T5Encoder on `device` (default CPU).
    """
    path = _component(source, "text_encoder_2", "load_t5")
    folder = path if path.is_dir() else path.parent
    dtype = default_dtype(device) if dtype is None else dtype
    with open_checkpoint(path) as ckpt:
        shaped = infer_t5_config(ckpt)
        if config is None:
            hf = read_json(folder / "config.json", missing_ok=True)
            config = _from_file(T5Config.from_hf_dict, hf, folder / "config.json") if hf else shaped
        _agree(config, shaped, _T5_SHAPE_FIELDS, ckpt.source, "T5")
        with torch.device("meta"):
            model = T5Encoder(config)
        if dtype == torch.float16:
            keep_wo_in_fp32(model.to(dtype))

            def cast(key, t):
                return t.to(torch.float32 if key.endswith("DenseReluDense.wo.weight") else torch.float16)

            load_into(model, _t5_tensors(ckpt, cast), source=ckpt.source, device=device, dtype=None)
        else:
            load_into(
                model, _t5_tensors(ckpt, lambda k, t: t), source=ckpt.source, device=device, dtype=dtype
            )
    return _finish(model)


# ---------------------------------------------------------------------------------------------
# CLIP

# Saved by older transformers versions as a persistent buffer; it is always arange(77).
_CLIP_IGNORED = ("text_model.embeddings.position_ids",)


def _clip_name(key: str) -> str:
    """transformers >= 5 writes CLIPTextModel keys without the `text_model.` prefix that the
    official files (and this module) use; accept both."""
    return key if key.startswith("text_model.") else "text_model." + key


def infer_clip_config(shapes: dict[str, tuple[int, ...]], source: str = "CLIP") -> CLIPTextConfig:
    """CLIPTextConfig from tensor shapes (keys with the `text_model.` prefix). The head count is
    not in the shapes: CLIP uses 64-wide heads, so num_attention_heads = hidden_size / 64 (12 for
    CLIP-L); pass `config=` for other models. eos_token_id takes the official file's legacy 2."""

    def shape(key):
        return _shape(shapes, key, "CLIP text", 2, source)

    vocab, hidden = shape("text_model.embeddings.token_embedding.weight")
    positions = shape("text_model.embeddings.position_embedding.weight")[0]
    layers = _indices(shapes, r"^text_model\.encoder\.layers\.(\d+)\.")
    inter = shape("text_model.encoder.layers.0.mlp.fc1.weight")[0]
    heads = hidden // 64 if hidden % 64 == 0 else 1
    fields = dict(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=inter,
        num_hidden_layers=len(layers),
        num_attention_heads=heads,
        max_position_embeddings=positions,
    )
    return _from_file(lambda f: CLIPTextConfig(**f), fields, source)


_CLIP_SHAPE_FIELDS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "max_position_embeddings",
)


def load_clip(
    source, *, config: CLIPTextConfig | None = None, device=None, dtype: torch.dtype | None = None
) -> CLIPTextEncoder:
    """CLIP text encoder from `text_encoder/` (config.json + model.safetensors or a shard index), a
    model root holding it, or a .safetensors file (config from `config=` or the tensor shapes).
    Keys may carry the `text_model.` prefix (official files) or not (transformers >= 5).
    Returns an eval-mode, frozen CLIPTextEncoder on `device` in `dtype` (default bf16 on CUDA, else fp32)."""
    path = _component(source, "text_encoder", "load_clip")
    folder = path if path.is_dir() else path.parent
    dtype = default_dtype(device) if dtype is None else dtype
    with open_checkpoint(path) as ckpt:
        shaped = infer_clip_config({_clip_name(k): ckpt.shape(k) for k in ckpt.keys()}, ckpt.source)
        if config is None:
            hf = read_json(folder / "config.json", missing_ok=True)
            config = _from_file(CLIPTextConfig.from_hf_dict, hf, folder / "config.json") if hf else shaped
        _agree(config, shaped, _CLIP_SHAPE_FIELDS, ckpt.source, "CLIP text")
        with torch.device("meta"):
            model = CLIPTextEncoder(config)
        tensors = ((_clip_name(k), t) for k, t in ckpt.stream() if _clip_name(k) not in _CLIP_IGNORED)
        load_into(model, tensors, source=ckpt.source, device=device, dtype=dtype)
    return _finish(model)


# ---------------------------------------------------------------------------------------------
# Autoencoder


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
        return _shape(shapes, key, "FLUX autoencoder", ndim, source)

    ch, in_channels = shape("encoder.conv_in.weight")[:2]
    levels = _indices(shapes, r"^encoder\.down\.(\d+)\.")
    blocks = _indices(shapes, r"^encoder\.down\.0\.block\.(\d+)\.")
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
    fields = _from_file(lambda sh: _ae_shape_fields(sh, source), shapes, source)
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
    return _from_file(lambda f: AutoEncoderConfig(**f), fields, source)


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
            **_from_file(lambda sh: _ae_shape_fields(sh, ckpt.source), shapes, ckpt.source)
        )
        if config is None:
            if diffusers_cfg is not None:
                where = f"{path if path.is_dir() else path.parent}/config.json"
                _check_vae_values(diffusers_cfg, where)
                config = _from_file(AutoEncoderConfig.from_diffusers_dict, diffusers_cfg, where)
            else:
                config = infer_autoencoder_config(shapes, ckpt.metadata, ckpt.source)
        _agree(config, shaped, _AE_SHAPE_FIELDS, ckpt.source, "autoencoder")
        with torch.device("meta"):
            model = AutoEncoder(config)
        tensors = ((names[k], vae_keys.convert_tensor(names[k], t, to="bfl")) for k, t in ckpt.stream())
        load_into(model, tensors, source=ckpt.source, device=device, dtype=dtype)
    return _finish(model)


# ---------------------------------------------------------------------------------------------
# Tokenizers


def load_t5_tokenizer(source, *, max_length: int | None = None) -> T5Tokenizer:
    """T5 tokenizer from `tokenizer_2/` (tokenizer.json, else spiece.model) or a model root holding
    it. `max_length` is the default padded length (else the folder's model_max_length, else 512;
    FLUX schnell uses 256, fill 128)."""
    return T5Tokenizer.from_folder(
        _component(source, "tokenizer_2", "load_t5_tokenizer"), max_length=max_length
    )


def load_clip_tokenizer(source, *, max_length: int | None = None) -> CLIPTokenizer:
    """CLIP tokenizer from `tokenizer/` (vocab.json + merges.txt) or a model root holding it.
    `max_length` default: the folder's model_max_length (77)."""
    path = Path(source)
    if path.is_dir() and not (path / "vocab.json").is_file() and (path / "tokenizer").is_dir():
        path = path / "tokenizer"
    return CLIPTokenizer.from_folder(path, max_length=max_length)


# ---------------------------------------------------------------------------------------------
# Saving in the official layouts (for small models made here, e.g. a demo model folder)


def _weights(model, what: str, path: Path) -> dict[str, Tensor]:
    sd = dict(model.state_dict())
    check_finite(sd.items(), source=str(path), part=f"{what} (refusing to save)")
    return sd


def save_t5(model: T5Encoder, folder) -> Path:
    """Write `folder/config.json` + `folder/model.safetensors` as transformers' T5EncoderModel
    does (the tied embedding once, as `shared.weight`). Returns the folder. Atomic: both files
    are swapped in together (`fluxcore.atomic.atomic_folder`); other files in the folder stay."""
    folder = Path(folder)
    sd = _weights(model, "T5Encoder", folder)
    with atomic_folder(folder, replace=("model*.safetensors*", "config.json")) as tmp:
        write_safetensors(tmp / "model.safetensors", sd, {"format": "pt"})
        atomic_write_json(tmp / "config.json", model.config.to_hf_dict())
    return folder


def save_clip(model: CLIPTextEncoder, folder) -> Path:
    """Write `folder/config.json` + `folder/model.safetensors` as transformers' CLIPTextModel does.
    Atomic like `save_t5`."""
    folder = Path(folder)
    sd = _weights(model, "CLIPTextEncoder", folder)
    with atomic_folder(folder, replace=("model*.safetensors*", "config.json")) as tmp:
        write_safetensors(tmp / "model.safetensors", sd, {"format": "pt"})
        atomic_write_json(tmp / "config.json", model.config.to_hf_dict())
    return folder


def save_autoencoder(model: AutoEncoder, path, *, format: str = "bfl") -> Path:
    """format="bfl": one `ae.safetensors`-style file at `path` (BFL keys; the config is recorded in
    its metadata so `load_autoencoder` rebuilds the same model). format="diffusers": a `vae/`-style
    folder at `path` (config.json + diffusion_pytorch_model.safetensors). Atomic either way."""
    path = Path(path)
    if format not in ("bfl", "diffusers"):
        raise ConfigError(f"format must be 'bfl' or 'diffusers', got {format!r}")
    sd = _weights(model, "AutoEncoder", path)
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
