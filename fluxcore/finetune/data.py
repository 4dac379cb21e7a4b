"""Training data for LoRA fine-tuning: a folder of images with same-named .txt captions (the kohya /
ai-toolkit convention), aspect-ratio buckets, and a disk cache of latents and text embeddings.

    data/
      cat_01.png   cat_01.txt      "a photo of [trigger] on a sofa"  ([trigger] → the trigger word,
      cat_02.jpg   cat_02.txt       else the trigger word is put first: "sks, a photo of ...")

Buckets: sizes (w, h), multiples of `step`, with w·h ≤ resolution² and aspect ratio up to
`max_ratio`; each image goes to the bucket nearest its aspect ratio, is scaled to cover it and
centre-cropped. A batch holds images of one bucket. The batch order of an epoch is a pure function
of (seed, epoch), so a run resumed at (epoch, index) sees exactly the batches it would have seen.

Cache files are safetensors written atomically (`fluxcore.weights.writer`), named by a hash of what
they depend on (image bytes + bucket + autoencoder, caption + text encoders), so an edited image or
caption is re-encoded and a crash never leaves a half-written file behind.
"""

from __future__ import annotations

import hashlib
import math
import random
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from fluxcore.errors import FluxcoreError

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


class DatasetError(FluxcoreError, ValueError):
    """A training folder that cannot be used as it is."""


class MissingCaptionError(DatasetError):
    """An image has no caption file beside it."""


class UnreadableImageError(DatasetError):
    """An image file cannot be decoded."""


class ImageTooSmallError(DatasetError):
    """An image is smaller than the training resolution allows."""


@dataclass(frozen=True)
class Item:
    path: Path
    caption: str
    size: tuple[int, int]  # (w, h) of the file
    bucket: tuple[int, int]  # (w, h) it is trained at


def make_buckets(resolution: int, step: int = 64, max_ratio: float = 2.0) -> list[tuple[int, int]]:
    """(w, h) sizes, multiples of `step`, area ≤ resolution², aspect ratio in [1/max_ratio, max_ratio]."""
    out = set()
    w = step
    while w <= resolution * max_ratio:
        h = (resolution * resolution // w) // step * step
        h = min(h, resolution * max_ratio // step * step)
        if h >= step and 1 / max_ratio <= w / h <= max_ratio:
            out.add((w, h))
            out.add((h, w))
        w += step
    return sorted(out)


def nearest_bucket(size: tuple[int, int], buckets: list[tuple[int, int]]) -> tuple[int, int]:
    w, h = size
    return min(buckets, key=lambda b: (abs(math.log(b[0] / b[1]) - math.log(w / h)), -b[0] * b[1]))


def read_caption(image: Path, caption_ext: str, trigger_word: str | None) -> str:
    cap = image.with_suffix(caption_ext)
    if not cap.is_file():
        raise MissingCaptionError(
            f"{image}: no caption file {cap.name} beside it (every image needs a same-named {caption_ext})"
        )
    text = " ".join(cap.read_text(encoding="utf-8").split())
    if trigger_word:
        text = text.replace("[trigger]", trigger_word) if "[trigger]" in text else f"{trigger_word}, {text}"
    return text


def _open(path: Path):
    from PIL import Image, UnidentifiedImageError

    try:
        im = Image.open(path)
        im.load()
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise UnreadableImageError(f"{path}: cannot read the image ({type(e).__name__}: {e})") from None
    return im


def scan_folder(
    folder,
    *,
    resolution: int,
    bucket_step: int = 64,
    bucketing: bool = True,
    max_ratio: float = 2.0,
    caption_ext: str = ".txt",
    trigger_word: str | None = None,
    min_size: int | None = None,
) -> list[Item]:
    """Every image of `folder` (sorted by name) with its caption and bucket. Errors name the file:
    MissingCaptionError, UnreadableImageError, ImageTooSmallError (shorter side < min_size,
    default resolution / 2), DatasetError (no images)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DatasetError(f"training data folder {folder} does not exist or is not a folder")
    images = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTS and p.is_file())
    if not images:
        raise DatasetError(f"{folder}: no images ({', '.join(IMAGE_EXTS)}) found")
    buckets = make_buckets(resolution, bucket_step, max_ratio) if bucketing else [(resolution, resolution)]
    min_size = resolution // 2 if min_size is None else min_size
    items = []
    for path in images:
        caption = read_caption(path, caption_ext, trigger_word)
        with _open(path) as im:
            size = im.size
        if min(size) < min_size:
            raise ImageTooSmallError(
                f"{path}: {size[0]}x{size[1]} pixels; the shorter side must be at least {min_size} "
                f"for resolution {resolution} (set min_image_size to allow smaller images)"
            )
        items.append(Item(path, caption, size, nearest_bucket(size, buckets)))
    return items


def load_image(path: Path, bucket: tuple[int, int]) -> Tensor:
    """The image scaled to cover `bucket` (w, h) and centre-cropped: float32 [3, h, w] in [-1, 1]."""
    from PIL import Image

    w, h = bucket
    with _open(path) as im:
        im = im.convert("RGB")
        s = max(w / im.width, h / im.height)
        nw, nh = max(w, round(im.width * s)), max(h, round(im.height * s))
        if (nw, nh) != im.size:
            im = im.resize((nw, nh), Image.BICUBIC)
        left, top = (nw - w) // 2, (nh - h) // 2
        im = im.crop((left, top, left + w, top + h))
        x = torch.frombuffer(bytearray(im.tobytes()), dtype=torch.uint8).reshape(h, w, 3)
    return x.permute(2, 0, 1).float() / 127.5 - 1.0


def epoch_batches(items: list[Item], batch_size: int, repeats: int, seed: int, epoch: int) -> list[list[int]]:
    """The batches (lists of item indices, one bucket each) of one epoch: each item `repeats`
    times, shuffled within its bucket, cut into batches (a short last batch per bucket is kept),
    batches shuffled. A pure function of (seed, epoch)."""
    rng = random.Random(f"{seed}/{epoch}")
    by_bucket: dict[tuple[int, int], list[int]] = {}
    for i, it in enumerate(items):
        by_bucket.setdefault(it.bucket, []).extend([i] * repeats)
    batches = []
    for bucket in sorted(by_bucket):
        idx = by_bucket[bucket]
        rng.shuffle(idx)
        batches += [idx[k : k + batch_size] for k in range(0, len(idx), batch_size)]
    rng.shuffle(batches)
    return batches


# --- the cache -----------------------------------------------------------------------------------


def _digest(*parts) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(p if isinstance(p, bytes) else str(p).encode())
        h.update(b"\0")
    return h.hexdigest()[:16]


class Cache:
    """Latents and text embeddings on disk, one safetensors file per image / caption.

    folder/latents/<image stem>-<hash>.safetensors  {"latents": [16, h/8, w/8]}
    folder/text/<hash>.safetensors                  {"txt": [L, ctx], "y": [vec]}
    `model_id` names the models that made them (part of every hash)."""

    def __init__(self, folder, model_id: str):
        self.folder, self.model_id = Path(folder), model_id

    def latent_path(self, item: Item) -> Path:
        key = _digest(item.path.read_bytes(), item.bucket, self.model_id)
        return self.folder / "latents" / f"{item.path.stem}-{key}.safetensors"

    def text_path(self, caption: str) -> Path:
        return self.folder / "text" / f"{_digest(caption, self.model_id)}.safetensors"

    @staticmethod
    def read(path: Path) -> dict[str, Tensor]:
        from fluxcore.weights.io import open_checkpoint

        with open_checkpoint(path) as ck:
            return {k: ck.read(k).clone() for k in ck.keys()}

    @staticmethod
    def write(path: Path, tensors: dict[str, Tensor]) -> None:
        from fluxcore.weights.writer import write_safetensors

        path.parent.mkdir(parents=True, exist_ok=True)
        write_safetensors(path, {k: v.detach().cpu().contiguous() for k, v in tensors.items()})

    def fill(self, items: list[Item], encode_image, encode_text, *, text: bool = True) -> dict[str, int]:
        """Encode what is not cached yet: encode_image([3, h, w] in [-1, 1]) → [16, h/8, w/8];
        encode_text(caption) → (txt [L, ctx], y [vec]). Returns counts of files written."""
        wrote = {"latents": 0, "text": 0}
        for it in items:
            p = self.latent_path(it)
            if not p.is_file():
                self.write(p, {"latents": encode_image(load_image(it.path, it.bucket))})
                wrote["latents"] += 1
            if text:
                q = self.text_path(it.caption)
                if not q.is_file():
                    txt, y = encode_text(it.caption)
                    self.write(q, {"txt": txt, "y": y})
                    wrote["text"] += 1
        return wrote
