"""Step caching: skip or forecast the transformer trunk on steps where it would change little.

    handle = fluxcore.cache.apply(model, "first_block", threshold=0.08)
    ... sample as usual ...
    handle.stats            CacheStats(full=17, skipped=11)
    handle.reset()          forget cached tensors and counts (a new generation resets by itself)
    handle.remove()         the model is exactly what it was

Kinds (docs/speed.md has the measured trade-offs):

    "first_block"  run double block 0; if its image residual changed by less than `threshold`
                   (relative L1, against the last fully computed step) reuse the cached residuals
                   of all later blocks for the image and the text stream.
    "teacache"     TeaCache: rescale the relative L1 change of block 0's modulated image input by
                   the polynomial published for FLUX, accumulate it over steps, and reuse the
                   cached trunk residual while the sum stays below `threshold`.
    "taylorseer"   TaylorSeer-style forecasting: evaluate the trunk fully every `interval` steps and
                   extrapolate its residual to the steps between with a first-order Taylor
                   expansion in flow time t.

How it is wired (docs/transforms.md: a transform replaces modules, never a forward). `apply`
replaces `model.double_blocks` and `model.single_blocks` by ModuleList subclasses holding the very
same blocks, so state-dict keys, parameters and indexing are unchanged. While the model runs (a
forward pre-hook marks the call), iterating `double_blocks` yields one trunk step that runs the
blocks (or skips them) and iterating `single_blocks` yields nothing; outside a forward both iterate
their blocks as before. The trunk step reads the blocks from the lists at every call, so a block
swapped in (or compiled by `fluxcore.compile_blocks`) after `apply` is the one that runs. The skip
decision is plain Python between block calls: it is never inside a compiled region.

A computed step runs exactly the uncached operations, so a cache that never skips (threshold 0)
gives bit-identical outputs. State is kept per conditioning tensor (the `txt` argument), so the two
passes of true classifier-free guidance keep separate caches; a call whose flow time is larger than
the previous one's for the same conditioning starts a new trajectory.
"""

from __future__ import annotations

import weakref
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from fluxcore.errors import ConfigError, FluxcoreError

KINDS = ("first_block", "teacache", "taylorseer")

# TeaCache's rescale polynomial for FLUX.1 (TeaCache4FLUX), highest degree first: maps the relative
# L1 change of block 0's modulated input to an estimate of the relative change of the model output.
TEACACHE_FLUX_COEFFICIENTS = (4.98651651e02, -2.83781631e02, 5.58554382e01, -3.82021401e00, 2.64230861e-01)

_MAX_SLOTS = 8  # conditionings tracked at once (CFG needs 2); the least recently used is dropped


@dataclass
class CacheStats:
    """Trunk evaluations since `apply` or the last `reset`: computed in full, and skipped
    (reused or forecast)."""

    full: int = 0
    skipped: int = 0

    @property
    def calls(self) -> int:
        return self.full + self.skipped

    @property
    def saved(self) -> float:
        """Fraction of trunk evaluations skipped."""
        return self.skipped / self.calls if self.calls else 0.0


def rel_l1(new: Tensor, old: Tensor) -> float:
    """mean|new − old| / mean|old| in float32 (a host sync: the decision is made on the CPU)."""
    old = old.float()
    return float((new.float() - old).abs().mean() / old.abs().mean().clamp_min(1e-12))


@dataclass
class _Slot:
    """Cache state of one trajectory (one conditioning)."""

    shapes: tuple = ()  # (txt shape, img shape)
    txt: Callable[[], Tensor | None] = lambda: None  # weak reference to the caller's last txt
    last_t: float | None = None
    step: int = 0  # evaluations in this trajectory
    signal: Tensor | None = None  # first_block: block-0 residual; teacache: modulated input
    accumulated: float = 0.0
    img_res: Tensor | None = None  # trunk output − trunk input (after block 0 for first_block)
    txt_res: Tensor | None = None
    history: list = field(default_factory=list)  # taylorseer: [(t, img_res, txt_res)] of full steps


# --- the policies: each decides and computes one trunk evaluation -------------------------------


class _Policy:
    kind = ""

    def __call__(self, trunk: _Trunk, slot: _Slot, img, txt, vec, pe, t) -> tuple[Tensor, Tensor, bool]:
        raise NotImplementedError


class FirstBlockCache(_Policy):
    kind = "first_block"

    def __init__(self, threshold: float = 0.08, num_steps: int | None = None):
        if threshold < 0:
            raise ConfigError(f"first_block cache: threshold must be >= 0, got {threshold}")
        self.threshold = float(threshold)
        self.num_steps = num_steps  # if given, the last step is always computed

    def __call__(self, trunk, slot, img, txt, vec, pe, t):
        first = trunk.doubles()[0]
        img1, txt1 = first(img=img, txt=txt, vec=vec, pe=pe)
        residual = img1 - img
        if (
            self.threshold > 0
            and not (self.num_steps is not None and slot.step == self.num_steps - 1)
            and slot.signal is not None
            and slot.signal.shape == residual.shape
            and slot.txt_res is not None
            and slot.txt_res.shape == txt1.shape
            and rel_l1(residual, slot.signal) < self.threshold
        ):
            return img1 + slot.img_res, txt1 + slot.txt_res, False
        img_out, txt_out = trunk.run(img1, txt1, vec, pe, start=1)
        # The reference signal moves only on computed steps, so slow drift still adds up to a refresh.
        slot.signal = residual.detach()
        slot.img_res, slot.txt_res = (img_out - img1).detach(), (txt_out - txt1).detach()
        return img_out, txt_out, True


class TeaCache(_Policy):
    kind = "teacache"

    def __init__(
        self,
        threshold: float = 0.4,
        coefficients: tuple[float, ...] = TEACACHE_FLUX_COEFFICIENTS,
        num_steps: int | None = None,
    ):
        if threshold < 0:
            raise ConfigError(f"teacache: threshold must be >= 0, got {threshold}")
        self.threshold = float(threshold)
        self.coefficients = tuple(float(c) for c in coefficients)
        self.num_steps = num_steps  # if given, the last step is always computed (as TeaCache does)

    def rescale(self, x: float) -> float:
        y = 0.0
        for c in self.coefficients:  # Horner, highest degree first
            y = y * x + c
        return y

    def __call__(self, trunk, slot, img, txt, vec, pe, t):
        first = trunk.doubles()[0]
        if not (hasattr(first, "img_mod") and hasattr(first, "img_norm1")):
            raise FluxcoreError(
                f"teacache reads double_blocks[0].img_mod and .img_norm1; {type(first).__name__} has no such modules"
            )
        (shift, scale, _), _ = first.img_mod(vec)
        signal = first.img_norm1(img, shift, scale)
        last = self.num_steps is not None and slot.step == self.num_steps - 1
        compute = True
        if self.threshold > 0 and slot.signal is not None and slot.signal.shape == signal.shape and not last:
            slot.accumulated += self.rescale(rel_l1(signal, slot.signal))
            compute = (
                slot.accumulated >= self.threshold or slot.txt_res is None or slot.txt_res.shape != txt.shape
            )
        slot.signal = signal.detach()  # updated on every step, computed or not
        if not compute:
            return img + slot.img_res, txt + slot.txt_res, False
        slot.accumulated = 0.0
        img_out, txt_out = trunk.run(img, txt, vec, pe, start=0)
        slot.img_res, slot.txt_res = (img_out - img).detach(), (txt_out - txt).detach()
        return img_out, txt_out, True


class TaylorSeer(_Policy):
    kind = "taylorseer"

    def __init__(self, interval: int = 3, order: int = 1, warmup: int = 2, num_steps: int | None = None):
        if interval < 1:
            raise ConfigError(f"taylorseer: interval must be >= 1, got {interval}")
        if order not in (0, 1):
            raise ConfigError(f"taylorseer: order must be 0 (reuse) or 1 (linear forecast), got {order}")
        if warmup < order + 1:
            raise ConfigError(f"taylorseer: warmup must be >= order + 1 = {order + 1}, got {warmup}")
        self.interval, self.order, self.warmup, self.num_steps = (
            int(interval),
            int(order),
            int(warmup),
            num_steps,
        )

    def __call__(self, trunk, slot, img, txt, vec, pe, t):
        k = slot.step
        hist = slot.history
        compute = (
            k < self.warmup
            or (k - self.warmup) % self.interval == 0
            or (self.num_steps is not None and k == self.num_steps - 1)
            or len(hist) <= self.order
            or hist[-1][1].shape != img.shape
            or hist[-1][2].shape != txt.shape
        )
        if compute:
            img_out, txt_out = trunk.run(img, txt, vec, pe, start=0)
            hist.append((t, (img_out - img).detach(), (txt_out - txt).detach()))
            del hist[: -(self.order + 1)]
            return img_out, txt_out, True
        t1, img1, txt1 = hist[-1]
        if self.order == 0:
            return img + img1, txt + txt1, False
        t0, img0, txt0 = hist[-2]
        # First-order Taylor expansion in flow time (the schedule is not uniform in steps).
        w = (t - t1) / (t1 - t0) if t1 != t0 else 0.0
        return img + img1 + w * (img1 - img0), txt + txt1 + w * (txt1 - txt0), False


POLICIES: dict[str, type[_Policy]] = {p.kind: p for p in (FirstBlockCache, TeaCache, TaylorSeer)}


# --- the modules and the handle ------------------------------------------------------------------


class _Trunk:
    """The trunk step `double_blocks` yields while the model runs: (img, txt) → (img, txt) over
    all blocks, through the policy."""

    def __init__(self, model: nn.Module, policy: _Policy, stats: CacheStats):
        self._model = weakref.ref(model)
        self.policy, self.stats = policy, stats
        self.running = False
        self.t: float | None = None
        self._raw_txt: Tensor | None = None  # the caller's txt argument: it keys the slot
        self.slots: OrderedDict[int, _Slot] = OrderedDict()  # least recently used first
        self._next_key = 0

    def doubles(self) -> list[nn.Module]:
        return list(self._model().double_blocks._modules.values())

    def run(self, img: Tensor, txt: Tensor, vec: Tensor, pe: Tensor, start: int) -> tuple[Tensor, Tensor]:
        """The uncached trunk from double block `start`: exactly Flux.forward's operations."""
        model = self._model()
        for block in self.doubles()[start:]:
            img, txt = block(img=img, txt=txt, vec=vec, pe=pe)
        x = torch.cat((txt, img), dim=1)
        for block in model.single_blocks._modules.values():
            x = block(x, vec=vec, pe=pe)
        n = txt.shape[1]
        return x[:, n:], x[:, :n]

    def slot(self, txt: Tensor, img: Tensor, t: float) -> _Slot:
        """The trajectory this call continues. A trajectory continues only at a smaller t, with
        the same shapes. The caller's txt tensor object is the first clue (a sampler passes the same
        one every step); a new txt tensor of the same shapes continues the least recently used
        trajectory that can go on, so a caller who rebuilds its inputs every step, or alternates
        cond/uncond calls, still gets its cache."""
        shapes = (tuple(txt.shape), tuple(img.shape))

        def continues(s: _Slot, same_t: bool) -> bool:
            return s.shapes == shapes and s.last_t is not None and (t < s.last_t or same_t and t == s.last_t)

        # The same txt may repeat a t (a second-order sampler); a new txt at a repeated t is
        # another conditioning (the uncond half of CFG), so it starts its own trajectory.
        # Newest first for the same txt: a finished generation's last t may equal this one's.
        found = next(
            (k for k, s in reversed(self.slots.items()) if s.txt() is txt and continues(s, True)), None
        )
        if found is None:
            found = next((k for k, s in self.slots.items() if continues(s, False)), None)
        slot = self.slots.pop(found) if found is not None else _Slot(shapes=shapes)
        slot.txt = weakref.ref(txt)
        self._next_key += 1
        self.slots[self._next_key] = slot  # most recently used last
        while len(self.slots) > _MAX_SLOTS:
            self.slots.popitem(last=False)
        return slot

    def __call__(self, img: Tensor, txt: Tensor, vec: Tensor, pe: Tensor) -> tuple[Tensor, Tensor]:
        t = self.t if self.t is not None else 0.0
        slot = self.slot(self._raw_txt, img, t)
        img, txt, computed = self.policy(self, slot, img, txt, vec, pe, t)
        slot.last_t = t
        slot.step += 1
        if computed:
            self.stats.full += 1
        else:
            self.stats.skipped += 1
        return img, txt


class CachedDoubleBlocks(nn.ModuleList):
    """`double_blocks` under a step cache: the same blocks at the same keys. Iterating it inside
    the model's forward yields the cached trunk step; anywhere else, the blocks."""

    _trunk: _Trunk | None = None

    def __iter__(self):
        if self._trunk is not None and self._trunk.running:
            return iter((self._trunk,))
        return super().__iter__()


class CachedSingleBlocks(nn.ModuleList):
    """`single_blocks` under a step cache: the same blocks at the same keys. Iterating it inside
    the model's forward yields nothing (the trunk step ran them); anywhere else, the blocks."""

    _trunk: _Trunk | None = None

    def __iter__(self):
        if self._trunk is not None and self._trunk.running:
            return iter(())
        return super().__iter__()


class CacheHandle:
    """What `apply` returns: `stats`, `reset()`, `remove()`, and the `kind` and `policy` in use."""

    def __init__(self, model: nn.Module, trunk: _Trunk, hooks: list):
        self._model = weakref.ref(model)
        self._trunk, self._hooks = trunk, hooks
        self.kind = trunk.policy.kind
        self.policy = trunk.policy

    @property
    def stats(self) -> CacheStats:
        return self._trunk.stats

    @property
    def active(self) -> bool:
        return bool(self._hooks)

    def reset(self) -> None:
        """Forget every cached tensor and zero the counts."""
        self._trunk.slots.clear()
        self._trunk.stats.full = self._trunk.stats.skipped = 0

    def remove(self) -> list[str]:
        """Put plain ModuleLists holding the current blocks back; returns the paths restored
        (empty if already removed)."""
        model = self._model()
        if not self._hooks or model is None:
            return []
        for h in self._hooks:
            h.remove()
        self._hooks = []
        self._trunk.slots.clear()
        for name in ("double_blocks", "single_blocks"):
            setattr(model, name, nn.ModuleList(getattr(model, name)._modules.values()))
        return ["double_blocks", "single_blocks"]

    def __repr__(self) -> str:
        return f"CacheHandle(kind={self.kind!r}, stats={self.stats}, active={self.active})"


def _timesteps(args: tuple, kwargs: dict) -> Tensor | None:
    if "timesteps" in kwargs:
        return kwargs["timesteps"]
    return args[4] if len(args) > 4 else None


def _txt_arg(args: tuple, kwargs: dict) -> Tensor:
    return kwargs["txt"] if "txt" in kwargs else args[2]


def apply(model: nn.Module, kind: str, **options) -> CacheHandle:
    """Put a step cache of `kind` ("first_block", "teacache" or "taylorseer") on a Flux model,
    in place. Options per kind:

        first_block: threshold=0.08, num_steps=None
        teacache:    threshold=0.4, coefficients=TEACACHE_FLUX_COEFFICIENTS, num_steps=None
        taylorseer:  interval=3, order=1, warmup=2, num_steps=None

    num_steps (optional): the trajectory length, so the last step is always computed.
    Returns a CacheHandle; `handle.remove()` undoes it. Raises FluxcoreError if the model already
    has a cache or its block lists were replaced by something other than plain ModuleLists.
    """
    if kind not in POLICIES:
        raise ConfigError(f"unknown cache kind {kind!r}; known: {', '.join(KINDS)}")
    try:
        policy = POLICIES[kind](**options)
    except TypeError as e:
        raise ConfigError(f"cache {kind!r}: {e}") from None
    for name in ("double_blocks", "single_blocks"):
        lst = getattr(model, name, None)
        if isinstance(lst, (CachedDoubleBlocks, CachedSingleBlocks)):
            raise FluxcoreError(f"the model already has a step cache on {name}; remove its handle first")
        if type(lst) is not nn.ModuleList:
            raise FluxcoreError(
                f"a step cache needs model.{name} to be a plain nn.ModuleList, found {type(lst).__name__}"
            )
    if len(model.double_blocks) == 0:
        raise FluxcoreError("a step cache needs at least one double block (block 0 gives the signal)")

    trunk = _Trunk(model, policy, CacheStats())
    doubles = CachedDoubleBlocks(model.double_blocks._modules.values())
    singles = CachedSingleBlocks(model.single_blocks._modules.values())
    doubles._trunk = singles._trunk = trunk
    model.double_blocks, model.single_blocks = doubles, singles

    def before(module, args, kwargs):
        t = _timesteps(args, kwargs)
        trunk.t = float(t.reshape(-1)[0]) if isinstance(t, Tensor) and t.numel() else None
        trunk._raw_txt = _txt_arg(args, kwargs)
        trunk.running = True

    def after(module, args, kwargs, output):
        trunk.running = False
        trunk._raw_txt = None

    hooks = [
        model.register_forward_pre_hook(before, with_kwargs=True),
        model.register_forward_hook(after, with_kwargs=True, always_call=True),
    ]
    return CacheHandle(model, trunk, hooks)


# The main knob of each kind, for "KIND:VALUE" specs (CLI --cache, the pipeline's cache=).
_KNOB = {
    "first_block": ("threshold", float),
    "teacache": ("threshold", float),
    "taylorseer": ("interval", int),
}


def parse(spec) -> tuple[str, dict]:
    """(kind, options) from a cache spec: "teacache", "first_block:0.08", "taylorseer:3" (the
    value is the threshold, or TaylorSeer's interval; "-" may stand for "_"), a (kind, options)
    pair, or a dict {"kind": ..., **options}."""
    if isinstance(spec, dict):
        options = dict(spec)
        kind = options.pop("kind", None)
    elif isinstance(spec, (tuple, list)) and len(spec) == 2:
        kind, options = spec[0], dict(spec[1])
    elif isinstance(spec, str):
        kind, _, value = spec.partition(":")
        kind, options = kind.strip().replace("-", "_"), {}
        if value:
            if kind not in _KNOB:
                raise ConfigError(f"unknown cache kind {kind!r} in {spec!r}; known: {', '.join(KINDS)}")
            name, cast = _KNOB[kind]
            try:
                options[name] = cast(value)
            except ValueError:
                raise ConfigError(
                    f"cache spec {spec!r}: {name} must be a {cast.__name__}, got {value!r}"
                ) from None
    else:
        raise ConfigError(f"a cache spec is 'KIND[:VALUE]', (kind, options) or a dict; got {spec!r}")
    if kind not in POLICIES:
        raise ConfigError(f"unknown cache kind {kind!r}; known: {', '.join(KINDS)}")
    return kind, options
