"""diffusers' own FLUX pipeline test fixtures, saved by today's diffusers/transformers, loaded with
fluxcore.FluxPipeline.from_pretrained and compared image for image with diffusers' pipelines.

The components follow diffusers' `get_dummy_components` (tests/pipelines/flux/test_pipeline_flux.py)
as far as FLUX's architecture allows — fluxcore implements FLUX.1, so:
  * transformer: diffusers' (patch 1, 1 double + 1 single block, head dim 16, 2 heads, joint dim
    32, pooled 32, RoPE axes (4, 4, 8), no guidance embedding) but in_channels 64 (FLUX's 16-channel
    latents packed 2x2) instead of 4 (their 1-channel toy latents); 384 / 128 for Fill / Control;
  * CLIP: diffusers' config exactly (hidden 32, intermediate 37, 5 layers, 4 heads, "gelu",
    vocabulary 1000, bos/eos/pad ids 0/2/1 — eos 2 selects transformers' legacy pooling);
  * T5: the sizes of hf-internal-testing/tiny-random-t5 (d_model 32, d_kv 8, d_ff 37, 4 heads,
    5 layers, 8 buckets) with T5 v1.1's gated-GELU feed-forward (FLUX's T5; fluxcore has no v1.0 ReLU);
  * VAE: diffusers' (layers_per_block 1, norm_num_groups 1, width 4, scaling 1.5035, shift 0.0609,
    no quant convs) with 16 latent channels over 4 levels (FLUX's 8x autoencoder) instead of 1 level;
  * tokenizers: the hub's tiny-random tokenizers cannot be downloaded here; tokenizers trained in
    tests/tiny_snapshot.py are saved by transformers, which now writes tokenizer.json only — so the
    CLIP and T5 tokenizers load from tokenizer.json alone.
"""

import json

import numpy as np
import pytest
import torch

from fluxcore.latents import get_noise, pack
from fluxcore.pipeline import FluxPipeline

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

from tiny_snapshot import _clip_tokenizer, _t5_tokenizer  # noqa: E402

PIPELINES = {"text": "FluxPipeline", "fill": "FluxFillPipeline", "control": "FluxControlPipeline",
             "kontext": "FluxKontextPipeline"}  # fmt: skip
H, W = 32, 48
COMMON = dict(
    height=H, width=W, num_inference_steps=3, guidance_scale=5.0, max_sequence_length=16, output_type="np"
)


def dummy_components(mode: str, tmp, guidance: bool = False) -> dict:
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    torch.manual_seed(0)
    transformer = diffusers.FluxTransformer2DModel(
        patch_size=1,
        in_channels={"fill": 384, "control": 128}.get(mode, 64),
        out_channels=64,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=32,
        pooled_projection_dim=32,
        axes_dims_rope=[4, 4, 8],
        guidance_embeds=guidance,
    )
    clip_config = CLIPTextConfig(
        bos_token_id=0, eos_token_id=2, hidden_size=32, intermediate_size=37, layer_norm_eps=1e-05,
        num_attention_heads=4, num_hidden_layers=5, pad_token_id=1, vocab_size=1000, hidden_act="gelu",
        projection_dim=32,
    )  # fmt: skip
    torch.manual_seed(0)
    text_encoder = CLIPTextModel(clip_config)
    torch.manual_seed(0)
    text_encoder_2 = T5EncoderModel(
        T5Config(
            vocab_size=1000, d_model=32, d_kv=8, d_ff=37, num_layers=5, num_heads=4,
            relative_attention_num_buckets=8, feed_forward_proj="gated-gelu", dropout_rate=0.0,
        )
    )  # fmt: skip
    torch.manual_seed(0)
    vae = diffusers.AutoencoderKL(
        sample_size=32, in_channels=3, out_channels=3,
        down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
        block_out_channels=(4, 4, 4, 4), layers_per_block=1, latent_channels=16, norm_num_groups=1,
        use_quant_conv=False, use_post_quant_conv=False, shift_factor=0.0609, scaling_factor=1.5035,
    )  # fmt: skip
    with torch.no_grad():
        # Fill/Control/img2img *sample* the encoder's distribution in diffusers; log-variance −30
        # makes the sample its mean (std e^−15), which is what the reference and fluxcore use.
        vae.encoder.conv_out.bias[16:] = -30.0
    for m in (transformer, text_encoder, text_encoder_2, vae):  # random weights everywhere
        with torch.no_grad():
            for p in m.parameters():
                p.add_(0.05 * torch.randn_like(p))
    return {
        "scheduler": diffusers.FlowMatchEulerDiscreteScheduler(),
        "text_encoder": text_encoder.eval(),
        "text_encoder_2": text_encoder_2.eval(),
        "tokenizer": _clip_tokenizer(tmp),
        "tokenizer_2": _t5_tokenizer(tmp),
        "transformer": transformer.eval(),
        "vae": vae.eval(),
    }


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """mode → (folder, diffusers pipeline) for the text, fill, control and kontext fixtures."""
    out = {}
    for mode, guidance in [("text", False), ("fill", True), ("control", True), ("kontext", True)]:
        root = tmp_path_factory.mktemp(f"port_{mode}")
        ref = getattr(diffusers, PIPELINES[mode])(**dummy_components(mode, root / "src", guidance))
        ref.save_pretrained(root / "model")
        ref.set_progress_bar_config(disable=True)
        out[mode] = (root / "model", ref)
    return out


@pytest.fixture(scope="module")
def pipes(saved):
    return {mode: FluxPipeline.from_pretrained(folder) for mode, (folder, _) in saved.items()}


def noise(n, seed=1):
    return pack(get_noise(n, H, W, dtype=torch.float32, seed=seed))


def picture(seed=0, h=H, w=W):
    from PIL import Image

    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def close(ours, theirs, tol=1e-4):
    ours, theirs = np.asarray(ours), np.asarray(theirs)
    assert ours.shape == theirs.shape
    assert ours.std() > 0.01  # an image, not a constant
    err = np.abs(ours - theirs).max()
    print(f"max |fluxcore - diffusers| = {err:.2e}")
    assert err <= tol, err
    return err


def test_saved_as_todays_libraries_save(saved):
    folder = saved["text"][0]
    assert sorted(p.name for p in (folder / "tokenizer").iterdir()) == [
        "tokenizer.json",
        "tokenizer_config.json",
    ]
    assert not (folder / "tokenizer_2" / "spiece.model").exists()
    assert json.loads((folder / "model_index.json").read_text())["_class_name"] == "FluxPipeline"


def test_tokenizers_from_tokenizer_json_alone(saved, pipes):
    folder, ref = saved["text"]
    prompts = [
        "A painting of a squirrel eating a burger",
        "  red   HOUSE,by the river!!  ",
        "",
        "cat on mars " * 40,
    ]
    for ours, theirs, length in [
        (pipes["text"].tokenizer, ref.tokenizer, 77),
        (pipes["text"].tokenizer_2, ref.tokenizer_2, 16),
    ]:
        with pytest.warns(UserWarning, match="dropped"):  # the long prompt is truncated, with a warning
            got = ours(prompts, max_length=length)
        want = theirs(
            prompts, padding="max_length", max_length=length, truncation=True, return_tensors="pt"
        ).input_ids
        assert torch.equal(got, want)


@pytest.mark.parametrize("batch", [1, 2])
def test_text_to_image(saved, pipes, batch):
    prompts = ["A painting of a squirrel eating a burger", "a red house by the river"][:batch]
    kw = dict(prompt=prompts, latents=noise(batch), **COMMON)
    close(pipes["text"](progress=False, **kw).images, saved["text"][1](**kw).images)


def test_prompt_2_true_cfg_and_images_per_prompt(saved, pipes):
    kw = dict(prompt="a cat", prompt_2="a dog on mars", negative_prompt="blurry", true_cfg_scale=2.5,
              num_images_per_prompt=2, latents=noise(2), **COMMON)  # fmt: skip
    ours = pipes["text"](progress=False, **kw).images
    close(ours, saved["text"][1](**kw).images)
    plain = pipes["text"](prompt="a cat", latents=noise(2), num_images_per_prompt=2, progress=False, **COMMON)
    assert np.abs(plain.images - ours).max() > 1e-3


def test_prompt_embeds_and_encode_prompt(saved, pipes):
    pipe, ref = pipes["text"], saved["text"][1]
    embeds, pooled, ids = pipe.encode_prompt("a cat", prompt_2="a dog", max_sequence_length=16)
    r_embeds, r_pooled, r_ids = ref.encode_prompt("a cat", prompt_2="a dog", max_sequence_length=16)
    assert embeds.shape == r_embeds.shape and ids.shape == r_ids.shape == (16, 3)
    torch.testing.assert_close(embeds, r_embeds, rtol=0, atol=1e-5)
    torch.testing.assert_close(pooled, r_pooled, rtol=0, atol=1e-5)
    kw = dict(prompt_embeds=embeds, pooled_prompt_embeds=pooled, latents=noise(1), **COMMON)
    ours = pipe(progress=False, **kw).images
    close(ours, ref(**kw).images)
    close(
        ours, pipe(prompt="a cat", prompt_2="a dog", latents=noise(1), progress=False, **COMMON).images, 1e-6
    )
    txt, txt_ids, vec = pipe.encode_prompt_reference("a cat", max_sequence_length=16)
    assert txt_ids.shape == (1, 16, 3) and vec.shape == (1, 32)


def test_callback_on_step_end_edits_latents(saved, pipes):
    seen = []

    def edit(pipe, i, t, kw):
        seen.append((i, float(t)))
        return {"latents": kw["latents"] * 0.9} if i == 1 else {}

    kw = dict(prompt="a cat", latents=noise(1), callback_on_step_end=edit, **COMMON)
    ours = pipes["text"](progress=False, **kw).images
    mine, seen = seen, []
    theirs = saved["text"][1](**kw).images
    assert [i for i, _ in mine] == [i for i, _ in seen] == [0, 1, 2]
    np.testing.assert_allclose([t for _, t in mine], [t for _, t in seen], atol=1e-3)
    close(ours, theirs)
    assert (
        np.abs(ours - pipes["text"](prompt="a cat", latents=noise(1), progress=False, **COMMON).images).max()
        > 1e-3
    )


def test_img2img(saved, pipes):
    folder = saved["text"][0]
    ref = diffusers.FluxImg2ImgPipeline.from_pretrained(folder)
    ref.set_progress_bar_config(disable=True)
    kw = dict(prompt="a cat", image=picture(), strength=0.7, **{**COMMON, "num_inference_steps": 4})
    theirs = ref(generator=torch.Generator().manual_seed(5), **kw).images
    # diffusers draws the encoder's sample from the generator before the noise: skip that draw
    g = torch.Generator().manual_seed(5)
    torch.randn(1, 16, H // 8, W // 8, generator=g)
    close(pipes["text"](generator=g, progress=False, **kw).images, theirs)


@pytest.mark.parametrize("mode", ["fill", "control", "kontext"])
def test_conditioning_modes(saved, pipes, mode):
    mask = np.zeros((H, W), dtype=np.uint8)
    mask[8:24, 16:40] = 255  # binary: diffusers binarises masks, the reference does not
    inputs = {
        "fill": dict(image=picture(), mask_image=mask[..., None] / 255.0),
        "control": dict(control_image=picture()),
        "kontext": dict(image=picture(h=48, w=32)),
    }[mode]
    kw = dict(prompt="a cat", latents=noise(1), **inputs, **COMMON)
    extra_ours = {"kontext_auto_resize": False} if mode == "kontext" else {}
    extra_theirs = {"_auto_resize": False, "max_area": 48 * 32} if mode == "kontext" else {}
    close(pipes[mode](progress=False, **kw, **extra_ours).images, saved[mode][1](**kw, **extra_theirs).images)


def test_image_inputs_follow_diffusers_conventions(pipes):
    pipe = pipes["text"]
    pil = picture()
    arr = np.asarray(pil).astype(np.float32) / 255.0  # [H, W, 3] in [0, 1]
    t01 = torch.from_numpy(arr).permute(2, 0, 1)  # [3, H, W] in [0, 1]
    kw = dict(prompt="a cat", strength=0.6, latents=noise(1), progress=False, **COMMON)
    base = pipe(image=pil, **kw).images
    for image in (arr, [arr], t01, t01[None], [pil], t01 * 2 - 1):  # [-1, 1] is detected by its sign
        np.testing.assert_allclose(pipe(image=image, **kw).images, base, atol=2e-6)
