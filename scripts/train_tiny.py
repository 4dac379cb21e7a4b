"""Train the tiny FLUX that ships in fluxcore/assets/flux-tiny/, from nothing, on a CPU.

Every part of the real stack is trained here on the captioned-shapes data (`fluxcore.toydata`)
and written in the official Hugging Face snapshot layout, so the normal loaders read it:

    tokenizer_2/    sentencepiece unigram model fitted on the captions (T5 tokenizer)
    tokenizer/      byte-level BPE vocab.json + merges.txt learnt from the captions (CLIP)
    vae/            FLUX autoencoder structure, 16 latent channels, trained by reconstruction
    text_encoder_2/ T5 v1.1 architecture    ┐ trained jointly with the transformer
    text_encoder/   CLIP text architecture  ├ under the rectified-flow loss (encoder stays frozen)
    transformer/    Flux with double- and single-stream blocks ┘
    scheduler/, model_index.json

Why this recipe: the autoencoder is trained first, alone, because the flow model needs a fixed
latent space; its latent scale/shift are then measured on data (as FLUX's 0.3611 / 0.1159 were).
The text encoders are trained jointly with the transformer rather than frozen at random: the
gradient of the flow loss then shapes the token embeddings so that colour, shape and position
words become separable inputs for the transformer, which is what lets the model recombine them
for prompts it never saw. They are tiny, so this costs little next to the transformer. Latents
of a fixed bank of training images are computed once (the encoder is frozen by then), which
leaves only the transformer and the text encoders in the training step.

Usage (run from the repository root):

    python scripts/train_tiny.py                    # full run, ~40 min on 2 CPU cores
    python scripts/train_tiny.py --smoke --out DIR  # seconds: every stage, a few steps (CI)
    python scripts/train_tiny.py --stages flow      # redo one stage (reads earlier ones from --out)

Stages read what earlier stages wrote in --out through fluxcore's own loaders.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import shutil
import sys
import time
from collections import Counter
from pathlib import Path

import torch
from torch import nn

from fluxcore import Flux, FluxConfig
from fluxcore.autoencoder import AutoEncoder, AutoEncoderConfig
from fluxcore.text.clip import CLIPTextConfig, CLIPTextEncoder
from fluxcore.text.t5 import T5Config, T5Encoder
from fluxcore.toydata import CaptionedShapes, all_captions, caption
from fluxcore.train import EMA, TrainConfig, lr_at, train
from fluxcore.weights import save_flux
from fluxcore.weights.encoders import (
    load_autoencoder,
    load_clip_tokenizer,
    load_t5_tokenizer,
    save_autoencoder,
    save_clip,
    save_t5,
)

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "fluxcore" / "assets" / "flux-tiny"

RESOLUTION = 64  # pixels; latents 16 x 8 x 8; 16 packed image tokens
T5_MAX_LENGTH = 24  # padded T5 tokens (captions take <= 12); the pipeline must use the same
CLIP_MAX_LENGTH = 77

AE_CONFIG = AutoEncoderConfig(
    resolution=RESOLUTION, ch=32, ch_mult=(1, 1, 2, 2), num_res_blocks=1, norm_groups=8
)


def t5_config(vocab_size: int) -> T5Config:
    return T5Config(
        vocab_size=vocab_size, d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4,
        relative_attention_num_buckets=8, relative_attention_max_distance=32,
    )  # fmt: skip


def clip_config(vocab_size: int, eos_token_id: int) -> CLIPTextConfig:
    return CLIPTextConfig(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=CLIP_MAX_LENGTH, eos_token_id=eos_token_id,
    )  # fmt: skip


FLUX_CONFIG = FluxConfig(
    in_channels=64, out_channels=64, vec_in_dim=64, context_in_dim=64, hidden_size=128, mlp_ratio=4.0,
    num_heads=4, depth=2, depth_single_blocks=4, axes_dim=(8, 12, 12), guidance_embed=True,
)  # fmt: skip
# guidance_embed=True makes it a dev-type model, which the pipeline samples like FLUX.1-dev:
# 28 steps on the shifted schedule. A schnell-type model (no guidance input) would get schnell's
# 4 unshifted steps, which only a timestep-distilled model can afford. The guidance input is
# trained on random values U(1, 5) that carry no signal, so the model learns to ignore it and any
# --guidance works (there is no teacher here to distil real guidance from).


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# --- stage 1: tokenizers ------------------------------------------------------------------------


def fit_t5_tokenizer(folder: Path, captions: list[str]) -> None:
    """sentencepiece model with T5's special ids (pad 0, eos 1, unk 2, no bos).

    BPE rather than T5's unigram: on a corpus this repetitive the unigram trainer's seed pieces stop
    at characters and short fragments, while BPE reaches whole words (one token per word)."""
    import sentencepiece as spm

    folder.mkdir(parents=True, exist_ok=True)
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(captions),
        model_prefix=str(folder / "spiece"),
        model_type="bpe",
        vocab_size=128,
        hard_vocab_limit=False,
        character_coverage=1.0,
        pad_id=0, eos_id=1, unk_id=2, bos_id=-1,
        pad_piece="<pad>", eos_piece="</s>", unk_piece="<unk>",
        num_threads=1, minloglevel=2,
    )  # fmt: skip
    (folder / "spiece.vocab").unlink()
    special = {"eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>"}
    (folder / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")
    config = {
        "tokenizer_class": "T5Tokenizer", "model_max_length": T5_MAX_LENGTH, "extra_ids": 0,
        "additional_special_tokens": [], "legacy": True, **special,
    }  # fmt: skip
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible byte → printable character table (printable Latin-1 bytes map to
    themselves, the rest to code points from 256 up), in the order CLIP's vocabulary lists them."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {b: chr(b) for b in keep}, 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return {b: table[b] for b in keep + [b for b in range(256) if b not in keep]}


def learn_bpe(words: Counter) -> list[tuple[str, str]]:
    """Byte-pair merges, most frequent pair first (ties: lexicographic), until every word is one
    symbol. Words end in '</w>' as in CLIP."""
    byte_char = bytes_to_unicode()
    seqs = {}
    for word in words:
        chars = [byte_char[b] for b in word.encode("utf-8")]
        seqs[word] = chars[:-1] + [chars[-1] + "</w>"]
    merges = []
    while True:
        pairs: Counter = Counter()
        for word, seq in seqs.items():
            for a, b in zip(seq, seq[1:]):
                pairs[a, b] += words[word]
        if not pairs:
            return merges
        best = min(pairs, key=lambda p: (-pairs[p], p))
        merges.append(best)
        for word, seq in seqs.items():
            out, i = [], 0
            while i < len(seq):
                if i + 1 < len(seq) and (seq[i], seq[i + 1]) == best:
                    out.append(seq[i] + seq[i + 1])
                    i += 2
                else:
                    out.append(seq[i])
                    i += 1
            seqs[word] = out


def fit_clip_tokenizer(folder: Path, captions: list[str]) -> None:
    """CLIP's vocabulary layout: 256 byte symbols, the same with '</w>', one entry per merge, then
    <|startoftext|> and <|endoftext|> (the largest id, as CLIP-L's pooling relies on)."""
    folder.mkdir(parents=True, exist_ok=True)
    words = Counter(w for c in captions for w in c.lower().split())
    merges = learn_bpe(words)
    symbols = list(bytes_to_unicode().values())
    vocab_list = symbols + [s + "</w>" for s in symbols] + [a + b for a, b in merges]
    vocab_list = list(dict.fromkeys(vocab_list)) + ["<|startoftext|>", "<|endoftext|>"]
    vocab = {tok: i for i, tok in enumerate(vocab_list)}
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False) + "\n", encoding="utf-8")
    lines = ["#version: 0.2"] + [f"{a} {b}" for a, b in merges]
    (folder / "merges.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    special = {
        "bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>", "unk_token": "<|endoftext|>",
    }  # fmt: skip
    (folder / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")
    config = {
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": CLIP_MAX_LENGTH,
        "do_lower_case": True,
        **special,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")


def stage_tokenizers(out: Path) -> None:
    captions = all_captions()
    fit_t5_tokenizer(out / "tokenizer_2", captions)
    fit_clip_tokenizer(out / "tokenizer", captions)
    t5_tok, clip_tok = load_t5_tokenizer(out), load_clip_tokenizer(out)
    longest = max(int((t5_tok(c, max_length=T5_MAX_LENGTH) != t5_tok.pad_id).sum()) for c in captions)
    log(f"tokenizers: {len(captions)} captions; the longest takes {longest}/{T5_MAX_LENGTH} T5 tokens")
    example = captions[0]
    log(
        f"  {example!r} -> T5 {t5_tok(example, max_length=12)[0].tolist()}  CLIP {clip_tok(example)[0, :14].tolist()}"
    )


# --- stage 2: autoencoder -------------------------------------------------------------------------


def latent_stats(ae: AutoEncoder, images: torch.Tensor) -> tuple[float, float]:
    """(scale_factor, shift_factor) that give the encoder means zero mean and unit variance."""
    with torch.no_grad():
        mean, _ = ae.encode_moments(images)
    shift = mean.mean().item()
    return 1.0 / (mean - shift).std().item(), shift


def stage_autoencoder(
    out: Path, steps: int, batch: int, minutes: float, seed: int, resume: bool = False, lr: float = 2e-3
) -> None:
    torch.manual_seed(seed)
    if resume:  # continue from the autoencoder in `out` (data seed moved on, so new images)
        ae = load_autoencoder(out, dtype=torch.float32).requires_grad_(True)
        seed += 1000
    else:
        ae = AutoEncoder(AE_CONFIG)
    data = CaptionedShapes("train", resolution=RESOLUTION, length=max(1, steps) * batch, seed=seed + 1)
    n_probe = min(256, 4 * batch)
    probe, _ = CaptionedShapes("train", resolution=RESOLUTION, length=n_probe, seed=seed + 100).batch(
        range(n_probe)
    )
    opt = torch.optim.AdamW(ae.parameters(), lr=lr, betas=(0.9, 0.99), weight_decay=0.0)
    schedule = TrainConfig(steps=steps, lr=lr, warmup=min(50, steps // 10), cosine=True, min_lr_ratio=0.02)
    gen = torch.Generator().manual_seed(seed)
    start, deadline = time.perf_counter(), time.perf_counter() + 60 * minutes
    n_params = sum(p.numel() for p in ae.parameters())
    log(f"autoencoder: {n_params / 1e6:.2f}M parameters, {steps} steps of {batch} images")
    ae.train()
    for step in range(steps):
        images, _ = data.batch(range(step * batch, (step + 1) * batch))
        mean, logvar = ae.encode_moments(images)
        logvar = logvar.clamp(-20, 5)
        z = mean + torch.exp(0.5 * logvar) * torch.randn(mean.shape, generator=gen)
        recon = ae.decoder(z)
        rec = (recon - images).square().mean() + 0.5 * (recon - images).abs().mean()
        # A weak KL term keeps the latent scale bounded and the decoder tolerant of small latent
        # errors, which the flow model's samples will have.
        kl = 0.5 * (mean.square() + logvar.exp() - 1 - logvar).mean()
        loss = rec + 1e-4 * kl
        for group in opt.param_groups:
            group["lr"] = lr_at(step, schedule)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(ae.parameters(), 1.0)
        opt.step()
        if (step + 1) % 50 == 0 or step + 1 == steps:
            log(
                f"ae step {step + 1}/{steps}  rec {rec.item():.4f}  kl {kl.item():.3f}  {time.perf_counter() - start:.0f}s"
            )
        if time.perf_counter() > deadline:
            log(f"ae: time budget of {minutes} min reached at step {step + 1}")
            break
    ae.eval()
    scale, shift = latent_stats(ae, probe)
    ae.config = ae.config.replace(scale_factor=scale, shift_factor=shift)
    ae.scale_factor, ae.shift_factor = scale, shift
    with torch.no_grad():
        recon = ae.decode(ae.encode(probe)).clamp(-1, 1)
    psnr = 10 * math.log10(4 / (recon - probe).square().mean().item())
    log(f"autoencoder: latent scale {scale:.4f} shift {shift:.4f}; reconstruction PSNR {psnr:.1f} dB")
    if (out / "vae").exists():
        shutil.rmtree(out / "vae")
    save_autoencoder(ae, out / "vae", format="diffusers")


# --- stage 3: transformer + text encoders under the flow loss ---------------------------------------


class TextAndFlow(nn.Module):
    """The three jointly trained parts, so one EMA covers them all."""

    def __init__(self, t5: T5Encoder, clip: CLIPTextEncoder, flux: Flux):
        super().__init__()
        self.t5, self.clip, self.flux = t5, clip, flux


def build_bank(ae: AutoEncoder, size: int, seed: int, t5_tok, clip_tok) -> dict:
    """Latents of `size` training images and the token ids of their two captions (with and without
    the background clause): latents [N, 16, 8, 8], t5 [N, 2, T5_MAX_LENGTH], clip [N, 2, 77]."""
    data = CaptionedShapes("train", resolution=RESOLUTION, length=size, seed=seed)
    latents, captions = [], []
    for lo in range(0, size, 256):
        idx = range(lo, min(size, lo + 256))
        images = torch.stack([data[i][0] for i in idx])
        with torch.no_grad():
            latents.append(ae.encode(images))
        for i in idx:
            spec, _ = data.spec(i)
            captions += [caption(spec, True), caption(spec, False)]
    return {
        "latents": torch.cat(latents),
        "t5": t5_tok(captions, max_length=T5_MAX_LENGTH).view(size, 2, -1),
        "clip": clip_tok(captions).view(size, 2, -1),
    }


def stage_flow(out: Path, steps: int, batch: int, minutes: float, bank_size: int, seed: int) -> None:
    torch.manual_seed(seed)
    ae = load_autoencoder(out)
    t5_tok, clip_tok = load_t5_tokenizer(out, max_length=T5_MAX_LENGTH), load_clip_tokenizer(out)
    t0 = time.perf_counter()
    bank = build_bank(ae, bank_size, seed + 2, t5_tok, clip_tok)
    lat = bank["latents"]
    log(
        f"latent bank: {tuple(lat.shape)}, mean {lat.mean():.3f} std {lat.std():.3f}, {time.perf_counter() - t0:.0f}s"
    )

    import sentencepiece

    t5_vocab = sentencepiece.SentencePieceProcessor(
        model_file=str(out / "tokenizer_2" / "spiece.model")
    ).get_piece_size()
    clip_vocab = len(json.loads((out / "tokenizer" / "vocab.json").read_text(encoding="utf-8")))
    stack = TextAndFlow(
        T5Encoder(t5_config(vocab_size=t5_vocab)),
        CLIPTextEncoder(clip_config(vocab_size=clip_vocab, eos_token_id=clip_tok.eos_id)),
        Flux(FLUX_CONFIG),
    )
    counts = {name: sum(p.numel() for p in m.parameters()) for name, m in stack.named_children()}
    log("parameters: " + ", ".join(f"{k} {v / 1e6:.2f}M" for k, v in counts.items()))
    ema = EMA(stack, decay=0.999)

    gen = torch.Generator().manual_seed(seed + 3)

    def batches():
        while True:
            idx = torch.randint(0, bank_size, (batch,), generator=gen)
            # 20% of captions leave the background out (it is then unconstrained)
            which = (torch.rand(batch, generator=gen) < 0.2).long()
            yield idx, which

    def condition(item):
        idx, which = item
        rows = torch.arange(len(idx))
        txt = stack.t5(bank["t5"][idx][rows, which])
        y = stack.clip(bank["clip"][idx][rows, which]).pooler_output
        guidance = 1.0 + 4.0 * torch.rand(len(idx), generator=gen)
        return {"latents": lat[idx], "txt": txt, "y": y, "guidance": guidance}

    config = TrainConfig(
        steps=steps, lr=1e-3, weight_decay=0.01, warmup=min(200, steps // 10), cosine=True, min_lr_ratio=0.05,
        grad_clip=1.0, timesteps="logit_normal", resolution_shift=True, seed=seed,
        log_every=50, max_seconds=60 * minutes,
    )  # fmt: skip
    stack.train()
    train(
        stack.flux,
        batches(),
        config,
        condition=condition,
        extra_params=[*stack.t5.parameters(), *stack.clip.parameters()],
        on_step=lambda step, loss: ema.update(stack),
    )
    final = ema.model
    for sub in ("transformer", "text_encoder", "text_encoder_2"):
        if (out / sub).exists():
            shutil.rmtree(out / sub)
    save_flux(final.flux, out / "transformer", format="diffusers")
    save_t5(final.t5, out / "text_encoder_2")
    save_clip(final.clip, out / "text_encoder")
    write_index(out)
    log(f"wrote {out}")


def write_index(out: Path) -> None:
    """model_index.json and scheduler/ as in the FLUX.1 repositories."""
    index = {
        "_class_name": "FluxPipeline",
        "_diffusers_version": "0.32.0",
        "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "text_encoder_2": ["transformers", "T5EncoderModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "tokenizer_2": ["transformers", "T5TokenizerFast"],
        "transformer": ["diffusers", "FluxTransformer2DModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }
    (out / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
    scheduler = {
        "_class_name": "FlowMatchEulerDiscreteScheduler",
        "_diffusers_version": "0.32.0",
        "base_image_seq_len": 256,
        "base_shift": 0.5,
        "max_image_seq_len": 4096,
        "max_shift": 1.15,
        "num_train_timesteps": 1000,
        "shift": 1.0,
        "use_dynamic_shifting": True,
    }
    (out / "scheduler").mkdir(parents=True, exist_ok=True)
    (out / "scheduler" / "scheduler_config.json").write_text(json.dumps(scheduler, indent=2) + "\n")


# --- stage 4: evaluation on held-out prompts ------------------------------------------------------------


def stage_eval(out: Path, per_combo: int = 2) -> dict[str, float]:
    """Generate every held-out combination `per_combo` times (different backgrounds and seeds)
    with the normal pipeline and read the images back with `toydata.classify`."""
    from fluxcore.pipeline import FluxPipeline
    from fluxcore.toydata import COLORS, HELD_OUT, ShapeSpec, classify

    pipe = FluxPipeline.from_pretrained(out)
    names = list(COLORS)
    specs = []
    for k, (color, shape, position) in enumerate(HELD_OUT):
        for j in range(per_combo):
            bg = [c for c in names if c != color][(k + 3 * j) % (len(names) - 1)]
            specs.append(ShapeSpec(color, shape, position, bg))
    t0 = time.perf_counter()
    images = pipe([caption(s) for s in specs], height=RESOLUTION, width=RESOLUTION,
                  generator=list(range(len(specs))), output_type="pt", progress=False).images  # fmt: skip
    hits = Counter()
    for spec, image in zip(specs, images * 2 - 1):
        got = classify(image)
        for key in ("color", "shape", "position", "background"):
            hits[key] += getattr(got, key) == getattr(spec, key)
    rates = {k: hits[k] / len(specs) for k in ("color", "shape", "position", "background")}
    log(f"held-out prompts ({len(specs)} images, {time.perf_counter() - t0:.1f}s): "
        + ", ".join(f"{k} {v:.0%}" for k, v in rates.items()))  # fmt: skip
    return rates


# --- main -------------------------------------------------------------------------------------------


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="model folder (default: the shipped one)")
    p.add_argument(
        "--stages",
        default="tokenizers,ae,flow,eval",
        help="comma-separated subset of tokenizers,ae,flow,eval",
    )
    p.add_argument("--smoke", action="store_true", help="a few steps of every stage (CI)")
    p.add_argument("--ae-steps", type=int, default=900)
    p.add_argument("--ae-batch", type=int, default=16)
    p.add_argument("--ae-lr", type=float, default=2e-3)
    p.add_argument("--ae-resume", action="store_true", help="continue training the autoencoder in --out")
    p.add_argument("--ae-minutes", type=float, default=18.0, help="stop the autoencoder stage after this")
    p.add_argument("--flow-steps", type=int, default=5000)
    p.add_argument("--flow-batch", type=int, default=32)
    p.add_argument("--flow-minutes", type=float, default=28.0, help="stop the flow stage after this")
    p.add_argument("--bank", type=int, default=6144, help="training images whose latents are precomputed")
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads (2 OpenMP threads on a shared 2-core machine thrash: 1 is faster there)",
    )
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.smoke:
        args.ae_steps, args.ae_batch, args.flow_steps, args.flow_batch, args.bank = 2, 4, 2, 4, 8
    torch.set_num_threads(args.threads)
    random.seed(args.seed)
    stages = [s.strip() for s in args.stages.split(",") if s.strip()]
    unknown = set(stages) - {"tokenizers", "ae", "flow", "eval"}
    if unknown:
        p.error(f"unknown stages {sorted(unknown)}; choose from tokenizers, ae, flow, eval")
    args.out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    if "tokenizers" in stages:
        stage_tokenizers(args.out)
    if "ae" in stages:
        stage_autoencoder(
            args.out, args.ae_steps, args.ae_batch, args.ae_minutes, args.seed, args.ae_resume, args.ae_lr
        )
    if "flow" in stages:
        stage_flow(args.out, args.flow_steps, args.flow_batch, args.flow_minutes, args.bank, args.seed)
    if "eval" in stages:
        stage_eval(args.out, per_combo=1 if args.smoke else 4)
    log(f"done in {(time.perf_counter() - start) / 60:.1f} min")
    return 0


if __name__ == "__main__":
    sys.exit(main())
