"""FLUX ControlNets against diffusers (an oracle nobody here wrote), on tiny random configs.

The ControlNets are written by diffusers (`save_pretrained`) or, for XLabs, by us in the XLabs
layout and converted for diffusers; each is loaded with `load_controlnet`, so the loader, the key
conversion and the network are checked together. The injection is checked as a whole: fluxcore's
Flux with the ControlNets attached, run through ControlledDenoiser, against diffusers'
FluxTransformer2DModel given diffusers' ControlNet residuals.
"""

from __future__ import annotations

import pytest
import torch

from fluxcore import PRESETS, FlowDenoiser, Flux
from fluxcore.controlnet import (
    CONTROL_MODES,
    Control,
    ControlledDenoiser,
    FluxControlNet,
    attach_controlnets,
    control_keep,
    load_controlnet,
    prepare_control_image,
    residual_index,
)
from fluxcore.controlnet.xlabs import XLabsControlNet, xlabs_to_diffusers_hint_key
from fluxcore.errors import ConfigError
from fluxcore.weights import bfl_to_diffusers
from fluxcore.weights.io import write_safetensors

diffusers = pytest.importorskip("diffusers")

TINY = PRESETS["tiny-dev"]
BASE = TINY.replace(depth=5, depth_single_blocks=4)  # so that interval indexing is not the identity
GRID = (3, 4)  # non-square token grid: 12 image tokens, a 48x64-pixel image
L_TXT = 7


def rel_err(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def randomize(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("scale"):
                p.copy_(1 + 0.3 * torch.randn(p.shape, generator=g))
            else:
                p.add_(0.05 * torch.randn(p.shape, generator=g))
    return model


def diffusers_controlnet(depth, single, *, num_mode=None, guidance=True, hint=False, seed=0):
    """diffusers runs XLabs nets with a hint block and patch_size 2 (the 2x2 packing of its output)."""
    c = TINY
    net = diffusers.FluxControlNetModel(
        patch_size=2 if hint else 1, in_channels=64, num_layers=depth, num_single_layers=single,
        attention_head_dim=c.head_dim, num_attention_heads=c.num_heads, joint_attention_dim=c.context_in_dim,
        pooled_projection_dim=c.vec_in_dim, guidance_embeds=guidance, axes_dims_rope=list(c.axes_dim),
        num_mode=num_mode, conditioning_embedding_channels=16 if hint else None,
    )  # fmt: skip
    return randomize(net, seed).eval()


def diffusers_transformer(model):
    c = model.config
    ref = diffusers.FluxTransformer2DModel(
        patch_size=1, in_channels=c.in_channels, out_channels=c.out_channels, num_layers=c.depth,
        num_single_layers=c.depth_single_blocks, attention_head_dim=c.head_dim, num_attention_heads=c.num_heads,
        joint_attention_dim=c.context_in_dim, pooled_projection_dim=c.vec_in_dim,
        guidance_embeds=c.guidance_embed, axes_dims_rope=c.axes_dim,
    )  # fmt: skip
    ref.load_state_dict(bfl_to_diffusers(model.state_dict()), strict=True)
    return ref.eval()


def xlabs_to_diffusers(net: XLabsControlNet) -> dict:
    """Our XLabs state dict → diffusers FluxControlNetModel(conditioning_embedding_channels=16)."""
    sd = net.state_dict()
    trunk = {
        k: v
        for k, v in sd.items()
        if k.startswith(("img_in", "txt_in", "time_in", "vector_in", "guidance_in", "double_blocks"))
    }
    out = bfl_to_diffusers(trunk)
    for k, v in sd.items():
        if k.startswith("controlnet_blocks."):
            out[k] = v
        elif k.startswith("pos_embed_input."):
            out["controlnet_x_embedder." + k.split(".", 1)[1]] = v
        elif k.startswith("input_hint_block."):
            out[xlabs_to_diffusers_hint_key(k)] = v
    return out


def grid_ids(h, w):
    ids = torch.zeros(h, w, 3)
    ids[..., 1] = torch.arange(h)[:, None]
    ids[..., 2] = torch.arange(w)[None, :]
    return ids.reshape(h * w, 3)


def inputs(batch=1, seed=1):
    g = torch.Generator().manual_seed(seed)
    n = GRID[0] * GRID[1]
    return dict(
        x=torch.randn(batch, n, 64, generator=g),
        img_ids=grid_ids(*GRID),
        txt=torch.randn(batch, L_TXT, TINY.context_in_dim, generator=g),
        txt_ids=torch.zeros(L_TXT, 3),
        t=torch.rand(batch, generator=g),
        y=torch.randn(batch, TINY.vec_in_dim, generator=g),
        guidance=1 + 4 * torch.rand(batch, generator=g),
        latent_cond=torch.randn(batch, n, 64, generator=g),
        pixel_cond=torch.rand(batch, 3, 16 * GRID[0], 16 * GRID[1], generator=g) * 2 - 1,
    )


def run_net(net, x, cond, mode=None):
    b = x["x"].shape[0]
    return net(
        x["x"], x["img_ids"].expand(b, -1, -1), x["txt"], x["txt_ids"].expand(b, -1, -1), x["t"], x["y"],
        x["guidance"], cond=cond, mode=mode,
    )  # fmt: skip


def run_diffusers_net(ref, x, cond, mode=None, scale=1.0):
    return ref(
        hidden_states=x["x"], controlnet_cond=cond,
        controlnet_mode=None if mode is None else torch.full((x["x"].shape[0], 1), mode),
        conditioning_scale=scale, encoder_hidden_states=x["txt"], pooled_projections=x["y"], timestep=x["t"],
        img_ids=x["img_ids"], txt_ids=x["txt_ids"],
        guidance=x["guidance"] if ref.config.guidance_embeds else None, return_dict=False,
    )  # fmt: skip


def saved(ref, tmp_path, name):
    folder = tmp_path / name
    ref.save_pretrained(folder, safe_serialization=True)
    return folder


# --- the ControlNet alone ---------------------------------------------------------------------------

NETS = {
    "instantx": dict(depth=2, single=3),
    "union-modes": dict(depth=2, single=2, num_mode=7, mode=4),
    "union-pro-2": dict(depth=6, single=0),
    "no-guidance": dict(depth=1, single=1, guidance=False),
}


@pytest.mark.parametrize("case", list(NETS))
def test_controlnet_matches_diffusers(case, tmp_path):
    spec = dict(NETS[case])
    mode = spec.pop("mode", None)
    ref = diffusers_controlnet(spec.pop("depth"), spec.pop("single"), **spec)
    net = load_controlnet(saved(ref, tmp_path, case))
    assert type(net) is FluxControlNet and net.num_modes == spec.get("num_mode")
    x = inputs(batch=2)
    with torch.no_grad():
        ours = run_net(net, x, x["latent_cond"], mode)
        d, s = run_diffusers_net(ref, x, x["latent_cond"], mode)
    assert len(ours.double) == len(d or []) and len(ours.single) == len(s or [])
    for a, b in zip(ours.double + ours.single, list(d or []) + list(s or [])):
        assert rel_err(a, b) <= 1e-5


def test_xlabs_controlnet_matches_diffusers(tmp_path):
    """XLabs file (BFL names, pixel hint block) → our XLabsControlNet; diffusers runs the same
    weights as FluxControlNetModel(conditioning_embedding_channels=16)."""
    config = TINY.replace(depth=2, depth_single_blocks=0)
    src = randomize(XLabsControlNet(config), seed=3).eval()
    write_safetensors(tmp_path / "xlabs.safetensors", src.state_dict())
    net = load_controlnet(tmp_path / "xlabs.safetensors", axes_dim=config.axes_dim)
    assert type(net) is XLabsControlNet and net.config == config
    ref = diffusers_controlnet(2, 0, hint=True)
    ref.load_state_dict(xlabs_to_diffusers(net), strict=True)
    x = inputs(batch=2)
    with torch.no_grad():
        ours = run_net(net, x, x["pixel_cond"])
        d, _ = run_diffusers_net(ref, x, x["pixel_cond"])
    for a, b in zip(ours.double, d):
        assert rel_err(a, b) <= 1e-5
    # The same weights as a diffusers-layout folder (XLabs converted by diffusers) load as XLabs.
    folder = saved(ref, tmp_path, "xlabs-diffusers")
    again = load_controlnet(folder)
    assert type(again) is XLabsControlNet
    assert all(torch.equal(again.state_dict()[k], v) for k, v in net.state_dict().items())


# --- injection into the base model ------------------------------------------------------------------


def base_model(seed=5):
    return randomize(Flux(BASE), seed).eval()


def controlled_velocity(flux, controls, x, sigmas=None):
    b = x["x"].shape[0]
    handle = attach_controlnets(flux, controls)
    try:
        den = ControlledDenoiser(FlowDenoiser(flux), handle, sigmas)
        return den.velocity(
            x["x"], x["t"], img_ids=x["img_ids"].expand(b, -1, -1), txt=x["txt"],
            txt_ids=x["txt_ids"].expand(b, -1, -1), y=x["y"], guidance=x["guidance"],
        )  # fmt: skip
    finally:
        handle.remove()


def diffusers_velocity(ref, x, double=None, single=None, repeat=False):
    return ref(
        hidden_states=x["x"], encoder_hidden_states=x["txt"], pooled_projections=x["y"], timestep=x["t"],
        img_ids=x["img_ids"], txt_ids=x["txt_ids"], guidance=x["guidance"], controlnet_block_samples=double,
        controlnet_single_block_samples=single, controlnet_blocks_repeat=repeat, return_dict=False,
    )[0]  # fmt: skip


def multi(d_outputs):
    """diffusers' multi-ControlNet sum (elementwise over the residual lists)."""
    ds = [o[0] for o in d_outputs]
    ss = [o[1] for o in d_outputs]
    double = [sum(t) for t in zip(*ds)] if ds[0] is not None else None
    single = [sum(t) for t in zip(*ss)] if ss[0] is not None else None
    return double, single


INJECTION = {
    "instantx": [dict(depth=2, single=3, scale=0.7)],
    "union-mode": [dict(depth=2, single=2, num_mode=7, mode=2, scale=0.9)],
    "union-pro-2": [dict(depth=3, single=0, scale=0.5)],  # 3 residuals over 5 blocks: 0,0,1,1,2
    "two-nets": [dict(depth=2, single=3, scale=0.6, seed=0), dict(depth=2, single=3, scale=1.3, seed=7)],
}


@pytest.mark.parametrize("case", list(INJECTION))
def test_injection_matches_diffusers(case, tmp_path):
    flux = base_model()
    ref = diffusers_transformer(flux)
    x = inputs(batch=2)
    controls, d_outputs = [], []
    for i, spec in enumerate(INJECTION[case]):
        spec = dict(spec)
        mode, scale = spec.pop("mode", None), spec.pop("scale")
        d_net = diffusers_controlnet(spec.pop("depth"), spec.pop("single"), **spec)
        net = load_controlnet(saved(d_net, tmp_path, f"{case}-{i}"))
        controls.append(Control(net, x["latent_cond"], mode=mode, scale=scale))
        with torch.no_grad():
            d_outputs.append(run_diffusers_net(d_net, x, x["latent_cond"], mode, scale))
    keys = list(flux.state_dict())
    with torch.no_grad():
        ours = controlled_velocity(flux, controls, x)
        theirs = diffusers_velocity(ref, x, *multi(d_outputs))
        plain = diffusers_velocity(ref, x)
    assert rel_err(ours, theirs) <= 1e-5
    assert rel_err(plain, theirs) > 1e-3  # the control did change the output
    assert list(flux.state_dict()) == keys


def test_xlabs_injection_matches_diffusers():
    flux = base_model()
    ref_flux = diffusers_transformer(flux)
    net = randomize(XLabsControlNet(TINY.replace(depth=2, depth_single_blocks=0)), seed=3).eval()
    ref = diffusers_controlnet(2, 0, hint=True)
    ref.load_state_dict(xlabs_to_diffusers(net), strict=True)
    x = inputs(batch=1)
    with torch.no_grad():
        ours = controlled_velocity(flux, [Control(net, x["pixel_cond"], scale=0.7)], x)
        d, _ = run_diffusers_net(ref, x, x["pixel_cond"], scale=0.7)
        theirs = diffusers_velocity(ref_flux, x, d, None, repeat=True)
    assert rel_err(ours, theirs) <= 1e-5


def test_guidance_window_and_remove():
    """Outside [start, end] a control adds nothing (the output is the plain model's, bit for bit);
    inside, it matches a control without a window. remove() restores the very same blocks."""
    flux = base_model()
    blocks = list(flux.double_blocks) + list(flux.single_blocks)
    net = randomize(FluxControlNet(TINY.replace(depth=1, depth_single_blocks=1)), 2).eval()
    x = inputs()
    sigmas = [1.0, 0.75, 0.5, 0.25, 0.0]  # 4 steps; window [0.25, 0.75] keeps steps 1 and 2
    plain = FlowDenoiser(flux)
    cond = dict(
        img_ids=x["img_ids"][None], txt=x["txt"], txt_ids=x["txt_ids"][None], y=x["y"], guidance=x["guidance"]
    )
    with torch.no_grad():
        for i, s in enumerate(sigmas[:-1]):
            windowed = controlled_velocity(
                flux,
                [Control(net, x["latent_cond"], start=0.25, end=0.75)],
                {**x, "t": torch.tensor([s])},
                sigmas,
            )
            always = controlled_velocity(
                flux, [Control(net, x["latent_cond"])], {**x, "t": torch.tensor([s])}
            )
            base = plain.velocity(x["x"], s, **cond)
            active = control_keep(i, 4, 0.25, 0.75)
            assert active == (i in (1, 2))
            assert torch.equal(windowed, always if active else base)
            assert not torch.allclose(always, base)
    assert list(flux.double_blocks) + list(flux.single_blocks) == blocks


def test_residual_index_rules():
    # Union-Pro 2.0: 6 residuals over FLUX's 19 double blocks, interval ceil(19/6) = 4: residual 5 unused.
    used = [residual_index(k, 19, 6, "interval") for k in range(19)]
    assert used == [k // 4 for k in range(19)] and 5 not in used
    # InstantX Union: 10 single residuals over 38 single blocks, interval 4.
    assert [residual_index(k, 38, 10, "interval") for k in (0, 3, 4, 37)] == [0, 0, 1, 9]
    # XLabs: 2 residuals repeated over 19 blocks.
    assert [residual_index(k, 19, 2, "repeat") for k in range(5)] == [0, 1, 0, 1, 0]


def test_prepare_control_image():
    net = FluxControlNet(TINY.replace(depth=1, depth_single_blocks=0))
    image = torch.rand(3, 32, 48) * 2 - 1
    encode = lambda im: im.mean(1, keepdim=True).repeat(1, 16, 1, 1)[..., ::8, ::8]  # noqa: E731
    assert prepare_control_image(net, image, 48, 32, encode).shape == (1, 6, 64)
    xl = XLabsControlNet(TINY.replace(depth=1, depth_single_blocks=0))
    assert torch.equal(prepare_control_image(xl, image, 48, 32), image[None])
    with pytest.raises(ConfigError, match="encode="):
        prepare_control_image(net, image, 48, 32)


def test_errors_are_named():
    union = FluxControlNet(TINY.replace(depth=1, depth_single_blocks=0), num_modes=7)
    plain = FluxControlNet(TINY.replace(depth=1, depth_single_blocks=0))
    cond = torch.zeros(1, 12, 64)
    with pytest.raises(ConfigError, match=r"\[0, 7\)"):
        Control(union, cond, mode=7)
    with pytest.raises(ConfigError, match="unknown control_mode"):
        Control(union, cond, mode="sketch")
    with pytest.raises(ConfigError, match="pass control_mode"):
        Control(union, cond)
    with pytest.raises(ConfigError, match="no control modes"):
        Control(plain, cond, mode=0)
    assert Control(union, cond, mode="depth").net.mode_index("depth") == CONTROL_MODES["depth"]
    with pytest.raises(ConfigError, match="start < end"):
        Control(plain, cond, start=0.8, end=0.2)
    wide = FluxControlNet(TINY.replace(hidden_size=128, num_heads=8, depth=1, depth_single_blocks=0))
    with pytest.raises(ConfigError, match="hidden_size=128.*another model"):
        attach_controlnets(base_model(), [Control(wide, cond)])
    flux = base_model()
    handle = attach_controlnets(flux, [Control(plain, cond)])
    with pytest.raises(ConfigError, match="already has ControlNets"):
        attach_controlnets(flux, [Control(plain, cond)])
    handle.remove()
    with pytest.raises(ConfigError, match="sigmas="):
        ControlledDenoiser(FlowDenoiser(flux), attach_controlnets(flux, [Control(plain, cond, end=0.5)]))


def test_build_controls_broadcasts_like_diffusers():
    from fluxcore.controlnet import build_controls

    union = FluxControlNet(TINY.replace(depth=1, depth_single_blocks=0), num_modes=7)
    xl = XLabsControlNet(TINY.replace(depth=1, depth_single_blocks=0))
    enc = lambda im: torch.zeros(im.shape[0], 16, im.shape[2] // 8, im.shape[3] // 8)  # noqa: E731
    img = torch.zeros(3, 32, 48)
    cs = build_controls(
        [union], [img, img], control_mode=["canny", 2], scale=[0.5, 0.8], width=48, height=32, encode=enc
    )
    assert [c.net for c in cs] == [union, union] and [c.mode for c in cs] == ["canny", 2]
    cs = build_controls(
        [union, xl], [img, img], control_mode=[0, None], end=0.5, width=48, height=32, encode=enc
    )
    assert cs[1].cond.shape == (1, 3, 32, 48) and cs[0].cond.shape == (1, 6, 64) and cs[1].end == 0.5
    with pytest.raises(ConfigError, match="one image per net"):
        build_controls([union, xl], img, width=48, height=32, encode=enc)
