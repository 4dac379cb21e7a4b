"""Named schedulers (ComfyUI's names) against their closed forms, and each one on the closed-form
Gaussian flow."""

import math

import numpy as np
import pytest
import torch

from fluxcore.errors import ConfigError
from fluxcore.schedules import (
    SCHEDULERS,
    U_MIN,
    ScheduleConfig,
    get_schedule,
    get_scheduler,
    make_schedule,
    schedule_beta,
    schedule_karras,
)


def shift_of(cfg, seq):
    return lambda t: cfg.apply(t, seq)


def test_names_are_comfyuis():
    assert list(SCHEDULERS) == ["simple", "normal", "karras", "exponential", "beta", "sgm_uniform"]
    with pytest.raises(ConfigError, match="known schedulers: simple, normal"):
        get_scheduler("linear_quadratic2")


@pytest.mark.parametrize("name", list(SCHEDULERS))
@pytest.mark.parametrize("n", [1, 2, 7, 28])
@pytest.mark.parametrize(
    "cfg",
    [ScheduleConfig(), ScheduleConfig.unshifted(), ScheduleConfig(use_dynamic_shifting=False, shift=3.0)],
)
def test_every_schedule_is_a_flow_grid(name, n, cfg):
    ts = make_schedule(name, n, 1024, cfg)
    assert len(ts) == n + 1 and ts[-1] == 0.0 and abs(ts[0] - 1.0) < 1e-12
    assert all(a > b for a, b in zip(ts, ts[1:])), ts


def closed_forms(name, n, f):
    u = np.linspace(1, U_MIN, n)
    hi, lo = f(1.0), f(U_MIN)
    if name == "simple":
        return [f(1 - i / n) for i in range(n + 1)]
    if name == "normal":
        return [f(v) for v in u] + [0.0]
    if name == "sgm_uniform":
        return [f(v) for v in np.linspace(1, U_MIN, n + 1)[:-1]] + [0.0]
    if name == "karras":
        r = np.linspace(0, 1, n)
        return list((hi ** (1 / 7) + r * (lo ** (1 / 7) - hi ** (1 / 7))) ** 7) + [0.0]
    if name == "exponential":
        return list(np.exp(np.linspace(math.log(hi), math.log(lo), n))) + [0.0]
    raise AssertionError(name)


@pytest.mark.parametrize("name", ["simple", "normal", "sgm_uniform", "karras", "exponential"])
def test_closed_forms(name):
    mu = 0.5 + (1024 - 256) * 0.65 / 3840

    def f(t):  # the FLUX shift, in float64
        return 0.0 if t <= 0 else math.exp(mu) / (math.exp(mu) + (1 / t - 1))

    ours = make_schedule(name, 9, 1024, ScheduleConfig())
    np.testing.assert_allclose(ours, closed_forms(name, 9, f), rtol=0, atol=2e-7)
    assert make_schedule("simple", 9, 1024) == get_schedule(9, 1024)


def test_beta_quantiles():
    # Beta(1, 1) is uniform: its quantiles are the identity; Beta(½, ½) has the arcsine law
    np.testing.assert_allclose(schedule_beta(4, alpha=1.0, beta=1.0), [1, 0.75, 0.5, 0.25, 0], atol=1e-6)
    q = 1 - np.arange(5) / 5
    arcsine = np.sin(np.pi * q / 2) ** 2
    np.testing.assert_allclose(
        schedule_beta(5, alpha=0.5, beta=0.5)[:-1], np.clip(arcsine, U_MIN, 1), atol=1e-6
    )
    # the default α = β = 0.6 is symmetric around ½ and crowds both ends
    ts = schedule_beta(10)
    assert abs(ts[5] - 0.5) < 1e-6 and ts[0] - ts[1] < ts[4] - ts[5]
    with pytest.raises(ConfigError, match="alpha, beta >= 0.5"):
        schedule_beta(4, alpha=0.3)


def test_karras_rho():
    ts = schedule_karras(5, rho=1.0)  # rho 1: linear in flow time
    np.testing.assert_allclose(ts[:-1], np.linspace(1, U_MIN, 5), atol=1e-12)


@pytest.mark.parametrize("name", list(SCHEDULERS))
def test_euler_converges_with_every_schedule(name):
    # the Gaussian flow's exact endpoint; Euler over each grid converges to it (the table-based ones
    # stop at U_MIN before jumping to 0: their error floor is O(U_MIN²))
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent))
    from test_sampling import GaussianDenoiser, exact_endpoint

    from fluxcore.sampling import sample_heun

    x1 = torch.linspace(-2.5, 2.5, 11, dtype=torch.float64).reshape(11, 1, 1)
    errs = []
    for n in (16, 64):
        ts = make_schedule(name, n, 1024)
        x = sample_heun(GaussianDenoiser(0.7, 0.4), x1.clone(), ts, disable=True)
        errs.append((x - exact_endpoint(x1, 0.7, 0.4)).abs().max().item())
    assert errs[1] < errs[0] and errs[1] < 5e-3, errs
