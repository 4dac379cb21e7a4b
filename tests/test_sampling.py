"""Schedules and samplers: the reference's closed forms, diffusers' scheduler, a literal
transcription of the reference denoise loop, and closed-form Gaussian flows."""

import math

import numpy as np
import pytest
import torch

from fluxcore import PRESETS, Flux
from fluxcore.errors import ConfigError, FluxcoreError
from fluxcore.latents import get_noise, make_img_ids, make_txt_ids, pack
from fluxcore.sampling import (
    SAMPLERS,
    CFGDenoiser,
    FlowDenoiser,
    ScheduleConfig,
    denoise,
    flow_times,
    get_sampler,
    get_schedule,
    nan_guard,
    per_sample,
    report,
    sample_dpmpp_2m,
    sample_euler,
    sample_euler_ancestral,
    sample_heun,
    time_shift,
)

# --- schedule ---------------------------------------------------------------------------------


def closed_form_schedule(n, seq_len, shift=True):
    t = np.array([1 - i / n for i in range(n + 1)], dtype=np.float64)
    if not shift:
        return t
    mu = 0.5 + (seq_len - 256) * (1.15 - 0.5) / (4096 - 256)
    with np.errstate(divide="ignore"):
        return math.exp(mu) / (math.exp(mu) + (1 / t - 1))


@pytest.mark.parametrize("hw", [(256, 256), (512, 768), (1024, 1024), (1360, 768), (2048, 2048)])
@pytest.mark.parametrize("n", [1, 4, 28, 50])
def test_schedule_closed_form(hw, n):
    seq = math.ceil(hw[0] / 16) * math.ceil(hw[1] / 16)
    ts = get_schedule(n, seq)
    assert len(ts) == n + 1 and ts[0] == 1.0 and ts[-1] == 0.0
    np.testing.assert_allclose(ts, closed_form_schedule(n, seq), rtol=0, atol=3e-7)
    assert all(a > b for a, b in zip(ts, ts[1:]))


def test_schnell_unshifted():
    assert get_schedule(4, 4096, shift=False) == [1.0, 0.75, 0.5, 0.25, 0.0]
    np.testing.assert_allclose(
        get_schedule(7, 999, shift=False), closed_form_schedule(7, 999, False), atol=1e-7
    )


def test_time_shift_endpoints_and_mu():
    t = torch.tensor([1.0, 0.5, 0.0])
    out = time_shift(1.15, 1.0, t)
    assert out[0] == 1 and out[2] == 0
    assert abs(out[1].item() - math.exp(1.15) / (math.exp(1.15) + 1)) < 1e-6


@pytest.mark.parametrize("n,seq", [(4, 256), (28, 4096), (13, 1110)])
def test_schedule_matches_diffusers_scheduler(n, seq):
    diffusers = pytest.importorskip("diffusers")
    sch = diffusers.FlowMatchEulerDiscreteScheduler(
        use_dynamic_shifting=True,
        base_shift=0.5,
        max_shift=1.15,
        base_image_seq_len=256,
        max_image_seq_len=4096,
    )
    mu = 0.5 + (seq - 256) * (1.15 - 0.5) / (4096 - 256)
    sch.set_timesteps(sigmas=np.linspace(1.0, 1 / n, n), mu=mu)
    np.testing.assert_allclose(get_schedule(n, seq), sch.sigmas.double().numpy(), atol=1e-6)


@pytest.mark.parametrize("bad", [0, -3, 2.5, True])
def test_schedule_rejects_bad_steps(bad):
    with pytest.raises(ConfigError, match="num_steps"):
        get_schedule(bad, 256)


def calculate_shift(seq_len, base_seq_len, max_seq_len, base_shift, max_shift):
    """diffusers' FluxPipeline `calculate_shift`, written out: μ on the line through
    (base_seq_len, base_shift) and (max_seq_len, max_shift)."""
    m = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    return seq_len * m + (base_shift - m * base_seq_len)


def diffusers_sigmas(scheduler_config: dict, n: int, seq_len: int) -> np.ndarray:
    """The flow times diffusers' FluxPipeline runs for this scheduler config."""
    diffusers = pytest.importorskip("diffusers")
    sch = diffusers.FlowMatchEulerDiscreteScheduler.from_config(scheduler_config)
    c = sch.config
    mu = calculate_shift(seq_len, c.base_image_seq_len, c.max_image_seq_len, c.base_shift, c.max_shift)
    sch.set_timesteps(sigmas=np.linspace(1.0, 1 / n, n), mu=mu)
    return sch.sigmas.double().numpy()


SCHEDULER_CONFIGS = {
    "dev": dict(use_dynamic_shifting=True, shift=3.0, base_shift=0.5, max_shift=1.15,
                base_image_seq_len=256, max_image_seq_len=4096),
    "other_line": dict(use_dynamic_shifting=True, shift=3.0, base_shift=0.2, max_shift=2.0,
                       base_image_seq_len=64, max_image_seq_len=1024),
    "static_3": dict(use_dynamic_shifting=False, shift=3.0),
    "schnell": dict(use_dynamic_shifting=False, shift=1.0),
}  # fmt: skip


@pytest.mark.parametrize("name", SCHEDULER_CONFIGS)
@pytest.mark.parametrize("n,seq", [(4, 256), (28, 4096), (13, 1110), (1, 77)])
def test_schedule_config_matches_diffusers_scheduler(name, n, seq):
    raw = {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000}
    raw.update(SCHEDULER_CONFIGS[name])
    cfg = ScheduleConfig.from_scheduler_config(raw)
    ts = get_schedule(n, seq, config=cfg)
    assert len(ts) == n + 1 and ts[0] == 1.0 and ts[-1] == 0.0
    np.testing.assert_allclose(ts, diffusers_sigmas(raw, n, seq), atol=1e-6)


def test_schedule_config_defaults_and_legacy_arguments():
    # the dataclass defaults are the reference's dev schedule; `unshifted` is schnell's
    assert get_schedule(9, 1234, config=ScheduleConfig()) == get_schedule(9, 1234)
    assert get_schedule(4, 4096, config=ScheduleConfig.unshifted()) == [1.0, 0.75, 0.5, 0.25, 0.0]
    assert get_schedule(6, 999, 0.3, 1.4) == get_schedule(
        6, 999, config=ScheduleConfig(base_shift=0.3, max_shift=1.4)
    )
    # a scheduler config reads missing keys as diffusers does (static shift 1 = unshifted)
    assert ScheduleConfig.from_scheduler_config({}) == ScheduleConfig.unshifted()
    static = ScheduleConfig.from_scheduler_config({"use_dynamic_shifting": False, "shift": 3.0})
    assert get_schedule(2, 4096, config=static) == pytest.approx([1.0, 0.75, 0.0])  # 3·½ / (1 + 2·½)
    with pytest.raises(ConfigError, match="either config= or base_shift"):
        get_schedule(4, 256, shift=False, config=ScheduleConfig())


@pytest.mark.parametrize(
    "raw,match",
    [
        ({"shift_terminal": 0.1}, "shift_terminal"),
        ({"use_karras_sigmas": True}, "use_karras_sigmas"),
        ({"time_shift_type": "linear"}, "time_shift_type"),
        ({"shift": 0.0}, "shift must be > 0"),
        ({"base_image_seq_len": 256, "max_image_seq_len": 256}, "must differ"),
        ({"shift": "big"}, "wrong type"),
    ],
)
def test_schedule_config_refuses_what_it_does_not_compute(raw, match):
    with pytest.raises(ConfigError, match=match):
        ScheduleConfig.from_scheduler_config(raw)


def test_sampler_building_blocks():
    x = torch.zeros(3, 2, 4)
    assert flow_times(torch.tensor([1.0, 0.5, 0.0])) == [1.0, 0.5, 0.0]
    with pytest.raises(ConfigError, match="at least 2"):
        flow_times([1.0])
    s = per_sample(0.25, x.double())
    assert s.shape == (3,) and s.dtype == torch.float64 and torch.all(s == 0.25)
    seen = []
    model = lambda x, sigma, c=0.0: x * 0 + sigma.reshape(-1, 1, 1) + c
    torch.testing.assert_close(denoise(model, x, 0.5, c=1.0), torch.full_like(x, 1.5))
    report(seen.append, x, 2, 0.5, x)
    report(None, x, 2, 0.5, x)
    assert [sorted(d) for d in seen] == [["denoised", "i", "sigma", "sigma_hat", "x"]]


# --- Euler is the reference loop ------------------------------------------------------------


def reference_denoise(
    model,
    img,
    img_ids,
    txt,
    txt_ids,
    vec,
    timesteps,
    guidance=4.0,
    img_cond=None,
    img_cond_seq=None,
    img_cond_seq_ids=None,
):
    """Literal transcription of the reference `denoise` (BFL src/flux/sampling.py)."""
    guidance_vec = torch.full((img.shape[0],), guidance, device=img.device, dtype=img.dtype)
    for t_curr, t_prev in zip(timesteps[:-1], timesteps[1:]):
        t_vec = torch.full((img.shape[0],), t_curr, dtype=img.dtype, device=img.device)
        img_input = img
        img_input_ids = img_ids
        if img_cond is not None:
            img_input = torch.cat((img, img_cond), dim=-1)
        if img_cond_seq is not None:
            img_input = torch.cat((img_input, img_cond_seq), dim=1)
            img_input_ids = torch.cat((img_input_ids, img_cond_seq_ids), dim=1)
        pred = model(
            img=img_input,
            img_ids=img_input_ids,
            txt=txt,
            txt_ids=txt_ids,
            y=vec,
            timesteps=t_vec,
            guidance=guidance_vec,
        )
        if img_input_ids is not None:
            pred = pred[:, : img.shape[1]]
        img = img + (t_prev - t_curr) * pred
    return img


def tiny_inputs(cfg, b=2, h=48, w=80, l_txt=5, dtype=torch.float32):
    g = torch.Generator().manual_seed(1)
    img = pack(get_noise(b, h, w, dtype=dtype, seed=0))
    return dict(
        img=img,
        img_ids=make_img_ids(b, h, w),
        txt=torch.randn(b, l_txt, cfg.context_in_dim, generator=g).to(dtype),
        txt_ids=make_txt_ids(b, l_txt),
        vec=torch.randn(b, cfg.vec_in_dim, generator=g).to(dtype),
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("preset,shift", [("tiny-dev", True), ("tiny-schnell", False)])
def test_euler_is_reference_loop_bitwise(dtype, preset, shift):
    torch.manual_seed(0)
    cfg = PRESETS[preset]
    model = Flux(cfg).to(dtype).eval()
    inp = tiny_inputs(cfg, dtype=dtype)
    ts = get_schedule(5, inp["img"].shape[1], shift=shift)
    with torch.no_grad():
        ref = reference_denoise(model, **inp, timesteps=ts, guidance=3.5)
    extra = dict(img_ids=inp["img_ids"], txt=inp["txt"], txt_ids=inp["txt_ids"], y=inp["vec"], guidance=3.5)
    out = sample_euler(FlowDenoiser(model), inp["img"], ts, extra_args=extra, disable=True)
    assert out.dtype == dtype
    assert torch.equal(out, ref)
    # the schedule as a tensor gives the same floats
    out_t = sample_euler(FlowDenoiser(model), inp["img"], torch.tensor(ts), extra_args=extra, disable=True)
    assert torch.equal(out_t, ref)


def test_euler_is_reference_loop_with_channel_and_sequence_conditioning():
    torch.manual_seed(0)
    cfg = PRESETS["tiny-canny"]
    model = Flux(cfg).eval()
    inp = tiny_inputs(cfg, b=1, h=32, w=48)
    g = torch.Generator().manual_seed(5)
    img_cond = torch.randn(1, inp["img"].shape[1], 64, generator=g)
    seq = pack(torch.randn(1, 16, 4, 2, generator=g))
    seq_ids = make_img_ids(1, 32, 16, index=1)
    ts = get_schedule(3, inp["img"].shape[1])
    with torch.no_grad():
        ref = reference_denoise(
            model,
            **inp,
            timesteps=ts,
            guidance=2.5,
            img_cond=img_cond,
            img_cond_seq=torch.cat((seq, torch.zeros(1, seq.shape[1], 64)), -1),
            img_cond_seq_ids=seq_ids,
        )
    extra = dict(
        img_ids=inp["img_ids"],
        txt=inp["txt"],
        txt_ids=inp["txt_ids"],
        y=inp["vec"],
        guidance=2.5,
        img_cond=img_cond,
        img_cond_seq=torch.cat((seq, torch.zeros(1, seq.shape[1], 64)), -1),
        img_cond_seq_ids=seq_ids,
    )
    out = sample_euler(FlowDenoiser(model), inp["img"], ts, extra_args=extra, disable=True)
    assert torch.equal(out, ref)


def test_flow_denoiser_x0_and_velocity_agree():
    torch.manual_seed(0)
    cfg = PRESETS["tiny-dev"]
    model = Flux(cfg).double().eval()
    inp = tiny_inputs(cfg, dtype=torch.float64)
    den = FlowDenoiser(model)
    extra = dict(img_ids=inp["img_ids"], txt=inp["txt"], txt_ids=inp["txt_ids"], y=inp["vec"], guidance=3.0)
    x, t = inp["img"], torch.tensor([0.7, 0.3], dtype=torch.float64)
    with torch.no_grad():
        v = den.velocity(x, t, **extra)
        x0 = den(x, t, **extra)
        direct = model(
            img=x,
            img_ids=inp["img_ids"],
            txt=inp["txt"],
            txt_ids=inp["txt_ids"],
            timesteps=t,
            y=inp["vec"],
            guidance=torch.full((2,), 3.0, dtype=torch.float64),
        )
    assert torch.equal(v, direct)
    torch.testing.assert_close(x0, x - t[:, None, None] * v, rtol=0, atol=1e-12)


# --- closed-form Gaussian flows -------------------------------------------------------------


class GaussianDenoiser:
    """Exact E[x0 | x_t] for data N(mu, s²·I) under x_t = (1 − t)·x0 + t·ε (no velocity method,
    so the samplers take the generic x0 path)."""

    def __init__(self, mu, s):
        self.mu, self.s = mu, s
        self.calls = 0

    def __call__(self, x, sigma):
        self.calls += 1
        t = sigma.reshape(-1, *[1] * (x.ndim - 1)).to(x.dtype)
        var = (1 - t) ** 2 * self.s**2 + t**2
        return self.mu + (1 - t) * self.s**2 / var * (x - (1 - t) * self.mu)


def exact_endpoint(x1, mu, s):
    # The probability-flow ODE maps quantiles: x_t = (1 − t)·mu + sqrt((1 − t)²s² + t²)·x_1.
    return mu + s * x1


def errors(sampler, mu, s, steps, shift):
    x1 = torch.linspace(-2.5, 2.5, 11, dtype=torch.float64).reshape(11, 1, 1)
    out = []
    for n in steps:
        ts = torch.tensor(get_schedule(n, 4096, shift=shift), dtype=torch.float64)
        x = sampler(GaussianDenoiser(mu, s), x1.clone(), ts, disable=True)
        out.append((x - exact_endpoint(x1, mu, s)).abs().max().item())
    return out


def orders(errs):
    return [math.log2(a / b) for a, b in zip(errs, errs[1:])]


@pytest.mark.parametrize("mu,s", [(0.7, 0.4), (-0.3, 2.0)])
@pytest.mark.parametrize("shift", [False, True])
def test_order_euler_and_heun(mu, s, shift):
    steps = [32, 64, 128]
    p_euler = orders(errors(sample_euler, mu, s, steps, shift))
    p_heun = orders(errors(sample_heun, mu, s, steps, shift))
    assert all(0.9 < p < 1.1 for p in p_euler), p_euler
    assert all(1.85 < p < 2.15 for p in p_heun), p_heun


@pytest.mark.parametrize("mu,s", [(0.7, 0.4), (0.0, 1.0), (-0.3, 2.0)])
def test_order_dpmpp_2m(mu, s):
    # λ = log((1 − t)/t) is infinite at both ends of the flow path, so the steps next to t = 1 and
    # t = 0 stay O(1) wide in λ; their second-order local errors add up to C·log(N)/N². With the
    # log divided out the order is 2; the raw order tends to 2 from below (≈ 1.8 at N = 256).
    steps = [128, 256, 512]
    errs = errors(sample_dpmpp_2m, mu, s, steps, shift=False)
    p = orders([e / math.log(n) for e, n in zip(errs, steps)])
    assert all(1.8 < q < 2.2 for q in p), (p, orders(errs))
    # far more accurate than Euler for the same number of model calls
    assert errs[0] < 0.1 * errors(sample_euler, mu, s, [128], shift=False)[0]
    # the resolution-shifted FLUX grid crowds steps near t = 1 and reaches the asymptote later
    raw = orders(errors(sample_dpmpp_2m, mu, s, [512, 1024], shift=True))
    assert 1.6 < raw[0] < 2.2, raw


def test_model_calls_per_step():
    ts = get_schedule(10, 256)
    x = torch.zeros(3, 1, 1, dtype=torch.float64)
    for fn, calls in [
        (sample_euler, 10),
        (sample_heun, 19),
        (sample_dpmpp_2m, 10),
        (sample_euler_ancestral, 10),
    ]:
        m = GaussianDenoiser(0.0, 1.0)
        fn(m, x, ts, disable=True)
        assert m.calls == calls, fn.__name__


def test_single_step_is_x0_for_every_sampler():
    m = GaussianDenoiser(0.3, 0.5)
    x = torch.randn(4, 2, 3, dtype=torch.float64)
    want = m(x, torch.ones(4, dtype=torch.float64))
    for name, fn in SAMPLERS.items():
        torch.testing.assert_close(fn(m, x, [1.0, 0.0], disable=True), want, msg=name)


def test_ancestral_eta0_is_euler_and_seeded():
    m = GaussianDenoiser(0.2, 0.7)
    x = torch.randn(5, 3, 2, dtype=torch.float64)
    ts = get_schedule(12, 1024)
    torch.testing.assert_close(
        sample_euler_ancestral(m, x, ts, eta=0.0, disable=True),
        sample_euler(m, x, ts, disable=True),
        rtol=1e-12,
        atol=1e-12,
    )
    a = sample_euler_ancestral(m, x, ts, generator=torch.Generator().manual_seed(4), disable=True)
    b = sample_euler_ancestral(m, x, ts, generator=torch.Generator().manual_seed(4), disable=True)
    c = sample_euler_ancestral(m, x, ts, generator=torch.Generator().manual_seed(5), disable=True)
    assert torch.equal(a, b) and not torch.equal(a, c)


def ancestral_moments(mu, s, ts, eta):
    """Exact mean and variance after the ancestral chain for data N(mu, s²) and x_1 ~ N(0, 1):
    every step is affine in x plus independent noise, x_t = A·x_s + B + c·z."""
    m, v = 0.0, 1.0
    for a, b in zip(ts, ts[1:]):
        k = (1 - a) * s**2 / ((1 - a) ** 2 * s**2 + a**2)  # D = mu + k·(x − (1 − a)·mu)
        d_x, d_0 = k, mu * (1 - k * (1 - a))  # D = d_x·x + d_0
        if b == 0:
            m, v = d_x * m + d_0, d_x**2 * v
            continue
        ratio = (1 - a) * b / ((1 - b) * a)
        c = eta * b * math.sqrt(max(0.0, 1 - ratio**2))
        e_x, e_0 = (1 - (1 - a) * d_x) / a, -(1 - a) * d_0 / a  # eps_hat = e_x·x + e_0
        r = math.sqrt(max(0.0, b * b - c * c))
        A, B = (1 - b) * d_x + r * e_x, (1 - b) * d_0 + r * e_0
        m, v = A * m + B, A**2 * v + c**2
    return m, v


@pytest.mark.parametrize("eta", [1.0, 0.5])
def test_ancestral_converges_to_the_target_distribution(eta):
    mu, s = 0.6, 0.45
    # the chain's exact output law tends to N(mu, s²) as steps grow (first order)
    errs = []
    for n in [100, 200, 400, 800]:
        m, v = ancestral_moments(mu, s, get_schedule(n, 1024), eta)
        errs.append(abs(m - mu) + abs(v - s**2))
    assert errs[-1] < 3e-3 and all(0.8 < p < 1.2 for p in orders(errs)), (errs, orders(errs))
    # and the sampler's Monte Carlo moments are those of the chain
    ts = get_schedule(20, 1024)
    g = torch.Generator().manual_seed(0)
    x1 = torch.randn(40_000, 1, 1, dtype=torch.float64, generator=g)
    out = sample_euler_ancestral(GaussianDenoiser(mu, s), x1, ts, eta=eta, generator=g, disable=True)
    m, v = ancestral_moments(mu, s, ts, eta)
    assert abs(out.mean().item() - m) < 4 * math.sqrt(v / 40_000)
    assert abs(out.var().item() / v - 1) < 4 * math.sqrt(2 / 40_000)
    # really stochastic: not the deterministic ODE map of x_1
    assert (out - exact_endpoint(x1, mu, s)).abs().mean() > 0.05


# --- CFG, registry, NaN guard ----------------------------------------------------------------


def test_true_cfg():
    class Lin:
        def __call__(self, x, sigma, c):
            return x * c

    x = torch.randn(2, 3, 4, dtype=torch.float64)
    cfg = CFGDenoiser(Lin(), 4.0, negative={"c": 0.5})
    t = torch.tensor([0.5, 0.25], dtype=torch.float64)
    torch.testing.assert_close(cfg(x, t, c=2.0), x * 0.5 + 4.0 * (x * 2.0 - x * 0.5))
    # scale 1 is the conditional model; velocities combine like x0s
    torch.testing.assert_close(CFGDenoiser(Lin(), 1.0, {"c": 0.5})(x, t, c=2.0), x * 2.0)
    v = cfg.velocity(x, t, c=2.0)
    torch.testing.assert_close(x - t[:, None, None] * v, cfg(x, t, c=2.0))


def test_get_sampler_lists_known_names():
    assert get_sampler("heun") is sample_heun
    with pytest.raises(ConfigError, match="euler, heun, dpmpp_2m, euler_ancestral"):
        get_sampler("ddim2")


def test_nan_guard_names_the_step():
    class Bad:
        def __call__(self, x, sigma):
            return torch.where(sigma.reshape(-1, 1) < 0.6, torch.nan, 0.0) + x

    with pytest.raises(FluxcoreError, match=r"step 3 of 4 \(t = 0.5000\)"):
        sample_euler(
            Bad(), torch.zeros(2, 3), [1.0, 0.75, 0.5, 0.25, 0.0], callback=nan_guard(None, 4), disable=True
        )
    seen = []
    sample_euler(
        GaussianDenoiser(0, 1),
        torch.zeros(2, 3, 1),
        [1.0, 0.5, 0.0],
        callback=nan_guard(lambda info: seen.append(info["i"])),
        disable=True,
    )
    assert seen == [0, 1]


def test_samplers_doc_example_runs():
    import re
    from pathlib import Path

    page = Path(__file__).resolve().parent.parent / "docs" / "samplers.md"
    blocks = re.findall(r"```python\n(.*?)```", page.read_text(), flags=re.S)
    assert blocks
    namespace: dict = {}
    for i, code in enumerate(blocks):
        exec(compile(code, f"samplers.md[block {i}]", "exec"), namespace)
    assert "midpoint" not in SAMPLERS


# --- SDE and multistep samplers (ComfyUI's names) ------------------------------------------------

from fluxcore.sampling import (  # noqa: E402
    noise_like,
    sample_deis,
    sample_dpmpp_2m_sde,
    sample_dpmpp_3m_sde,
    sample_lcm,
    sample_uni_pc,
)


def test_comfyui_sampler_names_are_registered():
    for name in ["euler", "heun", "dpmpp_2m", "euler_ancestral", "dpmpp_2m_sde", "dpmpp_3m_sde",
                 "uni_pc", "uni_pc_bh2", "deis", "lcm"]:  # fmt: skip
        assert callable(get_sampler(name)), name


def interior_errors(fn, steps, mu=0.7, s=0.4, **kw):
    """Max error integrating the exact flow from t = 0.9 to t = 0.1 (both λ finite), so the
    solver's own order shows without the first-order steps at t = 1 and t = 0."""

    def exact(x1, t):
        return (1 - t) * mu + math.sqrt((1 - t) ** 2 * s * s + t * t) * x1

    x1 = torch.linspace(-2.5, 2.5, 11, dtype=torch.float64).reshape(11, 1, 1)
    out = []
    for n in steps:
        ts = torch.linspace(0.9, 0.1, n + 1, dtype=torch.float64)
        x = fn(GaussianDenoiser(mu, s), exact(x1, 0.9), ts, disable=True, **kw)
        out.append((x - exact(x1, 0.1)).abs().max().item())
    return out


@pytest.mark.parametrize(
    "fn,kw,lo,hi",
    [
        (sample_uni_pc, dict(order=1), 1.9, 2.1),  # UniP-1 + UniC: order 2 for one evaluation per step
        (sample_uni_pc, dict(order=2), 2.85, 3.1),
        (sample_uni_pc, dict(order=3), 3.3, 4.3),
        (sample_uni_pc, dict(order=3, variant="bh2"), 3.3, 4.3),
        (sample_deis, dict(max_order=2), 1.8, 2.1),
        (sample_deis, dict(max_order=3), 3.0, 8.0),
        (sample_dpmpp_3m_sde, dict(eta=0.0), 1.8, 2.3),  # its first-order start step bounds it at 2
    ],
)
def test_multistep_orders_on_the_gaussian_flow(fn, kw, lo, hi):
    errs = interior_errors(fn, [32, 64, 128], **kw)
    p = orders(errs)
    assert lo < p[-1] < hi, (errs, p)


@pytest.mark.parametrize("fn", [sample_uni_pc, sample_deis, sample_dpmpp_3m_sde, sample_dpmpp_2m_sde])
def test_multistep_samplers_converge_on_the_flux_grid(fn):
    # On the full 1 → 0 grid the steps leaving t = 1 and entering t = 0 are first order in λ
    # (infinite there), which caps every solver at order ≈ 2; all beat Euler by far.
    kw = {"eta": 0.0} if "sde" in fn.__name__ else {}
    e = errors(lambda m, x, ts, disable: fn(m, x, ts, disable=disable, **kw), 0.7, 0.4, [64, 128, 256], True)
    p = orders(e)
    assert e[-1] < 3e-3 and p[-1] > 1.4, (e, p)
    assert e[0] < 0.5 * errors(sample_euler, 0.7, 0.4, [64], True)[0]


def test_dpmpp_2m_sde_without_noise_is_dpmpp_2m():
    m = GaussianDenoiser(0.2, 0.7)
    x = torch.randn(5, 3, 2, dtype=torch.float64)
    ts = get_schedule(12, 1024)
    torch.testing.assert_close(
        sample_dpmpp_2m_sde(m, x, ts, eta=0.0, disable=True), sample_dpmpp_2m(m, x, ts, disable=True)
    )


def exact_law(fn, mu, s, ts, model=None, **kw):
    """(mean, variance) of the sampler's output for x_1 ~ N(0, 1), exactly: with a Gaussian
    denoiser every step is affine in x and in its noise, so one batch row per input (x_1 = 0; x_1 = 1;
    a unit draw at step k) gives every coefficient."""
    rows = len(ts) + 1
    x = torch.zeros(rows, 1, 1, dtype=torch.float64)
    x[1] = 1
    k = [0]

    def unit_noise(a, b):
        z = torch.zeros(rows, 1, 1, dtype=torch.float64)
        z[2 + k[0]] = 1
        k[0] += 1
        return z

    out = fn(model or GaussianDenoiser(mu, s), x, ts, disable=True, noise_sampler=unit_noise, **kw).flatten()
    return out[0].item(), ((out[1:] - out[0]) ** 2).sum().item()


@pytest.mark.parametrize(
    "fn,kw",
    [
        (sample_dpmpp_2m_sde, {}),
        (sample_dpmpp_2m_sde, dict(solver_type="heun")),
        (sample_dpmpp_2m_sde, dict(eta=0.5)),
        (sample_dpmpp_3m_sde, {}),
        (sample_euler_ancestral, {}),
    ],
)
def test_sde_samplers_converge_in_law(fn, kw):
    mu, s = 0.6, 0.45
    errs = []
    for n in [50, 100, 200, 400]:
        m, v = exact_law(fn, mu, s, get_schedule(n, 1024), **kw)
        errs.append(abs(m - mu) + abs(v - s * s))
    assert errs[-1] < 6e-3 and all(a > b for a, b in zip(errs, errs[1:])), errs


def test_lcm_renoises_and_is_exact_with_a_consistency_model():
    mu, s = 0.6, 0.45

    class Consistency:  # the exact probability-flow endpoint of x_t: what an LCM learns
        def __call__(self, x, sigma):
            t = sigma.reshape(-1, *[1] * (x.ndim - 1)).to(x.dtype)
            return mu + s * (x - (1 - t) * mu) / ((1 - t) ** 2 * s**2 + t**2).sqrt()

    for n in [1, 2, 4]:
        m, v = exact_law(sample_lcm, mu, s, get_schedule(n, 1024, shift=False), model=Consistency())
        assert abs(m - mu) < 1e-12 and abs(v - s * s) < 1e-12, (n, m, v)
    # each step is x = (1 − t)·D + t·z
    z = torch.randn(2, 3, dtype=torch.float64)
    x = torch.randn(2, 3, dtype=torch.float64)
    g = GaussianDenoiser(mu, s)
    out = sample_lcm(g, x, [1.0, 0.4], disable=True, noise_sampler=lambda a, b: z)
    torch.testing.assert_close(out, 0.6 * g(x, torch.ones(2, dtype=torch.float64)) + 0.4 * z)


@pytest.mark.parametrize("name", ["euler_ancestral", "dpmpp_2m_sde", "dpmpp_3m_sde", "lcm"])
def test_stochastic_samplers_draw_only_from_their_generators(name):
    fn = get_sampler(name)
    m = GaussianDenoiser(0.1, 0.8)
    x = torch.randn(3, 4, 2, dtype=torch.float64)
    ts = get_schedule(6, 512)
    torch.manual_seed(123)
    state = torch.get_rng_state()
    gens = [torch.Generator().manual_seed(s) for s in (7, 8, 9)]
    batch = fn(m, x, ts, disable=True, generator=gens)
    assert torch.equal(torch.get_rng_state(), state)  # the global RNG is untouched
    for i, seed in enumerate((7, 8, 9)):  # one generator per image: batch and single runs agree
        single = fn(m, x[i : i + 1], ts, disable=True, generator=[torch.Generator().manual_seed(seed)])
        torch.testing.assert_close(batch[i : i + 1], single, rtol=0, atol=0)
    # no generator: still no global RNG, and reproducible
    a = fn(m, x, ts, disable=True)
    assert torch.equal(torch.get_rng_state(), state) and torch.equal(a, fn(m, x, ts, disable=True))


def test_noise_like_refuses_a_generator_count_mismatch():
    with pytest.raises(ConfigError, match="2 generators for a batch of 3"):
        noise_like(torch.zeros(3, 2), [torch.Generator(), torch.Generator()])


def test_step_end_can_edit_latents_in_every_sampler():
    m = GaussianDenoiser(0.3, 0.5)
    x = torch.randn(2, 3, dtype=torch.float64)
    ts = get_schedule(5, 256)
    for name, fn in SAMPLERS.items():
        seen = []

        def hook(i, x, t):
            seen.append((i, t))
            return torch.zeros_like(x) if i == len(ts) - 2 else None

        out = fn(m, x, ts, disable=True, step_end=hook)
        assert [i for i, _ in seen] == list(range(5)) and seen[-1][1] == 0.0, name
        assert torch.equal(out, torch.zeros_like(x)), name
