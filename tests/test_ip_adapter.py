"""XLabs IP-Adapter: one double block against a transcription of the published forward, the
whole model against diffusers' FluxTransformer2DModel with its converted XLabs IP-Adapter, and the
transform's contract (keys, remove, scale, errors, loading from files)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from einops import rearrange

from fluxcore import PRESETS, FlowDenoiser, Flux
from fluxcore.errors import ConfigError, WeightsError
from fluxcore.ip_adapter import IPAdapter, IPAdapterDenoiser, attach_ip_adapter, load_ip_adapter
from fluxcore.math import apply_rope
from fluxcore.vision import CLIPVisionConfig, CLIPVisionEncoder
from fluxcore.weights import bfl_to_diffusers
from fluxcore.weights.io import write_safetensors

CFG = PRESETS["tiny-dev"]


def randomize(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("scale"):
                p.copy_(1 + 0.3 * torch.randn(p.shape, generator=g))
            else:
                p.add_(0.1 * torch.randn(p.shape, generator=g))
    return model


def rel_err(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def adapter(seed=1):
    return randomize(
        IPAdapter(CFG.depth, CFG.hidden_size, CFG.context_in_dim, clip_dim=24, num_tokens=4), seed
    ).eval()


def inputs(batch=2, n_img=12, n_txt=5, seed=2):
    g = torch.Generator().manual_seed(seed)
    ids = torch.zeros(n_img, 3)
    ids[:, 1], ids[:, 2] = torch.arange(n_img) // 4, torch.arange(n_img) % 4
    return dict(
        img=torch.randn(batch, n_img, 64, generator=g), img_ids=ids, txt=torch.randn(batch, n_txt, CFG.context_in_dim, generator=g),
        txt_ids=torch.zeros(n_txt, 3), t=torch.rand(batch, generator=g), y=torch.randn(batch, CFG.vec_in_dim, generator=g),
        guidance=torch.full((batch,), 3.5), embeds=torch.randn(batch, 24, generator=g),
    )  # fmt: skip


def published_double_block(attn, img, txt, vec, pe, image_proj, ip_scale):
    """The XLabs IP double-block processor, transcribed: joint attention as usual; then the image
    queries after QK-norm (not rotated) attend to k/v projections of the IP tokens."""
    (s1, c1, g1), (s2, c2, g2) = attn.img_mod(vec)
    (ts1, tc1, tg1), (ts2, tc2, tg2) = attn.txt_mod(vec)
    H = attn.num_heads
    ln = lambda x: F.layer_norm(x, x.shape[-1:], eps=1e-6)  # noqa: E731
    iq, ik, iv = rearrange(attn.img_attn.qkv((1 + c1) * ln(img) + s1), "B L (K H D) -> K B H L D", K=3, H=H)
    iq, ik = attn.img_attn.norm.query_norm(iq).to(iv), attn.img_attn.norm.key_norm(ik).to(iv)
    tq, tk, tv = rearrange(attn.txt_attn.qkv((1 + tc1) * ln(txt) + ts1), "B L (K H D) -> K B H L D", K=3, H=H)
    tq, tk = attn.txt_attn.norm.query_norm(tq).to(tv), attn.txt_attn.norm.key_norm(tk).to(tv)
    q, k, v = torch.cat((tq, iq), 2), torch.cat((tk, ik), 2), torch.cat((tv, iv), 2)
    q, k = apply_rope(q, pe), apply_rope(k, pe)
    a = rearrange(F.scaled_dot_product_attention(q, k, v), "B H L D -> B L (H D)")
    ta, ia = a[:, : txt.shape[1]], a[:, txt.shape[1] :]
    img = img + g1 * attn.img_attn.proj(ia)
    img = img + g2 * attn.img_mlp((1 + c2) * ln(img) + s2)
    txt = txt + tg1 * attn.txt_attn.proj(ta)
    txt = txt + tg2 * attn.txt_mlp((1 + tc2) * ln(txt) + ts2)
    return img, txt, iq


def test_block_matches_published_forward():
    flux = randomize(Flux(CFG)).eval()
    ad = adapter()
    x = inputs()
    block = flux.double_blocks[0]
    g = torch.Generator().manual_seed(3)
    img, txt = torch.randn(2, 12, 64, generator=g), torch.randn(2, 5, 64, generator=g)
    vec = torch.randn(2, 64, generator=g)
    ids = torch.cat((x["txt_ids"], x["img_ids"]))[None].expand(2, -1, -1)
    pe = flux.pe_embedder(ids)
    handle = attach_ip_adapter(flux, ad, scale=0.8)
    tokens = ad.ip_adapter_proj_model(x["embeds"])
    handle.set_tokens(tokens)
    with torch.no_grad():
        ours_img, ours_txt = flux.double_blocks[0](img, txt, vec, pe)
        ref_img, ref_txt, q = published_double_block(block, img, txt, vec, pe, tokens, 0.8)
        kv = ad.double_blocks[0].processor
        k = rearrange(kv.ip_adapter_double_stream_k_proj(tokens), "B L (H D) -> B H L D", H=4)
        v = rearrange(kv.ip_adapter_double_stream_v_proj(tokens), "B L (H D) -> B H L D", H=4)
        ref_img = ref_img + 0.8 * rearrange(F.scaled_dot_product_attention(q, k, v), "B H L D -> B L (H D)")
    assert rel_err(ours_img, ref_img) <= 1e-5 and rel_err(ours_txt, ref_txt) <= 1e-5


def test_model_matches_diffusers():
    diffusers = pytest.importorskip("diffusers")
    flux = randomize(Flux(CFG)).eval()
    ad = adapter()
    ref = diffusers.FluxTransformer2DModel(
        patch_size=1, in_channels=64, num_layers=CFG.depth, num_single_layers=CFG.depth_single_blocks,
        attention_head_dim=CFG.head_dim, num_attention_heads=CFG.num_heads, joint_attention_dim=CFG.context_in_dim,
        pooled_projection_dim=CFG.vec_in_dim, guidance_embeds=True, axes_dims_rope=CFG.axes_dim,
    )  # fmt: skip
    ref.load_state_dict(bfl_to_diffusers(flux.state_dict()), strict=True)
    sd = ad.state_dict()
    ref._load_ip_adapter_weights({
        "image_proj": {k.split(".", 1)[1]: v for k, v in sd.items() if k.startswith("ip_adapter_proj_model.")},
        "ip_adapter": {
            k.split(".", 1)[1].replace("processor.", "").replace("ip_adapter_double_stream_k_proj", "to_k_ip")
            .replace("ip_adapter_double_stream_v_proj", "to_v_ip"): v
            for k, v in sd.items() if k.startswith("double_blocks.")
        },
    }, low_cpu_mem_usage=False)  # fmt: skip
    for proc in ref.attn_processors.values():
        if hasattr(proc, "to_k_ip"):
            proc.scale = [0.7]
    ref.eval()
    x = inputs()
    handle = attach_ip_adapter(flux, ad, scale=0.7)
    den = IPAdapterDenoiser(FlowDenoiser(flux), handle)
    tokens = handle.tokens_for(image_embeds=x["embeds"])
    with torch.no_grad():
        ours = den.velocity(x["img"], x["t"], img_ids=x["img_ids"][None].expand(2, -1, -1), txt=x["txt"],
                            txt_ids=x["txt_ids"][None].expand(2, -1, -1), y=x["y"], guidance=x["guidance"], ip_tokens=tokens)  # fmt: skip
        theirs = ref(hidden_states=x["img"], encoder_hidden_states=x["txt"], pooled_projections=x["y"], timestep=x["t"],
                     img_ids=x["img_ids"], txt_ids=x["txt_ids"], guidance=x["guidance"],
                     joint_attention_kwargs={"ip_adapter_image_embeds": [x["embeds"][:, None]]}, return_dict=False)[0]  # fmt: skip
    assert rel_err(ours, theirs) <= 1e-5


def test_transform_contract(tmp_path):
    flux = randomize(Flux(CFG)).eval()
    blocks, keys = list(flux.double_blocks), list(flux.state_dict())
    x = inputs(batch=1)
    args = (x["img"], x["img_ids"][None], x["txt"], x["txt_ids"][None], x["t"], x["y"], x["guidance"])
    with torch.no_grad():
        plain = flux(*args)
    write_safetensors(tmp_path / "ip_adapter.safetensors", adapter().state_dict())
    encoder = randomize(CLIPVisionEncoder(CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                                           num_attention_heads=4, image_size=28, projection_dim=24))).eval()  # fmt: skip
    handle = load_ip_adapter(flux, tmp_path / "ip_adapter.safetensors", encoder)
    assert handle.paths == ["double_blocks.0", "double_blocks.1"] and list(flux.state_dict()) == keys
    with pytest.raises(ConfigError, match="no image was given"):
        flux(*args)
    handle.set_image(torch.rand(1, 3, 40, 30) * 2 - 1)  # any size: CLIP preprocessing resizes and crops
    with torch.no_grad():
        with_ip = flux(*args)
        handle.scale = 0.0
        zero = flux(*args)
    assert rel_err(with_ip, plain) > 1e-3 and torch.equal(zero, plain)
    with pytest.raises(ConfigError, match="plain DoubleStreamBlock"):
        attach_ip_adapter(flux, adapter())
    assert handle.remove() == ["double_blocks.0", "double_blocks.1"]
    assert list(flux.double_blocks) == blocks
    with pytest.raises(ConfigError, match="hidden_size"):
        attach_ip_adapter(flux, IPAdapter(CFG.depth, 128, CFG.context_in_dim, 24))
    with pytest.raises(ConfigError, match="3 double blocks"):
        attach_ip_adapter(flux, IPAdapter(3, CFG.hidden_size, CFG.context_in_dim, 24))
    write_safetensors(tmp_path / "other.safetensors", {"x.weight": torch.zeros(2)})
    with pytest.raises(WeightsError, match="not an XLabs FLUX IP-Adapter"):
        load_ip_adapter(flux, tmp_path / "other.safetensors")
