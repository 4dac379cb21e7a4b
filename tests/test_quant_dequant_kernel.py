"""The Triton GGUF dequantization kernels (fluxcore.kernels.dequant) against gguf's reference
decoder and fluxcore's PyTorch decoder, bit for bit, in Triton's interpreter (conftest sets
TRITON_INTERPRET=1 without a GPU; on a GPU the same tests run on CUDA tensors); and the dispatch
in fluxcore.quant.gguf.dequantize that uses them: CUDA tensors only, the PyTorch path elsewhere,
and a one-time warning then the PyTorch path when a kernel fails to launch.

Data: Q8_0 / Q4_0 / Q4_1 / Q5_0 / Q5_1 written with gguf's quantizer, K-quants from random bytes
with finite fp16 scales (gguf has no K-quantizer). Block counts are odd and not multiples of the
blocks a program decodes, so the masked tail of the last program is exercised. Outputs start as
NaN (POISON_OUTPUTS): an element the kernel forgets to write fails the comparison.
"""

import warnings

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")
pytest.importorskip("fluxcore.kernels")
from fluxcore.kernels import _common  # noqa: E402
from fluxcore.kernels import dequant as D  # noqa: E402
from gguf import GGMLQuantizationType as T  # noqa: E402
from test_quant_gguf import GGUF_QUANTIZER, KQUANTS, random_blocks  # noqa: E402

from fluxcore.quant import GGUFLinear  # noqa: E402
from fluxcore.quant import gguf as qg  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
BITS = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16}


@pytest.fixture(autouse=True)
def _poison(monkeypatch):
    monkeypatch.setattr(_common, "POISON_OUTPUTS", True)


def packed(name: str, rows: int, blocks_per_row: int, seed: int = 0) -> np.ndarray:
    """uint8 [rows, row bytes] of `name` blocks: gguf's quantizer where it has one, else random."""
    rng = np.random.default_rng(seed)
    cols = blocks_per_row * D.TYPES[name][1]
    if name in GGUF_QUANTIZER:
        w = (rng.standard_normal((rows, cols)) * rng.uniform(0.01, 2.0, (rows, 1))).astype(np.float32)
        return gguf.quants.quantize(w, T[name])
    return random_blocks(name, rows, cols, rng)


def assert_same_bits(out: torch.Tensor, ref: torch.Tensor):
    assert out.dtype == ref.dtype and out.shape == ref.shape
    same = out.cpu().view(BITS[out.dtype]) == ref.cpu().view(BITS[ref.dtype])
    assert bool(same.all()), (
        f"{int((~same).sum())} of {same.numel()} differ, first at {(~same).nonzero()[:4].tolist()}"
    )


def test_covers_every_quantized_type():
    assert set(D.TYPES) == {n for n, _, _ in qg.GGML_TYPES.values()} - set(qg.FLOAT_TYPES)
    assert set(D.TYPES) == set(GGUF_QUANTIZER) | set(KQUANTS)
    for name, (type_id, elements, size) in D.TYPES.items():
        assert qg.GGML_TYPES[type_id] == (name, elements, size)


# (rows, blocks per row, blocks per program): 21 and 15 blocks (odd), programs of 4 and 8 blocks
# leave a partial last program and split rows; 0 = the default program size (one partial program).
LAYOUTS = [(3, 7, 4), (5, 3, 8), (3, 7, 0), (1, 1, 0)]


@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda x: "x".join(map(str, x)))
@pytest.mark.parametrize("name", list(D.TYPES))
def test_kernel_equals_gguf_and_torch_decoders(name, layout):
    rows, per_row, per_program = layout
    raw_np = packed(name, rows, per_row)
    raw = torch.from_numpy(raw_np).to(DEVICE)
    n = rows * per_row * D.TYPES[name][1]
    gguf_ref = torch.from_numpy(gguf.quants.dequantize(raw_np, T[name]).astype(np.float32).reshape(-1))
    for dtype in D.OUT_DTYPES:
        out = D.dequantize_gguf(raw, name, dtype, per_program)
        assert out.shape == (n,) and out.device.type == DEVICE
        assert_same_bits(out, D.dequantize_gguf_reference(raw, name, dtype))
        assert torch.equal(out.cpu(), gguf_ref.to(dtype))  # the cast comes last, as in gguf's decoder
    assert not torch.isnan(gguf_ref).any()


def test_k_quants_at_flux_width():
    """A few rows of FLUX's hidden width (3072 = 12 super-blocks per row) with the default
    program size, through the op's torch.ops entry point."""
    for name in KQUANTS + ("Q8_0", "Q4_0"):
        raw = torch.from_numpy(packed(name, 3, 3072 // D.TYPES[name][1], seed=1)).to(DEVICE)
        out = torch.ops.fluxcore.dequantize_gguf(raw, name, torch.bfloat16)
        assert_same_bits(out, D.dequantize_gguf_reference(raw, name, torch.bfloat16))


def test_bf16_rounds_ties_to_even_and_keeps_fp16_subnormal_scales():
    """d = 1 + 2⁻⁸ makes d·1 a bf16 tie (rounds down to 1.0, to even), d·3 not a tie; a subnormal
    fp16 scale (2⁻²⁰) is exact in float32. Q8_0 blocks built by hand."""
    q = np.array([1, -1, 3, 127, -128, 0, 5, 2] * 4, dtype=np.int8)
    blocks = []
    for d in (1 + 2**-8, 2**-20, -(1 + 2**-7 + 2**-9), 0.0):
        blocks.append(np.concatenate([np.array([d], np.float16).view(np.uint8), q.view(np.uint8)]))
    raw = torch.from_numpy(np.stack(blocks)).to(DEVICE)
    ref32 = D.dequantize_gguf_reference(raw, "Q8_0", torch.float32)
    assert ref32[0].item() == 1 + 2**-8 and ref32[0].to(torch.bfloat16).item() == 1.0  # a tie, to even
    for dtype in D.OUT_DTYPES:
        assert_same_bits(
            D.dequantize_gguf(raw, "Q8_0", dtype), D.dequantize_gguf_reference(raw, "Q8_0", dtype)
        )
    assert D.dequantize_gguf(raw, "Q8_0", torch.bfloat16)[0].item() == 1.0


def test_rejects_what_it_cannot_decode():
    raw = torch.zeros(34 * 3, dtype=torch.uint8, device=DEVICE)
    with pytest.raises(ValueError, match="whole number of Q8_0 blocks"):
        D.dequantize_gguf(raw[:-1], "Q8_0", torch.bfloat16)
    with pytest.raises(ValueError, match="power of two"):
        D.dequantize_gguf(raw, "Q8_0", torch.bfloat16, 3)
    assert "no Triton kernel" in D.unsupported_reason(raw, "F16", torch.bfloat16)
    assert "dtype" in D.unsupported_reason(raw, "Q8_0", torch.float64)
    assert D.dequantize_gguf(raw[:0], "Q8_0", torch.float32).shape == (0,)


# --- the dispatch in fluxcore.quant.gguf ----------------------------------------------------------


@pytest.fixture
def kernel_calls(monkeypatch):
    """Counts launches of the kernel op, and gives the dispatch a fresh 'broken' set."""
    calls = []
    real = D.dequantize_gguf

    def spy(raw, qtype, dtype, blocks=0):
        calls.append(qtype)
        return real(raw, qtype, dtype, blocks)

    monkeypatch.setattr(D, "dequantize_gguf", spy)
    monkeypatch.setattr(qg, "_KERNEL_BROKEN", set())
    return calls


def test_cpu_tensors_keep_the_pytorch_path(kernel_calls):
    raw = torch.from_numpy(packed("Q4_K", 2, 2))
    out = qg.dequantize(raw, "Q4_K", (2, 512), torch.bfloat16)
    assert kernel_calls == [] and out.shape == (2, 512)
    assert_same_bits(out, qg.dequantize_torch(raw, "Q4_K", (2, 512), torch.bfloat16))


@pytest.mark.parametrize("name", ["Q4_K", "Q8_0", "Q5_1", "Q6_K"])
def test_gguf_linear_uses_the_kernel_where_routed(name, kernel_calls, monkeypatch):
    """With the dispatch routed to the kernel (as it is for CUDA tensors), a GGUFLinear's weight
    and forward are bit-identical to the PyTorch path's."""
    _, elements, _ = D.TYPES[name]
    out_f, in_f = 6, 2 * 256
    raw = torch.from_numpy(packed(name, out_f, in_f // elements, seed=3)).to(DEVICE)
    layer = GGUFLinear(raw, name, (out_f, in_f), torch.randn(out_f, device=DEVICE, dtype=torch.bfloat16))
    x = torch.randn(4, in_f, device=DEVICE, dtype=torch.bfloat16)
    monkeypatch.setattr(qg, "_use_kernel", lambda raw: False)
    w_torch, y_torch = layer.dequantized_weight(), layer(x)
    assert kernel_calls == []
    monkeypatch.setattr(qg, "_use_kernel", lambda raw: True)
    w_kernel, y_kernel = layer.dequantized_weight(), layer(x)
    assert kernel_calls == [name, name]
    assert_same_bits(w_kernel, w_torch)
    assert torch.equal(y_kernel, y_torch)
    # float types and dtypes the kernel does not write stay on the PyTorch path
    assert qg.dequantize(raw, name, (out_f, in_f), torch.float64).dtype == torch.float64
    f16 = torch.randn(8, device=DEVICE).half().view(torch.uint8)
    assert qg.dequantize(f16, "F16", (8,), torch.float32).dtype == torch.float32
    assert kernel_calls == [name, name]


def test_a_failing_kernel_warns_once_and_falls_back(kernel_calls, monkeypatch):
    def broken(raw, qtype, dtype, blocks=0):
        kernel_calls.append(qtype)
        raise RuntimeError("no kernel image is available for execution on the device (simulated)")

    monkeypatch.setattr(D, "dequantize_gguf", broken)
    monkeypatch.setattr(qg, "_use_kernel", lambda raw: True)
    raw = torch.from_numpy(packed("Q4_K", 2, 1)).to(DEVICE)
    with pytest.warns(RuntimeWarning, match=r"GGUF Q4_K dequantization kernel failed .*simulated"):
        out = qg.dequantize(raw, "Q4_K", (2, 256), torch.bfloat16)
    assert_same_bits(out, qg.dequantize_torch(raw, "Q4_K", (2, 256), torch.bfloat16))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once: Q4_K is not tried again
        qg.dequantize(raw, "Q4_K", (2, 256), torch.bfloat16)
    assert kernel_calls == ["Q4_K"] and qg._KERNEL_BROKEN == {"Q4_K"}
    # another type still tries its own kernel (and warns for itself)
    raw8 = torch.from_numpy(packed("Q8_0", 2, 1)).to(DEVICE)
    with pytest.warns(RuntimeWarning, match="Q8_0"):
        qg.dequantize(raw8, "Q8_0", (2, 32), torch.bfloat16)
    assert kernel_calls == ["Q4_K", "Q8_0"]
