"""Peak host memory of loading quantized files with load_flux: the weights stay packed, so the
load costs about the packed size, never a full-precision copy.

A ~200 MB (bf16) model is written as a Q4_0 GGUF (city96 key rules) and as a ComfyUI scaled-fp8
safetensors file. Each is loaded with `load_flux(path, dtype=torch.bfloat16)` in a fresh
subprocess; what the load adds to the process's peak (VmHWM of the loading child minus VmHWM of
a child that only imports torch + fluxcore) is printed as a ratio to the bf16 size.

At this size the packed state alone is 0.332 × bf16 for Q4_0 (4.5 bits per quantized weight, but
the F16 embedders / final layer, city96's rule, are ~7% of a 768-wide model) and 0.535 × for fp8,
and the lazy imports + module objects add a fixed ~5–15 MB, so the literal targets 0.35 × / 0.55 ×
are out of reach for any loader; what is asserted instead: the load adds at most the loaded
(packed) state + 16 MB, i.e. no full-size float temporary and no second copy of the packed bytes
(before the GGUF loader read tensors by plain file reads, the faulted-in mapping counted them
twice: 0.73 ×), and the ratio stays ≤ 0.42 × (Q4_0) / 0.60 × (fp8).
"""

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from fluxcore import Flux
from fluxcore.config import FluxConfig
from fluxcore.quant.scaled_fp8 import quantize_scaled_fp8
from fluxcore.weights import write_safetensors

gguf = pytest.importorskip("gguf")
from gguf import GGMLQuantizationType as T  # noqa: E402
from test_quant_gguf import city96_type  # noqa: E402

# head dim 128 (= 16 + 56 + 56); ~100 M parameters: ~200 MB in bf16
CFG = FluxConfig(hidden_size=768, num_heads=6, depth=2, depth_single_blocks=6, axes_dim=(16, 56, 56))
MB = 1e6
pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")

HIGH_WATER = textwrap.dedent(
    """
    def high_water():
        # VmHWM is this process's own peak RSS (ru_maxrss would carry the parent's over exec)
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))
    """
)
BASE = HIGH_WATER + textwrap.dedent(
    """
    import json
    import torch, fluxcore
    print(json.dumps(dict(peak=high_water())))
    """
)
LOAD = HIGH_WATER + textwrap.dedent(
    """
    import json, sys
    import torch, fluxcore
    model = fluxcore.load_flux(sys.argv[1], dtype=torch.bfloat16)
    peak = high_water()
    packed = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    print(json.dumps(dict(peak=peak, packed=packed, fmt=getattr(model, "quant_format", None),
                          dtype=str(model.dtype))))
    """
)


def _shapes() -> dict[str, tuple[int, ...]]:
    with torch.device("meta"):
        return {k: tuple(v.shape) for k, v in Flux(CFG).state_dict().items()}


def _bf16_bytes() -> int:
    return sum(2 * int(np.prod(s)) for s in _shapes().values())


def _child(script: str, *args) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", script, *map(str, args)], capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


def _write_gguf(path):
    # content does not matter for memory: one quantized random matrix per shape is reused
    rng = np.random.default_rng(0)
    cache: dict = {}
    writer = gguf.GGUFWriter(str(path), "flux")
    for key, shape in _shapes().items():
        kind = city96_type(key, shape, ["Q4_0"])
        if (kind, shape) not in cache:
            w = (rng.standard_normal(shape) * 0.02).astype(np.float32)
            cache[kind, shape] = (
                gguf.quants.quantize(w, T.Q4_0)
                if kind == "Q4_0"
                else w.astype(np.float16 if kind == "F16" else np.float32)
            )
        writer.add_tensor(key, cache[kind, shape], raw_dtype=T[kind])
    for f in (
        writer.write_header_to_file,
        writer.write_kv_data_to_file,
        writer.write_tensors_to_file,
        writer.close,
    ):
        f()
    return sorted(set(k for k, _ in cache))


def _write_fp8(path):
    skip = ("img_in", "txt_in", "time_in", "vector_in", "guidance_in", "final_layer")
    cache: dict = {}
    tensors = {}
    for key, shape in _shapes().items():
        base = key[: -len(".weight")]
        if key.endswith(".weight") and len(shape) == 2 and not key.startswith(skip):
            if shape not in cache:
                cache[shape] = quantize_scaled_fp8(torch.randn(shape) * 0.02)
            w8, s = cache[shape]
            tensors[key] = w8
            tensors[base + ".scale_weight"] = s
        else:
            tensors[key] = torch.full(shape, 0.01, dtype=torch.bfloat16)
    tensors["scaled_fp8"] = torch.zeros(0, dtype=torch.float8_e4m3fn)
    write_safetensors(path, tensors)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("quant_mem")
    kinds = _write_gguf(root / "flux-Q4_0.gguf")
    assert "Q4_0" in kinds
    _write_fp8(root / "flux-fp8-scaled.safetensors")
    return {"gguf": root / "flux-Q4_0.gguf", "scaled_fp8": root / "flux-fp8-scaled.safetensors"}


@pytest.fixture(scope="module")
def base_peak():
    return _child(BASE)["peak"]


@pytest.mark.parametrize("fmt, bound", [("gguf", 0.42), ("scaled_fp8", 0.60)])
def test_peak_host_memory_of_quantized_load(files, base_peak, fmt, bound):
    size = _bf16_bytes()
    assert 150 * MB < size < 250 * MB, size
    r = _child(LOAD, files[fmt])
    assert r["fmt"] == fmt and r["dtype"] == "torch.bfloat16", r
    added = r["peak"] - base_peak
    ratio = added / size
    print(
        f"\n{fmt}: bf16 size {size / MB:.1f} MB, file {files[fmt].stat().st_size / MB:.1f} MB, "
        f"loaded state {r['packed'] / MB:.1f} MB, load peak - import peak {added / MB:.1f} MB "
        f"= {ratio:.3f} x bf16 (bound {bound})"
    )
    assert added <= r["packed"] + 16 * MB, (fmt, ratio, r, base_peak)
    assert ratio <= bound, (fmt, ratio, r, base_peak)
