"""Distributed training (fluxcore.train_dist) on CPU/gloo, fp32: FSDP2 and DDP over 2 processes
reproduce fluxcore.train.train's losses and weights, and a checkpoint written by 2 ranks resumes
on 1 process (torch.distributed.checkpoint resharding) to the same final weights."""

from __future__ import annotations

import os

import pytest
import torch
from test_parallel import launch

from fluxcore import PRESETS, Flux
from fluxcore.errors import ConfigError
from fluxcore.train import TrainConfig

STEPS = 20
TOL = 1e-5


def _config():
    return TrainConfig(steps=STEPS, lr=1e-3, warmup=3, cosine=True, grad_clip=1.0, seed=0)


def _batches(n=5, b=4):
    cfg = PRESETS["tiny-dev"]
    g = torch.Generator().manual_seed(1)
    out = []
    for _ in range(n):
        out.append(
            {
                "latents": torch.randn(b, 16, 8, 6, generator=g),  # packed to [b, 12, 64] by prepare_batch
                "txt": torch.randn(b, 7, cfg.context_in_dim, generator=g),
                "y": torch.randn(b, cfg.vec_in_dim, generator=g),
            }
        )
    return out


def _fresh():
    torch.manual_seed(0)
    return Flux(PRESETS["tiny-dev"])


def _reference():
    from fluxcore.train import train

    model = _fresh()
    losses = train(model, _batches(), _config())
    return losses, model.state_dict()


def _max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys(), set(a) ^ set(b)
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


def _worker_two(rank, world):
    from fluxcore.train_dist import full_state_dict, train_distributed

    ckpt = os.environ["FLUXCORE_TEST_CKPT"]
    ref_losses, ref_sd = _reference()
    out = {}
    for strategy in ("fsdp", "ddp"):
        model = _fresh()
        kwargs = {"checkpoint_dir": ckpt, "save_every": 10} if strategy == "fsdp" else {}
        losses = train_distributed(model, _batches(), _config(), strategy=strategy, **kwargs)
        out[strategy] = {
            "loss_err": max(abs(a - b) for a, b in zip(losses, ref_losses)),
            "n": len(losses),
            "weight_err": _max_diff(full_state_dict(model), ref_sd),
        }
    out["first_loss"] = ref_losses[0]
    return out


def _worker_resume(rank, world):
    from fluxcore.train_dist import latest_checkpoint, train_distributed

    ckpt = os.environ["FLUXCORE_TEST_CKPT"]
    ref_losses, ref_sd = _reference()
    model = _fresh()
    start = latest_checkpoint(ckpt).name
    losses = train_distributed(model, _batches(), _config(), strategy="none", checkpoint_dir=ckpt)
    return {
        "start": start,
        "n": len(losses),
        "loss_err": max(abs(a - b) for a, b in zip(losses, ref_losses[10:])),
        "weight_err": _max_diff(model.state_dict(), ref_sd),
    }


def test_fsdp_and_ddp_match_one_process_and_resume_on_one_rank(tmp_path, monkeypatch):
    ckpt = tmp_path / "ckpt"
    monkeypatch.setenv("FLUXCORE_TEST_CKPT", str(ckpt))
    (tmp_path / "two").mkdir()
    results = launch(_worker_two, 2, tmp_path / "two", timeout=80)
    for res in results:
        for strategy in ("fsdp", "ddp"):
            r = res[strategy]
            assert r["n"] == STEPS
            assert r["loss_err"] <= TOL, (strategy, r)
            assert r["weight_err"] <= TOL, (strategy, r)
    print(f"\n2 ranks vs 1 process, {STEPS} steps: {results[0]}")
    assert sorted(p.name for p in ckpt.iterdir()) == ["latest", "step-0000010", "step-0000020"]
    # resume the run from its step-10 checkpoint (written by 2 ranks) in one process
    (ckpt / "latest").write_text("step-0000010")
    (tmp_path / "one").mkdir()
    res = launch(_worker_resume, 1, tmp_path / "one", timeout=60)[0]
    assert res["start"] == "step-0000010" and res["n"] == STEPS - 10
    assert res["loss_err"] <= TOL and res["weight_err"] <= TOL, res
    print(f"resumed on 1 process from step 10: {res}")


def test_strategy_errors():
    from fluxcore.train_dist import train_distributed

    with pytest.raises(ConfigError, match="strategy must be one of"):
        train_distributed(_fresh(), _batches(1), _config(), strategy="zero3")
    with pytest.raises(ConfigError, match="needs torch.distributed"):
        train_distributed(_fresh(), _batches(1), _config(), strategy="fsdp")


def test_one_process_strategy_none_is_train():
    from fluxcore.train import train
    from fluxcore.train_dist import train_distributed

    cfg = _config()
    cfg.steps = 4
    a, b = _fresh(), _fresh()
    assert train_distributed(a, _batches(), cfg, strategy="none") == train(b, _batches(), cfg)
