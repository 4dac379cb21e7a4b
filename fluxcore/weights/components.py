"""What the T5, CLIP and autoencoder loaders (weights/t5.py, clip.py, autoencoder.py) share.

Every loader takes the component's own folder or file, or the model's root folder (it then picks
the official sub-folder: `component_path`). The model's size comes from what is on disk —
config.json where the layout has one, else the tensor shapes (`layer_indices`, `shape_of`,
`need_shape`) — and a stated config must agree with the shapes (`check_agrees`) before the model is
built. Models are built on the meta device and filled one tensor at a time
(`fluxcore.weights.io.load_into`): one copy of the weights, ever. Loaded models are in eval mode
with `requires_grad=False` (`frozen`: FLUX keeps all three frozen). Savers refuse non-finite
weights (`weights_to_save`).
"""

from __future__ import annotations

import re
from pathlib import Path

from torch import Tensor

from fluxcore.errors import ConfigError, WeightsError
from fluxcore.weights.errors import ConfigMismatchError
from fluxcore.weights.finite import check_finite
from fluxcore.weights.io import Checkpoint, CheckpointNotFoundError


def component_path(source, subfolder: str, what: str) -> Path:
    """The component's folder or file: `source` itself, or `source/subfolder` for a model root."""
    path = Path(source)
    if not path.exists():
        raise CheckpointNotFoundError(f"{what}: no such file or folder: {path}")
    if path.is_dir() and not (path / "config.json").is_file() and (path / subfolder).is_dir():
        return path / subfolder
    return path


def layer_indices(keys, pattern: str) -> list[int]:
    r"""The sorted, distinct layer numbers that `pattern`'s `(\d+)` group (read as at most 6 digits)
    matches in `keys`."""
    rx = re.compile(pattern.replace(r"(\d+)", r"(\d{1,6})"))
    return sorted({int(m.group(1)) for k in keys if (m := rx.match(k))})


def shape_of(shapes, key: str, what: str, ndim: int, source) -> tuple[int, ...]:
    """shapes[key]: a WeightsError when the key is missing (not a `what` checkpoint), a
    ConfigMismatchError when it is not `ndim` non-zero dims."""
    if key not in shapes:
        raise WeightsError(f"{source}: no tensor {key!r}, so this is not a {what} checkpoint")
    shape = tuple(shapes[key])
    if len(shape) != ndim or not all(shape):
        raise ConfigMismatchError(
            f"{source}: {key!r} has shape {list(shape)}; a {what} has {ndim} non-zero dims"
        )
    return shape


def need_shape(ckpt: Checkpoint, key: str, what: str, ndim: int = 2) -> tuple[int, ...]:
    """`shape_of` for one tensor of an open checkpoint."""
    return shape_of({key: ckpt.shape(key)} if key in ckpt else {}, key, what, ndim, ckpt.source)


def frozen(model):
    """The loaded model in eval mode with requires_grad=False."""
    model.eval()
    model.requires_grad_(False)
    return model


def check_agrees(stated, shapes, fields, source: str, what: str) -> None:
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


def config_from(build, data, path: Path):
    """`build(data)` for a config read from `path`; any bad value becomes a ConfigMismatchError
    naming the file."""
    try:
        return build(data)
    except (ConfigError, TypeError, ValueError, KeyError, IndexError, AttributeError, OverflowError) as e:
        raise ConfigMismatchError(f"{path}: invalid config: {e}") from None


def weights_to_save(model, what: str, path: Path) -> dict[str, Tensor]:
    """The model's state dict, after checking every tensor is finite (NonFiniteWeightsError naming
    `what`, `path` and the first bad key otherwise)."""
    sd = dict(model.state_dict())
    check_finite(sd.items(), source=str(path), part=f"{what} (refusing to save)")
    return sd
