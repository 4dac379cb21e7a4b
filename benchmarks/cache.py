"""Step caches: quality against the uncached image and trunk evaluations saved (CPU is enough).

For each cache kind at three settings, 28 Euler steps, compared with the uncached run on the same
seeds:
  - the shipped tiny model (fluxcore/assets/flux-tiny, 64×64): the held-out prompts (each held-out
    colour/shape/position combination on two backgrounds, as tests/test_tiny_model.py), PSNR and
    SSIM of the final images, and the share of images whose colour and position
    `fluxcore.toydata.classify` reads as requested;
  - a mid-size random transformer (hidden 384, 6 heads, 4 double + 8 single blocks, 256×256, 64
    text tokens; its latents decoded by the tiny model's autoencoder): PSNR and SSIM.
Plus full trunk evaluations per image (of 28), the share skipped, and the wall-clock ratio to the
uncached run (cpu_time; only meaningful on an idle machine: a skipped step still runs the
embedders, block 0 for first_block and the final layer).

    python benchmarks/cache.py                 # the table in docs/speed.md
    python benchmarks/cache.py --smoke         # 4 steps, 2 prompts, one setting per kind

Prints tables and writes benchmarks/results/cache-<device>.json.
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from common import environment, print_table, write_json

import fluxcore
import fluxcore.cache
from fluxcore.toydata import COLORS, HELD_OUT, ShapeSpec, caption, classify

TINY = Path(fluxcore.__file__).parent / "assets" / "flux-tiny"
SETTINGS = {
    "first_block": [{"threshold": t} for t in (0.05, 0.08, 0.12)],
    "teacache": [{"threshold": t} for t in (0.25, 0.4, 0.6)],
    "taylorseer": [{"interval": n} for n in (2, 3, 5)],
}


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """Peak signal-to-noise ratio in dB of images in [0, 1] (mean over the batch)."""
    mse = ((a.float() - b.float()) ** 2).flatten(1).mean(1).clamp_min(1e-12)
    return float((10 * torch.log10(1 / mse)).mean())


def ssim(a: torch.Tensor, b: torch.Tensor, window: int = 11, sigma: float = 1.5) -> float:
    """Structural similarity of images [N, C, H, W] in [0, 1]: Gaussian-weighted local means,
    variances and covariance per channel (window 11, σ 1.5, K1 0.01, K2 0.03, valid region only),
    averaged over pixels, channels and images."""
    a, b = a.double(), b.double()
    c = a.shape[1]
    x = torch.arange(window, dtype=torch.float64) - (window - 1) / 2
    g = torch.exp(-(x**2) / (2 * sigma**2))
    g = g / g.sum()
    kernel = (g[:, None] * g[None, :]).expand(c, 1, window, window)

    def blur(t):
        return F.conv2d(t, kernel, groups=c)

    mu_a, mu_b = blur(a), blur(b)
    var_a = blur(a * a) - mu_a**2
    var_b = blur(b * b) - mu_b**2
    cov = blur(a * b) - mu_a * mu_b
    c1, c2 = 0.01**2, 0.03**2
    s = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2))
    return float(s.mean())


def held_out_cases(limit: int | None = None) -> list[tuple[ShapeSpec, str]]:
    names = list(COLORS)
    cases = []
    for k, (color, shape, position) in enumerate(HELD_OUT):
        for j in (1, 4):
            bg = names[(names.index(color) + j + k) % len(names)]
            if bg == color:
                bg = names[(names.index(bg) + 1) % len(names)]
            spec = ShapeSpec(color, shape, position, bg)
            cases.append((spec, caption(spec)))
    return cases[:limit]


def accuracy(images: torch.Tensor, cases) -> tuple[float, float]:
    """Shares of images (in [0, 1]) whose colour and position are both read as requested, and
    whose shape is."""
    hits = shapes = 0
    for (spec, _), image in zip(cases, images):
        got = classify(image * 2 - 1)
        hits += got.color == spec.color and got.position == spec.position
        shapes += got.shape == spec.shape
    return hits / len(cases), shapes / len(cases)


def run_tiny(pipe, cases, steps: int, setting: tuple[str, dict] | None) -> tuple[torch.Tensor, dict, float]:
    handle = fluxcore.cache.apply(pipe.transformer, setting[0], **setting[1]) if setting else None
    try:
        t0 = time.perf_counter()
        out = pipe(
            [c for _, c in cases], height=64, width=64, num_inference_steps=steps,
            generator=list(range(len(cases))), output_type="pt", progress=False,
        )  # fmt: skip
        seconds = time.perf_counter() - t0
    finally:
        if handle:
            handle.remove()
    stats = handle.stats if handle else fluxcore.cache.CacheStats(full=steps * len(cases))
    return out.images, {"full": stats.full, "skipped": stats.skipped}, seconds


def mid_model(seed: int = 0) -> fluxcore.Flux:
    cfg = fluxcore.PRESETS["tiny-dev"].replace(
        hidden_size=384, num_heads=6, depth=4, depth_single_blocks=8, axes_dim=(16, 24, 24),
        context_in_dim=256, vec_in_dim=128,
    )  # fmt: skip
    torch.manual_seed(seed)
    return fluxcore.Flux(cfg).eval()


def run_mid(model, ae, steps: int, setting, n_images: int = 2, size: int = 256):
    from fluxcore.latents import get_noise, make_img_ids, make_txt_ids, pack, unpack
    from fluxcore.sampling import FlowDenoiser, get_schedule, sample_euler

    g = torch.Generator().manual_seed(1)
    cfg = model.config
    txt = torch.randn(n_images, 64, cfg.context_in_dim, generator=g)
    y = torch.randn(n_images, cfg.vec_in_dim, generator=g)
    noise = torch.cat(
        [get_noise(1, size, size, device="cpu", dtype=torch.float32, seed=s) for s in range(n_images)]
    )
    x = pack(noise)
    extra = {
        "img_ids": make_img_ids(n_images, size, size),
        "txt": txt,
        "txt_ids": make_txt_ids(n_images, txt.shape[1]),
        "y": y,
        "guidance": 3.5,
    }
    sigmas = get_schedule(steps, x.shape[1])
    handle = fluxcore.cache.apply(model, setting[0], **setting[1]) if setting else None
    try:
        t0 = time.perf_counter()
        with torch.no_grad():
            x = sample_euler(FlowDenoiser(model), x, sigmas, extra_args=extra, disable=True)
        seconds = time.perf_counter() - t0
    finally:
        if handle:
            handle.remove()
    with torch.no_grad():
        images = (ae.decode(unpack(x, size, size)).clamp(-1, 1) + 1) / 2
    stats = handle.stats if handle else fluxcore.cache.CacheStats(full=steps)
    return images, {"full": stats.full, "skipped": stats.skipped}, seconds


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=28)
    p.add_argument("--smoke", action="store_true", help="4 steps, 2 prompts, one setting per kind")
    p.add_argument("--skip-mid", action="store_true")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    torch.set_num_threads(min(2, torch.get_num_threads()))
    steps = 4 if args.smoke else args.steps
    settings = [
        (k, opts) for k, all_opts in SETTINGS.items() for opts in (all_opts[:1] if args.smoke else all_opts)
    ]

    pipe = fluxcore.FluxPipeline.from_pretrained(TINY)
    cases = held_out_cases(2 if args.smoke else None)
    rows = []
    run_tiny(pipe, cases[:2], 2, None)  # warm-up, so the reference's time is not the first call's
    ref, _, ref_s = run_tiny(pipe, cases, steps, None)
    acc, shape_acc = accuracy(ref, cases)
    rows.append({"model": "tiny", "cache": "none", "full": steps, "skipped": 0.0, "psnr": math.inf, "ssim": 1.0,
                 "color+position": acc, "shape": shape_acc, "cpu_time": 1.0})  # fmt: skip
    for kind, opts in settings:
        images, stats, s = run_tiny(pipe, cases, steps, (kind, opts))
        acc, shape_acc = accuracy(images, cases)
        rows.append({
            "model": "tiny", "cache": f"{kind} {opts}", "full": steps * stats["full"] / (stats["full"] + stats["skipped"]),
            "skipped": stats["skipped"] / (stats["full"] + stats["skipped"]),
            "psnr": psnr(images, ref), "ssim": ssim(images, ref), "color+position": acc, "shape": shape_acc,
            "cpu_time": s / ref_s,
        })  # fmt: skip
        print(rows[-1], flush=True)
    if not args.skip_mid:
        model = mid_model()
        size = 64 if args.smoke else 256
        ref, _, ref_s = run_mid(model, pipe.ae, steps, None, size=size)
        rows.append({"model": "mid", "cache": "none", "full": steps, "skipped": 0.0, "psnr": math.inf, "ssim": 1.0,
                     "cpu_time": 1.0})  # fmt: skip
        for kind, opts in settings:
            images, stats, s = run_mid(model, pipe.ae, steps, (kind, opts), size=size)
            rows.append({
                "model": "mid", "cache": f"{kind} {opts}", "full": stats["full"],
                "skipped": stats["skipped"] / (stats["full"] + stats["skipped"]),
                "psnr": psnr(images, ref), "ssim": ssim(images, ref), "cpu_time": s / ref_s,
            })  # fmt: skip
            print(rows[-1], flush=True)
    print_table(
        rows, ["model", "cache", "full", "skipped", "psnr", "ssim", "color+position", "shape", "cpu_time"]
    )
    config = {"steps": steps, "prompts": len(cases), "settings": SETTINGS, "smoke": args.smoke}
    path = write_json("cache", environment(torch.device("cpu")), config, rows, args.out)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
