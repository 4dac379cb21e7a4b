"""Cold-start cost of compiling: regional (`fluxcore.compile_blocks`) against the whole model.

Each measurement runs in a fresh Python process with its own, initially empty Inductor cache
directory, so nothing carries over except what the row says:

    eager            first and steady forward without compiling
    regional-cold    compile_blocks, empty caches: first forward (compile), steady forward, and the
                     first forward at another image size and prompt length (must not recompile)
    whole-cold       torch.compile(model, fullgraph=True, dynamic=True), empty caches
    regional-disk    compile_blocks again with the Inductor cache directory regional-cold filled
    regional-mega    compile_blocks with an empty directory but the artifacts regional-cold saved
                     with torch.compiler.save_cache_artifacts() loaded first ("Mega-Cache")

    python benchmarks/compile.py                          # CPU, inductor, tiny-dev and a 4+8-block model
    python benchmarks/compile.py --device cuda --dtype bf16 --presets flux-dev --size 1024 --txt-len 512

Prints a table and writes benchmarks/results/compile-<device>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from common import DTYPES, environment, print_table, write_json

HERE = Path(__file__).resolve().parent


def build(preset: str, device: str, dtype: torch.dtype):
    import fluxcore

    if preset == "deep-tiny":  # tiny widths, 4 + 8 blocks: shows how whole-model compile grows with depth
        cfg = fluxcore.PRESETS["tiny-dev"].replace(depth=4, depth_single_blocks=8)
    else:
        cfg = fluxcore.PRESETS[preset]
    torch.manual_seed(0)
    with torch.device("meta" if cfg.hidden_size > 1024 else "cpu"):
        model = fluxcore.Flux(cfg)
    if cfg.hidden_size > 1024:
        model = model.to_empty(device=device)
        for p in model.parameters():
            torch.nn.init.normal_(p, std=0.02)
    return model.to(device=device, dtype=dtype).eval()


def inputs(model, size: int, txt_len: int):
    from fluxcore.latents import make_img_ids, make_txt_ids

    cfg, dev = model.config, model.device
    L = (size // 16) ** 2
    return (
        torch.randn(1, L, cfg.in_channels, device=dev),
        make_img_ids(1, size, size, device=dev),
        torch.randn(1, txt_len, cfg.context_in_dim, device=dev),
        make_txt_ids(1, txt_len, device=dev),
        torch.full((1,), 0.5, device=dev),
        torch.randn(1, cfg.vec_in_dim, device=dev),
        torch.full((1,), 3.5, device=dev),
    )


def timed(fn, device: str) -> float:
    if device == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def child(args) -> dict:
    """One measurement in this (fresh) process; prints a JSON line."""
    import fluxcore

    model = build(args.preset, args.device, DTYPES[args.dtype])
    a = inputs(model, args.size, args.txt_len)
    b = inputs(model, args.size + 32, args.txt_len + 5)
    mode = args.child
    if mode == "regional-mega":
        torch.compiler.load_cache_artifacts(Path(args.artifacts).read_bytes())
    if mode.startswith("regional"):
        fluxcore.compile_blocks(model, backend=args.backend)
    elif mode == "whole-cold":
        model = torch.compile(model, backend=args.backend, fullgraph=True, dynamic=True)
    from torch._dynamo.utils import counters

    out = {}
    with torch.no_grad():
        out["first_s"] = timed(lambda: model(*a), args.device)
        out["steady_s"] = min(timed(lambda: model(*a), args.device) for _ in range(3))
        graphs = counters["stats"]["unique_graphs"]
        out["new_shape_first_s"] = timed(lambda: model(*b), args.device)
        out["graphs"] = graphs
        out["recompiles_on_new_shape"] = counters["stats"]["unique_graphs"] - graphs
    if mode == "regional-cold" and args.artifacts:
        saved = torch.compiler.save_cache_artifacts()
        if saved is not None:
            Path(args.artifacts).write_bytes(saved[0])
    print("RESULT " + json.dumps(out))
    return out


def run_child(args, mode: str, cache_dir: str, artifacts: str | None) -> dict:
    env = {
        **os.environ,
        "TORCHINDUCTOR_CACHE_DIR": cache_dir,
        "TRITON_CACHE_DIR": os.path.join(cache_dir, "triton"),
    }
    cmd = [
        sys.executable, str(Path(__file__).resolve()), "--child", mode, "--preset", args.preset,
        "--device", args.device, "--dtype", args.dtype, "--size", str(args.size), "--txt-len", str(args.txt_len),
        "--backend", args.backend, "--artifacts", artifacts or "",
    ]  # fmt: skip
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=HERE)
    wall = time.perf_counter() - t0
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        return {"error": (proc.stderr.strip().splitlines() or ["?"])[-1][:200], "process_s": wall}
    return {**json.loads(lines[-1][7:]), "process_s": wall}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--presets", nargs="+", default=["tiny-dev", "deep-tiny"])
    p.add_argument("--preset", default="tiny-dev", help=argparse.SUPPRESS)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--txt-len", type=int, default=32)
    p.add_argument("--backend", default="inductor")
    p.add_argument(
        "--modes",
        nargs="+",
        default=["eager", "regional-cold", "whole-cold", "regional-disk", "regional-mega"],
    )
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--artifacts", default="", help=argparse.SUPPRESS)
    p.add_argument("--out", default=None)
    args = p.parse_args()
    if args.child:
        torch.set_num_threads(min(2, torch.get_num_threads()))
        child(args)
        return

    rows = []
    for preset in args.presets:
        args.preset = preset
        with tempfile.TemporaryDirectory() as tmp:
            filled, artifacts = os.path.join(tmp, "filled"), os.path.join(tmp, "mega.bin")
            for mode in args.modes:
                cache_dir = (
                    filled if mode in ("regional-cold", "regional-disk") else tempfile.mkdtemp(dir=tmp)
                )
                row = {"preset": preset, "mode": mode, **run_child(args, mode, cache_dir, artifacts)}
                rows.append(row)
                print(row, flush=True)
    print_table(
        rows,
        [
            "preset",
            "mode",
            "first_s",
            "steady_s",
            "new_shape_first_s",
            "graphs",
            "recompiles_on_new_shape",
            "error",
        ],
    )
    config = {
        "presets": args.presets, "device": args.device, "dtype": args.dtype, "size": args.size,
        "txt_len": args.txt_len, "backend": args.backend,
    }  # fmt: skip
    path = write_json("compile", environment(torch.device(args.device)), config, rows, args.out)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
