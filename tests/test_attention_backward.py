"""The Triton attention backward (fluxcore.kernels.attention_backward, wired into autograd by
fluxcore.kernels.attention.flash_attention) against autograd through PyTorch's attention.

Without CUDA, conftest sets TRITON_INTERPRET=1 and the kernels run in Triton's interpreter on CPU
tensors, on small awkward shapes: lengths that are not multiples of the tiles (the interpreter's
dK/dV kernel owns 32 keys and steps 16 queries, the dQ kernel the other way round), head dims 16
to 64, batch and heads > 1. The oracle is torch.nn.functional.scaled_dot_product_attention in
float64 on the same (rounded) inputs. Outputs are NaN-poisoned (POISON_OUTPUTS), so a gradient
element a kernel forgets to write fails.

    python -m pytest -q tests/test_attention_backward.py            # interpreter, ~1-2 min
    python -m pytest -q tests/test_attention_backward.py -m gpu     # on a CUDA machine
"""

import math

import pytest
import torch
import torch.nn.functional as F
from einops import rearrange

from fluxcore import PRESETS, Flux, attention_backend
from fluxcore.latents import make_img_ids, pack
from fluxcore.train import flow_loss

K = pytest.importorskip("fluxcore.kernels")
from fluxcore.kernels import _common  # noqa: E402
from fluxcore.kernels import attention as A  # noqa: E402
from fluxcore.kernels import attention_backward as AB  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# Largest error allowed, relative to the largest |gradient| (or 1, when every gradient is ~0, as
# dq and dk are for L = 1). float32: true float32 products, summation order only. Half precision:
# P and dS are rounded to the input dtype before their matmuls (as in every flash kernel) and the
# gradients are rounded on output; the interpreter also rounds to bfloat16 by truncation.
TOL = {torch.float32: 1e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}


@pytest.fixture(autouse=True)
def _poison(monkeypatch):
    monkeypatch.setattr(_common, "POISON_OUTPUTS", True)


def randn(*shape, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g).to(device=DEVICE, dtype=dtype)


def qkv(b, h, length, d, dtype, seed=0):
    return tuple(randn(b, h, length, d, dtype=dtype, seed=seed + i).requires_grad_() for i in range(3))


def sdpa_grads(q, k, v, dout):
    """Gradients of [B, L, H·D] attention through SDPA in float64, on q, k, v as given."""
    leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
    out = rearrange(F.scaled_dot_product_attention(*leaves), "b h l d -> b l (h d)")
    return torch.autograd.grad(out, leaves, dout.double())


def max_rel_error(got, ref):
    """max |got − ref| / max(max |ref|, 1): relative to the largest gradient element."""
    scale = max(ref.double().abs().max().item(), 1.0)
    return ((got.double() - ref.double()).abs().max() / scale).item()


def assert_grads_close(got, ref, dtype, what=""):
    assert got.shape == ref.shape and got.dtype == dtype, (got.shape, got.dtype)
    err = max_rel_error(got, ref)
    assert err <= TOL[dtype], f"{what}: max error {err:.3g} relative to max |grad| > {TOL[dtype]}"


def check_gradients(b, h, length, d, dtype, seed=0):
    q, k, v = qkv(b, h, length, d, dtype, seed)
    out = K.flash_attention(q, k, v)
    assert out.grad_fn is not None
    dout = randn(*out.shape, dtype=dtype, seed=seed + 7)  # the gradient of a random linear loss
    grads = torch.autograd.grad(out, (q, k, v), dout)
    for name, got, ref in zip("qkv", grads, sdpa_grads(q, k, v, dout)):
        assert_grads_close(got, ref, dtype, f"d{name} vs SDPA (L={length}, D={d}, {dtype})")
    # the PyTorch reference of the backward math gives the same
    for name, got, ref in zip("qkv", grads, AB.flash_attention_backward_reference(dout, q, k, v)):
        assert_grads_close(got, ref, dtype, f"d{name} vs reference (L={length}, D={d}, {dtype})")


# --- gradients -------------------------------------------------------------------------------------


@pytest.mark.parametrize("length", [1, 7, 33, 70])
def test_float32_gradients_match_sdpa(length):
    check_gradients(2, 3, length, 32, torch.float32)


@pytest.mark.parametrize("d, length", [(16, 70), (64, 33)])
def test_float32_head_dims(d, length):
    check_gradients(2, 3, length, d, torch.float32, seed=1)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("d, length", [(32, 7), (64, 70)])
def test_half_precision_gradients_match_sdpa(dtype, d, length):
    check_gradients(2, 3, length, d, dtype, seed=2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_both_tile_paths(dtype, monkeypatch):
    """float32 tiles re-read q, k in head-dim slices (D_CHUNK < head dim), half-precision ones keep
    whole tiles in registers; on a GPU each dtype takes either path for some head dims. Swap them."""
    monkeypatch.setitem(A.INTERPRET_D_CHUNK, dtype, 256 if dtype == torch.float32 else 16)
    check_gradients(2, 3, 33, 64, dtype, seed=3)
    q, k, v = qkv(2, 3, 33, 64, dtype, seed=3)
    with torch.no_grad():
        torch.testing.assert_close(
            K.flash_attention(q, k, v).float(), K.flash_attention_reference(q, k, v).float(),
            rtol=TOL[dtype], atol=TOL[dtype],
        )  # fmt: skip


# Keys past L in the dK/dV kernel overflow too, in rows that are never stored; numpy warns about them.
@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_very_negative_scores_stay_finite():
    """Every score near −120 (lse ≈ −117): a key past L that was not masked would get
    p = exp(0 − lse) = inf in the dQ kernel and turn dq into NaN. 19 keys: a ragged key block.
    Scores of that size cost float32 digits (|s|·2⁻²⁴ in every exponent), hence 1e-4."""
    q = (8 * torch.ones(1, 2, 19, 16) + 0.1 * randn(1, 2, 19, 16, seed=30)).to(DEVICE)
    k = (-3.75 * torch.ones(1, 2, 19, 16) + 0.1 * randn(1, 2, 19, 16, seed=31)).to(DEVICE)
    q, k, v = q.requires_grad_(), k.requires_grad_(), randn(1, 2, 19, 16, seed=32).requires_grad_()
    out = K.flash_attention(q, k, v)
    dout = randn(*out.shape, seed=33)
    for name, got, ref in zip("qkv", torch.autograd.grad(out, (q, k, v), dout), sdpa_grads(q, k, v, dout)):
        assert torch.isfinite(got).all(), name
        assert max_rel_error(got, ref) <= 1e-4, (name, max_rel_error(got, ref))


def test_strided_views_of_a_fused_projection():
    """q, k, v as views of one [B, L, 3·H·D] projection (FLUX's layout): the gradient flows back
    into the projection, and the output gradient arrives non-contiguous through the rearrange."""
    qkv_flat = randn(2, 33, 3 * 3 * 32, seed=4).requires_grad_()
    w = randn(2, 3, 33, 32, seed=5)

    def loss(attn):
        q, k, v = rearrange(qkv_flat, "B L (K H D) -> K B H L D", K=3, H=3)
        out = rearrange(attn(q, k, v), "b l (h d) -> b h l d", h=3)  # dout reaches it as a strided view
        return (out * w).sum()

    (got,) = torch.autograd.grad(loss(K.flash_attention), qkv_flat)
    sdpa = lambda q, k, v: rearrange(F.scaled_dot_product_attention(q, k, v), "b h l d -> b l (h d)")
    (ref,) = torch.autograd.grad(loss(sdpa), qkv_flat)
    assert_grads_close(got, ref, torch.float32, "d(qkv)")


def test_requires_grad_on_some_inputs():
    q0, k0, v0 = qkv(1, 2, 19, 16, torch.float32, seed=6)
    dout = randn(1, 19, 32, seed=9)
    full = torch.autograd.grad(K.flash_attention(q0, k0, v0), (q0, k0, v0), dout)
    for needs in ("q", "k", "v", "kv", "qv"):
        q, k, v = (t.detach().requires_grad_(name in needs) for name, t in zip("qkv", (q0, k0, v0)))
        out = K.flash_attention(q, k, v)
        assert out.requires_grad and out.grad_fn is not None
        leaves = [t for t in (q, k, v) if t.requires_grad]
        grads = torch.autograd.grad(out, leaves, dout)
        expected = [g for name, g in zip("qkv", full) if name in needs]
        for got, ref in zip(grads, expected):
            torch.testing.assert_close(got, ref, rtol=0, atol=0)


def test_forward_output_with_grad_equals_the_no_grad_forward():
    q, k, v = qkv(2, 3, 70, 32, torch.float32, seed=10)
    with_grad = K.flash_attention(q, k, v)
    with torch.no_grad():
        without = K.flash_attention(q, k, v)
    assert with_grad.grad_fn is not None and without.grad_fn is None
    torch.testing.assert_close(with_grad.detach(), without, rtol=0, atol=0)
    # the log-sum-exp the forward records for the backward is the scores' logsumexp
    out, lse = torch.ops.fluxcore.flash_attention_lse(q.detach(), k.detach(), v.detach())
    scores = torch.einsum("bhqd,bhkd->bhqk", q.detach(), k.detach()) / math.sqrt(32)
    torch.testing.assert_close(lse, scores.logsumexp(-1), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(out, without, rtol=0, atol=0)


def test_backward_is_deterministic():
    q, k, v = qkv(2, 3, 33, 32, torch.bfloat16, seed=11)
    dout = randn(2, 33, 96, dtype=torch.bfloat16, seed=12)
    first = torch.autograd.grad(K.flash_attention(q, k, v), (q, k, v), dout)
    second = torch.autograd.grad(K.flash_attention(q, k, v), (q, k, v), dout)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


@pytest.mark.filterwarnings("ignore:Input #. requires gradient and is not a double precision")
def test_gradcheck_float32():
    """The kernels take no float64, so torch.autograd.gradcheck runs in float32 with a step and
    tolerances to match (fast mode: random projections of the Jacobians)."""
    q, k, v = (t.detach().requires_grad_() for t in qkv(1, 2, 5, 16, torch.float32, seed=13))
    assert torch.autograd.gradcheck(
        K.flash_attention, (q, k, v), eps=1e-2, atol=1e-3, rtol=1e-2, fast_mode=True
    )
    with pytest.raises(ValueError, match="float64"):
        K.flash_attention(*(t.detach().double().requires_grad_() for t in (q, k, v)))


def test_ops_are_registered_with_torch_library():
    q, k, v = (t.detach() for t in qkv(1, 2, 5, 16, torch.float32, seed=14))
    torch.library.opcheck(
        torch.ops.fluxcore.flash_attention_lse.default, (q.requires_grad_(), k, v),
        test_utils=("test_schema", "test_faketensor", "test_autograd_registration"),
    )  # fmt: skip
    out, lse = torch.ops.fluxcore.flash_attention_lse(q.detach(), k, v)
    dout = randn(*out.shape, seed=15)
    torch.library.opcheck(
        torch.ops.fluxcore.flash_attention_backward.default, (dout, q.detach(), k, v, out, lse),
        test_utils=("test_schema", "test_faketensor"),
    )  # fmt: skip


def test_compiles_with_its_backward():
    """Dynamo traces flash_attention (the grad-mode check and the op with its registered backward)
    as one graph. On a GPU AOTAutograd also traces the backward into the Triton kernels; the
    interpreter's kernels cannot run on the fake tensors that needs, so there the graph runs as is."""
    q, k, v = qkv(1, 2, 19, 16, torch.float32, seed=16)
    dout = randn(1, 19, 32, seed=17)
    ref = torch.autograd.grad(K.flash_attention(q, k, v), (q, k, v), dout)
    backend = "eager" if _common.INTERPRET else "aot_eager"
    compiled = torch.compile(K.flash_attention, backend=backend, fullgraph=True)
    got = torch.autograd.grad(compiled(q, k, v), (q, k, v), dout)
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_triton_backend_can_train_and_tables_cover_training():
    """attention_unsupported_reason no longer refuses tensors that need a gradient, and wherever a
    GPU family has forward tiles for a head dim and dtype class, it has backward tiles too."""
    q = torch.empty(1, 1, 4, 64, requires_grad=True, device=DEVICE)
    assert K.attention_unsupported_reason(q) is None
    for fam in ("sm90", "sm80", "sm86"):
        for d in (16, 32, 64, 128, 256):
            for fp32 in (False, True):
                if A.autotune_configs(fam, d, fp32):
                    assert all(AB.backward_configs(fam, d, fp32)), (fam, d, fp32)
            assert A.autotune_configs(fam, d, fp32=True), (fam, d)  # float32 has tiles everywhere


# --- a model ---------------------------------------------------------------------------------------


def test_tiny_flux_training_step_triton_equals_sdpa():
    """One flow-matching step of tiny-dev (head dim 16, 12 image + 7 text tokens) in float32:
    every parameter's gradient with the "triton" attention backend matches the "sdpa" one."""
    torch.manual_seed(0)
    model = Flux(PRESETS["tiny-dev"]).to(DEVICE)
    with torch.no_grad():  # perturb the zero-initialised and trivial parameters
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    b, (h, w), cfg = 2, (3, 4), model.config
    batch = {
        "img": pack(randn(b, 16, 2 * h, 2 * w, seed=20)),
        "img_ids": make_img_ids(b, 16 * h, 16 * w, device=DEVICE),
        "txt": randn(b, 7, cfg.context_in_dim, seed=21),
        "txt_ids": torch.zeros(b, 7, 3, device=DEVICE),
        "y": randn(b, cfg.vec_in_dim, seed=22),
        "t": torch.tensor([0.3, 0.8], device=DEVICE),
        "noise": randn(b, h * w, 64, seed=23),
        "guidance": torch.full((b,), 3.5, device=DEVICE),
    }

    def grads(backend):
        model.zero_grad(set_to_none=True)
        with attention_backend(backend):
            loss = flow_loss(model, **batch)
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    loss_ref, ref = grads("sdpa")
    loss, got = grads("triton")
    torch.testing.assert_close(loss, loss_ref, rtol=1e-6, atol=1e-6)
    assert got.keys() == ref.keys()
    worst = max((max_rel_error(got[n], ref[n]), n) for n in ref)
    assert worst[0] <= 1e-5, f"largest gradient error {worst[0]:.3g} in {worst[1]}"


# --- GPU: FLUX shapes (skipped without CUDA) ------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("length", [4096 + 512, 1024 + 512 - 7])
def test_gpu_backward_flux_shapes(length):
    check_gradients(1, 24, length, 128, torch.bfloat16)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("d", [64, 128, 256])
def test_gpu_backward_dtypes_and_head_dims(dtype, d):
    q = torch.empty(1, 1, 1, d, dtype=dtype, device=DEVICE, requires_grad=True)
    reason = K.attention_unsupported_reason(q)
    if reason is not None:
        pytest.skip(reason)
    check_gradients(2, 3, 1000, d, dtype)
