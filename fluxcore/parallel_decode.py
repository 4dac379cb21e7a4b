"""The autoencoder's tiled decode split across ranks (docs/parallel.md, "VAE decode").

    image = decode_across_ranks(pipe.ae, z, group)      # == pipe.ae.decode(z) on every rank

With per-tile tiling (`ae.enable_tiling(..., shared_norm=False)`, or a decoder with attention in
its upsampling path), the autoencoder decodes overlapping tiles independently and blends them
(`AutoEncoder._grid`, `AutoEncoder._blend`). Here tile k (row-major over that grid) is decoded by
rank k mod N of the N ranks, the decoded tiles are all-gathered, and every rank blends all of them
with the autoencoder's own blend: the same tiles and the same blend as one process, so the same
image, about 1/N of the decoder's compute per rank.

Everything else decodes whole on every rank (`ae.decode`), unchanged:
- tiling off: GroupNorm normalises over the whole image, so a decoder split into pieces would need
  every GroupNorm's statistics reduced across ranks — a collective per norm layer for a stage that
  is a small part of a FLUX call; a full decode per rank is simpler and exact.
- `shared_norm=True` (the default tiling): every layer runs in blocks that share GroupNorm
  statistics, gathered over all blocks at every norm layer, so blocks are not independent (same
  reason).
- an image no larger than one tile.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch import Tensor

from fluxcore.errors import NonFiniteError, nonfinite_output


def _groups(group) -> list:
    """The process groups to gather over, in order, without the trivial ones."""
    if not dist.is_available() or not dist.is_initialized():
        return []
    if group is None:
        group = dist.group.WORLD
    seq = list(group) if isinstance(group, Sequence) else [group]
    return [g for g in seq if g is not None and dist.get_world_size(g) > 1]


def splits_tiles(ae) -> bool:
    """Whether `ae.decode` decodes independent tiles (what `decode_across_ranks` can split)."""
    if not ae.use_tiling:
        return False
    shared = getattr(ae, "shared_norm", True) and ae._shared_norm_ok()
    return not shared


def decode_across_ranks(ae, z: Tensor, group=None) -> Tensor:
    """`ae.decode(z)` (scaled latents [B, C, h, w] → images [B, 3, H, W]), its tiles shared among
    ranks. Every rank of `group` must call it with the same `z`; all get the same image, equal to
    the one-process tiled decode.

    group: a process group (None: the default group) or a sequence of groups, gathered over in
    turn; a rank's index is then sum(rank_in_group_i · prod(size of groups before i)) — pass
    (ulysses_group, ring_group) for a context-parallel mesh, whose shard index is r·U + u. Without
    per-tile tiling (see `splits_tiles`), with one rank or no process group: `ae.decode(z)`."""
    groups = _groups(group)
    if not groups or not splits_tiles(ae):
        return ae.decode(z)
    ae._check(z, ae.config.z_channels, "latents", 1)
    z = z.to(ae.dtype) / ae.scale_factor + ae.shift_factor
    if ae.use_slicing and z.shape[0] > 1:
        out = torch.cat([_decode_tiles(ae, zi, groups) for zi in z.split(1)])
    else:
        out = _decode_tiles(ae, z, groups)
    if not bool(torch.isfinite(out).all()):
        raise NonFiniteError(nonfinite_output(ae, "decode", z, out))
    return out


def _decode_tiles(ae, z: Tensor, groups: list) -> Tensor:
    """AutoEncoder._tiled(ae.decoder, z, tile, f), each tile decoded on one rank."""
    f = ae.config.downsample_factor
    tile = ae.tile_sample_size // f
    H, W = z.shape[-2:]
    if H <= tile and W <= tile:
        return ae.decoder(z)
    rows, cols = ae._grid(H, tile), ae._grid(W, tile)
    crops = [(t, l) for t in rows for l in cols]  # tile k = i·len(cols) + j
    n = math.prod(dist.get_world_size(g) for g in groups)
    me, stride = 0, 1
    for g in groups:
        me += dist.get_rank(g) * stride
        stride *= dist.get_world_size(g)
    slots = math.ceil(len(crops) / n)

    def decode(k):
        t, l = crops[k]
        return ae.decoder(z[..., t : t + tile, l : l + tile])

    mine = [decode(k) for k in range(me, len(crops), n)]
    if not mine:  # fewer tiles than ranks: this rank only pads (shape and dtype from a real tile)
        mine = [torch.zeros_like(decode(0))]
    mine += [torch.zeros_like(mine[0])] * (slots - len(mine))
    gathered = torch.stack(mine).contiguous()  # [slots, B, 3, th, tw]
    for g in groups:  # → [size_g, ...previous] ; after all: [R, ..., U, slots, ...] = shard-major
        size = dist.get_world_size(g)
        parts = [torch.empty_like(gathered) for _ in range(size)]
        dist.all_gather(parts, gathered, group=g)
        gathered = torch.stack(parts)
    gathered = gathered.reshape(n, slots, *gathered.shape[-4:])
    tiles = [gathered[k % n, k // n] for k in range(len(crops))]
    outs = [tiles[i * len(cols) : (i + 1) * len(cols)] for i in range(len(rows))]
    return ae._blend(outs, rows, cols, tile, H, W, f).to(z.dtype)
