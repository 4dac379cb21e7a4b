"""ComfyUI scaled fp8 (legacy marker + scale_weight/scale_input, and comfy_quant /
_quantization_metadata with weight_scale), plain fp8, and T5 files: W = fp8 · scale."""

import json

import torch

from fluxcore import PRESETS, Flux, load_flux
from fluxcore.quant import ScaledLinear, detect_format, load_quantized_flux, load_quantized_t5
from fluxcore.quant.scaled_fp8 import quantize_scaled_fp8
from fluxcore.weights.io import write_safetensors

SKIP = ("img_in", "txt_in", "time_in", "vector_in", "guidance_in", "final_layer")


def _args(g):
    return dict(img=torch.randn(1, 8, 64, generator=g), img_ids=torch.rand(1, 8, 3, generator=g),
                txt=torch.randn(1, 4, 48, generator=g), txt_ids=torch.zeros(1, 4, 3),
                timesteps=torch.tensor([0.5]), y=torch.randn(1, 32, generator=g), guidance=torch.tensor([3.5]))  # fmt: skip


def _write(tmp_path, style: str):
    torch.manual_seed(0)
    ref = Flux(PRESETS["tiny-dev"]).eval()
    pre = "model.diffusion_model."
    tensors, dense_sd, layers = {}, {}, {}
    for i, (key, p) in enumerate(ref.state_dict().items()):
        base = key[: -len(".weight")]
        if key.endswith(".weight") and p.ndim == 2 and not key.startswith(SKIP):
            w8, s = quantize_scaled_fp8(p)
            tensors[pre + key] = w8
            if style == "legacy":
                tensors[pre + base + ".scale_weight"] = s
                if i % 3 == 0:
                    tensors[pre + base + ".scale_input"] = torch.tensor(1.0)
            elif style == "comfy_quant":
                tensors[pre + base + ".weight_scale"] = s
                q = json.dumps({"format": "float8_e4m3fn"}).encode()
                if i % 2:
                    tensors[pre + base + ".comfy_quant"] = torch.frombuffer(bytearray(q), dtype=torch.uint8)
                else:
                    layers[base] = {"format": "float8_e4m3fn"}
            else:  # plain fp8: no scales at all
                s = torch.tensor(1.0)
            dense_sd[key] = w8.float() * s  # the formula
        else:
            tensors[pre + key] = p.to(torch.bfloat16)
            dense_sd[key] = p.to(torch.bfloat16).float()
    if style == "legacy":
        tensors[pre + "scaled_fp8"] = torch.zeros(0, dtype=torch.float8_e4m3fn)
    meta = {"_quantization_metadata": json.dumps({"layers": layers})} if layers else None
    write_safetensors(tmp_path / f"{style}.safetensors", tensors, meta)
    dense = Flux(PRESETS["tiny-dev"]).eval()
    dense.load_state_dict(dense_sd)
    return tmp_path / f"{style}.safetensors", dense


def test_flux_files(tmp_path):
    g = torch.Generator().manual_seed(1)
    args = _args(g)
    for style in ("legacy", "comfy_quant", "plain"):
        path, dense = _write(tmp_path, style)
        assert detect_format(path) == "scaled_fp8"
        model = load_quantized_flux(path, dtype=torch.float32)
        mods = [m for m in model.modules() if isinstance(m, ScaledLinear)]
        assert len(mods) == 2 * 10 + 2 * 3 and all(m.weight.dtype == torch.float8_e4m3fn for m in mods)
        with torch.no_grad():
            err = (model(**args) - dense(**args)).abs().max().item()
        assert err <= 1e-6, (style, err)
        if style == "legacy":
            assert "double_blocks.0.img_attn.qkv.scale_weight" in model.state_dict()
        # load_flux: scaled files stay float8 (the scaled_fp8 layout); plain float8 files are the
        # BFL layout and are upcast as they load, which computes the same thing
        via_load_flux = load_flux(path, dtype=torch.float32)
        assert getattr(via_load_flux, "quant_format", None) == (None if style == "plain" else "scaled_fp8")
        with torch.no_grad():
            torch.testing.assert_close(via_load_flux(**args), model(**args), rtol=1e-6, atol=1e-6)


def test_fp8_compute_matches_emulation(tmp_path):
    """compute="fp8" runs torch._scaled_mm; the oracle emulates it in float32:
    (round_e4m3(x / sx) · sx) @ (w8 · sw)ᵀ."""
    path, dense = _write(tmp_path, "legacy")
    model = load_quantized_flux(path, dtype=torch.bfloat16, compute="fp8")
    m = model.double_blocks[0].img_attn.proj
    assert m.compute == "fp8"
    x = torch.randn(2, 7, 64, dtype=torch.bfloat16)
    sx = m.scale_input if m.scale_input is not None else x.float().abs().amax() / 448
    xq = (x.float() / sx).clamp(-448, 448).to(torch.float8_e4m3fn).float() * sx
    ref = xq @ (m.weight.float() * m.scale_weight).T + m.bias.float()
    out = m(x).float()
    assert (out - ref).abs().max() <= 0.02 * ref.abs().max()


def test_t5_scaled_fp8(tmp_path):
    from fluxcore.text import T5Config, T5Encoder

    torch.manual_seed(0)
    cfg = T5Config(vocab_size=64, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_heads=4)
    ref = T5Encoder(cfg).eval()
    tensors, sd = {"scaled_fp8": torch.zeros(0, dtype=torch.float8_e4m3fn)}, {}
    for key, p in ref.state_dict().items():
        if (
            key.endswith(".weight")
            and p.ndim == 2
            and "SelfAttention.relative" not in key
            and key != "shared.weight"
        ):
            w8, s = quantize_scaled_fp8(p)
            tensors[key], tensors[key[:-7] + ".scale_weight"] = w8, s
            sd[key] = w8.float() * s
        else:
            tensors[key] = p
            sd[key] = p
    write_safetensors(tmp_path / "t5.safetensors", tensors)
    model = load_quantized_t5(tmp_path / "t5.safetensors", dtype=torch.float32)
    dense = T5Encoder(cfg).eval()
    dense.load_state_dict(sd)
    ids = torch.randint(0, 64, (2, 9))
    with torch.no_grad():
        assert (model(ids) - dense(ids)).abs().max() <= 1e-6
    assert isinstance(model.encoder.block[0].layer[1].DenseReluDense.wi_0, ScaledLinear)
    assert isinstance(model.encoder.block[0].layer[0].SelfAttention.q, ScaledLinear)
    # load_t5 takes the same file as it is and keeps it quantized, `wo` included
    from fluxcore.weights.encoders import load_t5

    via_load_t5 = load_t5(tmp_path / "t5.safetensors", dtype=torch.float32)
    assert isinstance(via_load_t5.encoder.block[0].layer[1].DenseReluDense.wo, ScaledLinear)
    with torch.no_grad():
        assert torch.equal(via_load_t5(ids), model(ids))
