"""Rectified-flow training: path and target in closed form, timestep samplers against diffusers,
EMA in closed form, the loop lowering the loss on a fixed batch, checkpoints that load."""

import math

import pytest
import torch
from torch import nn

from fluxcore import PRESETS, Flux
from fluxcore.errors import ConfigError
from fluxcore.latents import make_img_ids, pack
from fluxcore.train import (
    EMA,
    TrainConfig,
    flow_loss,
    interpolate,
    lr_at,
    prepare_batch,
    sample_timesteps,
    save_checkpoint,
    train,
    velocity_target,
)


def tiny_flux(seed=0, **changes):
    torch.manual_seed(seed)
    return Flux(PRESETS["tiny-schnell"].replace(**changes))


def fixed_batch(model, b=2, h=4, w=4, l_txt=5, seed=1):
    g = torch.Generator().manual_seed(seed)
    cfg = model.config
    return {
        "latents": torch.randn(b, 16, h, w, generator=g),
        "txt": torch.randn(b, l_txt, cfg.context_in_dim, generator=g),
        "y": torch.randn(b, cfg.vec_in_dim, generator=g),
    }


def test_path_endpoints_and_velocity_is_the_time_derivative():
    g = torch.Generator().manual_seed(0)
    x0, eps = (
        torch.randn(3, 6, 4, generator=g, dtype=torch.float64),
        torch.randn(3, 6, 4, generator=g, dtype=torch.float64),
    )
    assert torch.equal(interpolate(x0, eps, torch.zeros(3, dtype=torch.float64)), x0)
    assert torch.equal(interpolate(x0, eps, torch.ones(3, dtype=torch.float64)), eps)
    t, h = torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64), 1e-6
    fd = (interpolate(x0, eps, t + h) - interpolate(x0, eps, t - h)) / (2 * h)
    torch.testing.assert_close(fd, velocity_target(x0, eps), rtol=1e-8, atol=1e-8)


class _OracleVelocity(nn.Module):
    """Knows x0 (a single fixed clean sample): the exact velocity is (x_t − x0) / t."""

    def __init__(self, x0):
        super().__init__()
        self.x0 = x0

    def forward(self, img, img_ids, txt, txt_ids, timesteps, y, guidance=None):
        return (img - self.x0) / timesteps[:, None, None]


class _Zero(nn.Module):
    def forward(self, img, *args, **kwargs):
        return torch.zeros_like(img)


def test_flow_loss_in_closed_form():
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(4, 8, 64, generator=g), torch.randn(4, 8, 64, generator=g)
    t = torch.tensor([0.2, 0.4, 0.6, 0.8])
    ids, txt, tids, y = torch.zeros(4, 8, 3), torch.zeros(4, 2, 5), torch.zeros(4, 2, 3), torch.zeros(4, 3)
    loss = flow_loss(_OracleVelocity(x0), x0, ids, txt, tids, y, t, noise=eps)
    assert loss.item() == pytest.approx(0.0, abs=1e-10)
    loss = flow_loss(_Zero(), x0, ids, txt, tids, y, t, noise=eps)
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx((eps - x0).square().mean().item(), rel=1e-6)


def test_logit_normal_and_uniform_match_diffusers_sd3_sampler():
    from diffusers.training_utils import compute_density_for_timestep_sampling

    for scheme, method in (("logit_normal", "logit_normal"), ("uniform", "uniform")):
        theirs = compute_density_for_timestep_sampling(
            scheme, 4096, logit_mean=0.3, logit_std=1.2, generator=torch.Generator().manual_seed(5)
        )
        ours = sample_timesteps(4096, method, mean=0.3, std=1.2, generator=torch.Generator().manual_seed(5))
        torch.testing.assert_close(ours, theirs.float(), rtol=1e-6, atol=1e-7)
    t = sample_timesteps(20000, generator=torch.Generator().manual_seed(0))
    assert 0 < t.min() and t.max() < 1
    logit = torch.log(t / (1 - t))
    assert abs(logit.mean().item()) < 0.03 and abs(logit.std().item() - 1) < 0.03
    with pytest.raises(ConfigError, match="cosine"):
        sample_timesteps(4, "cosine")


@pytest.mark.parametrize("seq_len", [16, 256, 1024, 4096])
def test_resolution_shift_matches_diffusers_flux_schedule(seq_len):
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    plain = sample_timesteps(512, generator=torch.Generator().manual_seed(2))
    shifted = sample_timesteps(512, image_seq_len=seq_len, generator=torch.Generator().manual_seed(2))
    sched = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True)
    mu = calculate_shift(seq_len, 256, 4096, 0.5, 1.15)
    torch.testing.assert_close(shifted, sched.time_shift(mu, 1.0, plain).float(), rtol=1e-6, atol=1e-7)
    # a positive μ moves every time toward noise
    assert mu > 0 and (shifted > plain).all()


def test_ema_closed_form():
    lin = nn.Linear(3, 2)
    p0 = lin.weight.detach().clone()
    ema = EMA(lin, decay=0.9)
    assert not any(p.requires_grad for p in ema.model.parameters())
    with torch.no_grad():
        lin.weight.fill_(1.0)
    ema.update(lin)  # n = 1: decay = min(0.9, 2/11)
    d = 2 / 11
    torch.testing.assert_close(ema.model.weight, d * p0 + (1 - d) * torch.ones_like(p0))
    for _ in range(200):
        ema.update(lin)
    torch.testing.assert_close(ema.model.weight, torch.ones_like(p0), atol=1e-6, rtol=0)
    with pytest.raises(ConfigError):
        EMA(lin, decay=1.0)


def test_lr_schedule():
    c = TrainConfig(steps=100, lr=1e-3, warmup=10, cosine=True, min_lr_ratio=0.1)
    assert lr_at(0, c) == pytest.approx(1e-4) and lr_at(9, c) == pytest.approx(1e-3)
    assert lr_at(10, c) == pytest.approx(1e-3) and lr_at(100, c) == pytest.approx(1e-4)
    assert lr_at(55, c) == pytest.approx(1e-4 + 0.5 * 9e-4 * (1 + math.cos(math.pi * 0.5)))
    assert lr_at(50, TrainConfig(lr=3e-4)) == 3e-4


def test_prepare_batch_packs_latents_and_fills_defaults():
    model = tiny_flux(guidance_embed=True)
    batch = fixed_batch(model, b=2, h=6, w=4)
    out = prepare_batch(batch, model, guidance=3.5)
    torch.testing.assert_close(out["img"], pack(batch["latents"]))
    torch.testing.assert_close(out["img_ids"], make_img_ids(2, 48, 32))
    assert out["txt_ids"].shape == (2, 5, 3) and not out["txt_ids"].any()
    assert out["guidance"].tolist() == [3.5, 3.5]
    with pytest.raises(ConfigError, match="latents"):
        prepare_batch({"txt": batch["txt"], "y": batch["y"]}, model)


def test_loop_lowers_the_loss_on_a_fixed_batch():
    model = tiny_flux()
    batch = prepare_batch(fixed_batch(model, b=4), model)
    g = torch.Generator().manual_seed(9)
    t = torch.rand(4, generator=g)
    noise = torch.randn(batch["img"].shape, generator=g)

    def probe():
        with torch.no_grad():
            return flow_loss(
                model, batch["img"], batch["img_ids"], batch["txt"], batch["txt_ids"], batch["y"], t, noise
            ).item()

    before = probe()
    losses = train(model, [batch], TrainConfig(steps=25, lr=3e-3, seed=0))
    after = probe()
    assert len(losses) == 25 and all(math.isfinite(x) for x in losses)
    assert after < 0.7 * before, (before, after)


def test_condition_trains_extra_modules_jointly_and_ema_follows():
    model = tiny_flux(guidance_embed=True)
    cfg = model.config
    embed = nn.Embedding(10, cfg.context_in_dim)
    pool = nn.Linear(cfg.context_in_dim, cfg.vec_in_dim)
    before = embed.weight.detach().clone()
    latents = fixed_batch(model)["latents"]

    def condition(token_ids):
        txt = embed(token_ids)
        return {"latents": latents, "txt": txt, "y": pool(txt.mean(1))}

    ema = EMA(model, decay=0.5)
    seen = []
    train(
        model,
        [torch.tensor([[1, 2, 3], [4, 5, 6]])],
        TrainConfig(steps=3, lr=1e-2),
        condition=condition,
        extra_params=[*embed.parameters(), *pool.parameters()],
        ema=ema,
        on_step=lambda step, loss: seen.append(step),
    )
    assert seen == [0, 1, 2]
    assert not torch.equal(embed.weight[1:7], before[1:7])  # used rows moved
    assert torch.equal(embed.weight[7:], before[7:])  # unused rows did not
    assert ema.num_updates == 3
    assert not torch.equal(ema.model.img_in.weight, model.img_in.weight)


def test_fill_type_model_gets_its_condition_concatenated():
    model = tiny_flux(in_channels=128)
    batch = fixed_batch(model)
    batch["cond_latents"] = torch.randn_like(batch["latents"])
    losses = train(model, [batch], TrainConfig(steps=2))
    assert len(losses) == 2


def test_checkpoint_loads_with_the_usual_loader(tmp_path):
    from fluxcore import load_flux

    model = tiny_flux()
    train(model, [prepare_batch(fixed_batch(model), model)], TrainConfig(steps=2, lr=1e-2))
    path = save_checkpoint(model, tmp_path / "flux1-tiny.safetensors")
    loaded = load_flux(path, config=model.config)
    sd = loaded.state_dict()
    for k, v in model.state_dict().items():
        torch.testing.assert_close(sd[k], v, rtol=0, atol=0)


def test_one_pass_generator_shorter_than_the_run_says_so():
    model = tiny_flux()
    batch = prepare_batch(fixed_batch(model, b=2), model)
    with pytest.raises(ConfigError, match="exhausted after one pass .*generator"):
        train(model, (batch for _ in range(2)), TrainConfig(steps=3, lr=1e-3, seed=0))
    with pytest.raises(ConfigError, match="yielded no batches"):
        train(model, [], TrainConfig(steps=1, lr=1e-3, seed=0))
