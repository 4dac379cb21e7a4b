"""Trainable LoRA adapters, target presets, a float8 base and per-block gradient checkpointing.

Adapters are attached through `fluxcore.lora` itself (a zero adapter is loaded by `load_lora`, so
the usual `set_adapters` / `disable_lora` / `fuse_lora` / `unload_lora` all work), then each
target's `Adapter` is swapped for a `TrainableAdapter` whose A and B are Parameters:

    y = base(x) + w · s · B (A · dropout(x))       s = alpha / r,  w = the adapter strength (1)

A (r, in) starts Kaiming-uniform and B (out', r) at zero, as PEFT does, so training starts from
the base model exactly. `rows` restricts B to rows [start, start + out') of a fused target: the
"attention" preset trains only the q/k/v rows of a single block's `linear1`, as diffusers'
training script targets `to_q/to_k/to_v` there and not `proj_mlp`.
"""

from __future__ import annotations

import math
import re

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from fluxcore.errors import ConfigError
from fluxcore.lora.layer import Adapter, LoraLinear
from fluxcore.transforms import replace_module

# Block-relative module names (BFL layout) per preset; `None` rows = the whole output.
_DOUBLE = {
    "attention": ("img_attn.qkv", "img_attn.proj", "txt_attn.qkv", "txt_attn.proj"),
    "attention_mlp": ("img_mlp.0", "img_mlp.2", "txt_mlp.0", "txt_mlp.2"),
    "all": ("img_mod.lin", "txt_mod.lin"),
}
_SINGLE = {"attention": ("linear1:qkv",), "attention_mlp": ("linear1", "linear2"), "all": ("modulation.lin",)}
PRESETS = ("attention", "attention_mlp", "all")
BLOCKS = ("both", "double", "single")
CLIP_TARGETS = {
    "attention": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj"),
    "attention_mlp": ("mlp.fc1", "mlp.fc2"),
}


def transformer_targets(
    model: nn.Module, preset: str = "attention", blocks: str = "both", patterns=None
) -> dict[str, tuple[int, int] | None]:
    """Module path → rows (start, length) or None (all rows), for a fluxcore `Flux`.

    preset: "attention" (q/k/v + out projections; in single blocks the q/k/v rows of `linear1`),
    "attention_mlp" (+ the MLPs; whole `linear1` and `linear2`), "all" (+ the modulation Linears:
    every Linear in the blocks, kohya's default). blocks: "both", "double" or "single".
    patterns: regexes over module paths that replace the preset (whole outputs)."""
    if patterns:
        regs = [re.compile(p) for p in patterns]
        names = [n for n, m in model.named_modules() if _is_linear(m) and any(r.search(n) for r in regs)]
        if not names:
            raise ConfigError(f"target_modules {list(patterns)} match no Linear of the model")
        return {n: None for n in names}
    if preset not in PRESETS:
        raise ConfigError(f"targets must be one of {PRESETS}; got {preset!r}")
    if blocks not in BLOCKS:
        raise ConfigError(f"blocks must be one of {BLOCKS}; got {blocks!r}")
    upto = PRESETS[: PRESETS.index(preset) + 1]
    out: dict[str, tuple[int, int] | None] = {}
    hidden = model.config.hidden_size
    if blocks in ("both", "double"):
        for i in range(len(model.double_blocks)):
            for p in upto:
                out |= {f"double_blocks.{i}.{n}": None for n in _DOUBLE[p]}
    if blocks in ("both", "single"):
        for i in range(len(model.single_blocks)):
            for p in upto:
                for n in _SINGLE[p]:
                    name, _, part = n.partition(":")
                    out[f"single_blocks.{i}.{name}"] = (0, 3 * hidden) if part else None
    return out


def clip_targets(model: nn.Module, preset: str = "attention") -> dict[str, None]:
    """CLIP text-encoder Linears (Hugging Face names): attention projections, + MLP for
    "attention_mlp" / "all"."""
    keep = CLIP_TARGETS["attention"] + (CLIP_TARGETS["attention_mlp"] if preset != "attention" else ())
    return {n: None for n, m in model.named_modules() if _is_linear(m) and n.endswith(keep)}


def _is_linear(m: nn.Module) -> bool:
    return (
        not isinstance(m, (LoraLinear, Adapter)) and hasattr(m, "in_features") and hasattr(m, "out_features")
    )


class TrainableAdapter(Adapter):
    """An `Adapter` whose low-rank pair is trainable: A (r, in), B (rows, r) Parameters in float32,
    scale s = alpha / r kept apart from B (so alpha acts as in PEFT and kohya), input dropout."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        rank: int,
        alpha: float,
        *,
        rows: tuple[int, int] | None = None,
        dropout: float = 0.0,
        device=None,
        generator: torch.Generator | None = None,
    ):
        nn.Module.__init__(self)
        self.register_buffer("weight", torch.tensor(1.0, device=device), persistent=False)
        self.start, n = rows if rows is not None else (0, out_features)
        self.out_features, self.length = out_features, n
        A = torch.empty(rank, in_features)
        # PEFT's init: kaiming_uniform_(a=√5) on A, i.e. U(±1/√in); B zero
        bound = 1.0 / math.sqrt(in_features)
        A.uniform_(-bound, bound, generator=generator)
        self.A = nn.Parameter(A.to(device))
        self.B = nn.Parameter(torch.zeros(n, rank, device=device))
        for name in ("bias", "magnitude", "has_magnitude"):
            self.register_buffer(name, None, persistent=False)
        self.dense = nn.ModuleList()
        self.rank, self.alpha = rank, float(alpha)
        self.scale = self.alpha / rank
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def full_B(self) -> Tensor:
        """s·B as (out_features, r) in float32, zero outside the trained rows."""
        B = self.scale * self.B.float()
        return F.pad(B, (0, 0, self.start, self.out_features - self.start - self.length))

    def delta_weight(self) -> Tensor:
        return self.full_B() @ self.A.float()

    def delta_out(self, x: Tensor) -> Tensor:
        y = F.linear(F.linear(self.dropout(x), self.A.to(x.dtype)), self.B.to(x.dtype)) * self.scale
        if self.length == self.out_features:
            return y
        return F.pad(y, (self.start, self.out_features - self.start - self.length))


def add_trainable_lora(
    model: nn.Module,
    targets: dict[str, tuple[int, int] | None],
    *,
    rank: int,
    alpha: float,
    dropout: float = 0.0,
    adapter_name: str = "default",
    seed: int = 0,
) -> dict[str, TrainableAdapter]:
    """Attach a trainable adapter to every target (path → rows or None); freeze everything else.
    Returns path → TrainableAdapter (its A and B are the only parameters that require grad)."""
    from fluxcore.lora import load_lora
    from fluxcore.lora.targets import component_of

    prefix = {"transformer": "lora_unet_", "clip": "lora_te1_", "t5": "lora_te3_"}[component_of(model)]
    # a zero rank-1 placeholder in the kohya layout (valid for every component) registers the
    # adapter with fluxcore.lora; its tensors are swapped for trainable ones right after
    zeros = {}
    for path in targets:
        m = model.get_submodule(path)
        k = prefix + path.replace(".", "_")
        zeros[f"{k}.lora_down.weight"] = torch.zeros(1, m.in_features)
        zeros[f"{k}.lora_up.weight"] = torch.zeros(m.out_features, 1)
    model.requires_grad_(False)
    load_lora(model, zeros, adapter_name=adapter_name)
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for path, rows in targets.items():
        wrapper = model.get_submodule(path)
        w = getattr(wrapper.base, "weight", None)
        a = TrainableAdapter(
            wrapper.in_features, wrapper.out_features, rank, alpha,
            rows=rows, dropout=dropout, device=None if w is None else w.device, generator=gen,
        )  # fmt: skip
        wrapper.adapters[adapter_name] = a
        out[path] = a
    return out


def fp8_base(model: nn.Module) -> list[str]:
    """Store the frozen base Linears as float8_e4m3fn (one scale per tensor), upcast per layer in
    the forward (`fluxcore.quant.quantize(model, "fp8")`). Call before `add_trainable_lora`."""
    from fluxcore.quant import quantize

    return quantize(model, "fp8")


# --- gradient checkpointing ----------------------------------------------------------------------


class CheckpointedBlock(nn.Module):
    """Runs `block` under torch.utils.checkpoint (activations recomputed in the backward pass).

    It shares the block's parameter, buffer and child dicts, so module paths and state-dict keys
    stay the block's own (`double_blocks.0.img_attn.qkv`, no extra level) and later transforms
    (LoRA, quantization) that replace a child are seen by both."""

    def __init__(self, block: nn.Module):
        super().__init__()
        self._parameters, self._buffers, self._modules = block._parameters, block._buffers, block._modules
        self._non_persistent_buffers_set = block._non_persistent_buffers_set
        object.__setattr__(self, "block", block)

    def forward(self, *args, **kwargs):
        if torch.is_grad_enabled() and self.training:
            return checkpoint(self.block, *args, use_reentrant=False, **kwargs)
        return self.block(*args, **kwargs)

    def train(self, mode: bool = True):
        super().train(mode)
        self.block.training = mode
        return self


def apply_checkpointing(model: nn.Module) -> list[str]:
    """Wrap every double and single block of a `Flux` in `CheckpointedBlock`; returns the paths."""
    done = []
    for name in ("double_blocks", "single_blocks"):
        for i, block in enumerate(getattr(model, name)):
            if not isinstance(block, CheckpointedBlock):
                replace_module(model, f"{name}.{i}", CheckpointedBlock(block))
                done.append(f"{name}.{i}")
    return done


def remove_checkpointing(model: nn.Module) -> list[str]:
    done = []
    for name in ("double_blocks", "single_blocks"):
        for i, block in enumerate(getattr(model, name)):
            if isinstance(block, CheckpointedBlock):
                replace_module(model, f"{name}.{i}", block.block)
                done.append(f"{name}.{i}")
    return done
