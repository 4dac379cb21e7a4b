"""`FinetuneConfig`: every setting of a LoRA training run, from a TOML file and/or flags.

A TOML file is flat (`rank = 16`) or grouped in tables of any names (`[lora] rank = 16`); each key
is a field below, once. Relative paths in a file are relative to the file's folder.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path

import tomllib

from fluxcore.errors import ConfigError
from fluxcore.finetune.adapters import BLOCKS, PRESETS

TIMESTEPS = ("sigmoid", "uniform", "logit_normal", "flux_shift", "shift")
SCHEDULERS = ("constant", "cosine", "linear")
FORMATS = ("peft", "kohya")
_PATHS = ("model", "data_dir", "output_dir", "cache_dir", "resume")


@dataclass
class FinetuneConfig:
    """model: a model folder `FluxPipeline.from_pretrained` reads. data_dir: images + .txt captions.
    output_dir: LoRA files, checkpoints/, samples/, cache/ (unless cache_dir). name: file stem.

    Data: resolution (training side, px; buckets keep ≈ resolution² pixels), bucketing, bucket_step
    (px, a multiple of 16), max_aspect_ratio, repeats (each image per epoch), trigger_word,
    caption_ext, min_image_size (default resolution / 2), cache_latents / cache_text (to disk).

    LoRA: rank, alpha (s = alpha / rank), dropout, targets ("attention", "attention_mlp", "all"),
    blocks ("both", "double", "single"), target_modules (regexes over BFL paths; replaces the
    preset), train_text_encoder (CLIP LoRA, same rank/alpha, attention), text_encoder_lr.

    Optimisation: steps, batch_size, lr, weight_decay, betas, warmup, scheduler ("constant",
    "cosine", "linear"), min_lr_ratio, grad_clip (0: off), seed, ema_decay (0: off).
    Flow: timesteps ("sigmoid" = sigmoid(sigmoid_scale·N(0,1)) as ai-toolkit / kohya, "uniform",
    "logit_normal" (logit_mean, logit_std), "flux_shift" (sigmoid, then the FLUX resolution shift),
    "shift" (sigmoid, then σ·k/(1+(k−1)σ), k = discrete_flow_shift)); guidance (dev-type models).
    Memory: fp8_base, gradient_checkpointing, mixed_precision ("no", "bf16"), device ("auto").

    Output: save_every (steps; 0: at the end only), formats ("peft", "kohya"), checkpoint_every,
    keep_checkpoints, resume ("auto": the latest checkpoint in output_dir, a checkpoint folder, or
    ""), sample_every, sample_prompts, sample_seeds, sample_steps, sample_guidance, sample_size.
    """

    model: str = ""
    data_dir: str = ""
    output_dir: str = "lora-output"
    name: str = "lora"
    resolution: int = 512
    bucketing: bool = True
    bucket_step: int = 64
    max_aspect_ratio: float = 2.0
    repeats: int = 1
    trigger_word: str = ""
    caption_ext: str = ".txt"
    min_image_size: int = 0
    cache_dir: str = ""
    cache_latents: bool = True
    cache_text: bool = True
    rank: int = 16
    alpha: float = 16.0
    dropout: float = 0.0
    targets: str = "attention"
    blocks: str = "both"
    target_modules: list[str] = field(default_factory=list)
    train_text_encoder: bool = False
    text_encoder_lr: float = 0.0
    steps: int = 1000
    batch_size: int = 1
    lr: float = 1e-4
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    warmup: int = 0
    scheduler: str = "constant"
    min_lr_ratio: float = 0.0
    grad_clip: float = 1.0
    seed: int = 0
    ema_decay: float = 0.0
    timesteps: str = "sigmoid"
    sigmoid_scale: float = 1.0
    logit_mean: float = 0.0
    logit_std: float = 1.0
    discrete_flow_shift: float = 3.1582
    guidance: float = 1.0
    fp8_base: bool = False
    gradient_checkpointing: bool = False
    mixed_precision: str = "no"
    device: str = "auto"
    save_every: int = 0
    formats: list[str] = field(default_factory=lambda: ["peft"])
    checkpoint_every: int = 0
    keep_checkpoints: int = 2
    resume: str = ""
    sample_every: int = 0
    sample_prompts: list[str] = field(default_factory=list)
    sample_seeds: list[int] = field(default_factory=list)
    sample_steps: int = 20
    sample_guidance: float = 3.5
    sample_size: int = 0
    log_every: int = 0

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        def pos_int(v):
            return isinstance(v, int) and not isinstance(v, bool) and v >= 1

        def nonneg_int(v):
            return isinstance(v, int) and not isinstance(v, bool) and v >= 0

        def num(v):
            return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)

        checks = [
            (
                "resolution",
                pos_int(self.resolution) and self.resolution % 16 == 0,
                "an int, a multiple of 16",
            ),
            (
                "bucket_step",
                pos_int(self.bucket_step) and self.bucket_step % 16 == 0,
                "an int, a multiple of 16",
            ),
            ("max_aspect_ratio", num(self.max_aspect_ratio) and self.max_aspect_ratio >= 1, "a number >= 1"),
            ("repeats", pos_int(self.repeats), "an int >= 1"),
            ("min_image_size", nonneg_int(self.min_image_size), "an int >= 0 (0: resolution / 2)"),
            ("rank", pos_int(self.rank), "an int >= 1"),
            ("alpha", num(self.alpha) and self.alpha > 0, "a number > 0"),
            ("dropout", num(self.dropout) and 0 <= self.dropout < 1, "a number in [0, 1)"),
            ("targets", self.targets in PRESETS, f"one of {PRESETS}"),
            ("blocks", self.blocks in BLOCKS, f"one of {BLOCKS}"),
            (
                "text_encoder_lr",
                num(self.text_encoder_lr) and self.text_encoder_lr >= 0,
                "a number >= 0 (0: lr)",
            ),
            ("steps", pos_int(self.steps), "an int >= 1"),
            ("batch_size", pos_int(self.batch_size), "an int >= 1"),
            ("lr", num(self.lr) and self.lr > 0, "a number > 0"),
            ("weight_decay", num(self.weight_decay) and self.weight_decay >= 0, "a number >= 0"),
            (
                "betas",
                len(self.betas) == 2 and all(num(b) and 0 <= b < 1 for b in self.betas),
                "two numbers in [0, 1)",
            ),
            ("warmup", nonneg_int(self.warmup), "an int >= 0"),
            ("scheduler", self.scheduler in SCHEDULERS, f"one of {SCHEDULERS}"),
            ("min_lr_ratio", num(self.min_lr_ratio) and 0 <= self.min_lr_ratio <= 1, "a number in [0, 1]"),
            ("grad_clip", num(self.grad_clip) and self.grad_clip >= 0, "a number >= 0 (0: off)"),
            ("seed", isinstance(self.seed, int) and not isinstance(self.seed, bool), "an int"),
            ("ema_decay", num(self.ema_decay) and 0 <= self.ema_decay < 1, "a number in [0, 1) (0: off)"),
            ("timesteps", self.timesteps in TIMESTEPS, f"one of {TIMESTEPS}"),
            ("sigmoid_scale", num(self.sigmoid_scale) and self.sigmoid_scale > 0, "a number > 0"),
            ("logit_mean", num(self.logit_mean), "a number"),
            ("logit_std", num(self.logit_std) and self.logit_std > 0, "a number > 0"),
            (
                "discrete_flow_shift",
                num(self.discrete_flow_shift) and self.discrete_flow_shift > 0,
                "a number > 0",
            ),
            ("guidance", num(self.guidance), "a number"),
            ("mixed_precision", self.mixed_precision in ("no", "bf16"), "'no' or 'bf16'"),
            ("save_every", nonneg_int(self.save_every), "an int >= 0"),
            (
                "formats",
                bool(self.formats) and all(f in FORMATS for f in self.formats),
                f"a list from {FORMATS}",
            ),
            ("checkpoint_every", nonneg_int(self.checkpoint_every), "an int >= 0"),
            ("keep_checkpoints", nonneg_int(self.keep_checkpoints), "an int >= 0 (0: keep all)"),
            ("sample_every", nonneg_int(self.sample_every), "an int >= 0"),
            ("sample_steps", pos_int(self.sample_steps), "an int >= 1"),
            (
                "sample_size",
                nonneg_int(self.sample_size) and self.sample_size % 16 == 0,
                "a multiple of 16 (0: resolution)",
            ),
            ("log_every", nonneg_int(self.log_every), "an int >= 0"),
        ]
        for name, ok, expected in checks:
            if not ok:
                raise ConfigError(
                    f"FinetuneConfig.{name} must be {expected}; got {getattr(self, name)!r:.80}"
                )
        if self.sample_seeds and len(self.sample_seeds) != len(self.sample_prompts):
            raise ConfigError(
                f"sample_seeds has {len(self.sample_seeds)} entries for {len(self.sample_prompts)} sample_prompts"
            )

    # --- construction ----------------------------------------------------------------------------

    @classmethod
    def fields(cls) -> dict[str, dataclasses.Field]:
        return {f.name: f for f in dataclasses.fields(cls)}

    @classmethod
    def from_dict(cls, values: dict, base: Path | None = None) -> FinetuneConfig:
        """Fields from a (possibly nested, one level) dict; paths resolved against `base`."""
        flat: dict = {}
        for k, v in values.items():
            for key, value in v.items() if isinstance(v, dict) else [(k, v)]:
                if key in flat:
                    raise ConfigError(f"config key {key!r} is given twice")
                flat[key] = value
        known = cls.fields()
        unknown = sorted(set(flat) - set(known))
        if unknown:
            raise ConfigError(f"unknown config keys {unknown}; known: {sorted(known)}")
        for key in _PATHS if base is not None else ():
            v = flat.get(key)
            if isinstance(v, str) and v and v != "auto" and not Path(v).is_absolute():
                flat[key] = str(base / v)
        for key, value in flat.items():
            default = known[key].default
            if isinstance(default, float) and isinstance(value, int) and not isinstance(value, bool):
                flat[key] = float(value)
        return cls(**flat)

    @classmethod
    def from_toml(cls, path, overrides: dict | None = None) -> FinetuneConfig:
        path = Path(path)
        try:
            data = tomllib.loads(path.read_text(encoding="utf-8"))
        except OSError as e:
            raise ConfigError(f"cannot read the config file {path}: {e}") from None
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"{path}: not valid TOML ({e})") from None
        cfg = cls.from_dict(data, base=path.resolve().parent)
        return dataclasses.replace(cfg, **(overrides or {})) if overrides else cfg
