"""FLUX transformer checkpoints: tell what one holds from its headers alone (`inspect_flux`), load
it straight into a `Flux` built on the meta device (`load_flux`), and save one (`save_flux`).

Accepted sources:
  - a BFL single file (`flux1-dev.safetensors`), keys optionally under a prefix such as
    `model.diffusion_model.` (community and all-in-one files; other keys in such files are ignored);
  - a diffusers transformer folder: `config.json` plus `diffusion_pytorch_model.safetensors`, or shards
    with `diffusion_pytorch_model.safetensors.index.json`;
  - a Hugging Face snapshot root holding `transformer/`, or any folder holding exactly one
    FLUX transformer file;
  - any file in a layout registered with `fluxcore.weights.layouts.register_layout`.
Which layout a checkpoint is in, and how its tensors become BFL tensors, is the layouts' business
(`fluxcore.weights.layouts`); the config and variant are `flux_config`'s.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from fluxcore.atomic import atomic_folder, atomic_write_json
from fluxcore.config import FluxConfig, get_config
from fluxcore.errors import ConfigError, WeightsError
from fluxcore.model import Flux
from fluxcore.weights.errors import KeyMismatchError, ShapeMismatchError, UnsupportedDtypeError
from fluxcore.weights.find import DIFFUSERS_WEIGHTS, not_flux, resolve
from fluxcore.weights.finite import check_finite
from fluxcore.weights.flux_config import (
    CONFIG_METADATA_KEY,
    detect_variant,
    diffusers_config,
    infer_config,
    variant_hints,
)
from fluxcore.weights.header import FLOAT8_DTYPES
from fluxcore.weights.io import Checkpoint, load_into, open_checkpoint, write_safetensors
from fluxcore.weights.layouts import LAYOUTS, Plan, detect_layout
from fluxcore.weights.layouts.base import plan_shapes, read_plan
from fluxcore.weights.writer import parse_size, write_shards


@dataclass
class FluxCheckpoint:
    """What a FLUX transformer checkpoint holds, read from its headers (no tensor data).

    layout:   the name of its layout in LAYOUTS ("bfl", "diffusers", ...); prefix: the key prefix
              of the transformer ("" for none).
    keys:     the checkpoint's own keys that belong to the transformer.
    plans:    BFL key → Plan: which of `keys` build it, in which row order, with which transform.
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
    plans: dict[str, Plan] = field(default_factory=dict)

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


def inspect_flux(source, *, config: FluxConfig | str | None = None) -> FluxCheckpoint:
    """Open `source` and tell what it holds, from headers only (fast for 24 GB files). The
    returned FluxCheckpoint keeps the files open; close it with `.checkpoint.close()`."""
    source = Path(source)
    resolved, config_json = resolve(source)
    checkpoint = open_checkpoint(resolved)
    try:
        all_keys = checkpoint.keys()
        found = detect_layout(all_keys)
        if found is None:
            raise not_flux(checkpoint.source, all_keys)
        layout, prefix = found
        keys = [k for k in all_keys if k.startswith(prefix)]
        other = [k for k in all_keys if not k.startswith(prefix)]
        try:
            plans = layout.plan(keys, prefix)
        except KeyError as e:
            raise KeyMismatchError(f"{checkpoint.source}: {e.args[0]}") from None
        unplaced = sorted(set(keys) - {k for p in plans.values() for k in p.sources})
        if unplaced:
            raise KeyMismatchError(
                f"{checkpoint.source}: the {layout.name} layout places no BFL key for {len(unplaced)} "
                f"key(s): {', '.join(repr(k) for k in unplaced[:5])}"
            )
        shapes = plan_shapes(plans, checkpoint.shape, checkpoint.source)
        if config is None:
            cfg = infer_config(
                shapes, config_json=config_json, metadata=checkpoint.metadata, source=checkpoint.source
            )
        else:
            cfg = get_config(config) if isinstance(config, str) else config
        hints = variant_hints(source, resolved, checkpoint.files, config_json, checkpoint.metadata)
        variant, note = detect_variant(cfg, hints)
        if config is not None:
            note = f"config given by the caller; {note}"
        return FluxCheckpoint(
            source=source,
            checkpoint=checkpoint,
            layout=layout.name,
            prefix=prefix,
            keys=keys,
            shapes=shapes,
            config=cfg,
            variant=variant,
            variant_note=note,
            config_json=config_json,
            other_keys=other,
            plans=plans,
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
            where = f" (BFL name; stored in the {fc.layout} layout)" if fc.layout != "bfl" else ""
            raise ShapeMismatchError(
                f"{fc.checkpoint.source}: {k!r}{where} has shape {list(fc.shapes[k])}, but {cls} expects "
                f"{list(t.shape)} (wrong variant or config?)"
            )


class _Reader:
    """Memory for the tensors `load_flux` reads. A tensor that `load_into` will cast or move anyway
    goes into one reused host buffer (pinned for CUDA) instead of fresh memory: no allocator churn
    when float8 is upcast, and a CUDA load holds one tensor in host memory. Tensors kept as they
    are get fresh memory of their own."""

    def __init__(self, device, dtype: torch.dtype):
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


def _stream(fc: FluxCheckpoint, reader: _Reader) -> Iterator[tuple[str, Tensor]]:
    """(BFL key, tensor) pairs read by the plans, in file order of each plan's first source, so
    the disk is read front to back."""
    ck = fc.checkpoint
    files = {p: i for i, p in enumerate(ck.files)}

    def position(plan: Plan) -> tuple[int, int]:
        return min((files[ck.file_of(k)], ck.offset(k)) for k in plan.sources)

    for bfl_key, plan in sorted(fc.plans.items(), key=lambda item: position(item[1])):
        yield bfl_key, read_plan(ck, plan, reader.empty)


def load_flux(source, *, config: FluxConfig | str | None = None, device=None, dtype=None) -> Flux:
    """Load a FLUX.1 transformer from a BFL file, a diffusers folder or a snapshot root.

    config: a FluxConfig or PRESETS name; default: inferred from the tensor shapes (and config.json).
    device: where the weights go (default CPU); tensors are streamed one at a time straight there.
    dtype:  weight dtype; default: the checkpoint's (float8 files load as bfloat16, every float8
            tensor is upcast as it loads).
    Quantized files — city96 GGUF, bitsandbytes NF4/FP4, ComfyUI scaled fp8 — load with their
    weights kept packed (fluxcore.quant modules, dequantized per layer at run time); `dtype` is
    then the compute dtype (default bfloat16). docs/memory.md lists the formats.
    Returns a `Flux` in eval mode with `.variant` and `.source` set. Raises WeightsError (see
    fluxcore.weights) and never returns a partially loaded model.
    """
    quantized = _quantized_layout(Path(source))
    if quantized is not None:  # GGUF / NF4 / scaled fp8: weights stay packed in fluxcore.quant modules
        layout, file = quantized
        return layout.load(file, config=config, device=device, dtype=dtype)
    fc = inspect_flux(source, config=config)
    with fc.checkpoint:
        dtype = fc.default_dtype() if dtype is None else dtype
        with torch.device("meta"):
            model = Flux(fc.config)
        _check_keys(fc, model)
        reader = _Reader(device, dtype)
        stream = _stream(fc, reader)
        # copy=False: a tensor needing no cast or move is fresh memory nobody else holds, so it
        # becomes the parameter as it is; the others (staging views) are cast/moved by load_into
        # before the next one is read.
        load_into(model, stream, source=fc.checkpoint.source, device=device, dtype=dtype, copy=False)
    model.variant = fc.variant
    model.source = str(source)
    return model.eval()


def _quantized_layout(source: Path):
    """(layout, file) when `source` is (or resolves to) a quantized checkpoint, else None. GGUF is
    told by its magic bytes, the safetensors formats by their keys (headers only)."""
    if source.is_file() and LAYOUTS["gguf"].sniff(source):
        return LAYOUTS["gguf"], source
    if (
        source.is_dir()
        and len(ggufs := sorted(source.glob("*.gguf"))) == 1
        and not list(source.glob("*.safetensors"))
    ):
        return LAYOUTS["gguf"], ggufs[0]
    try:
        file, _ = resolve(source)
    except WeightsError:
        return None  # inspect_flux raises the full error
    if not file.is_file():
        return None  # diffusers folders are never quantized layouts
    with open_checkpoint(file) as checkpoint:
        found = detect_layout(checkpoint.keys())
    if found is not None and getattr(found[0], "quantized", False):
        return found[0], file
    return None


# --- saving ---------------------------------------------------------------------------------------


def save_flux(model: Flux, path, format: str = "bfl", *, max_shard_size: int | str = "10GB") -> Path:
    """Save a Flux model's weights where the official tools read them.

    format="bfl":       one .safetensors file at `path` with the BFL keys (what BFL's code, ComfyUI
                        and `load_flux` read); the FluxConfig is kept in the file's metadata.
    format="diffusers": a folder at `path` with config.json and diffusion_pytorch_model.safetensors,
                        or shards of at most `max_shard_size` bytes plus
                        diffusion_pytorch_model.safetensors.index.json (diffusers'
                        FluxTransformer2DModel.from_pretrained reads it). Earlier
                        diffusion_pytorch_model* files in that folder are replaced; other
                        files there are kept.
    Any other registered layout with an `export` writes one file like "bfl", in its own keys.
    Tensors are written one at a time (no second copy of the model in memory). Returns the path.
    Atomic (`fluxcore.atomic`): readers see the old save or the new one, never a mix; a failed
    save raises SaveError and leaves the old one. Weights holding NaN/Inf are refused
    (NonFiniteWeightsError) before anything is written.
    """
    path = Path(path)
    config: FluxConfig = model.config
    layout = LAYOUTS.get(format)
    if getattr(layout, "export", None) is None:
        writable = [n for n, lay in LAYOUTS.items() if getattr(lay, "export", None) is not None]
        raise ConfigError(f"format must be one of {writable}, got {format!r}")
    sd = model.state_dict()
    check_finite(sd.items(), source=str(path), part=f"{type(model).__name__} (refusing to save)")
    if format == "diffusers":
        parse_size(max_shard_size)  # a bad size fails before anything is written
        cj = diffusers_config(config)
        with atomic_folder(path, replace=("diffusion_pytorch_model*.safetensors*", "config.json")) as tmp:
            write_shards(tmp, layout.export(sd), DIFFUSERS_WEIGHTS, max_shard_size)
            atomic_write_json(tmp / "config.json", cj)
        return path
    if path.is_dir():
        raise ConfigError(
            f"{path} is a folder; format={format!r} writes one file (e.g. {path / 'flux.safetensors'})"
        )
    meta = {"format": "pt", CONFIG_METADATA_KEY: json.dumps(dataclasses.asdict(config))}
    write_safetensors(path, layout.export(sd), meta)
    return path
