"""What FluxPipeline loads on top of its models, end to end on the tiny snapshot, against diffusers'
pipelines with the same files (oracles nobody here wrote): a PEFT LoRA saved by diffusers, a
ControlNet saved by diffusers, masked img2img on a base model (FluxInpaintPipeline); IP-Adapter and
Redux from PIL images."""

import numpy as np
import pytest
import torch

from fluxcore.errors import ConfigError
from fluxcore.latents import pack
from fluxcore.pipeline import FluxPipeline

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from tiny_snapshot import write_tiny_snapshot  # noqa: E402

KW = dict(max_sequence_length=16, output_type="np")
TOL = 1e-4


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return write_tiny_snapshot(tmp_path_factory.mktemp("adapters") / "dev", variant="dev", seed=3)


def picture(w, h, seed=0):
    from PIL import Image

    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def noise(h, w, seed=1):
    return pack(torch.randn(1, 16, h // 8, w // 8, generator=torch.Generator().manual_seed(seed)))


def reference(cls, folder, **parts):
    ref = cls.from_pretrained(folder, **parts)
    ref.set_progress_bar_config(disable=True)
    return ref


def err(a, b):
    return float(np.abs(a - b).max())


def test_peft_lora_matches_diffusers(folder, tmp_path):
    """A PEFT LoRA written by diffusers' save_lora_weights, loaded by both pipelines; with a
    per-call joint_attention_kwargs scale; adapters, fuse/unfuse and unload."""
    pytest.importorskip("peft")
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    src = reference(diffusers.FluxPipeline, folder).transformer
    cfg = LoraConfig(r=4, lora_alpha=8, init_lora_weights=False,
                     target_modules=["to_q", "to_k", "to_v", "to_out.0", "proj_mlp", "proj_out", "ff.net.2"])  # fmt: skip
    src.add_adapter(cfg, adapter_name="style")
    with torch.no_grad():
        g = torch.Generator().manual_seed(0)
        for name, p in src.named_parameters():
            if ".style." in name:
                p.copy_(0.3 * torch.randn(p.shape, generator=g))
    diffusers.FluxPipeline.save_lora_weights(
        tmp_path / "lora", transformer_lora_layers=get_peft_model_state_dict(src, adapter_name="style"),
        transformer_lora_adapter_metadata=cfg.to_dict(),
    )  # fmt: skip
    call = dict(
        prompt="a cat on mars", height=32, width=48, num_inference_steps=3, latents=noise(32, 48), **KW
    )
    pipe = FluxPipeline.from_pretrained(folder)
    base = pipe(**call, progress=False).images
    name = pipe.load_lora_weights(tmp_path / "lora", adapter_name="style")
    assert name == "style" and name.format == "diffusers/peft" and pipe.get_active_adapters() == ["style"]
    ref = reference(diffusers.FluxPipeline, folder)
    ref.load_lora_weights(
        tmp_path / "lora", weight_name="pytorch_lora_weights.safetensors", adapter_name="style"
    )
    ours, theirs = pipe(**call, progress=False).images, ref(**call).images
    e_full = err(ours, theirs)
    assert e_full <= TOL and err(ours, base) > 1e-2
    half = dict(joint_attention_kwargs={"scale": 0.5})
    e_half = err(pipe(**call, **half, progress=False).images, ref(**call, **half).images)
    assert e_half <= TOL
    assert np.array_equal(pipe(**call, progress=False).images, ours)  # the scale was for one call only
    pipe.set_adapters("style", 0.5)  # the strength: the same as the call scale 0.5
    at_half = pipe(**call, progress=False).images
    assert err(at_half, ref(**call, **half).images) <= TOL
    pipe.fuse_lora()
    assert err(pipe(**call, progress=False).images, at_half) <= 1e-5
    pipe.unfuse_lora()
    assert np.array_equal(pipe(**call, progress=False).images, at_half)
    pipe.disable_lora()
    assert pipe.get_active_adapters() == [] and np.array_equal(pipe(**call, progress=False).images, base)
    pipe.enable_lora()
    with pytest.raises(ConfigError, match="no LoRA adapters named"):
        pipe.set_adapters("nope")
    pipe.unload_lora_weights()
    assert np.array_equal(pipe(**call, progress=False).images, base)
    print(f"LoRA vs diffusers: scale 1 {e_full:.2e}, scale 0.5 {e_half:.2e}")


def test_controlnet_matches_diffusers(folder, tmp_path):
    from test_controlnet import diffusers_controlnet

    net = diffusers_controlnet(2, 1, seed=4)
    net.save_pretrained(tmp_path / "cn", safe_serialization=True)
    hint = picture(48, 32, seed=5)
    call = dict(prompt="a cat on mars", height=32, width=48, num_inference_steps=4, guidance_scale=4.0,
                latents=noise(32, 48), **KW)  # fmt: skip
    control = dict(control_image=hint, controlnet_conditioning_scale=0.8, control_guidance_end=0.75)
    pipe = FluxPipeline.from_pretrained(folder, controlnet=tmp_path / "cn")
    with pytest.raises(ConfigError, match="pass control_image"):
        pipe(**call)
    ours = pipe(**call, **control, progress=False).images
    ref = reference(
        diffusers.FluxControlNetPipeline,
        folder,
        controlnet=diffusers.FluxControlNetModel.from_pretrained(tmp_path / "cn"),
    )
    theirs = ref(**call, **control).images
    e = err(ours, theirs)
    assert e <= TOL
    assert list(pipe.transformer.double_blocks) == list(
        pipe.transformer.double_blocks
    )  # blocks back after the call
    assert not any("Controlled" in type(b).__name__ for b in pipe.transformer.double_blocks)
    pipe.controlnets = []
    assert err(pipe(**call, progress=False).images, ours) > 1e-3  # the ControlNet mattered
    print(f"ControlNet vs diffusers: {e:.2e}")


@pytest.mark.parametrize("strength", [1.0, 0.6])
def test_masked_img2img_matches_diffusers_inpaint(folder, strength):
    """diffusers encodes the image (one draw from the generator: the VAE posterior sample, ~1e-7
    here) and then draws the noise; we take that second draw as our latents."""
    from PIL import Image

    h, w = 32, 48
    image, steps = picture(w, h, seed=7), 5
    mask = np.zeros((h, w), dtype=np.uint8)
    mask[8:24, 16:40] = 255
    mask = Image.fromarray(mask)
    g = torch.Generator().manual_seed(11)
    torch.randn(1, 16, h // 8, w // 8, generator=g)  # diffusers' VAE posterior sample
    eps = torch.randn(1, 16, h // 8, w // 8, generator=g)
    call = dict(prompt="a red house", height=h, width=w, num_inference_steps=steps, guidance_scale=3.0, **KW)
    pipe = FluxPipeline.from_pretrained(folder)
    ours = pipe(
        **call, image=image, mask_image=mask, strength=strength, latents=pack(eps), progress=False
    ).images
    ref = reference(diffusers.FluxInpaintPipeline, folder)
    theirs = ref(**call, image=image, mask_image=mask, strength=strength,
                 generator=torch.Generator().manual_seed(11)).images  # fmt: skip
    e = err(ours, theirs)
    assert e <= TOL
    plain = pipe(**call, image=image, strength=strength, latents=pack(eps), progress=False).images
    assert err(plain, ours) > 1e-3
    print(f"masked img2img (strength {strength}) vs FluxInpaintPipeline: {e:.2e}")


def test_redux_image_equals_the_manual_chain(folder, tmp_path):
    from test_vision import TINY_SIGLIP
    from transformers import SiglipVisionConfig, SiglipVisionModel

    from fluxcore.conditioning import ReduxProjector
    from fluxcore.vision import siglip_preprocess
    from fluxcore.weights.io import write_safetensors

    torch.manual_seed(0)
    SiglipVisionModel(SiglipVisionConfig(**TINY_SIGLIP)).eval().save_pretrained(tmp_path / "image_encoder")
    proj = ReduxProjector(siglip_dim=32, txt_dim=48)
    write_safetensors(tmp_path / "redux.safetensors", proj.state_dict())
    pipe = FluxPipeline.from_pretrained(folder)
    img = picture(50, 40, seed=2)
    call = dict(height=32, width=32, num_inference_steps=2, generator=0, progress=False, **KW)
    with pytest.raises(ConfigError, match="load_redux"):
        pipe("a cat", redux_image=img, **call)
    pipe.load_redux(tmp_path / "redux.safetensors", image_encoder=tmp_path / "image_encoder")
    ours = pipe("a cat", redux_image=img, **call).images
    txt, vec, _ = pipe.encode_prompt("a cat", max_sequence_length=16)
    with torch.no_grad():
        tokens = proj(pipe.siglip(siglip_preprocess(img, TINY_SIGLIP["image_size"])).last_hidden_state)
    manual = pipe(prompt_embeds=torch.cat([txt, tokens], 1), pooled_prompt_embeds=vec, **call).images
    assert tokens.shape == (1, 9, 48) and err(ours, manual) <= 1e-6
    assert err(ours, pipe("a cat", **call).images) > 1e-3


def test_ip_adapter_from_pil_images(folder, tmp_path):
    from test_ip_adapter import adapter

    from fluxcore.vision import CLIPVisionConfig, CLIPVisionEncoder
    from fluxcore.weights.io import write_safetensors

    write_safetensors(tmp_path / "ip.safetensors", adapter().state_dict())
    torch.manual_seed(0)
    encoder = CLIPVisionEncoder(CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                                 num_attention_heads=4, image_size=28, projection_dim=24)).eval()  # fmt: skip
    pipe = FluxPipeline.from_pretrained(folder)
    call = dict(prompt="a cat", height=32, width=32, num_inference_steps=2, generator=0, progress=False, **KW)
    plain = pipe(**call).images
    blocks = list(pipe.transformer.double_blocks)
    pipe.load_ip_adapter(tmp_path / "ip.safetensors", image_encoder=encoder, scale=0.7)
    with pytest.raises(ConfigError, match="ip_adapter_image"):
        pipe(**call)
    a = pipe(**call, ip_adapter_image=picture(40, 30, seed=1)).images
    b = pipe(**call, ip_adapter_image=picture(40, 30, seed=2)).images
    assert err(a, plain) > 1e-3 and err(a, b) > 1e-4
    cfg = pipe(
        **call, ip_adapter_image=picture(40, 30, seed=1), negative_prompt="dog", true_cfg_scale=2.0
    ).images
    assert np.isfinite(cfg).all() and err(cfg, a) > 1e-4
    pipe.set_ip_adapter_scale(0.0)
    assert np.array_equal(pipe(**call, ip_adapter_image=picture(40, 30, seed=1)).images, plain)
    pipe.unload_ip_adapter()
    assert list(pipe.transformer.double_blocks) == blocks and np.array_equal(pipe(**call).images, plain)
