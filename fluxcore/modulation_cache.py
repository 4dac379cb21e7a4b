"""Precomputed modulation: the adaLN shift/scale/gate of every block, for every step, computed once
per prompt.

Every `Modulation` (and the final layer's `adaLN_modulation`) acts on the conditioning vector only:
vec = time_in(t) + guidance_in(g) + vector_in(pooled text), never on the tokens. For a given prompt,
guidance and schedule, all of them are known before sampling starts. `apply` computes them for
every step (the very same module calls, one step at a time, so the results are bit-identical),
and replaces each module with a twin that looks its output up by vec. The modulation Linears —
27 % of FLUX.1's weights (3.2 B parameters, 6.5 GB in bf16) — then do no work during sampling and
can leave the GPU (`offload_device="cpu"`); the table of all outputs is small (28 steps × 1.06 M
values per image = 59 MB in bf16 for FLUX.1-dev).

    handle = fluxcore.modulation_cache.apply(model, timesteps, y, guidance, offload_device="cpu")
    ... sample as usual ...
    handle.remove()           # or fluxcore.modulation_cache.remove(model)

A lookup matches whole rows of vec exactly. A vec that was not precomputed (another sampler's
intermediate time, another batch, another prompt) is computed on the spot with the original weights
wherever they are (correct, only slower) and counted in `handle.misses`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from fluxcore.layers import Modulation
from fluxcore.math import timestep_embedding
from fluxcore.transforms import exact_modules, replace_module


def conditioning_vector(model, timesteps: Tensor, y: Tensor, guidance: Tensor | None = None) -> Tensor:
    """vec [B, D] exactly as `Flux.forward` computes it (inputs cast to the model's dtype first)."""
    dtype = model.img_in.weight.dtype
    vec = model.time_in(timestep_embedding(timesteps.to(dtype), 256))
    if model.config.guidance_embed:
        vec = vec + model.guidance_in(timestep_embedding(guidance.to(dtype), 256))
    return vec + model.vector_in(y.to(dtype))


class _Table:
    """The vec rows seen at precompute time and the index of the last vec looked up."""

    def __init__(self, vecs: Tensor):
        self.vecs = vecs  # [N, D]
        self._last: tuple[Tensor, Tensor | None] | None = None
        self.misses = 0

    def index(self, vec: Tensor) -> Tensor | None:
        """Row indices [B] into the table for vec [B, D], or None when some row is unknown. Every
        module of one forward gets the same vec tensor, so the search (one host sync) runs once."""
        if self._last is not None and self._last[0] is vec:
            return self._last[1]
        vecs = self.vecs if self.vecs.device == vec.device else self.vecs.to(vec.device)
        eq = (vec[:, None, :] == vecs[None]).all(dim=-1)  # [B, N]
        idx = eq.to(torch.int8).argmax(dim=1) if bool(eq.any(dim=1).all()) else None
        if idx is None:
            self.misses += 1
        self._last = (vec, idx)
        return idx


class PrecomputedModulation(nn.Module):
    """A `Modulation` whose outputs were computed ahead for known vecs. Same child `lin`, so the
    state-dict keys are unchanged; `lin` runs only for a vec that is not in the table."""

    def __init__(self, old: Modulation, table: _Table, out: Tensor):
        super().__init__()
        self.multiplier = old.multiplier
        self.lin = old.lin
        self.table = table
        self.register_buffer("out", out, persistent=False)  # [N, multiplier·D]

    def _raw(self, vec: Tensor) -> Tensor:
        idx = self.table.index(vec)
        if idx is not None:
            return self.out.to(vec.device)[idx]
        w = self.lin.weight
        return self.lin(nn.functional.silu(vec.to(w.device))).to(vec.device)

    def forward(self, vec: Tensor) -> tuple[tuple[Tensor, Tensor, Tensor], ...]:
        out = self._raw(vec)[:, None, :].chunk(self.multiplier, dim=-1)
        return tuple(out[i : i + 3] for i in range(0, self.multiplier, 3))


class PrecomputedSequential(nn.Module):
    """The final layer's `adaLN_modulation` (SiLU, Linear) looked up the same way; children "0"
    and "1" as before."""

    def __init__(self, old: nn.Sequential, table: _Table, out: Tensor):
        super().__init__()
        for name, m in old.named_children():
            self.add_module(name, m)
        self.table = table
        self.register_buffer("out", out, persistent=False)
        self._old_type = type(old)

    def forward(self, vec: Tensor) -> Tensor:
        idx = self.table.index(vec)
        if idx is not None:
            return self.out.to(vec.device)[idx]
        w = self[1].weight if hasattr(self, "1") else None
        dev = w.device if w is not None else vec.device
        x = vec.to(dev)
        for m in self.children():
            x = m(x)
        return x.to(vec.device)

    def __getitem__(self, i: int) -> nn.Module:
        return getattr(self, str(i))


class ModulationCache:
    """What `apply` did: `paths` replaced, `misses` (forwards that found an unknown vec), `remove()`."""

    def __init__(self, model: nn.Module, paths: list[str], table: _Table, devices: dict[str, torch.device]):
        self.model, self.paths, self.table, self._devices = model, paths, table, devices

    @property
    def misses(self) -> int:
        return self.table.misses

    def remove(self) -> list[str]:
        return remove(self.model, restore_devices=self._devices)


def _targets(model: nn.Module) -> list[tuple[str, nn.Module]]:
    found = exact_modules(model, Modulation)
    fl = getattr(model, "final_layer", None)
    ada = getattr(fl, "adaLN_modulation", None)
    if type(ada) is nn.Sequential:
        found.append(("final_layer.adaLN_modulation", ada))
    return found


@torch.no_grad()
def apply(
    model: nn.Module,
    timesteps: Sequence[float] | Tensor,
    y: Tensor | Sequence[Tensor],
    guidance: Tensor | float | None = None,
    *,
    offload_device=None,
) -> ModulationCache:
    """Precompute every modulation of `model` for the flow times `timesteps` (the values the
    sampler passes to the model: for Euler, the schedule without its final 0) and the pooled text
    `y` [B, vec_in_dim] (or a list of them, e.g. the positive and negative prompt of true CFG).
    guidance: [B] tensor or a float (dev-type models). Each call of the model at time t then uses
    timesteps = full((B,), t, dtype=latents' dtype) as the samplers do; pass `timesteps` as a
    [S, B] tensor to give other per-sample values.
    offload_device: move the modulation weights there (e.g. "cpu") once the table is built.
    Returns a ModulationCache handle."""
    remove(model)
    ys = [y] if isinstance(y, Tensor) else list(y)
    dtype = model.img_in.weight.dtype  # what Flux.forward casts t, guidance and y to
    device = model.time_in.in_layer.weight.device
    ts = torch.as_tensor(timesteps) if not isinstance(timesteps, Tensor) else timesteps
    vecs = []
    for yy in ys:
        B = yy.shape[0]
        g = None
        if guidance is not None:
            g = guidance if isinstance(guidance, Tensor) else torch.full((B,), float(guidance))
            g = g.to(device=device, dtype=dtype)
        for t in ts:
            tt = t.expand(B) if t.ndim == 0 else t
            tt = (
                tt.to(device=device, dtype=dtype)
                if t.ndim
                else torch.full((B,), float(t), dtype=dtype, device=device)
            )
            vecs.append(conditioning_vector(model, tt, yy.to(device), g))
    targets = _targets(model)
    table = _Table(torch.cat(vecs))
    devices = {}
    for path, old in targets:
        if isinstance(old, Modulation):
            out = torch.cat([old.lin(nn.functional.silu(v)) for v in vecs])
            new = PrecomputedModulation(old, table, out)
        else:
            out = torch.cat([old(v) for v in vecs])
            new = PrecomputedSequential(old, table, out)
        replace_module(model, path, new)
        for m in old.modules():
            m._fluxcore_no_offload = True  # offload hooks leave these weights where they are
        params = list(old.parameters())
        if params:
            devices[path] = params[0].device
        if offload_device is not None:
            old.to(offload_device)  # Module.to keeps the Parameter objects where the device allows
    return ModulationCache(model, [p for p, _ in targets], table, devices)


def remove(model: nn.Module, restore_devices: dict | None = None) -> list[str]:
    """Put the original modules back (holding the very same parameters); returns the paths. With
    `restore_devices` (what a handle recorded), the weights also go back where they were."""
    done = []
    for path, m in [
        (p, m)
        for p, m in model.named_modules()
        if p and type(m) in (PrecomputedModulation, PrecomputedSequential)
    ]:
        if isinstance(m, PrecomputedModulation):
            old = Modulation.__new__(Modulation)
            nn.Module.__init__(old)
            old.multiplier, old.lin = m.multiplier, m.lin
        else:
            old = m._old_type(*m.children())
        for sub in old.modules():
            sub.__dict__.pop("_fluxcore_no_offload", None)
        if restore_devices and path in restore_devices:
            old.to(restore_devices[path])
        replace_module(model, path, old)
        done.append(path)
    return done
