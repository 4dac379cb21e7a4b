"""GGUF: every block type against the gguf package's own numpy decoder (bit-exact), a tiny Flux
loaded from a GGUF file against the same model holding the dequantized weights, and the full-size
flux-dev key set on meta. Files are written with gguf's GGUFWriter; Q8_0/Q4_0/Q4_1/Q5_0/Q5_1 with
its quantizer, K-quants from random bytes with finite fp16 scales (gguf has no K-quantizer)."""

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")
from gguf import GGMLQuantizationType as T  # noqa: E402

from fluxcore import PRESETS, Flux, load_flux  # noqa: E402
from fluxcore.quant import GGUFLinear, dequantize, load_quantized_flux  # noqa: E402
from fluxcore.quant import gguf as qg  # noqa: E402
from fluxcore.quant.load import Entries, fill  # noqa: E402

# byte offsets of the fp16 scale fields in each block (made finite in random blocks)
F16_FIELDS = {"Q8_0": [0], "Q4_0": [0], "Q4_1": [0, 2], "Q5_0": [0], "Q5_1": [0, 2], "Q2_K": [80, 82],
              "Q3_K": [108], "Q4_K": [0, 2], "Q5_K": [0, 2], "Q6_K": [208]}  # fmt: skip
GGUF_QUANTIZER = ("Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1")
KQUANTS = ("Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")


def random_blocks(name: str, rows: int, cols: int, rng) -> np.ndarray:
    _, block, size = qg.GGML_TYPES[qg.TYPE_IDS[name]]
    nb = rows * cols // block
    raw = rng.integers(0, 256, size=(nb, size), dtype=np.uint8)
    for o in F16_FIELDS[name]:
        scales = (rng.standard_normal(nb) * 0.01).astype(np.float16)
        raw[:, o : o + 2] = scales.view(np.uint8).reshape(nb, 2)
    return raw.reshape(rows, cols // block * size)


def encode(name: str, w: np.ndarray, rng) -> np.ndarray:
    if name in ("F32",):
        return w.astype(np.float32)
    if name == "F16":
        return w.astype(np.float16)
    if name in GGUF_QUANTIZER or name == "BF16":
        return gguf.quants.quantize(w.astype(np.float32), T[name])
    return random_blocks(name, *w.shape, rng)


@pytest.mark.parametrize("name", ["F16", "BF16", *GGUF_QUANTIZER, *KQUANTS])
def test_dequantize_matches_gguf(name, tmp_path):
    rng = np.random.default_rng(0)
    w = rng.standard_normal((8, 512)).astype(np.float32)
    data = encode(name, w, rng)
    path = tmp_path / "t.gguf"
    writer = gguf.GGUFWriter(str(path), "flux")
    writer.add_tensor("x.weight", data, raw_dtype=T[name])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    tensors, _ = qg.read_gguf(path)
    t = tensors["x.weight"]
    assert t.qtype == name and t.shape == (8, 512)  # reversed ggml shape is torch order
    ref = gguf.quants.dequantize(data, T[name]).astype(np.float32).reshape(8, 512)
    ours = t.dequantize(torch.float32).numpy()
    assert np.array_equal(ours, ref)  # bit-exact
    for dt in (torch.bfloat16, torch.float16):  # the cast comes last
        assert torch.equal(t.dequantize(dt), torch.from_numpy(ref).to(dt))


def city96_type(key: str, shape, choices) -> str:
    """city96's rules: embedders / final layer / 1-D / tiny tensors stay float; others quantized."""
    if any(
        s in key for s in ("txt_in.", "img_in.", "time_in.", "vector_in.", "guidance_in.", "final_layer.")
    ):
        return "F16"
    if len(shape) == 1 or np.prod(shape) <= 1024:
        return "F32"
    ok = [c for c in choices if shape[1] % (256 if c.endswith("_K") else 32) == 0]
    return ok[hash(key) % len(ok)] if ok else "F16"


# tiny-dev's rows are 64/256/320 wide; the wider twin has every row a multiple of 256 (K-quants)
CONFIGS = {
    "tiny-dev": PRESETS["tiny-dev"],
    "tiny-256": PRESETS["tiny-dev"].replace(hidden_size=256, axes_dim=(16, 24, 24)),
}


@pytest.mark.parametrize("cfg", list(CONFIGS))
def test_tiny_flux_from_gguf(cfg, tmp_path):
    torch.manual_seed(0)
    rng = np.random.default_rng(1)
    config = CONFIGS[cfg]
    ref = Flux(config).eval()
    path = tmp_path / "tiny.gguf"
    writer = gguf.GGUFWriter(str(path), "flux")
    types, n = {}, 0
    for key, p in ref.state_dict().items():
        kind = city96_type(key, tuple(p.shape), ["Q"])
        if kind == "Q":
            ok = [
                c
                for c in (*KQUANTS, *GGUF_QUANTIZER, "BF16")
                if p.shape[1] % (256 if c.endswith("_K") else 32) == 0
            ]
            kind, n = ok[n % len(ok)], n + 1
        types[key] = kind
        writer.add_tensor(key, encode(kind, p.numpy(), rng), raw_dtype=T[kind])
    for f in (
        writer.write_header_to_file,
        writer.write_kv_data_to_file,
        writer.write_tensors_to_file,
        writer.close,
    ):
        f()
    want = {*GGUF_QUANTIZER, "F16", "F32"} | (set(KQUANTS) if cfg == "tiny-256" else set())
    assert want <= set(types.values())

    # tiny-dev: config inferred from the shapes; tiny-256 has a head dim no preset has (RoPE split)
    model = load_quantized_flux(path, config=None if cfg == "tiny-dev" else config, dtype=torch.float32)
    assert model.quant_format == "gguf"
    quantized = {p for p, m in model.named_modules() if isinstance(m, GGUFLinear)}
    assert quantized == {k[: -len(".weight")] for k, v in types.items() if v not in qg.FLOAT_TYPES}
    assert model.double_blocks[0].img_attn.qkv.weight.dtype == torch.uint8  # stays packed
    # the oracle: a plain model holding gguf.quants.dequantize of every tensor
    tensors, _ = qg.read_gguf(path)
    dense = Flux(config).eval()
    dense.load_state_dict(
        {
            k: torch.from_numpy(
                gguf.quants.dequantize(t.data.numpy(), T[t.qtype]).astype(np.float32)
            ).reshape(t.shape)
            for k, t in tensors.items()
        }
    )
    g = torch.Generator().manual_seed(2)
    args = dict(
        img=torch.randn(2, 12, 64, generator=g), img_ids=torch.rand(2, 12, 3, generator=g) * 4,
        txt=torch.randn(2, 5, 48, generator=g), txt_ids=torch.zeros(2, 5, 3),
        timesteps=torch.tensor([0.3, 0.9]), y=torch.randn(2, 32, generator=g), guidance=torch.tensor([3.5, 2.0]),
    )  # fmt: skip
    with torch.no_grad():
        err = (model(**args) - dense(**args)).abs().max().item()
    assert err <= 1e-6, err
    # load_flux takes the file as it is (the GGUF magic selects the packed loader)
    via_load_flux = load_flux(path, config=None if cfg == "tiny-dev" else config, dtype=torch.float32)
    assert via_load_flux.quant_format == "gguf"
    with torch.no_grad():
        assert torch.equal(via_load_flux(**args), model(**args))
    # state dict keys stay the official ones, with the packed bytes under X.weight
    assert list(model.state_dict()) == list(dense.state_dict())
    # and dequantize() gives plain Linears with the same output
    dequantize(model)
    with torch.no_grad():
        assert (model(**args) - dense(**args)).abs().max().item() <= 1e-6


def test_flux_dev_keys_on_meta():
    """Every flux-dev Linear that city96 files quantize becomes a GGUFLinear, every other key is
    filled, and the config inferred from the (torch-order) shapes is flux-dev."""
    from fluxcore.weights.flux_config import infer_config

    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in Flux(PRESETS["flux-dev"]).state_dict().items()}
    e = Entries("meta:flux-dev", "gguf")
    for key, shape in shapes.items():
        kind = city96_type(key, shape, ["Q4_K"])
        if kind == "Q4_K":

            def make(bias, device, shape=shape):
                raw = torch.empty(shape[0] * qg.row_bytes("Q4_K", shape[1]), dtype=torch.uint8, device="meta")
                return GGUFLinear(raw, "Q4_K", shape, bias)

            e.quant[key[: -len(".weight")]] = (shape, make)
        else:
            e.dense[key] = (shape, lambda shape=shape: torch.empty(shape, device="meta"))
    assert infer_config(e.shapes()) == PRESETS["flux-dev"]
    with torch.device("meta"):
        model = Flux(PRESETS["flux-dev"])
    done = fill(model, e, device="meta")
    assert len(done) == 19 * 10 + 38 * 3  # qkv, proj, 2 mlp, mod per stream; linear1, linear2, mod
    qbytes = sum(m.weight.numel() for m in model.modules() if isinstance(m, GGUFLinear))
    assert abs(qbytes / 1e9 - 6.7) < 0.1  # Q4_K: 4.5 bits per weight of ~11.9 B quantized params


def test_t5_gguf_llama_cpp_names(tmp_path):
    """A T5 encoder GGUF with llama.cpp tensor names (token_embd, enc.blk.N.attn_q, ...)."""
    from fluxcore.quant import load_quantized_t5
    from fluxcore.quant.load import t5_gguf_name
    from fluxcore.text import T5Config, T5Encoder

    torch.manual_seed(0)
    cfg = T5Config(vocab_size=64, d_model=64, d_kv=16, d_ff=96, num_layers=2, num_heads=4)
    ref = T5Encoder(cfg).eval()
    hf_to_gguf = {}
    for i in range(cfg.num_layers):
        for short in (
            "attn_q",
            "attn_k",
            "attn_v",
            "attn_o",
            "attn_norm",
            "ffn_gate",
            "ffn_up",
            "ffn_down",
            "ffn_norm",
        ):
            hf_to_gguf[t5_gguf_name(f"enc.blk.{i}.{short}.weight")] = f"enc.blk.{i}.{short}.weight"
    hf_to_gguf["encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"] = (
        "enc.blk.0.attn_rel_b.weight"
    )
    hf_to_gguf["shared.weight"] = "token_embd.weight"
    hf_to_gguf["encoder.final_layer_norm.weight"] = "enc.output_norm.weight"
    sd = ref.state_dict()
    assert set(hf_to_gguf) == set(sd)
    path = tmp_path / "t5.gguf"
    writer = gguf.GGUFWriter(str(path), "t5encoder")
    dense = {}
    for key, name in hf_to_gguf.items():
        w = sd[key].numpy()
        kind = "Q8_0" if w.ndim == 2 and w.shape[1] % 32 == 0 and "relative" not in key else "F32"
        data = encode(kind, w, None)
        writer.add_tensor(name, data, raw_dtype=T[kind])
        dense[key] = torch.from_numpy(gguf.quants.dequantize(data, T[kind]).astype(np.float32)).reshape(
            w.shape
        )
    for f in (
        writer.write_header_to_file,
        writer.write_kv_data_to_file,
        writer.write_tensors_to_file,
        writer.close,
    ):
        f()
    model = load_quantized_t5(path, dtype=torch.float32)
    assert isinstance(model.encoder.block[1].layer[0].SelfAttention.q, GGUFLinear)
    oracle = T5Encoder(cfg).eval()
    oracle.load_state_dict(dense)
    ids = torch.randint(0, 64, (2, 7))
    with torch.no_grad():
        assert (model(ids) - oracle(ids)).abs().max() <= 1e-6


@pytest.mark.parametrize("stored", ["F32", "F16", "BF16"])
def test_dense_tensors_read_straight_into_the_load_dtype(stored, tmp_path, monkeypatch):
    """Float tensors are converted a small chunk at a time while read (no stored-precision copy of
    the whole tensor): equal to reading them whole and casting, across chunk boundaries (a chunk
    of 96 bytes: 24 / 48 elements, neither dividing the tensor's 7·37)."""
    from fluxcore.quant import load as L

    monkeypatch.setattr(L, "_CHUNK", 96)
    w = np.random.default_rng(5).standard_normal((7, 37)).astype(np.float32) * 300
    path = tmp_path / "d.gguf"
    writer = gguf.GGUFWriter(str(path), "flux")
    data = encode(stored, w, None)
    writer.add_tensor("x.weight", data, raw_dtype=T[stored])
    writer.add_tensor("q.weight", encode("Q8_0", np.tile(w[:, :32], (1, 2)), None), raw_dtype=T.Q8_0)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    tensors, _ = qg.read_gguf(path)
    whole = tensors["x.weight"].dequantize(torch.float32)
    for dtype in (None, torch.bfloat16, torch.float16, torch.float32):
        e = L.gguf_entries(path, dtype=dtype)
        shape, read = e.dense["x.weight"]
        got = read()
        assert shape == (7, 37) and got.shape == (7, 37)
        want = tensors["x.weight"].data.view(got.dtype).reshape(7, 37) if dtype is None else whole.to(dtype)
        assert got.dtype == (dtype or L._FLOAT[stored])
        assert torch.equal(got, want)
        assert "q" in e.quant  # a quantized Linear weight stays packed whatever the dtype
