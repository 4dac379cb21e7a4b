"""Loading quantized checkpoints as they are: the model is built on the meta device, every
quantized Linear becomes a `fluxcore.quant.linear` module holding the stored bytes, and the other
tensors (biases, norms, embedders) are read into plain parameters. No full-precision copy of a
quantized weight is ever made; at run time each layer dequantizes its own weight when called.

    load_quantized_flux(path)   .gguf (city96), bitsandbytes NF4/FP4 .safetensors, ComfyUI scaled
                                fp8 or plain fp8 .safetensors → Flux
    load_quantized_t5(path)     T5 .gguf (llama.cpp tensor names) or scaled fp8 T5 → T5Encoder
    detect_format(path)         "gguf" | "nf4" | "scaled_fp8" | None (a plain checkpoint)
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from fluxcore.config import FluxConfig, get_config
from fluxcore.errors import WeightsError
from fluxcore.model import Flux
from fluxcore.quant import gguf as _gguf
from fluxcore.quant import nf4 as _nf4
from fluxcore.quant import scaled_fp8 as _fp8
from fluxcore.quant.linear import GGUFLinear, QuantLinear, ScaledLinear
from fluxcore.transforms import replace_module
from fluxcore.weights.errors import KeyMismatchError, ShapeMismatchError
from fluxcore.weights.io import open_checkpoint


@dataclass
class Entries:
    """What a quantized file holds, under the model's own key names.

    quant:  Linear path → (out, in) shape and a function (bias, device) → QuantLinear
    dense:  state-dict key → shape and a function () → float/int tensor in fresh memory
    """

    source: str
    format: str
    quant: dict[str, tuple[tuple[int, int], Callable[[Tensor | None, object], QuantLinear]]] = field(
        default_factory=dict
    )
    dense: dict[str, tuple[tuple[int, ...], Callable[[], Tensor]]] = field(default_factory=dict)

    def shapes(self) -> dict[str, tuple[int, ...]]:
        out = {k + ".weight": s for k, (s, _) in self.quant.items()}
        out.update({k: s for k, (s, _) in self.dense.items()})
        return out


def _prefix(keys, mark: str = "img_in.weight") -> str:
    for k in keys:
        if k == mark or k.endswith("." + mark):
            return k[: len(k) - len(mark)]
    return ""


def detect_format(path) -> str | None:
    path = Path(path)
    if _gguf.is_gguf(path):
        return "gguf"
    if path.suffix != ".safetensors" and not path.is_dir():
        return None
    with open_checkpoint(path) as ck:
        keys = ck.keys()
        if _nf4.is_bnb4(keys):
            return "nf4"
        if _fp8.is_scaled_fp8(keys, ck.metadata, {k: ck.dtype(k) for k in keys}):
            return "scaled_fp8"
    return None


# --- per format: file → Entries -------------------------------------------------------------------


def _to(t: Tensor, device) -> Tensor:
    return t if device is None else t.to(device)


_FLOAT = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
# Bytes converted at a time when a float tensor is read into another dtype (see _read_float).
_CHUNK = 1 << 18


def _readinto(f, view: memoryview, path) -> None:
    done = 0
    while done < len(view):
        n = f.readinto(view[done:])
        if not n:
            raise WeightsError(f"{path}: file ends inside a tensor")
        done += n


def _read_bytes(path, offset: int, nbytes: int) -> Tensor:
    """`nbytes` bytes of the file at `offset`, in fresh memory, by plain file reads. Copying out of
    the file's memory map instead would fault every page in, and those pages stay in this
    process's resident set while the mapping lives: every packed weight would count twice at the
    peak."""
    out = torch.empty(nbytes, dtype=torch.uint8)
    with open(path, "rb", buffering=0) as f:
        f.seek(offset)
        _readinto(f, memoryview(out.numpy()), path)
    return out


def _read_float(path, t: _gguf.GGUFTensor, dtype: torch.dtype | None, buf: Tensor) -> Tensor:
    """A float (F32/F16/BF16) tensor of the file as `dtype` (default: as stored). Converted a chunk
    at a time through `buf` (uint8, reused for every tensor of a load), so the stored-precision
    copy of a large tensor (the F16 txt_in of a bf16 load) never exists next to the converted one,
    and no large temporary is freed: glibc raises its mmap threshold to the size of a freed
    mapping, after which the packed weights come from the heap and its holes stay resident."""
    src = _FLOAT[t.qtype]
    if dtype is None or dtype == src:
        return _read_bytes(path, t.offset, t.data.numel()).view(src).reshape(t.shape)
    out = torch.empty(t.shape, dtype=dtype).reshape(-1)
    size = src.itemsize
    step = buf.numel() // size
    with open(path, "rb", buffering=0) as f:
        f.seek(t.offset)
        for start in range(0, out.numel(), step):
            n = min(step, out.numel() - start)
            _readinto(f, memoryview(buf.numpy())[: n * size], path)
            out[start : start + n] = buf[: n * size].view(src)
    return out.reshape(t.shape)


def gguf_entries(
    path, rename: Callable[[str], str | None] = lambda k: k, dtype: torch.dtype | None = None
) -> Entries:
    """Entries of a .gguf file. `dtype`: what the dense (float or dequantized) tensors are read
    as, where the caller knows it (saves a full-size copy per tensor); None keeps float tensors
    as stored and decodes quantized ones to float32."""
    tensors, _meta = _gguf.read_gguf(path)
    prefix = _prefix(tensors)
    e = Entries(str(path), "gguf")
    chunk = torch.empty(_CHUNK, dtype=torch.uint8)  # the conversion buffer of _read_float
    for name, t in tensors.items():
        if not name.startswith(prefix):
            continue
        key = rename(name[len(prefix) :])
        if key is None:
            continue
        if t.qtype not in _gguf.FLOAT_TYPES and key.endswith(".weight") and len(t.shape) == 2:

            def make(bias, device, t=t):
                raw = _read_bytes(path, t.offset, t.data.numel())
                return GGUFLinear(_to(raw, device), t.qtype, t.shape, bias)

            e.quant[key[: -len(".weight")]] = (t.shape, make)
        elif t.qtype in _gguf.FLOAT_TYPES:
            e.dense[key] = (t.shape, lambda t=t: _read_float(path, t, dtype, chunk))
        else:
            e.dense[key] = (
                t.shape,
                lambda t=t: _gguf.dequantize(
                    _read_bytes(path, t.offset, t.data.numel()), t.qtype, t.shape, dtype or torch.float32
                ),
            )
    return e


def safetensors_entries(
    path, rename: Callable[[str], str | None] = lambda k: k, mark: str = "img_in.weight"
) -> Entries:
    ck = open_checkpoint(path)
    keys = set(ck.keys())
    prefix = _prefix(keys, mark)
    fmt = "nf4" if _nf4.is_bnb4(keys) else "scaled_fp8"
    e = Entries(ck.source, fmt)
    e.checkpoint = ck  # kept open until loading is done
    used: set[str] = set()
    legacy_full = False
    layers = _fp8.layer_formats(ck.metadata)
    for k in keys:
        if k.endswith(_fp8.MARKER) and k[: -len(_fp8.MARKER)] == prefix:
            used.add(k)
            legacy_full = ck.shape(k) == (2,)
    own = sorted(k for k in keys if k.startswith(prefix) and k not in used)

    def read(k):
        return lambda: ck.read(k)

    for k in own:
        if fmt == "nf4" and (suffix := _nf4.state_suffix(k)):
            wkey = k[: -len(suffix)]
            roles = _nf4.layer_keys(wkey, keys)
            used.update(roles.values())
            state = _nf4.parse_state(ck.read(k), k)
            shape = tuple(int(s) for s in state["shape"])
            name = rename(wkey[len(prefix) :])
            if name is None:
                continue

            def make(bias, device, roles=roles, wkey=wkey):
                return _nf4.linear_from_tensors(
                    {r: _to(ck.read(fk), device) for r, fk in roles.items()}, bias, wkey
                )

            e.quant[name[: -len(".weight")]] = (shape, make)
        elif (
            fmt == "scaled_fp8"
            and k.endswith(".weight")
            and ck.dtype(k) in (torch.float8_e4m3fn, torch.float8_e5m2)
        ):
            base = k[: -len(".weight")]
            sw = next((base + "." + s for s in _fp8.WEIGHT_SCALE if base + "." + s in keys), None)
            si = next((base + "." + s for s in _fp8.INPUT_SCALE if base + "." + s in keys), None)
            cq = base + ".comfy_quant"
            info = dict(layers.get(base[len(prefix) :], layers.get(base, {})))
            if cq in keys:
                info.update(_fp8.parse_comfy_quant(ck.read(cq), cq))
            if base + ".weight_scale_2" in keys or info.get("format", "float8").startswith("nvfp4"):
                raise WeightsError(f"{ck.source}: {base} is NVFP4, which fluxcore does not read")
            used.update(x for x in (k, sw, si, cq) if x)
            full = legacy_full or bool(info.get("full_precision_matrix_mult", False))
            name = rename(k[len(prefix) :])
            if name is None or len(ck.shape(k)) != 2:
                continue

            def make(bias, device, k=k, sw=sw, si=si, full=full):
                scale = ck.read(sw) if sw else torch.ones(())
                s_in = ck.read(si) if si else None
                m = ScaledLinear(
                    _to(ck.read(k), device),
                    _to(scale, device),
                    bias,
                    None if s_in is None else _to(s_in, device),
                )
                m.fp8_allowed = not full
                return m

            e.quant[name[: -len(".weight")]] = (ck.shape(k), make)
    for k in own:
        if k in used or k.endswith(".comfy_quant"):
            continue
        name = rename(k[len(prefix) :])
        if name is not None:
            e.dense[name] = (ck.shape(k), read(k))
    return e


def entries(path, dtype: torch.dtype | None = None, **kw) -> Entries:
    """Entries of any quantized file; `dtype` (GGUF only) as in `gguf_entries`."""
    fmt = detect_format(path)
    if fmt is None:
        raise WeightsError(
            f"{path}: not a quantized checkpoint this loader reads (GGUF, bitsandbytes NF4/FP4, scaled fp8); "
            "plain checkpoints load with fluxcore.load_flux"
        )
    if fmt == "gguf":
        kw.pop("mark", None)
        return gguf_entries(path, dtype=dtype, **kw)
    return safetensors_entries(path, **kw)


# --- filling a meta model --------------------------------------------------------------------------


def fill(
    model: nn.Module,
    e: Entries,
    *,
    device=None,
    dtype: torch.dtype = torch.bfloat16,
    compute: str = "dequant",
) -> list[str]:
    """Replace every Linear of `model` (built on meta) that `e` holds quantized with its quantized
    module, and assign every dense tensor; strict: a key left unfilled or one the model lacks
    raises KeyMismatchError, a shape that differs ShapeMismatchError. Returns the quantized paths."""
    expected = dict(model.state_dict(keep_vars=True))
    unexpected = [k + ".weight" for k in e.quant if k + ".weight" not in expected]
    unexpected += [k for k in e.dense if k not in expected]
    if unexpected:
        raise KeyMismatchError(
            f"{e.source}: {len(unexpected)} tensor(s) the model does not have, e.g. {sorted(unexpected)[:5]}"
        )
    filled: set[str] = set()

    def dense(key: str) -> Tensor:
        shape, read = e.dense[key]
        want = tuple(expected[key].shape)
        if tuple(shape) != want:
            raise ShapeMismatchError(
                f"{e.source}: {key} has shape {list(shape)}, the model expects {list(want)}"
            )
        t = read()
        t = t.to(device=device or "cpu", dtype=dtype if t.is_floating_point() else t.dtype)
        filled.add(key)
        return t

    done = []
    for path, (shape, make) in e.quant.items():
        old = model.get_submodule(path)
        if type(old) is not nn.Linear:
            raise KeyMismatchError(
                f"{e.source}: {path} is quantized in the file but is a {type(old).__name__} in the model"
            )
        if (old.out_features, old.in_features) != tuple(shape):
            raise ShapeMismatchError(
                f"{e.source}: {path}.weight has shape {list(shape)}, the model expects {[old.out_features, old.in_features]}"
            )
        bias = dense(path + ".bias") if path + ".bias" in e.dense else None
        if (bias is None) != (old.bias is None):
            raise KeyMismatchError(
                f"{e.source}: {path}.bias is {'missing' if bias is None else 'unexpected'}"
            )
        new = make(bias, device)
        if compute != "dequant" and isinstance(new, ScaledLinear) and getattr(new, "fp8_allowed", True):
            new.compute = compute
        replace_module(model, path, new)
        filled.add(path + ".weight")
        done.append(path)
    for key in e.dense:
        if key in filled:
            continue
        mod_path, _, name = key.rpartition(".")
        mod = model.get_submodule(mod_path) if mod_path else model
        t = dense(key)
        if name in mod._parameters:
            mod._parameters[name] = nn.Parameter(t, requires_grad=False)
        else:
            mod._buffers[name] = t
    missing = sorted(set(expected) - filled - {k for k in expected if not expected[k].is_meta})
    if missing:
        raise KeyMismatchError(
            f"{e.source}: {len(missing)} tensor(s) missing from the file, e.g. {missing[:5]}"
        )
    return done


_DENSE_TOP = ("img_in", "txt_in", "time_in", "vector_in", "guidance_in", "final_layer")


def load_quantized_flux(
    source,
    *,
    config: FluxConfig | str | None = None,
    device=None,
    dtype: torch.dtype = torch.bfloat16,
    compute: str = "dequant",
) -> Flux:
    """A FLUX transformer from a quantized single file, kept quantized.

    source:  .gguf (city96 FLUX files: BFL names), bitsandbytes NF4/FP4 .safetensors, ComfyUI
             scaled fp8 or plain fp8 .safetensors (BFL names, any `model.diffusion_model.` prefix).
    config:  FluxConfig or preset name; default: inferred from the shapes.
    dtype:   the dtype of the tensors that are not quantized and of the matmuls (default bf16).
    compute: "dequant" (every format), or "fp8" to multiply fp8-scaled layers with
             torch._scaled_mm (dynamic per-tensor input scales, or the file's scale_input).
    Returns an eval-mode Flux with `.source` and `.quant_format` set."""
    from fluxcore.weights.flux_config import infer_config

    # dense tensors are read straight into `dtype` (fill would convert them to it anyway): no
    # stored-precision copy of each beside the converted one
    e = entries(source, dtype=dtype)
    # The input embedders and the final layer stay dense even where a file quantized them: they
    # are tiny, and Flux.forward reads the model's dtype from img_in.weight.
    for path in [p for p in e.quant if p.split(".")[0] in _DENSE_TOP]:
        shape, make = e.quant.pop(path)
        e.dense[path + ".weight"] = (shape, lambda make=make: make(None, None).dequantized_weight(dtype))

    def build() -> Flux:
        cfg = infer_config(e.shapes(), source=e.source) if config is None else config
        return Flux(get_config(cfg) if isinstance(cfg, str) else cfg)

    model = _materialise(build, e, source, device=device, dtype=dtype, compute=compute)
    model.variant = getattr(model, "variant", None)
    return model


# --- T5 ---------------------------------------------------------------------------------------------

_T5_GGUF = {
    "attn_q": "layer.0.SelfAttention.q",
    "attn_k": "layer.0.SelfAttention.k",
    "attn_v": "layer.0.SelfAttention.v",
    "attn_o": "layer.0.SelfAttention.o",
    "attn_rel_b": "layer.0.SelfAttention.relative_attention_bias",
    "attn_norm": "layer.0.layer_norm",
    "ffn_gate": "layer.1.DenseReluDense.wi_0",
    "ffn_up": "layer.1.DenseReluDense.wi_1",
    "ffn_down": "layer.1.DenseReluDense.wo",
    "ffn_norm": "layer.1.layer_norm",
}


def t5_gguf_name(name: str) -> str | None:
    """llama.cpp T5-encoder tensor name → T5Encoder (Hugging Face) name; None for decoder parts."""
    if name == "token_embd.weight":
        return "shared.weight"
    if name == "enc.output_norm.weight":
        return "encoder.final_layer_norm.weight"
    m = re.fullmatch(r"enc\.blk\.(\d+)\.(\w+)\.(weight|bias)", name)
    if m and m.group(2) in _T5_GGUF:
        return f"encoder.block.{m.group(1)}.{_T5_GGUF[m.group(2)]}.{m.group(3)}"
    if name.startswith(("dec.", "output.")):
        return None
    return name


def load_quantized_t5(source, *, device=None, dtype: torch.dtype = torch.bfloat16, compute: str = "dequant"):
    """A T5 encoder from a T5 .gguf (llama.cpp names, e.g. city96's t5-v1_1-xxl-encoder-gguf) or a
    scaled-fp8 T5 .safetensors (ComfyUI `t5xxl_fp8_e4m3fn_scaled`), kept quantized. A quantized
    token embedding is dequantized at load (an Embedding is a lookup, not a matmul)."""
    from fluxcore.text import T5Config, T5Encoder

    if _gguf.is_gguf(source):
        e = gguf_entries(source, rename=t5_gguf_name, dtype=dtype)  # fill casts dense tensors to it
    else:

        def hf(k):
            return "shared.weight" if k == "encoder.embed_tokens.weight" else k

        e = safetensors_entries(source, rename=hf, mark="shared.weight")
        if "shared.weight" not in e.dense and "shared.weight" not in {k + ".weight" for k in e.quant}:
            raise KeyMismatchError(f"{e.source}: no T5 token embedding (shared.weight)")
    # An embedding is looked up, not multiplied: decode it to a dense table. With float16 compute
    # the feed-forward `wo` is decoded too and kept float32, T5's rule (its inputs overflow fp16).
    dense_wo = dtype == torch.float16
    for path in [p for p in e.quant if p == "shared" or (dense_wo and p.endswith("DenseReluDense.wo"))]:
        shape, make = e.quant.pop(path)
        e.dense[path + ".weight"] = (
            shape,
            lambda make=make: make(None, None).dequantized_weight(torch.float32),
        )
    shapes = e.shapes()
    layers = {int(m.group(1)) for k in shapes if (m := re.match(r"encoder\.block\.(\d+)\.", k))}
    vocab, d_model = shapes["shared.weight"]
    buckets, heads = shapes["encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"]
    inner = shapes["encoder.block.0.layer.0.SelfAttention.q.weight"][0]
    d_ff = shapes["encoder.block.0.layer.1.DenseReluDense.wi_0.weight"][0]
    config = T5Config(vocab_size=vocab, d_model=d_model, d_kv=inner // heads, d_ff=d_ff, num_layers=len(layers),
                      num_heads=heads, relative_attention_num_buckets=buckets)  # fmt: skip
    return _materialise(lambda: T5Encoder(config), e, source, device=device, dtype=dtype, compute=compute)


def _materialise(build, e: Entries, source, *, device, dtype, compute) -> nn.Module:
    """`build()` on the meta device, filled from `e` (its file closed afterwards, also on error),
    tagged with its source and quantization format; eval mode, no gradients."""
    try:
        with torch.device("meta"):
            model = build()
        fill(model, e, device=device, dtype=dtype, compute=compute)
    finally:
        ck = getattr(e, "checkpoint", None)
        if ck is not None:
            ck.close()
    model.source, model.quant_format = str(source), e.format
    return model.eval().requires_grad_(False)
