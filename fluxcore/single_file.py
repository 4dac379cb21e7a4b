"""The parts of a FLUX pipeline from single .safetensors files, as ComfyUI users keep them.

    parts = load_single_file_parts("flux1-dev.safetensors", t5="t5xxl_fp16.safetensors",
                                   clip="clip_l.safetensors", ae="ae.safetensors", tokenizers=None)

A file may hold one part or several: ComfyUI's all-in-one checkpoints store the transformer under
`model.diffusion_model.`, CLIP-L under `text_encoders.clip_l.transformer.`, T5-XXL under
`text_encoders.t5xxl.transformer.` and the autoencoder (BFL keys) under `vae.`. Each part is
looked for in its own argument first, then in the transformer's file; its key prefix is found from
a key only that part has. Tokenizers are small and not in these files: `tokenizers=` names a folder
holding `tokenizer/` and `tokenizer_2/` (any FLUX snapshot) or a Hub id; by default they come from
the FLUX.1-schnell repository (Apache-2.0, ~3 MB) through the Hugging Face cache.
"""

from __future__ import annotations

from pathlib import Path

import torch

from fluxcore.errors import WeightsError

DEFAULT_TOKENIZERS = "black-forest-labs/FLUX.1-schnell"

# A key only that part has (the rest of the key is what precedes it: the prefix), and where official
# single-file copies come from, for the error when a part is missing.
_MARKERS = {
    "t5": ("encoder.block.0.layer.0.SelfAttention.q.weight", "t5xxl_fp16.safetensors from "
           "comfyanonymous/flux_text_encoders, or the text_encoder_2/ folder of black-forest-labs/FLUX.1-dev"),
    "clip": ("embeddings.token_embedding.weight", "clip_l.safetensors from comfyanonymous/flux_text_encoders, "
             "or the text_encoder/ folder of black-forest-labs/FLUX.1-dev"),
    "ae": ("decoder.conv_in.weight", "ae.safetensors from black-forest-labs/FLUX.1-schnell (Apache-2.0) "
           "or FLUX.1-dev, or their vae/ folder"),
}  # fmt: skip
_ARG = {"t5": "t5=", "clip": "clip=", "ae": "ae="}


class _Prefixed:
    """A read-only view of the keys of a Checkpoint under `prefix`, with the prefix removed: the
    part of a checkpoint the config inference and `load_into` read."""

    def __init__(self, ckpt, prefix: str):
        self.ckpt, self.prefix = ckpt, prefix
        self.source = f"{ckpt.source} (keys under {prefix!r})" if prefix else ckpt.source
        self.metadata = ckpt.metadata
        self._keys = [k[len(prefix) :] for k in ckpt.keys() if k.startswith(prefix)]

    def keys(self) -> list[str]:
        return list(self._keys)

    def __contains__(self, key) -> bool:
        return self.prefix + key in self.ckpt

    def shape(self, key):
        return self.ckpt.shape(self.prefix + key)

    def stream(self):
        for key, t in self.ckpt.stream([self.prefix + k for k in self._keys]):
            yield key[len(self.prefix) :], t


def find_prefix(keys, part: str) -> str | None:
    """The prefix under which `part` ("t5", "clip", "ae") sits among `keys`, or None."""
    marker = _MARKERS[part][0]
    found = sorted(k[: -len(marker)] for k in keys if k.endswith(marker))
    if part == "t5":  # T5's decoder has the same key under decoder.: never in FLUX files, but skip it
        found = [p for p in found if not p.endswith("decoder.")]
    if part == "clip":
        found = [p.removesuffix("text_model.") for p in found]
    return found[0] if found else None


def _locate(part: str, given, transformer_file: Path):
    """(path, prefix) of `part`: from its own argument, else from the transformer's file; None if neither."""
    from fluxcore.weights.io import open_checkpoint

    for source in ([Path(given)] if given is not None else []) + [transformer_file]:
        if source.is_dir():
            return source, None  # a component folder: the ordinary loaders read it
        with open_checkpoint(source) as ck:
            prefix = find_prefix(ck.keys(), part)
        if prefix is not None:
            return source, prefix
        if given is not None and source == Path(given):
            raise WeightsError(
                f"{_ARG[part]}{given} holds no {part.upper()} weights (no key ending in {_MARKERS[part][0]!r})"
            )
    return None


def _missing(part: str, transformer_file: Path) -> WeightsError:
    return WeightsError(
        f"{transformer_file} has no {part.upper() if part != 'ae' else 'autoencoder'} weights; pass "
        f"{_ARG[part]}PATH (official copies: {_MARKERS[part][1]})"
    )


def _load_prefixed(part: str, path: Path, prefix: str, device, dtype):
    """Build and fill one part from the keys under `prefix` of the file at `path`."""
    from fluxcore.autoencoder import AutoEncoder
    from fluxcore.text.clip import CLIPTextEncoder
    from fluxcore.text.t5 import T5Encoder
    from fluxcore.weights.encoders import infer_autoencoder_config, infer_clip_config, infer_t5_config
    from fluxcore.weights.io import load_into, open_checkpoint

    with open_checkpoint(path) as ck:
        view = _Prefixed(ck, prefix)
        if part == "t5":
            config = infer_t5_config(view)
            with torch.device("meta"):
                model = T5Encoder(config)
            has_shared = "shared.weight" in view
            tensors = (
                ("shared.weight" if k == "encoder.embed_tokens.weight" else k, t)
                for k, t in view.stream()
                if not (k == "encoder.embed_tokens.weight" and has_shared)
            )
        elif part == "clip":

            def name(k: str) -> str:
                return k if k.startswith("text_model.") else f"text_model.{k}"

            keep = [
                k
                for k in view.keys()
                if not k.endswith(("position_ids", "logit_scale")) and not k.startswith("text_projection")
            ]
            config = infer_clip_config({name(k): view.shape(k) for k in keep}, view.source)
            with torch.device("meta"):
                model = CLIPTextEncoder(config)
            tensors = ((name(k), t) for k, t in view.stream() if k in set(keep))
        else:
            config = infer_autoencoder_config(
                {k: view.shape(k) for k in view.keys()}, view.metadata, view.source
            )
            with torch.device("meta"):
                model = AutoEncoder(config)
            tensors = view.stream()
        load_into(model, tensors, source=view.source, device=device, dtype=dtype)
    model.eval()
    model.requires_grad_(False)
    return model


def load_part(part: str, given, transformer_file: Path, *, device=None, dtype=None):
    """One of "t5", "clip", "ae" for `from_single_file` (see the module docstring)."""
    from fluxcore.weights.encoders import load_autoencoder, load_clip, load_t5

    found = _locate(part, given, Path(transformer_file))
    if found is None:
        raise _missing(part, Path(transformer_file))
    path, prefix = found
    if not prefix:  # a component folder, or a file holding just this part: the ordinary loaders
        loader = {"t5": load_t5, "clip": load_clip, "ae": load_autoencoder}[part]
        return loader(path, device=device, dtype=dtype)
    return _load_prefixed(part, path, prefix, device, dtype)


def load_tokenizers(tokenizers=None, **hub):
    """(T5 tokenizer, CLIP tokenizer) from a folder with tokenizer/ and tokenizer_2/, or a Hub id
    (default FLUX.1-schnell's, through the cache; `hub` goes to `resolve_model`)."""
    from fluxcore.weights.encoders import load_clip_tokenizer, load_t5_tokenizer
    from fluxcore.weights.hub import TOKENIZER_PATTERNS, resolve_model

    source = DEFAULT_TOKENIZERS if tokenizers is None else tokenizers
    try:
        root = resolve_model(source, allow_patterns=TOKENIZER_PATTERNS, **hub)
    except WeightsError as e:
        raise WeightsError(
            f"the tokenizers are not in single files: pass tokenizers= a folder holding tokenizer/ and "
            f"tokenizer_2/ (any FLUX.1 snapshot) or a Hub id; resolving {source!r} failed: {e}"
        ) from None
    for sub in ("tokenizer", "tokenizer_2"):
        if not (root / sub).is_dir():
            raise WeightsError(
                f"tokenizers={source}: {root / sub} is missing (expected tokenizer/ and tokenizer_2/)"
            )
    return load_t5_tokenizer(root), load_clip_tokenizer(root)
