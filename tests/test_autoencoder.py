"""fluxcore's AutoEncoder against diffusers' AutoencoderKL (tiny random configs; weights in the BFL
layout made by fluxcore's key map, or a diffusers vae/ folder), the key map both ways at full size,
the full-size config and parameter count, and the errors for odd sizes."""

import json

import pytest
import torch
from safetensors.torch import save_file

from fluxcore.autoencoder import AE_PRESETS, AutoEncoder, AutoEncoderConfig
from fluxcore.errors import ConfigError, WeightsError
from fluxcore.weights import vae_keys
from fluxcore.weights.encoders import load_autoencoder, save_autoencoder


def rel_err(a, b):
    return ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()


def diffusers_vae(cfg: AutoEncoderConfig, seed=0):
    from diffusers import AutoencoderKL

    kw = {k: v for k, v in cfg.to_diffusers_dict().items() if not k.startswith("_")}
    torch.manual_seed(seed)
    vae = AutoencoderKL(**kw).eval()
    with torch.no_grad():  # norms start at (1, 0): make every parameter non-trivial
        for p in vae.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return vae


def check_against(ae: AutoEncoder, vae, cfg: AutoEncoderConfig, h=24, w=40):
    x = torch.rand(2, 3, h, w, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        z = ae.encode(x)
        z_ref = (vae.encode(x).latent_dist.mean - cfg.shift_factor) * cfg.scale_factor
        assert z.shape == (2, cfg.z_channels, h // 8, w // 8)
        assert rel_err(z, z_ref) <= 1e-5
        img = ae.decode(z_ref)
        img_ref = vae.decode(z_ref / cfg.scale_factor + cfg.shift_factor).sample
        assert img.shape == (2, 3, h, w)
        assert rel_err(img, img_ref) <= 1e-5


# 32 GroupNorm groups as in FLUX, so the config can be read from the BFL tensor shapes alone.
CFG32 = AutoEncoderConfig(ch=32, ch_mult=(1, 2, 2, 2), num_res_blocks=1, z_channels=16)


def test_bfl_file_matches_diffusers(tmp_path):
    vae = diffusers_vae(CFG32)
    bfl = vae_keys.diffusers_to_bfl(vae.state_dict())
    save_file({k: v.contiguous() for k, v in bfl.items()}, tmp_path / "ae.safetensors")
    ae = load_autoencoder(tmp_path)  # a root folder with ae.safetensors
    assert ae.config == CFG32
    assert not ae.training and not any(p.requires_grad for p in ae.parameters())
    check_against(ae, vae, CFG32)


def test_diffusers_folder_with_small_groups(tmp_path):
    cfg = AE_PRESETS["tiny"]  # widths 8/16/16/16, 4 groups: only config.json can say so
    vae = diffusers_vae(cfg, seed=1)
    vae.save_pretrained(tmp_path / "vae")
    ae = load_autoencoder(tmp_path)  # a root folder with vae/
    assert ae.config == cfg
    check_against(ae, vae, cfg, h=16, w=56)


def test_groups_not_in_shapes_needs_metadata_or_config(tmp_path):
    cfg = AE_PRESETS["tiny"]
    torch.manual_seed(0)
    ae = AutoEncoder(cfg).eval()
    save_file({k: v.contiguous() for k, v in ae.state_dict().items()}, tmp_path / "plain.safetensors")
    with pytest.raises(ConfigError, match="norm_groups"):
        load_autoencoder(tmp_path / "plain.safetensors")
    assert load_autoencoder(tmp_path / "plain.safetensors", config=cfg).config == cfg
    save_autoencoder(ae, tmp_path / "ae.safetensors")  # records the config in the metadata
    again = load_autoencoder(tmp_path / "ae.safetensors")
    assert again.config == cfg
    x = torch.rand(1, 3, 16, 24) * 2 - 1
    with torch.no_grad():
        assert torch.equal(ae.encode(x), again.encode(x))
    save_autoencoder(ae, tmp_path / "vae", format="diffusers")
    assert load_autoencoder(tmp_path / "vae").config == cfg


def test_key_map_round_trip_and_full_size_matches_diffusers():
    from diffusers import AutoencoderKL

    cfg = AE_PRESETS["flux"]
    with torch.device("meta"):
        vae = AutoencoderKL(**{k: v for k, v in cfg.to_diffusers_dict().items() if not k.startswith("_")})
        ae = AutoEncoder(cfg)
    ours = {k: tuple(v.shape) for k, v in ae.state_dict().items()}
    theirs = {k: tuple(v.shape) for k, v in vae.state_dict().items()}
    mapped = {vae_keys.diffusers_to_bfl_key(k, 4): s for k, s in theirs.items()}
    assert set(mapped) == set(ours)
    for k, s in mapped.items():  # attention projections: [C, C] in diffusers, [C, C, 1, 1] in BFL
        assert ours[k] == (s if len(s) != 2 or ".attn_1." not in k else (*s, 1, 1)), k
    for k in theirs:
        assert vae_keys.bfl_to_diffusers_key(vae_keys.diffusers_to_bfl_key(k, 4), 4) == k
    # Spot checks of the official key names (BFL ae.safetensors and diffusers vae/).
    assert (
        vae_keys.bfl_to_diffusers_key("decoder.up.0.block.0.nin_shortcut.weight", 4)
        == "decoder.up_blocks.3.resnets.0.conv_shortcut.weight"
    )
    assert (
        vae_keys.bfl_to_diffusers_key("encoder.mid.attn_1.proj_out.bias", 4)
        == "encoder.mid_block.attentions.0.to_out.0.bias"
    )
    assert ours["decoder.up.1.block.0.nin_shortcut.weight"] == (256, 512, 1, 1)
    assert ours["encoder.conv_out.weight"] == (32, 512, 3, 3)


def test_state_dict_round_trip_is_exact():
    vae = diffusers_vae(CFG32)
    sd = vae.state_dict()
    back = vae_keys.bfl_to_diffusers(vae_keys.diffusers_to_bfl(sd))
    assert set(back) == set(sd) and all(torch.equal(back[k], sd[k]) for k in sd)
    with pytest.raises(KeyError, match="quant_conv"):
        vae_keys.diffusers_to_bfl(sd | {"quant_conv.weight": torch.zeros(1)})


def test_full_size_config_and_parameter_count():
    cfg = AE_PRESETS["flux"]
    assert (
        cfg.resolution,
        cfg.in_channels,
        cfg.ch,
        cfg.out_ch,
        cfg.ch_mult,
        cfg.num_res_blocks,
        cfg.z_channels,
        cfg.scale_factor,
        cfg.shift_factor,
        cfg.norm_groups,
    ) == (256, 3, 128, 3, (1, 2, 4, 4), 2, 16, 0.3611, 0.1159, 32)
    d = cfg.to_diffusers_dict()
    assert d["block_out_channels"] == [128, 256, 512, 512] and d["layers_per_block"] == 2
    assert d["latent_channels"] == 16 and not d["use_quant_conv"] and not d["use_post_quant_conv"]
    assert AutoEncoderConfig.from_diffusers_dict(d) == cfg
    with torch.device("meta"):
        ae = AutoEncoder(cfg)
    assert sum(p.numel() for p in ae.parameters()) == 83_819_683


def test_odd_sizes_and_bad_configs_are_clear_errors():
    ae = AutoEncoder(AE_PRESETS["tiny"])
    with pytest.raises(ValueError, match=r"multiples of 8; got 20×24"):
        ae.encode(torch.zeros(1, 3, 20, 24))
    with pytest.raises(ValueError, match=r"\[B, 3, H, W\]"):
        ae.encode(torch.zeros(1, 4, 16, 16))
    with pytest.raises(ValueError, match=r"\[B, 16, H, W\]"):
        ae.decode(torch.zeros(1, 4, 2, 2))
    with pytest.raises(ConfigError, match="divisible"):
        AutoEncoderConfig(ch=8, norm_groups=32)
    with pytest.raises(ConfigError, match="quant"):
        AutoEncoderConfig.from_diffusers_dict(
            AE_PRESETS["flux"].to_diffusers_dict() | {"use_quant_conv": True}
        )


def test_not_an_autoencoder(tmp_path):
    save_file({"img_in.weight": torch.zeros(2, 2)}, tmp_path / "x.safetensors")
    with pytest.raises(WeightsError, match="not an autoencoder"):
        load_autoencoder(tmp_path / "x.safetensors")
    (tmp_path / "vae").mkdir()
    (tmp_path / "vae" / "config.json").write_text(json.dumps({"_class_name": "UNet2DModel"}))
    with pytest.raises(WeightsError, match="UNet2DModel"):
        load_autoencoder(tmp_path / "vae")
