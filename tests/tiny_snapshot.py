"""Complete tiny FLUX model folders for tests, written by the oracle libraries themselves.

    write_tiny_snapshot(folder, variant="dev", layout="hf")

layout="hf": the Hugging Face snapshot layout, written by diffusers' `FluxPipeline.save_pretrained`
  (model_index.json, scheduler/, transformer/, vae/, text_encoder/, text_encoder_2/, tokenizer/,
  tokenizer_2/), from tiny random transformers/diffusers models and tokenizers trained here.
layout="bfl": the BFL files (flux1-<variant>.safetensors, ae.safetensors) beside the text-encoder
  and tokenizer folders — the same weights as the "hf" snapshot with the same seed.

Sizes match PRESETS["tiny-dev"] / ["tiny-schnell"] (T5 width 48, CLIP width 32, hidden 64) and a
4-level autoencoder with 8x downsampling. Nothing is downloaded. Other test files may import this.
"""

from __future__ import annotations

import io
import json
import random
import shutil
import string
from functools import lru_cache
from pathlib import Path

import torch

_WORDS = (
    "a photo of an astronaut riding horse on mars cat dog red blue green small big house tree "
    "river mountain sky sunset portrait painting oil watercolor city night light dark forest "
    "beach ocean wave cloud flower garden street car robot dragon castle snow rain fire"
).split()

_CLIP_SPECIALS = {
    "bos_token": "<|startoftext|>",
    "eos_token": "<|endoftext|>",
    "pad_token": "<|endoftext|>",
    "unk_token": "<|endoftext|>",
}


def _corpus(n: int = 800, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    pool = list(_WORDS) + [
        "".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(2, 7))) for _ in range(300)
    ]
    return [" ".join(rng.choice(pool) for _ in range(rng.randint(1, 12))) for _ in range(n)]


@lru_cache(maxsize=1)
def _spiece_model() -> bytes:
    import sentencepiece as spm

    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(_corpus()),
        model_writer=buf,
        vocab_size=120,
        model_type="unigram",
        pad_id=0,
        eos_id=1,
        unk_id=2,
        bos_id=-1,
        character_coverage=1.0,
        minloglevel=2,
        num_threads=1,
    )
    return buf.getvalue()


def _t5_tokenizer(tmp: Path):
    from transformers import T5TokenizerFast

    src = tmp / "spiece_src"
    src.mkdir(parents=True, exist_ok=True)
    (src / "spiece.model").write_bytes(_spiece_model())
    return T5TokenizerFast.from_pretrained(src, extra_ids=0)


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's byte → printable character table (the byte-level BPE alphabet)."""
    keep = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    chars, extra = {}, 0
    for b in range(256):
        if b in keep:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return chars


def _clip_tokenizer(tmp: Path):
    """CLIP-style byte-level BPE ('</w>' word ends), built deterministically: every byte alone and
    word-final, plus left-to-right merges spelling out each word of _WORDS. Like the real
    vocabulary, the two special tokens take the highest ids and padding uses <|endoftext|>."""
    from transformers import CLIPTokenizer

    alphabet = list(_bytes_to_unicode().values())
    vocab = alphabet + [c + "</w>" for c in alphabet]
    merges = []
    for word in sorted(set(_WORDS)):
        left = word[0]
        for i, ch in enumerate(word[1:], start=1):
            right = ch + ("</w>" if i == len(word) - 1 else "")
            merges.append(f"{left} {right}")
            left = left + right
            vocab.append(left)
    vocab = list(dict.fromkeys(vocab)) + ["<|startoftext|>", "<|endoftext|>"]
    merges = list(dict.fromkeys(merges))
    src = tmp / "clip_src"
    src.mkdir(parents=True, exist_ok=True)
    (src / "vocab.json").write_text(json.dumps({w: i for i, w in enumerate(vocab)}, ensure_ascii=False))
    (src / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    (src / "special_tokens_map.json").write_text(json.dumps(_CLIP_SPECIALS))
    (src / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 77, "do_lower_case": True}))
    return CLIPTokenizer.from_pretrained(src)


def _randomize(model: torch.nn.Module, scale: float = 0.05) -> None:
    """Perturb every parameter so no zero-initialised or identity tensor hides a mapping error."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn_like(p))


def build_components(variant: str = "dev", seed: int = 0, tmp: Path | None = None) -> dict:
    """The diffusers/transformers objects of a tiny FLUX pipeline (not saved)."""
    import diffusers
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    if variant not in ("dev", "schnell", "fill", "canny", "kontext"):
        raise ValueError(f"variant must be dev, schnell, fill, canny or kontext; got {variant!r}")
    tmp = Path(tmp) if tmp is not None else Path.cwd()
    torch.manual_seed(seed)
    tok2 = _t5_tokenizer(tmp)
    tok = _clip_tokenizer(tmp)
    vocab = len(tok)
    clip = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=vocab,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            max_position_embeddings=77,
            hidden_act="quick_gelu",
            projection_dim=32,
            bos_token_id=vocab - 2,
            eos_token_id=vocab - 1,
            pad_token_id=vocab - 1,
        )
    ).eval()
    t5 = T5EncoderModel(
        T5Config(
            vocab_size=len(tok2),
            d_model=48,
            d_kv=12,
            d_ff=64,
            num_layers=2,
            num_heads=4,
            relative_attention_num_buckets=8,
            relative_attention_max_distance=20,
            feed_forward_proj="gated-gelu",
            tie_word_embeddings=False,
            dropout_rate=0.0,
        )
    ).eval()
    in_channels = {"fill": 384, "canny": 128}.get(variant, 64)
    transformer = diffusers.FluxTransformer2DModel(
        patch_size=1,
        in_channels=in_channels,
        out_channels=64,
        num_layers=2,
        num_single_layers=2,
        attention_head_dim=16,
        num_attention_heads=4,
        joint_attention_dim=48,
        pooled_projection_dim=32,
        guidance_embeds=variant != "schnell",
        axes_dims_rope=(4, 6, 6),
    ).eval()
    vae = diffusers.AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=["DownEncoderBlock2D"] * 4,
        up_block_types=["UpDecoderBlock2D"] * 4,
        block_out_channels=(8, 16, 16, 16),
        layers_per_block=1,
        latent_channels=16,
        norm_num_groups=4,
        sample_size=32,
        scaling_factor=0.3611,
        shift_factor=0.1159,
        use_quant_conv=False,
        use_post_quant_conv=False,
        mid_block_add_attention=True,
        force_upcast=True,
    ).eval()
    for m in (clip, t5, transformer, vae):
        _randomize(m)
    with torch.no_grad():
        # log-variance -30: diffusers pipelines that *sample* the latent distribution (Fill, Control)
        # then get the mean (std e^-15), which is what the reference and fluxcore use.
        vae.encoder.conv_out.bias[16:] = -30.0
    if variant == "schnell":
        scheduler = diffusers.FlowMatchEulerDiscreteScheduler(shift=1.0, use_dynamic_shifting=False)
    else:
        scheduler = diffusers.FlowMatchEulerDiscreteScheduler(
            shift=3.0,
            use_dynamic_shifting=True,
            base_shift=0.5,
            max_shift=1.15,
            base_image_seq_len=256,
            max_image_seq_len=4096,
        )
    return dict(
        scheduler=scheduler,
        vae=vae,
        text_encoder=clip,
        tokenizer=tok,
        text_encoder_2=t5,
        tokenizer_2=tok2,
        transformer=transformer,
    )


def write_tiny_snapshot(folder, *, variant: str = "dev", layout: str = "hf", seed: int = 0) -> Path:
    """Write a tiny FLUX model folder (see the module docstring) and return its path."""
    import diffusers

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    work = folder.parent / f".{folder.name}_work"
    parts = build_components(variant, seed, tmp=work)
    cls = {"fill": "FluxFillPipeline", "canny": "FluxControlPipeline", "kontext": "FluxKontextPipeline"}
    pipe_cls = getattr(diffusers, cls.get(variant, "FluxPipeline"))
    hf = folder if layout == "hf" else work / "hf"
    pipe_cls(**parts).save_pretrained(hf)
    # The official snapshots also carry the slow-tokenizer files (recent transformers writes only
    # tokenizer.json): vocab.json + merges.txt for CLIP, spiece.model for T5.
    for name in ("vocab.json", "merges.txt"):
        shutil.copy(work / "clip_src" / name, hf / "tokenizer" / name)
    (hf / "tokenizer" / "special_tokens_map.json").write_text(json.dumps(_CLIP_SPECIALS))
    shutil.copy(work / "spiece_src" / "spiece.model", hf / "tokenizer_2" / "spiece.model")
    if layout == "bfl":
        from fluxcore.weights import load_flux, save_flux
        from fluxcore.weights.encoders import load_autoencoder, save_autoencoder

        save_flux(load_flux(hf), folder / f"flux1-{variant}.safetensors", format="bfl")
        save_autoencoder(load_autoencoder(hf / "vae"), folder / "ae.safetensors", format="bfl")
        for sub in ("text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2"):
            shutil.copytree(hf / sub, folder / sub, dirs_exist_ok=True)
    elif layout != "hf":
        raise ValueError(f"layout must be 'hf' or 'bfl', got {layout!r}")
    shutil.rmtree(work, ignore_errors=True)
    return folder
