"""Peak host memory of loading quantized files with load_flux: the weights stay packed, so the
load costs about the packed size, never a full-precision copy.

A mid-size FLUX-architecture model (hidden 1024, 5 double + 13 single blocks: 404 M parameters,
809 MB in bf16) is written as a Q4_0 GGUF (city96's rules: embedders, final layer in F16; 1-D and
tiny tensors F32) and as a ComfyUI scaled-fp8 safetensors file. Each is loaded with
`load_flux(path, dtype=torch.bfloat16)` in a fresh subprocess; what the load adds to the
process's peak (VmHWM of the loading child minus VmHWM of a child that only imports torch +
fluxcore) is compared with the model's bf16 size. Asserted:

  - Q4 GGUF ≤ 0.35 × bf16 and fp8 weight-only ≤ 0.55 × bf16 (the packed state alone is 0.301 × /
    0.514 × here: FLUX's own share of float embedders is smaller still, ~0.5 % against 2.8 %);
  - the load adds at most the loaded (packed) state + 16 MB: no full-size float temporary and no
    second copy of the packed bytes (reading the tensors out of the memory-mapped file instead of
    by plain file reads counted every packed weight twice: 0.73 × on a smaller model).

The files are written once per module from one random tensor per (type, shape), so writing them
takes seconds; each load runs in its own child (a few seconds each).
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
from test_quant_gguf import city96_type, random_blocks  # noqa: E402

# head dim 128 (= 16 + 56 + 56); 404 M parameters: 809 MB in bf16
CFG = FluxConfig(hidden_size=1024, num_heads=8, depth=5, depth_single_blocks=13, axes_dim=(16, 56, 56))
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
    # content does not matter for memory: one random tensor per (type, shape) is reused, and the
    # Q4_0 blocks are random bytes with finite fp16 scales (gguf's quantizer would take minutes)
    rng = np.random.default_rng(0)
    cache: dict = {}
    writer = gguf.GGUFWriter(str(path), "flux")
    for key, shape in _shapes().items():
        kind = city96_type(key, shape, ["Q4_0"])
        if (kind, shape) not in cache:
            cache[kind, shape] = (
                random_blocks("Q4_0", *shape, rng)
                if kind == "Q4_0"
                else (rng.standard_normal(shape) * 0.02).astype(np.float16 if kind == "F16" else np.float32)
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


@pytest.mark.parametrize("fmt, bound", [("gguf", 0.35), ("scaled_fp8", 0.55)])
def test_peak_host_memory_of_quantized_load(files, base_peak, fmt, bound):
    size = _bf16_bytes()
    assert 600 * MB < size < 1200 * MB, size  # 300-600 M parameters
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
