"""`info(path)`: what a checkpoint file or folder is, read from safetensors headers only (no tensor
data, so it takes milliseconds even for a 24 GB file). Backs `fluxcore info PATH`."""

from __future__ import annotations

import math
import re
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import torch

from fluxcore.config import FluxConfig
from fluxcore.errors import WeightsError
from fluxcore.weights.errors import UnknownVariantError
from fluxcore.weights.find import what_is
from fluxcore.weights.flux import inspect_flux
from fluxcore.weights.io import open_checkpoint


@dataclass
class WeightsInfo:
    """Summary of a checkpoint.

    kind:     "flux-transformer", or a guess from key names for anything else ("an autoencoder (VAE)", ...).
    layout:   the layout name ("bfl", "diffusers", ...) for FLUX transformers ("" otherwise);
              prefix: their key prefix.
    variant:  PRESETS name or "custom" (FLUX transformers only); note: how it was decided.
    dtypes:   stored dtype name → element count.  num_params: elements of the model's tensors.
    nbytes:   size of the files on disk.  files: the .safetensors files read.
    """

    path: str
    kind: str
    layout: str = ""
    prefix: str = ""
    variant: str = ""
    note: str = ""
    config: FluxConfig | None = None
    dtypes: dict[str, int] = field(default_factory=dict)
    num_params: int = 0
    num_tensors: int = 0
    nbytes: int = 0
    files: list[str] = field(default_factory=list)
    other_tensors: int = 0
    lora: str = ""  # for LoRA files: format, rank, components, kinds

    @property
    def dtype(self) -> str:
        """The dtype holding most elements, or "mixed(a, b)" listing them by share."""
        names = sorted(self.dtypes, key=self.dtypes.get, reverse=True)
        if len(names) == 1:
            return names[0]
        total = sum(self.dtypes.values()) or 1
        return "mixed(" + ", ".join(f"{n} {self.dtypes[n] / total:.0%}" for n in names) + ")"

    def __str__(self) -> str:
        rows = [("path", self.path), ("kind", self.kind)]
        if self.lora:
            rows.append(("lora", self.lora))
        if self.layout:
            prefix = f" (keys under {self.prefix!r})" if self.prefix else ""
            rows.append(("layout", self.layout + prefix))
        if self.variant:
            rows += [("variant", self.variant), ("", self.note)]
        rows += [
            ("dtype", self.dtype),
            ("parameters", f"{self.num_params:,} ({self.num_params / 1e9:.2f} B)"),
            (
                "tensors",
                f"{self.num_tensors:,}"
                + (f" (+{self.other_tensors} not part of it)" if self.other_tensors else ""),
            ),
            ("size", f"{self.nbytes / 1e9:.2f} GB in {len(self.files)} file(s)"),
        ]
        if self.config is not None:
            c = self.config
            rows.append(
                (
                    "config",
                    f"hidden {c.hidden_size}, heads {c.num_heads}, depth {c.depth}+{c.depth_single_blocks}, "
                    f"in {c.in_channels}, out {c.out_channels}, context {c.context_in_dim}, vec {c.vec_in_dim}, "
                    f"axes {list(c.axes_dim)}, guidance {c.guidance_embed}",
                )
            )
        width = max(len(k) for k, _ in rows)
        return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def _dtype_name(d: torch.dtype) -> str:
    return str(d).removeprefix("torch.")


def info(path) -> WeightsInfo:
    """Describe the checkpoint at `path` (a file, a diffusers folder, a snapshot root) from its
    headers. Raises WeightsError when it is missing or not a readable safetensors checkpoint."""
    path = Path(path)
    try:
        fc = inspect_flux(path)
    except UnknownVariantError:
        return _generic(path)
    except WeightsError as e:
        if path.is_file() or "no FLUX transformer" in str(e):
            try:
                return _generic(path)
            except WeightsError:
                pass
        raise
    with fc.checkpoint as ck:
        dtypes: dict[str, int] = defaultdict(int)
        for d, n in fc.dtype_counts().items():
            dtypes[_dtype_name(d)] += n
        return WeightsInfo(
            path=str(path),
            kind="flux-transformer",
            layout=fc.layout,
            prefix=fc.prefix,
            variant=fc.variant,
            note=fc.variant_note,
            config=fc.config,
            dtypes=dict(dtypes),
            num_params=fc.num_params,
            num_tensors=len(fc.keys),
            nbytes=sum(p.stat().st_size for p in ck.files),
            files=[str(p) for p in ck.files],
            other_tensors=len(fc.other_keys),
        )


def _lora(path: Path, keys: list[str]) -> str:
    """A LoRA file's description ("" for anything else; only files whose keys look like adapters are read)."""
    if not path.is_file() or not any(re.search(r"lora|lokr_|hada_|\.diff$|\.alpha$", k) for k in keys):
        return ""
    from fluxcore.errors import FluxcoreError
    from fluxcore.lora import describe_lora

    try:
        d = describe_lora(path)
    except FluxcoreError:
        return ""
    control = "; control LoRA (img_in widened to 128 inputs)" if d["control"] else ""
    return (
        f"{d['format']}: {d['tensors']} tensors, rank {', '.join(map(str, d['ranks'])) or '-'}, for "
        f"{', '.join(d['components'])}; kinds {', '.join(d['kinds'])}{control}"
    )


def _generic(path: Path) -> WeightsInfo:
    with open_checkpoint(path) as ck:
        dtypes: dict[str, int] = defaultdict(int)
        for k in ck.keys():
            dtypes[_dtype_name(ck.dtype(k))] += math.prod(ck.shape(k))
        lora = _lora(path, list(ck.keys()))
        return WeightsInfo(
            path=str(path),
            kind="LoRA" if lora else what_is(ck.keys()),
            lora=lora,
            dtypes=dict(dtypes),
            num_params=sum(dtypes.values()),
            num_tensors=len(ck),
            nbytes=sum(p.stat().st_size for p in ck.files),
            files=[str(p) for p in ck.files],
        )
