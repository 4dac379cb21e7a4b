"""The pure functions against diffusers' independent implementations and closed forms."""

import math

import pytest
import torch

from fluxcore.math import apply_rope, embed_positions, modulate, rms_norm, rope, timestep_embedding

diffusers = pytest.importorskip("diffusers")


def test_timestep_embedding_matches_diffusers_and_closed_form():
    from diffusers.models.embeddings import get_timestep_embedding

    t = torch.tensor([0.0, 0.123, 0.5, 0.999, 1.0])
    ours = timestep_embedding(t, 256)
    theirs = get_timestep_embedding(t * 1000, 256, flip_sin_to_cos=True, downscale_freq_shift=0)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-6)
    # cos first, frequency exp(-ln(10000)·k/128)
    k = 5
    assert ours[1, k].item() == pytest.approx(
        math.cos(123.0 * math.exp(-math.log(10000) * k / 128)), abs=1e-5
    )
    assert ours[1, 128 + k].item() == pytest.approx(
        math.sin(123.0 * math.exp(-math.log(10000) * k / 128)), abs=1e-5
    )


def test_timestep_embedding_rounds_like_the_reference_in_bf16():
    """A bf16 t is scaled by 1000 in bf16 (the reference does `time_factor * t` in t's dtype)."""
    t = torch.tensor([0.7234], dtype=torch.bfloat16)
    scaled = (t * 1000).float()  # bf16 product: spacing 4 near 700
    assert scaled.item() != pytest.approx(723.4, abs=0.5)
    freqs = torch.exp(-math.log(10000) * torch.arange(128) / 128)
    expect = torch.cat([torch.cos(scaled * freqs), torch.sin(scaled * freqs)])[None].bfloat16()
    torch.testing.assert_close(timestep_embedding(t, 256), expect, rtol=0, atol=0)


def test_rope_tables_and_rotation_match_diffusers():
    from diffusers.models.embeddings import apply_rotary_emb
    from diffusers.models.transformers.transformer_flux import FluxPosEmbed

    g = torch.Generator().manual_seed(0)
    ids = torch.stack(
        [torch.randint(0, 2, (37,)), torch.randint(0, 64, (37,)), torch.randint(0, 64, (37,))], -1
    ).float()
    axes = (16, 56, 56)
    pe = embed_positions(ids[None], axes, 10_000)
    assert pe.shape == (1, 1, 37, 64, 2, 2) and pe.dtype == torch.float32
    cos, sin = FluxPosEmbed(theta=10_000, axes_dim=list(axes))(ids)
    x = torch.randn(2, 3, 37, 128, generator=g)
    ours = apply_rope(x, pe)
    theirs = apply_rotary_emb(x, (cos, sin), sequence_dim=2)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


def test_rope_is_the_pairwise_rotation():
    pos = torch.tensor([[3.0]])
    r = rope(pos, 4, 10_000)[0, 0]  # [2, 2, 2]
    for k, omega in enumerate([1.0, 10_000**-0.5]):
        a = 3.0 * omega
        torch.testing.assert_close(
            r[k], torch.tensor([[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]])
        )
    x = torch.tensor([1.0, 0.0, 0.0, 1.0]).view(1, 1, 1, 4)
    out = apply_rope(x, rope(pos, 4, 10_000)[:, None])
    a0, a1 = 3.0, 3.0 * 10_000**-0.5
    torch.testing.assert_close(
        out.flatten(), torch.tensor([math.cos(a0), math.sin(a0), -math.sin(a1), math.cos(a1)])
    )


def test_rms_norm_and_modulate():
    x = torch.randn(2, 5, 16) * 7
    scale = torch.randn(16)
    torch.testing.assert_close(rms_norm(x, scale), torch.nn.functional.rms_norm(x, (16,), scale, eps=1e-6))
    shift, sc = torch.randn(2, 1, 16), torch.randn(2, 1, 16)
    torch.testing.assert_close(modulate(x, shift, sc), x * (1 + sc) + shift)
