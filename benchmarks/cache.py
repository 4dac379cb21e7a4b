"""Step caches: quality against the uncached image and trunk evaluations saved (CPU is enough).

For each cache kind at three settings, 28 Euler steps, compared with the uncached run on the same
seeds:
  - the shipped tiny model (fluxcore/assets/flux-tiny, 64×64): the held-out prompts (each held-out
    colour/shape/position combination on two backgrounds, as tests/test_tiny_model.py), PSNR and
    SSIM of the final images, the share of images whose colour and position
    `fluxcore.toydata.classify` reads as requested, and the share whose shape it reads as requested;
  - the mid-size random transformer of benchmarks/common.py (hidden 512, 8 heads, 4 double + 8
    single blocks) inside a pipeline with the tiny model's text encoders and autoencoder, 256×256,
    one image per prompt of common.PROMPTS[:3] (the images benchmarks/cpu_ratios.py times): PSNR
    and SSIM.
Plus full trunk evaluations per image (of 28) and the share skipped. Wall-clock ratios are measured
by benchmarks/cpu_ratios.py (interleaved repeats).

    python benchmarks/cache.py                 # the quality table in docs/speed.md
    python benchmarks/cache.py --smoke         # 4 steps, 2 prompts, one setting per kind, small mid model

Prints tables (also as Markdown) and writes benchmarks/results/cache-<device>.json.
"""

from __future__ import annotations

import argparse

import torch
from common import (
    CACHE_SETTINGS,
    PROMPTS,
    TINY,
    cache_label,
    cache_settings,
    environment,
    fmt_psnr,
    loadavg,
    markdown_table,
    mid_pipeline,
    print_table,
    psnr,
    ssim,
    write_json,
)  # fmt: skip

import fluxcore
from fluxcore.toydata import ShapeSpec, classify, held_out_prompts


def held_out_cases(limit: int | None = None) -> list[tuple[ShapeSpec, str]]:
    return held_out_prompts()[:limit]


def accuracy(images: torch.Tensor, cases) -> tuple[float, float]:
    """Shares of images (in [0, 1]) whose colour and position are both read as requested, and
    whose shape is."""
    hits = shapes = 0
    for (spec, _), image in zip(cases, images):
        got = classify(image * 2 - 1)
        hits += got.color == spec.color and got.position == spec.position
        shapes += got.shape == spec.shape
    return hits / len(cases), shapes / len(cases)


def generate(pipe, prompts, steps: int, size: int, setting, seeds) -> tuple[torch.Tensor, int]:
    """Images [N, 3, size, size] in [0, 1] (one batched call) and the call's full trunk
    evaluations (of `steps`; a cache decides per call, for the whole batch)."""
    out = pipe(
        prompts, height=size, width=size, num_inference_steps=steps, generator=list(seeds),
        output_type="pt", progress=False, cache=setting,
    )  # fmt: skip
    return out.images, out.info["cache"]["full"] if setting else steps


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=28)
    p.add_argument("--smoke", action="store_true", help="4 steps, 2 prompts, one setting per kind")
    p.add_argument("--skip-mid", action="store_true")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    steps = 4 if args.smoke else args.steps
    settings = cache_settings(first_only=args.smoke)
    load_start = loadavg()

    pipe = fluxcore.FluxPipeline.from_pretrained(TINY)
    cases = held_out_cases(2 if args.smoke else None)
    prompts, seeds = [c for _, c in cases], range(len(cases))
    rows = []
    with torch.no_grad():
        ref, _ = generate(pipe, prompts, steps, 64, None, seeds)
        for kind, opts in [("none", {}), *settings]:
            setting = None if kind == "none" else (kind, opts)
            images, full = (
                (ref, steps) if setting is None else generate(pipe, prompts, steps, 64, setting, seeds)
            )
            acc, shape_acc = accuracy(images, cases)
            rows.append({
                "model": "tiny", "cache": cache_label(kind, opts), "full": full, "skipped": 1 - full / steps,
                "psnr": psnr(images, ref), "ssim": ssim(images, ref),
                "color+position": acc, "shape": shape_acc,
            })  # fmt: skip
            print(rows[-1], flush=True)
        if not args.skip_mid:
            mid = mid_pipeline(pipe, smoke=args.smoke)
            size = 64 if args.smoke else 256
            mid_prompts = PROMPTS[:3]
            refs = [generate(mid, [q], steps, size, None, [i])[0] for i, q in enumerate(mid_prompts)]
            ref = torch.cat(refs)
            for kind, opts in [("none", {}), *settings]:
                setting = None if kind == "none" else (kind, opts)
                outs = [generate(mid, [q], steps, size, setting, [i]) for i, q in enumerate(mid_prompts)]
                images, full = torch.cat([o[0] for o in outs]), sum(o[1] for o in outs)
                rows.append({
                    "model": "mid", "cache": cache_label(kind, opts), "full": full / len(mid_prompts),
                    "skipped": 1 - full / (steps * len(mid_prompts)), "psnr": psnr(images, ref),
                    "ssim": ssim(images, ref),
                })  # fmt: skip
                print(rows[-1], flush=True)
    print_table(rows, ["model", "cache", "full", "skipped", "psnr", "ssim", "color+position", "shape"])
    print()
    print(markdown(rows, steps))
    config = {
        "steps": steps, "prompts": len(cases), "mid_prompts": None if args.skip_mid else PROMPTS[:3],
        "settings": CACHE_SETTINGS, "smoke": args.smoke, "threads": args.threads,
        "loadavg_start": load_start, "loadavg_end": loadavg(),
    }  # fmt: skip
    path = write_json("cache", environment(torch.device("cpu")), config, rows, args.out)
    print(f"wrote {path}")


def markdown(rows: list[dict], steps: int) -> str:
    """The docs/speed.md table: one line per setting, tiny and mid side by side."""
    table = {}
    for r in rows:
        line = table.setdefault(r["cache"], {"cache": r["cache"]})
        m = r["model"]
        line[f"{m}_full"] = f"{r['full']:.3g}"
        line[f"{m}_psnr"], line[f"{m}_ssim"] = fmt_psnr(r["psnr"]), f"{r['ssim']:.4f}"
        if m == "tiny":
            line["cp"], line["shape"] = f"{r['color+position']:.2f}", f"{r['shape']:.2f}"
    columns = [
        ("cache", "cache"), ("tiny_full", "tiny: full"), ("tiny_psnr", "tiny: PSNR"), ("tiny_ssim", "tiny: SSIM"),
        ("cp", "tiny: colour+position"), ("shape", "tiny: shape"), ("mid_full", "mid: full"),
        ("mid_psnr", "mid: PSNR"), ("mid_ssim", "mid: SSIM"),
    ]  # fmt: skip
    return markdown_table(list(table.values()), columns)


if __name__ == "__main__":
    main()
