"""The attention entry point: backends agree, selection precedence, clear errors, per-thread
contexts."""

import threading

import pytest
import torch

from fluxcore import attention, attention_backend, available_backends, set_attention_backend
from fluxcore.attention import _REGISTRY, register_backend, resolve_backend
from fluxcore.errors import BackendError
from fluxcore.math import apply_rope, embed_positions


@pytest.fixture(autouse=True)
def _reset(monkeypatch):
    monkeypatch.delenv("FLUXCORE_ATTENTION", raising=False)
    yield
    set_attention_backend(None)


def qkv(b=2, h=3, length=37, d=16, dtype=torch.float32):
    """q and k rotated by FLUX-like positions (text at 0, then a 7-column grid), as blocks pass them."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(b, h, length, d, generator=g).to(dtype) for _ in range(3))
    ids = torch.stack([torch.zeros(length), torch.arange(length) // 7, torch.arange(length) % 7], -1).float()
    pe = embed_positions(ids[None].expand(b, -1, -1), (4, 6, 6), 10_000)
    return apply_rope(q, pe), apply_rope(k, pe), v


def test_eager_and_sdpa_agree_and_layout():
    q, k, v = qkv()
    a = attention(q, k, v, backend="eager")
    b = attention(q, k, v, backend="sdpa")
    assert a.shape == (2, 37, 3 * 16)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    # head-major channels: head 1 occupies channels 16..31
    one_head = attention(q[:, 1:2], k[:, 1:2], v[:, 1:2], backend="eager")
    torch.testing.assert_close(a[..., 16:32], one_head, rtol=1e-6, atol=1e-6)


def test_eager_is_softmax_attention_written_out():
    q, k, v = qkv(b=1, h=1, length=5)
    probs = torch.softmax(q[0, 0] @ k[0, 0].T / 4.0, dim=-1)  # scale 1/sqrt(16)
    torch.testing.assert_close(attention(q, k, v, backend="eager")[0], probs @ v[0, 0])


def test_precedence_argument_context_global_env(monkeypatch):
    q = torch.randn(1, 1, 4, 16)
    assert resolve_backend(q).name == "sdpa"  # auto on CPU
    monkeypatch.setenv("FLUXCORE_ATTENTION", "eager")
    assert resolve_backend(q).name == "eager"
    set_attention_backend("sdpa")
    assert resolve_backend(q).name == "sdpa"  # global setter beats env
    with attention_backend("eager"):
        assert resolve_backend(q).name == "eager"  # context beats global
        with attention_backend("sdpa"):
            assert resolve_backend(q).name == "sdpa"  # innermost wins
        assert resolve_backend(q, "sdpa").name == "sdpa"  # argument beats context
        assert resolve_backend(q).name == "eager"
    assert resolve_backend(q).name == "sdpa"


def test_unknown_and_unavailable_backends_raise_with_reason(monkeypatch):
    with pytest.raises(BackendError, match="unknown attention backend 'flash9'.*known: auto"):
        set_attention_backend("flash9")
    monkeypatch.setenv("FLUXCORE_ATTENTION", "nope")
    with pytest.raises(BackendError, match="unknown attention backend 'nope' .from FLUXCORE_ATTENTION."):
        attention(*qkv())
    monkeypatch.delenv("FLUXCORE_ATTENTION")
    register_backend("never", lambda q, k, v: q, why_not=lambda q: "it is a test double", priority=99)
    try:
        with pytest.raises(BackendError, match="'never' cannot run: it is a test double"):
            attention(*qkv(), backend="never")
        assert resolve_backend(torch.randn(1, 1, 2, 16)).name != "never"  # auto skips it
        assert "never" not in available_backends()
    finally:
        _REGISTRY.pop("never")


def test_auto_never_picks_triton_on_cpu():
    assert resolve_backend(torch.randn(1, 1, 2, 16), "auto").name == "sdpa"
    assert {"eager", "sdpa"} <= set(available_backends())


def test_auto_takes_triton_for_inference_only():
    """On CUDA "auto" may take the Triton kernel, but not for a tensor that needs a gradient (its
    backward is opt-in by name until measured on a GPU)."""
    ok = _REGISTRY["triton"].auto_ok
    q = torch.randn(1, 1, 2, 16)
    cuda_like = type("CudaLike", (), {"is_cuda": True, "requires_grad": False})()
    assert ok(cuda_like) and not ok(q)
    cuda_like.requires_grad = True
    assert not ok(cuda_like)
    with torch.no_grad():
        assert ok(cuda_like)


def test_contexts_are_per_thread():
    """A thread inside attention_backend("eager") neither switches another thread nor pops its entry."""
    q = torch.randn(1, 1, 2, 16)
    inside, release, seen = threading.Event(), threading.Event(), {}

    def holder():
        with attention_backend("eager"):
            seen["holder"] = resolve_backend(q).name
            inside.set()
            release.wait(10)
        seen["holder_after"] = resolve_backend(q).name

    t = threading.Thread(target=holder)
    with attention_backend("sdpa"):
        t.start()
        assert inside.wait(10)
        seen["main"] = resolve_backend(q).name  # the other thread's context is not ours
        release.set()
        t.join(10)
        seen["main_after"] = resolve_backend(q).name  # its exit did not pop our entry
    assert seen == {"holder": "eager", "main": "sdpa", "holder_after": "sdpa", "main_after": "sdpa"}
