"""Precomputed modulation: bit-for-bit equal to per-step modulation over a sampling loop, the
modulation weights unused during sampling (moved to meta they cannot be read), misses computed."""

import torch

from fluxcore import PRESETS, Flux, modulation_cache
from fluxcore.layers import Modulation


def setup(B=2):
    torch.manual_seed(0)
    model = Flux(PRESETS["tiny-dev"]).eval()
    g = torch.Generator().manual_seed(1)
    cond = dict(img_ids=torch.rand(B, 12, 3, generator=g) * 4, txt=torch.randn(B, 5, 48, generator=g),
                txt_ids=torch.zeros(B, 5, 3), y=torch.randn(B, 32, generator=g))  # fmt: skip
    return model, cond, torch.randn(B, 12, 64, generator=g)


def euler(model, x, cond, ts, guidance):
    outs = []
    for t, t_next in zip(ts[:-1], ts[1:]):
        tt = torch.full((x.shape[0],), t)
        v = model(img=x, timesteps=tt, guidance=torch.full((x.shape[0],), guidance), **cond)
        outs.append(v)
        x = x + (t_next - t) * v
    return x, outs


@torch.no_grad()
def test_bit_exact_and_offloaded():
    model, cond, x = setup()
    ts = [1.0, 0.8, 0.55, 0.3, 0.0]
    ref_x, ref_v = euler(model, x, cond, ts, 3.5)
    handle = modulation_cache.apply(model, ts[:-1], cond["y"], 3.5, offload_device="meta")
    assert len(handle.paths) == 2 * 2 + 2 + 1  # img_mod, txt_mod per double block, single, final
    assert model.double_blocks[0].img_mod.lin.weight.is_meta  # weights gone; lookups only
    assert list(model.state_dict()) == list(Flux(PRESETS["tiny-dev"]).state_dict())
    got_x, got_v = euler(model, x, cond, ts, 3.5)
    assert handle.misses == 0
    assert torch.equal(got_x, ref_x) and all(torch.equal(a, b) for a, b in zip(got_v, ref_v))


@torch.no_grad()
def test_miss_falls_back_and_remove():
    model, cond, x = setup()
    ts = [1.0, 0.5, 0.0]
    ref_x, _ = euler(model, x, cond, [1.0, 0.7, 0.0], 3.5)
    lin = model.single_blocks[0].modulation.lin
    handle = modulation_cache.apply(model, ts[:-1], cond["y"], 3.5)
    got_x, _ = euler(model, x, cond, [1.0, 0.7, 0.0], 3.5)  # t = 0.7 was not precomputed
    assert handle.misses == 1 and torch.equal(got_x, ref_x)
    assert sorted(handle.remove()) == sorted(handle.paths)
    assert type(model.single_blocks[0].modulation) is Modulation
    assert model.single_blocks[0].modulation.lin is lin
    assert type(model.final_layer.adaLN_modulation) is torch.nn.Sequential


@torch.no_grad()
def test_with_group_offload():
    """Offload hooks leave precomputed modulation weights alone (they stay on meta here)."""
    from fluxcore.offload import enable_group_offload

    model, cond, x = setup()
    ts = [1.0, 0.5, 0.0]
    ref_x, _ = euler(model, x, cond, ts, 3.5)
    handle = modulation_cache.apply(model, ts[:-1], cond["y"], 3.5, offload_device="meta")
    off = enable_group_offload(model, "cpu")
    got_x, _ = euler(model, x, cond, ts, 3.5)
    assert torch.equal(got_x, ref_x) and handle.misses == 0
    assert model.double_blocks[0].img_mod.lin.weight.is_meta
    off.remove()
