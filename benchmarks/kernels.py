"""Benchmark fluxcore.kernels at FLUX shapes against every available provider.

Attention (B=1, H=24, D=128, L in 1024+512, 4096+512, 16384+512 by default): triton, SDPA flash /
cuDNN / efficient, and eager (float32 scores), all on q, k already rotated (RoPE belongs to the
blocks' QK-norm step). Reports median ms, TFLOP/s (4·B·H·L²·D per call) and the speed ratio to the
best SDPA kernel. SDPA is timed alone, [B, H, L, D] out: the layout change to [B, L, H·D] that the
model also needs is not charged to it.

Fused norm/modulation kernels (B=1, L=4608, C=3072, MLP 12288): triton, eager (the PyTorch
reference) and torch.compile of the reference. Reports median ms, effective GB/s (bytes each op
must read and write once) and the speed ratio to eager.

GGUF dequantization (a FLUX MLP weight, 3072 x 12288, in Q4_K and Q8_0 by default): the Triton
kernel against fluxcore's PyTorch decoder (eager) and torch.compile of it; GB/s counts the packed
bytes read and the output written once. The kernel is bit-exact, so max_err_vs_eager must be 0.

    python benchmarks/kernels.py                      # GPU, full FLUX shapes, bf16
    python benchmarks/kernels.py --device cpu --dtype fp32 --lengths 77 --heads 2 --hidden 64 \\
        --norm-length 77 --warmup 1 --iters 2 --providers triton sdpa-flash eager \\
        --dequant-shape 16 512                                                  # CPU smoke test

Prints tables and writes benchmarks/results/kernels-<device>.json. A provider that fails is
recorded with its error and the run goes on.
"""

from __future__ import annotations

import argparse
import os

import torch
from common import DTYPES, environment, print_table, short_error, time_ms, write_json

ATTENTION_PROVIDERS = ["triton", "sdpa-flash", "sdpa-cudnn", "sdpa-efficient", "eager"]
NORM_PROVIDERS = ["triton", "eager", "compile"]


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--heads", type=int, default=24)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--lengths", type=int, nargs="+", default=[1024 + 512, 4096 + 512, 16384 + 512])
    p.add_argument("--hidden", type=int, default=3072, help="C for the norm kernels (head dim = C / heads)")
    p.add_argument("--norm-length", type=int, default=4096 + 512)
    p.add_argument("--providers", nargs="+", default=ATTENTION_PROVIDERS + ["compile"])
    p.add_argument("--skip-attention", action="store_true")
    p.add_argument("--skip-norms", action="store_true")
    p.add_argument("--dequant-shape", type=int, nargs=2, default=[3072, 12288], help="weight [out, in]")
    p.add_argument("--dequant-types", nargs="+", default=["Q4_K", "Q8_0"])
    p.add_argument("--skip-dequant", action="store_true")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--out", default=None, help="JSON path (default benchmarks/results/kernels-<device>.json)")
    return p.parse_args()


def run(fn, device, args) -> tuple[float | None, str | None]:
    try:
        return time_ms(fn, device, args.warmup, args.iters), None
    except Exception as e:  # any provider may be missing on this machine: record and go on
        if device.type == "cuda":
            torch.cuda.empty_cache()
        return None, short_error(e)


def max_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


def attention_providers(q, k, v) -> dict:
    """name -> zero-argument callable, for q, k, v [B, H, L, D] (q, k already rotated)."""
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from fluxcore import kernels as K

    def sdpa(backend):
        def fn():
            with sdpa_kernel([backend]):
                return F.scaled_dot_product_attention(q, k, v)

        return fn

    return {
        "triton": lambda: K.flash_attention(q, k, v),
        "sdpa-flash": sdpa(SDPBackend.FLASH_ATTENTION),
        "sdpa-cudnn": sdpa(SDPBackend.CUDNN_ATTENTION),
        "sdpa-efficient": sdpa(SDPBackend.EFFICIENT_ATTENTION),
        "eager": lambda: K.flash_attention_reference(q, k, v),
    }


def bench_attention(args, device, dtype) -> list[dict]:
    from einops import rearrange

    rows = []
    B, H, D = args.batch, args.heads, args.head_dim
    for L in args.lengths:
        g = torch.Generator(device=device).manual_seed(0)
        q, k, v = (torch.randn(B, H, L, D, device=device, dtype=dtype, generator=g) for _ in range(3))
        flops = 4 * B * H * L * L * D
        fns = attention_providers(q, k, v)
        reference, these = None, []
        for name in [p for p in ATTENTION_PROVIDERS if p in args.providers]:
            ms, error = run(fns[name], device, args)
            row = dict(op="attention", shape=f"{B}x{H}x{L}x{D}", provider=name, ms=ms, error=error)
            if ms is not None:
                row["tflops"] = flops / (ms * 1e-3) / 1e12
            if ms is not None:
                out = fns[name]()
                if name.startswith("sdpa"):
                    out = rearrange(out, "b h l d -> b l (h d)")
                reference = out if reference is None else reference
                row["max_err_vs_first"] = max_error(out, reference)
                del out
            these.append(row)
        sdpa_ms = [r["ms"] for r in these if r["provider"].startswith("sdpa") and r["ms"]]
        for r in these:
            if sdpa_ms and r["ms"]:
                r["vs_best_sdpa"] = min(sdpa_ms) / r["ms"]  # > 1: faster than the best SDPA kernel
        rows += these
    return rows


def bench_norms(args, device, dtype) -> list[dict]:
    from einops import rearrange

    from fluxcore import kernels as K
    from fluxcore.math import embed_positions

    B, L, C, H = args.batch, args.norm_length, args.hidden, args.heads
    M, Dh, s = 4 * C, C // H, torch.tensor([], dtype=dtype).element_size()
    g = torch.Generator(device=device).manual_seed(0)

    def randn(*shape):
        return torch.randn(*shape, device=device, dtype=dtype, generator=g)

    x, y = randn(B, L, C), randn(B, L, C)
    shift, scale, gate = (0.5 * randn(B, 1, 3 * C)).chunk(3, dim=-1)
    q, k, _ = rearrange(randn(B, L, 3 * C), "B L (K H D) -> K B H L D", K=3, H=H)
    qs, ks = 1 + 0.1 * randn(Dh), 1 + 0.1 * randn(Dh)
    ids = torch.stack([torch.zeros(L), torch.arange(L) // 64, torch.arange(L) % 64], -1).float()
    axes = (Dh // 8, (Dh - Dh // 8) // 2, Dh - Dh // 8 - (Dh - Dh // 8) // 2)
    pe = embed_positions(ids[None].expand(B, -1, -1).to(device), axes, 10_000)
    attn_out, mlp = randn(B, L, C), randn(B, L, M)
    ops = {  # name: (kernel, reference, inputs, bytes read + written once)
        "adaln_modulate": (
            K.adaln_modulate,
            K.adaln_modulate_reference,
            (x, shift, scale),
            2 * B * L * C * s,
        ),
        "gated_residual": (K.gated_residual, K.gated_residual_reference, (x, gate, y), 3 * B * L * C * s),
        "gelu_concat": (K.gelu_concat, K.gelu_concat_reference, (attn_out, mlp), 2 * B * L * (C + M) * s),
        "qk_norm_rope": (
            K.qk_norm_rope,
            K.qk_norm_rope_reference,
            (q, k, pe, qs, ks),
            4 * B * L * C * s + B * L * Dh * 8,  # q, k in and out; pe [L, Dh/2, 2, 2] float32 once
        ),
    }
    rows = []
    for op, (kernel, reference, inputs, nbytes) in ops.items():
        fns = {"triton": kernel, "eager": reference}
        if "compile" in args.providers:
            fns["compile"] = torch.compile(reference, dynamic=False)
        eager_ms, these = None, []
        for name in [p for p in NORM_PROVIDERS if p in fns and p in args.providers]:
            ms, error = run(lambda f=fns[name], a=inputs: f(*a), device, args)
            row = dict(op=op, shape=f"{B}x{L}x{C}", provider=name, ms=ms, error=error)
            if ms is not None:
                row["gbps"] = nbytes / (ms * 1e-3) / 1e9
                eager_ms = ms if name == "eager" else eager_ms
                if name != "eager":
                    out, ref = fns[name](*inputs), reference(*inputs)
                    pairs = zip(out, ref) if isinstance(out, tuple) else [(out, ref)]
                    row["max_err_vs_eager"] = max(max_error(a, b) for a, b in pairs)
            these.append(row)
        for r in these:
            if eager_ms and r["ms"]:
                r["vs_eager"] = eager_ms / r["ms"]
        rows += these
    return rows


# byte offsets of each block's fp16 scales, made finite in the random blocks
F16_FIELDS = {"Q8_0": [0], "Q4_0": [0], "Q4_1": [0, 2], "Q5_0": [0], "Q5_1": [0, 2], "Q2_K": [80, 82],
              "Q3_K": [108], "Q4_K": [0, 2], "Q5_K": [0, 2], "Q6_K": [208]}  # fmt: skip


def bench_dequant(args, device, dtype) -> list[dict]:
    from fluxcore.kernels import dequant as DQ

    from fluxcore.quant.gguf import dequantize_torch

    out_f, in_f = args.dequant_shape
    rows = []
    for qtype in args.dequant_types:
        _, elements, size = DQ.TYPES[qtype]
        n = out_f * in_f // elements
        g = torch.Generator(device=device).manual_seed(0)
        raw = torch.randint(0, 256, (n, size), dtype=torch.uint8, device=device, generator=g)
        for o in F16_FIELDS[qtype]:
            scales = (torch.randn(n, device=device, generator=g) * 0.01).half()
            raw[:, o : o + 2] = scales.view(torch.uint8).reshape(n, 2)

        def eager(raw=raw, qtype=qtype):
            return dequantize_torch(raw, qtype, (out_f, in_f), dtype)

        fns = {"triton": lambda raw=raw, qtype=qtype: DQ.dequantize_gguf(raw, qtype, dtype), "eager": eager}
        if "compile" in args.providers:
            fns["compile"] = torch.compile(eager, dynamic=False)
        nbytes = raw.numel() + out_f * in_f * torch.tensor([], dtype=dtype).element_size()
        eager_ms, these = None, []
        for name, fn in fns.items():
            ms, error = run(fn, device, args)
            row = dict(op=f"dequant {qtype}", shape=f"{out_f}x{in_f}", provider=name, ms=ms, error=error)
            if ms is not None:
                row["gbps"] = nbytes / (ms * 1e-3) / 1e9
                eager_ms = ms if name == "eager" else eager_ms
                if name != "eager":
                    row["max_err_vs_eager"] = max_error(fn().reshape(out_f, in_f), eager())
            these.append(row)
        for r in these:
            if eager_ms and r["ms"]:
                r["vs_eager"] = eager_ms / r["ms"]
        rows += these
    return rows


def main() -> None:
    args = parse_args()
    device = torch.device(args.device)
    if device.type == "cpu":  # the kernels can only run in Triton's interpreter there
        os.environ.setdefault("TRITON_INTERPRET", "1")
    dtype = DTYPES[args.dtype]
    env = environment(device)
    print(f"{env['device']} · torch {env['torch']} · triton {env['triton']} · commit {env['git_commit']}")
    rows = []
    with torch.no_grad():
        if not args.skip_attention:
            attention_rows = bench_attention(args, device, dtype)
            cols = ["shape", "provider", "ms", "tflops", "vs_best_sdpa", "max_err_vs_first", "error"]
            print(f"\nattention, {args.dtype}, non-causal (TFLOP/s = 4·B·H·L²·D / time)")
            print_table(attention_rows, cols)
            rows += attention_rows
        if not args.skip_norms:
            norm_rows = bench_norms(args, device, dtype)
            print(f"\nfused norm / modulation kernels, {args.dtype} (GB/s: each tensor read or written once)")
            print_table(
                norm_rows, ["op", "shape", "provider", "ms", "gbps", "vs_eager", "max_err_vs_eager", "error"]
            )
            rows += norm_rows
        if not args.skip_dequant:
            dequant_rows = bench_dequant(args, device, dtype)
            print(f"\nGGUF dequantization to {args.dtype} (GB/s: packed bytes read + output written once)")
            cols = ["op", "shape", "provider", "ms", "gbps", "vs_eager", "max_err_vs_eager", "error"]
            print_table(dequant_rows, cols)
            rows += dequant_rows
    path = write_json("kernels", env, vars(args), rows, args.out)
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
