"""The captioned-shapes data set: vocabulary, held-out split, rendering and captions."""

import itertools
import math
import re

import pytest
import torch

from fluxcore.errors import ConfigError
from fluxcore.toydata import (
    ALL_COMBOS,
    COLORS,
    HELD_OUT,
    POSITIONS,
    SHAPES,
    TRAIN_COMBOS,
    CaptionedShapes,
    ShapeSpec,
    all_captions,
    caption,
    classify,
    render,
)

CAPTION_RE = re.compile(
    r"^a (?P<color>\w+) (?P<shape>\w+) (?:at the (?P<pos>top left|top right|bottom left|bottom right)|in the center)"
    r"(?: on a (?P<bg>\w+) background)?$"
)


def parse(text):
    m = CAPTION_RE.match(text)
    assert m, text
    return m["color"], m["shape"], m["pos"] or "center", m["bg"]


def test_css_named_colour_values():
    # CSS Color Module Level 4 values, typed in independently of the module.
    assert COLORS == {
        "red": (255, 0, 0),
        "green": (0, 128, 0),
        "blue": (0, 0, 255),
        "yellow": (255, 255, 0),
        "white": (255, 255, 255),
        "black": (0, 0, 0),
        "purple": (128, 0, 128),
        "orange": (255, 165, 0),
    }
    assert SHAPES == ("circle", "square", "triangle")
    assert set(POSITIONS) == {"top left", "top right", "bottom left", "bottom right", "center"}


def test_held_out_split_is_disjoint_and_every_word_and_pair_is_still_trained():
    assert len(ALL_COMBOS) == 8 * 3 * 5
    assert len(set(HELD_OUT)) == len(HELD_OUT) >= 8
    assert set(HELD_OUT) <= set(ALL_COMBOS)
    assert not set(HELD_OUT) & set(TRAIN_COMBOS)
    assert set(HELD_OUT) | set(TRAIN_COMBOS) == set(ALL_COMBOS)
    # Generalisation means recombining known parts: each pair of attributes must occur in training.
    for i, j in itertools.combinations(range(3), 2):
        vocab = [list(COLORS), list(SHAPES), list(POSITIONS)]
        trained = {(c[i], c[j]) for c in TRAIN_COMBOS}
        assert trained == set(itertools.product(vocab[i], vocab[j]))


def test_splits_sample_only_their_combinations():
    train = CaptionedShapes("train", length=400, seed=3)
    held = CaptionedShapes("heldout", length=200, seed=3)
    seen_train = {(s.color, s.shape, s.position) for s, _ in map(train.spec, range(len(train)))}
    seen_held = {(s.color, s.shape, s.position) for s, _ in map(held.spec, range(len(held)))}
    assert seen_train <= set(TRAIN_COMBOS) and len(seen_train) > 80
    assert seen_held <= set(HELD_OUT) and len(seen_held) == len(HELD_OUT)


def test_items_are_deterministic_and_captions_match_the_image_spec():
    ds = CaptionedShapes("train", resolution=32, length=50, seed=7)
    for i in range(50):
        img, text = ds[i]
        img2, text2 = ds[i]
        assert text == text2 and torch.equal(img, img2)
        spec, with_bg = ds.spec(i)
        color, shape, pos, bg = parse(text)
        assert (color, shape, pos) == (spec.color, spec.shape, spec.position)
        assert bg == (spec.background if with_bg else None)
        assert spec.background != spec.color
    other = CaptionedShapes("train", resolution=32, length=50, seed=8)
    assert [ds[i][1] for i in range(20)] != [other[i][1] for i in range(20)]
    with pytest.raises(IndexError):
        ds[50]
    imgs, caps = ds.batch([0, 1, 2])
    assert imgs.shape == (3, 3, 32, 32) and imgs.dtype == torch.float32 and len(caps) == 3


def test_caption_format():
    assert (
        caption(ShapeSpec("red", "circle", "top left", "blue"))
        == "a red circle at the top left on a blue background"
    )
    assert (
        caption(ShapeSpec("white", "triangle", "center", "black"), False) == "a white triangle in the center"
    )
    caps = all_captions()
    assert len(caps) == len(set(caps)) == 120 * 7 + 120  # with each background, and without
    assert all(CAPTION_RE.match(c) for c in caps)


@pytest.mark.parametrize("shape, fill", [("circle", math.pi / 4), ("square", 1.0), ("triangle", 0.5)])
@pytest.mark.parametrize("position", list(POSITIONS))
def test_render_colours_position_and_shape(shape, fill, position):
    n = 128
    spec = ShapeSpec("orange", shape, position, "purple", size=0.375)
    img = render(spec, n)
    assert img.shape == (3, n, n) and img.min() >= -1 and img.max() <= 1
    rgb = ((img + 1) * 127.5).round().to(torch.int64)
    fg = torch.tensor(COLORS["orange"])[:, None, None]
    bg = torch.tensor(COLORS["purple"])[:, None, None]
    is_fg = (rgb == fg).all(0)
    assert (is_fg | (rgb == bg).all(0)).all()  # only the two colours, hard edges
    rows, cols = torch.nonzero(is_fg, as_tuple=True)
    px, py = POSITIONS[position]
    # bounding-box centre at the named position; box side = size; fill ratio identifies the shape
    assert abs((cols.min() + cols.max() + 1).item() / (2 * n) - px) < 2 / n
    assert abs((rows.min() + rows.max() + 1).item() / (2 * n) - py) < 2 / n
    side = 0.375 * n
    assert abs((cols.max() - cols.min() + 1).item() - side) <= 2
    assert is_fg.sum().item() / side**2 == pytest.approx(fill, abs=0.04)


def test_invalid_specs_raise():
    with pytest.raises(ConfigError, match="both 'red'"):
        ShapeSpec("red", "circle", "center", "red")
    with pytest.raises(ConfigError, match="hexagon"):
        ShapeSpec("red", "hexagon", "center", "blue")
    with pytest.raises(ConfigError, match="split"):
        CaptionedShapes("test")


def test_classify_reads_back_every_rendered_attribute():

    ds = CaptionedShapes("train", length=300, seed=11)
    for i in range(len(ds)):
        spec, _ = ds.spec(i)
        got = classify(render(spec))
        assert (got.color, got.shape, got.position, got.background) == (
            spec.color,
            spec.shape,
            spec.position,
            spec.background,
        ), spec
    blank = torch.full((3, 64, 64), -1.0)
    assert classify(blank).color is None and classify(blank).background == "black"
