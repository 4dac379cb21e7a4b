"""Step caches (fluxcore.cache): invariants on a tiny random model with a 28-step Euler loop.

- A cache that never skips (threshold 0, interval 1) is bit-identical to no cache, for every kind.
- Large thresholds skip; stats count full and skipped trunk evaluations.
- State-dict keys, parameters and block objects are unchanged; `remove` restores plain ModuleLists
  and exact outputs; the lists iterate their blocks outside a forward.
- Two conditionings interleaved (true CFG) keep separate caches: each gives what it gives alone.
- A second generation starts a fresh trajectory; a block swapped in after `apply` is the one run.
Quality (PSNR/SSIM/accuracy) is measured by benchmarks/cache.py, not here.
"""

import numpy as np
import pytest
import torch
from torch import nn

import fluxcore.cache as cache
from fluxcore import PRESETS, Flux
from fluxcore.errors import ConfigError, FluxcoreError

STEPS = 28
NEVER_SKIP = {
    "first_block": {"threshold": 0.0},
    "teacache": {"threshold": 0.0},
    "taylorseer": {"interval": 1},
}
ALWAYS_SKIP = {
    "first_block": {"threshold": 100.0},
    "teacache": {"threshold": 100.0},
    "taylorseer": {"interval": 100},
}


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    model = Flux(PRESETS["tiny-dev"]).eval()
    cfg = model.config
    B, L, Lt = 2, 20, 7  # non-square 4×5 latent grid, odd prompt length
    ids = torch.zeros(B, L, 3)
    ids[..., 1] = torch.arange(L) // 5
    ids[..., 2] = torch.arange(L) % 5
    cond = {
        "img_ids": ids,
        "txt": torch.randn(B, Lt, cfg.context_in_dim),
        "txt_ids": torch.zeros(B, Lt, 3),
        "y": torch.randn(B, cfg.vec_in_dim),
        "guidance": torch.full((B,), 3.5),
    }
    noise = torch.randn(B, L, cfg.in_channels)
    return model, noise, cond


def euler(model, noise, cond, steps=STEPS):
    ts = torch.linspace(1, 0, steps + 1)
    x = noise.clone()
    with torch.no_grad():
        for i in range(steps):
            t = ts[i].expand(x.shape[0])
            v = model(x, cond["img_ids"], cond["txt"], cond["txt_ids"], t, cond["y"], cond["guidance"])
            x = x + (ts[i + 1] - ts[i]) * v
    return x


@pytest.mark.parametrize("kind", cache.KINDS)
def test_never_skipping_cache_is_bit_identical_and_removable(setup, kind):
    model, noise, cond = setup
    ref = euler(model, noise, cond)
    keys, params = list(model.state_dict()), list(model.parameters())
    blocks = [*model.double_blocks, *model.single_blocks]
    handle = cache.apply(model, kind, **NEVER_SKIP[kind])
    try:
        assert list(model.state_dict()) == keys
        assert all(a is b for a, b in zip(model.parameters(), params))
        assert [*model.double_blocks, *model.single_blocks] == blocks  # outside a forward: the blocks
        assert model.double_blocks[0] is blocks[0] and len(model.single_blocks) == 2
        assert torch.equal(euler(model, noise, cond), ref)
        assert (handle.stats.full, handle.stats.skipped) == (STEPS, 0)
    finally:
        assert handle.remove() == ["double_blocks", "single_blocks"]
    assert handle.remove() == []
    assert type(model.double_blocks) is nn.ModuleList and type(model.single_blocks) is nn.ModuleList
    assert [*model.double_blocks, *model.single_blocks] == blocks
    assert not model._forward_pre_hooks and not model._forward_hooks
    assert torch.equal(euler(model, noise, cond), ref)


@pytest.mark.parametrize("kind", cache.KINDS)
def test_large_thresholds_skip_and_stay_close(setup, kind):
    model, noise, cond = setup
    ref = euler(model, noise, cond)
    with_cache = cache.apply(model, kind, **ALWAYS_SKIP[kind])
    try:
        out = euler(model, noise, cond)
    finally:
        with_cache.remove()
    stats = with_cache.stats
    assert stats.calls == STEPS and stats.skipped >= STEPS - 3, stats
    assert torch.isfinite(out).all() and not torch.equal(out, ref)


def test_moderate_threshold_skips_some_steps(setup):
    model, noise, cond = setup
    ref = euler(model, noise, cond)
    h = cache.apply(model, "teacache", threshold=0.6, num_steps=STEPS)
    try:
        out = euler(model, noise, cond)
    finally:
        h.remove()
    assert 0 < h.stats.skipped < STEPS - 2
    assert (out - ref).abs().max() < 0.2 * ref.abs().max()


def test_second_generation_starts_a_new_trajectory(setup):
    model, noise, cond = setup
    h = cache.apply(model, "first_block", threshold=0.3)
    try:
        a = euler(model, noise, cond)
        first = h.stats.skipped
        b = euler(model, noise, cond)
    finally:
        h.remove()
    assert 0 < first < STEPS - 1
    assert torch.equal(a, b) and h.stats.skipped == 2 * first


def test_interleaved_conditionings_keep_separate_caches(setup):
    """True CFG calls the model twice per step with different text: each pass keeps its own cache."""
    model, noise, cond = setup
    other = {**cond, "txt": torch.randn_like(cond["txt"]), "y": torch.randn_like(cond["y"])}
    h = cache.apply(model, "taylorseer", interval=3)
    try:
        alone = [euler(model, noise, c) for c in (cond, other)]
        ts = torch.linspace(1, 0, STEPS + 1)
        xs = [noise.clone(), noise.clone()]
        with torch.no_grad():
            for i in range(STEPS):
                for j, c in enumerate((cond, other)):
                    t = ts[i].expand(noise.shape[0])
                    v = model(xs[j], c["img_ids"], c["txt"], c["txt_ids"], t, c["y"], c["guidance"])
                    xs[j] = xs[j] + (ts[i + 1] - ts[i]) * v
    finally:
        h.remove()
    assert h.stats.skipped > 0
    assert torch.equal(xs[0], alone[0]) and torch.equal(xs[1], alone[1])


def test_inputs_rebuilt_every_call_keep_their_trajectories(setup):
    """A caller that builds fresh tensors for every call (cond and uncond interleaved, copies of
    the text each time, all kept alive so no address is reused) gets the same trajectories as a
    caller that passes the same tensors."""
    model, noise, cond = setup
    other = {**cond, "txt": torch.randn_like(cond["txt"]), "y": torch.randn_like(cond["y"])}
    h = cache.apply(model, "taylorseer", interval=3)
    try:
        alone = [euler(model, noise, c) for c in (cond, other)]
        skipped_alone = h.stats.skipped
        ts = torch.linspace(1, 0, STEPS + 1)
        xs, kept = [noise.clone(), noise.clone()], []
        with torch.no_grad():
            for i in range(STEPS):
                for j, c in enumerate((cond, other)):
                    fresh = {k: v.clone() for k, v in c.items()}
                    kept.append(fresh)
                    t = ts[i].expand(noise.shape[0]).clone()
                    v = model(
                        xs[j],
                        fresh["img_ids"],
                        fresh["txt"],
                        fresh["txt_ids"],
                        t,
                        fresh["y"],
                        fresh["guidance"],
                    )
                    xs[j] = xs[j] + (ts[i + 1] - ts[i]) * v
    finally:
        h.remove()
    assert skipped_alone > 0 and h.stats.skipped == 2 * skipped_alone
    assert torch.equal(xs[0], alone[0]) and torch.equal(xs[1], alone[1])


def test_block_swapped_in_after_apply_is_honoured(setup):
    model, noise, cond = setup
    original = model.single_blocks[1]
    calls = []

    class Counting(nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x, vec, pe):
            calls.append(1)
            return self.inner(x, vec=vec, pe=pe)

    h = cache.apply(model, "first_block", threshold=0.0)
    try:
        model.single_blocks[1] = Counting(original)
        euler(model, noise, cond, steps=3)
        assert len(calls) == 3
    finally:
        h.remove()
        model.single_blocks[1] = original


def test_errors_name_the_problem(setup):
    model, _, _ = setup
    with pytest.raises(ConfigError, match="unknown cache kind 'fast'"):
        cache.apply(model, "fast")
    with pytest.raises(ConfigError, match="first_block"):
        cache.apply(model, "first_block", interval=3)
    with pytest.raises(ConfigError, match="interval"):
        cache.apply(model, "taylorseer", interval=0)
    h = cache.apply(model, "teacache")
    try:
        with pytest.raises(FluxcoreError, match="already has a step cache"):
            cache.apply(model, "first_block")
    finally:
        h.remove()


def test_teacache_polynomial_is_flux_published_one():
    tc = cache.TeaCache()
    coeffs = [4.98651651e02, -2.83781631e02, 5.58554382e01, -3.82021401e00, 2.64230861e-01]
    for x in (0.0, 0.01, 0.05, 0.2):
        assert tc.rescale(x) == pytest.approx(np.polyval(coeffs, x), rel=1e-12)


def test_spec_parsing_for_cli_and_pipeline():
    assert cache.parse("first_block:0.08") == ("first_block", {"threshold": 0.08})
    assert cache.parse("first-block") == ("first_block", {})
    assert cache.parse("taylorseer:4") == ("taylorseer", {"interval": 4})
    assert cache.parse(("teacache", {"threshold": 0.6})) == ("teacache", {"threshold": 0.6})
    assert cache.parse({"kind": "teacache", "num_steps": 28}) == ("teacache", {"num_steps": 28})
    with pytest.raises(ConfigError, match="interval must be a int"):
        cache.parse("taylorseer:0.5")
    with pytest.raises(ConfigError, match="unknown cache kind"):
        cache.parse("magcache:0.1")


def test_num_steps_forces_the_last_step(setup):
    model, noise, cond = setup
    for kind, opts in ALWAYS_SKIP.items():
        h = cache.apply(model, kind, num_steps=STEPS, **opts)
        try:
            euler(model, noise, cond)
        finally:
            h.remove()
        assert h.stats.full >= 2, (kind, h.stats)  # the first and the last
