"""Memory planning: how much device (GPU) and host memory a FLUX run needs, per stage, before
anything is loaded, and which quantization / offload makes it fit.

    p = fluxcore.memory.plan("flux-dev", "Q4_K", 1024, 1024, offload="model")
    print(p)                      # a table: text encoding, sampling, decode; device and host
    p = fluxcore.memory.choose(max_memory="12GB", height=1024, width=1024)

Estimates, not measurements (docs/memory.md states every term):

- weights: from the config's shapes. Quantized formats store every Linear weight inside the
  blocks at the format's bits per weight; embedders, final layer, biases and norms stay bf16.
- sampling activations: the peak inside one block, about 31 live [B, L, hidden] tensors in the
  activation dtype (plus 4 float32 ones in bf16 runs) (L = image tokens + text tokens), plus the RoPE table (L·head_dim·8 bytes per
  sample), plus one dequantized weight of the largest Linear (with its decode temporaries) for
  quantized formats.
- text encoding: T5-XXL + CLIP-L weights (bf16, fp8 or GGUF Q8_0 as `text_quant` says) and their
  activations; decode: the float32 VAE (the pipeline decodes in float32) and about 8
  full-resolution [B, 128, H, W] float32 activations (tiling: one tile's worth on the device plus
  the output; the default shared-statistics tiling keeps about 4 full-resolution activations in
  host memory between layers).
- offload: "none" (everything resident), "model" (one component at a time on the device, the
  rest in host memory), "group" (block-level group offload with a prefetch stream: the
  non-block weights + 2 blocks resident), "sequential" (leaf level: the largest Linear).
- `overhead` (default 0.5 GB on CUDA, 0 on the CPU) covers the CUDA context and allocator slack.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from fluxcore.config import FluxConfig, get_config
from fluxcore.errors import FluxcoreError

# bits per weight of a quantized Linear weight (scales included)
BITS = {
    "fp32": 32.0, "bf16": 16.0, "fp16": 16.0, "fp8": 8.0, "int8": 8.0,
    "Q8_0": 8.5, "Q6_K": 6.5625, "Q5_1": 6.0, "Q5_K": 5.5, "Q5_0": 5.5, "Q4_1": 5.0,
    "Q4_K": 4.5, "Q4_0": 4.5, "Q3_K": 3.4375, "Q2_K": 2.625, "NF4": 4.5,
}  # fmt: skip
# float32 temporaries per element while one weight is dequantized (decode + cast), bytes
_DEQUANT_WORK = {"fp8": 6, "int8": 6, "NF4": 20, "Q8_0": 10, "Q4_0": 14, "Q4_1": 14, "Q5_0": 22, "Q5_1": 22}
OFFLOAD = ("none", "model", "group", "sequential")
_EMBEDDERS = ("img_in", "txt_in", "time_in", "vector_in", "guidance_in", "final_layer")


# Bytes per element of [B, L, hidden] live at a block's peak: about 31 such tensors in the
# activation dtype, plus, in bf16 runs, 4 float32 ones (RMSNorm and RoPE of q and k run in fp32).
# Measured on the CPU in float32 (tests/test_memory.py); the bf16 figure is derived from it.
def act_bytes_per_element(act_bytes: int) -> int:
    return 31 * act_bytes + 4 * (4 - act_bytes)


# Live full-resolution [B, 128, H, W] float32 tensors at the decoder's peak: measured 4.01 GiB
# for an untiled 1024² decode of the full-size autoencoder on the CPU (benchmarks/vae_memory.py).
VAE_ACT = 8
# Whole full-resolution 128-channel activations the shared-statistics tiled decode keeps (host): the
# first block at full resolution reads the 256-channel upsampled image (2) and writes two (measured
# 8.94 GiB in all for a 2048² decode on the CPU, store and block together).
VAE_STORE = 4
VAE_BYTES = 335_000_000  # the autoencoder in float32 (83.8 M parameters)
GB = 1e9


class MemoryPlanError(FluxcoreError):
    """The estimated peak exceeds `max_memory`. `plan` is the estimate; `fits` lists
    (quant, offload, peak device bytes) of configurations that would fit, best first."""

    def __init__(self, message: str, plan: MemoryPlan, fits: list[tuple[str, str, int]]):
        super().__init__(message)
        self.plan, self.fits = plan, fits


def parse_bytes(size) -> int:
    """12e9, "12GB" (10^9), "12GiB" (2^30), "500MB", "12G" (GB) → bytes."""
    if isinstance(size, (int, float)):
        return int(size)
    m = re.fullmatch(r"\s*([\d.]+)\s*([kKmMgGtT]?)(i?)[bB]?\s*", str(size))
    if not m:
        raise ValueError(f"cannot read a memory size from {size!r}; use e.g. '12GB', '11.5GiB' or bytes")
    exp = " KMGT".index(m.group(2).upper() or " ")
    return int(float(m.group(1)) * (1024 if m.group(3) else 1000) ** exp)


def _fmt(n: float) -> str:
    return f"{n / GB:.2f} GB"


@dataclass
class Stage:
    device: int
    host: int
    detail: dict[str, int] = field(default_factory=dict)


@dataclass
class MemoryPlan:
    config: FluxConfig
    quant: str
    height: int
    width: int
    batch: int
    offload: str
    stages: dict[str, Stage]

    @property
    def peak_device(self) -> int:
        return max(s.device for s in self.stages.values())

    @property
    def peak_host(self) -> int:
        return max(s.host for s in self.stages.values())

    def __str__(self) -> str:
        rows = [
            f"{self.quant}, offload={self.offload}, {self.width}x{self.height}, batch {self.batch} (estimate)"
        ]
        rows.append(f"{'stage':<10} {'device':>10} {'host':>10}")
        for name, s in self.stages.items():
            rows.append(f"{name:<10} {_fmt(s.device):>10} {_fmt(s.host):>10}")
        rows.append(f"{'peak':<10} {_fmt(self.peak_device):>10} {_fmt(self.peak_host):>10}")
        return "\n".join(rows)


def transformer_weights(config: FluxConfig, quant: str = "bf16") -> dict[str, int]:
    """Bytes of the transformer's weights: total, quantized part, modulation part, largest
    Linear (elements), per block (bytes), and what is outside the blocks."""
    if quant not in BITS:
        raise ValueError(f"unknown quant {quant!r}; known: {sorted(BITS)}")
    D, M = config.hidden_size, config.mlp_hidden_dim
    bits = BITS[quant]
    dense = 2 if quant not in ("fp32",) else 4
    # (rows, cols, has bias) of each Linear per block
    double = [(3 * D, D), (D, D), (M, D), (D, M), (6 * D, D)] * 2
    single = [(3 * D + M, D), (D, D + M), (3 * D, D)]
    mod = 2 * 6 * D * D * config.depth + 3 * D * D * config.depth_single_blocks + 2 * D * D

    def block_bytes(linears, norms):
        w = sum(r * c for r, c in linears) * bits / 8
        return int(w + (sum(r for r, _ in linears) + norms) * dense)

    dbl = block_bytes(double, 4 * config.head_dim)
    sgl = block_bytes(single, 2 * config.head_dim)
    emb = 0
    for r, c in [(D, config.in_channels), (D, 256), (D, D), (D, config.vec_in_dim), (D, D), (D, config.context_in_dim),
                 (config.out_channels, D), (2 * D, D)] + ([(D, 256), (D, D)] if config.guidance_embed else []):  # fmt: skip
        emb += (r * c + r) * dense
    total = dbl * config.depth + sgl * config.depth_single_blocks + emb
    mod_bytes = int(mod * bits / 8)
    return {"total": int(total), "block": max(dbl, sgl), "outside": int(emb), "modulation": mod_bytes,
            "largest_linear": (3 * D + M) * D}  # fmt: skip


def _t5_bytes(text_quant: str) -> int:
    params = 4.762e9  # T5-XXL encoder (24 layers, d_model 4096, d_ff 10240, 32128 tokens)
    emb = 32128 * 4096
    if text_quant == "bf16":
        return int(params * 2)
    return int((params - emb) * BITS[text_quant] / 8 + emb * 2)


def plan(
    config: FluxConfig | str = "flux-dev",
    quant: str = "bf16",
    height: int = 1024,
    width: int = 1024,
    batch: int = 1,
    offload: str = "none",
    *,
    text_quant: str = "bf16",
    max_sequence_length: int = 512,
    act_bytes: int = 2,
    vae_tiling: bool = False,
    tile_sample_size: int = 512,
    precomputed_modulation: bool = False,
    overhead: int | None = None,
    max_memory=None,
    include: tuple[str, ...] = ("text", "sampling", "decode"),
) -> MemoryPlan:
    """Estimated peak device and host bytes per stage (text, sampling, decode) for one call.

    quant: a key of BITS ("bf16", "fp8", "int8", "Q8_0", ..., "NF4") for the transformer.
    text_quant: "bf16", "fp8" or a GGUF type for T5. act_bytes: 2 (bf16) or 4 (float32).
    precomputed_modulation: modulation weights leave the device during sampling.
    max_memory: raise MemoryPlanError when the device peak exceeds it.
    """
    config = get_config(config) if isinstance(config, str) else config
    if offload not in OFFLOAD:
        raise ValueError(f"offload must be one of {OFFLOAD}, got {offload!r}")
    overhead = int(0.5 * GB) if overhead is None else int(overhead)
    w = transformer_weights(config, quant)
    B, D = batch, config.hidden_size
    L = (height // 16) * (width // 16) + max_sequence_length
    act = act_bytes_per_element(act_bytes) * B * L * D + B * L * config.head_dim * 8
    if quant not in ("bf16", "fp32", "fp16"):
        work = _DEQUANT_WORK.get(quant, 18 if quant.endswith("_K") else 12)
        act += w["largest_linear"] * (work + act_bytes)
    tw = w["total"] - (w["modulation"] if precomputed_modulation else 0)
    if offload in ("none", "model"):
        sampling_weights = tw
    elif offload == "group":
        sampling_weights = w["outside"] + 2 * w["block"]
    else:
        sampling_weights = int(w["largest_linear"] * BITS[quant] / 8) * 2
    t5, clip, vae = _t5_bytes(text_quant), 246_000_000, VAE_BYTES
    t5_act = (
        max_sequence_length * B * (3 * 10240 + 8 * 4096) * act_bytes + B * 64 * max_sequence_length**2 * 4
    )
    text_weights = {"none": t5 + clip, "model": t5, "group": 2 * t5 // 24, "sequential": 2 * 4096 * 10240}[
        offload
    ]
    vae_store = 0  # host bytes of the tiled decode's whole-image activations
    if vae_tiling and max(height, width) > tile_sample_size:
        side = tile_sample_size
        vae_act = VAE_ACT * B * 128 * side * side * 4 + 3 * 4 * B * 3 * height * width
        vae_store = VAE_STORE * B * 128 * height * width * 4
    else:
        vae_act = VAE_ACT * B * 128 * height * width * 4
    latents = 4 * B * 16 * (height // 8) * (width // 8) * 4
    everything = w["total"] + t5 + clip + vae
    resident = everything if offload == "none" else 0
    stages = {}
    if "text" in include:
        dev = (resident or text_weights) + t5_act + overhead
        stages["text"] = Stage(
            dev,
            everything - (resident or text_weights),
            {"weights": resident or text_weights, "activations": t5_act},
        )
    if "sampling" in include:
        dev = (
            (resident - (w["modulation"] if precomputed_modulation else 0) if resident else sampling_weights)
            + act
            + latents
            + overhead
        )
        host = everything - (resident or sampling_weights)
        stages["sampling"] = Stage(
            int(dev), int(host), {"weights": resident or sampling_weights, "activations": act}
        )
    if "decode" in include:
        dev = (resident or vae) + vae_act + overhead
        stages["decode"] = Stage(
            int(dev),
            everything - (resident or vae) + vae_store,
            {"weights": resident or vae, "activations": vae_act, "host_activations": vae_store},
        )
    p = MemoryPlan(config, quant, height, width, batch, offload, stages)
    if max_memory is not None and p.peak_device > parse_bytes(max_memory):
        fits = [(c.quant, c.offload, c.peak_device) for c in _candidates(config, height, width, batch, parse_bytes(max_memory),
                                                                         text_quant=text_quant, overhead=overhead)]  # fmt: skip
        raise MemoryPlanError(
            f"estimated peak device memory {_fmt(p.peak_device)} ({quant}, offload={offload}, {width}x{height}, "
            f"batch {batch}) exceeds max_memory={_fmt(parse_bytes(max_memory))}; fits: "
            + (", ".join(f"{q}+{o} ({_fmt(b)})" for q, o, b in fits[:4]) or "nothing at this size"),
            p,
            fits,
        )
    return p


# Preference order: quality first, then speed (offload costs time; quantization costs a little
# quality, fp8/Q8_0 nearly none).
PREFERENCE = [
    ("bf16", "none"), ("bf16", "model"), ("fp8", "model"), ("Q8_0", "model"), ("Q6_K", "model"),
    ("Q5_K", "model"), ("Q4_K", "model"), ("NF4", "model"), ("bf16", "group"), ("fp8", "group"),
    ("Q8_0", "group"), ("Q4_K", "group"), ("Q3_K", "model"), ("Q2_K", "model"), ("Q4_K", "sequential"),
    ("Q2_K", "sequential"),
]  # fmt: skip


def _candidates(config, height, width, batch, limit, **kw):
    out = []
    for q, o in PREFERENCE:
        if kw.get("quants") and q not in kw["quants"]:
            continue
        for tq, tiling in (("bf16", False), ("fp8", False), ("fp8", True), ("Q4_K", True)):
            p = plan(config, q, height, width, batch, o, vae_tiling=tiling, text_quant=kw.get("text_quant") if tq == "bf16" else tq,
                     overhead=kw.get("overhead"))  # fmt: skip
            if p.peak_device <= limit and p.peak_host <= kw.get("host_limit", float("inf")):
                p.text_quant, p.vae_tiling = tq, tiling
                out.append(p)
                break
    return out


def choose(max_memory="12GB", config: FluxConfig | str = "flux-dev", height: int = 1024, width: int = 1024,
           batch: int = 1, *, max_host_memory=None, quants: tuple[str, ...] | None = None, text_quant: str = "bf16",
           overhead: int | None = None) -> MemoryPlan:  # fmt: skip
    """The first configuration in PREFERENCE (with T5 in bf16, else fp8, then VAE tiling, then T5
    Q4_K) whose estimated device peak fits `max_memory` (and host peak `max_host_memory`, when
    given: offloaded weights wait in host RAM), among the transformer formats `quants` when
    given (e.g. ("bf16", "fp8") for a bf16 checkpoint that `quantize` can turn into fp8, or the
    one type of a loaded GGUF file). The plan carries `text_quant` and `vae_tiling`
    attributes. Raises MemoryPlanError when nothing fits."""
    config = get_config(config) if isinstance(config, str) else config
    limit = parse_bytes(max_memory)
    host = float("inf") if max_host_memory is None else parse_bytes(max_host_memory)
    found = _candidates(
        config,
        height,
        width,
        batch,
        limit,
        text_quant=text_quant,
        overhead=overhead,
        host_limit=host,
        quants=quants,
    )
    if found:
        return found[0]
    smallest = plan(
        config,
        "Q2_K",
        height,
        width,
        batch,
        "sequential",
        text_quant="Q4_K",
        vae_tiling=True,
        overhead=overhead,
    )
    raise MemoryPlanError(
        f"nothing fits max_memory={_fmt(limit)} at {width}x{height}, batch {batch}: the smallest estimate "
        f"(Q2_K, sequential offload, T5 Q4_K, VAE tiling) needs {_fmt(smallest.peak_device)}",
        smallest,
        [],
    )


__all__ = ["BITS", "OFFLOAD", "PREFERENCE", "MemoryPlan", "MemoryPlanError", "Stage", "choose", "parse_bytes", "plan",
           "transformer_weights"]  # fmt: skip
