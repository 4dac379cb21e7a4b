"""Conditioning helpers: the reference's formulas for img2img, Kontext ids, the Fill mask layout
and the Redux projector, the per-mode input functions, and which mode each model is in
(end-to-end checks against diffusers live in test_pipeline.py)."""

import pytest
import torch
from safetensors.torch import save_file

from fluxcore import PRESETS, Flux
from fluxcore.conditioning import (
    KONTEXT_RESOLUTIONS,
    ReduxProjector,
    append_redux,
    check_inputs,
    control_condition,
    control_inputs,
    fill_condition,
    fill_inputs,
    img2img_inputs,
    img2img_start,
    kontext_inputs,
    kontext_resolution,
    kontext_size,
    kontext_tokens,
    load_redux,
    redux_inputs,
)
from fluxcore.errors import ConfigError, WeightsError
from fluxcore.latents import make_img_ids, pack
from fluxcore.pipeline import FluxPipeline
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


# --- which mode a model is in ---------------------------------------------------------------

EXPECTED_MODES = {
    "flux-dev": "text",
    "flux-dev-krea": "text",
    "flux-dev-kontext": "text",  # Kontext has dev's shapes: the pipeline's flag makes it "kontext"
    "flux-schnell": "text",
    "flux-dev-fill": "fill",
    "flux-dev-canny": "control",
    "flux-dev-depth": "control",
    "tiny-dev": "text",
    "tiny-schnell": "text",
    "tiny-fill": "fill",
    "tiny-canny": "control",
}


def test_every_preset_has_its_mode():
    assert set(EXPECTED_MODES) == set(PRESETS)
    for name, mode in EXPECTED_MODES.items():
        assert PRESETS[name].conditioning == mode, name


@pytest.mark.parametrize("name", ["flux-dev", "flux-dev-kontext", "flux-dev-fill", "flux-dev-canny"])
def test_full_size_models_on_meta(name):
    """The full-size model's first layer takes exactly the channels the mode implies; the pipeline
    reports the mode (and Kontext from its flag) without any weights."""
    with torch.device("meta"):
        flux = Flux(PRESETS[name])
    c = flux.config.out_channels
    extra = {"text": 0, "control": c, "fill": c + 16 * 16}[flux.config.conditioning]
    assert flux.img_in.weight.shape[1] == c + extra
    pipe = FluxPipeline(flux, None, None, None, None, None, kontext="kontext" in name)
    assert pipe.mode == ("kontext" if "kontext" in name else EXPECTED_MODES[name])
    # the flag does not turn a Fill or Canny model into Kontext
    if EXPECTED_MODES[name] != "text":
        assert FluxPipeline(flux, None, None, None, None, None, kontext=True).mode == EXPECTED_MODES[name]


def test_unknown_channel_count_is_named():
    cfg = PRESETS["tiny-dev"].replace(in_channels=96)
    with pytest.raises(
        ConfigError, match=r"in_channels 96 .* expected 64 \(text\), 128 \(control.* 384 \(fill"
    ):
        cfg.conditioning
    assert PRESETS["tiny-dev"].replace(in_channels=2 * 32 + 256, out_channels=32).conditioning == "fill"


# --- one function per mode, on user inputs ---------------------------------------------------


def fake_encode(x):
    """A stand-in autoencoder: [B, 3, H, W] → [B, 16, H/8, W/8] (8x8 average pool, channels tiled)."""
    return torch.nn.functional.avg_pool2d(x, 8).repeat(1, 6, 1, 1)[:, :16]


def test_mode_input_functions():
    img = torch.rand(1, 3, 32, 48) * 2 - 1
    mask = (torch.rand(1, 1, 32, 48) > 0.5).float()
    fill = fill_inputs(fake_encode, img, mask, 48, 32)
    torch.testing.assert_close(fill["img_cond"], fill_condition(fake_encode(img * (1 - mask)), mask))
    assert fill["img_cond"].shape == (1, 6, 320)
    control = control_inputs(fake_encode, img, 48, 32)
    assert torch.equal(control["img_cond"], pack(fake_encode(img)))
    assert torch.equal(img2img_inputs(fake_encode, img, 48, 32), pack(fake_encode(img)))
    kontext = kontext_inputs(fake_encode, img, auto_resize=False)
    assert kontext["img_cond_seq"].shape == (1, 6, 64) and torch.all(kontext["img_cond_seq_ids"][..., 0] == 1)
    assert kontext_size(img, auto_resize=False) == (48, 32)
    assert kontext_size(torch.zeros(3, 40, 50), auto_resize=False) == (48, 32)
    assert kontext_size(img, auto_resize=True) == kontext_resolution(48, 32)
    proj = ReduxProjector(siglip_dim=12, txt_dim=8).double()
    tokens = redux_inputs(proj, torch.randn(5, 12))
    assert tokens.shape == (1, 5, 8) and tokens.dtype == torch.float64


@pytest.mark.parametrize(
    "mode,kwargs,match",
    [
        ("fill", dict(image=1), "Fill model \\(384 input channels\\): pass image= and mask_image="),
        ("text", dict(mask_image=1), "mask_image is for Fill models"),
        ("control", dict(), "Canny/Depth model \\(384 input channels\\)"),
        ("kontext", dict(control_image=1), "control_image is for Canny/Depth"),
        ("control", dict(control_image=1, image=1), "take control_image=, not image="),
        ("kontext", dict(image=1, strength=0.5), "strength is for img2img"),
        ("text", dict(image=1, strength=1.5), r"strength must be in \(0, 1\]"),
    ],
)
def test_check_inputs(mode, kwargs, match):
    args = dict(image=None, strength=None, mask_image=None, control_image=None) | kwargs
    with pytest.raises(ConfigError, match=match):
        check_inputs(mode, 384, **args)
