"""Context parallelism (fluxcore.parallel) on CPU: 2 and 4 gloo processes against one process.

Each launch starts N spawned processes with torchrun's environment variables; every rank builds the
same seeded tiny model, computes the single-process output itself, then the sharded one, and
writes its errors and byte counts to a JSON file the test reads. Launches are bounded by a timeout.
"""

from __future__ import annotations

import json
import math
import os
import socket
import time
import traceback
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from fluxcore import PRESETS, Flux
from fluxcore.errors import BackendError

TIMEOUT_S = 75


# --- launcher (shared shape with the other distributed tests) ---------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(worker, rank, world, port, out_dir):
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank),
    )
    torch.set_num_threads(1)
    from fluxcore.distributed import destroy_distributed, init_distributed

    result = {}
    try:
        init_distributed()
        result = worker(rank, world)
    except BaseException:
        result = {"error": traceback.format_exc()}
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(result))
    destroy_distributed()


def launch(worker, world: int, tmp_path: Path, timeout: float = TIMEOUT_S) -> list[dict]:
    ctx = mp.get_context("spawn")
    port = _free_port()
    procs = [ctx.Process(target=_entry, args=(worker, r, world, port, str(tmp_path))) for r in range(world)]
    for p in procs:
        p.start()
    end = time.monotonic() + timeout
    for p in procs:
        p.join(max(0.1, end - time.monotonic()))
    hung = [p for p in procs if p.is_alive()]
    for p in hung:
        p.kill()
        p.join(5)
    assert not hung, f"{len(hung)} of {world} processes still running after {timeout}s"
    results = []
    for r in range(world):
        f = tmp_path / f"rank{r}.json"
        assert f.exists(), f"rank {r} wrote no result (exit code {procs[r].exitcode})"
        res = json.loads(f.read_text())
        assert "error" not in res, f"rank {r} failed:\n{res['error']}"
        results.append(res)
    return results


# --- the scenarios ------------------------------------------------------------------------------


def _inputs(config, batch, txt_len, img_hw, ref_hw=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    h, w = img_hw
    ids = torch.zeros(h, w, 3)
    ids[..., 1] = torch.arange(h)[:, None]
    ids[..., 2] = torch.arange(w)[None, :]
    ids = ids.reshape(1, h * w, 3)
    if ref_hw is not None:  # Kontext: reference tokens with index 1 appended to the image sequence
        rh, rw = ref_hw
        ref = torch.ones(rh, rw, 3)
        ref[..., 1] = torch.arange(rh)[:, None]
        ref[..., 2] = torch.arange(rw)[None, :]
        ids = torch.cat((ids, ref.reshape(1, rh * rw, 3)), dim=1)
    L = ids.shape[1]
    return dict(
        img=torch.randn(batch, L, config.in_channels, generator=g),
        img_ids=ids.expand(batch, -1, -1).contiguous(),
        txt=torch.randn(batch, txt_len, config.context_in_dim, generator=g),
        txt_ids=torch.zeros(batch, txt_len, 3),
        timesteps=torch.rand(batch, generator=g),
        y=torch.randn(batch, config.vec_in_dim, generator=g),
        guidance=torch.full((batch,), 3.5),
    )


def _run_scenarios(scenarios, mesh_for=None):
    from fluxcore.parallel import context_parallel, expected_bytes_per_forward

    config = PRESETS["tiny-dev"]
    torch.manual_seed(0)
    model = Flux(config).eval()
    keys = list(model.state_dict())
    out = []
    for name, u, r, batch, txt_len, img_hw, ref_hw in scenarios:
        inputs = _inputs(config, batch, txt_len, img_hw, ref_hw)
        with torch.no_grad():
            ref = model(**inputs)
            mesh = mesh_for(u, r) if mesh_for else None
            handle = context_parallel(model, ulysses=u, ring=r, mesh=mesh)
            got = model(**inputs)
            bytes_sent = dict(handle.stats.bytes)
            handle.stats.reset()
            # positional call, as the sampler does not use: the pre-hook binds either way
            got2 = model(*inputs.values())
            handle.remove()
            after = model(**inputs)
        expected = expected_bytes_per_forward(
            batch=batch,
            txt_len=txt_len,
            img_len=inputs["img"].shape[1],
            hidden_size=config.hidden_size,
            out_channels=config.out_channels,
            num_layers=config.depth + config.depth_single_blocks,
            ulysses=u,
            ring=r,
        )
        out.append(
            dict(
                name=name,
                shape=list(got.shape),
                ref_shape=list(ref.shape),
                err=(got - ref).abs().max().item(),
                err_positional=(got2 - ref).abs().max().item(),
                err_after_remove=(after - ref).abs().max().item(),
                bytes=bytes_sent,
                expected=expected,
                keys_same=list(model.state_dict()) == keys,
                hooks_left=len(model._forward_pre_hooks) + len(model._forward_hooks),
            )
        )
    return {"scenarios": out}


def _worker_2(rank, world):
    scenarios = [
        # name, ulysses, ring, batch, txt tokens, image grid, Kontext reference grid
        ("ulysses2", 2, 1, 1, 8, (4, 4), None),
        ("ring2", 1, 2, 1, 8, (4, 4), None),
        ("ulysses2-uneven", 2, 1, 1, 7, (5, 3), None),
        ("ring2-uneven", 1, 2, 1, 5, (3, 3), None),
        ("ulysses2-batch2", 2, 1, 2, 6, (4, 6), None),
        ("ring2-kontext", 1, 2, 2, 6, (4, 4), (3, 5)),
        ("ulysses2-kontext", 2, 1, 1, 6, (4, 4), (3, 5)),
    ]
    return _run_scenarios(scenarios)


def _worker_4(rank, world):
    from torch.distributed.device_mesh import init_device_mesh

    def mesh_for(u, r):
        if u * r == 4:
            return None
        # two replicas of a 2-way Ulysses group: extra mesh dims are ignored by the transform
        return init_device_mesh("cpu", (2, 2), mesh_dim_names=("replica", "ulysses"))

    scenarios = [
        ("ulysses4", 4, 1, 1, 8, (4, 4), None),
        ("ulysses2xring2", 2, 2, 1, 8, (4, 4), None),
        ("ulysses2xring2-uneven-batch2", 2, 2, 2, 5, (3, 5), None),
        ("ring4-uneven", 1, 4, 1, 3, (3, 3), None),  # shard 3 holds no text at all
        ("ulysses4-kontext-uneven", 4, 1, 2, 7, (3, 4), (2, 3)),
        ("ulysses2-replicas", 2, 1, 1, 7, (3, 3), None),
    ]
    return _run_scenarios(scenarios, mesh_for)


def _check(results, world):
    report = []
    for res in results:
        for s in res["scenarios"]:
            assert s["shape"] == s["ref_shape"], s
            assert s["err"] <= 1e-5, s
            assert s["err_positional"] <= 1e-5, s
            assert s["err_after_remove"] == 0.0, s
            assert s["bytes"] == s["expected"], s
            assert s["keys_same"] and s["hooks_left"] == 0, s
            report.append((s["name"], s["err"], sum(s["bytes"].values())))
    print(
        f"\n{world} ranks:",
        *(f"{n}: max err {e:.1e}, {b} B sent/rank" for n, e, b in report[: len(report) // world]),
        sep="\n  ",
    )


def test_context_parallel_two_ranks(tmp_path):
    _check(launch(_worker_2, 2, tmp_path), 2)


def test_context_parallel_four_ranks(tmp_path):
    _check(launch(_worker_4, 4, tmp_path), 4)


def _worker_errors(rank, world):
    from fluxcore.errors import ConfigError
    from fluxcore.parallel import context_parallel, context_parallel_size

    model = Flux(PRESETS["tiny-dev"].replace(num_heads=2, hidden_size=32, axes_dim=(4, 6, 6)))
    msgs = {}
    for kwargs in ({"ulysses": 4}, {"ulysses": 2, "ring": 1}, {"ring": 3}):
        try:
            context_parallel(model, **kwargs).remove()
            msgs[str(kwargs)] = None
        except ConfigError as e:
            msgs[str(kwargs)] = str(e)
    h = context_parallel(model, ring=2)
    try:
        context_parallel(model, ring=2)
        twice = None
    except ConfigError as e:
        twice = str(e)
    size = context_parallel_size(model)
    h.remove()
    return {"msgs": msgs, "twice": twice, "size": size, "size_after": context_parallel_size(model)}


def test_context_parallel_errors(tmp_path):
    res = launch(_worker_errors, 2, tmp_path)[0]
    # 2 heads: ulysses 4 cannot divide them, and 4 ≠ 2 ranks anyway
    assert "must equal the number of ranks" in res["msgs"]["{'ulysses': 4}"]
    assert res["msgs"]["{'ulysses': 2, 'ring': 1}"] is None
    assert "must equal the number of ranks" in res["msgs"]["{'ring': 3}"]
    assert "already applied" in res["twice"]
    assert res["size"] == 2 and res["size_after"] == 1


def test_backend_refuses_outside_a_forward():
    import fluxcore
    import fluxcore.parallel  # noqa: F401  registers the backend
    from fluxcore import attention

    q = torch.randn(1, 2, 4, 8)
    with pytest.raises(BackendError, match="context_parallel"):
        attention(q, q, q, backend="context_parallel")
    assert "context_parallel" not in fluxcore.available_backends(q)


def test_transform_needs_a_process_group():
    from fluxcore.parallel import context_parallel

    with pytest.raises(BackendError, match="torch.distributed"):
        context_parallel(Flux(PRESETS["tiny-dev"]), ulysses=2)


def test_byte_formula_matches_hand_count():
    from fluxcore.parallel import expected_bytes_per_forward

    # FLUX.1-dev at 1024², bf16, Ulysses 4: 4 tensors of [4608/4, 3072] per layer, 3/4 of each leaves.
    e = expected_bytes_per_forward(
        batch=1,
        txt_len=512,
        img_len=4096,
        hidden_size=3072,
        out_channels=64,
        num_layers=57,
        ulysses=4,
        element_size=2,
    )
    assert e["all_to_all"] == 57 * 4 * 1152 * 3072 * 2 * 3 // 4
    assert math.isclose(e["all_to_all"] / 1e9, 1.21, rel_tol=0.01)
