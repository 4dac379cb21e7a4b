"""quantize(model, "fp8" | "int8" | "fp8-dynamic") as a transform; fp8 compute against an fp32
emulation of torch._scaled_mm; dequantize; LoRA on a quantized base; modulation precompute."""

import pytest
import torch
from torch import nn

from fluxcore import PRESETS, Flux
from fluxcore.quant import ScaledLinear, dequantize, quantize


def tiny(seed=0):
    torch.manual_seed(seed)
    return Flux(PRESETS["tiny-dev"]).eval()


def inputs(B=2, seed=1):
    g = torch.Generator().manual_seed(seed)
    return dict(img=torch.randn(B, 12, 64, generator=g), img_ids=torch.rand(B, 12, 3, generator=g) * 4,
                txt=torch.randn(B, 5, 48, generator=g), txt_ids=torch.zeros(B, 5, 3),
                timesteps=torch.full((B,), 0.7), y=torch.randn(B, 32, generator=g), guidance=torch.full((B,), 3.5))  # fmt: skip


@pytest.mark.parametrize(
    "mode,gran",
    [
        ("fp8", "tensor"),
        ("fp8", "row"),
        ("int8", "row"),
        ("int8", "tensor"),
        ("fp8-dynamic", "row"),
        ("fp8-dynamic", "tensor"),
    ],
)
def test_quantize_modes(mode, gran):
    model, ref = tiny(), tiny()
    keys = list(model.state_dict())
    x = inputs()
    with torch.no_grad():
        want = ref(**x)
    biases = {p: m.bias for p, m in model.named_modules() if isinstance(m, nn.Linear)}
    done = quantize(model, mode, granularity=gran)
    assert len(done) == 2 * 10 + 2 * 3  # every block Linear, modulation included
    assert not any(
        p.startswith(("img_in", "txt_in", "time_in", "vector_in", "guidance_in", "final_layer")) for p in done
    )
    assert quantize(model, mode) == []  # idempotent
    sd = model.state_dict()
    assert [k for k in sd if not k.endswith("scale_weight")] == keys  # official keys + scales
    with torch.no_grad():
        got = model(**x)
    rel = ((got - want).norm() / want.norm()).item()
    assert rel < {"int8": 0.02}.get(mode, 0.08), rel
    restored = dequantize(model, torch.float32)
    assert sorted(restored) == sorted(done)
    assert all(
        type(model.get_submodule(p)) is nn.Linear and model.get_submodule(p).bias is biases[p] for p in done
    )
    with torch.no_grad():
        assert torch.allclose(model(**x), got, atol=1e-5) or mode == "fp8-dynamic"


def test_skip_modulation():
    model = tiny()
    done = quantize(model, "fp8", modulation=False)
    assert len(done) == 2 * 8 + 2 * 2 and not any("mod" in p for p in done)


@pytest.mark.parametrize("act", ["tensor", "row"])
def test_fp8_compute_emulation(act):
    """torch._scaled_mm (CPU) against (round_e4m3(x/sx)·sx) @ (w8·sw)ᵀ + b computed in float32."""
    torch.manual_seed(0)
    lin = nn.Linear(96, 40)
    model = nn.Sequential(lin)
    quantize(model, "fp8-dynamic", granularity="row", activation_granularity=act, skip=())
    q = model[0]
    assert q.compute == "fp8"
    x = torch.randn(3, 7, 96, dtype=torch.bfloat16)
    x2 = x.reshape(-1, 96).float()
    sx = x2.abs().amax(1, keepdim=True) / 448 if act == "row" else x2.abs().amax() / 448
    xq = (x2 / sx).clamp(-448, 448).to(torch.float8_e4m3fn).float() * sx
    ref = (xq @ (q.weight.float() * q.scale_weight).T + q.bias).reshape(3, 7, 40)
    out = q(x).float()
    assert (
        out.dtype == torch.float32 and (out - ref).abs().max() <= 0.01 * ref.abs().max()
    )  # bf16 output rounding


def test_lora_on_quantized_base():
    from fluxcore import lora as L

    model, dense = tiny(), tiny()
    quantize(model, "int8")
    # the dense twin holds exactly the dequantized weights
    for p, m in model.named_modules():
        if isinstance(m, ScaledLinear):
            dense.get_submodule(p).weight.data = m.dequantized_weight(torch.float32)
    torch.manual_seed(3)
    A, B = torch.randn(4, 64) * 0.1, torch.randn(64, 4) * 0.1
    L.load_lora(
        model,
        {"double_blocks.0.img_attn.proj.lora_A.weight": A, "double_blocks.0.img_attn.proj.lora_B.weight": B},
    )
    dense.double_blocks[0].img_attn.proj.weight.data += B @ A
    x = inputs()
    with torch.no_grad():
        assert (model(**x) - dense(**x)).abs().max() <= 1e-5
    L.unload_lora(model)
    assert isinstance(model.double_blocks[0].img_attn.proj, ScaledLinear)
