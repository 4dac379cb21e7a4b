"""The `fluxcore` command.

    fluxcore generate "a cat on mars" [--model PATH|HUB_ID] [--steps N --guidance G --seed S --width W
                      --height H --sampler NAME --scheduler NAME --num-images K --out FILE.png ...]
                      [--image IN.png --strength 0.6 | --mask MASK.png | --control-image EDGES.png]
                      [--lora PATH[:W]]... [--controlnet PATH[:S]]... [--ip-adapter ...] [--redux-image ...]
                      [--offload | --max-memory 12GB]
    fluxcore generate --prompts FILE [--out-dir DIR] ...     (torchrun: --ulysses U --ring R)
    fluxcore info PATH
    fluxcore --version

`generate` writes PNGs whose text chunks hold the prompt and every setting (one chunk per setting,
"parameters" in the AUTOMATIC1111 form other tools read, and "fluxcore" with all of them as JSON).
Without --model it uses the demo model shipped in fluxcore/assets/flux-tiny/ (64x64 defaults,
which also apply when --model names that folder). An existing file is never overwritten unless
--overwrite: the next free numbered name is used. Files are written atomically (a temporary file in
the target folder, fsync, rename), and the output folder is checked before anything is loaded.
Misuse exits with status 2 and one line on stderr; an unexpected error prints one line and a hint
to re-run with --debug (which shows the traceback).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path

DEMO_MODEL = Path(__file__).parent / "assets" / "flux-tiny"
_DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


class _UsageError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, status 2, no usage dump
        raise _UsageError(f"{self.prog}: {message}")


def _positive(kind):
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a {kind.__name__}, got {text!r}") from None
        if value <= 0:
            raise argparse.ArgumentTypeError(f"must be positive, got {text}")
        return value

    return parse


def _seed(text):
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a non-negative integer, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


def _strength(text):
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1], got {text!r}") from None
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {text}")
    return value


def _version() -> str:
    import fluxcore

    return f"fluxcore {fluxcore.__version__}"


def build_parser() -> argparse.ArgumentParser:
    from fluxcore.sampling import SAMPLERS
    from fluxcore.schedules import SCHEDULERS

    parser = _Parser(prog="fluxcore", description="FLUX.1 image generation with fluxcore.")
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    sub = parser.add_subparsers(dest="command", parser_class=_Parser)

    g = sub.add_parser("generate", help="generate images from a prompt")
    g.add_argument("prompt", nargs="?", help="the text prompt (or --prompts FILE)")
    g.add_argument("--prompts", help="prompt file: one prompt per line, or JSONL with per-item settings")
    g.add_argument(
        "--out-dir", default=None, help="folder for --prompts images + manifest (default fluxcore-out)"
    )
    g.add_argument(
        "--model", help=f"model folder (snapshot or BFL files) or Hugging Face Hub id; default: {DEMO_MODEL}"
    )
    g.add_argument("--steps", type=_positive(int), help="sampling steps (default 4 schnell, 28 otherwise)")
    g.add_argument(
        "--guidance", type=float, default=3.5, help="distilled guidance (dev-type models; default 3.5)"
    )
    g.add_argument(
        "--seed", type=_seed, help="noise seed of the first image (default: random; image k uses seed + k)"
    )
    g.add_argument("--num-images", type=_positive(int), default=1, help="images to generate (default 1)")
    g.add_argument("--width", type=_positive(int), default=None, help="pixels (default 1024; demo model 64)")
    g.add_argument("--height", type=_positive(int), default=None, help="pixels (default 1024; demo model 64)")
    g.add_argument("--sampler", default="euler", choices=list(SAMPLERS), help="sampler (default euler)")
    g.add_argument(
        "--scheduler", default="simple", choices=list(SCHEDULERS), help="schedule (default simple: FLUX's)"
    )
    g.add_argument(
        "--image", help="input image: img2img (with --strength), Fill (with --mask) or the Kontext reference"
    )
    g.add_argument(
        "--strength", type=_strength, default=None, help="img2img strength in (0, 1] (default 0.6)"
    )
    g.add_argument("--mask", help="Fill models: mask image, white = generate (needs --image)")
    g.add_argument(
        "--kontext-resize",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="Kontext: encode the reference at the closest trained ~1 MP size (default) or as it is",
    )
    g.add_argument(
        "--control-image",
        action="append",
        help="Canny/Depth models: the edge or depth map; with --controlnet, one per net",
    )
    g.add_argument(
        "--lora", action="append", default=[], metavar="PATH[:WEIGHT]", help="a LoRA file (repeatable)"
    )
    g.add_argument(
        "--controlnet", action="append", default=[], metavar="PATH[:SCALE]", help="a ControlNet (repeatable)"
    )
    g.add_argument(
        "--control-mode", action="append", help="Union ControlNets: the mode (name or number) per image"
    )
    g.add_argument(
        "--control-start", type=float, default=0.0, help="ControlNet: first fraction of steps (default 0)"
    )
    g.add_argument(
        "--control-end", type=float, default=1.0, help="ControlNet: last fraction of steps (default 1)"
    )
    g.add_argument("--canny", action="store_true", help="run Canny edges (100/200) on --control-image first")
    g.add_argument("--ip-adapter", help="XLabs IP-Adapter file (needs --ip-image and --image-encoder)")
    g.add_argument("--ip-image", help="the IP-Adapter's image prompt")
    g.add_argument("--ip-scale", type=float, default=1.0, help="IP-Adapter scale (default 1)")
    g.add_argument("--image-encoder", help="CLIP ViT-L/14 image encoder folder for --ip-adapter")
    g.add_argument("--redux-image", help="FLUX.1 Redux: the image prompt (needs --redux-model)")
    g.add_argument(
        "--redux-model", nargs=2, metavar=("REDUX_FILE", "IMAGE_ENCODER"), help="Redux projector + SigLIP"
    )
    g.add_argument("--out", default=None, help="output PNG file (default fluxcore-<seed>.png)")
    g.add_argument(
        "--overwrite", action="store_true", help="replace an existing --out file (default: a numbered name)"
    )
    g.add_argument("--negative-prompt", default=None, help="negative prompt (needs --true-cfg > 1)")
    g.add_argument("--true-cfg", type=float, default=1.0, help="true CFG scale; > 1 doubles the cost")
    g.add_argument(
        "--max-sequence-length", type=_positive(int), default=None, help="T5 tokens (default 256/512; capped)"
    )
    g.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")
    g.add_argument(
        "--dtype",
        choices=list(_DTYPES),
        default=None,
        help="weights dtype (default bf16 on cuda, fp32 on cpu)",
    )
    g.add_argument(
        "--offload", action="store_true", help="keep models on the CPU, move each stage to the GPU as it runs"
    )
    g.add_argument(
        "--max-memory",
        default=None,
        help="GPU memory to fit in, e.g. 12GB: picks quantization, offload, tiling",
    )
    g.add_argument("--ulysses", type=_positive(int), default=1, help="Ulysses degree (under torchrun)")
    g.add_argument("--ring", type=_positive(int), default=1, help="ring-attention degree (under torchrun)")
    g.add_argument("--debug", action="store_true", help="show the traceback of an unexpected error")

    g.add_argument(
        "--cache",
        type=_cache_spec,
        default=None,
        metavar="KIND[:VALUE]",
        help="step cache: first_block[:threshold], teacache[:threshold] or taylorseer[:interval] "
        "(default off; docs/speed.md)",
    )
    sub.add_parser(
        "train-lora",
        help="train a LoRA on a folder of captioned images (fluxcore train-lora -h)",
        add_help=False,
    )
    b = sub.add_parser(
        "bench",
        help="run a benchmark or the whole suite (source checkouts: benchmarks/)",
        description="Run one benchmark of benchmarks/ (its own options follow the name; "
        "`fluxcore bench NAME --help` lists them), or the whole GPU suite (benchmarks/gpu_suite.sh). "
        "Each writes a table and JSON under benchmarks/results/.",
    )
    b.add_argument("which", nargs="?", default="suite", choices=sorted(BENCHMARKS), metavar="NAME",
                   help="one of: " + ", ".join(sorted(BENCHMARKS)) + " (default suite)")  # fmt: skip
    b.add_argument("--smoke", action="store_true", help="tiny shapes on CPU, end to end (suite, cache, "
                   "cpu-ratios, pipeline, vae-memory)")  # fmt: skip
    b.add_argument("options", nargs=argparse.REMAINDER, help="passed to the benchmark")
    i = sub.add_parser("info", help="describe a checkpoint file or folder (headers only)")
    i.add_argument("path")
    i.add_argument("--debug", action="store_true", help="show the traceback of an unexpected error")
    return parser


# --- output files -------------------------------------------------------------------------------


def _numbered(path: Path, taken: set[Path]) -> Path:
    """`path` if it is free, else the first free `stem-N.png` (N = 1, 2, ...)."""
    candidate, n = path, 0
    while candidate.exists() or candidate in taken:
        n += 1
        candidate = path.with_name(f"{path.stem}-{n}{path.suffix}")
    return candidate


def plan_outputs(out: Path | None, seeds: list[int], overwrite: bool) -> list[Path]:
    """The file each image goes to, checked before anything is loaded: the folder must exist (or be
    creatable) and be writable, no target may be a folder, and an existing file is replaced only
    with `overwrite` (else the next numbered name)."""
    if out is None:
        wanted = [Path(f"fluxcore-{s}.png") for s in seeds]
    elif len(seeds) == 1:
        wanted = [out]
    else:
        wanted = [out.with_name(f"{out.stem}-{k}{out.suffix}") for k in range(len(seeds))]
    folder = wanted[0].parent.resolve()
    existing = next((p for p in [folder, *folder.parents] if p.exists()), None)
    if existing is None or not existing.is_dir():
        raise _UsageError(f"fluxcore: --out folder {folder} cannot be created ({existing} is not a folder)")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise _UsageError(f"fluxcore: cannot write to {existing} (permission denied)")
    paths: list[Path] = []
    for p in wanted:
        if p.is_dir():
            raise _UsageError(f"fluxcore: --out {p} is a folder; name a .png file")
        if p.exists() and not overwrite:
            p = _numbered(p, set(paths))
        paths.append(p)
    return paths


def write_atomically(image, path: Path, pnginfo) -> None:
    """Save a PIL image as PNG to `path` so that a crash leaves either the old file or the new one:
    a temporary file in the same folder, flushed and fsync'ed, then renamed over `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            image.save(f, format="PNG", pnginfo=pnginfo)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    if hasattr(os, "O_DIRECTORY"):  # make the rename itself durable
        dfd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)


def a1111_parameters(s: dict) -> str:
    """The AUTOMATIC1111 "parameters" text other image tools parse: prompt, negative prompt, then
    `Key: value` pairs on one line."""
    lines = [s["prompt"]]
    if s.get("negative_prompt"):
        lines.append(f"Negative prompt: {s['negative_prompt']}")
    pairs = {
        "Steps": s["steps"], "Sampler": s["sampler"], "Schedule type": s["scheduler"],
        "CFG scale": s["true_cfg"], "Distilled CFG Scale": s["guidance"], "Seed": s["seed"],
        "Size": f"{s['width']}x{s['height']}", "Model": Path(str(s["model"])).name or s["model"],
        "Denoising strength": s.get("strength"), "Lora": s.get("lora"), "Version": s["fluxcore_version"],
    }  # fmt: skip
    lines.append(", ".join(f"{k}: {v}" for k, v in pairs.items() if v not in (None, "")))
    return "\n".join(lines)


# --- commands -----------------------------------------------------------------------------------


def _progress(message: str) -> float:
    # on stdout: stderr carries only warnings and the one line of an error
    print(f"fluxcore: {message}", flush=True)
    return time.perf_counter()


def _open_image(path, flag: str):
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            im.load()
            return im.copy()
    except FileNotFoundError:
        raise _UsageError(f"fluxcore: {flag} {path}: no such file") from None
    except (UnidentifiedImageError, OSError) as e:
        raise _UsageError(f"fluxcore: {flag} {path}: not an image ({e})") from None


def _is_demo(model: Path) -> bool:
    try:
        return DEMO_MODEL.is_dir() and model.resolve() == DEMO_MODEL.resolve()
    except OSError:
        return False


def _spec(spec: str, flag: str) -> tuple[str, float]:
    """PATH[:NUMBER] → (PATH, NUMBER), default 1.0; the path must exist."""
    path, _, number = spec.rpartition(":")
    try:
        value = float(number)
    except ValueError:
        path, value = spec, 1.0
    if not path or not Path(path).exists():
        raise _UsageError(f"fluxcore: {flag} {path or spec}: no such file or folder")
    return path, value


def _check(args) -> None:
    """Every misuse of the flags that is known before anything is loaded (exit 2, one line)."""
    if args.prompt is None and args.prompts is None:
        raise _UsageError("fluxcore: the following arguments are required: prompt (or --prompts FILE)")
    if args.prompt is not None and args.prompts is not None:
        raise _UsageError("fluxcore: give a PROMPT or --prompts FILE, not both")
    if args.prompts is not None:
        if not Path(args.prompts).is_file():
            raise _UsageError(f"fluxcore: --prompts {args.prompts}: no such file")
        given = [f for f, v in (("--out", args.out), ("--image", args.image), ("--control-image", args.control_image),
                                ("--num-images", args.num_images != 1), ("--ip-image", args.ip_image),
                                ("--redux-image", args.redux_image)) if v]  # fmt: skip
        if given:
            raise _UsageError(f"fluxcore: --prompts does not take {given[0]} (images go to --out-dir)")
    elif args.out_dir is not None:
        raise _UsageError("fluxcore: --out-dir goes with --prompts (use --out for one prompt)")
    if args.negative_prompt is not None and args.true_cfg <= 1:
        raise _UsageError("fluxcore: --negative-prompt needs --true-cfg > 1 (e.g. --true-cfg 4)")
    if args.mask is not None and args.image is None:
        raise _UsageError("fluxcore: --mask needs --image (the image to fill)")
    if args.strength is not None and args.image is None:
        raise _UsageError("fluxcore: --strength needs --image (img2img)")
    if args.controlnet and not args.control_image:
        raise _UsageError("fluxcore: --controlnet needs --control-image (one per net)")
    if (args.control_mode or args.canny) and not args.control_image:
        raise _UsageError("fluxcore: --control-mode/--canny need --control-image")
    if not 0 <= args.control_start < args.control_end <= 1:
        raise _UsageError(
            f"fluxcore: need 0 <= --control-start < --control-end <= 1, got {args.control_start}, {args.control_end}"
        )
    if (args.ip_adapter is None) != (args.ip_image is None) or (args.ip_adapter and not args.image_encoder):
        raise _UsageError("fluxcore: --ip-adapter, --ip-image and --image-encoder go together")
    if (args.redux_image is None) != (args.redux_model is None):
        raise _UsageError("fluxcore: --redux-image and --redux-model REDUX_FILE IMAGE_ENCODER go together")
    for flag, path in (("--ip-adapter", args.ip_adapter), ("--image-encoder", args.image_encoder),
                       *(("--redux-model", p) for p in args.redux_model or ())):  # fmt: skip
        if path is not None and not Path(path).exists():
            raise _UsageError(f"fluxcore: {flag} {path}: no such file or folder")
    if args.max_memory is not None:
        from fluxcore.memory import parse_bytes

        try:
            parse_bytes(args.max_memory)
        except ValueError as e:
            raise _UsageError(f"fluxcore: --max-memory: {e}") from None
        if args.offload:
            raise _UsageError("fluxcore: --max-memory chooses the offload itself; drop --offload")
    if args.ulysses * args.ring > 1 and int(os.environ.get("WORLD_SIZE", "1")) < 2:
        raise _UsageError(
            "fluxcore: --ulysses/--ring need several processes: torchrun --nproc-per-node N -m fluxcore generate ..."
        )


def _load_extras(pipe, args, loras, nets) -> dict:
    """Load the LoRAs, ControlNets, IP-Adapter and Redux the flags name; the call's keywords for them."""
    for i, (path, weight) in enumerate(loras):
        pipe.load_lora_weights(path, adapter_name=f"lora{i}", weight=weight)
    if nets:
        pipe.load_controlnet([p for p, _ in nets])
    if args.ip_adapter:
        pipe.load_ip_adapter(args.ip_adapter, image_encoder=args.image_encoder, scale=args.ip_scale)
    if args.redux_model:
        pipe.load_redux(*args.redux_model)
    images = [_open_image(p, "--control-image") for p in args.control_image or []]
    if args.canny:
        from fluxcore.canny import canny

        images = [canny(im) for im in images]
    modes = [int(m) if m.isdigit() else m for m in args.control_mode or []]
    kw = {
        "control_image": (images if len(images) > 1 else images[0]) if images else None,
        "ip_adapter_image": _open_image(args.ip_image, "--ip-image") if args.ip_image else None,
        "redux_image": _open_image(args.redux_image, "--redux-image") if args.redux_image else None,
    }
    if nets:
        kw.update(
            control_mode=(modes if len(modes) > 1 else modes[0]) if modes else None,
            controlnet_conditioning_scale=[s for _, s in nets] if len(nets) > 1 else nets[0][1],
            control_guidance_start=args.control_start, control_guidance_end=args.control_end,
        )  # fmt: skip
    return {k: v for k, v in kw.items() if v is not None}


def _generate(args) -> int:
    import random

    import torch

    from fluxcore.weights.hub import is_hub_id

    _check(args)
    if args.model is None and not DEMO_MODEL.is_dir():
        raise _UsageError(
            f"fluxcore: no --model given and the demo model {DEMO_MODEL} is not installed; pass --model PATH"
        )
    model = Path(args.model) if args.model else DEMO_MODEL
    if not model.is_dir() and not is_hub_id(args.model):
        raise _UsageError(f"fluxcore: --model {model}: no such folder (nor a Hugging Face Hub id owner/name)")
    out = Path(args.out) if args.out else None
    if out is not None and out.suffix.lower() != ".png":
        raise _UsageError(f"fluxcore: --out must name a .png file, got {out}")
    loras = [_spec(s, "--lora") for s in args.lora]
    nets = [_spec(s, "--controlnet") for s in args.controlnet]
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(device)
    except RuntimeError:
        raise _UsageError(f"fluxcore: --device {args.device!r} is not a torch device") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise _UsageError("fluxcore: --device cuda asked for, but no CUDA device is available")
    dtype = getattr(torch, _DTYPES[args.dtype]) if args.dtype else None
    images_in = {
        "image": _open_image(args.image, "--image") if args.image else None,
        "mask_image": _open_image(args.mask, "--mask") if args.mask else None,
    }

    small = _is_demo(model)  # the demo model is tiny: default to a tiny image
    width = args.width or (64 if small else None)
    height = args.height or (64 if small else None)
    from fluxcore.images import check_side

    for name, value in (("width", width), ("height", height)):
        if value is not None:
            check_side(name, value, stacklevel=2)
    if args.max_sequence_length is not None and args.max_sequence_length > 512:
        raise _UsageError(
            f"fluxcore: --max-sequence-length must be <= 512 (T5's), got {args.max_sequence_length}"
        )
    from fluxcore.distributed import broadcast_object, destroy_distributed, init_distributed

    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    main_rank = True
    if distributed:
        info = init_distributed(device=args.device)  # None: this rank's GPU, or the CPU
        device, main_rank = info.device, info.is_main
    finished = False
    try:
        first = (
            args.seed if args.seed is not None else random.SystemRandom().randrange(2**32 - args.num_images)
        )
        first = broadcast_object(first)  # one seed for every rank
        seeds = [first + k for k in range(args.num_images)]
        paths = plan_outputs(out, seeds, args.overwrite) if args.prompts is None else []  # before loading
        status = _run(
            args, model, device, dtype, width, height, seeds, paths, images_in, loras, nets, main_rank
        )
        finished = True
        return status
    finally:
        if distributed:
            destroy_distributed(barrier=finished)  # a failing rank must not wait for the others


def _run(args, model, device, dtype, width, height, seeds, paths, images_in, loras, nets, main_rank) -> int:
    from PIL.PngImagePlugin import PngInfo

    import fluxcore
    from fluxcore.pipeline import FluxPipeline

    t0 = _progress(f"loading {model} ...")
    load_device = "cpu" if args.offload else device
    parallel = {"ulysses": args.ulysses, "ring": args.ring} if args.ulysses * args.ring > 1 else None
    pipe = FluxPipeline.from_pretrained(
        args.model or model,
        torch_dtype=dtype,
        device=load_device,
        max_memory=args.max_memory,
        parallel=parallel,
    )
    if args.max_memory:
        _progress(f"memory plan for --max-memory {args.max_memory}:\n{pipe.memory_plan}")
    if args.offload:
        pipe.enable_model_cpu_offload(device=device)
    extras = _load_extras(pipe, args, loras, nets)
    if args.prompts:
        from fluxcore.generate_many import generate_many

        s = generate_many(
            pipe, args.prompts, args.out_dir or "fluxcore-out", seed=args.seed or 0, steps=args.steps,
            guidance=args.guidance, width=width, height=height, sampler=args.sampler,
            negative_prompt=args.negative_prompt, true_cfg=args.true_cfg, max_sequence_length=args.max_sequence_length,
        )  # fmt: skip
        if s.manifest is not None:
            print(f"wrote {s.manifest} ({len(s.generated)} generated here, {len(s.skipped)} already there)")
        return 0
    t1 = _progress(f"loaded in {time.perf_counter() - t0:.1f} s; sampling {args.num_images} image(s) ...")
    result = pipe(
        args.prompt,
        height=height,
        width=width,
        num_inference_steps=args.steps,
        guidance_scale=args.guidance,
        max_sequence_length=args.max_sequence_length,
        generator=seeds,
        num_images_per_prompt=args.num_images,
        sampler=args.sampler,
        scheduler=args.scheduler,
        negative_prompt=args.negative_prompt,
        true_cfg_scale=args.true_cfg,
        strength=args.strength,
        kontext_auto_resize=args.kontext_resize,
        output_type="latent",
        cache=args.cache,
        **{k: v for k, v in images_in.items() if v is not None},
        **extras,
    )
    if args.cache and main_rank:
        c = result.info["cache"]
        _progress(f"cache {c['kind']}: {c['full']} full transformer evaluations, {c['skipped']} skipped")
    if not main_rank:  # every rank sampled the same images; rank 0 decodes and writes them
        return 0
    t2 = _progress(f"sampled in {time.perf_counter() - t1:.1f} s; decoding ...")
    info = result.info
    images = pipe.decode(result.images, info["height"], info["width"])
    _progress(f"decoded in {time.perf_counter() - t2:.1f} s")
    msl = pipe.cap_max_sequence_length(args.max_sequence_length) if args.max_sequence_length else None
    for image, seed, path in zip(images, seeds, paths):
        settings = {
            "prompt": args.prompt,
            "model": str(args.model or model),
            "variant": str(getattr(pipe.transformer, "variant", "")),
            "seed": seed,
            "steps": info["num_inference_steps"],
            "guidance": args.guidance,
            "width": info["width"],
            "height": info["height"],
            "sampler": args.sampler,
            "scheduler": args.scheduler,
            "max_sequence_length": msl or pipe.default_max_sequence_length(),
            "negative_prompt": args.negative_prompt or "",
            "true_cfg": args.true_cfg,
            "image": args.image or "",
            "strength": args.strength if args.image and pipe.mode == "text" else None,
            "mask": args.mask or "",
            "control_image": ", ".join(args.control_image or []),
            "lora": ", ".join(f"{p}:{w:g}" for p, w in loras),
            "controlnet": ", ".join(f"{p}:{w:g}" for p, w in nets),
            "ip_adapter": f"{args.ip_adapter}:{args.ip_scale:g}" if args.ip_adapter else "",
            "ip_image": args.ip_image or "",
            "redux_image": args.redux_image or "",
            "cache": args.cache or "",
            "dtype": str(pipe.transformer.dtype).removeprefix("torch."),
            "device": str(device),
            "fluxcore_version": fluxcore.__version__,
        }
        meta = PngInfo()
        for key, value in settings.items():
            if value not in (None, ""):
                meta.add_text(key, str(value))
        meta.add_text("parameters", a1111_parameters(settings))
        meta.add_text("fluxcore", json.dumps(settings))
        write_atomically(image, path, meta)
        print(f"wrote {path} ({image.width}x{image.height}, seed {seed})")
    return 0


def _info(args) -> int:
    from fluxcore.weights import info

    if not Path(args.path).exists():
        raise _UsageError(f"fluxcore: {args.path}: no such file or folder")
    print(info(args.path))
    return 0


def _cache_spec(text: str) -> str:
    import fluxcore.cache
    from fluxcore.errors import ConfigError

    try:
        fluxcore.cache.parse(text)
    except ConfigError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return text


# name → (script under benchmarks/, fixed arguments); the user's options follow
BENCHMARKS = {
    "suite": ("gpu_suite.sh", []),
    "kernels": ("kernels.py", []),
    "step": ("step.py", []),
    "load": ("load.py", []),
    "pipeline": ("cpu_ratios.py", ["--parts", "pipeline"]),
    "cpu-ratios": ("cpu_ratios.py", []),
    "cache": ("cache.py", []),
    "compile": ("compile.py", []),
    "vae-memory": ("vae_memory.py", []),
}


def _bench(args) -> int:
    import subprocess

    name, fixed = BENCHMARKS[args.which]
    script = Path(__file__).resolve().parents[1] / "benchmarks" / name
    if not script.is_file():
        raise _UsageError(
            f"fluxcore: {script} not found: the benchmarks ship with the source checkout, not the wheel"
        )
    runner = ["bash"] if name.endswith(".sh") else [sys.executable]
    smoke = ["--smoke"] if args.smoke else []
    return subprocess.call([*runner, str(script), *fixed, *smoke, *args.options])


def main(argv: list[str] | None = None) -> int:
    from fluxcore.errors import ConfigError, FluxcoreError, WeightsError
    from fluxcore.memory import MemoryPlanError

    def one_line_warning(message, category, filename, lineno, file=None, line=None):
        text = " ".join(str(message).split())
        print(f"fluxcore: warning: {text}", file=sys.stderr if file is None else file)

    argv = sys.argv[1:] if argv is None else list(argv)
    debug = "--debug" in argv
    if argv[:1] == ["train-lora"]:  # its own parser (every config field is a flag)
        from fluxcore.finetune import train_lora_main

        return train_lora_main(argv[1:])
    try:
        args = build_parser().parse_args(argv)
        if args.version:
            print(_version())
            return 0
        if args.command is None:
            raise _UsageError(
                "fluxcore: the following arguments are required: command (generate, info, train-lora or bench)"
            )
        with warnings.catch_warnings():
            warnings.showwarning = one_line_warning
            commands = {"generate": _generate, "info": _info, "bench": _bench}
            return commands[args.command](args)
    except _UsageError as e:
        print(str(e), file=sys.stderr)
        return 2
    except (ConfigError, WeightsError, MemoryPlanError) as e:
        print(f"fluxcore: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    except FluxcoreError as e:
        print(f"fluxcore: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("fluxcore: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # an unexpected error: one line, never a traceback unless asked
        if debug:
            raise
        what = " ".join(str(e).split())[:300]
        print(
            f"fluxcore: unexpected error: {type(e).__name__}: {what} (re-run with --debug for the traceback)",
            file=sys.stderr,
        )
        return 1


if __name__ == "__main__":
    sys.exit(main())
