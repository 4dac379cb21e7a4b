"""Captioned shapes: a synthetic text-to-image data set generated on the fly.

Each image is one flat-coloured shape on a plain background, with a caption that names the
shape's colour, the shape, its position and (usually) the background colour:

    "a red circle at the top left on a blue background"
    "a white triangle in the center"

Vocabulary: 8 colours (CSS named-colour values), 3 shapes, 5 positions. A fixed set of
(colour, shape, position) combinations, `HELD_OUT`, never appears in the training split, so a
model trained on it can be tested on prompts it has never seen; every single word and every pair
of (colour, shape), (colour, position), (shape, position) still occurs in training.

Images are float32 tensors [3, H, W] in [-1, 1] (the autoencoder's range), RGB, channels first.
Nothing is stored on disk: a sample is a pure function of its seed.
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from fluxcore.errors import ConfigError

# CSS named colours (CSS Color Module Level 4): note that CSS "green" is (0, 128, 0), not (0, 255, 0).
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (255, 0, 0),
    "green": (0, 128, 0),
    "blue": (0, 0, 255),
    "yellow": (255, 255, 0),
    "white": (255, 255, 255),
    "black": (0, 0, 0),
    "purple": (128, 0, 128),
    "orange": (255, 165, 0),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
# Centre of the shape as (x, y) fractions of the image width and height.
POSITIONS: dict[str, tuple[float, float]] = {
    "top left": (0.25, 0.25),
    "top right": (0.75, 0.25),
    "bottom left": (0.25, 0.75),
    "bottom right": (0.75, 0.75),
    "center": (0.5, 0.5),
}


def _held_out() -> tuple[tuple[str, str, str], ...]:
    # Two combinations per colour, spread so that every shape and position is held out for some
    # colour; no (colour, shape) or (colour, position) pair loses more than 2 of its 5 or 3 partners.
    colors, positions = list(COLORS), list(POSITIONS)
    combos = []
    for i, c in enumerate(colors):
        combos.append((c, SHAPES[i % 3], positions[i % 5]))
        combos.append((c, SHAPES[(i + 1) % 3], positions[(i + 3) % 5]))
    return tuple(combos)


HELD_OUT: tuple[tuple[str, str, str], ...] = _held_out()
ALL_COMBOS: tuple[tuple[str, str, str], ...] = tuple(itertools.product(COLORS, SHAPES, POSITIONS))
TRAIN_COMBOS: tuple[tuple[str, str, str], ...] = tuple(c for c in ALL_COMBOS if c not in set(HELD_OUT))


@dataclass(frozen=True)
class ShapeSpec:
    """Everything that determines one image.

    size: the shape's extent (circle diameter, square side, triangle base and height) as a
    fraction of the image side; dx, dy: offset of its centre from the named position, as a
    fraction of the image side.
    """

    color: str
    shape: str
    position: str
    background: str
    size: float = 0.375
    dx: float = 0.0
    dy: float = 0.0

    def __post_init__(self):
        if self.color not in COLORS or self.background not in COLORS:
            raise ConfigError(
                f"colours must be among {list(COLORS)}; got {self.color!r} on {self.background!r}"
            )
        if self.color == self.background:
            raise ConfigError(f"shape colour and background are both {self.color!r}; the shape would vanish")
        if self.shape not in SHAPES:
            raise ConfigError(f"shape must be one of {list(SHAPES)}; got {self.shape!r}")
        if self.position not in POSITIONS:
            raise ConfigError(f"position must be one of {list(POSITIONS)}; got {self.position!r}")


def caption(spec: ShapeSpec, with_background: bool = True) -> str:
    """'a red circle at the top left on a blue background' ('in the center' for the centre)."""
    where = "in the center" if spec.position == "center" else f"at the {spec.position}"
    text = f"a {spec.color} {spec.shape} {where}"
    return f"{text} on a {spec.background} background" if with_background else text


def render(spec: ShapeSpec, resolution: int = 64) -> Tensor:
    """The image of `spec`: float32 [3, resolution, resolution] in [-1, 1], hard edges.

    Pixel (row i, col j) is inside the shape when its centre (j + 0.5, i + 0.5) is.
    """
    n = resolution
    coords = (torch.arange(n, dtype=torch.float32) + 0.5) / n
    y, x = torch.meshgrid(coords, coords, indexing="ij")
    px, py = POSITIONS[spec.position]
    cx, cy, half = px + spec.dx, py + spec.dy, spec.size / 2
    if spec.shape == "circle":
        inside = (x - cx) ** 2 + (y - cy) ** 2 <= half**2
    elif spec.shape == "square":
        inside = ((x - cx).abs() <= half) & ((y - cy).abs() <= half)
    else:  # an upright isosceles triangle: apex at the top, base at the bottom
        top = cy - half
        frac = (y - top) / spec.size  # 0 at the apex, 1 at the base
        inside = (frac >= 0) & (frac <= 1) & ((x - cx).abs() <= half * frac)
    fg = torch.tensor(COLORS[spec.color], dtype=torch.float32)[:, None, None]
    bg = torch.tensor(COLORS[spec.background], dtype=torch.float32)[:, None, None]
    img = torch.where(inside[None], fg, bg)
    return img / 127.5 - 1.0


def random_spec(
    rng: random.Random, combos: Sequence[tuple[str, str, str]] = TRAIN_COMBOS, jitter: bool = True
) -> ShapeSpec:
    """A random spec over `combos`, any background but the shape's colour, with small jitter."""
    color, shape, position = rng.choice(combos)
    background = rng.choice([c for c in COLORS if c != color])
    if not jitter:
        return ShapeSpec(color, shape, position, background)
    return ShapeSpec(
        color,
        shape,
        position,
        background,
        size=rng.uniform(0.31, 0.44),
        dx=rng.uniform(-0.04, 0.04),
        dy=rng.uniform(-0.04, 0.04),
    )


class CaptionedShapes(torch.utils.data.Dataset):
    """Map-style data set: item i is (image [3, R, R] float32 in [-1, 1], caption str).

    split: "train" (the combinations not held out) or "heldout" (`HELD_OUT` only).
    Item i is a pure function of (seed, split, i), so any number of workers agree.
    background_dropout: probability that a caption omits the background clause (the model then
    learns that an unnamed background can be anything).
    """

    def __init__(
        self,
        split: str = "train",
        resolution: int = 64,
        length: int = 100_000,
        seed: int = 0,
        background_dropout: float = 0.2,
        jitter: bool = True,
    ):
        if split not in ("train", "heldout"):
            raise ConfigError(f"split must be 'train' or 'heldout'; got {split!r}")
        self.combos = TRAIN_COMBOS if split == "train" else HELD_OUT
        self.split, self.resolution, self.length, self.seed = split, resolution, length, seed
        self.background_dropout, self.jitter = background_dropout, jitter

    def __len__(self) -> int:
        return self.length

    def spec(self, index: int) -> tuple[ShapeSpec, bool]:
        """(spec, with_background) of item `index`."""
        rng = random.Random(f"{self.seed}/{self.split}/{index}")
        spec = random_spec(rng, self.combos, self.jitter)
        return spec, rng.random() >= self.background_dropout

    def __getitem__(self, index: int) -> tuple[Tensor, str]:
        if not 0 <= index < self.length:
            raise IndexError(f"index {index} out of range for a data set of length {self.length}")
        spec, with_bg = self.spec(index)
        return render(spec, self.resolution), caption(spec, with_bg)

    def batch(self, indices: Sequence[int]) -> tuple[Tensor, list[str]]:
        """Images [N, 3, R, R] and captions for `indices`."""
        items = [self[i] for i in indices]
        return torch.stack([im for im, _ in items]), [c for _, c in items]


def held_out_prompts() -> list[tuple[ShapeSpec, str]]:
    """The evaluation prompts: each held-out combination twice, on two backgrounds chosen by a
    fixed rule (never the shape's own colour), as (spec, caption)."""
    names = list(COLORS)
    out = []
    for k, (color, shape, position) in enumerate(HELD_OUT):
        for j in (1, 4):
            bg = names[(names.index(color) + j + k) % len(names)]
            if bg == color:
                bg = names[(names.index(bg) + 1) % len(names)]
            spec = ShapeSpec(color, shape, position, bg)
            out.append((spec, caption(spec)))
    return out


def all_captions() -> list[str]:
    """Every caption the vocabulary can form, with and without the background clause (training
    and held-out combinations alike): the corpus the tokenizers are fitted on."""
    out = set()
    for color, shape, position in ALL_COMBOS:
        for bg in COLORS:
            if bg != color:
                spec = ShapeSpec(color, shape, position, bg)
                out.add(caption(spec, True))
                out.add(caption(spec, False))
    return sorted(out)


@dataclass(frozen=True)
class Classification:
    """What `classify` reads off an image: named colours, position and shape (None when no
    foreground was found)."""

    color: str | None
    shape: str | None
    position: str | None
    background: str


_PALETTE = torch.tensor(list(COLORS.values()), dtype=torch.float32)  # [8, 3] in 0..255
_ANCHORS = torch.tensor(list(POSITIONS.values()), dtype=torch.float32)  # [5, 2] (x, y)


def _nearest_color(rgb: Tensor) -> str:
    return list(COLORS)[int(((_PALETTE - rgb) ** 2).sum(-1).argmin())]


def classify(image: Tensor, threshold: float = 80.0) -> Classification:
    """Name the background colour, shape colour, position and shape of a captioned-shapes image
    by pixel statistics (no learning): the evaluation of generated images.

    image: [3, H, W] float in [-1, 1] (this module's and the autoencoder's range).
    Background: the median of the image border, snapped to the nearest named colour.
    Colour: the median of the pixels farther than `threshold` (0..255 RGB distance) from the
    background, snapped to a named colour. Foreground: those pixels that are also nearer to that
    colour than to the background (so a blurred fringe does not count). Position: the named
    position nearest to the foreground's centroid. Shape: from how full the four corner cells
    (a quarter of the side each) of the foreground's bounding box are — a square fills all four,
    an upright triangle only the bottom two, a circle each about a third. Corners survive blur
    far better than a fill ratio does (tested on autoencoder reconstructions).
    """
    rgb = ((image.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).permute(1, 2, 0)  # [H, W, 3]
    h, w, _ = rgb.shape
    border = torch.cat(
        [
            rgb[:2].reshape(-1, 3),
            rgb[-2:].reshape(-1, 3),
            rgb[:, :2].reshape(-1, 3),
            rgb[:, -2:].reshape(-1, 3),
        ]
    )
    background = _nearest_color(border.median(dim=0).values)
    bg = _PALETTE[list(COLORS).index(background)]
    far = ((rgb - bg) ** 2).sum(-1).sqrt() > threshold
    if far.sum() < 0.002 * h * w:
        return Classification(None, None, None, background)
    color = _nearest_color(rgb[far].median(dim=0).values)
    fg_rgb = _PALETTE[list(COLORS).index(color)]
    fg = far & (((rgb - fg_rgb) ** 2).sum(-1) < ((rgb - bg) ** 2).sum(-1))
    if fg.sum() < 0.002 * h * w:
        fg = far
    rows, cols = torch.nonzero(fg, as_tuple=True)
    centre = torch.stack([(cols.float() + 0.5).mean() / w, (rows.float() + 0.5).mean() / h])
    position = list(POSITIONS)[int(((_ANCHORS - centre) ** 2).sum(-1).argmin())]
    box = fg[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1].float()
    kh, kw = max(1, round(box.shape[0] / 4)), max(1, round(box.shape[1] / 4))
    top = (box[:kh, :kw].mean() + box[:kh, -kw:].mean()).item() / 2
    bottom = (box[-kh:, :kw].mean() + box[-kh:, -kw:].mean()).item() / 2
    # exact shapes: square 1 / 1, triangle 0 / ~0.8, circle ~0.2-0.5 / ~0.2-0.5
    if bottom - top > 0.3:
        shape = "triangle"
    elif (top + bottom) / 2 > 0.7:
        shape = "square"
    else:
        shape = "circle"
    return Classification(color, shape, position, background)
