"""FLUX transformer checkpoints: find them, tell what they are from headers alone, load them
straight into a `Flux` built on the meta device, and save them in the BFL or diffusers layout.

Accepted sources (FLUX_SPEC §7):
  - a BFL single file (`flux1-dev.safetensors`), keys optionally under a prefix such as
    `model.diffusion_model.` (community and all-in-one files; other keys in such files are ignored);
  - a diffusers transformer folder: `config.json` plus `diffusion_pytorch_model.safetensors`, or shards
    with `diffusion_pytorch_model.safetensors.index.json`;
  - a Hugging Face snapshot root holding `transformer/`, or any folder holding exactly one
    FLUX transformer file.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import re
from collections import defaultdict
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from fluxcore.config import PRESETS, FluxConfig, get_config
from fluxcore.errors import ConfigError, WeightsError
from fluxcore.model import Flux
from fluxcore.weights.flux_keys import bfl_to_diffusers, diffusers_key_to_bfl, diffusers_to_bfl, fused_pieces
from fluxcore.weights.io import (
    FLOAT8_DTYPES,
    TORCH_TO_SAFETENSORS,
    Checkpoint,
    CheckpointNotFoundError,
    KeyMismatchError,
    ShapeMismatchError,
    UnknownVariantError,
    UnsupportedDtypeError,
    load_into,
    open_checkpoint,
)

DIFFUSERS_WEIGHTS = "diffusion_pytorch_model.safetensors"
DIFFUSERS_INDEX = "diffusion_pytorch_model.safetensors.index.json"
CONFIG_METADATA_KEY = "fluxcore_config"  # FluxConfig as JSON in files written by save_flux(format="bfl")
# Marker keys: the BFL layout fuses q/k/v, diffusers keeps them apart.
_BFL_MARK, _DIFF_MARK = "img_in.weight", "x_embedder.weight"
_BFL_TAIL = (
    "final_layer.linear.weight",
    "double_blocks.0.img_attn.qkv.weight",
    "single_blocks.0.linear1.weight",
)
_DIFF_TAIL = (
    "proj_out.weight",
    "transformer_blocks.0.attn.to_q.weight",
    "single_transformer_blocks.0.attn.to_q.weight",
)
# Words in file/folder names that tell apart variants whose shapes are identical.
_VARIANT_WORDS = ("schnell", "krea", "kontext", "fill", "canny", "depth")


@dataclass
class FluxCheckpoint:
    """What a FLUX transformer checkpoint holds, read from its headers (no tensor data).

    layout:   "bfl" or "diffusers"; prefix: the key prefix of the transformer ("" for none).
    keys:     the checkpoint's own keys that belong to the transformer.
    shapes:   BFL key → shape, whatever the stored layout.
    config:   the FluxConfig the weights fit (inferred from shapes, config.json or metadata,
              unless one was given).
    variant:  a PRESETS name when the config matches one, else "custom"; variant_note says how sure
              (dev, Krea and Kontext have identical shapes, as do Canny and Depth).
    """

    source: Path
    checkpoint: Checkpoint
    layout: str
    prefix: str
    keys: list[str]
    shapes: dict[str, tuple[int, ...]]
    config: FluxConfig
    variant: str
    variant_note: str
    config_json: dict | None = None
    other_keys: list[str] = field(default_factory=list)

    @property
    def num_params(self) -> int:
        return sum(math.prod(s) for s in self.shapes.values())

    @property
    def nbytes(self) -> int:
        return sum(self.checkpoint.nbytes(k) for k in self.keys)

    def dtype_counts(self) -> dict[torch.dtype, int]:
        """Stored dtype → number of elements, over the transformer's tensors."""
        counts: dict[torch.dtype, int] = defaultdict(int)
        for k in self.keys:
            counts[self.checkpoint.dtype(k)] += math.prod(self.checkpoint.shape(k))
        return dict(counts)

    def default_dtype(self) -> torch.dtype:
        """The dtype `load_flux` gives the model when none is asked for: the floating dtype holding
        most elements; float8 files load as bfloat16 (float8 matmuls need special kernels)."""
        floats = {d: n for d, n in self.dtype_counts().items() if d.is_floating_point}
        if not floats:
            raise UnsupportedDtypeError(f"{self.source}: no floating-point tensors in the transformer")
        dtype = max(floats, key=floats.get)
        return torch.bfloat16 if dtype in FLOAT8_DTYPES else dtype


# --- finding and classifying --------------------------------------------------------------------


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as e:
        raise WeightsError(f"cannot read {path}: {e}") from None
    if not isinstance(data, dict):
        raise WeightsError(f"{path}: expected a JSON object, found {type(data).__name__}")
    return data


def _find_prefix(keys, mark: str, tails: tuple[str, ...]) -> str | None:
    for k in keys:
        if k.endswith(mark):
            prefix = k[: -len(mark)]
            if not prefix or prefix.endswith("."):
                if any(prefix + t in keys for t in tails):
                    return prefix
    return None


def what_is(keys) -> str:
    """A guess, from key names only, at what a non-FLUX-transformer checkpoint holds."""
    ks = list(keys)
    joined = "\n".join(ks[:2000])
    guesses = [
        (r"^(first_stage_model\.|vae\.)?(encoder|decoder)\.conv_in\.", "an autoencoder (VAE)"),
        (r"^(encoder|decoder)\.(down|up)_blocks\.", "a diffusers autoencoder (VAE)"),
        (r"(^|\.)encoder\.block\.0\.layer\.0\.SelfAttention\.", "a T5 encoder"),
        (r"(^|\.)text_model\.encoder\.layers\.", "a CLIP text encoder"),
        (r"lora_(A|B|up|down)|\.lora\.", "a LoRA (apply it to a base model; it is not a model by itself)"),
        (r"redux_(up|down)", "a Redux image projector"),
        (r"(^|\.)input_blocks\.\d+\.", "a Stable Diffusion UNet"),
        (r"(^|\.)joint_blocks\.\d+\.", "a Stable Diffusion 3 MMDiT"),
    ]
    for pattern, what in guesses:
        if re.search(pattern, joined, flags=re.MULTILINE):
            return what
    return "something other than a FLUX.1 transformer"


def _not_flux(source, keys) -> UnknownVariantError:
    sample = ", ".join(repr(k) for k in list(keys)[:3])
    return UnknownVariantError(
        f"{source} is not a FLUX.1 transformer checkpoint: it holds {len(keys)} tensors (e.g. {sample}); it "
        f"looks like {what_is(keys)}. Expected BFL keys ('img_in.weight', 'double_blocks.0....') or "
        "diffusers keys ('x_embedder.weight', 'transformer_blocks.0....')"
    )


def _looks_like_flux(path: Path) -> bool:
    try:
        with open_checkpoint(path) as ck:
            keys = set(ck.keys())
    except WeightsError:
        return False
    return _find_prefix(keys, _BFL_MARK, _BFL_TAIL) is not None or (
        _find_prefix(keys, _DIFF_MARK, _DIFF_TAIL) is not None
    )


def _resolve(path: Path) -> tuple[Path, dict | None]:
    """The file or folder holding the transformer weights, and its diffusers config.json if any."""
    if not path.exists():
        raise CheckpointNotFoundError(f"no such file or folder: {path}")
    if path.is_file():
        if path.name == "config.json":
            return _resolve(path.parent)
        return path, None
    if (path / DIFFUSERS_INDEX).is_file() or (path / DIFFUSERS_WEIGHTS).is_file():
        cfg = path / "config.json"
        return path, _read_json(cfg) if cfg.is_file() else None
    if (path / "transformer").is_dir():
        return _resolve(path / "transformer")
    if list(path.glob("*.safetensors.index.json")):
        cfg = path / "config.json"
        return path, _read_json(cfg) if cfg.is_file() else None
    files = sorted(path.glob("*.safetensors"))
    if len(files) == 1:
        return files[0], None
    flux_files = [f for f in files if _looks_like_flux(f)]
    if len(flux_files) == 1:
        return flux_files[0], None
    if not flux_files:
        raise CheckpointNotFoundError(
            f"{path} holds no FLUX transformer: no transformer/ folder, no {DIFFUSERS_WEIGHTS} or index, and "
            f"none of its .safetensors files {[f.name for f in files[:5]]} has FLUX transformer keys"
        )
    raise WeightsError(
        f"{path} holds {len(flux_files)} FLUX transformer files {[f.name for f in flux_files[:5]]}; pass the one you mean"
    )


def _hints(source: Path, resolved: Path, checkpoint: Checkpoint, config_json: dict | None) -> str:
    """Lower-case text in which variant names may appear: paths, config.json's _name_or_path,
    safetensors metadata."""
    parts = list(source.resolve().parts[-4:]) + list(resolved.resolve().parts[-4:])
    parts += [p.name for p in checkpoint.files]
    if config_json:
        parts.append(str(config_json.get("_name_or_path", "")))
    parts += [v for k, v in checkpoint.metadata.items() if k != CONFIG_METADATA_KEY and len(v) < 500]
    return " ".join(parts).lower()


def _bfl_shapes(
    checkpoint: Checkpoint, layout: str, prefix: str, keys: list[str]
) -> dict[str, tuple[int, ...]]:
    """BFL key → shape from header shapes alone (pure bookkeeping: no tensor, not even on meta,
    whose Python kernels would cost an import of ~150 MB and a second)."""
    n = len(prefix)
    if layout == "bfl":
        return {k[n:]: checkpoint.shape(k) for k in keys}
    shapes: dict[str, tuple[int, ...]] = {}
    pieces: dict[str, dict[str, tuple[int, ...]]] = defaultdict(dict)
    for k in keys:
        try:
            bfl_key, piece = diffusers_key_to_bfl(k[n:])
        except KeyError as e:
            raise KeyMismatchError(f"{checkpoint.source}: {e.args[0]}") from None
        if piece is None:
            shapes[bfl_key] = checkpoint.shape(k)
        else:
            pieces[bfl_key][piece] = checkpoint.shape(k)
    for bfl_key, parts in pieces.items():
        order = fused_pieces(bfl_key)
        missing = [p for p in order if p not in parts]
        if missing:
            raise KeyMismatchError(
                f"{checkpoint.source}: cannot rebuild {bfl_key!r}: pieces {missing} are missing"
            )
        first = parts[order[0]]
        if any(len(parts[p]) < 1 or parts[p][1:] != first[1:] for p in order) or not first:
            found = {p: list(parts[p]) for p in order}
            raise KeyMismatchError(
                f"{checkpoint.source}: the pieces of {bfl_key!r} do not fit together: {found}"
            )
        shapes[bfl_key] = (sum(parts[p][0] for p in order), *first[1:])
    return shapes


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
            theta=theta if type(theta) is int else 10_000,
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


def inspect_flux(source, *, config: FluxConfig | str | None = None) -> FluxCheckpoint:
    """Open `source` and tell what it holds, from headers only (fast for 24 GB files). The
    returned FluxCheckpoint keeps the files open; close it with `.checkpoint.close()`."""
    source = Path(source)
    resolved, config_json = _resolve(source)
    checkpoint = open_checkpoint(resolved)
    try:
        all_keys = checkpoint.keys()
        bfl = _find_prefix(all_keys, _BFL_MARK, _BFL_TAIL)
        diff = _find_prefix(all_keys, _DIFF_MARK, _DIFF_TAIL) if bfl is None else None
        if bfl is None and diff is None:
            raise _not_flux(checkpoint.source, all_keys)
        layout, prefix = ("bfl", bfl) if bfl is not None else ("diffusers", diff)
        keys = [k for k in all_keys if k.startswith(prefix)]
        other = [k for k in all_keys if not k.startswith(prefix)]
        shapes = _bfl_shapes(checkpoint, layout, prefix, keys)
        if config is None:
            cfg = infer_config(
                shapes, config_json=config_json, metadata=checkpoint.metadata, source=checkpoint.source
            )
        else:
            cfg = get_config(config) if isinstance(config, str) else config
        variant, note = detect_variant(cfg, _hints(source, resolved, checkpoint, config_json))
        if config is not None:
            note = f"config given by the caller; {note}"
        return FluxCheckpoint(
            source=source,
            checkpoint=checkpoint,
            layout=layout,
            prefix=prefix,
            keys=keys,
            shapes=shapes,
            config=cfg,
            variant=variant,
            variant_note=note,
            config_json=config_json,
            other_keys=other,
        )
    except BaseException:
        checkpoint.close()
        raise


# --- loading --------------------------------------------------------------------------------------


def _key_hint(unexpected: list[str]) -> str:
    if any(k.endswith(("scale_weight", "scale_input")) or k == "scaled_fp8" for k in unexpected):
        return " (a 'scaled fp8' file: per-tensor scales are not supported; use a plain bf16 or fp8 file)"
    if any("lora" in k for k in unexpected):
        return " (LoRA weights merged into the file? load the base model and the LoRA separately)"
    return ""


def _check_keys(fc: FluxCheckpoint, model: nn.Module) -> None:
    """Keys and shapes against the model, from headers only, before any tensor is read."""
    sd = model.state_dict()
    expected = set(sd)
    have = set(fc.shapes)
    unexpected = sorted(have - expected)
    missing = sorted(expected - have)
    cls = type(model).__name__
    if unexpected:
        names = ", ".join(repr(k) for k in unexpected[:5])
        raise KeyMismatchError(
            f"{fc.checkpoint.source}: {len(unexpected)} unexpected key(s) for {cls} ({fc.variant}): {names}"
            f"{' …' if len(unexpected) > 5 else ''}{_key_hint(unexpected)}"
        )
    if missing:
        names = ", ".join(repr(k) for k in missing[:5])
        raise KeyMismatchError(
            f"{fc.checkpoint.source}: {len(missing)} key(s) missing for {cls} ({fc.variant}): {names}"
            f"{' …' if len(missing) > 5 else ''} (an incomplete or pruned file, or the wrong config=?)"
        )
    for k, t in sd.items():
        if tuple(fc.shapes[k]) != tuple(t.shape):
            where = " (BFL name; stored in diffusers layout)" if fc.layout == "diffusers" else ""
            raise ShapeMismatchError(
                f"{fc.checkpoint.source}: {k!r}{where} has shape {list(fc.shapes[k])}, but {cls} expects "
                f"{list(t.shape)} (wrong variant or config?)"
            )


class _Reader:
    """Reads checkpoint tensors for `load_flux`. A tensor that `load_into` will cast or move anyway
    goes into one reused host buffer (pinned for CUDA) instead of fresh memory: no allocator churn
    when float8 is upcast, and a CUDA load holds one tensor in host memory. Tensors kept as they
    are get fresh memory of their own."""

    def __init__(self, checkpoint: Checkpoint, device, dtype: torch.dtype):
        self.ck = checkpoint
        device = torch.device(device) if device is not None else torch.device("cpu")
        self.move = device.type != "cpu"
        self.pin = device.type == "cuda" and torch.cuda.is_available()
        self.dtype = dtype
        self.buf = torch.empty(0, dtype=torch.uint8)

    def _copied(self, stored: torch.dtype) -> bool:
        return self.move or (stored.is_floating_point and stored != self.dtype)

    def empty(self, shape: tuple[int, ...], dtype: torch.dtype) -> Tensor:
        """Room for one tensor: a view of the staging buffer if it will be copied, else fresh."""
        if not self._copied(dtype):
            return torch.empty(shape, dtype=dtype)
        n = math.prod(shape) * dtype.itemsize
        if self.buf.numel() < n:
            self.buf = torch.empty(0, dtype=torch.uint8)  # free the old buffer before growing
            self.buf = torch.empty(n, dtype=torch.uint8, pin_memory=self.pin)
        return self.buf[:n].view(dtype).view(shape)

    def read(self, key: str) -> Tensor:
        return self.ck.read(key, self.empty(self.ck.shape(key), self.ck.dtype(key)))


def _stream_bfl(fc: FluxCheckpoint, reader: _Reader) -> Iterator[tuple[str, Tensor]]:
    n = len(fc.prefix)
    for key in sorted(
        fc.keys, key=lambda k: (fc.checkpoint.files.index(fc.checkpoint.file_of(k)), fc.checkpoint.offset(k))
    ):
        yield key[n:], reader.read(key)


def _stream_diffusers(fc: FluxCheckpoint, reader: _Reader) -> Iterator[tuple[str, Tensor]]:
    """BFL (key, tensor) pairs built from diffusers tensors: the pieces of one fused tensor are
    read straight into its row blocks; groups go out in file order, one at a time."""
    ck, n = fc.checkpoint, len(fc.prefix)
    groups: dict[str, list[str]] = defaultdict(list)
    for k in fc.keys:
        groups[diffusers_key_to_bfl(k[n:])[0]].append(k)
    files = {p: i for i, p in enumerate(ck.files)}

    def position(members: list[str]) -> tuple[int, int]:
        return min((files[ck.file_of(k)], ck.offset(k)) for k in members)

    for bfl_key in sorted(groups, key=lambda b: position(groups[b])):
        members = groups[bfl_key]
        fused = _read_fused(ck, reader, bfl_key, {diffusers_key_to_bfl(k[n:])[1]: k for k in members})
        if fused is not None:
            yield bfl_key, fused
            continue
        # Renames (and the final adaLN, whose halves are swapped into a new tensor); pieces that
        # did not line up get fresh memory each, and the key map reports them.
        read = reader.read if len(members) == 1 else ck.read
        parts = {k[n:]: read(k) for k in members}
        if len({t.dtype for t in parts.values()}) > 1:
            # e.g. a quantiser left to_v in bf16 beside float8 to_q/to_k: torch.cat cannot promote
            # float8, so bring every piece to the widest non-float8 dtype first (load_into casts on).
            wide = [t.dtype for t in parts.values() if t.dtype not in FLOAT8_DTYPES] or [torch.bfloat16]
            target = functools.reduce(torch.promote_types, wide)
            parts = {k: t.to(target) for k, t in parts.items()}
        ((key, t),) = diffusers_to_bfl(parts).items()
        yield key, t


def _read_fused(
    ck: Checkpoint, reader: _Reader, bfl_key: str, pieces: dict[str | None, str]
) -> Tensor | None:
    """A fused BFL tensor (qkv, linear1) read piece by piece straight into its row blocks, with
    no temporary; None when `bfl_key` is not fused or the pieces do not line up (then the generic
    path concatenates them or reports the mismatch)."""
    order = fused_pieces(bfl_key)
    if not order or set(pieces) != set(order):
        return None
    keys = [pieces[p] for p in order]
    shapes = [ck.shape(k) for k in keys]
    dtypes = {ck.dtype(k) for k in keys}
    if len(dtypes) != 1 or any(len(s) < 1 or s[1:] != shapes[0][1:] for s in shapes):
        return None
    out = reader.empty((sum(s[0] for s in shapes), *shapes[0][1:]), dtypes.pop())
    row = 0
    for k, s in zip(keys, shapes):
        ck.read(k, out[row : row + s[0]])
        row += s[0]
    return out


def load_flux(source, *, config: FluxConfig | str | None = None, device=None, dtype=None) -> Flux:
    """Load a FLUX.1 transformer from a BFL file, a diffusers folder or a snapshot root.

    config: a FluxConfig or PRESETS name; default: inferred from the tensor shapes (and config.json).
    device: where the weights go (default CPU); tensors are streamed one at a time straight there.
    dtype:  weight dtype; default: the checkpoint's (float8 files load as bfloat16, every float8
            tensor is upcast as it loads).
    Returns a `Flux` in eval mode with `.variant` and `.source` set. Raises WeightsError (see
    fluxcore.weights) and never returns a partially loaded model.
    """
    fc = inspect_flux(source, config=config)
    with fc.checkpoint:
        dtype = fc.default_dtype() if dtype is None else dtype
        with torch.device("meta"):
            model = Flux(fc.config)
        _check_keys(fc, model)
        reader = _Reader(fc.checkpoint, device, dtype)
        stream = (_stream_bfl if fc.layout == "bfl" else _stream_diffusers)(fc, reader)
        # copy=False: a tensor needing no cast or move is fresh memory nobody else holds, so it
        # becomes the parameter as it is; the others (staging views) are cast/moved by load_into
        # before the next one is read.
        load_into(model, stream, source=fc.checkpoint.source, device=device, dtype=dtype, copy=False)
    model.variant = fc.variant
    model.source = str(source)
    return model.eval()


# --- saving ---------------------------------------------------------------------------------------


def _parse_size(size) -> int:
    if isinstance(size, int) and not isinstance(size, bool) and size > 0:
        return size
    if isinstance(size, str):
        m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]i?B|B)?\s*", size, flags=re.IGNORECASE)
        if m:
            unit = (m.group(2) or "B").upper()
            scale = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}
            value = int(float(m.group(1)) * scale[unit])
            if value > 0:
                return value
    raise ConfigError(f"max_shard_size must be a positive byte count or a string like '10GB', got {size!r}")


def write_safetensors(path, tensors: Mapping[str, Tensor], metadata: Mapping[str, str] | None = None) -> int:
    """Write `tensors` as one safetensors file, streaming tensor by tensor (never a second copy of
    the whole set in memory; CUDA tensors come to the host one at a time). The file appears under
    its name only when complete. Returns the number of bytes written."""
    path = Path(path)
    entries: dict[str, dict] = {}
    offset = 0
    for key, t in tensors.items():
        if t.dtype not in TORCH_TO_SAFETENSORS:
            raise UnsupportedDtypeError(f"cannot save {key!r}: safetensors has no dtype {t.dtype}")
        nbytes = t.numel() * t.element_size()
        entries[key] = {
            "dtype": TORCH_TO_SAFETENSORS[t.dtype],
            "shape": list(t.shape),
            "data_offsets": [offset, offset + nbytes],
        }
        offset += nbytes
    head = {"__metadata__": dict(metadata)} if metadata else {}
    raw = json.dumps({**head, **entries}, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)  # data starts 8-byte aligned, so every tensor can be viewed in place
    tmp = path.with_name(path.name + ".partial")
    try:
        with open(tmp, "wb") as f:
            f.write(len(raw).to_bytes(8, "little"))
            f.write(raw)
            for t in tensors.values():
                if t.numel():
                    t = t.detach().to("cpu").contiguous().reshape(-1)
                    f.write(t.view(torch.uint8).numpy().data)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return 8 + len(raw) + offset


def diffusers_config(config: FluxConfig) -> dict:
    """config.json for diffusers' FluxTransformer2DModel (FLUX_SPEC §1.3)."""
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


def _shards(tensors: Mapping[str, Tensor], limit: int) -> list[list[str]]:
    shards: list[list[str]] = [[]]
    size = 0
    for key, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > limit:
            shards.append([])
            size = 0
        shards[-1].append(key)
        size += nbytes
    return shards


def save_flux(model: Flux, path, format: str = "bfl", *, max_shard_size: int | str = "10GB") -> Path:
    """Save a Flux model's weights where the official tools read them.

    format="bfl":       one .safetensors file at `path` with the BFL keys (what BFL's code, ComfyUI
                        and `load_flux` read); the FluxConfig is kept in the file's metadata.
    format="diffusers": a folder at `path` with config.json and diffusion_pytorch_model.safetensors,
                        or shards of at most `max_shard_size` bytes plus
                        diffusion_pytorch_model.safetensors.index.json (diffusers'
                        FluxTransformer2DModel.from_pretrained reads it). Earlier
                        diffusion_pytorch_model* files in that folder are removed.
    Tensors are written one at a time (no second copy of the model in memory). Returns the path.
    """
    path = Path(path)
    config: FluxConfig = model.config
    sd = model.state_dict()
    if format == "bfl":
        if path.is_dir():
            raise ConfigError(
                f"{path} is a folder; format='bfl' writes one file (e.g. {path / 'flux.safetensors'})"
            )
        meta = {"format": "pt", CONFIG_METADATA_KEY: json.dumps(dataclasses.asdict(config))}
        write_safetensors(path, sd, meta)
        return path
    if format != "diffusers":
        raise ConfigError(f"format must be 'bfl' or 'diffusers', got {format!r}")
    limit = _parse_size(max_shard_size)
    cj = diffusers_config(config)
    dsd = bfl_to_diffusers(sd)
    path.mkdir(parents=True, exist_ok=True)
    for old in path.glob("diffusion_pytorch_model*.safetensors*"):
        old.unlink()
    shards = _shards(dsd, limit)
    if len(shards) == 1:
        write_safetensors(path / DIFFUSERS_WEIGHTS, dsd, {"format": "pt"})
    else:
        weight_map, total = {}, 0
        for i, keys in enumerate(shards, 1):
            name = f"diffusion_pytorch_model-{i:05d}-of-{len(shards):05d}.safetensors"
            part = {k: dsd[k] for k in keys}
            write_safetensors(path / name, part, {"format": "pt"})
            total += sum(t.numel() * t.element_size() for t in part.values())
            weight_map.update(dict.fromkeys(keys, name))
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (path / DIFFUSERS_INDEX).write_text(json.dumps(index, indent=2) + "\n")
    (path / "config.json").write_text(json.dumps(cj, indent=2) + "\n")
    return path
