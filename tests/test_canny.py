"""fluxcore.canny on synthetic images with known answers (and against OpenCV when it is installed)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fluxcore.canny import canny, canny_edges
from fluxcore.errors import ConfigError


def rectangle(h=40, w=56, top=10, left=12, bottom=29, right=43, value=255.0):
    """White rectangle rows [top, bottom], cols [left, right] on black, [1, 1, h, w] on 0..255."""
    x = torch.zeros(1, 1, h, w)
    x[..., top : bottom + 1, left : right + 1] = value
    return x


def test_rectangle_edges_at_the_right_pixels():
    """A step between a dark pixel and a bright one has equal Sobel magnitude on both; OpenCV's
    tie rule keeps the first of the two along the gradient: the dark side on the top and left
    edges, the bright side on the bottom and right edges."""
    top, left, bottom, right = 10, 12, 29, 43
    e = canny_edges(rectangle(top=top, left=left, bottom=bottom, right=right))[0]
    rows, cols = slice(top + 2, bottom - 1), slice(left + 2, right - 1)  # away from the corners
    assert e[rows, left - 1].all() and not e[rows, left].any() and not e[rows, left - 2].any()
    assert e[rows, right].all() and not e[rows, right + 1].any() and not e[rows, right - 1].any()
    assert e[top - 1, cols].all() and not e[top, cols].any()
    assert e[bottom, cols].all() and not e[bottom + 1, cols].any()
    # Nothing farther than one pixel from the outline; the outline is closed (4 straight sides).
    outline = torch.zeros_like(e)
    outline[top - 1 : bottom + 1, left - 1 : right + 1] = True
    outline[top + 1 : bottom - 1, left + 1 : right - 1] = False
    assert not (e & ~outline).any()
    assert e.sum() >= 2 * (bottom - top + right - left) - 4


def test_thresholds_and_hysteresis():
    """|dx| + |dy| of a vertical step of height c is 4c. c = 20 (80 < 100): no edge; c = 40
    (160: weak) alone: no edge; the same weak step continuing a strong one (c = 255): kept."""
    h, w = 40, 30
    assert not canny_edges(rectangle(h, w, 0, 15, h - 1, w - 1, value=20.0)).any()
    weak = rectangle(h, w, 0, 15, h - 1, w - 1, value=40.0)
    assert not canny_edges(weak).any()
    assert canny_edges(weak, low=100, high=150).any()  # 160 > 150: strong now
    mixed = weak.clone()
    mixed[..., :10, 15:] = 255.0  # the top quarter of the same edge is strong
    e = canny_edges(mixed)[0]
    assert e[12:38, 14].all()  # the weak part, connected to the strong part, is an edge
    # A weak edge elsewhere, not touching any strong pixel, stays out.
    apart = mixed.clone()
    apart[..., :, 2:4] = 40.0
    assert not canny_edges(apart)[0][:, 1].any()


def test_colour_uses_the_strongest_channel_and_io_forms():
    x = torch.zeros(1, 3, 32, 32)
    x[:, 1, :, 16:] = 255.0  # green-only step
    assert canny_edges(x)[0][:, 15].all()
    img = torch.zeros(3, 32, 32) - 1
    img[:, :, 16:] = 1
    out = canny(img)
    assert out.shape == (1, 3, 32, 32) and set(out.unique().tolist()) == {-1.0, 1.0}
    PIL = pytest.importorskip("PIL.Image")
    pil = PIL.fromarray(((img.permute(1, 2, 0) + 1) * 127.5).numpy().astype(np.uint8))
    e = np.asarray(canny(pil))
    assert e.shape == (32, 32, 3) and (e[:, 15] == 255).all() and e.sum() == 32 * 255 * 3
    blurred = canny(img, sigma=1.0)[0, 0] > 0  # a blurred step still gives one thin edge beside it
    cols = blurred.nonzero()[:, 1].unique().tolist()
    assert len(cols) == 1 and cols[0] in (15, 16) and blurred[:, cols[0]].all()
    with pytest.raises(ConfigError):
        canny_edges(torch.zeros(5, 5))


def test_matches_opencv_when_available():
    cv2 = pytest.importorskip("cv2")
    rng = np.random.default_rng(0)
    img = (rng.random((48, 64, 3)) * 255).astype(np.uint8)
    img = cv2.GaussianBlur(img, (5, 5), 1.5)
    for low, high in ((100, 200), (50, 120)):
        ref = cv2.Canny(img, low, high) > 0
        ours = canny_edges(torch.from_numpy(img).permute(2, 0, 1).float(), low, high)[0].numpy()
        assert (ours == ref).all()
