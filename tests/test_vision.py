"""fluxcore.vision against transformers' CLIPVisionModelWithProjection and SiglipVisionModel
(oracles nobody here wrote): tiny random towers saved by transformers and loaded by fluxcore,
full-size key sets and parameter counts on the meta device, and the image preprocessing."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fluxcore.errors import WeightsError
from fluxcore.vision import (
    CLIPVisionConfig,
    CLIPVisionEncoder,
    SiglipVisionConfig,
    SiglipVisionEncoder,
    clip_preprocess,
    load_clip_vision,
    load_siglip,
    siglip_preprocess,
)

transformers = pytest.importorskip("transformers")
PIL = pytest.importorskip("PIL.Image")

TINY_CLIP = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                 image_size=42, patch_size=14, projection_dim=24)  # fmt: skip
TINY_SIGLIP = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                   image_size=42, patch_size=14)  # fmt: skip


def randomize(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))
    return model


def max_err(a, b):
    return (a.double() - b.double()).abs().max().item()


def test_clip_vision_matches_transformers(tmp_path):
    ref = randomize(
        transformers.CLIPVisionModelWithProjection(transformers.CLIPVisionConfig(**TINY_CLIP))
    ).eval()
    ref.save_pretrained(tmp_path / "image_encoder")
    ours = load_clip_vision(tmp_path)  # a model root holding image_encoder/
    assert ours.config == CLIPVisionConfig(**TINY_CLIP)
    pixels = torch.randn(2, 3, 42, 42)
    with torch.no_grad():
        a, b = ours(pixels), ref(pixel_values=pixels)
    assert max_err(a.image_embeds, b.image_embeds) <= 1e-5
    assert max_err(a.last_hidden_state, b.last_hidden_state) <= 1e-5


def test_siglip_matches_transformers(tmp_path):
    ref = randomize(transformers.SiglipVisionModel(transformers.SiglipVisionConfig(**TINY_SIGLIP))).eval()
    ref.save_pretrained(tmp_path / "image_encoder")
    ours = load_siglip(tmp_path / "image_encoder")
    pixels = torch.randn(2, 3, 42, 42)
    with torch.no_grad():
        a, b = ours(pixels), ref(pixel_values=pixels)
    assert max_err(a.last_hidden_state, b.last_hidden_state) <= 1e-5
    assert max_err(a.pooler_output, b.pooler_output) <= 1e-5


def test_single_file_without_config(tmp_path):
    """A bare .safetensors file (official key names) loads with its config read from shapes."""
    from fluxcore.weights.io import write_safetensors

    src = randomize(SiglipVisionEncoder(SiglipVisionConfig(**{**TINY_SIGLIP, "num_attention_heads": 1})))
    sd = {
        **src.state_dict(),
        "text_model.embeddings.token_embedding.weight": torch.zeros(3, 2),
        "logit_scale": torch.zeros(1),
    }
    write_safetensors(tmp_path / "siglip.safetensors", sd)
    back = load_siglip(tmp_path / "siglip.safetensors")  # hidden 32 → heads 32 // 64 → 1
    assert all(torch.equal(back.state_dict()[k], v) for k, v in src.state_dict().items())
    with pytest.raises(WeightsError, match="no vision-tower tensors"):
        write_safetensors(tmp_path / "text.safetensors", {"text_model.x": torch.zeros(1)})
        load_siglip(tmp_path / "text.safetensors")


def _key_shapes(model, prefix_missing=False):
    sd = model.state_dict()
    return {
        (
            "vision_model." + k
            if prefix_missing and not k.startswith(("vision_model.", "visual_projection"))
            else k
        ): tuple(v.shape)
        for k, v in sd.items()
    }


def test_full_size_keys_and_parameter_counts():
    with torch.device("meta"):
        ours_c, ref_c = CLIPVisionEncoder(), transformers.CLIPVisionModelWithProjection(transformers.CLIPVisionConfig(
            hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
            image_size=224, patch_size=14, projection_dim=768))  # fmt: skip
        ours_s, ref_s = SiglipVisionEncoder(), transformers.SiglipVisionModel(transformers.SiglipVisionConfig(
            hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16,
            image_size=384, patch_size=14))  # fmt: skip
    assert _key_shapes(ours_c) == _key_shapes(ref_c)
    assert _key_shapes(ours_s) == _key_shapes(ref_s, prefix_missing=True)
    n = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert n(ours_c) == n(ref_c) == 303_966_208  # CLIP ViT-L/14 vision + projection
    assert n(ours_s) == n(ref_s) == 428_225_600  # SigLIP so400m/14 @ 384 vision tower


def _image(w, h, seed=0):
    rng = np.random.default_rng(seed)
    return PIL.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


@pytest.mark.parametrize("size", [(300, 200), (180, 260)])
def test_preprocessing_matches_transformers(size):
    img = _image(*size)
    clip = transformers.CLIPImageProcessorPil(
        size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224}
    )
    expect = torch.as_tensor(np.asarray(clip(images=img, return_tensors="np")["pixel_values"]))
    got = clip_preprocess(img)
    assert got.shape == expect.shape == (1, 3, 224, 224)
    assert max_err(got, expect) <= 1e-5
    sig = transformers.SiglipImageProcessorPil(size={"height": 384, "width": 384}, resample=3)
    expect = torch.as_tensor(np.asarray(sig(images=img, return_tensors="np")["pixel_values"]))
    got = siglip_preprocess(img)
    assert got.shape == expect.shape == (1, 3, 384, 384)
    assert max_err(got, expect) <= 1e-5


def test_redux_tokens_from_a_pil_image():
    """image → SigLIP → Redux projector → tokens appended to the text with zero ids."""
    from fluxcore.conditioning import ReduxProjector, append_redux
    from fluxcore.vision import redux_tokens

    siglip = randomize(SiglipVisionEncoder(SiglipVisionConfig(**TINY_SIGLIP))).eval()
    proj = randomize(ReduxProjector(siglip_dim=32, txt_dim=48)).eval()
    img = _image(70, 50)
    tokens = redux_tokens(img, siglip, proj)
    with torch.no_grad():
        expect = proj(siglip(siglip_preprocess(img, 42)).last_hidden_state)
    assert tokens.shape == (1, 9, 48) and torch.equal(tokens, expect)
    txt, ids = append_redux(torch.zeros(2, 5, 48), torch.zeros(2, 5, 3), tokens)
    assert txt.shape == (2, 14, 48) and torch.equal(txt[1, 5:], tokens[0]) and not ids.any()
