"""fluxcore.latents against diffusers' FluxPipeline helpers (an oracle nobody here wrote) and the
reference's noise recipe."""

import math

import pytest
import torch

from fluxcore.errors import ConfigError
from fluxcore.latents import (
    draw_noise,
    get_noise,
    image_seq_len,
    latent_size,
    make_img_ids,
    make_txt_ids,
    pack,
    unpack,
)

diffusers = pytest.importorskip("diffusers")
FluxPipeline = diffusers.FluxPipeline


@pytest.mark.parametrize("hw", [(64, 64), (48, 80), (40, 72), (17, 33)])
def test_noise_shape_and_seed(hw):
    h, w = hw
    x = get_noise(2, h, w, dtype=torch.float32, seed=7)
    assert x.shape == (2, 16, 2 * math.ceil(h / 16), 2 * math.ceil(w / 16))
    assert latent_size(h, w) == tuple(x.shape[-2:])
    assert torch.equal(x, get_noise(2, h, w, dtype=torch.float32, seed=7))
    assert not torch.equal(x, get_noise(2, h, w, dtype=torch.float32, seed=8))


def test_noise_is_drawn_directly_in_dtype_on_cpu_generator():
    # The reference calls randn(..., dtype=bf16, generator=cpu_generator) then moves the result.
    x16 = get_noise(1, 64, 64, device="cpu", dtype=torch.bfloat16, seed=3)
    assert x16.dtype == torch.bfloat16
    g = torch.Generator(device="cpu").manual_seed(3)
    ref = torch.randn(1, 16, 8, 8, dtype=torch.bfloat16, generator=g)
    assert torch.equal(x16, ref)
    assert get_noise(1, 64, 64, device="meta", dtype=torch.bfloat16, seed=3).device.type == "meta"


@pytest.mark.parametrize("b,c,h,w", [(1, 16, 4, 6), (3, 16, 10, 2), (2, 5, 6, 8)])
def test_pack_matches_diffusers(b, c, h, w):
    x = torch.randn(b, c, h, w)
    packed = pack(x)
    assert torch.equal(packed, FluxPipeline._pack_latents(x, b, c, h, w))
    assert torch.equal(unpack(packed, 8 * h, 8 * w), x)
    assert torch.equal(unpack(packed, 8 * h, 8 * w), FluxPipeline._unpack_latents(packed, 8 * h, 8 * w, 8))


def test_pack_layout_explicit():
    x = torch.arange(2 * 4 * 6, dtype=torch.float32).reshape(1, 2, 4, 6)
    p = pack(x)
    # token (row 1, col 2) is index 1*3+2; channel c*4 + ph*2 + pw
    for c in range(2):
        for ph in range(2):
            for pw in range(2):
                assert p[0, 1 * 3 + 2, c * 4 + ph * 2 + pw] == x[0, c, 2 + ph, 4 + pw]


@pytest.mark.parametrize("hw", [(64, 96), (48, 48), (40, 72)])
def test_img_ids_match_diffusers(hw):
    h, w = hw
    ids = make_img_ids(3, h, w)
    gh, gw = math.ceil(h / 16), math.ceil(w / 16)
    ref = FluxPipeline._prepare_latent_image_ids(3, gh, gw, "cpu", torch.float32)
    assert ids.shape == (3, gh * gw, 3) and ids.dtype == torch.float32
    assert image_seq_len(h, w) == gh * gw
    for i in range(3):
        assert torch.equal(ids[i], ref)


def test_kontext_ids_and_txt_ids():
    ids = make_img_ids(2, 32, 48, index=1)
    assert torch.all(ids[..., 0] == 1)
    assert torch.equal(ids[..., 1:], make_img_ids(2, 32, 48)[..., 1:])
    t = make_txt_ids(2, 7)
    assert t.shape == (2, 7, 3) and t.dtype == torch.float32 and not t.any()


def test_draw_noise_seeds_and_generators():
    one, seeds = draw_noise(5, 2, 32, 48, dtype=torch.float32)
    assert seeds == [5] and torch.equal(one, pack(get_noise(2, 32, 48, dtype=torch.float32, seed=5)))
    per, seeds = draw_noise([5, 6], 2, 32, 48, dtype=torch.float32)
    assert seeds == [5, 6] and torch.equal(per[1:], pack(get_noise(1, 32, 48, dtype=torch.float32, seed=6)))
    gens, seeds = draw_noise([torch.Generator().manual_seed(1)] * 2, 2, 32, 48, dtype=torch.float32)
    assert seeds is None and gens.shape == (2, image_seq_len(32, 48), 64)
    _, seeds = draw_noise(None, 1, 16, 16, dtype=torch.float32)
    assert len(seeds) == 1 and 0 <= seeds[0] < 2**32
    with pytest.raises(ConfigError, match="got 3 seeds/generators for 2 images"):
        draw_noise([1, 2, 3], 2, 32, 32)
    with pytest.raises(ConfigError, match="non-negative"):
        draw_noise(-1, 1, 32, 32)
