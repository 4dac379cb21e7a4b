"""Every Triton kernel in fluxcore.kernels, compiled ahead of time for real GPUs on a CPU machine.

For each target (sm_80 A100, sm_86 RTX 3090/A10, sm_89 RTX 4090/L4, sm_90 H100/H200, sm_100 B200,
sm_120 RTX 5090) and each launch configuration the kernels use there — every autotune entry of the
attention kernel's table for that GPU family, and the tiles the elementwise kernels pick at FLUX's
widths — `triton.compile(ASTSource(...), target=GPUTarget("cuda", cap, 32))` runs the whole
pipeline down to ptxas, and the test checks:
  - the kernel compiles;
  - its shared memory fits the GPU's per-block limit;
  - ptxas reports no register spills (its -v log; spilling configs were removed from the tables);
  - on Hopper, the half-precision attention kernel issues wgmma (Hopper's tensor-core MMA) in PTX
    for every tile of at least 64 query rows (a warpgroup MMA's minimum; the 32-row fallback
    uses the older MMA).

Compiling needs no GPU, but takes 2-20 s per attention kernel on a small CPU, so the default run
compiles a fixed sample (`test_sample_compiles_and_fits`); the exhaustive cross product is
`test_every_config_on_every_target` (marked slow; run with `-m slow`). The compiles run in child
processes: this test process runs Triton in interpreter mode (conftest.py), which cannot compile.

Also here, the run-time side: an attention backend that fails to compile or launch makes "auto"
fall back (one warning naming it) while the explicit backend raises, and the other backends'
numerics where they run on CPU (FlexAttention against eager).

    python tests/test_kernels_aot.py --targets 90 --dtypes bf16 --jobs 2    # the worker, by hand
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import re
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Shared memory per block (opt-in maximum), bytes, from NVIDIA's CUDA C++ Programming Guide
# "Technical Specifications per Compute Capability".
SHARED_LIMIT = {80: 163 * 1024, 86: 99 * 1024, 89: 99 * 1024, 90: 227 * 1024, 100: 227 * 1024, 120: 99 * 1024}
TARGETS = tuple(SHARED_LIMIT)
DTYPES = ("bf16", "fp16", "fp32")

# FLUX widths: hidden 3072, MLP 12288 (the join writes 3072 + 12288), head dim 128; plus the small
# widths and head dim 64 the tiny configs use, which take the other tile branches.
HIDDEN, JOIN, HEAD_DIMS = (3072, 64), (15360, 320), (128, 64)


# --- the worker: runs in a child process without TRITON_INTERPRET --------------------------------


def _cases(cap: int, dtypes: tuple[str, ...]) -> list[dict]:
    """Every (kernel, constexprs, warps, stages, dtype) launched on a GPU of capability `cap`."""
    from fluxcore.kernels import attention as A
    from fluxcore.kernels._common import TILE, next_pow2, warps_for

    cases = []
    fam = A.family((cap // 10, cap % 10))
    for dt in dtypes:
        for d in (64, 128, 256):
            for index, cfg in enumerate(A.autotune_configs(fam, d)):
                const = {
                    "HEAD_DIM": d, **cfg.kwargs, "UPCAST": False, "PRECISION": "ieee" if dt == "fp32" else "tf32",
                }  # fmt: skip
                cases.append({"kernel": "attention", "dtype": dt, "const": const, "warps": cfg.num_warps,
                              "stages": cfg.num_stages, "index": index})  # fmt: skip
        for c in HIDDEN:
            block_c = next_pow2(c)
            block_r = max(1, min(16, TILE // block_c))
            cases.append({"kernel": "adaln", "dtype": dt, "const": {"BLOCK_R": block_r, "BLOCK_C": block_c},
                          "warps": warps_for(block_r * block_c), "stages": 3})  # fmt: skip
        for kernel, widths in (("gated_residual", HIDDEN), ("gelu_concat", JOIN)):
            for c in widths:
                block_c = min(1024, next_pow2(c))
                block_r = max(1, TILE // block_c)
                cases.append({"kernel": kernel, "dtype": dt, "const": {"BLOCK_R": block_r, "BLOCK_C": block_c},
                              "warps": warps_for(block_r * block_c), "stages": 3})  # fmt: skip
        for d in HEAD_DIMS:
            for block_l in sorted({16, max(16, TILE // d)}):  # short sequences, and the long-L tile
                for norm in (True, False):
                    cases.append({"kernel": "qk_norm_rope", "dtype": dt,
                                  "const": {"HALF": d // 2, "BLOCK_L": block_l, "NORM": norm},
                                  "warps": warps_for(block_l * d), "stages": 3})  # fmt: skip
    for case in cases:
        case["cap"] = cap
    return cases


TENSOR_ARGS = {"X", "SHIFT", "SCALE", "O", "G", "Y", "A", "Hid", "Q", "K", "V", "Out", "QO", "KO"}


def _signature(case: dict):
    from fluxcore.kernels import attention, modulation, rope

    fn = {
        "attention": attention._flash_attention_kernel,
        "adaln": modulation._adaln_kernel,
        "gated_residual": modulation._gated_residual_kernel,
        "gelu_concat": modulation._gelu_concat_kernel,
        "qk_norm_rope": rope._qk_norm_rope_kernel,
    }[case["kernel"]]
    ptr = "*" + case["dtype"]
    fp32_ptrs = {"QS", "KS", "PE"}
    sig, attrs = {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in TENSOR_ARGS or name in fp32_ptrs or name.startswith("stride"):
            # What Triton's launcher specialises on for FLUX's tensors: 16-byte-aligned pointers and
            # strides that are multiples of 16 (hidden 3072, head dim 128, ...). Without these hints
            # the loads are not vectorised and nearly every attention config spills registers.
            attrs[(i,)] = [["tt.divisibility", 16]]
        if name in case["const"]:
            sig[name] = "constexpr"
        elif name in fp32_ptrs:
            sig[name] = "*fp32"
        elif name in ("eps", "qk_scale"):
            sig[name] = "fp32"
        elif name in TENSOR_ARGS:
            sig[name] = ptr
        else:
            sig[name] = "i32"
    return fn, sig, attrs


def compile_case(case: dict) -> dict:
    """Compile one case; returns it with shared memory, registers, spills, wgmma and seconds."""
    import triton
    from triton.backends.compiler import GPUTarget

    fn, sig, attrs = _signature(case)
    log = io.StringIO()
    t0 = time.perf_counter()
    try:
        with contextlib.redirect_stdout(log):  # TRITON_DUMP_PTXAS_LOG prints ptxas -v here
            k = triton.compile(
                triton.compiler.ASTSource(fn, sig, constexprs=case["const"], attrs=attrs),
                target=GPUTarget("cuda", case["cap"], 32),
                options={"num_warps": case["warps"], "num_stages": case["stages"]},
            )
    except Exception as e:
        return {**case, "error": f"{type(e).__name__}: {str(e)[-400:]}"}
    text = log.getvalue()
    spills = [int(n) for n in re.findall(r"(\d+) bytes spill (?:stores|loads)", text)]
    regs = [int(n) for n in re.findall(r"Used (\d+) registers", text)]
    return {
        **case,
        "shared": k.metadata.shared,
        "registers": max(regs, default=None),
        "spill_bytes": sum(spills) if spills else None,
        "wgmma": "wgmma" in k.asm["ptx"],
        "seconds": round(time.perf_counter() - t0, 2),
    }


def worker_main(argv: list[str]) -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--targets", default=",".join(map(str, TARGETS)))
    p.add_argument("--dtypes", default=",".join(DTYPES))
    p.add_argument("--kernels", default="")
    p.add_argument("--sample", action="store_true", help="the fixed fast sample only")
    p.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    cases = []
    for cap in map(int, args.targets.split(",")):
        cases += _cases(cap, tuple(args.dtypes.split(",")))
    if args.kernels:
        cases = [c for c in cases if c["kernel"] in args.kernels.split(",")]
    if args.sample:
        cases = sample(cases)
    with ProcessPoolExecutor(max_workers=args.jobs) as pool:
        results = list(pool.map(compile_case, cases))
    text = json.dumps(results)
    if args.out:
        Path(args.out).write_text(text)
    else:
        print(text)


def sample(cases: list[dict]) -> list[dict]:
    """The default run: bf16 only; per target the elementwise kernels at FLUX widths; the attention
    kernel at head dim 128 with its table's first entry on sm_90 (wgmma, 227 KB) and on sm_86
    (the 99 KB limit), and the fallback tile on sm_120."""
    out = []
    for c in cases:
        if c["dtype"] != "bf16":
            continue
        const = c["const"]
        if c["kernel"] == "attention":
            first = const["HEAD_DIM"] == 128 and c["cap"] in (90, 86) and c["index"] == 0
            fallback = const["HEAD_DIM"] == 128 and c["cap"] == 120 and const["BLOCK_M"] == 32
            if first or fallback:
                out.append(c)
        elif (
            c["cap"] in (80, 120)
            and const.get("BLOCK_C", 0) >= 1024
            or (c["kernel"] == "qk_norm_rope" and c["cap"] == 90 and const["HALF"] == 64 and const["NORM"])
        ):
            out.append(c)
    return out


# --- the tests -----------------------------------------------------------------------------------


def run_worker(*args: str, timeout: int = 3000) -> list[dict]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DUMP_PTXAS_LOG"] = "1"
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    # A fresh cache per run: a cached kernel would skip ptxas, and its log is what tells spills.
    import tempfile

    with tempfile.TemporaryDirectory() as cache:
        env["TRITON_CACHE_DIR"] = cache
        proc = subprocess.run(
            [sys.executable, str(Path(__file__).resolve()), "--worker", *args],
            capture_output=True, text=True, env=env, cwd=ROOT, timeout=timeout,
        )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def check(results: list[dict]) -> list[str]:
    """Problems found, one line each (empty when every kernel compiled, fits and does not spill)."""
    bad = []
    for r in results:
        name = (
            f"{r['kernel']} sm_{r['cap']} {r['dtype']} {r['const']} warps={r['warps']} stages={r['stages']}"
        )
        if "error" in r:
            bad.append(f"{name}: {r['error']}")
            continue
        if r["shared"] > SHARED_LIMIT[r["cap"]]:
            bad.append(f"{name}: {r['shared']} B shared memory > {SHARED_LIMIT[r['cap']]} B")
        if r["spill_bytes"] is None:
            bad.append(f"{name}: no ptxas -v log read (spills unknown)")
        elif r["spill_bytes"]:
            bad.append(f"{name}: {r['spill_bytes']} B of register spills ({r['registers']} registers)")
        # A warpgroup MMA covers 64 rows: smaller tiles (the 32×32 fallback) use the Ampere MMA.
        hopper_tile = r["kernel"] == "attention" and r["cap"] == 90 and r["const"]["BLOCK_M"] >= 64
        if hopper_tile and r["dtype"] != "fp32" and not r["wgmma"]:
            bad.append(f"{name}: no wgmma in the Hopper PTX")
    return bad


def test_sample_compiles_and_fits():
    results = run_worker("--sample", "--jobs", "2", "--dtypes", "bf16", timeout=600)
    assert {r["cap"] for r in results} >= {80, 86, 90, 120}
    assert sum(r["kernel"] == "attention" for r in results) >= 3
    assert not check(results), "\n".join(check(results))


@pytest.mark.slow
def test_every_config_on_every_target(request):
    # Minutes of compiling: only when asked for (`-m slow`, or FLUXCORE_AOT_ALL=1), not in every run.
    if "slow" not in (request.config.option.markexpr or "") and os.environ.get("FLUXCORE_AOT_ALL") != "1":
        pytest.skip("the exhaustive ahead-of-time compile runs with -m slow or FLUXCORE_AOT_ALL=1")
    results = run_worker("--jobs", str(os.cpu_count() or 1))
    assert len({(r["cap"], r["kernel"]) for r in results}) == len(TARGETS) * 5
    assert not check(results), "\n".join(check(results))


# --- run time: fallback and the other backends ---------------------------------------------------


def test_auto_falls_back_once_when_the_triton_kernel_fails(monkeypatch):
    import fluxcore.kernels
    import torch

    from fluxcore.attention import _REGISTRY, attention, register_backend

    attn_mod = sys.modules["fluxcore.attention"]  # (fluxcore.attention is also the function's name)

    def broken(q, k, v):
        raise RuntimeError("PTX .version 9.9 does not support .target sm_99 (simulated)")

    triton_backend = _REGISTRY["triton"]
    monkeypatch.setattr(fluxcore.kernels, "flash_attention", broken)
    monkeypatch.setattr(attn_mod, "_broken", set())
    # Let "auto" consider the Triton backend for CPU tensors, as it does for CUDA ones.
    register_backend("triton", triton_backend.fn, lambda q: None, triton_backend.priority, lambda q: True)
    try:
        q, k, v = (torch.randn(1, 2, 19, 16) for _ in range(3))
        with pytest.warns(RuntimeWarning, match="'triton' failed .*sm_99"):
            out = attention(q, k, v)
        torch.testing.assert_close(out, attention(q, k, v, backend="sdpa"))
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("error")  # once: the broken backend is skipped silently now
            attention(q, k, v)
        with pytest.raises(RuntimeError, match="simulated"):
            attention(q, k, v, backend="triton")  # named explicitly: raises
    finally:
        _REGISTRY["triton"] = triton_backend


def test_flex_attention_matches_eager_on_cpu():
    import torch

    from fluxcore.attention import attention

    g = torch.Generator().manual_seed(0)
    for shape in [(2, 3, 37, 32), (1, 4, 130, 64)]:  # lengths not multiples of 8 or 128, batch > 1
        q, k, v = (torch.randn(*shape, generator=g) for _ in range(3))
        torch.testing.assert_close(
            attention(q, k, v, backend="flex"), attention(q, k, v, backend="eager"), rtol=1e-5, atol=1e-5
        )
        torch.testing.assert_close(
            attention(q, k, v, backend="sdpa-math"), attention(q, k, v, backend="eager"), rtol=1e-5, atol=1e-5
        )


def test_optional_backends_state_their_reason_and_are_not_imported():
    code = (
        "import sys, torch, fluxcore\n"
        "from fluxcore.attention import resolve_backend, available_backends\n"
        "from fluxcore.errors import BackendError\n"
        "mods = ['flash_attn', 'flash_attn_interface', 'sageattention', 'triton',\n"
        "        'torch.nn.attention.flex_attention']\n"
        "assert not [m for m in mods if m in sys.modules], [m for m in mods if m in sys.modules]\n"
        "q = torch.randn(1, 2, 8, 64)\n"
        "for name in ['flash3', 'flash2', 'sage', 'sdpa-cudnn', 'sdpa-flash', 'sdpa-efficient']:\n"
        "    try:\n"
        "        resolve_backend(q, name)\n"
        "        raise SystemExit(name + ' resolved on CPU')\n"
        "    except BackendError as e:\n"
        "        assert 'cannot run: it needs a CUDA device' in str(e), e\n"
        "names = available_backends(q)\n"
        "assert names[0] == 'sdpa' and {'flex', 'sdpa-math', 'eager'} <= set(names), names\n"
        "print('ok')\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("FLUXCORE_ATTENTION", "TRITON_INTERPRET")}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, env=env)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-2000:]


if __name__ == "__main__" and len(sys.argv) > 1 and sys.argv[1] == "--worker":
    sys.path.insert(0, str(ROOT))
    worker_main(sys.argv[2:])
