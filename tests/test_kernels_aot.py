"""Every Triton kernel in fluxcore.kernels, compiled ahead of time for real GPUs on a CPU machine.

For each target (sm_80 A100, sm_86 RTX 3090/A10, sm_89 RTX 4090/L4, sm_90 H100/H200, sm_100 B200,
sm_120 RTX 5090) and each launch configuration the kernels use there — every autotune entry of the
attention kernels' tables for that GPU family (forward with and without the log-sum-exp, per dtype
class; the backward's dK/dV and dQ kernels and its preprocess), and every shape class of the
elementwise kernels (the tiles their launchers pick — computed by the launchers' own functions —
at FLUX's and the tiny configs' widths, each width specialised as Triton's launcher does at run
time: a multiple of 16 or not) — `triton.compile(ASTSource(...), target=GPUTarget("cuda", cap,
32))` runs the whole pipeline down to ptxas, and the test checks:
  - the kernel compiles;
  - its shared memory fits the GPU's per-block limit;
  - ptxas reports no register spills (its -v log; spilling configs were removed from the tables);
  - on Hopper, the half-precision attention kernel issues wgmma (Hopper's tensor-core MMA) in PTX
    for every tile of at least 64 query rows (a warpgroup MMA's minimum; the 32-row fallback
    uses the older MMA).

Compiling needs no GPU. An elementwise kernel compiles in 0.1-0.6 s on a small CPU, an attention
kernel in 1-5 s, so:
  - the default run (`test_sample_compiles_and_fits`) compiles every elementwise case — adaLN,
    gated residual, GELU-concat and QK-norm-RoPE, 40 shape classes × 3 dtypes × 6 targets = 720
    compiles — plus a fixed bf16 sample of the attention and GGUF dequantization kernels (`sample`).
    On the 2-core development machine, shared with other jobs (load ~3.7), the whole file took
    2 min 29 s (2 min 7 s of CPU);
  - the exhaustive cross product, every kernel × configuration × dtype × target, is
    `test_every_config_on_every_target` (marked slow; run with `-m slow` or FLUXCORE_AOT_ALL=1).
    On the same machine (load ~4.5) its 1356 compiles took 9 min 50 s (9 min 52 s of CPU); the
    720 elementwise ones alone, with --jobs 2, 1 min 58 s (1 min 55 s of CPU).
The compiles run in child processes: this test process runs Triton in interpreter mode
(conftest.py), which cannot compile.

Also here, the run-time side: an attention backend that fails to compile or launch makes "auto"
fall back (one warning naming it) while the explicit backend raises, and the other backends'
numerics where they run on CPU (FlexAttention against eager).

    python tests/test_kernels_aot.py --worker --targets 90 --dtypes bf16 --jobs 2    # the worker, by hand
    python tests/test_kernels_aot.py --worker --kernels adaln,gated_residual,gelu_concat,qk_norm_rope \
        --jobs 2 --out /tmp/aot_elem.json                                   # the elementwise sweep
(run it with TRITON_DUMP_PTXAS_LOG=1 and an empty TRITON_CACHE_DIR, as run_worker does: a cached
kernel skips ptxas, whose log tells the spills).
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

# The elementwise kernels' shape classes. Widths: FLUX's hidden 3072 (and its MLP 12288: the join
# writes 3072 + 12288) and the tiny configs' 64 (+ 256); for adaLN also the widest row a program
# holds whole and a wider one that it walks in chunks. Each width is compiled as Triton's launcher
# specialises it — a multiple of 16 — and 8 channels narrower (then the loads are not vectorised),
# contiguous and as a view (see _elementwise_cases). Head dims: FLUX's 128, the tiny configs' 16,
# and 64 and 256. Lengths: short (one 16-row tile) and FLUX's 4096 + 512 tokens (the long tile).
HIDDEN, JOIN, HEAD_DIMS, LENGTHS = (3072, 64), ((3072, 12288), (64, 256)), (128, 64, 16, 256), (8, 4608)
ELEMENTWISE = ("adaln", "gated_residual", "gelu_concat", "qk_norm_rope")


# --- the worker: runs in a child process without TRITON_INTERPRET --------------------------------


def _cases(cap: int, dtypes: tuple[str, ...]) -> list[dict]:
    """Every (kernel, constexprs, warps, stages, dtype) launched on a GPU of capability `cap`."""
    from fluxcore.kernels import attention as A
    from fluxcore.kernels import attention_backward as AB
    from fluxcore.kernels._common import warps_for

    cases = []
    fam = A.family((cap // 10, cap % 10))
    for dt in dtypes:
        fp32, precision = dt == "fp32", "ieee" if dt == "fp32" else "tf32"
        for d in (64, 128, 256):
            for index, cfg in enumerate(A.autotune_configs(fam, d, fp32=fp32)):
                for store_lse in (False, True):  # inference, and training (the forward writes the LSE)
                    const = {"HEAD_DIM": d, **cfg.kwargs, "STORE_LSE": store_lse, "UPCAST": False,
                             "PRECISION": precision}  # fmt: skip
                    cases.append({"kernel": "attention", "dtype": dt, "const": const, "warps": cfg.num_warps,
                                  "stages": cfg.num_stages, "index": index})  # fmt: skip
            # the backward: its two autotuned kernels, and the delta = rowsum(dO·O) preprocess
            for kernel, configs in zip(ATTENTION_BACKWARD[1:], AB.backward_configs(fam, d, fp32)):
                for index, cfg in enumerate(configs):
                    const = {"HEAD_DIM": d, **cfg.kwargs, "UPCAST": False, "PRECISION": precision}
                    cases.append({"kernel": kernel, "dtype": dt, "const": const, "warps": cfg.num_warps,
                                  "stages": cfg.num_stages, "index": index})  # fmt: skip
            cases.append({"kernel": ATTENTION_BACKWARD[0], "dtype": dt, "warps": 4, "stages": 3,
                          "const": {"HEAD_DIM": d, "BLOCK_M": AB.preprocess_block(d)}})  # fmt: skip
        cases += [{**case, "dtype": dt} for case in _elementwise_cases()]
        from fluxcore.kernels import dequant as DQ

        for qtype, (type_id, elements, size) in DQ.TYPES.items():  # GGUF decoding, every covered type
            per = DQ.blocks_per_program(qtype)
            cases.append({"kernel": DEQUANT_KERNELS[elements], "dtype": dt, "qtype": qtype,
                          "const": {"QTYPE": type_id, "BYTES": size, "BLOCKS": per},
                          "warps": warps_for(per * elements), "stages": 3,
                          "args": {"n_blocks": 3072 * 12288 // elements},  # a FLUX MLP weight
                          "options": {"enable_fp_fusion": False}})  # fmt: skip
    for case in cases:
        case["cap"] = cap
    return cases


def _elementwise_cases() -> list[dict]:
    """The elementwise kernels' launches at the widths and lengths above (batch 1), each with the
    constexprs and warps its launcher picks (the launcher's own function, so the two cannot drift)
    and its integer arguments ("args"), which Triton's launcher specialises on (see _signature)."""
    from fluxcore.kernels import modulation as M
    from fluxcore.kernels import rope

    def case(kernel, meta, **args):
        meta = dict(meta)
        warps = meta.pop("num_warps")
        assert 1 not in args.values()  # Triton would make an argument equal to 1 a constexpr
        return {"kernel": kernel, "const": meta, "warps": warps, "stages": 3, "args": args}

    cases = []
    # (channels dropped, views): a width that is a multiple of 16, at FLUX's length; 8 channels
    # fewer, contiguous, at a length 8 shorter (no integer argument is a multiple of 16); the same as
    # a view into rows of the full width (only the strides are).
    for narrower, view in ((0, False), (8, False), (8, True)):
        L = LENGTHS[-1] - narrower
        for w in (*HIDDEN, M.ADALN_ROW_MAX, 2 * M.ADALN_ROW_MAX):
            c, s = w - narrower, w if view else w - narrower  # width, row stride
            cases.append(case("adaln", M.adaln_launch(c), stride_xb=L * s, stride_xl=s,
                              stride_shb=6 * s, stride_scb=6 * s, R=L, L=L, C=c))  # fmt: skip
        for w in HIDDEN:
            c, s = w - narrower, w if view else w - narrower
            cases.append(case("gated_residual", M.elementwise_launch(c), stride_xb=L * s, stride_xl=s,
                              stride_gb=6 * s, stride_yb=L * s, stride_yl=s, R=L, L=L, C=c))  # fmt: skip
        for wa, ch in JOIN:  # h: the MLP part of the single block's linear1 output [L, 3·CA + CH]
            ca, sa = wa - narrower, wa if view else wa - narrower
            sh = 3 * sa + ch
            cases.append(case("gelu_concat", M.elementwise_launch(ca + ch), stride_ab=L * sa, stride_al=sa,
                              stride_hb=L * sh, stride_hl=sh, R=L, L=L, CA=ca, CH=ch))  # fmt: skip
    heads = 24
    for d in HEAD_DIMS:  # q, k: views of the fused qkv projection's output [L, 3, H, D]
        for length in LENGTHS:
            for norm in (True, False):
                meta = {**rope.qk_norm_rope_launch(length, d), "NORM": norm}
                b, l = length * 3 * heads * d, 3 * heads * d
                cases.append(case("qk_norm_rope", meta, stride_qb=b, stride_qh=d, stride_ql=l, stride_kb=b,
                                  stride_kh=d, stride_kl=l, stride_pb=length * 2 * d, stride_pl=2 * d,
                                  H=heads, L=length))  # fmt: skip
    return cases


TENSOR_ARGS = {"X", "SHIFT", "SCALE", "O", "G", "Y", "A", "Hid", "Q", "K", "V", "Out", "QO", "KO"}
TENSOR_ARGS |= {"DO", "DQ", "DK", "DV"}  # the attention backward's
# the attention backward's kernels: preprocess (delta), dK/dV, dQ
ATTENTION_BACKWARD = ("attention_bwd_preprocess", "attention_bwd_dkdv", "attention_bwd_dq")
# the GGUF dequantization kernels by block size; their Q is the packed bytes (*u8), O the output
DEQUANT_KERNELS = {32: "gguf_dequant_32", 256: "gguf_dequant_k"}


def _signature(case: dict):
    from fluxcore.kernels import attention, attention_backward, dequant, modulation, rope

    fn = {
        "attention": attention._flash_attention_kernel,
        "attention_bwd_preprocess": attention_backward._attention_bwd_preprocess_kernel,
        "attention_bwd_dkdv": attention_backward._attention_bwd_dkdv_kernel,
        "attention_bwd_dq": attention_backward._attention_bwd_dq_kernel,
        "adaln": modulation._adaln_kernel,
        "gated_residual": modulation._gated_residual_kernel,
        "gelu_concat": modulation._gelu_concat_kernel,
        "qk_norm_rope": rope._qk_norm_rope_kernel,
        "gguf_dequant_32": dequant._dequant_32_kernel,
        "gguf_dequant_k": dequant._dequant_k_kernel,
    }[case["kernel"]]
    ptr = "*" + case["dtype"]
    fp32_ptrs = {"QS", "KS", "PE", "LSE", "Delta"}
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
        elif name in ("eps", "qk_scale", "sm_scale"):
            sig[name] = "fp32"
        elif name in TENSOR_ARGS:
            sig[name] = ptr
        else:
            sig[name] = "i32"
    if case["kernel"] in DEQUANT_KERNELS.values():
        sig["Q"] = "*u8"
    for i, name in enumerate(fn.arg_names):
        if name in case.get("args", {}):  # integer arguments of a known launch: Triton's launcher
            attrs.pop((i,), None)  # marks those that are multiples of 16 (and only those)
            if case["args"][name] % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
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
                options={"num_warps": case["warps"], "num_stages": case["stages"], **case.get("options", {})},
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
    """The default run: every elementwise case (all shape classes, dtypes and targets: they compile
    in a fraction of a second each); in bf16 only, the attention kernel at head dim 128 with its
    table's first entry on sm_90 (wgmma, 227 KB) and on sm_86 (the 99 KB limit), the fallback
    tile on sm_120, and the attention backward's first dK/dV tile on sm_90 and dQ tile on sm_86."""
    out = []
    for c in cases:
        if c["kernel"] in ELEMENTWISE:
            out.append(c)
            continue
        if c["dtype"] != "bf16":
            continue
        const = c["const"]
        if c["kernel"] == "attention" and not const["STORE_LSE"]:
            first = const["HEAD_DIM"] == 128 and c["cap"] in (90, 86) and c["index"] == 0
            fallback = const["HEAD_DIM"] == 128 and c["cap"] == 120 and const["BLOCK_M"] == 32
            if first or fallback:
                out.append(c)
        elif c["kernel"] in ATTENTION_BACKWARD[1:] and const["HEAD_DIM"] == 128 and c["index"] == 0:
            # the backward's first tile: dK/dV on sm_90 (227 KB), dQ on sm_86 (99 KB)
            if (c["cap"], c["kernel"]) in ((90, "attention_bwd_dkdv"), (86, "attention_bwd_dq")):
                out.append(c)
        elif c["kernel"] in DEQUANT_KERNELS.values() and (c["cap"] == 90 or c["qtype"] in ("Q8_0", "Q4_K")):
            out.append(c)  # GGUF decoding: every type on sm_90, the most downloaded two everywhere
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
    results = run_worker("--sample", "--jobs", "2", timeout=600)
    assert {r["cap"] for r in results} >= {80, 86, 90, 120}
    assert sum(r["kernel"] == "attention" for r in results) >= 3
    elementwise = [r for r in results if r["kernel"] in ELEMENTWISE]
    assert len(elementwise) == len(_elementwise_cases()) * len(TARGETS) * len(DTYPES)
    assert not check(results), "\n".join(check(results))


@pytest.mark.slow
def test_every_config_on_every_target(request):
    # Minutes of compiling: only when asked for (`-m slow`, or FLUXCORE_AOT_ALL=1), not in every run.
    if "slow" not in (request.config.option.markexpr or "") and os.environ.get("FLUXCORE_AOT_ALL") != "1":
        pytest.skip("the exhaustive ahead-of-time compile runs with -m slow or FLUXCORE_AOT_ALL=1")
    results = run_worker("--jobs", str(os.cpu_count() or 1))
    kernels = 5 + len(DEQUANT_KERNELS) + len(ATTENTION_BACKWARD)
    assert len({(r["cap"], r["kernel"]) for r in results}) == len(TARGETS) * kernels
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
