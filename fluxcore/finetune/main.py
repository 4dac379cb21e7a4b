"""`train_lora_main(argv)`: the `fluxcore train-lora [CONFIG.toml] [--field value ...]` command.

Every `FinetuneConfig` field is a flag (`--rank 8`, `--sample-prompts '["a cat", "a dog"]'`);
flags override the file. Values are read as TOML values (numbers, true/false, [lists]), falling
back to plain strings.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys

import tomllib

from fluxcore.errors import FluxcoreError
from fluxcore.finetune.config import FinetuneConfig


def _value(text: str):
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="fluxcore train-lora",
        description="Train a LoRA for a FLUX model on a folder of images with .txt captions.",
    )
    p.add_argument("config", nargs="?", help="a TOML file of FinetuneConfig fields (flags override it)")
    p.add_argument("--quiet", action="store_true", help="no progress line")
    for name in FinetuneConfig.fields():
        p.add_argument("--" + name.replace("_", "-"), dest=name, type=_value, default=None, metavar="V")
    return p


def config_from_args(args: argparse.Namespace) -> FinetuneConfig:
    fields = FinetuneConfig.fields()
    overrides = {k: getattr(args, k) for k in fields if getattr(args, k) is not None}
    for k, v in overrides.items():  # a one-element list may be given bare: --formats kohya
        if fields[k].default_factory is not dataclasses.MISSING and not isinstance(v, list):
            overrides[k] = [v]
    if not args.config:
        return FinetuneConfig.from_dict(overrides)
    values = dataclasses.asdict(FinetuneConfig.from_toml(args.config))
    values.update(overrides)
    return FinetuneConfig(**values)


def train_lora_main(argv=None) -> int:
    """Parse argv, train, print where the LoRA went. Returns the exit status (2: a fluxcore error,
    whose message is printed)."""
    from fluxcore.finetune.loop import LoraTrainer

    args = build_parser().parse_args(argv)
    try:
        config = config_from_args(args)
        trainer = LoraTrainer(config)
        print(
            f"{len(trainer.items)} images, buckets {sorted({it.bucket for it in trainer.items})}, "
            f"cache: {trainer.cache_stats['latents']} latents and {trainer.cache_stats['text']} captions encoded; "
            f"{sum(p.numel() for p in trainer.all_params().values())} trainable parameters",
            file=sys.stderr,
        )
        trainer.train(progress=not args.quiet)
        for fmt in config.formats:
            tail = "" if fmt == "peft" else f"_{fmt}"
            print(f"wrote {trainer.out / (config.name + tail + '.safetensors')} ({fmt})")
    except FluxcoreError as e:
        print(f"fluxcore train-lora: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(train_lora_main())
