"""The LoRA training run: models → adapters → cached data → steps → checkpoints, samples, LoRA files.

    run = LoraTrainer(FinetuneConfig(model=..., data_dir=..., steps=1000))
    losses = run.train()          # resumes from run.config.resume; writes output_dir/<name>.safetensors

Each step: a batch of one bucket (cached latents and text), t from the configured sampler, noise
from the run's generator, `fluxcore.train.flow_loss` under autocast, AdamW on the adapter only,
gradient clipping, the LR schedule, optional EMA of the adapter. A checkpoint
(output_dir/checkpoints/step-N/) holds the adapter, optimizer, scheduler, data position and every
RNG state, so a resumed run continues the same loss sequence.
"""

from __future__ import annotations

import copy
import math
import random
import sys
import time
from pathlib import Path

import torch
from torch import Tensor

from fluxcore.errors import ConfigError, TrainingDivergedError
from fluxcore.finetune import adapters as ad
from fluxcore.finetune.checkpoint import latest_checkpoint, resume, save_checkpoint
from fluxcore.finetune.config import FinetuneConfig
from fluxcore.finetune.data import Cache, epoch_batches, scan_folder
from fluxcore.latents import make_img_ids, pack
from fluxcore.train import flow_loss, sample_timesteps

ADAPTER = "default"


def training_timesteps(n: int, config: FinetuneConfig, image_seq_len: int, generator) -> Tensor:
    """[n] flow times in (0, 1) by `config.timesteps` (see FinetuneConfig)."""
    m = config.timesteps
    if m == "uniform":
        return sample_timesteps(n, "uniform", generator=generator)
    if m == "logit_normal":
        return sample_timesteps(
            n, "logit_normal", mean=config.logit_mean, std=config.logit_std, generator=generator
        )
    # sigmoid(s·N(0, 1)) is logit-normal with std s
    shift_len = image_seq_len if m == "flux_shift" else None
    t = sample_timesteps(
        n, "logit_normal", std=config.sigmoid_scale, image_seq_len=shift_len, generator=generator
    )
    if m == "shift":
        k = config.discrete_flow_shift
        t = t * k / (1 + (k - 1) * t)
    return t


def lr_factor(step: int, config: FinetuneConfig) -> float:
    """Multiplier of the base LR at optimizer step `step` (0-based)."""
    if config.warmup and step < config.warmup:
        return (step + 1) / config.warmup
    if config.scheduler == "constant":
        return 1.0
    p = min(1.0, (step - config.warmup) / max(1, config.steps - config.warmup))
    floor = config.min_lr_ratio
    if config.scheduler == "linear":
        return 1.0 - (1.0 - floor) * p
    return floor + 0.5 * (1.0 - floor) * (1 + math.cos(math.pi * p))


class AdapterEMA:
    """EMA of the trainable tensors only (the base is frozen), decay ramped as in fluxcore.train.EMA."""

    def __init__(self, params: dict[str, torch.nn.Parameter], decay: float):
        self.decay, self.num_updates = decay, 0
        self.shadow = {k: p.detach().clone() for k, p in params.items()}

    @torch.no_grad()
    def update(self, params: dict[str, torch.nn.Parameter]) -> None:
        self.num_updates += 1
        d = min(self.decay, (1 + self.num_updates) / (10 + self.num_updates))
        for k, p in params.items():
            self.shadow[k].lerp_(p.detach(), 1.0 - d)


class Progress:
    """One status line: step, loss (running mean), lr, steps/s, ETA; redrawn on a terminal, printed
    every `every` steps otherwise."""

    def __init__(self, total: int, start: int, every: int = 0, stream=None):
        self.total, self.start, self.stream = total, start, stream or sys.stderr
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.every = every or (0 if self.tty else max(1, total // 20))
        self.t0, self.avg = time.perf_counter(), None

    def update(self, step: int, loss: float, lr: float) -> None:
        self.avg = loss if self.avg is None else 0.9 * self.avg + 0.1 * loss
        done = step - self.start
        rate = done / max(1e-9, time.perf_counter() - self.t0)
        eta = (self.total - step) / rate if rate > 0 else 0
        line = (
            f"step {step}/{self.total}  loss {self.avg:.4f}  lr {lr:.2e}  {rate:.2f} step/s  "
            f"ETA {int(eta) // 60:d}:{int(eta) % 60:02d}"
        )
        if self.tty:
            self.stream.write("\r" + line + " " * 4)
            if step == self.total:
                self.stream.write("\n")
        elif self.every and (step % self.every == 0 or step == self.total):
            self.stream.write(line + "\n")
        self.stream.flush()


class LoraTrainer:
    """One LoRA training run (see the module docstring). `pipe`: an already loaded FluxPipeline to
    take the models from (its transformer and CLIP are copied, so `pipe` stays untouched)."""

    def __init__(self, config: FinetuneConfig, pipe=None):
        config.validate()
        if not config.model and pipe is None:
            raise ConfigError("FinetuneConfig.model is empty: name a model folder")
        if not config.data_dir:
            raise ConfigError("FinetuneConfig.data_dir is empty: name a folder of images with .txt captions")
        self.config = c = config
        self.out = Path(c.output_dir)
        if c.device == "auto":
            self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        else:
            self.device = torch.device(c.device)
        self.amp = c.mixed_precision == "bf16"
        if pipe is None:
            from fluxcore import FluxPipeline

            dtype = torch.bfloat16 if self.amp and self.device.type == "cuda" else torch.float32
            pipe = FluxPipeline.from_pretrained(
                c.model, torch_dtype=dtype, device=self.device, fused_kernels=False
            )
            self.transformer, self.clip = pipe.transformer, pipe.clip
        else:
            self.transformer = copy.deepcopy(pipe.transformer)
            self.clip = copy.deepcopy(pipe.clip) if c.train_text_encoder else pipe.clip
        self.pipe = pipe
        self.model_id = f"{Path(c.model).resolve() if c.model else id(pipe)}"
        self._build_adapters()
        self.items = scan_folder(
            c.data_dir, resolution=c.resolution, bucket_step=c.bucket_step, bucketing=c.bucketing,
            max_ratio=c.max_aspect_ratio, caption_ext=c.caption_ext, trigger_word=c.trigger_word or None,
            min_size=c.min_image_size or None,
        )  # fmt: skip
        self.cache = Cache(Path(c.cache_dir) if c.cache_dir else self.out / "cache", self.model_id)
        self._fill_cache()
        groups = [{"params": list(self.params["transformer"].values()), "lr": c.lr}]
        if self.params.get("clip"):
            groups.append({"params": list(self.params["clip"].values()), "lr": c.text_encoder_lr or c.lr})
        self.optimizer = torch.optim.AdamW(groups, lr=c.lr, betas=tuple(c.betas), weight_decay=c.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda s: lr_factor(s, c))
        self.gen = torch.Generator().manual_seed(c.seed)
        self.ema = AdapterEMA(self.all_params(), c.ema_decay) if c.ema_decay else None
        self.step, self.epoch, self.pos, self.losses = 0, 0, 0, []

    # --- setup -----------------------------------------------------------------------------------

    def _build_adapters(self) -> None:
        c, model = self.config, self.transformer
        if c.fp8_base:
            ad.fp8_base(model)
        targets = ad.transformer_targets(model, c.targets, c.blocks, c.target_modules or None)
        made = ad.add_trainable_lora(
            model, targets, rank=c.rank, alpha=c.alpha, dropout=c.dropout, seed=c.seed
        )
        self.params = {
            "transformer": {f"{p}.{k}": v for p, a in made.items() for k, v in a.named_parameters()}
        }
        if c.train_text_encoder:
            made = ad.add_trainable_lora(
                self.clip, ad.clip_targets(self.clip, c.targets), rank=c.rank, alpha=c.alpha,
                dropout=c.dropout, seed=c.seed + 1,
            )  # fmt: skip
            self.params["clip"] = {f"{p}.{k}": v for p, a in made.items() for k, v in a.named_parameters()}
        if c.gradient_checkpointing:
            ad.apply_checkpointing(model)

    def all_params(self) -> dict[str, torch.nn.Parameter]:
        return {f"{comp}.{k}": v for comp, d in self.params.items() for k, v in d.items()}

    def max_length(self) -> int:
        return self.pipe.default_max_sequence_length()

    @torch.no_grad()
    def _fill_cache(self) -> None:
        pipe = self.pipe

        def encode_image(x):
            with pipe._ae_autocast():
                return pipe.ae.encode(x[None].to(pipe.device)).float()[0]

        def encode_text(caption):
            from fluxcore.text.encode import encode_prompt

            txt, _, y = encode_prompt(
                [caption], t5=pipe.t5, clip=pipe.clip, t5_tokenizer=pipe.t5_tokenizer,
                clip_tokenizer=pipe.clip_tokenizer, max_length=self.max_length(),
            )  # fmt: skip
            return txt[0].float(), y[0].float()

        self.cache_stats = self.cache.fill(self.items, encode_image, encode_text, text=True)

    # --- batches ---------------------------------------------------------------------------------

    def _batches(self) -> list[list[int]]:
        c = self.config
        return epoch_batches(self.items, c.batch_size, c.repeats, c.seed, self.epoch)

    def next_batch(self) -> dict[str, Tensor]:
        batches = self._batches()
        if self.pos >= len(batches):
            self.epoch, self.pos = self.epoch + 1, 0
            batches = self._batches()
        idx = batches[self.pos]
        self.pos += 1
        items = [self.items[i] for i in idx]
        lat = torch.stack([Cache.read(self.cache.latent_path(it))["latents"] for it in items]).to(self.device)
        text = [Cache.read(self.cache.text_path(it.caption)) for it in items]
        batch = {
            "latents": lat,
            "txt": torch.stack([t["txt"] for t in text]).to(self.device),
            "y": torch.stack([t["y"] for t in text]).to(self.device),
            "captions": [it.caption for it in items],
        }
        if self.config.train_text_encoder:  # CLIP runs in the graph; T5 stays cached
            ids = self.pipe.clip_tokenizer(batch["captions"]).to(self.device)
            batch["y"] = self.clip(ids).pooler_output
        return batch

    # --- one step ------------------------------------------------------------------------------

    def loss(self, batch: dict[str, Tensor]) -> Tensor:
        c, model = self.config, self.transformer
        lat = batch["latents"]
        b, _, h, w = lat.shape
        img = pack(lat)
        img_ids = make_img_ids(b, 8 * h, 8 * w, device=lat.device)
        t = training_timesteps(b, c, img.shape[1], self.gen).to(self.device)
        noise = torch.randn(img.shape, generator=self.gen).to(self.device)
        txt = batch["txt"]
        txt_ids = torch.zeros(b, txt.shape[1], 3, device=self.device)
        guidance = None
        if model.config.guidance_embed:
            guidance = torch.full((b,), float(c.guidance), device=self.device)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp):
            return flow_loss(model, img, img_ids, txt, txt_ids, batch["y"], t, noise=noise, guidance=guidance)

    def train_step(self) -> float:
        c = self.config
        self.transformer.train()
        loss = self.loss(self.next_batch())
        value = loss.item()
        if not math.isfinite(value):
            raise TrainingDivergedError(
                f"LoRA training diverged at step {self.step}: the loss is {value}; try a lower lr (now {c.lr:g})",
                self.step,
            )
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        params = list(self.all_params().values())
        if c.grad_clip:
            torch.nn.utils.clip_grad_norm_(params, c.grad_clip)
        self.optimizer.step()
        self.scheduler.step()
        if self.ema is not None:
            self.ema.update(self.all_params())
        self.step += 1
        self.losses.append(value)
        return value

    def train(self, stop_after: int | None = None, progress: bool = True) -> list[float]:
        """Run to `config.steps` (or stop after `stop_after` more steps); returns this run's
        losses. Resumes first when `config.resume` says so."""
        c = self.config
        if c.resume:
            self.resume(c.resume)
        if self.step == 0:  # dropout draws from the global RNG: a fresh run starts it from the seed
            torch.manual_seed(c.seed)
            random.seed(c.seed)
        bar = Progress(c.steps, self.step, c.log_every) if progress else None
        end = c.steps if stop_after is None else min(c.steps, self.step + stop_after)
        first = len(self.losses)
        while self.step < end:
            value = self.train_step()
            if bar is not None:
                bar.update(self.step, value, self.scheduler.get_last_lr()[0])
            if c.checkpoint_every and self.step % c.checkpoint_every == 0:
                self.save_checkpoint()
            if c.save_every and self.step % c.save_every == 0 and self.step < c.steps:
                self.save_lora(suffix=f"-step{self.step:06d}")
            if c.sample_every and self.step % c.sample_every == 0:
                self.sample()
        if self.step >= c.steps:
            self.save_lora()
            if c.sample_prompts:
                self.sample()
        return self.losses[first:]

    # --- outputs ---------------------------------------------------------------------------------

    def _swap_ema(self) -> None:
        if self.ema is None:
            return
        with torch.no_grad():
            for k, p in self.all_params().items():
                tmp = p.detach().clone()
                p.copy_(self.ema.shadow[k])
                self.ema.shadow[k].copy_(tmp)

    def lora_models(self) -> dict:
        return {
            "transformer": self.transformer,
            "clip": self.clip if self.config.train_text_encoder else None,
        }

    def save_lora(self, suffix: str = "") -> list[Path]:
        """Write the adapter (EMA weights when EMA is on) in each of `config.formats`."""
        from fluxcore.lora.save import save_lora

        c = self.config
        meta = {"fluxcore_step": str(self.step), "fluxcore_base_model": str(c.model)}
        written = []
        self._swap_ema()
        try:
            for fmt in c.formats:
                tail = "" if fmt == "peft" else f"_{fmt}"
                path = self.out / f"{c.name}{suffix}{tail}.safetensors"
                self.out.mkdir(parents=True, exist_ok=True)
                written.append(
                    save_lora(self.lora_models(), path, adapter_name=ADAPTER, format=fmt, metadata=meta)
                )
        finally:
            self._swap_ema()
        return written

    @torch.no_grad()
    def sample(self) -> list[Path]:
        """Images for `config.sample_prompts` with fixed seeds → output_dir/samples/step-N_i.png."""
        from fluxcore import FluxPipeline

        c, p = self.config, self.pipe
        if not c.sample_prompts:
            return []
        seeds = c.sample_seeds or list(range(len(c.sample_prompts)))
        size = c.sample_size or c.resolution
        clip = self.clip if c.train_text_encoder else p.clip
        gen = FluxPipeline(
            self.transformer, p.ae, p.t5, clip, p.t5_tokenizer, p.clip_tokenizer,
            schedule=p.schedule, fused_kernels=False,
        )  # fmt: skip
        self.transformer.eval()
        self._swap_ema()
        try:
            images = gen(
                list(c.sample_prompts), height=size, width=size, num_inference_steps=c.sample_steps,
                guidance_scale=c.sample_guidance, generator=list(seeds), progress=False,
            ).images  # fmt: skip
        finally:
            self._swap_ema()
            self.transformer.train()
        folder = self.out / "samples"
        folder.mkdir(parents=True, exist_ok=True)
        paths = []
        for i, im in enumerate(images):
            path = folder / f"step-{self.step:06d}_{i}.png"
            im.save(path)
            paths.append(path)
        return paths

    # --- checkpoints (fluxcore.finetune.checkpoint) ------------------------------------------------

    def save_checkpoint(self) -> Path:
        return save_checkpoint(self)

    def latest_checkpoint(self) -> Path | None:
        return latest_checkpoint(self.out)

    def resume(self, where) -> Path | None:
        return resume(self, where)
