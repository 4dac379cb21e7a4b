"""A whole pipeline call under context parallel (2 gloo processes) against one process, and the
VAE's tiled decode split across ranks (fluxcore.parallel_decode) against the one-process tiled
decode. The shipped tiny model (fluxcore/assets/flux-tiny); every rank computes the one-process
result itself first, then the distributed one, and reports the differences."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from test_parallel import launch

MODEL = Path(__file__).resolve().parents[1] / "fluxcore" / "assets" / "flux-tiny"
CALL = dict(
    prompt="a red circle on a blue background", height=96, width=128, num_inference_steps=3, output_type="np"
)
TIMEOUT_S = 55


def _image(pipe):
    return pipe(**CALL, generator=torch.Generator().manual_seed(7)).images


def _worker_pipeline(rank, world):
    from fluxcore import FluxPipeline
    from fluxcore.parallel_decode import splits_tiles

    pipe = FluxPipeline.from_pretrained(MODEL)
    out = {}
    # untiled decode (every rank decodes the whole image), then per-tile tiling (tiles split)
    for name, tiling in (
        ("untiled", None),
        ("tiled", dict(tile_sample_size=32, tile_overlap=0.25, shared_norm=False)),
    ):
        if tiling is not None:
            pipe.enable_vae_tiling(**tiling)
        ref = _image(pipe)
        pipe.enable_context_parallel(ulysses=2)
        got = _image(pipe)
        pipe.disable_context_parallel()
        after = _image(pipe)
        out[name] = dict(
            err=float(np.abs(got - ref).max()),
            err_after=float(np.abs(after - ref).max()),
            shape=list(got.shape),
            splits=splits_tiles(pipe.ae),
            std=float(ref.std()),
        )
    return out


def _worker_decode(rank, world):
    import torch.distributed as dist

    from fluxcore.autoencoder import AutoEncoder
    from fluxcore.parallel_decode import decode_across_ranks
    from fluxcore.weights.autoencoder import load_autoencoder

    ae = load_autoencoder(MODEL / "vae", dtype=torch.float32)
    g = torch.Generator().manual_seed(3)
    cases = {  # name: (latents, tiling kwargs, slicing)
        "3x3-grid": (
            torch.randn(1, 16, 12, 16, generator=g),
            dict(tile_sample_size=48, tile_overlap=0.25),
            False,
        ),
        "batch2": (
            torch.randn(2, 16, 10, 14, generator=g),
            dict(tile_sample_size=32, tile_overlap=0.3),
            False,
        ),
        "sliced": (
            torch.randn(2, 16, 10, 14, generator=g),
            dict(tile_sample_size=32, tile_overlap=0.3),
            True,
        ),
        "two-tiles": (torch.randn(1, 16, 6, 4, generator=g), dict(tile_sample_size=32), False),
        "one-tile": (torch.randn(1, 16, 4, 4, generator=g), dict(tile_sample_size=32), False),
    }
    out = {}
    with torch.no_grad():
        for name, (z, tiling, slicing) in cases.items():
            ae.enable_tiling(**tiling, shared_norm=False)
            ae.use_slicing = slicing
            ref = ae.decode(z)
            calls = []
            hook = ae.decoder.register_forward_hook(lambda *a: calls.append(1))
            got = decode_across_ranks(ae, z, dist.group.WORLD)
            hook.remove()
            out[name] = dict(
                err=(got - ref).abs().max().item(),
                shape=list(got.shape),
                ref_shape=list(ref.shape),
                calls=len(calls),
            )
        # shared-norm tiling and no tiling: the whole decode on every rank, the same result
        for name, setup in (("shared-norm", lambda: ae.enable_tiling(32)), ("untiled", ae.disable_tiling)):
            setup()
            z = cases["batch2"][0]
            out[name] = dict(err=(decode_across_ranks(ae, z, None) - ae.decode(z)).abs().max().item())
    assert isinstance(ae, AutoEncoder)
    return out


def test_pipeline_context_parallel_matches_one_process(tmp_path):
    results = launch(_worker_pipeline, 2, tmp_path, timeout=TIMEOUT_S)
    for rank, res in enumerate(results):
        for name, r in res.items():
            print(f"rank {rank} {name}: max pixel diff {r['err']:.2e} (after disable {r['err_after']:.1e})")
            assert r["shape"] == [1, CALL["height"], CALL["width"], 3], r
            assert r["std"] > 0.01, r  # a real image, not a constant
            assert r["err"] <= 1e-4, (name, r)
            assert r["err_after"] == 0.0, (name, r)
        assert res["tiled"]["splits"] and not res["untiled"]["splits"]


def test_decode_across_ranks_matches_tiled_decode(tmp_path):
    results = launch(_worker_decode, 2, tmp_path, timeout=TIMEOUT_S)
    for rank, res in enumerate(results):
        for name, r in res.items():
            print(f"rank {rank} {name}: max diff {r['err']:.1e}")
            assert r["err"] <= 1e-6, (name, r)
            if "shape" in r:
                assert r["shape"] == r["ref_shape"], (name, r)
        # decoder calls on this rank: tiles k ≡ rank (mod 2) of the 3 × 3 grid, one image decoded whole
        assert res["3x3-grid"]["calls"] == (5, 4)[rank] and res["one-tile"]["calls"] == 1
        assert res["two-tiles"]["calls"] == 1 and res["batch2"]["calls"] == (8, 7)[rank]
