"""Weight offload as a transform: the weights live on a host device between uses and are copied to
the compute device group by group, just before the group runs, by forward hooks.

    handle = enable_group_offload(model, "cuda", offload_type="block_level", use_stream=True)
    handle = enable_sequential_cpu_offload(model, "cuda")     # leaf_level, one Linear at a time
    handle.remove()                                           # or fluxcore.offload.remove(model)

Groups. "block_level": every outermost `nn.ModuleList` of the model (FLUX: `double_blocks`,
`single_blocks`; T5: `encoder.block`) is cut into groups of `num_blocks_per_group` consecutive blocks; all remaining
weights (embedders, final layer) form one group that stays on the compute device for the whole
forward of the model. "leaf_level": every module that holds weights itself is its own group.

Copies. The host copy of each tensor is made once (pinned when the compute device is CUDA and
`low_cpu_mem_usage` is off, which makes copies asynchronous); onloading replaces each parameter's
`.data` with a device copy and offloading points it back at the host copy, so the Parameter objects
never change (optimizers, LoRA wrappers and state dicts keep working; the model is for inference:
writes to offloaded weights are not copied back). With `use_stream=True` (CUDA), the next group is
copied on a side stream while the current one computes, and the compute stream waits on an event
before using it. On the CPU the same hooks run with synchronous copies (used by the tests).

Modules flagged `_fluxcore_no_offload` (the modulation Linears under `fluxcore.modulation_cache`,
whose outputs are precomputed) are left where they are and never copied.

Memory on the compute device: the always-on group plus, per step, one group (two with
`use_stream`); `fluxcore.memory.plan` estimates it.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from fluxcore.errors import ConfigError


class _Group:
    def __init__(
        self,
        modules: list[nn.Module],
        tensors: list[tuple[nn.Module, str, bool]],
        onload,
        pin: bool,
        non_blocking: bool,
    ):
        self.modules = modules
        self.slots = tensors  # (owner module, name, is_parameter)
        self.onload_device = torch.device(onload)
        self.non_blocking = non_blocking
        self.host: list[Tensor] = []
        for owner, name, _ in tensors:
            t = getattr(owner, name)
            h = t.data
            if pin and not h.is_pinned():
                h = h.pin_memory()
            self.host.append(h)
            self._set(owner, name, h)
        self.event = None
        self.onloaded = False

    @staticmethod
    def _set(owner: nn.Module, name: str, data: Tensor) -> None:
        t = owner._parameters.get(name)
        if t is not None:
            t.data = data
        else:
            owner._buffers[name] = data

    def onload(self, stream=None) -> None:
        if self.onloaded:
            return
        ctx = torch.cuda.stream(stream) if stream is not None else _null()
        with ctx:
            for (owner, name, _), h in zip(self.slots, self.host):
                # copy=True: on a CPU "device" too, so the tests see a distinct onloaded copy
                self._set(
                    owner,
                    name,
                    h.to(self.onload_device, non_blocking=self.non_blocking or stream is not None, copy=True),
                )
            if stream is not None:
                self.event = torch.cuda.Event()
                self.event.record(stream)
        self.onloaded = True

    def wait(self) -> None:
        if self.event is not None:
            torch.cuda.current_stream().wait_event(self.event)
            self.event = None

    def offload(self) -> None:
        for (owner, name, _), h in zip(self.slots, self.host):
            self._set(owner, name, h)
        self.onloaded = False


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


class OffloadHandle:
    """What an offload transform did: `groups` (module paths per group), `remove()`."""

    def __init__(self, model: nn.Module, groups: list[_Group], paths: list[list[str]], hooks: list):
        self.model, self._groups, self.groups, self._hooks = model, groups, paths, hooks

    def remove(self, device=None) -> list[list[str]]:
        """Remove the hooks; weights stay on the host device (or are moved to `device`)."""
        for h in self._hooks:
            h.remove()
        for g in self._groups:
            g.offload()
        if device is not None:
            self.model.to(device)
        if getattr(self.model, "_fluxcore_offload", None) is self:
            del self.model._fluxcore_offload
        return self.groups


def _direct_tensors(m: nn.Module) -> list[tuple[nn.Module, str, bool]]:
    if getattr(m, "_fluxcore_no_offload", False):  # e.g. modulation weights that were precomputed
        return []
    out = [(m, n, True) for n, p in m._parameters.items() if p is not None]
    out += [(m, n, False) for n, b in m._buffers.items() if b is not None]
    return out


def enable_group_offload(
    module: nn.Module,
    onload_device: torch.device | str,
    offload_device: torch.device | str = "cpu",
    offload_type: str = "block_level",
    num_blocks_per_group: int | None = 1,
    non_blocking: bool = False,
    use_stream: bool = False,
    record_stream: bool = False,
    low_cpu_mem_usage: bool = False,
) -> OffloadHandle:
    """Offload `module`'s weights to `offload_device` (the CPU) and run each group on
    `onload_device`; signature as diffusers' `enable_group_offload` (offload_to_disk_path is not
    supported; record_stream is accepted and ignored: events order the copies). Returns a handle."""
    if offload_type not in ("block_level", "leaf_level"):
        raise ConfigError(f"offload_type must be 'block_level' or 'leaf_level', got {offload_type!r}")
    if torch.device(offload_device).type != "cpu":
        raise ConfigError(f"offload_device must be the CPU, got {offload_device!r}")
    if getattr(module, "_fluxcore_offload", None) is not None:
        module._fluxcore_offload.remove()
    onload = torch.device(onload_device)
    cuda = onload.type == "cuda"
    stream = torch.cuda.Stream(onload) if (use_stream and cuda) else None
    pin = cuda and not low_cpu_mem_usage
    n = max(1, num_blocks_per_group or 1)

    units: list[tuple[list[str], list[nn.Module]]] = []
    covered: set[int] = set()
    if offload_type == "block_level":
        lists: list[tuple[str, nn.ModuleList]] = []
        for name, child in module.named_modules():  # outermost ModuleLists (T5: encoder.block)
            if (
                name
                and isinstance(child, nn.ModuleList)
                and not any(name.startswith(p + ".") for p, _ in lists)
            ):
                lists.append((name, child))
        for name, child in lists:
            blocks = list(child)
            for i in range(0, len(blocks), n):
                chunk = blocks[i : i + n]
                units.append(([f"{name}.{j}" for j in range(i, i + len(chunk))], chunk))
                covered.update(id(m) for b in chunk for m in b.modules())
    else:
        for path, m in module.named_modules():
            if path and _direct_tensors(m) and not list(m.children()):
                units.append(([path], [m]))
                covered.add(id(m))
    rest = [t for m in module.modules() if id(m) not in covered for t in _direct_tensors(m)]

    groups, hooks, paths = [], [], []
    for p, mods in units:
        tensors = [t for m in mods for sub in m.modules() for t in _direct_tensors(sub)]
        if tensors:
            groups.append(_Group(mods, tensors, onload, pin, non_blocking))
            paths.append(p)
    root = _Group([module], rest, onload, pin, non_blocking) if rest else None

    def pre(i):
        def hook(mod, args, kwargs=None):
            g = groups[i]
            g.onload()  # no-op when it was prefetched
            g.wait()
            if stream is not None and i + 1 < len(groups):
                groups[i + 1].onload(stream)

        return hook

    def post(i):
        def hook(mod, args, output):
            groups[i].offload()

        return hook

    for i, g in enumerate(groups):
        hooks.append(g.modules[0].register_forward_pre_hook(pre(i)))
        hooks.append(g.modules[-1].register_forward_hook(post(i)))
    if root is not None:
        groups.append(root)
        paths.append(["<rest>"])

        def root_pre(mod, args):
            root.onload()

        def root_post(mod, args, output):
            root.offload()

        hooks.append(module.register_forward_pre_hook(root_pre))
        hooks.append(module.register_forward_hook(root_post))
    handle = OffloadHandle(module, groups, paths, hooks)
    module._fluxcore_offload = handle
    return handle


def enable_sequential_cpu_offload(module: nn.Module, device: torch.device | str = "cuda") -> OffloadHandle:
    """Every weight-holding leaf module is copied to `device` just before it runs and dropped
    after (the least device memory, the most copies). Same as leaf-level group offload."""
    return enable_group_offload(module, device, offload_type="leaf_level")


def remove(module: nn.Module) -> list[list[str]]:
    """Undo an offload transform on `module` (weights stay on the host)."""
    h = getattr(module, "_fluxcore_offload", None)
    return h.remove() if h is not None else []
