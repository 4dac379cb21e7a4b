"""Load speed and peak host memory of `fluxcore.load_flux` on a synthetic checkpoint of ≥ 1 GB.

Targets: ≥ 1 GB/s from a warm page cache, and peak host memory
≤ 1.25 × the bf16 size of the weights + 300 MB. Each case runs in a fresh Python process (so the
peak is that load's alone: VmHWM of the process, which includes the ~220 MB of Python + torch);
the page cache is warmed by reading the files once first. Cases:

  bfl          BFL single file, bf16 → bf16 model
  diffusers    diffusers folder (3 shards + index), bf16 → bf16 (q/k/v, linear1 re-fused on the fly)
  fp8          BFL file in float8 e4m3fn → bf16 model (upcast as it loads)
  peer         safetensors.torch.load_file + Flux on meta + load_state_dict(assign=True), the usual
               way: zero-copy views of a file mapping, so its bytes are read on first use; compare
               `ready_s` (load, then one read of every 4 KB page of the weights), not `seconds`
  floor        no file at all: allocate the model's tensors and write every byte once, the least any
               loader that gives the model memory of its own can cost on this machine
  info         fluxcore.info on the bf16 file, and on a sparse full-size (23.8 GB) flux-dev header

    python benchmarks/load.py                       # ~1.2 GB, 3 runs per case, CPU
    python benchmarks/load.py --size-gb 2 --repeat 5 --device cuda

GB/s is the loaded model's bytes (bf16) over the wall time of load_flux (inspect + build on meta +
read + assign); x_floor is that time over the `floor` case's. Prints a table and writes
benchmarks/results/load_<device>.json.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import torch
from common import RESULTS, environment, print_table

from fluxcore import PRESETS, Flux, FluxConfig, info, save_flux
from fluxcore.atomic import atomic_write_text
from fluxcore.weights import load_into, write_safetensors

CHILD = textwrap.dedent(
    """
    import json, sys, time
    import torch
    import fluxcore

    def high_water():
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))

    def touch(model):
        # One element per 4 KB page of every weight: makes lazily mapped weights resident too.
        return sum(float(p.detach().view(-1)[:: 4096 // p.element_size()].float().sum()) for p in model.parameters())

    case, path, device = sys.argv[1], sys.argv[2], sys.argv[3]
    if case == "floor":
        fc = fluxcore.weights.inspect_flux(path)
        fc.checkpoint.close()
        with torch.device("meta"):
            shapes = [p.shape for p in fluxcore.Flux(fc.config).parameters()]
    base = high_water()
    t = time.perf_counter()
    if case == "floor":
        # What any loader that gives the model memory of its own must pay at least: first touch
        # (a write) of every byte of fresh memory. No file, no parsing.
        kept = [torch.empty(s, dtype=torch.bfloat16).fill_(0.5) for s in shapes]
        model = torch.nn.ParameterList(kept)
    elif case == "peer":
        from safetensors.torch import load_file
        fc = fluxcore.weights.inspect_flux(path)
        fc.checkpoint.close()
        sd = load_file(path, device=device)
        with torch.device("meta"):
            model = fluxcore.Flux(fc.config)
        model.load_state_dict(sd, assign=True)
    else:
        model = fluxcore.load_flux(path, device=device, dtype=torch.bfloat16)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t
    touch(model)
    ready = time.perf_counter() - t
    nbytes = sum(p.numel() * p.element_size() for p in model.parameters())
    print(json.dumps(dict(base=base, peak=high_water(), seconds=seconds, ready=ready, nbytes=nbytes)))
    """
)


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size-gb", type=float, default=1.2, help="bf16 size of the synthetic model")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--device", default="cpu")
    p.add_argument("--cases", nargs="+", default=["floor", "bfl", "diffusers", "fp8", "peer", "info"])
    p.add_argument(
        "--dir", default=None, help="where to write the checkpoints (default: a temp dir, removed)"
    )
    p.add_argument("--out", default=None)
    return p.parse_args()


def synthetic_config(size_gb: float) -> FluxConfig:
    """Official head dim and widths scaled down (hidden 1536), blocks added until ≥ size_gb."""
    depth = 1
    while True:
        cfg = FluxConfig(hidden_size=1536, num_heads=12, depth=depth, depth_single_blocks=2 * depth)
        with torch.device("meta"):
            n = sum(p.numel() for p in Flux(cfg).parameters())
        if 2 * n >= size_gb * 1e9:
            return cfg
        depth += 1


def make_checkpoints(cfg: FluxConfig, root: Path) -> dict[str, Path]:
    with torch.device("meta"):
        model = Flux(cfg)
    # Values do not change the work of loading; a constant is far cheaper to make than noise.
    sd = {k: torch.full(v.shape, 0.01, dtype=torch.bfloat16) for k, v in model.state_dict().items()}
    paths = {
        "bfl": root / "flux.safetensors",
        "fp8": root / "flux-fp8.safetensors",
        "diffusers": root / "transformer",
    }
    write_safetensors(paths["bfl"], sd)
    write_safetensors(
        paths["fp8"], {k: v.to(torch.float8_e4m3fn) if v.ndim == 2 else v for k, v in sd.items()}
    )
    model = load_into(model, sd, source="synthetic", copy=False)
    total = sum(t.numel() * 2 for t in sd.values())
    save_flux(model, paths["diffusers"], "diffusers", max_shard_size=math.ceil(total / 3) + 1)
    paths["peer"] = paths["floor"] = paths["bfl"]
    return paths


def warm(path: Path) -> None:
    files = [path] if path.is_file() else sorted(path.glob("*.safetensors"))
    for f in files:
        with open(f, "rb", buffering=0) as fh:
            while fh.read(64 << 20):
                pass


def sparse_flux_dev(path: Path) -> Path:
    """The real header of a flux-dev bf16 file over a hole of 23.8 GB (no disk, no memory)."""
    with torch.device("meta"):
        shapes = {k: list(v.shape) for k, v in Flux(PRESETS["flux-dev"]).state_dict().items()}
    header, offset = {}, 0
    for k, s in shapes.items():
        n = math.prod(s) * 2
        header[k] = {"dtype": "BF16", "shape": s, "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(len(raw).to_bytes(8, "little") + raw)
        f.truncate(8 + len(raw) + offset)
    return path


def disk_bytes(path: Path) -> int:
    files = [path] if path.is_file() else list(path.glob("*.safetensors"))
    return sum(f.stat().st_size for f in files)


def main() -> None:
    args = parse_args()
    cfg = synthetic_config(args.size_gb)
    root = Path(args.dir or tempfile.mkdtemp(prefix="fluxcore-load-"))
    root.mkdir(parents=True, exist_ok=True)
    rows = []
    try:
        t = time.perf_counter()
        paths = make_checkpoints(cfg, root)
        print(f"wrote checkpoints in {time.perf_counter() - t:.1f} s to {root}", file=sys.stderr)
        for case in [c for c in args.cases if c != "info"]:
            warm(paths[case])
            runs = []
            for _ in range(args.repeat):
                out = subprocess.run(
                    [sys.executable, "-c", CHILD, case, str(paths[case]), args.device],
                    capture_output=True,
                    text=True,
                    timeout=1800,
                )
                if out.returncode != 0:
                    raise SystemExit(f"case {case} failed:\n{out.stderr}")
                runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
            nbytes = runs[0]["nbytes"]
            seconds = statistics.median(r["seconds"] for r in runs)
            ready = statistics.median(r["ready"] for r in runs)
            peak = max(r["peak"] for r in runs)
            base = statistics.median(r["base"] for r in runs)
            bound = 1.25 * nbytes + 300e6
            rows.append(
                {
                    "case": case,
                    "file_GB": disk_bytes(paths[case]) / 1e9,
                    "model_GB": nbytes / 1e9,
                    "seconds": seconds,
                    "best_s": min(r["seconds"] for r in runs),
                    "GB/s": nbytes / seconds / 1e9,
                    "ready_s": ready,
                    "peak_GB": peak / 1e9,
                    "added_GB": (peak - base) / 1e9,
                    "bound_GB": bound / 1e9,
                    "within": "yes" if peak <= bound else "NO",
                    "runs": runs,
                }
            )
        floor = next((r["seconds"] for r in rows if r["case"] == "floor"), None)
        for r in rows:
            r["x_floor"] = r["seconds"] / floor if floor else None
        if "info" in args.cases:
            for name, path in (
                ("info", paths["bfl"]),
                ("info-24GB", sparse_flux_dev(root / "flux1-dev.safetensors")),
            ):
                times = []
                for _ in range(max(3, args.repeat)):
                    t = time.perf_counter()
                    i = info(path)
                    times.append(time.perf_counter() - t)
                rows.append(
                    {
                        "case": name,
                        "file_GB": i.nbytes / 1e9,
                        "seconds": statistics.median(times),
                        "best_s": min(times),
                    }
                )
    finally:
        if args.dir is None:
            shutil.rmtree(root, ignore_errors=True)

    env = environment(torch.device(args.device))
    env["cpu_count"] = os.cpu_count()
    env["platform"] = platform.platform()
    try:
        with open("/proc/meminfo") as f:
            env["ram_GB"] = round(int(f.readline().split()[1]) / 1e6, 1)
        env["loadavg_1min_after"] = os.getloadavg()[0]
    except OSError:
        pass
    import safetensors

    env["safetensors"] = safetensors.__version__
    print(f"{env['device']} ({env['cpu_count']} CPUs), torch {env['torch']}, commit {env['git_commit']}")
    print(
        f"config: hidden {cfg.hidden_size}, depth {cfg.depth}+{cfg.depth_single_blocks}, median of {args.repeat}"
    )
    columns = "case file_GB model_GB seconds best_s GB/s x_floor ready_s peak_GB added_GB bound_GB within"
    print_table(rows, columns.split())
    slug = "".join(ch if ch.isalnum() else "-" for ch in f"{env['device']}-{args.device}".lower()).strip("-")
    path = Path(args.out) if args.out else RESULTS / f"load_{slug}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    config = {"size_gb": args.size_gb, "repeat": args.repeat, "device": args.device, "flux_config": vars(cfg)}
    atomic_write_text(
        path,
        json.dumps({"environment": env, "config": config, "results": rows}, indent=2, default=str) + "\n",
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
