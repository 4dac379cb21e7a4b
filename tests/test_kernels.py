"""fluxcore.kernels against their PyTorch references, fluxcore's own math, and the eager model.

On a machine without CUDA, conftest sets TRITON_INTERPRET=1 and every kernel runs in Triton's
interpreter on CPU tensors. Every output starts as NaN (POISON_OUTPUTS), so an element a kernel
fails to write makes the comparison fail. The interpreter rounds float32 → bfloat16 by truncation
(the GPU rounds to nearest even), so bfloat16 tolerances allow a few bfloat16 ulps.
"""

import subprocess
import sys

import pytest
import torch
from einops import rearrange

from fluxcore import PRESETS, Flux, attention, attention_backend
from fluxcore.errors import BackendError
from fluxcore.math import apply_rope, embed_positions, modulate, rms_norm

K = pytest.importorskip("fluxcore.kernels")
from fluxcore.kernels import _common  # noqa: E402

# GELU's sigmoid overflows exp() for very negative inputs on the way to the correct 0
pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")

LENGTHS = [1, 77, 130, 200]
DTYPES = [torch.float32, torch.bfloat16]
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(autouse=True)
def _poison(monkeypatch):
    monkeypatch.setattr(_common, "POISON_OUTPUTS", True)


def assert_matches(out, ref, ulps=4):
    """float32: within 1e-5. bfloat16: within a few ulps of the largest |ref| (each rounding of an
    intermediate may be off by one ulp of that intermediate, and terms can cancel). NaN fails."""
    if out.dtype == torch.float32:
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    else:
        atol = ulps * 2**-8 * ref.float().abs().max().item()
        torch.testing.assert_close(out.float(), ref.float(), rtol=2**-7, atol=atol)


def randn(*shape, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g).to(device=DEVICE, dtype=dtype)


def positions(b, length, axes_dim):
    """pe for ids like FLUX's: text tokens at 0, then a row/col grid of 7 columns."""
    i = torch.arange(length)
    ids = torch.stack([torch.zeros(length), (i // 7).float(), (i % 7).float()], -1)
    return embed_positions(ids[None].expand(b, -1, -1), axes_dim, 10_000).to(DEVICE)


def axes_for(d):
    """FLUX splits the head dim 16 : 56 : 56; any even split with the same idea works here."""
    first = max(2, d // 8) & ~1
    rest = (d - first) // 2 & ~1
    return (d - 2 * rest, rest, rest)


def qkv_views(b, h, length, d, dtype, seed=0):
    """q, k, v as the strided views a fused qkv projection produces."""
    qkv = randn(b, length, 3 * h * d, dtype=dtype, seed=seed)
    return rearrange(qkv, "B L (K H D) -> K B H L D", K=3, H=h)


# --- attention ----------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("length", LENGTHS)
def test_flash_attention_matches_reference(length, dtype):
    q, k, v = qkv_views(2, 3, length, 32, dtype)
    out = K.flash_attention(q, k, v)
    ref = K.flash_attention_reference(q, k, v)
    assert out.shape == (2, length, 3 * 32) and out.dtype == dtype and out.is_contiguous()
    assert_matches(out, ref)


@pytest.mark.parametrize("d, length", [(16, 128), (64, 77), (128, 77)])  # 128: no ragged tail
def test_flash_attention_head_dims(d, length):
    q, k, v = (randn(1, 2, length, d, seed=s) for s in range(3))
    assert_matches(K.flash_attention(q, k, v), K.flash_attention_reference(q, k, v))


def test_flash_attention_is_softmax_attention():
    """Closed forms: identical keys give the mean of v; one dominant key copies its value row."""
    q, v = randn(1, 1, 130, 16), randn(1, 1, 130, 16, seed=1)
    k = randn(1, 1, 1, 16, seed=2).expand(1, 1, 130, 16)
    torch.testing.assert_close(
        K.flash_attention(q, k, v)[0], v[0, 0].mean(0).expand(130, 16), rtol=1e-5, atol=1e-5
    )
    k = torch.zeros(1, 1, 130, 16, device=DEVICE)
    k[..., 129, :] = 100.0  # the last, masked-tail block holds the winner
    q = torch.ones(1, 1, 130, 16, device=DEVICE)
    torch.testing.assert_close(K.flash_attention(q, k, v)[0], v[0, 0, 129].expand(130, 16))


@pytest.mark.parametrize("dtype", DTYPES)
def test_triton_backend_through_the_attention_entry_point(dtype):
    q, k, v = qkv_views(2, 3, 130, 32, dtype, seed=3)
    pe = positions(2, 130, axes_for(32))
    q, k = apply_rope(q, pe), apply_rope(k, pe)  # backends receive rotated q, k
    out = attention(q, k, v, backend="triton")
    assert_matches(out, attention(q, k, v, backend="eager"))
    torch.testing.assert_close(K.flash_attention(q, k, v), out, rtol=0, atol=0)


def test_unsupported_reasons(monkeypatch):
    why = K.attention_unsupported_reason
    assert why(torch.empty(1, 1, 4, 64)) is None  # CPU under the interpreter
    assert "power of two" in why(torch.empty(1, 1, 4, 48))
    assert "power of two" in why(torch.empty(1, 1, 4, 512))
    assert "dtype torch.float64" in why(torch.empty(1, 1, 4, 64, dtype=torch.float64))
    assert why(torch.empty(1, 1, 4, 64, requires_grad=True)) is None  # the Triton backward trains
    with pytest.raises(BackendError, match="'triton' cannot run: head dim must be a power of two.*found 48"):
        attention(*qkv_views(1, 1, 4, 48, torch.float32), backend="triton")
    with pytest.raises(ValueError, match="flash_attention: head dim"):
        K.flash_attention(*qkv_views(1, 1, 4, 48, torch.float32))
    monkeypatch.setattr(_common, "INTERPRET", False)
    assert "need a CUDA device" in why(torch.empty(1, 1, 4, 64))


# --- QK-RMSNorm + RoPE --------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("length", LENGTHS)
def test_qk_norm_rope_matches_reference_and_fluxcore_math(length, dtype):
    q, k, v = qkv_views(2, 3, length, 32, dtype, seed=length)
    pe = positions(2, length, axes_for(32))
    qs, ks = (1 + 0.3 * randn(32, seed=1)).to(dtype), (1 + 0.3 * randn(32, seed=2)).to(dtype)
    for scales in ((), (qs, ks)):
        out = K.qk_norm_rope(q, k, pe, *scales)
        ref = K.qk_norm_rope_reference(q, k, pe, *scales)
        for o, r in zip(out, ref):
            assert o.shape == (2, 3, length, 32) and o.dtype == dtype and o.is_contiguous()
            assert_matches(o, r)
    # the reference is fluxcore's QKNorm (rms_norm, cast to v) followed by apply_rope
    model_q = apply_rope(rms_norm(q, qs).to(v), pe)
    torch.testing.assert_close(K.qk_norm_rope_reference(q, k, pe, qs, ks)[0], model_q, rtol=0, atol=0)


def test_qk_norm_rope_broadcast_pe_and_sliced_pe():
    q, k, _ = qkv_views(2, 3, 77, 32, torch.float32)
    pe = positions(1, 100, axes_for(32))[:, :, 23:]  # batch 1, a strided slice of the sequence
    out = K.qk_norm_rope(q, k, pe)
    ref = K.qk_norm_rope_reference(q, k, pe)
    for o, r in zip(out, ref):
        assert_matches(o, r)


# --- adaLN, gate + residual, GELU + concat ------------------------------------------------------


def modulation_views(b, c, dtype, seed=0):
    """shift, scale, gate as chunks of one [B, 1, 3C] projection (strided views), like Modulation."""
    return (0.5 * randn(b, 1, 3 * c, dtype=torch.float32, seed=seed)).to(dtype).chunk(3, dim=-1)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("length", LENGTHS)
def test_adaln_modulate(length, dtype):
    c = 200
    x = (3 * randn(2, length, c + 8, dtype=torch.float32, seed=length) + 1).to(dtype)[
        ..., :c
    ]  # row stride 208
    shift, scale, _ = modulation_views(2, c, dtype)
    out = K.adaln_modulate(x, shift, scale)
    assert out.shape == (2, length, c) and out.dtype == dtype
    assert_matches(out, K.adaln_modulate_reference(x, shift, scale))
    torch.testing.assert_close(
        K.adaln_modulate_reference(x, shift, scale),
        modulate(torch.nn.functional.layer_norm(x, (c,), eps=1e-6), shift, scale),
        rtol=0,
        atol=0,
    )


def test_adaln_modulate_wide_rows_and_broadcast_batch():
    x = randn(2, 5, 3000)
    shift, scale, _ = modulation_views(1, 3000, torch.float32)
    assert_matches(K.adaln_modulate(x, shift, scale), K.adaln_modulate_reference(x, shift, scale))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_adaln_modulate_rows_wider_than_one_program(dtype):
    """Rows wider than ADALN_ROW_MAX are normalised in chunks (mean, centred variance, output)."""
    from fluxcore.kernels.modulation import ADALN_ROW_MAX

    c = 2 * ADALN_ROW_MAX + 3000  # three chunks, the last ragged
    x = (3 * randn(1, 3, c, dtype=torch.float32, seed=5) + 1).to(dtype)
    shift, scale, _ = modulation_views(1, c, dtype)
    assert_matches(K.adaln_modulate(x, shift, scale), K.adaln_modulate_reference(x, shift, scale))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("length", LENGTHS)
def test_gated_residual(length, dtype):
    c = 1100  # two column blocks, the second ragged
    x, y = randn(2, length, c, dtype=dtype, seed=1), randn(2, length, c, dtype=dtype, seed=2)
    _, _, gate = modulation_views(2, c, dtype)
    out = K.gated_residual(x, gate, y)
    assert_matches(out, K.gated_residual_reference(x, gate, y))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("length", LENGTHS)
def test_gelu_concat(length, dtype):
    attn = randn(2, length, 96, dtype=dtype, seed=3)
    # the MLP half of the single block's linear1 output: a strided view
    mlp = torch.split(3 * randn(2, length, 3 * 96 + 1000, dtype=dtype, seed=4), [3 * 96, 1000], dim=-1)[1]
    out = K.gelu_concat(attn, mlp)
    assert out.shape == (2, length, 1096)
    assert_matches(out, K.gelu_concat_reference(attn, mlp))


def test_ops_are_registered_with_torch_library():
    x, y = randn(2, 3, 40), randn(2, 3, 40, seed=1)
    shift, scale, gate = modulation_views(2, 40, torch.float32)
    q, k, v = qkv_views(1, 2, 5, 16, torch.float32)
    pe = positions(1, 5, axes_for(16))
    cases = {
        "flash_attention": (q, k, v),
        "qk_norm_rope": (q, k, pe, randn(16), randn(16, seed=1)),
        "adaln_modulate": (x, shift, scale),
        "gated_residual": (x, gate, y),
        "gelu_concat": (x, y),
    }
    for name, args in cases.items():
        op = getattr(torch.ops.fluxcore, name).default
        torch.library.opcheck(op, args, test_utils=("test_schema", "test_faketensor"))


# --- the blocks -----------------------------------------------------------------------------------


def test_tiny_flux_with_triton_equals_eager():
    """The whole model with fused modules and the triton attention backend (interpreter, fp32)
    against eager: relative error ≤ 1e-5, the model tests' bar against diffusers."""
    torch.manual_seed(0)
    model = Flux(PRESETS["tiny-dev"]).eval().to(DEVICE)
    with torch.no_grad():  # perturb norm scales and biases away from their trivial initial values
        for p in model.parameters():
            p.add_(0.2 * torch.randn_like(p))
    b, n_img, n_txt, c = 2, 15, 7, model.config
    grid = torch.stack([torch.zeros(n_img), torch.arange(n_img) // 5, torch.arange(n_img) % 5], -1)
    args = (
        randn(b, n_img, c.in_channels),
        grid[None].expand(b, -1, -1).to(DEVICE),
        randn(b, n_txt, c.context_in_dim, seed=1),
        torch.zeros(b, n_txt, 3, device=DEVICE),
        torch.tensor([0.3, 0.9], device=DEVICE),
        randn(b, c.vec_in_dim, seed=2),
        torch.tensor([3.5, 1.0], device=DEVICE),
    )
    with torch.no_grad():
        with attention_backend("eager"):
            ref = model(*args)
        # per double block: 4 adaLN norms, 2 QK-norms, 1 residual; per single block: 4; final norm: 1
        assert len(K.apply(model)) == 7 * model.config.depth + 4 * model.config.depth_single_blocks + 1
        with attention_backend("triton"):
            out = model(*args)
    rel_err = ((out.double() - ref.double()).norm() / ref.double().norm()).item()
    assert rel_err <= 1e-5


def test_fused_forward_compiles_without_graph_breaks():
    """Dynamo traces the fused modules (kernel-or-plain choice, kernel ops, backend lookup) as one graph."""
    torch.manual_seed(0)
    model = Flux(PRESETS["tiny-schnell"]).eval().to(DEVICE)
    grid = torch.stack([torch.zeros(6), torch.arange(6) // 3, torch.arange(6) % 3], -1)[None].to(DEVICE)
    args = (randn(1, 6, 64), grid, randn(1, 5, 48, seed=1), torch.zeros(1, 5, 3, device=DEVICE))
    args += (torch.tensor([0.5], device=DEVICE), randn(1, 32, seed=2))
    K.apply(model)
    with torch.no_grad(), attention_backend("triton"):
        ref = model(*args)
        out = torch.compile(model, backend="eager", fullgraph=True)(*args)
    torch.testing.assert_close(out, ref, rtol=0, atol=0)


def test_default_cpu_forward_does_not_import_triton():
    code = (
        "import sys, torch, fluxcore\n"
        "m = fluxcore.Flux(fluxcore.PRESETS['tiny-schnell']).eval()\n"
        "x = torch.zeros(1, 4, 64); ids = torch.zeros(1, 4, 3)\n"
        "m(x, ids, torch.zeros(1, 3, 48), torch.zeros(1, 3, 3), torch.ones(1), torch.zeros(1, 32))\n"
        "assert 'triton' not in sys.modules, 'triton was imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=300)


# --- GPU: full FLUX shapes (skipped without CUDA) -------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("length", [4096 + 512, 4080 + 512, 1024 + 512])
def test_gpu_attention_flux_shapes(length):
    q, k, v = qkv_views(1, 24, length, 128, torch.bfloat16)
    pe = positions(1, length, (16, 56, 56))
    q, k = apply_rope(q, pe), apply_rope(k, pe)
    assert_matches(K.flash_attention(q, k, v), attention(q, k, v, backend="eager"))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("d", [64, 256])
def test_gpu_attention_dtypes_and_head_dims(dtype, d):
    q, k, v = (randn(2, 3, 1000, d, dtype=dtype, seed=s) for s in range(3))
    tol = dict(rtol=1e-2, atol=1e-2) if dtype == torch.float16 else dict(rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(K.flash_attention(q, k, v), K.flash_attention_reference(q, k, v), **tol)


@pytest.mark.gpu
def test_gpu_norm_kernels_flux_shapes():
    dt, c, m = torch.bfloat16, 3072, 12288
    x, y = randn(1, 4608, c, dtype=dt), randn(1, 4608, c, dtype=dt, seed=1)
    shift, scale, gate = modulation_views(1, c, dt)
    # on a GPU every rounding is to nearest even, as in PyTorch: allow one ulp of summation-order noise
    assert_matches(K.adaln_modulate(x, shift, scale), K.adaln_modulate_reference(x, shift, scale), ulps=1)
    assert_matches(K.gated_residual(x, gate, y), K.gated_residual_reference(x, gate, y), ulps=1)
    h = randn(1, 4608, m, dtype=dt, seed=2)
    assert_matches(K.gelu_concat(x, h), K.gelu_concat_reference(x, h), ulps=1)
    q, k, _ = qkv_views(1, 24, 4608, 128, dt)
    pe = positions(1, 4608, (16, 56, 56))
    qs, ks = randn(128, dtype=dt, seed=3), randn(128, dtype=dt, seed=4)
    for o, r in zip(K.qk_norm_rope(q, k, pe, qs, ks), K.qk_norm_rope_reference(q, k, pe, qs, ks)):
        assert_matches(o, r, ulps=1)


@pytest.mark.gpu
def test_gpu_flux_dev_blocks_fused_equal_plain_and_compile():
    """One double and one single block at flux-dev width, bf16: fused (triton) vs plain (sdpa),
    then the fused single block under torch.compile (inductor sees through the triton ops)."""
    from fluxcore.layers import DoubleStreamBlock, SingleStreamBlock

    torch.manual_seed(0)
    double = DoubleStreamBlock(PRESETS["flux-dev"]).to(DEVICE, torch.bfloat16)
    single = SingleStreamBlock(PRESETS["flux-dev"]).to(DEVICE, torch.bfloat16)
    img, txt = randn(1, 4096, 3072, dtype=torch.bfloat16), randn(1, 512, 3072, dtype=torch.bfloat16, seed=1)
    vec = randn(1, 3072, dtype=torch.bfloat16, seed=2)
    pe = positions(1, 4608, (16, 56, 56))
    with torch.no_grad():
        with attention_backend("sdpa"):
            ref_img, ref_txt = double(img, txt, vec, pe)
            ref_x = single(torch.cat((ref_txt, ref_img), 1), vec, pe)
        K.apply(double), K.apply(single)
        with attention_backend("triton"):
            out_img, out_txt = double(img, txt, vec, pe)
            out_x = single(torch.cat((ref_txt, ref_img), 1), vec, pe)
            compiled_x = torch.compile(single, fullgraph=True)(torch.cat((ref_txt, ref_img), 1), vec, pe)
    for out, ref in ((out_img, ref_img), (out_txt, ref_txt), (out_x, ref_x), (compiled_x, ref_x)):
        assert ((out.float() - ref.float()).norm() / ref.float().norm()).item() < 1e-2
