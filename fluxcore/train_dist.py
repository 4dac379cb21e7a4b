"""Data-parallel rectified-flow training: FSDP2 (parameters sharded per block) or DDP, with
checkpoints in torch.distributed.checkpoint format that resume on any number of ranks.

    info = fluxcore.distributed.init_distributed()              # under torchrun
    model = fluxcore.load_flux(path, device=info.device, dtype=torch.float32)
    losses = train_distributed(model, batches, TrainConfig(steps=1000), strategy="fsdp",
                               checkpoint_dir="ckpt/", save_every=200)

It is `fluxcore.train.train` spread over ranks: the same loss (`flow_loss`), timestep sampling
(`sample_timesteps`), learning-rate schedule and clipping, so a run on N ranks reproduces the
single-process losses. Every rank iterates the same global batches (a seeded loader); each draws the
global batch's timesteps and noise from the shared seed and trains on its own 1/N of the rows, and
the gradient average over ranks is the global batch's gradient. The batch size must divide by N.

FSDP2 wraps each double and single block and then the root (`fully_shard`); on CUDA the default
policy computes in bf16 and reduces gradients in fp32 (master weights stay fp32). Parameters with
requires_grad=False (a frozen base under LoRA) are sharded but not optimised. DDP keeps a full
copy per rank: faster when the model fits.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from fluxcore import distributed as D
from fluxcore.errors import ConfigError
from fluxcore.train import TrainConfig, _forever, flow_loss, lr_at, prepare_batch, sample_timesteps

STRATEGIES = ("fsdp", "ddp", "none")


def shard_model(model: nn.Module, mesh=None, mixed_precision=None) -> nn.Module:
    """FSDP2 in place: `fully_shard` on every double and single block, then on the root.

    mixed_precision: a `torch.distributed.fsdp.MixedPrecisionPolicy`; default bf16 compute with
    fp32 gradient reduction on CUDA, none (fp32) elsewhere."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    if mixed_precision is None:
        on_cuda = next(model.parameters()).is_cuda
        mixed_precision = (
            MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
            if on_cuda
            else MixedPrecisionPolicy()
        )
    for block in [*model.double_blocks, *model.single_blocks]:
        fully_shard(block, mesh=mesh, mp_policy=mixed_precision)
    fully_shard(model, mesh=mesh, mp_policy=mixed_precision)
    return model


def train_distributed(
    model: nn.Module,
    batches: Iterable,
    config: TrainConfig | None = None,
    *,
    strategy: str = "fsdp",
    mesh=None,
    mixed_precision=None,
    checkpoint_dir: str | Path | None = None,
    save_every: int = 0,
    resume: bool = True,
    condition: Callable[[object], dict] | None = None,
    on_step: Callable[[int, float], None] | None = None,
) -> list[float]:
    """Train `model` (a `Flux`) on all ranks; returns the global-batch loss of each step run here.

    strategy: "fsdp" (shard_model), "ddp" (DistributedDataParallel) or "none" (one process).
    checkpoint_dir: where `save_every` steps (and the last step) are saved as
    checkpoint_dir/step-XXXXXXX (torch.distributed.checkpoint: model, optimizer, step, RNG);
    with resume=True the newest one there is loaded first, whatever number of ranks wrote it.
    The model is modified in place (FSDP) or wrapped (DDP); after training use
    `full_state_dict(model)` to get plain weights on every rank.
    """
    config = config or TrainConfig()
    if strategy not in STRATEGIES:
        raise ConfigError(f"strategy must be one of {STRATEGIES}; got {strategy!r}")
    rank, world = D.rank(), D.world_size()
    if strategy != "none" and not dist.is_initialized():
        raise ConfigError(
            f"strategy {strategy!r} needs torch.distributed initialised "
            "(torchrun + fluxcore.distributed.init_distributed); use strategy='none' for one process"
        )
    inner = model
    if strategy == "fsdp":
        shard_model(model, mesh, mixed_precision)
    elif strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        device = next(model.parameters()).device
        model = DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.lr, betas=config.betas, weight_decay=config.weight_decay)
    gen = torch.Generator().manual_seed(config.seed)
    start = 0
    if checkpoint_dir is not None and resume:
        latest = latest_checkpoint(checkpoint_dir)
        if latest is not None:
            start = load_checkpoint(latest, model, optimizer, gen)
    model.train()
    losses: list[float] = []
    t0 = time.perf_counter()
    data = itertools.islice(_forever(batches), start, None)
    for step, raw in zip(range(start, config.steps), data):
        batch = prepare_batch(condition(raw) if condition else raw, inner, config.guidance)
        img = batch["img"]
        B = img.shape[0]
        if B % world:
            raise ConfigError(f"the batch size ({B}) must divide by the number of ranks ({world})")
        # The global batch's draws, in `train`'s order, so every rank sees the single-process values.
        t = sample_timesteps(
            B,
            config.timesteps,
            mean=config.logit_mean,
            std=config.logit_std,
            image_seq_len=img.shape[1] if config.resolution_shift else None,
            generator=gen,
            device=img.device,
        )
        noise = torch.randn(img.shape, generator=gen, dtype=torch.float32).to(img.device, img.dtype)
        rows = slice(rank * B // world, (rank + 1) * B // world)
        guidance, img_cond = batch.get("guidance"), batch.get("img_cond")
        loss = flow_loss(
            model, img[rows], batch["img_ids"][rows], batch["txt"][rows], batch["txt_ids"][rows],
            batch["y"][rows], t[rows], noise=noise[rows],
            guidance=None if guidance is None else guidance[rows],
            img_cond=None if img_cond is None else img_cond[rows],
        )  # fmt: skip
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, config)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if config.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(params, config.grad_clip)
        optimizer.step()
        value = loss.detach().float().clone()
        if world > 1:
            dist.all_reduce(value)
            value /= world
        losses.append(value.item())
        if on_step is not None:
            on_step(step, losses[-1])
        if config.log_every and (step + 1) % config.log_every == 0 and rank == 0:
            recent = losses[-config.log_every :]
            print(f"step {step + 1}/{config.steps}  loss {sum(recent) / len(recent):.4f}  "
                  f"{time.perf_counter() - t0:.0f}s", flush=True)  # fmt: skip
        last = step + 1 == config.steps
        if checkpoint_dir is not None and ((save_every and (step + 1) % save_every == 0) or last):
            save_checkpoint(checkpoint_dir, step + 1, model, optimizer, gen)
    return losses


# --- checkpoints -----------------------------------------------------------------------------


def save_checkpoint(checkpoint_dir, step: int, model: nn.Module, optimizer, generator) -> Path:
    """checkpoint_dir/step-XXXXXXX in torch.distributed.checkpoint format (every rank writes its
    shards; any number of ranks can read it back). Keys are the model's official names."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    msd, osd = get_state_dict(model, optimizer)
    path = Path(checkpoint_dir) / f"step-{step:07d}"
    trainer = {"step": torch.tensor(step), "rng": generator.get_state()}
    dcp.save({"model": msd, "optim": osd, "trainer": trainer}, checkpoint_id=str(path))
    D.barrier()
    if D.rank() == 0:  # a complete checkpoint is named only after every rank has written its part
        D.atomic_write(Path(checkpoint_dir) / "latest", path.name.encode())
    D.barrier()
    return path


def latest_checkpoint(checkpoint_dir) -> Path | None:
    marker = Path(checkpoint_dir) / "latest"
    return Path(checkpoint_dir) / marker.read_text().strip() if marker.is_file() else None


def load_checkpoint(path, model: nn.Module, optimizer, generator) -> int:
    """Load a `save_checkpoint` folder into model, optimizer and generator (resharding to this
    run's ranks); returns the step to continue from."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    msd, osd = get_state_dict(model, optimizer)
    trainer = {"step": torch.tensor(0), "rng": generator.get_state()}
    state = {"model": msd, "optim": osd, "trainer": trainer}
    dcp.load(state, checkpoint_id=str(path))
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    generator.set_state(state["trainer"]["rng"])
    return int(state["trainer"]["step"])


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The whole model's weights (official keys) as plain CPU tensors on every rank (FSDP shards
    are all-gathered; DDP's "module." prefix is dropped)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))
    return {k: v.detach().cpu() for k, v in sd.items()}
