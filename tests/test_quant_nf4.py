"""bitsandbytes 4-bit files without bitsandbytes: the decoder against the published NF4 formulas
written out here element by element (nibble order, block absmax, double quantization), a tiny Flux
NF4 file against the same model with the formula-dequantized weights, and state-dict round trips."""

import json

import numpy as np
import pytest
import torch

from fluxcore import PRESETS, Flux, load_flux
from fluxcore.quant import NF4Linear, load_quantized_flux
from fluxcore.quant.nf4 import NF4_CODEBOOK, linear_from_tensors, quantize_nf4, to_file_tensors
from fluxcore.weights.io import write_safetensors

# QLoRA's NF4 levels (the published table)
NF4 = [-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
       -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
       0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
       0.7229568362236023, 1.0]  # fmt: skip


def formula(t: dict, state: dict) -> np.ndarray:
    """Element by element: byte j holds element 2j (high nibble) and 2j+1 (low nibble);
    w = quant_map[code] · absmax[i // blocksize]; nested absmax = nmap[c] · nabs[k // nbs] + offset."""
    packed = t["weight"].reshape(-1).numpy()
    qmap = t["quant_map"].numpy()
    bs = state["blocksize"]
    if "nested_absmax" in t:
        c = t["absmax"].numpy()
        nabs, nmap = t["nested_absmax"].numpy(), t["nested_quant_map"].numpy()
        nbs = state["nested_blocksize"]
        absmax = np.array([nmap[c[k]] * nabs[k // nbs] for k in range(len(c))], np.float32) + np.float32(
            state["nested_offset"]
        )
    else:
        absmax = t["absmax"].numpy()
    n = packed.size * 2
    out = np.empty(n, np.float32)
    for i in range(n):
        byte = packed[i // 2]
        code = (byte >> 4) if i % 2 == 0 else (byte & 0x0F)
        out[i] = qmap[code] * absmax[i // bs]
    return out.reshape(state["shape"])


def test_codebook():
    assert torch.equal(NF4_CODEBOOK, torch.tensor(NF4))


@pytest.mark.parametrize("nested", [False, True])
@pytest.mark.parametrize("blocksize", [64, 128])
def test_decoder_matches_formula(nested, blocksize):
    torch.manual_seed(0)
    w = torch.randn(24, 128)
    t = quantize_nf4(w, blocksize=blocksize, nested=nested, nested_blocksize=16)
    state = json.loads(bytes(t["quant_state"].tolist()))
    m = linear_from_tensors(t)
    ours = m.dequantized_weight(torch.float32)
    ref = torch.from_numpy(formula(t, state))
    assert torch.allclose(ours, ref, rtol=0, atol=1e-6), (ours - ref).abs().max()
    # quantization error is NF4-sized (≈ 0.1 of the scale on N(0,1))
    assert (ours - w).pow(2).mean().sqrt() < 0.15
    # random codes, too: every nibble value and both nibble positions decode per the formula
    t["weight"] = torch.randint(0, 256, t["weight"].shape, dtype=torch.uint8)
    assert torch.allclose(
        linear_from_tensors(t).dequantized_weight(torch.float32),
        torch.from_numpy(formula(t, state)),
        atol=1e-6,
    )


def test_state_dict_names_roundtrip():
    t = quantize_nf4(torch.randn(16, 64), nested=True, nested_blocksize=8)
    m = linear_from_tensors(t, bias=torch.zeros(16))
    sd = m.state_dict()
    assert list(sd) == ["weight", "weight.absmax", "weight.quant_map", "weight.nested_absmax",
                        "weight.nested_quant_map", "weight.quant_state.bitsandbytes__nf4", "bias"]  # fmt: skip
    m2 = linear_from_tensors(
        quantize_nf4(torch.randn(16, 64), nested=True, nested_blocksize=8), bias=torch.ones(16)
    )
    m2.load_state_dict(sd)
    assert torch.equal(m2.dequantized_weight(), m.dequantized_weight())
    x = torch.randn(3, 64)
    assert torch.equal(m2(x), m(x))


def test_tiny_flux_nf4_file(tmp_path):
    torch.manual_seed(0)
    ref = Flux(PRESETS["tiny-dev"]).eval()
    tensors, states = {}, {}
    skip = ("img_in", "txt_in", "time_in", "vector_in", "guidance_in", "final_layer")
    for i, (key, p) in enumerate(ref.state_dict().items()):
        path = key[: -len(".weight")]
        if key.endswith(".weight") and p.ndim == 2 and not key.startswith(skip):
            t = quantize_nf4(p, blocksize=64, nested=i % 2 == 0, nested_blocksize=4)
            states[path] = t
            tensors.update(to_file_tensors("model.diffusion_model." + path, t))
        else:
            tensors["model.diffusion_model." + key] = p.to(torch.bfloat16)
    tensors["vae.decoder.conv_in.weight"] = torch.zeros(2)  # all-in-one files hold other parts too
    write_safetensors(tmp_path / "nf4.safetensors", tensors)
    model = load_quantized_flux(tmp_path / "nf4.safetensors", dtype=torch.float32)
    assert model.quant_format == "nf4"
    assert {p for p, m in model.named_modules() if isinstance(m, NF4Linear)} == set(states)
    dense = Flux(PRESETS["tiny-dev"]).eval()
    sd = {k: v.to(torch.bfloat16).float() for k, v in ref.state_dict().items()}
    for path, t in states.items():
        sd[path + ".weight"] = torch.from_numpy(formula(t, json.loads(bytes(t["quant_state"].tolist()))))
    dense.load_state_dict(sd)
    g = torch.Generator().manual_seed(1)
    args = dict(img=torch.randn(1, 8, 64, generator=g), img_ids=torch.rand(1, 8, 3, generator=g),
                txt=torch.randn(1, 4, 48, generator=g), txt_ids=torch.zeros(1, 4, 3),
                timesteps=torch.tensor([0.5]), y=torch.randn(1, 32, generator=g), guidance=torch.tensor([3.5]))  # fmt: skip
    with torch.no_grad():
        err = (model(**args) - dense(**args)).abs().max().item()
    assert err <= 1e-5, err
    via_load_flux = load_flux(tmp_path / "nf4.safetensors", dtype=torch.float32)  # the nf4 layout
    assert via_load_flux.quant_format == "nf4"
    with torch.no_grad():
        assert torch.equal(via_load_flux(**args), model(**args))
    # state dict: bitsandbytes names under the official module paths
    sd = model.state_dict()
    assert "double_blocks.0.img_attn.qkv.weight.absmax" in sd
    assert "double_blocks.0.img_attn.qkv.weight.quant_state.bitsandbytes__nf4" in sd
