"""CPU wall-clock ratios: step caches vs none, regional compile vs eager, fluxcore vs diffusers.

All float32 on the CPU, in one process, one intra-op thread by default; every comparison is timed
in interleaved rounds (each round runs every contender once, the order rotating), so a change in
machine load hits all contenders alike; medians, min-max spreads and the load average are recorded.

  cache      the whole pipeline (text encoders, 28 Euler steps, decode) with each step cache at its
             three settings vs no cache: seconds per image (median over rounds), the speed-up
             (uncached / cached, per round: median and spread), full trunk evaluations per image,
             PSNR/SSIM of the final images vs the uncached ones. Two models: the shipped tiny
             model (64×64, the four prompts of common.PROMPTS in one batched call per round) and
             the mid-size random transformer of common.py (hidden 512, 8 heads, 4 double + 8
             single blocks; the tiny model's text encoders and autoencoder; 256×256; one image per
             call, round r on prompt r of common.PROMPTS[:3]).
  pipeline   fluxcore's FluxPipeline vs diffusers' FluxPipeline on the same components (the tiny
             model's folder; the mid transformer converted with `bfl_to_diffusers`), same prompts,
             latents, steps, size and guidance: ms per call, the ratio, and the max |diff| of the
             images (the prompts are ones both T5 tokenizers split alike; checked).
  forward    one transformer forward at the mid config (256 image + 24 text tokens, batch 1):
             fluxcore eager, fluxcore after `fluxcore.compile_blocks(model)` (Inductor; the cold
             first call reported separately, with an empty Inductor cache), and diffusers'
             FluxTransformer2DModel with the same weights: ms (median after warm-up), ratios, and
             the max |diff| of the outputs vs fluxcore eager.

    python benchmarks/cpu_ratios.py            # the tables in docs/speed.md (~10 min on 2 cores)
    python benchmarks/cpu_ratios.py --smoke    # everything at tiny sizes, seconds (dynamo's eager backend)
    python benchmarks/cpu_ratios.py --table benchmarks/results/cpu-ratios-x86-64.json   # Markdown again

diffusers is only needed for the fluxcore-vs-diffusers rows (skipped, and said so, without it).
Prints tables (also as Markdown) and writes benchmarks/results/cpu-ratios-<device>.json.
"""

from __future__ import annotations

import os
import shutil
import tempfile

# An empty Inductor cache of our own, so the compile time below is a cold compile.
_INDUCTOR_DIR = tempfile.mkdtemp(prefix="fluxcore-cpu-ratios-inductor-")
os.environ["TORCHINDUCTOR_CACHE_DIR"] = _INDUCTOR_DIR

import argparse  # noqa: E402
import copy  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
from common import (  # noqa: E402
    PROMPTS,
    TINY,
    cache_label,
    cache_settings,
    environment,
    fmt_psnr,
    interleaved,
    loadavg,
    markdown_table,
    mid_pipeline,
    paired_ratios,
    print_table,
    psnr,
    short_error,
    spread,
    ssim,
    write_json,
)  # fmt: skip

import fluxcore  # noqa: E402
from fluxcore.latents import get_noise, make_img_ids, make_txt_ids, pack  # noqa: E402

T5_LENGTH = 24  # the tiny T5 tokenizer's trained length: what fluxcore's pipeline uses by default


def diffusers_or_none():
    try:
        import diffusers

        return diffusers
    except ImportError:
        return None


def diffusers_transformer(model):
    """diffusers' FluxTransformer2DModel with `model`'s weights (as tests/test_model.py builds it)."""
    import diffusers

    from fluxcore.weights import bfl_to_diffusers

    c = model.config
    ref = diffusers.FluxTransformer2DModel(
        patch_size=1, in_channels=c.in_channels, out_channels=c.out_channels, num_layers=c.depth,
        num_single_layers=c.depth_single_blocks, attention_head_dim=c.head_dim, num_attention_heads=c.num_heads,
        joint_attention_dim=c.context_in_dim, pooled_projection_dim=c.vec_in_dim, guidance_embeds=c.guidance_embed,
        axes_dims_rope=c.axes_dim,
    )  # fmt: skip
    ref.load_state_dict(bfl_to_diffusers(model.state_dict()), strict=True)
    return ref.eval()


def latents_for(size: int, seeds) -> torch.Tensor:
    return pack(torch.cat([get_noise(1, size, size, dtype=torch.float32, seed=s) for s in seeds]))


# --- step caches in the pipeline ------------------------------------------------------------------


def cache_rows(name: str, pipe, args, size: int, steps: int, rounds: int, batch_prompts: bool) -> list[dict]:
    """Interleaved rounds of {no cache, each setting}; one row per setting."""
    settings = [("none", {}), *cache_settings(first_only=args.smoke)]
    outputs: dict[str, list] = {cache_label(k, o): [] for k, o in settings}
    fulls: dict[str, list] = {cache_label(k, o): [] for k, o in settings}
    state = {"round": 0}
    n_mid = 3

    def call(kind, opts):
        label = cache_label(kind, opts)
        if batch_prompts:
            prompts, seeds = PROMPTS, list(range(len(PROMPTS)))
        else:
            i = state["round"] % n_mid
            prompts, seeds = [PROMPTS[i]], [i]
        out = pipe(
            prompts, height=size, width=size, num_inference_steps=steps, generator=seeds, output_type="pt",
            progress=False, cache=None if kind == "none" else (kind, opts),
        )  # fmt: skip
        outputs[label].append(out.images)
        fulls[label].append(out.info["cache"]["full"] if kind != "none" else steps)

    fns = {cache_label(k, o): (lambda k=k, o=o: call(k, o)) for k, o in settings}
    with torch.no_grad():
        pipe(
            PROMPTS[0], height=size, width=size, num_inference_steps=2, generator=0, progress=False
        )  # warm-up
        times = interleaved(fns, rounds, before_round=lambda r: state.update(round=r))
    per_image = len(PROMPTS) if batch_prompts else 1
    base = times["none"]
    if batch_prompts:  # the same batch every round
        ref = outputs["none"][0]
        images = {n: v[0] for n, v in outputs.items()}
    else:  # round r made prompt r % 3: compare like with like over the first three rounds
        k = min(rounds, n_mid)
        ref = torch.cat(outputs["none"][:k])
        images = {n: torch.cat(v[:k]) for n, v in outputs.items()}
    rows = []
    for n in fns:
        s = spread([t / per_image for t in times[n]])
        ratio = paired_ratios(base, times[n])
        rows.append({
            "section": "cache", "model": name, "cache": n, "s_per_image": s["median"],
            "s_per_image_min": s["min"], "s_per_image_max": s["max"], "rounds": s["n"],
            "speedup": statistics.median(base) / statistics.median(times[n]), "speedup_paired_median": ratio["median"],
            "speedup_paired_min": ratio["min"], "speedup_paired_max": ratio["max"],
            "full": statistics.mean(fulls[n]), "steps": steps, "psnr": psnr(images[n], ref), "ssim": ssim(images[n], ref),
            "images_per_call": per_image, "size": size, "times_s": times[n],
        })  # fmt: skip
        print(rows[-1], flush=True)
    return rows


# --- fluxcore vs diffusers: the whole pipeline ----------------------------------------------------


def pipeline_rows(name: str, ours, theirs, prompts, size: int, steps: int, rounds: int) -> list[dict]:
    lat = latents_for(size, range(len(prompts)))
    ids_ours = ours.t5_tokenizer(prompts, max_length=T5_LENGTH)
    ids_theirs = theirs.tokenizer_2(
        prompts, padding="max_length", max_length=T5_LENGTH, truncation=True, return_tensors="pt"
    ).input_ids
    kw = dict(height=size, width=size, num_inference_steps=steps, guidance_scale=3.5, output_type="np")
    kw |= dict(latents=lat, max_sequence_length=T5_LENGTH)
    out = {}

    def run_ours():
        out["fluxcore"] = ours(prompts, progress=False, **kw).images

    def run_theirs():
        out["diffusers"] = theirs(prompts, **kw).images

    with torch.no_grad():
        run_ours(), run_theirs()  # warm-up
        times = interleaved({"fluxcore": run_ours, "diffusers": run_theirs}, rounds)
    a, b = spread(times["fluxcore"]), spread(times["diffusers"])
    ratio = paired_ratios(times["diffusers"], times["fluxcore"])
    row = {
        "section": "pipeline", "model": name, "images_per_call": len(prompts), "size": size, "steps": steps,
        "fluxcore_ms": a["median"] * 1e3, "fluxcore_ms_min": a["min"] * 1e3, "fluxcore_ms_max": a["max"] * 1e3,
        "diffusers_ms": b["median"] * 1e3, "diffusers_ms_min": b["min"] * 1e3, "diffusers_ms_max": b["max"] * 1e3,
        "diffusers_over_fluxcore": b["median"] / a["median"], "paired_ratio_median": ratio["median"],
        "paired_ratio_min": ratio["min"],
        "paired_ratio_max": ratio["max"], "rounds": a["n"],
        "max_abs_diff": float(np.abs(out["fluxcore"] - out["diffusers"]).max()),
        "t5_tokens_agree": bool(torch.equal(ids_ours, ids_theirs)),
        "times_s": times,
    }  # fmt: skip
    print(row, flush=True)
    return [row]


def diffusers_pipeline_like(diffusers, tiny_ref, transformer):
    """diffusers' FluxPipeline from the tiny folder's components with another transformer."""
    c = tiny_ref.components
    return diffusers.FluxPipeline(
        scheduler=c["scheduler"], vae=c["vae"], text_encoder=c["text_encoder"], tokenizer=c["tokenizer"],
        text_encoder_2=c["text_encoder_2"], tokenizer_2=c["tokenizer_2"], transformer=transformer,
    )  # fmt: skip


# --- one forward: eager, compiled, diffusers ------------------------------------------------------


def forward_rows(model, args, size: int, rounds: int, diffusers) -> list[dict]:
    cfg = model.config
    g = torch.Generator().manual_seed(3)
    L = (size // 16) ** 2
    img, txt = (
        torch.randn(1, L, cfg.in_channels, generator=g),
        torch.randn(1, T5_LENGTH, cfg.context_in_dim, generator=g),
    )
    img_ids, txt_ids = make_img_ids(1, size, size), make_txt_ids(1, T5_LENGTH)
    y, t, guidance = torch.randn(1, cfg.vec_in_dim, generator=g), torch.tensor([0.5]), torch.tensor([3.5])
    fns, outs, extra = {}, {}, {}
    fns["fluxcore eager"] = lambda: model(img, img_ids, txt, txt_ids, t, y, guidance)
    compiled = copy.deepcopy(model)
    try:
        paths = fluxcore.compile_blocks(compiled, backend=args.compile_backend)
        with torch.no_grad():
            t0 = time.perf_counter()
            outs["fluxcore compiled"] = compiled(img, img_ids, txt, txt_ids, t, y, guidance)
            extra["fluxcore compiled"] = {
                "cold_first_call_s": time.perf_counter() - t0, "compiled_blocks": len(paths),
                "compile_backend": args.compile_backend,
            }  # fmt: skip
        fns["fluxcore compiled"] = lambda: compiled(img, img_ids, txt, txt_ids, t, y, guidance)
    except Exception as e:  # record and go on: the other rows still mean something
        extra["fluxcore compiled"] = {"error": short_error(e), "compile_backend": args.compile_backend}
    if diffusers is not None:
        twin = diffusers_transformer(model)
        fns["diffusers"] = lambda: twin(
            hidden_states=img, encoder_hidden_states=txt, pooled_projections=y, timestep=t, img_ids=img_ids[0],
            txt_ids=txt_ids[0], guidance=guidance,
        ).sample  # fmt: skip
    with torch.no_grad():
        for n, fn in fns.items():
            outs[n] = fn()  # warm-up (the compiled model's second call)
            fn()
        times = interleaved(fns, rounds)
    base = outs["fluxcore eager"]
    rows = []
    for n in ["fluxcore eager", "fluxcore compiled", "diffusers"]:
        if n not in fns:
            rows.append(
                {"section": "forward", "contender": n, **extra.get(n, {"skipped": "diffusers not installed"})}
            )
            continue
        s = spread(times[n])
        ratio = paired_ratios(times["fluxcore eager"], times[n])
        rows.append({
            "section": "forward", "contender": n, "ms": s["median"] * 1e3, "ms_min": s["min"] * 1e3,
            "ms_max": s["max"] * 1e3, "rounds": s["n"], "speedup_vs_eager": statistics.median(times["fluxcore eager"]) / s["median"],
            "speedup_paired_median": ratio["median"], "speedup_paired_min": ratio["min"],
            "speedup_paired_max": ratio["max"], "max_abs_diff_vs_eager": float((outs[n] - base).abs().max()), "output_abs_max": float(base.abs().max()),
            "image_tokens": L, "text_tokens": T5_LENGTH, "times_s": times[n], **extra.get(n, {}),
        })  # fmt: skip
        print(rows[-1], flush=True)
    return rows


# --- tables -----------------------------------------------------------------------------------------


def markdown(rows: list[dict]) -> str:
    parts = []
    cache = [r for r in rows if r["section"] == "cache"]
    if cache:
        lines = [
            {
                "model": r["model"], "cache": r["cache"],
                "s": f"{r['s_per_image']:.3g} s ({r['s_per_image_min']:.3g}–{r['s_per_image_max']:.3g})",
                "x": f"{r['speedup']:.2f}× ({r['speedup_paired_min']:.2f}–{r['speedup_paired_max']:.2f})",
                "full": f"{r['full']:.3g}", "psnr": fmt_psnr(r["psnr"]), "ssim": f"{r['ssim']:.4f}",
            }
            for r in cache
        ]  # fmt: skip
        cols = [("model", "model"), ("cache", "cache"), ("s", "s / image, median (min–max)"),
                ("x", "speed-up (per-round min–max)"), ("full", "full evals"), ("psnr", "PSNR"), ("ssim", "SSIM")]  # fmt: skip
        parts.append(markdown_table(lines, cols))
    pipe = [r for r in rows if r["section"] == "pipeline" and "fluxcore_ms" in r]
    if pipe:
        lines = [
            {
                "model": f"{r['model']} ({r['size']}², {r['steps']} steps, {r['images_per_call']} image(s))",
                "ours": f"{r['fluxcore_ms']:.0f} ({r['fluxcore_ms_min']:.0f}–{r['fluxcore_ms_max']:.0f})",
                "theirs": f"{r['diffusers_ms']:.0f} ({r['diffusers_ms_min']:.0f}–{r['diffusers_ms_max']:.0f})",
                "ratio": f"{r['diffusers_over_fluxcore']:.2f} ({r['paired_ratio_min']:.2f}–{r['paired_ratio_max']:.2f})",
                "diff": f"{r['max_abs_diff']:.1e}",
            }
            for r in pipe
        ]  # fmt: skip
        cols = [("model", "pipeline"), ("ours", "fluxcore ms (min–max)"), ("theirs", "diffusers ms (min–max)"),
                ("ratio", "diffusers / fluxcore time (per-round min–max)"), ("diff", "max abs diff of images")]  # fmt: skip
        parts.append(markdown_table(lines, cols))
    fwd = [r for r in rows if r["section"] == "forward"]
    if fwd:
        lines = []
        for r in fwd:
            if "ms" not in r:
                lines.append({"who": r["contender"], "ms": r.get("error") or r.get("skipped")})
                continue
            lines.append({
                "who": r["contender"], "ms": f"{r['ms']:.1f} ({r['ms_min']:.1f}–{r['ms_max']:.1f})",
                "x": f"{r['speedup_vs_eager']:.2f} ({r['speedup_paired_min']:.2f}–{r['speedup_paired_max']:.2f})",
                "cold": f"{r['cold_first_call_s']:.1f} s" if "cold_first_call_s" in r else "–",
                "diff": "0" if r["max_abs_diff_vs_eager"] == 0 else f"{r['max_abs_diff_vs_eager']:.1e}",
            })  # fmt: skip
        cols = [("who", "forward"), ("ms", "ms, median (min–max)"), ("x", "eager / this time (per-round min–max)"),
                ("cold", "first call (compile)"), ("diff", "max abs diff vs eager")]  # fmt: skip
        parts.append(markdown_table(lines, cols))
    return "\n\n".join(parts)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--smoke", action="store_true", help="tiny sizes, 4 steps, 2 rounds, one setting per kind")
    p.add_argument("--steps", type=int, default=28)
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    p.add_argument("--tiny-rounds", type=int, default=5)
    p.add_argument("--mid-rounds", type=int, default=3)
    p.add_argument("--forward-rounds", type=int, default=10)
    p.add_argument("--compile-backend", default=None, help="default inductor (eager with --smoke)")
    p.add_argument("--parts", nargs="+", default=["cache", "pipeline", "forward"])
    p.add_argument("--out", default=None)
    p.add_argument("--table", metavar="JSON", help="print the Markdown tables of a saved result and exit")
    args = p.parse_args()
    if args.table:
        import json

        print(markdown(json.loads(Path(args.table).read_text())["results"]))
        return
    if args.compile_backend is None:
        args.compile_backend = "eager" if args.smoke else "inductor"
    if args.smoke:
        args.steps, args.tiny_rounds, args.mid_rounds, args.forward_rounds = 4, 2, 2, 3
    torch.set_num_threads(args.threads)
    mid_size = 64 if args.smoke else 256
    diffusers = diffusers_or_none()
    loads = {"start": loadavg()}
    t_start = time.perf_counter()

    tiny = fluxcore.FluxPipeline.from_pretrained(TINY)
    mid = mid_pipeline(tiny, smoke=args.smoke)
    rows: list[dict] = []
    try:
        if "cache" in args.parts:
            rows += cache_rows("tiny", tiny, args, 64, args.steps, args.tiny_rounds, batch_prompts=True)
            loads["after tiny cache"] = loadavg()
            rows += cache_rows("mid", mid, args, mid_size, args.steps, args.mid_rounds, batch_prompts=False)
            loads["after mid cache"] = loadavg()
        if "pipeline" in args.parts:
            if diffusers is None:
                rows.append({"section": "pipeline", "skipped": "diffusers not installed"})
            else:
                ref = diffusers.FluxPipeline.from_pretrained(TINY)
                ref.set_progress_bar_config(disable=True)
                rows += pipeline_rows("tiny", tiny, ref, PROMPTS, 64, args.steps, args.tiny_rounds)
                ref_mid = diffusers_pipeline_like(diffusers, ref, diffusers_transformer(mid.transformer))
                ref_mid.set_progress_bar_config(disable=True)
                rows += pipeline_rows("mid", mid, ref_mid, PROMPTS[:1], mid_size, args.steps, args.mid_rounds)
            loads["after pipelines"] = loadavg()
        if "forward" in args.parts:  # last: Inductor's compile workers stay around afterwards
            rows += forward_rows(mid.transformer, args, mid_size, args.forward_rounds, diffusers)
            loads["after forwards"] = loadavg()
    finally:
        shutil.rmtree(_INDUCTOR_DIR, ignore_errors=True)

    print()
    for section, cols in [
        ("cache", ["model", "cache", "s_per_image", "speedup", "speedup_paired_min", "speedup_paired_max", "full", "psnr", "ssim"]),
        ("pipeline", ["model", "fluxcore_ms", "diffusers_ms", "diffusers_over_fluxcore", "max_abs_diff", "t5_tokens_agree"]),
        ("forward", ["contender", "ms", "speedup_vs_eager", "cold_first_call_s", "max_abs_diff_vs_eager", "error"]),
    ]:  # fmt: skip
        sub = [r for r in rows if r["section"] == section]
        if sub:
            print_table(sub, cols)
            print()
    print(markdown(rows))
    print(f"\nload average (1, 5, 15 min): {loads}")
    config = {
        "smoke": args.smoke, "steps": args.steps, "threads": args.threads, "dtype": "fp32",
        "tiny_rounds": args.tiny_rounds, "mid_rounds": args.mid_rounds, "forward_rounds": args.forward_rounds,
        "compile_backend": args.compile_backend, "mid_config": repr(mid.transformer.config), "mid_size": mid_size,
        "prompts": PROMPTS, "t5_length": T5_LENGTH, "diffusers": getattr(diffusers, "__version__", None),
        "loadavg": loads, "total_s": time.perf_counter() - t_start,
    }  # fmt: skip
    path = write_json("cpu-ratios", environment(torch.device("cpu")), config, rows, args.out)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
