"""Peak memory and time of decoding large images with the full-size FLUX autoencoder (random
weights, float32, CPU): untiled, tiled with per-tile GroupNorm, and tiled with shared GroupNorm
statistics (the default), beside the memory plan's decode estimate.

On a CPU the decoder, the tiles and the blended output share one memory, so each number is the
whole decode's peak resident memory above the loaded model (VmHWM in a fresh process). On a GPU
the device holds one tile's activations; the tiles of the shared-statistics mode wait in host
memory between layers.

    python benchmarks/vae_memory.py                      # 1024² and 2048² (4 MP), ~15 min on 2 cores
    python benchmarks/vae_memory.py --smoke              # 128² / 256² with the tiny autoencoder
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import textwrap
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import environment, write_json  # noqa: E402

CHILD = textwrap.dedent("""
    import json, sys, time, torch
    from fluxcore import AE_PRESETS, AutoEncoder

    def status(key):
        for line in open("/proc/self/status"):
            if line.startswith(key):
                return int(line.split()[1]) * 1024

    preset, size, mode, tile = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4])
    torch.manual_seed(0)
    ae = AutoEncoder(AE_PRESETS[preset]).eval()
    with torch.no_grad():
        ae.decode(torch.randn(1, 16, 8, 8))  # one-time set-up outside the measurement
    if mode != "untiled":
        ae.enable_tiling(tile_sample_size=tile, shared_norm=mode == "tiled-shared")
    z = torch.randn(1, 16, size // 8, size // 8)
    base = status("VmRSS:")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the high-water mark to the current resident size
    t0 = time.perf_counter()
    with torch.no_grad():
        out = ae.decode(z)
    seconds = time.perf_counter() - t0
    print(json.dumps({"peak_bytes": status("VmHWM:") - base, "seconds": seconds,
                      "finite": bool(torch.isfinite(out).all()), "shape": list(out.shape)}))
""")


def measure(preset: str, size: int, mode: str, tile: int) -> dict:
    r = subprocess.run(
        [sys.executable, "-c", CHILD, preset, str(size), mode, str(tile)], capture_output=True, text=True
    )
    if r.returncode != 0:  # e.g. killed for memory: recorded, and the other cases still run
        why = r.stderr.strip().splitlines()[-1:] or [f"exit status {r.returncode} (killed: out of memory?)"]
        return {"error": why[0][:300]}
    return json.loads(r.stdout.strip().splitlines()[-1])


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="tiny autoencoder, small images")
    p.add_argument(
        "--out", default=None, help="JSON path (default benchmarks/results/vae_memory[-smoke]-<device>.json)"
    )
    args = p.parse_args(argv)
    import torch

    from fluxcore import memory

    if args.smoke:
        preset, tile, runs = "tiny", 64, [(128, "untiled"), (256, "tiled"), (256, "tiled-shared")]
    else:
        preset, tile = "flux", 512
        runs = [
            (1024, "untiled"),
            (1024, "tiled"),
            (1024, "tiled-shared"),
            (2048, "tiled"),
            (2048, "tiled-shared"),
        ]
    config = {"preset": preset, "tile_sample_size": tile, "tile_overlap": 0.25, "dtype": "float32"}
    name = "vae_memory-smoke" if args.smoke else "vae_memory"
    rows = []
    for size, mode in runs:
        m = measure(preset, size, mode, tile)
        # the plan's decode activations in float32 (the pipeline decodes in float32)
        est = memory.plan("flux-dev", "bf16", size, size, act_bytes=4, vae_tiling=mode != "untiled")
        rows.append({"preset": preset, "size": size, "mode": mode, "tile": tile, **m,
                     "plan_decode_activations": est.stages["decode"].detail["activations"]})  # fmt: skip
        r = rows[-1]
        if "error" in r:
            print(f"{size}² {mode:13s} failed: {r['error']}", flush=True)
        else:
            print(f"{size}² {mode:13s} peak {r['peak_bytes'] / 2**30:6.2f} GiB  {r['seconds']:7.1f} s  "
                  f"plan activations {r['plan_decode_activations'] / 2**30:6.2f} GiB", flush=True)  # fmt: skip
        # written after every case, so a long run keeps what it measured
        path = write_json(name, environment(torch.device("cpu")), config, rows, args.out)
    print("wrote", path)


if __name__ == "__main__":
    main()
