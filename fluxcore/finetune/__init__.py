"""LoRA fine-tuning of FLUX transformers (and optionally CLIP): docs/finetuning.md.

    from fluxcore.finetune import FinetuneConfig, LoraTrainer
    LoraTrainer(FinetuneConfig(model="models/flux-dev", data_dir="data/", steps=1000)).train()

or from a shell: `fluxcore train-lora config.toml` (`train_lora_main`).
"""

from fluxcore.finetune.adapters import (
    CheckpointedBlock,
    TrainableAdapter,
    add_trainable_lora,
    apply_checkpointing,
    clip_targets,
    fp8_base,
    remove_checkpointing,
    transformer_targets,
)
from fluxcore.finetune.config import FinetuneConfig
from fluxcore.finetune.data import (
    Cache,
    DatasetError,
    ImageTooSmallError,
    MissingCaptionError,
    UnreadableImageError,
    make_buckets,
    scan_folder,
)
from fluxcore.finetune.loop import LoraTrainer, training_timesteps
from fluxcore.finetune.main import train_lora_main

__all__ = [
    "Cache",
    "CheckpointedBlock",
    "DatasetError",
    "FinetuneConfig",
    "ImageTooSmallError",
    "LoraTrainer",
    "MissingCaptionError",
    "TrainableAdapter",
    "UnreadableImageError",
    "add_trainable_lora",
    "apply_checkpointing",
    "clip_targets",
    "fp8_base",
    "make_buckets",
    "remove_checkpointing",
    "scan_folder",
    "train_lora_main",
    "training_timesteps",
]
