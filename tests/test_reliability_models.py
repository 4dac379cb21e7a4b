"""Tiny models and helpers shared by the reliability tests (no tests of its own).

Every model here is a few hundred KB, so a save takes milliseconds and a subprocess that imports
fluxcore dominates the cost of a test.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import torch

from fluxcore import Flux, FluxConfig
from fluxcore.autoencoder import AutoEncoder, AutoEncoderConfig
from fluxcore.text.clip import CLIPTextConfig, CLIPTextEncoder
from fluxcore.text.t5 import T5Config, T5Encoder

ROOT = Path(__file__).resolve().parents[1]

FLUX = FluxConfig(
    in_channels=4,
    out_channels=4,
    vec_in_dim=8,
    context_in_dim=8,
    hidden_size=16,
    num_heads=1,
    depth=1,
    depth_single_blocks=1,
    axes_dim=(4, 6, 6),
)
T5 = T5Config(
    vocab_size=64, d_model=16, d_kv=4, d_ff=32, num_layers=2, num_heads=4, relative_attention_num_buckets=8
)
CLIP = CLIPTextConfig(
    vocab_size=64,
    hidden_size=16,
    intermediate_size=32,
    num_hidden_layers=2,
    num_attention_heads=2,
    max_position_embeddings=16,
)
VAE = AutoEncoderConfig(ch=8, ch_mult=(1, 2), num_res_blocks=1, z_channels=4, norm_groups=4, resolution=32)


def filled(model: torch.nn.Module, value: float | None = None, seed: int = 0) -> torch.nn.Module:
    """`model` with every parameter set to `value` (a version tag), or random when None."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if value is None:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
            else:
                p.fill_(value)
    return model.eval()


def flux(value=None) -> Flux:
    return filled(Flux(FLUX), value)


def t5(value=None) -> T5Encoder:
    return filled(T5Encoder(T5), value)


def clip(value=None) -> CLIPTextEncoder:
    return filled(CLIPTextEncoder(CLIP), value)


def vae(value=None) -> AutoEncoder:
    return filled(AutoEncoder(VAE), value)


def versions(model: torch.nn.Module) -> set[float]:
    """The distinct values of a model filled by `filled(model, value)`: one value means one save."""
    return {float(v) for p in model.parameters() for v in p.detach().unique().tolist()}


def leftovers(folder: Path) -> list[str]:
    """Temp names of unfinished saves in `folder`."""
    return sorted(p.name for p in Path(folder).iterdir() if p.name.endswith((".partial", ".old")))


def run_py(code: str, *args, timeout: float = 60) -> subprocess.CompletedProcess:
    """Run `code` in a fresh interpreter (repository on sys.path, one thread); never hangs."""
    env = dict(os.environ, PYTHONPATH=f"{ROOT}{os.pathsep}{ROOT / 'tests'}", OMP_NUM_THREADS="1")
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code), *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        cwd=ROOT,
    )


def last_json(proc: subprocess.CompletedProcess) -> dict:
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    assert lines, f"no result (rc {proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    return json.loads(lines[-1])
