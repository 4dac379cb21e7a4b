"""Many images from a prompt file, on one process or many (torchrun), resumable.

    pipe = FluxPipeline.from_pretrained(path)
    summary = generate_many(pipe, "prompts.jsonl", "out/", width=1024, height=1024)

The prompt file is one prompt per line (blank lines skipped), or JSONL: one object per line with
"prompt" and any of the per-item settings below, which override the call's defaults:

    {"prompt": "a cat on mars", "seed": 7, "steps": 28, "guidance": 3.5, "width": 1024,
     "height": 768, "negative_prompt": "blurry", "true_cfg": 4.0, "sampler": "euler",
     "max_sequence_length": 512, "name": "cat-7"}

Item i (0-based, in file order) is written to out_dir/<name>.png (default name: i as six digits)
with its seed defaulting to `seed + i`, so an item's image does not depend on how many processes
run or which one draws it. Items go to ranks round robin; with context parallelism
(`fluxcore.parallel`) every group of ranks that shares a forward takes one share, and the group's
first rank writes. Each image is written once, atomically (temp file + fsync + rename), with the
settings as PNG text chunks ("parameters" holds all of them as JSON). Each writer appends a line to
its own manifest part; at the end rank 0 folds them into out_dir/manifest.jsonl (one line per item).
A rerun skips every item whose image exists, so a crashed run is resumed by running it again.
"""

from __future__ import annotations

import hashlib
import io
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from fluxcore import distributed as D
from fluxcore.errors import ConfigError

SETTINGS = (
    "prompt", "seed", "steps", "guidance", "width", "height", "negative_prompt", "true_cfg", "sampler",
    "max_sequence_length", "name",
)  # fmt: skip


@dataclass
class Summary:
    """What one rank did: item indices generated and skipped (already on disk), and the manifest
    path (set on rank 0)."""

    generated: list[int] = field(default_factory=list)
    skipped: list[int] = field(default_factory=list)
    manifest: Path | None = None


def read_items(path: str | Path, **defaults) -> list[dict]:
    """The items of a prompt file with every setting filled in (see the module docstring).

    defaults: seed (base; item i gets seed + i), steps, guidance, width, height, negative_prompt,
    true_cfg, sampler, max_sequence_length. Raises ConfigError naming the line for a bad JSON line,
    an unknown key, a missing prompt or two items with one name."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as e:
        raise ConfigError(f"cannot read the prompt file {path}: {e}") from None
    numbered = [(n, line.strip()) for n, line in enumerate(lines, 1) if line.strip()]
    jsonl = path.suffix.lower() in (".jsonl", ".ndjson") or (
        numbered and all(line.startswith("{") for _, line in numbered)
    )
    base = {"seed": 0, "steps": None, "guidance": 3.5, "width": None, "height": None,
            "negative_prompt": None, "true_cfg": 1.0, "sampler": "euler", "max_sequence_length": None}  # fmt: skip
    unknown = set(defaults) - set(base)
    if unknown:
        raise ConfigError(f"unknown generation settings {sorted(unknown)}; known: {sorted(base)}")
    base.update(defaults)
    items, names = [], {}
    for i, (lineno, line) in enumerate(numbered):
        if jsonl:
            try:
                raw = json.loads(line)
            except json.JSONDecodeError as e:
                raise ConfigError(f"{path}:{lineno}: not a JSON object ({e.msg})") from None
            if not isinstance(raw, dict):
                raise ConfigError(f"{path}:{lineno}: expected a JSON object, got {type(raw).__name__}")
            bad = set(raw) - set(SETTINGS)
            if bad:
                raise ConfigError(f"{path}:{lineno}: unknown keys {sorted(bad)}; known: {list(SETTINGS)}")
            if not isinstance(raw.get("prompt"), str):
                raise ConfigError(f"{path}:{lineno}: needs a string 'prompt'; got {raw.get('prompt')!r}")
        else:
            raw = {"prompt": line}
        item = {**base, "seed": base["seed"] + i, "name": f"{i:06d}", **raw, "index": i}
        name = str(item["name"])
        if not name or "/" in name or "\\" in name or name.startswith("."):
            raise ConfigError(f"{path}:{lineno}: name {name!r} must be a plain file stem")
        if name in names:
            raise ConfigError(f"{path}:{lineno}: name {name!r} is used by line {names[name]} too")
        names[name] = lineno
        items.append(item)
    if not items:
        raise ConfigError(f"the prompt file {path} holds no prompts")
    return items


def generate_many(
    pipe,
    prompts_file: str | Path,
    out_dir: str | Path,
    *,
    rank: int | None = None,
    world_size: int | None = None,
    on_item: Callable[[dict], None] | None = None,
    progress: bool = False,
    **defaults,
) -> Summary:
    """Generate every item of `prompts_file` not yet in `out_dir` (module docstring).

    pipe: a FluxPipeline (every rank holds one; with context parallelism its transformer is
    transformed). rank / world_size: default from torch.distributed (one process: 0 / 1).
    on_item(record): called by the writing rank after each image is on disk. defaults: the
    generation settings of `read_items`. Every rank must call this (it ends with a barrier).
    """
    from fluxcore.parallel import context_parallel_size

    rank = D.rank() if rank is None else rank
    world_size = D.world_size() if world_size is None else world_size
    cp = context_parallel_size(pipe.transformer)
    if world_size % cp:
        raise ConfigError(f"{world_size} ranks cannot be split into context-parallel groups of {cp}")
    group, writer = rank // cp, rank % cp == 0
    out_dir = Path(out_dir)
    items = read_items(prompts_file, **defaults)
    if rank == 0:
        out_dir.mkdir(parents=True, exist_ok=True)
    # (temp files of a run killed mid-write are removed by the next atomic write to that path)
    D.barrier()  # every rank decides what to skip from the same directory listing
    summary = Summary()
    todo = []
    for item in D.split_items(items, group, world_size // cp):
        if _path(out_dir, item).exists():
            summary.skipped.append(item["index"])
        else:
            todo.append(item)
    part = out_dir / f"manifest.part-{rank:05d}.jsonl"
    for item in todo:
        result = pipe(
            item["prompt"],
            height=item["height"],
            width=item["width"],
            num_inference_steps=item["steps"],
            guidance_scale=item["guidance"],
            max_sequence_length=item["max_sequence_length"],
            generator=int(item["seed"]),
            sampler=item["sampler"],
            negative_prompt=item["negative_prompt"],
            true_cfg_scale=item["true_cfg"],
            output_type="pil" if writer else "latent",  # the other ranks of a group skip decoding
            progress=progress,
        )
        summary.generated.append(item["index"])
        if not writer:
            continue
        settings = _settings(pipe, item, result.info)
        data = _png_bytes(result.images[0], settings)
        path = D.atomic_write(_path(out_dir, item), data)
        record = {**settings, "file": path.name, "sha256": hashlib.sha256(data).hexdigest()}
        D.append_line(part, record)
        if on_item is not None:
            on_item(record)
    D.barrier()
    if rank == 0:
        summary.manifest = D.merge_manifest(out_dir, _orphans(out_dir, items))
    D.barrier()
    return summary


def _path(out_dir: Path, item: dict) -> Path:
    return out_dir / f"{item['name']}.png"


def _settings(pipe, item: dict, info: dict) -> dict:
    import fluxcore

    return {
        "index": item["index"],
        "name": str(item["name"]),
        "prompt": item["prompt"],
        "seed": int(item["seed"]),
        "steps": info["num_inference_steps"],
        "guidance": item["guidance"],
        "width": info["width"],
        "height": info["height"],
        "sampler": item["sampler"],
        "max_sequence_length": item["max_sequence_length"] or pipe.default_max_sequence_length(),
        "negative_prompt": item["negative_prompt"] or "",
        "true_cfg": item["true_cfg"],
        "variant": str(getattr(pipe.transformer, "variant", "")),
        "dtype": str(pipe.transformer.dtype).removeprefix("torch."),
        "fluxcore_version": fluxcore.__version__,
    }


def _png_bytes(image, settings: dict) -> bytes:
    from PIL.PngImagePlugin import PngInfo

    meta = PngInfo()
    for key, value in settings.items():
        meta.add_text(key, str(value))
    meta.add_text("parameters", json.dumps(settings, sort_keys=True))
    buf = io.BytesIO()
    image.save(buf, format="PNG", pnginfo=meta)
    return buf.getvalue()


def _orphans(out_dir: Path, items: list[dict]) -> list[dict]:
    """Manifest records for images on disk that no manifest line mentions (a crash between the
    image's rename and its manifest line), rebuilt from the PNG's own "parameters" chunk."""
    from PIL import Image

    known = {r.get("index") for r in D.read_jsonl(out_dir / "manifest.jsonl")}
    for part in out_dir.glob("manifest.part-*.jsonl"):
        known |= {r.get("index") for r in D.read_jsonl(part)}
    out = []
    for item in items:
        path = _path(out_dir, item)
        if item["index"] in known or not path.exists():
            continue
        data = path.read_bytes()
        with Image.open(io.BytesIO(data)) as im:
            settings = json.loads(im.text.get("parameters", "{}"))
        out.append(
            {
                **settings,
                "index": item["index"],
                "file": path.name,
                "sha256": hashlib.sha256(data).hexdigest(),
            }
        )
    return out
