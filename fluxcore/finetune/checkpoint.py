"""Resumable checkpoints of a LoRA training run.

output_dir/checkpoints/step-N/ is written atomically (a temp folder swapped in whole):
  adapter.safetensors  the trainable tensors by name (and "ema.<name>" for the EMA's)
  state.pt             AdamW and LR-scheduler state, step, epoch and position in the epoch's batch
                       list, the noise generator, the global torch / Python / CUDA RNG states, losses
Restoring all of it makes a resumed run continue the uninterrupted run's loss sequence exactly.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from fluxcore.errors import ConfigError
from fluxcore.finetune.data import Cache

if TYPE_CHECKING:
    from fluxcore.finetune.loop import LoraTrainer


def save_checkpoint(self: LoraTrainer) -> Path:
    """output_dir/checkpoints/step-N/ {adapter.safetensors, state.pt}, written atomically;
    only the newest `keep_checkpoints` are kept."""
    from fluxcore.atomic import atomic_folder
    from fluxcore.weights.writer import write_safetensors

    folder = self.out / "checkpoints" / f"step-{self.step:06d}"
    state = {
        "step": self.step, "epoch": self.epoch, "pos": self.pos, "losses": list(self.losses),
        "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
        "generator": self.gen.get_state(), "torch_rng": torch.get_rng_state(),
        "python_rng": random.getstate(),
        "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
        "ema_updates": self.ema.num_updates if self.ema else 0,
    }  # fmt: skip
    tensors = {k: v.detach() for k, v in self.all_params().items()}
    if self.ema is not None:
        tensors |= {f"ema.{k}": v for k, v in self.ema.shadow.items()}
    with atomic_folder(folder) as tmp:
        write_safetensors(tmp / "adapter.safetensors", tensors)
        torch.save(state, tmp / "state.pt")
    if self.config.keep_checkpoints:
        for old in sorted((self.out / "checkpoints").glob("step-*"))[: -self.config.keep_checkpoints]:
            import shutil

            shutil.rmtree(old, ignore_errors=True)
    return folder


def latest_checkpoint(out: Path) -> Path | None:
    """The newest complete checkpoint folder under out/checkpoints, or None."""
    found = sorted((Path(out) / "checkpoints").glob("step-[0-9]*"))
    found = [f for f in found if (f / "state.pt").is_file()]
    return found[-1] if found else None


def resume(self: LoraTrainer, where) -> Path | None:
    """Load a checkpoint folder ("auto": the latest in output_dir; none there → start fresh)."""
    folder = latest_checkpoint(self.out) if where == "auto" else Path(where)
    if folder is None:
        return None
    if not (folder / "state.pt").is_file():
        raise ConfigError(f"resume: {folder} is not a checkpoint folder (no state.pt)")
    tensors = Cache.read(folder / "adapter.safetensors")
    params = self.all_params()
    missing = sorted(set(params) - set(tensors))
    if missing:
        raise ConfigError(f"resume: {folder} lacks adapter tensors {missing[:5]} (other targets or rank?)")
    with torch.no_grad():
        for k, p in params.items():
            if tensors[k].shape != p.shape:
                raise ConfigError(
                    f"resume: {k} is {tuple(tensors[k].shape)} in {folder}, {tuple(p.shape)} here"
                )
            p.copy_(tensors[k])
        if self.ema is not None:
            for k in params:
                self.ema.shadow[k].copy_(tensors.get(f"ema.{k}", tensors[k]))
    state = torch.load(folder / "state.pt", weights_only=False)
    self.optimizer.load_state_dict(state["optimizer"])
    self.scheduler.load_state_dict(state["scheduler"])
    self.gen.set_state(state["generator"])
    torch.set_rng_state(state["torch_rng"])
    random.setstate(state["python_rng"])
    if state["cuda_rng"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda_rng"])
    self.step, self.epoch, self.pos, self.losses = (
        state["step"],
        state["epoch"],
        state["pos"],
        state["losses"],
    )
    if self.ema is not None:
        self.ema.num_updates = state["ema_updates"]
    return folder
