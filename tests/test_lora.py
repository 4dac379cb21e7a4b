"""fluxcore.lora against diffusers + peft (oracles nobody here wrote) on tiny models: PEFT files
saved by diffusers' own `save_lora_weights`, DoRA, two adapters with weights, live vs fused,
exact undo, hot swap under torch.compile, and text-encoder LoRAs."""

import json

import pytest
import torch

from fluxcore import PRESETS, Flux
from fluxcore import lora as L
from fluxcore.weights import bfl_to_diffusers

diffusers = pytest.importorskip("diffusers")
peft = pytest.importorskip("peft")

CFG = PRESETS["tiny-dev"]
TOL = 1e-5


def randomize(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("scale"):
                p.copy_(1 + 0.3 * torch.randn(p.shape, generator=g))
            else:
                p.add_(0.05 * torch.randn(p.shape, generator=g))
    return model


def tiny_flux(seed=0, config=CFG):
    torch.manual_seed(seed)
    return randomize(Flux(config).eval(), seed)


def diffusers_twin(model):
    c = model.config
    ref = diffusers.FluxTransformer2DModel(
        patch_size=1,
        in_channels=c.in_channels,
        out_channels=c.out_channels,
        num_layers=c.depth,
        num_single_layers=c.depth_single_blocks,
        attention_head_dim=c.head_dim,
        num_attention_heads=c.num_heads,
        joint_attention_dim=c.context_in_dim,
        pooled_projection_dim=c.vec_in_dim,
        guidance_embeds=c.guidance_embed,
        axes_dims_rope=c.axes_dim,
    )
    ref.load_state_dict(bfl_to_diffusers(model.state_dict()), strict=True)
    return ref.eval()


def make_inputs(config=CFG, batch=2, grid=(2, 3), l_txt=5, seed=1, in_channels=None):
    g = torch.Generator().manual_seed(seed)
    h, w = grid
    ids = torch.zeros(h, w, 3)
    ids[..., 1] = torch.arange(h)[:, None]
    ids[..., 2] = torch.arange(w)[None, :]
    return dict(
        img=torch.randn(batch, h * w, in_channels or config.in_channels, generator=g),
        img_ids=ids.reshape(h * w, 3),
        txt=torch.randn(batch, l_txt, config.context_in_dim, generator=g),
        txt_ids=torch.zeros(l_txt, 3),
        timesteps=torch.rand(batch, generator=g),
        y=torch.randn(batch, config.vec_in_dim, generator=g),
        guidance=1 + 4 * torch.rand(batch, generator=g),
    )


@torch.no_grad()
def run_ours(model, x):
    b = x["img"].shape[0]
    return model(
        x["img"],
        x["img_ids"].expand(b, -1, -1),
        x["txt"],
        x["txt_ids"].expand(b, -1, -1),
        x["timesteps"],
        x["y"],
        x["guidance"],
    )


@torch.no_grad()
def run_ref(ref, x, **kw):
    return ref(
        hidden_states=x["img"],
        encoder_hidden_states=x["txt"],
        pooled_projections=x["y"],
        timestep=x["timesteps"],
        img_ids=x["img_ids"],
        txt_ids=x["txt_ids"],
        guidance=x["guidance"],
        return_dict=False,
        **kw,
    )[0]


def max_err(a, b):
    return (a.double() - b.double()).abs().max().item()


def snapshot(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_identical(model, snap):
    sd = model.state_dict()
    assert sd.keys() == snap.keys()
    for k, v in snap.items():
        assert sd[k].dtype == v.dtype and torch.equal(sd[k], v), k


ALL_LINEARS = [  # diffusers names of every Linear in the blocks and embedders (ai-toolkit-like)
    "to_q",
    "to_k",
    "to_v",
    "to_out.0",
    "add_q_proj",
    "add_k_proj",
    "add_v_proj",
    "to_add_out",
    "ff.net.0.proj",
    "ff.net.2",
    "ff_context.net.0.proj",
    "ff_context.net.2",
    "norm1.linear",
    "norm1_context.linear",
    "norm.linear",
    "proj_mlp",
    "proj_out",
    "x_embedder",
    "context_embedder",
    "norm_out.linear",
    "linear_1",
    "linear_2",
]


def peft_lora_file(
    ref,
    tmp_path,
    name,
    *,
    r=4,
    alpha=8,
    seed=0,
    targets=ALL_LINEARS,
    use_dora=False,
    lora_bias=False,
    rank_pattern=None,
    alpha_pattern=None,
    meta=True,
):
    """Inject a LoRA with peft, give every tensor random values, save it with diffusers' own
    FluxPipeline.save_lora_weights; return the file path (the adapter stays on `ref`)."""
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    cfg = LoraConfig(
        r=r,
        lora_alpha=alpha,
        target_modules=targets,
        init_lora_weights=False,
        use_dora=use_dora,
        lora_bias=lora_bias,
        rank_pattern=rank_pattern or {},
        alpha_pattern=alpha_pattern or {},
    )
    ref.add_adapter(cfg, adapter_name=name)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for pname, p in ref.named_parameters():
            if f".{name}." in pname or pname.endswith(f".{name}"):
                if "magnitude" in pname:
                    p.mul_(1 + 0.2 * torch.rand(p.shape, generator=g))
                else:
                    p.copy_(0.2 * torch.randn(p.shape, generator=g))
    sd = get_peft_model_state_dict(ref, adapter_name=name)
    out = tmp_path / name
    diffusers.FluxPipeline.save_lora_weights(
        out, transformer_lora_layers=sd, transformer_lora_adapter_metadata=cfg.to_dict() if meta else None
    )
    return out / "pytorch_lora_weights.safetensors"


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """A fluxcore model, its diffusers twin with two PEFT adapters, and their files."""
    tmp = tmp_path_factory.mktemp("peft")
    model = tiny_flux()
    ref = diffusers_twin(model)
    fa = peft_lora_file(
        ref, tmp, "a", r=4, alpha=8, seed=1, rank_pattern={"proj_mlp": 2}, alpha_pattern={"to_k": 3}
    )
    fb = peft_lora_file(ref, tmp, "b", r=3, alpha=3, seed=2, targets=["to_q", "to_v", "proj_out", "ff.net.2"])
    return model, ref, fa, fb


def test_peft_file_layout(pair):
    _, _, fa, _ = pair
    sd, meta, _ = L.read_lora(fa)
    assert L.detect_format(sd) == "diffusers/peft"
    assert any(k.startswith("transformer.single_transformer_blocks.0.proj_mlp.lora_A") for k in sd)
    assert json.loads(meta["lora_adapter_metadata"])["transformer.lora_alpha"] == 8


def test_peft_one_and_two_adapters_live_and_fused(pair):
    model, ref, fa, fb = pair
    x = make_inputs()
    snap = snapshot(model)
    orig_qkv = model.double_blocks[0].img_attn.qkv
    base = run_ours(model, x)
    a = L.load_lora(model, fa, adapter_name="a")
    assert a == "a" and a.format == "diffusers/peft" and "single_blocks.0.linear1" in a.targets
    ref.set_adapters(["a"], [1.0])
    want_a = run_ref(ref, x)
    assert max_err(run_ours(model, x), want_a) <= TOL
    assert max_err(want_a, base) > 1e-2  # the LoRA does something

    L.load_lora(model, fb, adapter_name="b", weight=0.4)
    L.set_adapters(model, ["a", "b"], [0.7, 0.4])
    ref.set_adapters(["a", "b"], [0.7, 0.4])
    want_ab = run_ref(ref, x)
    got_ab = run_ours(model, x)
    assert max_err(got_ab, want_ab) <= TOL
    assert L.get_active_adapters(model) == ["a", "b"]

    # stacking order does not matter (float32 sums in another order: relative 1e-6)
    L.set_adapters(model, ["b", "a"], [0.4, 0.7])
    assert max_err(run_ours(model, x), got_ab) <= 1e-6 * got_ab.abs().max().item()

    changed = L.fuse_lora(model)
    assert "double_blocks.0.img_attn.qkv" in changed
    assert max_err(run_ours(model, x), want_ab) <= TOL
    with pytest.raises(L.LoraError, match="unfuse"):
        L.set_adapters(model, ["a"], [1.0])
    L.unfuse_lora(model)
    assert max_err(run_ours(model, x), want_ab) <= TOL

    L.fuse_lora(model, adapter_names=["a"], lora_scale=0.5)
    L.set_adapters  # noqa: B018  (fused: a at 0.7·0.5 in the weights, b still live)
    ref.set_adapters(["a", "b"], [0.35, 0.4])
    assert max_err(run_ours(model, x), run_ref(ref, x)) <= TOL
    L.unfuse_lora(model)

    L.disable_lora(model)
    assert L.get_active_adapters(model) == []
    assert torch.equal(run_ours(model, x), base)
    L.enable_lora(model)
    L.unload_lora(model, "b")
    L.set_adapters(model, "a", 1.0)
    assert max_err(run_ours(model, x), want_a) <= TOL
    restored = L.unload_lora(model)
    assert "double_blocks.0.img_attn.qkv" in restored
    assert not any(isinstance(m, L.LoraLinear) for m in model.modules())
    assert model.double_blocks[0].img_attn.qkv is orig_qkv  # the very same module object
    assert_identical(model, snap)
    assert torch.equal(run_ours(model, x), base)


def test_state_dict_keys_unchanged_while_loaded(pair):
    model, _, fa, _ = pair
    keys = list(model.state_dict())
    L.load_lora(model, fa, adapter_name="a")
    try:
        assert list(model.state_dict()) == keys
        model.load_state_dict(model.state_dict(), strict=True)
        assert model.img_in.weight is model.img_in.base.weight
    finally:
        L.unload_lora(model)


def test_peft_dora_and_lora_bias(tmp_path):
    model = tiny_flux(3)
    ref = diffusers_twin(model)
    f = peft_lora_file(
        ref,
        tmp_path,
        "d",
        r=4,
        alpha=6,
        seed=4,
        use_dora=True,
        targets=["to_q", "to_k", "to_v", "proj_mlp", "proj_out", "norm_out.linear", "ff.net.0.proj"],
    )
    x = make_inputs()
    want = run_ref(ref, x)
    L.load_lora(model, f, adapter_name="d")
    assert max_err(run_ours(model, x), want) <= TOL
    L.set_adapters(model, "d", 0.6)
    ref.set_adapters(["d"], [0.6])
    want = run_ref(ref, x)
    assert max_err(run_ours(model, x), want) <= TOL
    L.fuse_lora(model)
    assert max_err(run_ours(model, x), want) <= TOL
    L.unload_lora(model)

    ref2 = diffusers_twin(model)
    f2 = peft_lora_file(
        ref2,
        tmp_path,
        "lb",
        r=2,
        alpha=2,
        seed=5,
        lora_bias=True,
        targets=["to_q", "to_add_out", "proj_mlp", "norm_out.linear"],
    )
    assert any(k.endswith("lora_B.bias") for k in L.read_lora(f2)[0])
    L.load_lora(model, f2)
    assert max_err(run_ours(model, x), run_ref(ref2, x)) <= TOL
    L.unload_lora(model)


def test_peft_alpha_keys_without_metadata(tmp_path):
    """Files with per-module `.alpha` and no header (the Jon_Snow style): s = alpha / r."""
    model = tiny_flux(6)
    ref = diffusers_twin(model)
    f = peft_lora_file(ref, tmp_path, "al", r=4, alpha=4, seed=7, targets=["to_q", "proj_out"], meta=False)
    sd, _, _ = L.read_lora(f)
    sd = dict(sd)
    for k in [k for k in sd if k.endswith("lora_A.weight")]:
        sd[k.replace("lora_A.weight", "alpha")] = torch.tensor(4.0)  # alpha = r: same numbers as the file
    x = make_inputs()
    L.load_lora(model, sd)
    assert max_err(run_ours(model, x), run_ref(ref, x)) <= TOL
    L.unload_lora(model)
    for k in [k for k in sd if k.endswith(".alpha")]:
        sd[k] = torch.tensor(2.0)  # now s = 2/4: delta halves
    L.load_lora(model, sd, weight=2.0)
    assert max_err(run_ours(model, x), run_ref(ref, x)) <= TOL
    L.unload_lora(model)


def test_hotswap_under_compile_no_recompile():
    model = tiny_flux(8)
    x = make_inputs(batch=1)

    def lora(seed, r):
        g = torch.Generator().manual_seed(seed)
        sd = {}
        for name, (o, i) in {
            "transformer.transformer_blocks.0.attn.to_q": (64, 64),
            "transformer.single_transformer_blocks.1.proj_mlp": (256, 64),
            "transformer.proj_out": (64, 64),
        }.items():
            sd[f"{name}.lora_A.weight"] = 0.3 * torch.randn(r, i, generator=g)
            sd[f"{name}.lora_B.weight"] = 0.3 * torch.randn(o, r, generator=g)
        return sd

    first, second = lora(1, 2), lora(2, 4)
    fresh = tiny_flux(8)
    L.load_lora(fresh, second, adapter_name="x", weight=0.5)
    want = run_ours(fresh, x)

    compiles = []

    def backend(gm, example_inputs):
        compiles.append(gm)
        return gm.forward

    torch._dynamo.reset()
    L.prepare_hotswap(model, max_rank=4)
    L.load_lora(model, first, adapter_name="x")
    compiled = torch.compile(model, backend=backend)
    run_ours(compiled, x)
    n = len(compiles)
    assert n >= 1
    L.load_lora(model, second, adapter_name="x", hotswap=True)
    L.set_adapters(model, "x", 0.5)
    got = run_ours(compiled, x)
    assert len(compiles) == n, "hot swap or a weight change recompiled"
    assert max_err(got, want) <= TOL
    with pytest.raises(L.LoraError, match="capacity"):
        L.load_lora(model, lora(3, 5), adapter_name="x", hotswap=True)
    torch._dynamo.reset()


def test_text_encoder_loras_clip_and_t5(tmp_path):
    """diffusers-layout `text_encoder.` (CLIP) keys against transformers + peft, and kohya `lora_te3_`
    (T5) against the LoRA formula on the module."""
    transformers = pytest.importorskip("transformers")
    from peft import LoraConfig, inject_adapter_in_model
    from peft.utils import get_peft_model_state_dict

    from fluxcore.text.clip import CLIP_PRESETS, CLIPTextEncoder
    from fluxcore.text.t5 import T5_PRESETS, T5Encoder

    torch.manual_seed(0)
    ours = CLIPTextEncoder(CLIP_PRESETS["tiny"]).eval()
    c = CLIP_PRESETS["tiny"]
    hf = transformers.CLIPTextModel(
        transformers.CLIPTextConfig(
            vocab_size=c.vocab_size,
            hidden_size=c.hidden_size,
            intermediate_size=c.intermediate_size,
            num_hidden_layers=c.num_hidden_layers,
            num_attention_heads=c.num_attention_heads,
            max_position_embeddings=c.max_position_embeddings,
            hidden_act="quick_gelu",
            layer_norm_eps=c.layer_norm_eps,
            eos_token_id=c.eos_token_id,
        )
    ).eval()
    hf.load_state_dict(
        {k.removeprefix("text_model."): v for k, v in ours.state_dict().items() if "position_ids" not in k},
        strict=True,
    )
    cfg = LoraConfig(
        r=2, lora_alpha=4, target_modules=["q_proj", "v_proj", "fc1", "out_proj"], init_lora_weights=False
    )
    hf = inject_adapter_in_model(cfg, hf)
    sd = {f"text_encoder.{k}": v for k, v in get_peft_model_state_dict(hf).items()}
    diffusers.FluxPipeline.save_lora_weights(
        tmp_path,
        transformer_lora_layers=None,
        text_encoder_lora_layers=get_peft_model_state_dict(hf),
        text_encoder_lora_adapter_metadata=cfg.to_dict(),
    )
    ids = torch.tensor([[49406, 320, 1125, 539, 49407, 49407], [49406, 1929, 49407, 0, 0, 0]])
    with torch.no_grad():
        want = hf(ids).last_hidden_state
        base = ours(ids).last_hidden_state
    name = L.load_lora(ours, tmp_path / "pytorch_lora_weights.safetensors")
    with torch.no_grad():
        got = ours(ids).last_hidden_state
    assert max_err(got, want) <= TOL and max_err(base, want) > 1e-3
    L.unload_lora(ours, name)
    # transformers-4 files keep the `text_model.` level
    # (as a dict there is no header, so alpha comes as `.alpha` keys)
    sd = {k.replace("text_encoder.", "text_encoder.text_model.", 1): v for k, v in sd.items()}
    sd |= {k.replace("lora_A.weight", "alpha"): torch.tensor(4.0) for k in sd if k.endswith("lora_A.weight")}
    L.load_lora(ours, sd, adapter_name="v4")
    with torch.no_grad():
        assert max_err(ours(ids).last_hidden_state, want) <= TOL
    L.unload_lora(ours)
    assert sd  # the same tensors under the transformer: nothing for Flux
    with pytest.raises(L.LoraError, match="nothing for the transformer"):
        L.load_lora(tiny_flux(), sd)

    t5 = T5Encoder(T5_PRESETS["tiny"]).eval() if "tiny" in T5_PRESETS else None
    if t5 is None:
        pytest.skip("no tiny T5 preset")
    q = t5.encoder.block[1].layer[0].SelfAttention.q
    wi = t5.encoder.block[0].layer[1].DenseReluDense.wi_0
    g = torch.Generator().manual_seed(3)
    kd = {}
    for prefix, mod in (
        ("lora_te3_encoder_block_1_layer_0_SelfAttention_q", q),
        ("lora_te3_encoder_block_0_layer_1_DenseReluDense_wi_0", wi),
    ):
        kd[prefix + ".lora_down.weight"] = torch.randn(3, mod.in_features, generator=g)
        kd[prefix + ".lora_up.weight"] = torch.randn(mod.out_features, 3, generator=g)
        kd[prefix + ".alpha"] = torch.tensor(1.5)
    xin = torch.randn(2, 4, q.in_features)
    with torch.no_grad():
        want_q = q(xin) + 0.5 * (1.5 / 3) * (
            xin
            @ kd["lora_te3_encoder_block_1_layer_0_SelfAttention_q.lora_down.weight"].T
            @ kd["lora_te3_encoder_block_1_layer_0_SelfAttention_q.lora_up.weight"].T
        )
    got = L.load_lora(t5, kd, weight=0.5)
    assert got.format == "kohya" and len(got.targets) == 2
    with torch.no_grad():
        assert max_err(t5.encoder.block[1].layer[0].SelfAttention.q(xin), want_q) <= TOL
    L.unload_lora(t5)


class Int8Linear(torch.nn.Module):
    """A stand-in quantised Linear: int8 weight + per-row scale, with dequantize()."""

    def __init__(self, lin):
        super().__init__()
        self.in_features, self.out_features = lin.in_features, lin.out_features
        w = lin.weight.detach()
        self.register_buffer("scale", w.abs().amax(dim=1, keepdim=True) / 127)
        self.register_buffer("qweight", torch.round(w / self.scale).to(torch.int8))
        self.bias = lin.bias

    @property
    def weight(self):
        return self.qweight

    def dequantize(self):
        return self.qweight.float() * self.scale

    def forward(self, x):
        return torch.nn.functional.linear(x, self.dequantize(), self.bias)


def test_quantised_base_live_and_bf16_fuse_rounds_once():
    model = tiny_flux(9)
    blk = model.double_blocks[0].img_attn
    blk.proj = Int8Linear(blk.proj)
    g = torch.Generator().manual_seed(0)
    a, b = 0.3 * torch.randn(2, 64, generator=g), 0.3 * torch.randn(64, 2, generator=g)
    sd = {
        "lora_unet_double_blocks_0_img_attn_proj.lora_down.weight": a,
        "lora_unet_double_blocks_0_img_attn_proj.lora_up.weight": b,
    }
    x = torch.randn(3, 64)
    with torch.no_grad():
        want = blk.proj(x) + x @ (b @ a).T
        L.load_lora(model, sd)
        assert max_err(blk.proj(x), want) <= TOL
    with pytest.raises(L.LoraError, match="quantised"):
        L.fuse_lora(model)
    L.unload_lora(model)
    assert isinstance(blk.proj, Int8Linear)

    model = tiny_flux(9).to(torch.bfloat16)
    snap = snapshot(model)
    L.load_lora(
        model,
        {k.replace("img_attn_proj", "img_mlp_0"): v for k, v in sd.items()}
        | {"lora_unet_double_blocks_0_img_mlp_0.lora_up.weight": 0.3 * torch.randn(256, 2, generator=g)},
    )
    L.fuse_lora(model, lora_scale=0.5)
    W = snap["double_blocks.0.img_mlp.0.weight"]
    B = L.read_lora  # noqa: F841
    lin = model.double_blocks[0].img_mlp[0]
    delta = 0.5 * lin.adapters["default_0"].delta_weight()
    assert torch.equal(lin.weight, (W.float() + delta).to(torch.bfloat16))  # one rounding from fp32
    L.unfuse_lora(model)
    assert_identical(model, snap)
    L.unload_lora(model)
    assert_identical(model, snap)
