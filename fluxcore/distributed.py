"""Small helpers for programs launched by torchrun: process-group setup from the launcher's
environment, deterministic splitting of work items, atomic file writes and a JSONL manifest that
several ranks fill in without coordination.

    info = init_distributed()          # RANK / WORLD_SIZE / LOCAL_RANK from torchrun; 1 process without
    mine = split_items(items, info.rank, info.world_size)
    atomic_write(path, data)           # temp file beside path + fsync + os.replace
    ...
    destroy_distributed()

Everything also works in a plain single process (world size 1, no process group).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from fluxcore.errors import ConfigError


@dataclass(frozen=True)
class DistInfo:
    """rank, world_size and local_rank of this process, and the device it should compute on."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(backend: str | None = None, device: str | torch.device | None = None) -> DistInfo:
    """Join the process group torchrun describes (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR,
    MASTER_PORT); a single process without those variables gets world size 1 and no group.

    backend: default "cpu:gloo,cuda:nccl" on CUDA (GPU collectives on NCCL, CPU ones on gloo),
    "gloo" without CUDA. device: default cuda:LOCAL_RANK when CUDA is available, else cpu; the
    current CUDA device is set to it. Calling it again returns the same answer.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", str(rank)))
    if device is None:
        device = torch.device("cuda", local) if torch.cuda.is_available() else torch.device("cpu")
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        if backend is None:
            backend = "cpu:gloo,cuda:nccl" if device.type == "cuda" else "gloo"
        kwargs = {"device_id": device} if device.type == "cuda" else {}
        dist.init_process_group(backend=backend, rank=rank, world_size=world, **kwargs)
    if dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
    return DistInfo(rank, world, local, device)


def destroy_distributed(barrier: bool = True) -> None:
    """Leave the process group if there is one (call at the end of a torchrun program). All ranks
    meet first: a rank that tears gloo's connections down while a peer is still finishing its
    last collective makes that peer abort ("terminate called without an active exception").
    barrier=False (a rank leaving on an error, whose peers may never arrive) skips the meeting."""
    if dist.is_initialized():
        if barrier and dist.get_world_size() > 1:
            dist.barrier()
        dist.destroy_process_group()


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def broadcast_object(obj, src: int = 0):
    """`obj` from rank `src` on every rank (e.g. a random seed drawn once); identity on one process."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def split_items(items: Sequence, rank: int, world_size: int) -> list:
    """This rank's share of `items`: items[rank], items[rank + world_size], ... (round robin).

    Deterministic and balanced to within one item; every item goes to exactly one rank."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise ConfigError(f"rank must be in [0, world_size); got rank {rank}, world_size {world_size}")
    return list(items[rank::world_size])


def atomic_write(path: str | Path, data: bytes) -> Path:
    """Write `data` to `path` so that readers see the old file or the whole new one, never a part
    (fluxcore.atomic: temp file beside it, fsync, os.replace, fsync of the folder)."""
    from fluxcore.atomic import atomic_write_bytes

    return atomic_write_bytes(path, data)


def append_line(path: str | Path, record: dict) -> None:
    """Append one JSON line to `path` and fsync it (one writer per file: a rank's part file)."""
    line = json.dumps(record, sort_keys=True) + "\n"
    with open(path, "a", encoding="utf-8") as f:
        f.write(line)
        f.flush()
        os.fsync(f.fileno())


def read_jsonl(path: str | Path) -> list[dict]:
    """The records of a JSONL file; a torn last line (a crash mid-append) is ignored."""
    out = []
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        return out
    for line in text.splitlines():
        if line.strip():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return out


def merge_manifest(out_dir: str | Path, extra: Iterable[dict] = (), key: str = "index") -> Path:
    """Fold every rank's part file (manifest.part-*.jsonl) and `extra` records into
    out_dir/manifest.jsonl (atomically, one line per `key`, sorted by it; later records win), then
    delete the part files. Run on one rank after a barrier."""
    out_dir = Path(out_dir)
    final = out_dir / "manifest.jsonl"
    records = {r[key]: r for r in read_jsonl(final) if key in r}
    parts = sorted(out_dir.glob("manifest.part-*.jsonl"))
    for part in parts:
        records.update((r[key], r) for r in read_jsonl(part) if key in r)
    records.update((r[key], r) for r in extra)
    text = "".join(json.dumps(records[k], sort_keys=True) + "\n" for k in sorted(records))
    atomic_write(final, text.encode("utf-8"))
    for part in parts:
        part.unlink(missing_ok=True)
    return final
