"""Where a FluxPipeline's models live and run: moving and casting, the three offload modes, the
memory plan, and context parallelism. Plain functions of the pipeline; FluxPipeline's methods of
the same (diffusers') names call them.

    model offload       every model on the CPU; each stage's models move to the device while it runs
    group offload       block-level hooks (`fluxcore.offload`) on the transformer and text encoders;
                        the autoencoder and the small models are staged as in model offload
    sequential offload  leaf-level hooks on every model: one Linear at a time on the device

A module carrying offload hooks is never moved by a stage: its hooks move its weights.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

from fluxcore.errors import ConfigError


def to(pipe, *args, device=None, dtype=None, torch_dtype=None):
    """Move (and cast) the pipeline, as diffusers: `to("cuda")`, `to(torch.bfloat16)`,
    `to("cuda", torch.bfloat16)`, `to(device=..., dtype=...)`. A dtype casts every model but the
    autoencoder, which stays float32 (the reference's, run under autocast on CUDA). Ends offloading."""
    from fluxcore import offload

    for a in args:
        dtype, device = (a, device) if isinstance(a, torch.dtype) else (dtype, a)
    dtype = dtype or torch_dtype
    if device is not None:
        try:
            device = torch.device(device)
        except (RuntimeError, TypeError):
            raise ConfigError(f"to(): {device!r} is not a torch device") from None
    pipe._offload_device = None
    for m in pipe._modules():
        offload.remove(m)
        m.to(device=device, dtype=None if m is pipe.ae else dtype)
    return pipe


def _offload_device(gpu_id, device, what: str) -> torch.device:
    if isinstance(gpu_id, (str, torch.device)):  # fluxcore's earlier `enable_model_cpu_offload(device)`
        gpu_id, device = None, gpu_id
    if device is None:
        if not torch.cuda.is_available():
            raise ConfigError(
                f"{what}: this machine has no CUDA device to offload to; pass device= (e.g. 'mps'), or run "
                "without offloading"
            )
        device = f"cuda:{gpu_id or 0}"
    return torch.device(device)


def enable_model_cpu_offload(pipe, gpu_id: int | None = None, device=None):
    """Keep every model on the CPU and move each stage's models (text encoders, transformer and
    ControlNets, autoencoder) to the accelerator only while it runs: peak device memory is the
    largest stage. Without `device`, cuda:{gpu_id}; without CUDA a ConfigError at once."""
    device = _offload_device(gpu_id, device, "enable_model_cpu_offload")
    to(pipe, "cpu")
    pipe._offload_device = device
    return pipe


def _hooked(pipe, device: torch.device, models: list[nn.Module], **group):
    from fluxcore.offload import enable_group_offload

    to(pipe, "cpu")
    pipe._offload_device = device
    for m in models:
        enable_group_offload(m, device, **group)
    return pipe


def enable_sequential_cpu_offload(pipe, gpu_id: int | None = None, device=None):
    """Leaf-level offload hooks on every model: one Linear at a time on the device (the least
    memory, the most copies). The same images as without offload."""
    device = _offload_device(gpu_id, device, "enable_sequential_cpu_offload")
    inside = pipe.ip_adapter.adapter if pipe.ip_adapter is not None else None  # hooked with the transformer
    return _hooked(pipe, device, [m for m in pipe._modules() if m is not inside], offload_type="leaf_level")


def enable_group_offload(
    pipe, onload_device, offload_device="cpu", offload_type: str = "block_level", num_blocks_per_group: int = 1,
    non_blocking: bool = False, use_stream: bool = False, record_stream: bool = False, low_cpu_mem_usage: bool = False,
):  # fmt: skip
    """diffusers' group offload (`fluxcore.offload.enable_group_offload`, same arguments) on the
    transformer and the text encoders; the autoencoder (whose decode bypasses forward hooks) and
    the small models are staged as in model offload. The same images as without offload."""
    models = [m for m in (pipe.transformer, pipe.t5, pipe.clip) if m is not None]
    return _hooked(
        pipe, torch.device(onload_device), models, offload_device=offload_device, offload_type=offload_type,
        num_blocks_per_group=num_blocks_per_group, non_blocking=non_blocking, use_stream=use_stream,
        record_stream=record_stream, low_cpu_mem_usage=low_cpu_mem_usage,
    )  # fmt: skip


def enable_vae_tiling(pipe, **kwargs):
    """`pipe.vae.enable_tiling(**kwargs)`: decode (and encode) in overlapping tiles."""
    pipe.ae.enable_tiling(**kwargs)
    return pipe


def enable_vae_slicing(pipe):
    pipe.ae.enable_slicing()
    return pipe


@contextlib.contextmanager
def stage(pipe, *modules: nn.Module) -> Iterator[None]:
    """Models on the offload device while the block runs (model offload); hooked models move themselves."""
    if pipe._offload_device is None:
        yield
        return
    modules = [m for m in modules if m is not None and getattr(m, "_fluxcore_offload", None) is None]
    for m in modules:
        m.to(pipe._offload_device)
    try:
        yield
    finally:
        for m in modules:
            m.to("cpu")
        if pipe._offload_device.type == "cuda":
            torch.cuda.empty_cache()


# --- the memory plan -------------------------------------------------------------------------------


def _quant_formats(transformer) -> tuple[str, ...]:
    fmt = getattr(transformer, "quant_format", None)
    if fmt == "gguf":
        from collections import Counter

        from fluxcore.quant import GGUFLinear

        counts = Counter(m.qtype for m in transformer.modules() if isinstance(m, GGUFLinear))
        return (counts.most_common(1)[0][0],)
    return {None: ("bf16", "fp8"), "nf4": ("NF4",), "scaled_fp8": ("fp8",)}.get(fmt, (str(fmt),))


def fit_memory(pipe, max_memory, height: int = 1024, width: int = 1024, batch: int = 1, max_host_memory=None):
    """Fit the pipeline into `max_memory` of device memory ("12GB", "11.5GiB", bytes):
    `fluxcore.memory.choose` picks a plan (fp8 for a bf16 transformer and for T5, an offload mode,
    VAE tiling) for height x width and batch, and it is applied; `pipe.memory_plan` is the plan.
    Nothing fits: MemoryPlanError. Every later call is planned at its own size and batch first and
    refused with MemoryPlanError, before any model runs, when its estimate exceeds max_memory."""
    from fluxcore import memory
    from fluxcore.quant import quantize

    p = memory.choose(
        max_memory, pipe.transformer.config, height, width, batch, quants=_quant_formats(pipe.transformer),
        max_host_memory=max_host_memory,
    )  # fmt: skip
    if p.quant == "fp8" and getattr(pipe.transformer, "quant_format", None) is None:
        quantize(pipe.transformer, "fp8")
    if p.text_quant == "fp8":
        quantize(pipe.t5, "fp8")
    if p.offload == "model":
        pipe.enable_model_cpu_offload()
    elif p.offload == "group":
        pipe.enable_group_offload("cuda", use_stream=True)
    elif p.offload == "sequential":
        pipe.enable_sequential_cpu_offload()
    if p.vae_tiling:
        pipe.ae.enable_tiling()
    pipe.memory_plan, pipe.max_memory = p, max_memory
    return pipe


def check_memory(pipe, height: int, width: int, n: int, max_sequence_length: int) -> None:
    """Under `max_memory`: the call's own plan (its size and batch, the chosen settings), so a call
    that cannot fit raises MemoryPlanError before any model runs."""
    p = pipe.memory_plan
    if p is None:
        return
    from fluxcore import memory

    memory.plan(
        p.config, p.quant, height, width, n, p.offload, text_quant=p.text_quant,
        max_sequence_length=max_sequence_length, vae_tiling=p.vae_tiling or pipe.ae.use_tiling,
        max_memory=pipe.max_memory,
    )  # fmt: skip


# --- context parallel ------------------------------------------------------------------------------


def enable_context_parallel(pipe, ulysses: int = 1, ring: int = 1, mesh=None):
    """Shard each transformer forward's sequence over ulysses·ring ranks (`fluxcore.parallel`,
    docs/parallel.md; launch with torchrun). Every rank must call the pipeline with the same
    arguments and seed; the images are the one-process images on every rank."""
    from fluxcore.distributed import init_distributed
    from fluxcore.parallel import context_parallel

    init_distributed()
    disable_context_parallel(pipe)
    pipe._parallel = context_parallel(pipe.transformer, ulysses=ulysses, ring=ring, mesh=mesh)
    return pipe


def decode(pipe, z):
    """`pipe.ae.decode(z)`; under context parallel with per-tile VAE tiling, the tiles are shared
    among the context-parallel ranks (`fluxcore.parallel_decode.decode_across_ranks`, the same
    image). Without tiling (or with shared-norm tiling) every rank decodes the whole image: its
    GroupNorms normalise over the whole image, so the decoder does not split into independent parts."""
    cp = pipe._parallel
    if cp is None or cp.size == 1:
        return pipe.ae.decode(z)
    from fluxcore.parallel_decode import decode_across_ranks

    return decode_across_ranks(pipe.ae, z, (cp.ulysses_group, cp.ring_group))


def disable_context_parallel(pipe):
    if pipe._parallel is not None:
        pipe._parallel.remove()
        pipe._parallel = None
    return pipe
