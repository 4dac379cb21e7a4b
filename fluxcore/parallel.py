"""Context parallelism: one FLUX forward spread over several devices by sharding the sequence.

    handle = fluxcore.parallel.context_parallel(model, ulysses=2, ring=2)   # 4 processes
    v = model(img, img_ids, txt, txt_ids, t, y, guidance)                    # full output on every rank
    handle.remove()

Every rank runs the whole model on 1/N of the joint sequence, text and image tokens both
(N = ulysses · ring). Everything in FLUX except attention is per token (projections, MLPs, norms,
modulation by the replicated `vec`, and RoPE, which each token gets from its own ids), so only
attention exchanges data:

- Ulysses (degree U): q, k, v of the U shards of a group are packed into one all-to-all that
  scatters heads and gathers the sequence; each rank attends over the group's whole sequence with
  H/U heads (any registered attention backend), and one all-to-all brings the output back.
- Ring (degree R): k and v blocks travel around the ring (R − 1 hops, the next transfer overlapping
  the current block's compute); per-block outputs are merged exactly by their log-sum-exp.
- Both on a 2-D mesh ("ring", "ulysses"): Ulysses inside a group, ring between groups.

Rank s (s = ring_rank · U + ulysses_rank) holds text tokens [s·T, (s+1)·T) and image tokens
[s·I, (s+1)·I), T = ⌈L_txt/N⌉, I = ⌈L_img/N⌉, in the model's local order [txt_s; img_s]. Lengths
that do not divide are padded with zeros; padded keys are removed before every attention, which is
exactly a −inf score, and padded queries are dropped at the end. The final layer runs on each
shard and the image rows are gathered once (an all-gather of [B, I, out_channels]).

How it attaches (docs/transforms.md): two hooks on the model — a forward pre-hook that shards the
inputs and a forward hook that gathers the output — plus the attention backend "context_parallel",
which the pre-hook selects for the duration of the forward and which runs the exchange around the
backend that was in effect before (sdpa, triton, ...). No module is replaced, no forward changes,
state-dict keys stay official, and `handle.remove()` restores the model exactly.

Every rank must call the model with identical inputs (same seed, same prompt), as with any
SPMD program. Forward only: the exchanges are not differentiable (train with fsdp / ddp,
`fluxcore.train_dist`).
"""

from __future__ import annotations

import contextvars
import importlib
import inspect
import math
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import Tensor, nn

from fluxcore.errors import BackendError, ConfigError

BACKEND = "context_parallel"
RING, ULYSSES = "ring", "ulysses"
# the module, not the function of the same name that fluxcore re-exports
_attn = importlib.import_module("fluxcore.attention")


# --- traffic accounting -----------------------------------------------------------------------


@dataclass
class CommStats:
    """Bytes this rank sent, by operation, since the last `reset()`. A byte is counted once per
    destination rank other than this one (the payload that leaves the rank); an all-gather of a
    c-byte chunk over n ranks counts c·(n − 1)."""

    bytes: dict[str, int] = field(default_factory=dict)
    calls: dict[str, int] = field(default_factory=dict)

    def add(self, op: str, nbytes: int) -> None:
        self.bytes[op] = self.bytes.get(op, 0) + int(nbytes)
        self.calls[op] = self.calls.get(op, 0) + 1

    @property
    def total(self) -> int:
        return sum(self.bytes.values())

    def reset(self) -> None:
        self.bytes.clear()
        self.calls.clear()


def expected_bytes_per_forward(
    *,
    batch: int,
    txt_len: int,
    img_len: int,
    hidden_size: int,
    out_channels: int,
    num_layers: int,
    ulysses: int = 1,
    ring: int = 1,
    element_size: int = 4,
) -> dict[str, int]:
    """Bytes one rank sends in one forward, by operation (the formula docs/parallel.md derives).

    num_layers: attention calls per forward (depth + depth_single_blocks). With N = U·R shards of
    S = ⌈L_txt/N⌉ + ⌈L_img/N⌉ tokens, D = hidden_size, e = element_size:
      all_to_all  4·B·S·D·e·(U−1)/U per layer    (packed q, k, v out; attention output back)
      ring        2·B·U·S·(D/U)·e·(R−1) per layer  (k and v of a U-shard block, R−1 hops)
      all_gather  B·⌈L_img/N⌉·C·e·((U−1) + U·(R−1))  once (ulysses stage, then ring stage)
    """
    n = ulysses * ring
    s = math.ceil(txt_len / n) + math.ceil(img_len / n)
    out: dict[str, int] = {}
    if ulysses > 1:
        out["all_to_all"] = num_layers * 4 * batch * s * hidden_size * element_size * (ulysses - 1) // ulysses
    if ring > 1:
        out["ring"] = num_layers * 2 * batch * s * hidden_size * element_size * (ring - 1)
    if n > 1:
        chunk = batch * math.ceil(img_len / n) * out_channels * element_size
        out["all_gather"] = chunk * (ulysses - 1) + chunk * ulysses * (ring - 1)
    return out


# --- the sharding plan of one forward ---------------------------------------------------------


@dataclass(frozen=True)
class _Forward:
    """What the attention backend needs to know about the running forward."""

    handle: ContextParallel
    txt_len: int  # real lengths
    img_len: int
    txt_shard: int  # padded per-shard lengths T, I
    img_shard: int
    inner: str  # the attention backend in effect before this forward ("auto" or a name)

    def valid(self, shard: int, device) -> Tensor:
        """bool [T + I]: which of shard `shard`'s local tokens are real (not padding)."""
        t = torch.arange(self.txt_shard, device=device) + shard * self.txt_shard < self.txt_len
        i = torch.arange(self.img_shard, device=device) + shard * self.img_shard < self.img_len
        return torch.cat((t, i))


_active: contextvars.ContextVar[_Forward | None] = contextvars.ContextVar(
    "fluxcore_context_parallel", default=None
)


# --- the handle --------------------------------------------------------------------------------


class ContextParallel:
    """What `context_parallel` did: the mesh, the degrees, this rank's shard index, byte counters
    (`stats`), and `remove()`."""

    def __init__(self, model: nn.Module, mesh, ulysses: int, ring: int):
        self.model, self.mesh = model, mesh
        self.ulysses, self.ring = ulysses, ring
        self.size = ulysses * ring
        self.ulysses_group = mesh[ULYSSES].get_group() if ulysses > 1 else None
        self.ring_group = mesh[RING].get_group() if ring > 1 else None
        u_rank = mesh[ULYSSES].get_local_rank() if ULYSSES in mesh.mesh_dim_names else 0
        r_rank = mesh[RING].get_local_rank() if RING in mesh.mesh_dim_names else 0
        self.ulysses_rank, self.ring_rank = u_rank, r_rank
        self.shard = r_rank * ulysses + u_rank
        self.stats = CommStats()
        self._signature = inspect.signature(model.forward)
        self._scope: list[tuple[contextvars.Token, object]] = []
        self._hooks = [
            model.register_forward_pre_hook(self._shard_inputs, with_kwargs=True),
            model.register_forward_hook(self._gather_output, always_call=True),
        ]

    def __repr__(self) -> str:
        return f"ContextParallel(ulysses={self.ulysses}, ring={self.ring}, shard={self.shard}/{self.size})"

    def remove(self) -> None:
        """Detach from the model; it runs single-device again."""
        for h in self._hooks:
            h.remove()
        self._hooks = []
        if getattr(self.model, "_fluxcore_context_parallel", None) is self:
            del self.model._fluxcore_context_parallel

    # -- hooks ---------------------------------------------------------------------------------

    def _shard_inputs(self, module, args, kwargs):
        bound = self._signature.bind(*args, **kwargs)
        a = bound.arguments
        img, img_ids, txt, txt_ids = a["img"], a["img_ids"], a["txt"], a["txt_ids"]
        n = self.size
        fwd = _Forward(
            self,
            txt_len=txt.shape[1],
            img_len=img.shape[1],
            txt_shard=math.ceil(txt.shape[1] / n),
            img_shard=math.ceil(img.shape[1] / n),
            inner=_outer_backend(),
        )
        a["txt"], a["txt_ids"] = (_take_shard(x, fwd.txt_shard, self.shard) for x in (txt, txt_ids))
        a["img"], a["img_ids"] = (_take_shard(x, fwd.img_shard, self.shard) for x in (img, img_ids))
        # Enter the scope; the forward hook (always_call) leaves it, even when the forward raises.
        backend_scope = _attn.attention_backend(BACKEND)
        backend_scope.__enter__()
        self._scope.append((_active.set(fwd), backend_scope))
        return (), dict(a)

    def _gather_output(self, module, args, output):
        if not self._scope:  # the pre-hook itself failed
            return output
        token, backend_scope = self._scope.pop()
        fwd = _active.get()
        _active.reset(token)
        backend_scope.__exit__(None, None, None)
        if not isinstance(output, Tensor):  # the forward raised: nothing to gather
            return output
        out = self._all_gather(output.contiguous(), self.ulysses_group, self.ulysses)
        out = self._all_gather(out, self.ring_group, self.ring)
        return out[:, : fwd.img_len]

    # -- collectives (each one counts its bytes) -------------------------------------------------

    def _all_gather(self, x: Tensor, group, size: int) -> Tensor:
        """[B, l, C] on each of the group's ranks → [B, size·l, C] in group-rank order."""
        if size == 1:
            return x
        out = x.new_empty((size * x.shape[0], *x.shape[1:]))  # gloo wants the chunks stacked on dim 0
        _gather_single(out, x, group=group)
        self.stats.add("all_gather", x.numel() * x.element_size() * (size - 1))
        return torch.cat(out.unflatten(0, (size, x.shape[0])).unbind(0), dim=1)

    def _all_to_all(self, x: Tensor) -> Tensor:
        """x [U, ...]: chunk j goes to ulysses rank j; returns [U, ...] with chunk j from rank j."""
        x = x.contiguous()
        out = torch.empty_like(x)  # after contiguous(): empty_like would copy a permuted layout
        dist.all_to_all_single(out, x, group=self.ulysses_group)
        self.stats.add("all_to_all", x[0].numel() * x.element_size() * (self.ulysses - 1))
        return out

    def _ring_start(self, kv: Tensor):
        """Send kv to the next ring rank and receive the previous rank's; returns (buffer, works)."""
        g = self.ring_group
        nxt = dist.get_global_rank(g, (self.ring_rank + 1) % self.ring)
        prv = dist.get_global_rank(g, (self.ring_rank - 1) % self.ring)
        recv = torch.empty_like(kv)
        works = [dist.isend(kv, nxt, group=g), dist.irecv(recv, prv, group=g)]
        self.stats.add("ring", kv.numel() * kv.element_size())
        return recv, works

    # -- attention -------------------------------------------------------------------------------

    def attention(self, q: Tensor, k: Tensor, v: Tensor, fwd: _Forward) -> Tensor:
        """q, k, v [B, H, S, Dh] of this rank's shard → [B, S, H·Dh], attention over all shards."""
        B, H, S, Dh = q.shape
        U = self.ulysses
        if U > 1:
            # [3, B, H, S, Dh] → [U, 3, B, H/U, S, Dh]: chunk j holds the heads of ulysses rank j.
            qkv = torch.stack((q, k, v)).unflatten(2, (U, H // U)).movedim(2, 0)
            qkv = self._all_to_all(qkv)  # chunk j: the S tokens of shard (group start + j), my heads
            q, k, v = qkv.movedim(0, 3).flatten(3, 4).unbind(0)  # [B, H/U, U·S, Dh]
        first = self.ring_rank * U
        if self.ring == 1:
            keep = torch.cat([fwd.valid(first + j, q.device) for j in range(U)])
            out = _attn.resolve_backend(q, fwd.inner).fn(q, k[:, :, keep], v[:, :, keep])
        else:
            out = self._ring_attention(q, k, v, fwd)
        if U > 1:
            # [B, U·S, (H/U)·Dh] → [U, B, S, H/U, Dh]: chunk j goes back to the rank that owns tokens j.
            out = out.unflatten(1, (U, S)).unflatten(-1, (H // U, Dh)).movedim(1, 0)
            out = self._all_to_all(out)  # chunk j: my tokens, the heads of ulysses rank j
            out = out.permute(1, 2, 0, 3, 4).reshape(B, S, H * Dh)
        return out

    def _ring_attention(self, q: Tensor, k: Tensor, v: Tensor, fwd: _Forward) -> Tensor:
        R, U = self.ring, self.ulysses
        kv = torch.stack((k, v))
        out = lse = None
        for step in range(R):
            pending = self._ring_start(kv) if step < R - 1 else None
            src = (self.ring_rank - step) % R  # whose block kv holds now
            keep = torch.cat([fwd.valid(src * U + j, q.device) for j in range(U)])
            if keep.any():
                o, l = _attention_lse(q, kv[0][:, :, keep], kv[1][:, :, keep])
                out, lse = (o, l) if out is None else _merge(out, lse, o, l)
            if pending is not None:
                kv, works = pending
                for w in works:
                    w.wait()
        B, h, L, Dh = out.shape
        return out.to(q.dtype).transpose(1, 2).reshape(B, L, h * Dh)


# torch renamed all_gather_into_tensor to all_gather_single (same arguments)
_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


def _take_shard(x: Tensor, per_shard: int, shard: int) -> Tensor:
    """Rows [shard·per_shard, (shard+1)·per_shard) of x [B, L, ...] along dim 1, zero-padded."""
    part = x[:, shard * per_shard : (shard + 1) * per_shard]
    if part.shape[1] < per_shard:
        pad = part.new_zeros((part.shape[0], per_shard - part.shape[1], *part.shape[2:]))
        part = torch.cat((part, pad), dim=1)
    return part


def _outer_backend() -> str:
    """The backend `attention` would use without this transform ("auto" or a name)."""
    name = _attn.selected_backend()
    return _attn.AUTO if name == BACKEND else name


def _attention_lse(q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
    """Softmax attention returning (out [B, H, Lq, Dh] float32, log-sum-exp [B, H, Lq] float32)."""
    if q.is_cuda and q.dtype in (torch.float16, torch.bfloat16):
        # The flash kernel returns the row log-sum-exp it computed anyway (natural log, fp32).
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention(q, k, v)[:2]
        return out.float(), lse
    scores = torch.einsum("bhqd,bhkd->bhqk", q.float(), k.float()) * q.shape[-1] ** -0.5
    lse = torch.logsumexp(scores, dim=-1)
    out = torch.einsum("bhqk,bhkd->bhqd", torch.exp(scores - lse[..., None]), v.float())
    return out, lse


def _merge(out: Tensor, lse: Tensor, o: Tensor, l: Tensor) -> tuple[Tensor, Tensor]:
    """Combine two partial attentions over disjoint key sets by their log-sum-exps."""
    new = torch.logaddexp(lse, l)
    return out * torch.exp(lse - new)[..., None] + o * torch.exp(l - new)[..., None], new


def _cp_attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    fwd = _active.get()
    return fwd.handle.attention(q, k, v, fwd)


def _cp_why_not(q: Tensor) -> str | None:
    if _active.get() is None:
        return "it runs only inside the forward of a model transformed by fluxcore.parallel.context_parallel"
    return None


_attn.register_backend(BACKEND, _cp_attention, _cp_why_not, priority=-100, auto_ok=lambda q: False)


# --- the transform -----------------------------------------------------------------------------


def context_parallel(model: nn.Module, *, ulysses: int = 1, ring: int = 1, mesh=None) -> ContextParallel:
    """Shard `model`'s sequence over `ulysses · ring` ranks; returns the handle (`.remove()` undoes).

    model: a `Flux` (its own forward; blocks may be swapped for anything that is per token apart
      from `fluxcore.attention`). ulysses: all-to-all degree, must divide the number of heads.
      ring: ring-attention degree. mesh: a DeviceMesh with dims named "ulysses" and/or "ring"
      (extra dims, e.g. data parallel, are allowed and ignored); default: one over all ranks of the
      initialised process group, shape (ring, ulysses). The degrees are read from the mesh when
      it is given. Needs `torch.distributed` initialised (`fluxcore.distributed.init_distributed`).
    """
    from fluxcore.model import Flux

    if not isinstance(model, Flux) or type(model).forward is not Flux.forward:
        raise ConfigError(
            f"context_parallel shards the trunk of fluxcore.Flux.forward; got {type(model).__name__}, "
            "whose forward is not Flux's (swap blocks instead of overriding forward)"
        )
    if getattr(model, "_fluxcore_context_parallel", None) is not None:
        raise ConfigError("context_parallel was already applied to this model; call handle.remove() first")
    if not dist.is_available() or not dist.is_initialized():
        raise BackendError(
            "context_parallel needs torch.distributed initialised (launch with torchrun and call "
            "fluxcore.distributed.init_distributed())"
        )
    if mesh is None:
        for name, d in ((ULYSSES, ulysses), (RING, ring)):
            if isinstance(d, bool) or not isinstance(d, int) or d < 1:
                raise ConfigError(f"{name} degree must be an integer >= 1; got {d!r}")
        world = dist.get_world_size()
        if ulysses * ring != world:
            raise ConfigError(
                f"ulysses × ring = {ulysses} × {ring} = {ulysses * ring} must equal the number of ranks "
                f"({world}); pass a mesh to use a subset"
            )
        from torch.distributed.device_mesh import init_device_mesh

        mesh = init_device_mesh(_mesh_device(), (ring, ulysses), mesh_dim_names=(RING, ULYSSES))
    else:
        names = mesh.mesh_dim_names or ()
        if ULYSSES not in names and RING not in names:
            raise ConfigError(f"the mesh needs a dim named 'ulysses' or 'ring'; its dims are {names}")
        ulysses = mesh[ULYSSES].size() if ULYSSES in names else 1
        ring = mesh[RING].size() if RING in names else 1
    heads = model.config.num_heads
    if heads % ulysses:
        raise ConfigError(f"ulysses degree {ulysses} must divide the number of heads ({heads})")
    handle = ContextParallel(model, mesh, ulysses, ring)
    model._fluxcore_context_parallel = handle
    return handle


def context_parallel_size(model: nn.Module) -> int:
    """How many ranks share one forward of `model` (1 when not transformed)."""
    handle = getattr(model, "_fluxcore_context_parallel", None)
    return handle.size if handle is not None else 1


def _mesh_device() -> str:
    backend = dist.get_backend()
    return "cuda" if "nccl" in str(backend) and torch.cuda.is_available() else "cpu"
