"""Conditioning helpers: the reference's formulas for img2img, Kontext ids, the Fill mask layout
and the Redux projector (end-to-end checks against diffusers live in test_pipeline.py)."""

import pytest
import torch
from safetensors.torch import save_file

from fluxcore.conditioning import (
    KONTEXT_RESOLUTIONS,
    ReduxProjector,
    append_redux,
    control_condition,
    fill_condition,
    img2img_start,
    kontext_resolution,
    kontext_tokens,
    load_redux,
)
from fluxcore.errors import ConfigError, WeightsError
from fluxcore.latents import make_img_ids, pack
from fluxcore.sampling import get_schedule


@pytest.mark.parametrize("strength,n,idx", [(1.0, 10, 0), (0.6, 10, 4), (0.75, 4, 1), (0.05, 28, 26)])
def test_img2img_start_is_the_reference_mix(strength, n, idx):
    ts = get_schedule(n, 256)
    x0, eps = torch.randn(2, 6, 64), torch.randn(2, 6, 64)
    x, tail = img2img_start(x0, eps, ts, strength)
    assert idx == int((1 - strength) * n) and tail == ts[idx:]
    torch.testing.assert_close(x, ts[idx] * eps + (1 - ts[idx]) * x0)


@pytest.mark.parametrize("strength", [0.0, -0.1, 1.5])
def test_img2img_rejects_useless_strength(strength):
    with pytest.raises(ConfigError, match="strength"):
        img2img_start(torch.zeros(1, 4, 64), torch.zeros(1, 4, 64), get_schedule(10, 256), strength)


def test_kontext_resolution_and_tokens():
    assert kontext_resolution(1000, 1000) == (1024, 1024)
    assert kontext_resolution(4000, 1000) == (1568, 672)
    assert kontext_resolution(600, 900) == (832, 1248)
    assert all(w % 16 == 0 and h % 16 == 0 for w, h in KONTEXT_RESOLUTIONS)
    lat = torch.randn(2, 16, 6, 4)
    seq, ids = kontext_tokens(lat)
    assert torch.equal(seq, pack(lat))
    assert ids.shape == (2, 6, 3) and torch.all(ids[..., 0] == 1)
    assert torch.equal(ids[..., 1:], make_img_ids(2, 48, 32)[..., 1:])


def test_fill_condition_layout():
    lat = torch.randn(1, 16, 4, 6)
    mask = torch.rand(1, 1, 32, 48)
    cond = fill_condition(lat, mask)
    assert cond.shape == (1, 6, 64 + 256)
    assert torch.equal(cond[..., :64], pack(lat))
    # packed mask channel (ph·2 + pw)·64 + (py·8 + px) of token (r, c) is pixel (16r + 8ph + py, 16c + 8pw + px)
    m = cond[0, :, 64:].reshape(2, 3, 64, 2, 2)  # token (r, c), 8x8 channel, ph, pw
    for r, c, ph, pw, py, px in [(0, 0, 0, 0, 0, 0), (1, 2, 1, 0, 3, 7), (0, 1, 1, 1, 7, 2)]:
        assert m[r, c, py * 8 + px, ph, pw] == mask[0, 0, 16 * r + 8 * ph + py, 16 * c + 8 * pw + px]
    with pytest.raises(ConfigError, match="mask"):
        fill_condition(lat, torch.rand(1, 1, 30, 48))
    assert torch.equal(control_condition(lat), pack(lat))


def test_redux_projector_load_and_append(tmp_path):
    torch.manual_seed(0)
    proj = ReduxProjector(siglip_dim=12, txt_dim=8)
    assert proj.redux_up.weight.shape == (24, 12) and proj.redux_down.weight.shape == (8, 24)
    path = tmp_path / "redux.safetensors"
    save_file({k: v.contiguous() for k, v in proj.state_dict().items()}, str(path))
    loaded = load_redux(path)
    x = torch.randn(2, 5, 12)
    want = proj.redux_down(torch.nn.functional.silu(proj.redux_up(x)))
    torch.testing.assert_close(loaded(x), want)
    txt, ids = append_redux(torch.randn(2, 3, 8), torch.zeros(2, 3, 3), loaded(x[:1]))
    assert txt.shape == (2, 8, 8) and ids.shape == (2, 8, 3) and not ids.any()
    save_file({"redux_up.weight": torch.zeros(24, 12)}, str(tmp_path / "bad.safetensors"))
    with pytest.raises(WeightsError, match="missing"):
        load_redux(tmp_path / "bad.safetensors")
    with pytest.raises(WeightsError, match="cannot read"):
        load_redux(tmp_path / "nothing.safetensors")
