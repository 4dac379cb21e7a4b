"""Regional compilation: torch.compile each transformer block in place, not the whole model.

    compiled = fluxcore.compile_blocks(model)        # ["double_blocks.0", ..., "single_blocks.37"]
    fluxcore.compile.remove(model)                   # back to eager (same list of paths)

Why per block: the 19 double and 38 single blocks are two repeated programs, so dynamo traces and
Inductor compiles one graph per block class and every other block reuses it (parameters are graph
inputs). Cold start is therefore that of two blocks, not of 57, and the model's forward — the
embedders, step-cache decisions, Python control flow — stays eager, where data-dependent decisions
(`.item()` syncs) cost nothing in graph breaks.

Token counts are dynamic: before each call the sequence dims of the block inputs (img and txt
tokens of a double block, the joint sequence of a single block, and the RoPE table `pe`) are
marked dynamic, so a new resolution or prompt length reuses the compiled code instead of
recompiling. Batch size and channel widths stay static (they specialise the matmuls).

How it is wired (docs/transforms.md): like `nn.Module.compile`, the block's own call is compiled
and stored on the block (`_compiled_call_impl`); the module object, its forward, its parameters and
the state-dict keys are untouched. It compiles whatever blocks are in place — fused-kernel twins,
LoRA-wrapped Linears, a user's own block — so apply it after the other transforms; undoing an
earlier transform after compiling means compiling again. Block hooks run inside the compiled call.

CUDA-graph replay (mode="reduce-overhead", or options={"triton.cudagraphs": True}) needs the
model on a CUDA device; anywhere else compile_blocks refuses with FluxcoreError.
"""

from __future__ import annotations

import inspect
import weakref
from collections.abc import Callable

import torch
from torch import nn

from fluxcore.errors import FluxcoreError
from fluxcore.layers import DoubleStreamBlock, SingleStreamBlock

# Which argument dims are token counts, per block class (exact type; other blocks get dynamo's
# automatic dynamic shapes: one recompile on the first new size, dynamic from then on).
TOKEN_DIMS: dict[type[nn.Module], dict[str, int]] = {
    DoubleStreamBlock: {"img": 1, "txt": 1, "pe": 2},
    SingleStreamBlock: {"x": 1, "pe": 2},
}

_BLOCK_LISTS = ("double_blocks", "single_blocks")
_compiled: weakref.WeakSet[nn.Module] = weakref.WeakSet()


class _MarkTokensDynamic:
    """The compiled call of one block, preceded (in eager code) by marking its token dims dynamic."""

    def __init__(self, compiled: Callable, params: list[str], dims: dict[str, int]):
        self.compiled, self.dims = compiled, dims
        self.position = {name: i for i, name in enumerate(params) if name in dims}

    def __call__(self, *args, **kwargs):
        from torch._dynamo import maybe_mark_dynamic

        for name, dim in self.dims.items():
            t = kwargs.get(name)
            if t is None and self.position.get(name, len(args)) < len(args):
                t = args[self.position[name]]
            if isinstance(t, torch.Tensor) and t.ndim > dim:
                maybe_mark_dynamic(t, dim)
        return self.compiled(*args, **kwargs)


def cuda_graph_refusal(model: nn.Module, torch_compile_kwargs: dict) -> str | None:
    """None if the requested compile mode can run where the model is, else why not."""
    options = torch_compile_kwargs.get("options") or {}
    wants_graphs = torch_compile_kwargs.get("mode") == "reduce-overhead" or bool(
        options.get("triton.cudagraphs")
    )
    if not wants_graphs:
        return None
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    if device.type != "cuda":
        return (
            "CUDA-graph replay (mode='reduce-overhead' or options['triton.cudagraphs']) records CUDA "
            f"kernels, and the model's parameters are on {device.type!r}; move the model to a CUDA "
            "device or use the default mode"
        )
    return None


def compile_blocks(model: nn.Module, **torch_compile_kwargs) -> list[str]:
    """torch.compile every block of `model.double_blocks` and `model.single_blocks` in place
    (fullgraph=True unless given; other keywords go to torch.compile: backend, mode, options, ...).

    Returns the paths compiled, e.g. ["double_blocks.0", ..., "single_blocks.1"]; blocks compiled
    by an earlier call are skipped (a second call returns []). Undo with `fluxcore.compile.remove`.
    Raises FluxcoreError for CUDA-graph modes when the model is not on a CUDA device.
    """
    reason = cuda_graph_refusal(model, torch_compile_kwargs)
    if reason is not None:
        raise FluxcoreError(f"compile_blocks: {reason}")
    kwargs = {"fullgraph": True, **torch_compile_kwargs}
    done = []
    for path, block in _blocks(model):
        if block in _compiled:
            continue
        compiled = torch.compile(block._call_impl, **kwargs)
        dims = TOKEN_DIMS.get(type(block))
        if dims:
            params = list(inspect.signature(block.forward).parameters)
            compiled = _MarkTokensDynamic(compiled, params, dims)
        block._compiled_call_impl = compiled
        _compiled.add(block)
        done.append(path)
    return done


def remove(model: nn.Module) -> list[str]:
    """Undo `compile_blocks`: the blocks it compiled run eagerly again. Returns their paths."""
    done = []
    for path, block in _blocks(model):
        if block in _compiled:
            block._compiled_call_impl = None
            _compiled.discard(block)
            done.append(path)
    return done


def compiled_blocks(model: nn.Module) -> list[str]:
    """Paths of the blocks of `model` that `compile_blocks` compiled and that are still in place."""
    return [path for path, block in _blocks(model) if block in _compiled]


def _blocks(model: nn.Module) -> list[tuple[str, nn.Module]]:
    out = []
    for name in _BLOCK_LISTS:
        blocks = getattr(model, name, None)
        if not isinstance(blocks, nn.ModuleList):
            raise FluxcoreError(
                f"compile_blocks needs model.{name} to be an nn.ModuleList, found {type(blocks).__name__}"
            )
        out += [(f"{name}.{key}", block) for key, block in blocks._modules.items()]
    return out
