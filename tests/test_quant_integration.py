"""Quantized bases the way users run them: a live LoRA on every quantized format (GGUF, NF4,
scaled fp8, and `quantize`'s fp8 / int8 / fp8-dynamic), and quantized files through
`FluxPipeline.from_single_file`.

The oracle for LoRA is explicit arithmetic: the dense model holding the dequantized weights with
W + scale · B @ A merged into the targeted layers by hand. Dequantization itself is checked against
gguf's decoder and the published NF4 / fp8 formulas in the other test_quant_* files.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from fluxcore import PRESETS, Flux, FluxPipeline
from fluxcore import lora as L
from fluxcore.lora import LoraError
from fluxcore.quant import QuantLinear, dequantize, load_quantized_flux, quantize
from fluxcore.quant.nf4 import quantize_nf4, to_file_tensors
from fluxcore.quant.scaled_fp8 import quantize_scaled_fp8
from fluxcore.weights.io import write_safetensors

gguf = pytest.importorskip("gguf")
from tiny_snapshot import write_tiny_snapshot  # noqa: E402

# what city96 / ComfyUI / bitsandbytes files keep unquantized
FLOAT_LAYERS = ("img_in", "txt_in", "time_in", "vector_in", "guidance_in", "final_layer")
PRE = "model.diffusion_model."


def _quantizable(key: str, p: torch.Tensor) -> bool:
    return key.endswith(".weight") and p.ndim == 2 and not key.startswith(FLOAT_LAYERS)


def write_gguf(ref: Flux, path, types=("Q8_0", "Q4_0", "Q5_1")) -> None:
    T = gguf.GGMLQuantizationType
    writer = gguf.GGUFWriter(str(path), "flux")
    n = 0
    for key, p in ref.state_dict().items():
        w = p.float().numpy()
        if _quantizable(key, p):
            kind, n = types[n % len(types)], n + 1
            writer.add_tensor(key, gguf.quants.quantize(w, T[kind]), raw_dtype=T[kind])
        elif p.ndim == 2:
            writer.add_tensor(key, w.astype(np.float16), raw_dtype=T.F16)
        else:
            writer.add_tensor(key, w, raw_dtype=T.F32)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def write_nf4(ref: Flux, path) -> None:
    tensors = {}
    for i, (key, p) in enumerate(ref.state_dict().items()):
        if _quantizable(key, p):
            t = quantize_nf4(p, blocksize=64, nested=i % 2 == 0, nested_blocksize=4)
            tensors.update(to_file_tensors(PRE + key[: -len(".weight")], t))
        else:
            tensors[PRE + key] = p.to(torch.bfloat16)
    write_safetensors(path, tensors)


def write_scaled_fp8(ref: Flux, path) -> None:
    tensors = {PRE + "scaled_fp8": torch.zeros(0, dtype=torch.float8_e4m3fn)}
    for key, p in ref.state_dict().items():
        if _quantizable(key, p):
            w8, s = quantize_scaled_fp8(p)
            tensors[PRE + key], tensors[PRE + key[: -len(".weight")] + ".scale_weight"] = w8, s
        else:
            tensors[PRE + key] = p.to(torch.bfloat16)
    write_safetensors(path, tensors)


FILES = {"gguf": (write_gguf, "q.gguf"), "nf4": (write_nf4, "q-nf4.safetensors"),
         "scaled_fp8": (write_scaled_fp8, "q-fp8-scaled.safetensors")}  # fmt: skip
BASES = [*FILES, "fp8", "int8", "fp8-dynamic"]


def quantized_base(kind: str, tmp_path) -> Flux:
    torch.manual_seed(0)
    ref = Flux(PRESETS["tiny-dev"]).eval()
    if kind in FILES:
        write, name = FILES[kind]
        write(ref, tmp_path / name)
        return load_quantized_flux(tmp_path / name, dtype=torch.float32).eval()
    quantize(ref, kind)
    return ref


def dense_twin(model: Flux) -> Flux:
    dense = copy.deepcopy(model)
    dequantize(dense, torch.float32)
    assert not any(isinstance(m, QuantLinear) for m in dense.modules())
    return dense


def inputs(seed=1):
    g = torch.Generator().manual_seed(seed)
    return dict(img=torch.randn(2, 12, 64, generator=g), img_ids=torch.rand(2, 12, 3, generator=g) * 4,
                txt=torch.randn(2, 5, 48, generator=g), txt_ids=torch.zeros(2, 5, 3),
                timesteps=torch.tensor([0.3, 0.9]), y=torch.randn(2, 32, generator=g),
                guidance=torch.tensor([3.5, 2.0]))  # fmt: skip


# Targets: a quantized attention projection, a quantized fused linear1 of a single block, a
# quantized modulation Linear, and a layer the files keep in float (img_in).
TARGETS = ("double_blocks.0.img_attn.qkv", "single_blocks.1.linear1", "double_blocks.1.txt_mod.lin", "img_in")


def lora_tensors(model: Flux, rank=4, seed=3) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for path in TARGETS:
        m = model.get_submodule(path)
        sd[f"{path}.lora_A.weight"] = torch.randn(rank, m.in_features, generator=g) * 0.1
        sd[f"{path}.lora_B.weight"] = torch.randn(m.out_features, rank, generator=g) * 0.1
    return sd


@pytest.mark.parametrize("kind", BASES)
def test_live_lora_on_every_quantized_base(kind, tmp_path):
    model = quantized_base(kind, tmp_path)
    packed = {p: m for p, m in model.named_modules() if isinstance(m, QuantLinear)}
    assert {"double_blocks.0.img_attn.qkv", "single_blocks.1.linear1", "double_blocks.1.txt_mod.lin"} <= set(
        packed
    )
    dense = dense_twin(model)
    x = inputs()
    with torch.no_grad():
        base_out = model(**x)
        # fp8-dynamic also quantizes activations: its dense twin is not the same computation
        if kind != "fp8-dynamic":
            torch.testing.assert_close(base_out, dense(**x), rtol=0, atol=2e-6)

    sd = lora_tensors(model)
    L.load_lora(model, sd, adapter_name="style", weight=0.7)
    for path in TARGETS:
        A, B = sd[f"{path}.lora_A.weight"], sd[f"{path}.lora_B.weight"]
        dense.get_submodule(path).weight.data += 0.7 * (B @ A)
    with torch.no_grad():
        out = model(**x)
        if kind == "fp8-dynamic":
            # the LoRA contribution is computed in float beside the fp8 matmul: the change the
            # adapter makes equals the dense change up to the activation-rounding error
            delta, ref_delta = out - base_out, dense(**x) - dense_twin(quantized_base(kind, tmp_path))(**x)
            assert (delta - ref_delta).abs().max() <= 0.05 * ref_delta.abs().max()
        else:
            torch.testing.assert_close(out, dense(**x), rtol=0, atol=5e-6)
        assert not torch.equal(out, base_out)
    # the packed weights never changed, and the wrapped module is the quantized one
    for p, m in packed.items():
        wrapped = model.get_submodule(p)
        assert getattr(wrapped, "base", wrapped) is m
    # fusing into a packed weight is refused by name, not done wrongly
    with pytest.raises(LoraError, match="quantised weight"):
        L.fuse_lora(model)
    L.unload_lora(model)
    assert all(model.get_submodule(p) is m for p, m in packed.items())
    with torch.no_grad():
        assert torch.equal(model(**x), base_out)


KW = dict(height=32, width=48, num_inference_steps=2, generator=3, max_sequence_length=16, output_type="np",
          guidance_scale=1.0)  # fmt: skip


@pytest.fixture(scope="module")
def snapshot(tmp_path_factory):
    return write_tiny_snapshot(tmp_path_factory.mktemp("quant-pipe") / "model", variant="schnell", seed=4)


@pytest.mark.parametrize("kind", list(FILES))
def test_quantized_file_through_from_single_file(kind, snapshot, tmp_path):
    """A user's downloaded transformer file plus the text encoders and autoencoder files: one call.
    The image equals the pipeline whose transformer holds the dequantized weights."""
    ref_pipe = FluxPipeline.from_pretrained(snapshot)
    write, name = FILES[kind]
    file = tmp_path / name
    write(ref_pipe.transformer, file)
    pipe = FluxPipeline.from_single_file(
        file,
        t5=snapshot / "text_encoder_2",
        clip=snapshot / "text_encoder",
        ae=snapshot / "vae",
        tokenizers=snapshot,
    )
    assert pipe.transformer.quant_format == kind
    assert any(isinstance(m, QuantLinear) for m in pipe.transformer.modules())
    ref_pipe.transformer = dense_twin(pipe.transformer)
    ours = pipe("a cat on mars", **KW).images
    theirs = ref_pipe("a cat on mars", **KW).images
    np.testing.assert_allclose(ours, theirs, atol=1e-5, rtol=0)
