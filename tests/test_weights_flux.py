"""load_flux / save_flux / info on every layout, checked against diffusers' own loader and model.

Oracles: diffusers' FluxTransformer2DModel.from_pretrained reading our diffusers folder, and
the official files' parameter counts (checked on sparse full-size files, whose
headers are real but whose data are holes, so no memory or disk is used).
"""

import json
import math
import struct

import pytest
import torch

from fluxcore import PRESETS, Flux, info, load_flux, save_flux
from fluxcore.errors import ConfigError, WeightsError
from fluxcore.weights import (
    KeyMismatchError,
    ShapeMismatchError,
    UnknownVariantError,
    bfl_to_diffusers,
    diffusers_to_bfl,
    inspect_flux,
    open_checkpoint,
    write_safetensors,
)

diffusers = pytest.importorskip("diffusers")


def randomize(model, seed=0):
    """Perturb every tensor (norm scales too) so a mis-mapped one cannot go unnoticed."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            p.copy_(1 + 0.3 * noise if name.endswith("scale") else p + 0.05 * noise)
    return model


def tiny(name="tiny-dev", seed=0):
    torch.manual_seed(seed)
    return randomize(Flux(PRESETS[name]), seed).eval()


def inputs(config, seed=1, l_txt=5, grid=(3, 4)):
    g = torch.Generator().manual_seed(seed)
    h, w = grid
    img_ids = torch.zeros(h, w, 3)
    img_ids[..., 1] = torch.arange(h)[:, None]
    img_ids[..., 2] = torch.arange(w)[None, :]
    return dict(
        img=torch.randn(1, h * w, config.in_channels, generator=g),
        img_ids=img_ids.reshape(h * w, 3),
        txt=torch.randn(1, l_txt, config.context_in_dim, generator=g),
        txt_ids=torch.zeros(l_txt, 3),
        t=torch.rand(1, generator=g),
        y=torch.randn(1, config.vec_in_dim, generator=g),
        guidance=torch.tensor([3.5]) if config.guidance_embed else None,
    )


@torch.no_grad()
def run(model, x):
    return model(x["img"], x["img_ids"][None], x["txt"], x["txt_ids"][None], x["t"], x["y"], x["guidance"])


@torch.no_grad()
def run_diffusers(ref, x):
    return ref(
        hidden_states=x["img"],
        encoder_hidden_states=x["txt"],
        pooled_projections=x["y"],
        timestep=x["t"],
        img_ids=x["img_ids"],
        txt_ids=x["txt_ids"],
        guidance=x["guidance"],
        return_dict=False,
    )[0]


def rel_err(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def same_state(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(
        sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]) for k in sa
    )


def write_sparse(path, config, dtype="BF16", prefix="", drop=()):
    """A full-size checkpoint whose header is real and whose data is a hole (no disk, no RAM)."""
    with torch.device("meta"):
        shapes = {prefix + k: list(v.shape) for k, v in Flux(config).state_dict().items() if k not in drop}
    size = {"BF16": 2, "F8_E4M3": 1, "F32": 4}[dtype]
    header, offset = {}, 0
    for k, s in shapes.items():
        n = math.prod(s) * size
        header[k] = {"dtype": dtype, "shape": s, "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        f.truncate(8 + len(raw) + offset)
    return path


# --- layouts, round trips and the diffusers oracle ------------------------------------------------


def test_round_trip_bfl_diffusers_bfl_is_bit_exact(tmp_path):
    model = tiny().to(torch.bfloat16)
    save_flux(model, tmp_path / "a.safetensors")
    a = load_flux(tmp_path / "a.safetensors")
    assert a.dtype == torch.bfloat16 and same_state(a, model)
    save_flux(a, tmp_path / "diff", "diffusers", max_shard_size="100KB")
    assert len(list((tmp_path / "diff").glob("*.safetensors"))) > 1
    b = load_flux(tmp_path / "diff")
    save_flux(b, tmp_path / "b.safetensors")
    assert same_state(load_flux(tmp_path / "b.safetensors"), model)
    # the BFL files themselves carry identical tensors
    with open_checkpoint(tmp_path / "a.safetensors") as x, open_checkpoint(tmp_path / "b.safetensors") as y:
        assert x.keys() == y.keys()
        assert all(torch.equal(x.get(k).view(torch.int16), y.get(k).view(torch.int16)) for k in x.keys())


@pytest.mark.parametrize("preset", ["tiny-dev", "tiny-fill"])
def test_bfl_file_diffusers_folder_and_diffusers_agree(tmp_path, preset):
    model = tiny(preset)
    save_flux(model, tmp_path / "flux.safetensors")
    save_flux(model, tmp_path / "transformer", "diffusers", max_shard_size=200_000)
    index = json.loads(
        (tmp_path / "transformer" / "diffusion_pytorch_model.safetensors.index.json").read_text()
    )
    assert set(index["weight_map"]) == set(bfl_to_diffusers(model.state_dict()))
    from_bfl = load_flux(tmp_path / "flux.safetensors")
    from_diff = load_flux(tmp_path / "transformer")
    from_root = load_flux(tmp_path)  # snapshot root holding transformer/
    ref = diffusers.FluxTransformer2DModel.from_pretrained(tmp_path / "transformer").eval()
    assert ref.config.in_channels == model.config.in_channels
    x = inputs(model.config)
    out = run(from_bfl, x)
    assert torch.equal(out, run(from_diff, x)) and torch.equal(out, run(from_root, x))
    assert torch.equal(out, run(model, x))
    assert rel_err(out, run_diffusers(ref, x)) <= 1e-5


def test_single_diffusers_file_and_diffusers_written_folder(tmp_path):
    """A diffusers folder written by diffusers itself (one file, its own config.json) loads too."""
    model = tiny("tiny-schnell")
    save_flux(model, tmp_path / "ours", "diffusers")
    assert sorted(p.name for p in (tmp_path / "ours").iterdir()) == [
        "config.json",
        "diffusion_pytorch_model.safetensors",
    ]
    ref = diffusers.FluxTransformer2DModel.from_pretrained(tmp_path / "ours")
    ref.save_pretrained(tmp_path / "theirs")
    loaded = load_flux(tmp_path / "theirs")
    assert loaded.variant == "tiny-schnell" and same_state(loaded, model)


def test_prefixed_all_in_one_file(tmp_path):
    """Community files put the transformer under `model.diffusion_model.`; other keys (VAE, text
    encoders) may sit beside it and are ignored."""
    model = tiny()
    sd = {f"model.diffusion_model.{k}": v for k, v in model.state_dict().items()}
    sd["vae.encoder.conv_in.weight"] = torch.zeros(2, 3)
    write_safetensors(tmp_path / "flux1-dev-aio.safetensors", sd)
    fc = inspect_flux(tmp_path / "flux1-dev-aio.safetensors")
    fc.checkpoint.close()
    assert (fc.layout, fc.prefix, fc.other_keys) == (
        "bfl",
        "model.diffusion_model.",
        ["vae.encoder.conv_in.weight"],
    )
    assert same_state(load_flux(tmp_path / "flux1-dev-aio.safetensors"), model)
    # a folder with the transformer file and an autoencoder file: the transformer is found by its keys
    write_safetensors(tmp_path / "ae.safetensors", {"encoder.conv_in.weight": torch.zeros(1)})
    assert same_state(load_flux(tmp_path), model)


def test_float8_file_equals_model_with_float8_rounded_weights(tmp_path):
    model = tiny()
    for fp8 in (torch.float8_e4m3fn, torch.float8_e5m2):
        sd = {k: v.to(fp8) if v.ndim == 2 else v.bfloat16() for k, v in model.state_dict().items()}
        write_safetensors(tmp_path / "fp8.safetensors", sd)
        assert load_flux(tmp_path / "fp8.safetensors").dtype == torch.bfloat16  # default for float8 files
        loaded = load_flux(tmp_path / "fp8.safetensors", dtype=torch.float32)
        rounded = Flux(model.config).eval()
        rounded.load_state_dict({k: v.float() for k, v in sd.items()})
        x = inputs(model.config)
        assert torch.equal(run(loaded, x), run(rounded, x))
        assert not torch.equal(run(loaded, x), run(model, x))  # rounding did change something


# --- variants, configs and errors ------------------------------------------------------------------


@pytest.mark.parametrize(
    "filename, preset, variant",
    [
        ("flux1-dev.safetensors", "flux-dev", "flux-dev"),
        ("flux1-krea-dev.safetensors", "flux-dev", "flux-dev-krea"),
        ("flux1-kontext-dev.safetensors", "flux-dev", "flux-dev-kontext"),
        ("flux1-schnell.safetensors", "flux-schnell", "flux-schnell"),
        ("flux1-fill-dev.safetensors", "flux-dev-fill", "flux-dev-fill"),
        ("flux1-depth-dev.safetensors", "flux-dev-canny", "flux-dev-depth"),
        ("model.safetensors", "flux-dev-depth", "flux-dev-canny"),
    ],
)
def test_full_size_variants_from_headers(tmp_path, filename, preset, variant):
    path = write_sparse(tmp_path / filename, PRESETS[preset])
    i = info(path)
    assert (i.kind, i.layout, i.variant, i.config) == ("flux-transformer", "bfl", variant, PRESETS[preset])
    dev_params = 11_901_408_320  # flux1-dev.safetensors: 780 tensors, 23.8 GB in bf16
    expected = {
        "flux-dev": dev_params,
        "flux-schnell": dev_params - 10_229_760,
        "flux-dev-fill": dev_params + 3072 * 320,
        "flux-dev-canny": dev_params + 3072 * 64,
        "flux-dev-depth": dev_params + 3072 * 64,
    }[preset]
    assert i.num_params == expected and i.dtype == "bfloat16" and i.nbytes > 2 * expected
    if filename == "flux1-dev.safetensors":
        assert "flux-dev-krea" in i.note and "identical shapes" in i.note
        assert "780" in str(i) or i.num_tensors == 780


def test_info_diffusers_folder_prefix_and_other_files(tmp_path):
    model = tiny("tiny-canny")
    save_flux(model, tmp_path / "FLUX.1-Depth-dev" / "transformer", "diffusers", max_shard_size=300_000)
    i = info(tmp_path / "FLUX.1-Depth-dev")
    assert (i.layout, i.variant, i.num_params) == (
        "diffusers",
        "tiny-canny",
        sum(p.numel() for p in model.parameters()),
    )
    assert len(i.files) > 1 and i.dtype == "float32"
    write_sparse(
        tmp_path / "aio.safetensors", PRESETS["flux-dev"], dtype="F8_E4M3", prefix="model.diffusion_model."
    )
    i = info(tmp_path / "aio.safetensors")
    assert (i.prefix, i.dtype, i.variant) == ("model.diffusion_model.", "float8_e4m3fn", "flux-dev")
    write_safetensors(tmp_path / "ae.safetensors", {"decoder.conv_in.weight": torch.zeros(4, 2)})
    i = info(tmp_path / "ae.safetensors")
    assert i.kind == "an autoencoder (VAE)" and i.num_params == 8 and "autoencoder" in str(i)


def test_not_a_flux_transformer(tmp_path):
    write_safetensors(tmp_path / "ae.safetensors", {"encoder.conv_in.weight": torch.zeros(1)})
    with pytest.raises(UnknownVariantError, match="looks like an autoencoder"):
        load_flux(tmp_path / "ae.safetensors")
    with pytest.raises(WeightsError, match="no such file"):
        load_flux(tmp_path / "nothing.safetensors")


def test_missing_unexpected_and_shape_errors(tmp_path):
    model = tiny()
    sd = dict(model.state_dict())
    dropped = sorted(k for k in sd if k.startswith("double_blocks.1.img_attn"))
    write_safetensors(tmp_path / "m.safetensors", {k: v for k, v in sd.items() if k not in dropped})
    with pytest.raises(KeyMismatchError, match=rf"{len(dropped)} key\(s\) missing .*'{dropped[0]}'"):
        load_flux(tmp_path / "m.safetensors")
    write_safetensors(
        tmp_path / "u.safetensors", {**sd, "double_blocks.0.img_attn.qkv.scale_weight": torch.ones(1)}
    )
    with pytest.raises(KeyMismatchError, match="1 unexpected key.*scaled fp8"):
        load_flux(tmp_path / "u.safetensors")
    # a config that does not fit: the first mismatching tensor is named with both shapes
    fill = tiny("tiny-fill")
    save_flux(fill, tmp_path / "fill.safetensors")
    with pytest.raises(
        ShapeMismatchError, match=r"'img_in.weight' has shape \[64, 384\], .* expects \[64, 64\]"
    ):
        load_flux(tmp_path / "fill.safetensors", config="tiny-dev")


def test_config_override_for_non_official_sizes(tmp_path):
    cfg = PRESETS["tiny-dev"].replace(hidden_size=48, num_heads=2, axes_dim=(8, 8, 8))  # head dim 24
    model = randomize(Flux(cfg))
    write_safetensors(tmp_path / "odd.safetensors", model.state_dict())  # no fluxcore metadata
    with pytest.raises(UnknownVariantError, match="head dim 24 .* pass config="):
        load_flux(tmp_path / "odd.safetensors")
    loaded = load_flux(tmp_path / "odd.safetensors", config=cfg)
    assert same_state(loaded, model) and loaded.variant == "custom"
    save_flux(model, tmp_path / "odd2.safetensors")  # save_flux keeps the config in the metadata
    assert load_flux(tmp_path / "odd2.safetensors").config == cfg


def test_config_json_that_contradicts_the_weights(tmp_path):
    save_flux(tiny(), tmp_path / "t", "diffusers")
    cj = json.loads((tmp_path / "t" / "config.json").read_text())
    (tmp_path / "t" / "config.json").write_text(json.dumps({**cj, "num_layers": 19}))
    with pytest.raises(
        WeightsError, match=r"config.json disagrees with the weights: num_layers=19 \(weights: 2\)"
    ):
        load_flux(tmp_path / "t")


def test_save_flux_refuses_what_diffusers_cannot_hold(tmp_path):
    model = Flux(PRESETS["tiny-dev"].replace(mlp_ratio=2.0))
    with pytest.raises(ConfigError, match="mlp_ratio=2.0"):
        save_flux(model, tmp_path / "d", "diffusers")
    with pytest.raises(ConfigError, match="format"):
        save_flux(model, tmp_path / "d", "ckpt")
    with pytest.raises(ConfigError, match="max_shard_size"):
        save_flux(tiny(), tmp_path / "d", "diffusers", max_shard_size="lots")


@pytest.mark.gpu
def test_load_to_cuda(tmp_path):
    model = tiny().to(torch.bfloat16)
    save_flux(model, tmp_path / "a.safetensors")
    loaded = load_flux(tmp_path / "a.safetensors", device="cuda")
    assert loaded.device.type == "cuda" and same_state(loaded.cpu(), model)


def test_diffusers_pieces_of_mixed_float8_and_bf16(tmp_path):
    """A quantiser that left to_v in bf16 beside float8 q/k: the fused qkv still loads, and every
    piece keeps its own rounding."""
    model = Flux(PRESETS["tiny-dev"]).to(torch.bfloat16)
    sd = bfl_to_diffusers(model.state_dict())
    sd = {k: (v.to(torch.float8_e4m3fn) if v.ndim == 2 and "to_v" not in k else v) for k, v in sd.items()}
    folder = tmp_path / "transformer"
    folder.mkdir()
    write_safetensors(folder / "diffusion_pytorch_model.safetensors", sd)
    loaded = load_flux(folder, dtype=torch.bfloat16)
    want = diffusers_to_bfl({k: v.to(torch.bfloat16) for k, v in sd.items()})
    for key, value in loaded.state_dict().items():
        assert torch.equal(value, want[key]), key
