"""Time one full transformer step (one Flux forward) per attention backend.

Default: flux-dev config with random bf16 weights, a 1024×1024 image (4096 image + 512 text tokens),
batch 1, on CUDA. For each backend (sdpa, triton, eager): median ms, achieved TFLOP/s, the ratio to
the compute floor (the step's FLOPs at this device's measured dense bf16 matmul rate, or at
--peak-tflops), peak memory, and the relative difference of its output to the first backend's.
With "triton" the blocks also run the fused norm/modulation kernels.

FLOPs per step (PERFORMANCE.md): blocks·(2·(4 + 2·mlp_ratio)·D²·N + 4·N²·D), N = image + text
tokens; 74.4 TFLOP for flux-dev at 1024².

    python benchmarks/step.py                                        # GPU, flux-dev, 1024², bf16
    python benchmarks/step.py --preset tiny-dev --size 64 --txt-len 16 --device cpu --dtype fp32 \\
        --warmup 1 --iters 2                                         # CPU smoke test

Prints a table and writes benchmarks/results/step-<preset>-<device>.json. A backend that fails is
recorded with its error and the run goes on.
"""

from __future__ import annotations

import argparse
import os

import torch
from common import DTYPES, environment, measure_matmul_tflops, print_table, short_error, time_ms, write_json


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="flux-dev")
    p.add_argument("--size", type=int, default=1024, help="image side in pixels (tokens = (size/16)²)")
    p.add_argument("--txt-len", type=int, default=512)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    p.add_argument(
        "--backends",
        nargs="+",
        default=["sdpa", "triton", "triton+kernels", "eager"],
        help="attention backends; NAME+kernels also applies fluxcore.kernels.apply (fused norms) for that row",
    )
    p.add_argument("--peak-tflops", type=float, default=None, help="floor denominator (default: measured)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--out", default=None)
    return p.parse_args()


def step_tflop(config, n_tokens: int, batch: int) -> float:
    """Multiply-adds ×2 of the linears and attention of one forward (embedders are ~0.03%)."""
    d, blocks = config.hidden_size, config.depth + config.depth_single_blocks
    linear = 2 * (4 + 2 * config.mlp_ratio) * d * d * n_tokens
    attention = 4 * n_tokens * n_tokens * d
    return batch * blocks * (linear + attention) / 1e12


def build_model(preset: str, device: torch.device, dtype: torch.dtype):
    """Flux with random weights, built on meta and materialised once in `dtype` (no float32 copy)."""
    from fluxcore import PRESETS, Flux

    with torch.device("meta"):
        model = Flux(PRESETS[preset])
    model = model.to(dtype).to_empty(device=device).eval()
    g = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim >= 2:  # fan-in scaled, so activations stay O(1) through 57 blocks
                p.normal_(0.0, p.shape[1] ** -0.5, generator=g)
            elif name.endswith("scale"):
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02, generator=g)
    return model


def make_inputs(config, size: int, txt_len: int, batch: int, device, dtype) -> tuple:
    side = size // 16  # 8× VAE downsampling, then 2×2 patches
    g = torch.Generator(device=device).manual_seed(1)
    rows, cols = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
    img_ids = torch.stack([torch.zeros_like(rows), rows, cols], -1).reshape(1, side * side, 3).float()
    return (
        torch.randn(batch, side * side, config.in_channels, device=device, dtype=dtype, generator=g),
        img_ids.expand(batch, -1, -1).to(device),
        torch.randn(batch, txt_len, config.context_in_dim, device=device, dtype=dtype, generator=g),
        torch.zeros(batch, txt_len, 3, device=device),
        torch.full((batch,), 0.7, device=device),
        torch.randn(batch, config.vec_in_dim, device=device, dtype=dtype, generator=g),
        torch.full((batch,), 3.5, device=device) if config.guidance_embed else None,
    )


def main() -> None:
    args = parse_args()
    device = torch.device(args.device)
    if device.type == "cpu":  # the Triton kernels can only run in the interpreter there
        os.environ.setdefault("TRITON_INTERPRET", "1")
    from fluxcore import attention_backend

    dtype = DTYPES[args.dtype]
    env = environment(device)
    print(f"{env['device']} · torch {env['torch']} · triton {env['triton']} · commit {env['git_commit']}")
    model = build_model(args.preset, device, dtype)
    inputs = make_inputs(model.config, args.size, args.txt_len, args.batch, device, dtype)
    n_tokens = inputs[0].shape[1] + args.txt_len
    tflop = step_tflop(model.config, n_tokens, args.batch)
    peak = args.peak_tflops or measure_matmul_tflops(device, dtype)
    floor_ms = tflop / peak * 1e3 if peak else None
    print(f"{args.preset}, {args.size}² ({n_tokens} tokens), {args.dtype}: {tflop:.3g} TFLOP per step")
    if peak:
        print(f"dense matmul {peak:.0f} TFLOP/s → compute floor {floor_ms:.1f} ms per step")

    rows, first = [], None
    for name in args.backends:
        row = dict(backend=name, ms=None, error=None)
        backend, _, extra = name.partition("+")
        try:
            if extra == "kernels":
                from fluxcore import kernels

                kernels.apply(model)
            with torch.no_grad(), attention_backend(backend):
                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(device)
                ms = time_ms(lambda: model(*inputs), device, args.warmup, args.iters)
                out = model(*inputs).float()
            row.update(ms=ms, tflops=tflop / (ms * 1e-3))
            if floor_ms:
                row["x_floor"] = ms / floor_ms
            if device.type == "cuda":
                row["peak_mem_gb"] = torch.cuda.max_memory_allocated(device) / 1e9
            first = out if first is None else first
            row["rel_diff_vs_first"] = ((out - first).norm() / first.norm()).item()
        except Exception as e:  # a backend may be unavailable here: record and go on
            row["error"] = short_error(e)
        if extra == "kernels":
            from fluxcore import kernels

            kernels.remove(model)
        rows.append(row)

    print()
    print_table(rows, ["backend", "ms", "tflops", "x_floor", "peak_mem_gb", "rel_diff_vs_first", "error"])
    config = dict(vars(args), tflop_per_step=tflop, n_tokens=n_tokens, matmul_tflops=peak, floor_ms=floor_ms)
    path = write_json(f"step-{args.preset}", env, config, rows, args.out)
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
