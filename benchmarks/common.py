"""Shared benchmark helpers: timing, environment record, table printing, JSON results."""

from __future__ import annotations

import json
import math
import os
import platform
import statistics
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from fluxcore.atomic import atomic_write_text

RESULTS = Path(__file__).resolve().parent / "results"
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def git_commit() -> str:
    """HEAD of the checkout holding this file (read-only git call), or "unknown" (e.g. no .git)."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=Path(__file__).parent,
            capture_output=True,
            text=True,
            timeout=10,
        )
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=Path(__file__).parent,
            capture_output=True,
            text=True,
            timeout=10,
        )
        if out.returncode != 0:
            return "unknown"
        return out.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def environment(device: torch.device) -> dict:
    """What a result needs to be compared with another: device, versions, commit."""
    env = {
        "device": platform.processor() or platform.machine(),
        "device_type": device.type,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "git_commit": git_commit(),
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "loadavg": loadavg(),
    }
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = None
    if device.type == "cuda":
        env["device"] = torch.cuda.get_device_name(device)
        env["capability"] = ".".join(map(str, torch.cuda.get_device_capability(device)))
    return env


def loadavg() -> list[float] | None:
    """The 1, 5 and 15 minute load averages (os.getloadavg), rounded; None where unavailable."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (AttributeError, OSError):
        return None


def time_ms(fn: Callable[[], object], device: torch.device, warmup: int = 5, iters: int = 20) -> float:
    """Median milliseconds per call: CUDA events around each call on a GPU, wall clock on CPU."""
    for _ in range(warmup):
        fn()
    times = []
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        for _ in range(iters):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize(device)
            times.append(start.elapsed_time(end))
    else:
        for _ in range(iters):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def measure_matmul_tflops(device: torch.device, dtype: torch.dtype, n: int = 8192) -> float | None:
    """Dense n³ matmul rate on this device (the compute floor's denominator); None on CPU."""
    if device.type != "cuda":
        return None
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    ms = time_ms(lambda: a @ b, device, warmup=5, iters=20)
    return 2 * n**3 / (ms * 1e-3) / 1e12


def print_table(rows: list[dict], columns: list[str]) -> None:
    """Rows of dicts as an aligned text table; floats to 3 significant figures, missing as '-'."""

    def fmt(v: object) -> str:
        if v is None:
            return "-"
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 1e4 else f"{v:.0f}"
        return str(v)

    cells = [[fmt(r.get(c)) for c in columns] for r in rows]
    widths = [
        max(len(c), *(len(row[i]) for row in cells)) if cells else len(c) for i, c in enumerate(columns)
    ]
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths)))
    print("  ".join("-" * w for w in widths))
    for row in cells:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths)))


def write_json(name: str, env: dict, config: dict, rows: list[dict], out: str | None = None) -> Path:
    """benchmarks/results/{name}-{device}.json (or `out`), overwriting the previous run on that device."""
    slug = "".join(ch if ch.isalnum() else "-" for ch in env["device"].lower()).strip("-") or "unknown"
    path = Path(out) if out else RESULTS / f"{name}-{slug}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    # atomic: an interrupted run leaves the previous result, never half a file
    atomic_write_text(
        path, json.dumps({"environment": env, "config": config, "results": rows}, indent=2) + "\n"
    )
    return path


def short_error(e: BaseException) -> str:
    """One line for a table cell or JSON field."""
    text = f"{type(e).__name__}: {e}".splitlines()[0]
    return text[:200]


def markdown_table(rows: list[dict], columns: list[tuple[str, str]]) -> str:
    """Rows of dicts as a Markdown table; `columns` are (key, header) pairs; cells are used as
    given (format them first), missing ones as "–"."""
    lines = ["| " + " | ".join(h for _, h in columns) + " |", "|" + "---|" * len(columns)]
    for r in rows:
        lines.append("| " + " | ".join(str(r.get(k, "–")) for k, _ in columns) + " |")
    return "\n".join(lines)


# --- timing under contention --------------------------------------------------------------------


def interleaved(
    fns: dict[str, Callable[[], object]], rounds: int, before_round: Callable[[int], None] | None = None
) -> dict[str, list[float]]:
    """Seconds per call of each function, measured in `rounds` rounds that call every function
    once (the order rotates each round), so a change in machine load hits all of them alike.
    `before_round(r)` runs (untimed) before round r."""
    names = list(fns)
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(rounds):
        if before_round is not None:
            before_round(r)
        for n in names[r % len(names) :] + names[: r % len(names)]:
            t0 = time.perf_counter()
            fns[n]()
            times[n].append(time.perf_counter() - t0)
    return times


def spread(values: list[float]) -> dict:
    """Median, min and max of a list of measurements."""
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


def paired_ratios(base: list[float], other: list[float]) -> dict:
    """base/other per round (from `interleaved`): the speed-up of `other`, with its spread."""
    return spread([b / o for b, o in zip(base, other)])


# --- step caches: settings and image quality ------------------------------------------------------

TINY = Path(__file__).resolve().parent.parent / "fluxcore" / "assets" / "flux-tiny"
CACHE_SETTINGS = {
    "first_block": [{"threshold": t} for t in (0.05, 0.08, 0.12)],
    "teacache": [{"threshold": t} for t in (0.25, 0.4, 0.6)],
    "taylorseer": [{"interval": n} for n in (2, 3, 5)],
}


def cache_settings(first_only: bool = False) -> list[tuple[str, dict]]:
    """(kind, options) for every kind × its three settings (or the first setting of each kind)."""
    return [(k, o) for k, opts in CACHE_SETTINGS.items() for o in (opts[:1] if first_only else opts)]


def cache_label(kind: str, opts: dict) -> str:
    """ "first_block threshold 0.08", "taylorseer interval 3", "none"."""
    return "none" if kind == "none" else f"{kind} " + " ".join(f"{k} {v}" for k, v in opts.items())


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """Peak signal-to-noise ratio in dB of images in [0, 1] (mean over the batch; inf when all
    images are identical, an identical one among others counts as 120 dB)."""
    mse = ((a.float() - b.float()) ** 2).flatten(1).mean(1)
    if not mse.any():
        return math.inf
    return float((10 * torch.log10(1 / mse.clamp_min(1e-12))).mean())


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


def fmt_psnr(db: float) -> str:
    return "identical" if math.isinf(db) else f"{db:.1f} dB"


# --- the mid-size random model ------------------------------------------------------------------

MID = {"hidden_size": 512, "num_heads": 8, "depth": 4, "depth_single_blocks": 8, "axes_dim": (16, 24, 24)}
MID_SMOKE = {"hidden_size": 64, "num_heads": 2, "depth": 1, "depth_single_blocks": 1, "axes_dim": (8, 12, 12)}


def mid_pipeline(tiny, smoke: bool = False, seed: int = 0):
    """A FluxPipeline around a random transformer of MID's shape (hidden 512, 8 heads, 4 double +
    8 single blocks) with the shipped tiny model's text encoders, tokenizers, autoencoder and
    schedule, so prompts and images go through the whole pipeline. Random weights: only relative
    numbers (cached vs uncached, one library vs another) mean anything."""
    import fluxcore

    cfg = tiny.transformer.config.replace(**(MID_SMOKE if smoke else MID))
    torch.manual_seed(seed)
    model = fluxcore.Flux(cfg).eval()
    return fluxcore.FluxPipeline(
        model, tiny.ae, tiny.t5, tiny.clip, tiny.t5_tokenizer, tiny.clip_tokenizer,
        schedule=tiny.schedule, fused_kernels=False,
    )  # fmt: skip


# Prompts of the timing runs: in the tiny model's vocabulary, and tokenized alike by fluxcore's
# T5 tokenizer (sentencepiece) and transformers' T5TokenizerFast, which splits "top", "bottom",
# "black" and "triangle" of this tokenizer differently — so diffusers' pipeline sees the same tokens.
PROMPTS = [
    "a red circle in the center on a blue background",
    "a green square in the center on a white background",
    "a yellow circle in the center on a purple background",
    "a blue square in the center on a orange background",
]
