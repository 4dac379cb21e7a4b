"""Hugging Face Hub ids → local snapshot folders, through huggingface_hub's own cache.

    folder = resolve_model("black-forest-labs/FLUX.1-dev")      # downloads what FLUX needs, once
    folder = resolve_model("/models/FLUX.1-dev")                # a local folder is returned as is

A name that is an existing path is local. Otherwise an `owner/name` id is fetched with
`huggingface_hub.snapshot_download` into its cache (HF_HUB_CACHE / HF_HOME, or `cache_dir=`), with
the hub's own progress bars, and only the files a FLUX pipeline reads (`allow_patterns`): the
diffusers component folders, never the duplicate BFL single files at the repository root.
HF_HUB_OFFLINE=1 or `local_files_only=True` resolves from the cache alone. Any failure — offline
and not cached, unknown repository or revision, a gated repository without a token — is a
`CheckpointNotFoundError` saying what to do.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from fluxcore.weights.errors import CheckpointNotFoundError

# The folders of a diffusers FLUX snapshot, and what is read from each.
_COMPONENT_FILES = {
    "transformer": ("config.json", "{weights}"),
    "vae": ("config.json", "{weights}"),
    "text_encoder": ("config.json", "{weights}"),
    "text_encoder_2": ("config.json", "{weights}"),
    "tokenizer": ("*.json", "*.txt"),
    "tokenizer_2": ("*.json", "*.model"),
    "scheduler": ("*.json",),
}
TOKENIZER_PATTERNS = ["tokenizer/*.json", "tokenizer/*.txt", "tokenizer_2/*.json", "tokenizer_2/*.model"]
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def is_hub_id(name) -> bool:
    """Whether `name` reads as a Hub repository id (`owner/name`) rather than a path that exists."""
    text = str(name)
    return not Path(text).exists() and bool(_HUB_ID.match(text)) and ".." not in text


def flux_patterns(*, variant: str | None = None, subfolder: str | None = None) -> list[str]:
    """The `allow_patterns` of a FLUX pipeline snapshot: model_index.json and the component folders'
    configs, weights (safetensors only; `variant` picks `*.{variant}.safetensors` files and their
    index) and tokenizer files. `subfolder`: the pipeline sits in that folder of the repository."""
    if variant:
        weights = [
            f"*.{variant}.safetensors",
            f"*.{variant}-*-of-*.safetensors",
            f"*.safetensors.index.{variant}.json",
        ]
    else:
        weights = ["*.safetensors", "*.safetensors.index.json"]
    pre = f"{subfolder.strip('/')}/" if subfolder else ""
    out = [f"{pre}model_index.json"]
    for folder, files in _COMPONENT_FILES.items():
        for f in files:
            out.extend(f"{pre}{folder}/{w}" for w in (weights if f == "{weights}" else [f]))
    return out


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in ("1", "ON", "YES", "TRUE")


def _cache_dir(cache_dir) -> str | None:
    # read at call time (huggingface_hub reads its environment once, at import)
    if cache_dir is not None:
        return str(cache_dir)
    if os.environ.get("HF_HUB_CACHE"):
        return os.environ["HF_HUB_CACHE"]
    if os.environ.get("HF_HOME"):
        return str(Path(os.environ["HF_HOME"]) / "hub")
    return None


def download(
    repo_id: str,
    *,
    allow_patterns: list[str] | None = None,
    revision: str | None = None,
    token: str | bool | None = None,
    cache_dir=None,
    local_files_only: bool = False,
    force_download: bool = False,
) -> Path:
    """snapshot_download of `repo_id` (model repository) → the local snapshot folder; errors become
    CheckpointNotFoundError with the remedy."""
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import (
            GatedRepoError,
            LocalEntryNotFoundError,
            RepositoryNotFoundError,
            RevisionNotFoundError,
        )
    except ImportError as e:  # pragma: no cover - a runtime dependency
        raise CheckpointNotFoundError(
            f"{repo_id!r} is not a local folder, and resolving Hub ids needs huggingface_hub ({e})"
        ) from None
    offline = local_files_only or _offline()
    where = _cache_dir(cache_dir) or "the Hugging Face cache"
    try:
        path = snapshot_download(
            repo_id,
            revision=revision,
            cache_dir=_cache_dir(cache_dir),
            token=token,
            local_files_only=offline,
            allow_patterns=allow_patterns,
            force_download=force_download,
        )
    except GatedRepoError:
        raise CheckpointNotFoundError(
            f"{repo_id} is a gated repository: accept its license on https://huggingface.co/{repo_id} and "
            "pass token= (or log in with `hf auth login`)"
        ) from None
    except RepositoryNotFoundError:
        raise CheckpointNotFoundError(
            f"{repo_id}: no such repository on the Hugging Face Hub (or it is private: pass token=); "
            "a local folder of that name does not exist either"
        ) from None
    except RevisionNotFoundError:
        raise CheckpointNotFoundError(f"{repo_id}: no revision {revision!r} on the Hub") from None
    except LocalEntryNotFoundError:
        why = (
            "HF_HUB_OFFLINE is set"
            if _offline()
            else "local_files_only=True"
            if local_files_only
            else "no network"
        )
        raise CheckpointNotFoundError(
            f"{repo_id} (revision {revision or 'main'}) is not in {where} and cannot be downloaded ({why}); "
            f"download it once with network access (`hf download {repo_id}`), or pass a local folder"
        ) from None
    except (OSError, ValueError) as e:  # network errors, bad cache folders, HTTP errors
        raise CheckpointNotFoundError(f"cannot fetch {repo_id} from the Hugging Face Hub: {e}") from None
    return Path(path)


def resolve_model(
    name_or_path,
    *,
    revision: str | None = None,
    token: str | bool | None = None,
    cache_dir=None,
    local_files_only: bool = False,
    force_download: bool = False,
    variant: str | None = None,
    subfolder: str | None = None,
    allow_patterns: list[str] | None = None,
) -> Path:
    """The local folder of a FLUX pipeline: `name_or_path` itself (plus `subfolder`) when it exists,
    else the Hub snapshot of that id with only what FLUX reads (`flux_patterns`, or `allow_patterns`).
    A folder that does not exist and is not an `owner/name` id is a CheckpointNotFoundError."""
    path = Path(name_or_path)
    if not path.exists():
        if not is_hub_id(name_or_path):
            raise CheckpointNotFoundError(
                f"{name_or_path}: no such folder, and not a Hugging Face Hub id (owner/name)"
            )
        patterns = allow_patterns or flux_patterns(variant=variant, subfolder=subfolder)
        path = download(
            str(name_or_path),
            allow_patterns=patterns,
            revision=revision,
            token=token,
            cache_dir=cache_dir,
            local_files_only=local_files_only,
            force_download=force_download,
        )
    if subfolder:
        path = path / subfolder
        if not path.is_dir():
            raise CheckpointNotFoundError(f"{name_or_path}: no subfolder {subfolder!r} ({path})")
    return path


def variant_file(folder: Path, variant: str) -> Path:
    """The weights of one component folder in `variant` (diffusers' naming: `<name>.<variant>.safetensors`,
    or the index `<name>.safetensors.index.<variant>.json`)."""
    files = sorted(folder.glob(f"*.{variant}.safetensors"))
    if len(files) == 1:
        return files[0]
    if list(folder.glob(f"*.safetensors.index.{variant}.json")):
        raise CheckpointNotFoundError(
            f"{folder}: sharded {variant!r} variants are not read by fluxcore; pass variant=None or a merged file"
        )
    raise CheckpointNotFoundError(
        f"{folder} has no {variant!r} variant (expected one *.{variant}.safetensors; found "
        f"{sorted(p.name for p in folder.glob('*.safetensors'))})"
    )


def check_snapshot(root: Path, name: str) -> None:
    """Every component folder a cached snapshot's model_index.json lists must hold its files; the
    first missing one is named (an interrupted download, or a cache filled by hand)."""
    import json

    try:
        index = json.loads((root / "model_index.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        index = {}
    for folder, files in _COMPONENT_FILES.items():
        if folder not in index or index.get(folder) in (None, [None, None]):
            continue
        sub = root / folder
        needed = ["config.json"] if "config.json" in files else []
        for f in needed:
            if not (sub / f).is_file():
                raise CheckpointNotFoundError(_incomplete(name, sub / f))
        if "{weights}" in files and not (
            list(sub.glob("*.safetensors")) or list(sub.glob("*.safetensors.index*.json"))
        ):
            raise CheckpointNotFoundError(_incomplete(name, sub / "*.safetensors"))
        if folder.startswith("tokenizer") and not any(sub.glob("*")):
            raise CheckpointNotFoundError(_incomplete(name, sub / "tokenizer.json"))


def _incomplete(name: str, missing: Path) -> str:
    return (
        f"the cached snapshot of {name} is incomplete: {missing} is missing; fetch it with network access "
        f"(unset HF_HUB_OFFLINE, or `hf download {name}`)"
    )
