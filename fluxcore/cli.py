"""The `fluxcore` command.

    fluxcore generate "a cat on mars" --model PATH [--steps N --guidance G --seed S --width W
                      --height H --sampler NAME --out FILE.png ...]
    fluxcore info PATH

`generate` writes a PNG whose text chunks hold the prompt and every generation setting (one chunk
per setting, plus "parameters" with all of them as JSON). Without --model it uses the demo model
shipped in fluxcore/assets/flux-tiny/. Misuse exits with status 2 and one line on stderr.
"""

from __future__ import annotations

import argparse
import json
import sys
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


def build_parser() -> argparse.ArgumentParser:
    from fluxcore.sampling import SAMPLERS

    parser = _Parser(prog="fluxcore", description="FLUX.1 image generation with fluxcore.")
    sub = parser.add_subparsers(dest="command", parser_class=_Parser, required=True)

    g = sub.add_parser("generate", help="generate an image from a prompt")
    g.add_argument("prompt", help="the text prompt")
    g.add_argument(
        "--model", help=f"model folder (Hugging Face snapshot or BFL files); default: {DEMO_MODEL}"
    )
    g.add_argument("--steps", type=_positive(int), help="sampling steps (default 4 schnell, 28 otherwise)")
    g.add_argument(
        "--guidance", type=float, default=3.5, help="distilled guidance (dev-type models; default 3.5)"
    )
    g.add_argument("--seed", type=_seed, help="noise seed (default: random, recorded in the PNG)")
    g.add_argument("--width", type=_positive(int), default=None, help="pixels (default 1024; demo model 64)")
    g.add_argument("--height", type=_positive(int), default=None, help="pixels (default 1024; demo model 64)")
    g.add_argument("--sampler", default="euler", choices=list(SAMPLERS), help="sampler (default euler)")
    g.add_argument("--out", default=None, help="output PNG file (default fluxcore-<seed>.png)")
    g.add_argument("--negative-prompt", default=None, help="negative prompt (needs --true-cfg > 1)")
    g.add_argument("--true-cfg", type=float, default=1.0, help="true CFG scale; > 1 doubles the cost")
    g.add_argument(
        "--max-sequence-length", type=_positive(int), default=None, help="T5 tokens (default 256/512)"
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

    i = sub.add_parser("info", help="describe a checkpoint file or folder (headers only)")
    i.add_argument("path")
    return parser


def _generate(args) -> int:
    import random

    import torch
    from PIL.PngImagePlugin import PngInfo

    import fluxcore
    from fluxcore.pipeline import FluxPipeline

    model = Path(args.model) if args.model else DEMO_MODEL
    if args.model is None and not DEMO_MODEL.is_dir():
        raise _UsageError(
            f"fluxcore: no --model given and the demo model {DEMO_MODEL} is not installed; pass --model PATH"
        )
    if not model.is_dir():
        raise _UsageError(f"fluxcore: --model {model}: no such folder")
    out = Path(args.out) if args.out else None
    if out is not None and out.suffix.lower() != ".png":
        raise _UsageError(f"fluxcore: --out must name a .png file, got {out}")
    if args.negative_prompt is not None and args.true_cfg <= 1:
        raise _UsageError("fluxcore: --negative-prompt needs --true-cfg > 1 (e.g. --true-cfg 4)")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(device)
    except RuntimeError:
        raise _UsageError(f"fluxcore: --device {args.device!r} is not a torch device") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise _UsageError("fluxcore: --device cuda asked for, but no CUDA device is available")
    dtype = getattr(torch, _DTYPES[args.dtype]) if args.dtype else None

    small = args.model is None  # the demo model is tiny: default to a tiny image
    width = args.width or (64 if small else 1024)
    height = args.height or (64 if small else 1024)
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(2**32)

    if args.offload:
        pipe = FluxPipeline.from_pretrained(model, torch_dtype=dtype, device="cpu")
        pipe.enable_model_cpu_offload(device)
    else:
        pipe = FluxPipeline.from_pretrained(model, torch_dtype=dtype, device=device)
    result = pipe(
        args.prompt,
        height=height,
        width=width,
        num_inference_steps=args.steps,
        guidance_scale=args.guidance,
        max_sequence_length=args.max_sequence_length,
        generator=seed,
        sampler=args.sampler,
        negative_prompt=args.negative_prompt,
        true_cfg_scale=args.true_cfg,
    )
    image = result.images[0]
    settings = {
        "prompt": args.prompt,
        "model": str(model),
        "variant": str(getattr(pipe.transformer, "variant", "")),
        "seed": seed,
        "steps": result.info["num_inference_steps"],
        "guidance": args.guidance,
        "width": result.info["width"],
        "height": result.info["height"],
        "sampler": args.sampler,
        "max_sequence_length": args.max_sequence_length or pipe.default_max_sequence_length(),
        "negative_prompt": args.negative_prompt or "",
        "true_cfg": args.true_cfg,
        "dtype": str(pipe.transformer.dtype).removeprefix("torch."),
        "device": str(device),
        "fluxcore_version": fluxcore.__version__,
    }
    meta = PngInfo()
    for key, value in settings.items():
        meta.add_text(key, str(value))
    meta.add_text("parameters", json.dumps(settings))
    out = out or Path(f"fluxcore-{seed}.png")
    out.parent.mkdir(parents=True, exist_ok=True)
    image.save(out, format="PNG", pnginfo=meta)
    print(f"wrote {out} ({image.width}x{image.height}, seed {seed})")
    return 0


def _info(args) -> int:
    from fluxcore.weights import info

    if not Path(args.path).exists():
        raise _UsageError(f"fluxcore: {args.path}: no such file or folder")
    print(info(args.path))
    return 0


def main(argv: list[str] | None = None) -> int:
    from fluxcore.errors import ConfigError, FluxcoreError, WeightsError

    def one_line_warning(message, category, filename, lineno, file=None, line=None):
        print(f"fluxcore: warning: {message}", file=sys.stderr if file is None else file)

    try:
        args = build_parser().parse_args(argv)
        with warnings.catch_warnings():
            warnings.showwarning = one_line_warning
            return _generate(args) if args.command == "generate" else _info(args)
    except _UsageError as e:
        print(str(e), file=sys.stderr)
        return 2
    except (ConfigError, WeightsError) as e:
        print(f"fluxcore: error: {e}", file=sys.stderr)
        return 2
    except FluxcoreError as e:
        print(f"fluxcore: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("fluxcore: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
