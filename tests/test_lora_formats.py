"""Every LoRA layout fluxcore reads: against diffusers' own converters where they accept a tiny
model (kohya double blocks, XLabs, OneTrainer), and otherwise against the format's published math
written here as plain formulas on a merged copy of the model (BFL control, ComfyUI, LoKr, LoHa,
full deltas, kohya linear1 / split_qkv). Full-size key sets are mapped on the meta device."""

import copy

import pytest
import torch
from test_lora import TOL, diffusers_twin, make_inputs, max_err, run_ours, run_ref, snapshot, tiny_flux

from fluxcore import PRESETS, Flux
from fluxcore import lora as L
from fluxcore.weights.io import open_checkpoint  # noqa: F401  (the LoRA reader's stack)

diffusers = pytest.importorskip("diffusers")
FluxPipeline = diffusers.FluxPipeline

H = PRESETS["tiny-dev"].hidden_size
BLOCK_LINEARS = {  # BFL module (in a double / single block) → (out, in) at tiny size
    "double": {
        "img_attn.qkv": (3 * H, H),
        "img_attn.proj": (H, H),
        "img_mlp.0": (4 * H, H),
        "img_mlp.2": (H, 4 * H),
        "img_mod.lin": (6 * H, H),
        "txt_attn.qkv": (3 * H, H),
        "txt_attn.proj": (H, H),
        "txt_mlp.0": (4 * H, H),
        "txt_mlp.2": (H, 4 * H),
        "txt_mod.lin": (6 * H, H),
    },
    "single": {"linear1": (7 * H, H), "linear2": (H, 5 * H), "modulation.lin": (3 * H, H)},
}


def rand(g, *shape, s=0.2):
    return s * torch.randn(*shape, generator=g)


def bfl_modules(model, *, single=True, embedders=True):
    out = {}
    for i in range(len(model.double_blocks)):
        out |= {f"double_blocks.{i}.{k}": v for k, v in BLOCK_LINEARS["double"].items()}
    if single:
        for i in range(len(model.single_blocks)):
            out |= {f"single_blocks.{i}.{k}": v for k, v in BLOCK_LINEARS["single"].items()}
    if embedders:
        for name, m in model.named_modules():
            if name.startswith(
                ("img_in", "txt_in", "time_in.", "vector_in.", "guidance_in.", "final_layer.")
            ) and isinstance(m, torch.nn.Linear):
                out[name] = (m.out_features, m.in_features)
    return out


@torch.no_grad()
def merged_copy(model, deltas: dict, replace: dict | None = None, config=None):
    """A plain fluxcore model whose parameters are model's + deltas (the formula oracle)."""
    ref = Flux(config or model.config).eval()
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    for k, d in deltas.items():
        if sd[k].shape != d.shape:  # img_in widened: zero columns, then the delta
            pad = torch.zeros(d.shape)
            pad[:, : sd[k].shape[1]] = sd[k]
            sd[k] = pad
        sd[k] = sd[k] + d
    sd |= replace or {}
    ref.load_state_dict(sd, strict=True)
    return ref


def add(deltas, key, d):
    deltas[key] = deltas.get(key, 0) + d


# --- kohya --------------------------------------------------------------------------------------
def kohya_file(model, seed=0, r=3, alpha=1.5, single=True, embedders=True):
    g = torch.Generator().manual_seed(seed)
    sd, deltas = {}, {}
    for path, (o, i) in bfl_modules(model, single=single, embedders=embedders).items():
        k = "lora_unet_" + path.replace(".", "_")
        down, up = rand(g, r, i), rand(g, o, r)
        sd |= {f"{k}.lora_down.weight": down, f"{k}.lora_up.weight": up, f"{k}.alpha": torch.tensor(alpha)}
        add(deltas, path + ".weight", alpha / r * up @ down)
    return sd, deltas


def test_kohya_against_diffusers_and_formula():
    model = tiny_flux(1)
    x = make_inputs()
    # diffusers' kohya converter hard-codes linear1's 3072-wide split, and this version drops the
    # embedder / final-layer keys, so the diffusers oracle gets block keys without linear1; the
    # rest is checked against the formula below
    sd, _ = kohya_file(model, seed=2, embedders=False)
    sd = {k: v for k, v in sd.items() if "linear1" not in k}
    ref = diffusers_twin(model)
    conv, alphas = FluxPipeline.lora_state_dict(dict(sd), return_alphas=True)
    FluxPipeline.load_lora_into_transformer(conv, network_alphas=alphas, transformer=ref)
    name = L.load_lora(model, sd, adapter_name="k")
    assert name.format == "kohya" and "double_blocks.1.txt_mod.lin" in name.targets
    assert max_err(run_ours(model, x), run_ref(ref, x)) <= TOL
    L.unload_lora(model)

    # all modules incl. linear1, against the formula
    sd, deltas = kohya_file(model, seed=3)
    L.load_lora(model, sd, weight=0.6)
    want = run_ours(merged_copy(model, {k: 0.6 * d for k, d in deltas.items()}), x)
    assert max_err(run_ours(model, x), want) <= TOL
    L.fuse_lora(model)
    assert max_err(run_ours(model, x), want) <= TOL
    L.unload_lora(model)


def test_kohya_split_qkv_dora_scale_and_default_alpha():
    model = tiny_flux(4)
    x = make_inputs()
    g = torch.Generator().manual_seed(5)
    r, alpha = 2, 4.0
    downs = [rand(g, r, H) for _ in range(4)]
    ups = [rand(g, n, r) for n in (H, H, H, 4 * H)]
    up = torch.zeros(7 * H, 4 * r)  # split_qkv: down stacked (4r, in), up block-diagonal
    row = 0
    for j, u in enumerate(ups):
        up[row : row + u.shape[0], j * r : (j + 1) * r] = u
        row += u.shape[0]
    down = torch.cat(downs)
    k = "lora_unet_single_blocks_1_linear1"
    d2, u2 = rand(g, 3, H), rand(g, H, 3)
    W = model.double_blocks[0].img_attn.proj.weight.detach()
    dora = (W + u2 @ d2).norm(dim=1, keepdim=True) * (1 + 0.3 * torch.rand(H, 1, generator=g))
    sd = {
        f"{k}.lora_down.weight": down,
        f"{k}.lora_up.weight": up,
        f"{k}.alpha": torch.tensor(alpha),
        # no alpha: s = 1; LyCORIS DoRA (dora_scale (out, 1)): W' = dora_scale · (W+ΔW)/‖W+ΔW‖_row
        "lora_unet_double_blocks_0_img_attn_proj.lora_down.weight": d2,
        "lora_unet_double_blocks_0_img_attn_proj.lora_up.weight": u2,
        "lora_unet_double_blocks_0_img_attn_proj.dora_scale": dora,
    }
    merged = W + u2 @ d2
    dora_w = dora * merged / merged.norm(dim=1, keepdim=True)
    # the ecosystem convention: scale = alpha / rows of the stored down matrix (4r here)
    want = run_ours(
        merged_copy(
            model,
            {
                "single_blocks.1.linear1.weight": alpha / (4 * r) * up @ down,
                "double_blocks.0.img_attn.proj.weight": dora_w - W,
            },
        ),
        x,
    )
    L.load_lora(model, sd)
    assert max_err(run_ours(model, x), want) <= TOL
    L.fuse_lora(model)
    assert max_err(run_ours(model, x), want) <= TOL
    L.unload_lora(model)


# --- XLabs ----------------------------------------------------------------------------------------
def test_xlabs_against_diffusers():
    model = tiny_flux(6)
    x = make_inputs()
    g = torch.Generator().manual_seed(7)
    sd = {}
    for i in range(2):
        for name, (o, inp) in {
            "qkv_lora1": (3 * H, H),
            "proj_lora1": (H, H),
            "qkv_lora2": (3 * H, H),
            "proj_lora2": (H, H),
        }.items():
            sd[f"double_blocks.{i}.processor.{name}.down.weight"] = rand(g, 4, inp)
            sd[f"double_blocks.{i}.processor.{name}.up.weight"] = rand(g, o, 4)
        for name, (o, inp) in {"qkv_lora": (3 * H, H), "proj_lora": (H, 5 * H)}.items():
            sd[f"single_blocks.{i}.processor.{name}.down.weight"] = rand(g, 4, inp)
            sd[f"single_blocks.{i}.processor.{name}.up.weight"] = rand(g, o, 4)
    ref = diffusers_twin(model)
    conv, alphas = FluxPipeline.lora_state_dict(dict(sd), return_alphas=True)
    FluxPipeline.load_lora_into_transformer(conv, network_alphas=alphas, transformer=ref)
    got = L.load_lora(model, sd)
    assert got.format == "xlabs"
    assert max_err(run_ours(model, x), run_ref(ref, x)) <= TOL
    L.unload_lora(model)


# --- OneTrainer and LyCORIS (diffusers names, underscored) ---------------------------------------
def diffusers_modules(ref):
    return {
        n: (m.out_features, m.in_features)
        for n, m in ref.named_modules()
        if isinstance(m, torch.nn.Linear) and ("transformer_blocks" in n)
    }


def test_onetrainer_against_diffusers():
    model = tiny_flux(8)
    ref = diffusers_twin(model)
    x = make_inputs()
    g = torch.Generator().manual_seed(9)
    sd, same = {}, {}  # the OneTrainer file and the same tensors in diffusers' PEFT layout
    for n, (o, i) in diffusers_modules(ref).items():
        k = "lora_transformer_" + n.replace(".", "_")
        down, up = rand(g, 2, i), rand(g, o, 2)
        sd |= {f"{k}.lora_down.weight": down, f"{k}.lora_up.weight": up, f"{k}.alpha": torch.tensor(3.0)}
        same |= {
            f"transformer.{n}.lora_A.weight": down,
            f"transformer.{n}.lora_B.weight": up,
            f"transformer.{n}.alpha": torch.tensor(3.0),
        }
    # (diffusers' own OneTrainer converter rejects a tiny model's module set)
    conv, alphas = FluxPipeline.lora_state_dict(same, return_alphas=True)
    FluxPipeline.load_lora_into_transformer(conv, network_alphas=alphas, transformer=ref)
    got = L.load_lora(model, sd)
    assert got.format == "onetrainer"
    assert max_err(run_ours(model, x), run_ref(ref, x)) <= TOL
    L.unload_lora(model)


def test_lycoris_lokr_and_loha_formulas():
    """LyCORIS math: LoKr ΔW = s·kron(W1, W2), LoHa ΔW = s·(w1a@w1b)⊙(w2a@w2b), s = alpha / rank."""
    model = tiny_flux(10)
    x = make_inputs()
    g = torch.Generator().manual_seed(11)
    sd, deltas = {}, {}
    # to_q of double block 0: rows [0, H) of img_attn.qkv; W1 full (4, 8), W2 = w2_a @ w2_b (16, 8), rank 2
    w1, w2a, w2b = rand(g, 4, 8), rand(g, H // 4, 2), rand(g, 2, H // 8)
    k = "lycoris_transformer_blocks_0_attn_to_q"
    sd |= {f"{k}.lokr_w1": w1, f"{k}.lokr_w2_a": w2a, f"{k}.lokr_w2_b": w2b, f"{k}.alpha": torch.tensor(1.0)}
    add(
        deltas,
        "double_blocks.0.img_attn.qkv.weight",
        torch.cat([0.5 * torch.kron(w1, w2a @ w2b), torch.zeros(2 * H, H)]),
    )
    # both factors full: s = 1 whatever alpha says
    w1, w2 = rand(g, 2, 4), rand(g, H // 2, 5 * H // 4)
    k = "lycoris_single_transformer_blocks_1_proj_out"
    sd |= {f"{k}.lokr_w1": w1, f"{k}.lokr_w2": w2, f"{k}.alpha": torch.tensor(7.0)}
    add(deltas, "single_blocks.1.linear2.weight", torch.kron(w1, w2))
    # LoHa on the final adaLN (diffusers names: rows swapped into BFL order)
    a1, b1, a2, b2 = rand(g, 2 * H, 3), rand(g, 3, H), rand(g, 2 * H, 3), rand(g, 3, H)
    k = "lycoris_norm_out_linear"
    sd |= {
        f"{k}.hada_w1_a": a1,
        f"{k}.hada_w1_b": b1,
        f"{k}.hada_w2_a": a2,
        f"{k}.hada_w2_b": b2,
        f"{k}.alpha": torch.tensor(1.5),
    }
    d = 0.5 * (a1 @ b1) * (a2 @ b2)
    add(deltas, "final_layer.adaLN_modulation.1.weight", torch.cat([d[H:], d[:H]]))
    # kohya-named LoHa on a BFL module
    a1, b1, a2, b2 = rand(g, H, 2), rand(g, 2, 4 * H), rand(g, H, 2), rand(g, 2, 4 * H)
    want = run_ours(merged_copy(model, deltas), x)
    got = L.load_lora(model, sd)
    assert got.format == "lycoris"
    assert max_err(run_ours(model, x), want) <= TOL
    L.fuse_lora(model)
    assert max_err(run_ours(model, x), want) <= TOL
    L.unload_lora(model)

    kd = {
        "lora_unet_double_blocks_1_txt_mlp_2.hada_w1_a": a1,
        "lora_unet_double_blocks_1_txt_mlp_2.hada_w1_b": b1,
        "lora_unet_double_blocks_1_txt_mlp_2.hada_w2_a": a2,
        "lora_unet_double_blocks_1_txt_mlp_2.hada_w2_b": b2,
    }
    want = run_ours(merged_copy(model, {"double_blocks.1.txt_mlp.2.weight": (a1 @ b1) * (a2 @ b2)}), x)
    L.load_lora(model, kd)
    assert max_err(run_ours(model, x), want) <= TOL
    L.unload_lora(model)


# --- BFL control LoRA and ComfyUI ---------------------------------------------------------------
def control_lora(model, seed=12, r=4):
    g = torch.Generator().manual_seed(seed)
    sd, deltas, repl = {}, {}, {}
    for path, (o, i) in bfl_modules(model).items():
        i = 2 * i if path == "img_in" else i
        rr = min(r, o, i)
        down, up, b = rand(g, rr, i), rand(g, o, rr), rand(g, o, s=0.05)
        sd |= {f"{path}.lora_A.weight": down, f"{path}.lora_B.weight": up, f"{path}.lora_B.bias": b}
        add(deltas, path + ".weight", up @ down)
        add(deltas, path + ".bias", b)
    for name, p in model.named_parameters():
        if name.endswith("_norm.scale"):
            sd[name] = repl[name] = 1 + 0.3 * torch.randn(p.shape, generator=g)
    return sd, deltas, repl


def test_bfl_control_lora_widens_img_in_and_undoes():
    model = tiny_flux(13)
    snap = snapshot(model)
    sd, deltas, repl = control_lora(model)
    x = make_inputs(in_channels=128)
    want = run_ours(merged_copy(model, deltas, repl, config=PRESETS["tiny-canny"]), x)
    got = L.load_lora(model, sd)
    assert got.format == "bfl" and got.widened and len(got.replaced) == 12
    assert model.config.in_channels == 128 and model.in_channels == 128
    assert max_err(run_ours(model, x), want) <= TOL
    L.fuse_lora(model)
    assert max_err(run_ours(model, x), want) <= TOL
    L.unfuse_lora(model)
    L.disable_lora(model)  # base weights, zero columns for the control channels, original norms
    base = run_ours(tiny_flux(13), {**x, "img": x["img"][..., :64]})
    assert max_err(run_ours(model, x), base) <= TOL
    L.enable_lora(model)
    L.unload_lora(model)
    assert model.config.in_channels == 64 and model.img_in.in_features == 64
    sd_now = model.state_dict()
    assert all(torch.equal(sd_now[k], v) for k, v in snap.items()) and sd_now.keys() == snap.keys()


def test_comfyui_prefixed_names_and_full_deltas():
    model = tiny_flux(14)
    x = make_inputs()
    g = torch.Generator().manual_seed(15)
    d1, u1 = rand(g, 2, H), rand(g, 3 * H, 2)
    diff, diff_b = rand(g, H, 4 * H), rand(g, H)
    d3, u3 = rand(g, 3, H), rand(g, 7 * H, 3)
    sd = {
        "diffusion_model.double_blocks.0.txt_attn.qkv.lora_A.weight": d1,
        "diffusion_model.double_blocks.0.txt_attn.qkv.lora_B.weight": u1,
        "diffusion_model.double_blocks.1.img_mlp.2.diff": diff,
        "diffusion_model.double_blocks.1.img_mlp.2.diff_b": diff_b,
        "diffusion_model.single_blocks.0.linear1.lora_down.weight": d3,
        "diffusion_model.single_blocks.0.linear1.lora_up.weight": u3,
        "diffusion_model.single_blocks.0.linear1.alpha": torch.tensor(6.0),
    }
    want = run_ours(
        merged_copy(
            model,
            {
                "double_blocks.0.txt_attn.qkv.weight": 0.8 * u1 @ d1,
                "double_blocks.1.img_mlp.2.weight": 0.8 * diff,
                "double_blocks.1.img_mlp.2.bias": 0.8 * diff_b,
                "single_blocks.0.linear1.weight": 0.8 * 2.0 * u3 @ d3,
            },
        ),
        x,
    )
    got = L.load_lora(model, sd, weight=0.8)
    assert got.format == "comfyui"
    assert max_err(run_ours(model, x), want) <= TOL
    L.fuse_lora(model)
    assert max_err(run_ours(model, x), want) <= TOL
    L.unload_lora(model)


# --- full-size key sets on the meta device --------------------------------------------------------
@pytest.fixture(scope="module")
def full():
    with torch.device("meta"):
        return Flux(PRESETS["flux-dev"])


def meta_pair(o, i, r=1):
    return torch.empty(r, i, device="meta"), torch.empty(o, r, device="meta")


def full_files(model):
    H = 3072
    bfl = {
        n: (m.out_features, m.in_features) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)
    }
    files = {}
    sd = {}
    for p, (o, i) in bfl.items():
        a, b = meta_pair(o, i)
        k = "lora_unet_" + p.replace(".", "_")
        sd |= {f"{k}.lora_down.weight": a, f"{k}.lora_up.weight": b, f"{k}.alpha": torch.tensor(1.0)}
    files["kohya"] = sd
    ref_names = {}
    with torch.device("meta"):
        ref = diffusers.FluxTransformer2DModel(guidance_embeds=True)
    ref_names = {
        n: (m.out_features, m.in_features) for n, m in ref.named_modules() if isinstance(m, torch.nn.Linear)
    }
    files["diffusers/peft"] = {
        k: v
        for n, (o, i) in ref_names.items()
        for k, v in zip((f"transformer.{n}.lora_A.weight", f"transformer.{n}.lora_B.weight"), meta_pair(o, i))
    }
    files["onetrainer"] = {
        k: v
        for n, (o, i) in ref_names.items()
        for k, v in zip(
            (
                f"lora_transformer_{n.replace('.', '_')}.lora_down.weight",
                f"lora_transformer_{n.replace('.', '_')}.lora_up.weight",
            ),
            meta_pair(o, i),
        )
    }
    files["lycoris"] = {
        f"lycoris_{n.replace('.', '_')}.{t}": torch.empty(s, device="meta")
        for n, (o, i) in ref_names.items()
        for t, s in (
            ("lokr_w1", (o // 16 if o % 16 == 0 else o, 8)),
            ("lokr_w2", (16 if o % 16 == 0 else 1, i // 8)),
        )
    }
    files["comfyui"] = {
        f"diffusion_model.{p}.{s}": t
        for p, (o, i) in bfl.items()
        for s, t in zip(("lora_A.weight", "lora_B.weight"), meta_pair(o, i))
    }
    files["bfl"] = {
        f"{p}.{s}": t
        for p, (o, i) in bfl.items()
        for s, t in zip(("lora_A.weight", "lora_B.weight"), meta_pair(o, 128 if p == "img_in" else i))
    }
    files["bfl"] |= {
        n: torch.empty(p.shape, device="meta")
        for n, p in model.named_parameters()
        if n.endswith("_norm.scale")
    }
    xl = {}
    for i in range(19):
        for n, (o, inp) in {
            "qkv_lora1": (3 * H, H),
            "proj_lora1": (H, H),
            "qkv_lora2": (3 * H, H),
            "proj_lora2": (H, H),
        }.items():
            xl |= dict(
                zip(
                    (
                        f"double_blocks.{i}.processor.{n}.down.weight",
                        f"double_blocks.{i}.processor.{n}.up.weight",
                    ),
                    meta_pair(o, inp),
                )
            )
    for i in range(38):
        for n, (o, inp) in {"qkv_lora": (3 * H, H), "proj_lora": (H, 5 * H)}.items():
            xl |= dict(
                zip(
                    (
                        f"single_blocks.{i}.processor.{n}.down.weight",
                        f"single_blocks.{i}.processor.{n}.up.weight",
                    ),
                    meta_pair(o, inp),
                )
            )
    files["xlabs"] = xl
    return files, bfl


@pytest.mark.parametrize(
    "fmt", ["kohya", "diffusers/peft", "onetrainer", "lycoris", "comfyui", "bfl", "xlabs"]
)
def test_full_size_key_sets_map_completely(full, fmt):
    files, bfl = full_files(full)
    sd = files[fmt]
    name, patches = L.plan_lora(full, sd)
    assert name == fmt
    used = {p.target for p in patches if p.kind != "replace"}
    if fmt in ("xlabs",):
        assert len(used) == 19 * 4 + 38 * 2
    else:
        assert used == set(bfl), sorted(set(bfl) ^ used)[:10]
    # every q/k/v/mlp row slice lands where the key map says
    if fmt == "diffusers/peft":
        rows = {(p.target, p.rows) for p in patches if p.rows}
        assert ("single_blocks.37.linear1", (9216, 12288)) in rows
        assert ("double_blocks.18.txt_attn.qkv", (3072, 3072)) in rows


# --- errors -------------------------------------------------------------------------------------------
def test_errors_name_the_key():
    model = tiny_flux(16)
    g = torch.Generator().manual_seed(0)
    ok = {
        "lora_unet_double_blocks_0_img_attn_proj.lora_down.weight": rand(g, 2, H),
        "lora_unet_double_blocks_0_img_attn_proj.lora_up.weight": rand(g, H, 2),
    }
    cases = {
        "not a LoRA": ({"model.weight": torch.zeros(2, 2)}, "not a LoRA file"),
        "empty": ({}, "no tensors"),
        "unknown module": (
            ok
            | {
                "lora_unet_double_blocks_7_img_attn_proj.lora_down.weight": rand(g, 2, H),
                "lora_unet_double_blocks_7_img_attn_proj.lora_up.weight": rand(g, H, 2),
            },
            "double_blocks_7_img_attn_proj",
        ),
        "wrong in": (
            {
                "lora_unet_double_blocks_0_img_attn_proj.lora_down.weight": rand(g, 2, H + 1),
                "lora_unet_double_blocks_0_img_attn_proj.lora_up.weight": rand(g, H, 2),
            },
            "has 64 input features; found 65",
        ),
        "wrong out": (
            {
                "transformer.transformer_blocks.0.attn.to_k.lora_A.weight": rand(g, 2, H),
                "transformer.transformer_blocks.0.attn.to_k.lora_B.weight": rand(g, 2 * H, 2),
            },
            r"rows \[64, 128\) of 192: expected 64 output rows, found 128",
        ),
        "rank mismatch": (
            {
                "lora_unet_double_blocks_0_img_attn_proj.lora_down.weight": rand(g, 2, H),
                "lora_unet_double_blocks_0_img_attn_proj.lora_up.weight": rand(g, H, 3),
            },
            "rank 2",
        ),
        "down without up": (
            {"lora_unet_double_blocks_0_img_attn_proj.lora_down.weight": rand(g, 2, H)},
            "lacks",
        ),
        "stray key": (ok | {"lora_unet_double_blocks_0_img_attn_proj.something": rand(g, 2)}, "something"),
        "mixed": (
            ok
            | {
                "transformer.proj_out.lora_A.weight": rand(g, 2, H),
                "transformer.proj_out.lora_B.weight": rand(g, 64, 2),
            },
            "mixes LoRA formats",
        ),
        "unknown diffusers": (
            {
                "transformer.transformer_blocks.0.attn.to_zz.lora_A.weight": rand(g, 2, H),
                "transformer.transformer_blocks.0.attn.to_zz.lora_B.weight": rand(g, H, 2),
            },
            "to_zz",
        ),
        "bad norm": ({"double_blocks.0.img_attn.norm.query_norm.scale": torch.ones(5)}, "query_norm.scale"),
        "conv": (
            ok | {"lora_unet_double_blocks_0_img_attn_proj.lora_mid.weight": rand(g, 2, 2)},
            "convolution",
        ),
    }
    snap = snapshot(model)
    for case, (sd, match) in cases.items():
        with pytest.raises(L.LoraError, match=match):
            L.load_lora(model, sd)
        assert not any(isinstance(m, L.LoraLinear) for m in model.modules()), case
    assert all(torch.equal(model.state_dict()[k], v) for k, v in snap.items())
    L.load_lora(model, ok, adapter_name="a")
    with pytest.raises(L.LoraError, match="already"):
        L.load_lora(model, ok, adapter_name="a")
    with pytest.raises(L.LoraError, match="no adapters named"):
        L.set_adapters(model, ["zz"])
    with pytest.raises(L.LoraError, match="prepare_hotswap"):
        L.load_lora(model, ok, adapter_name="a", hotswap=True)
    L.unload_lora(model)
    assert isinstance(L.LoraError("x"), __import__("fluxcore").FluxcoreError)


def test_safetensors_file_and_describe(tmp_path):
    from safetensors.torch import save_file

    model = tiny_flux(17)
    sd, deltas = kohya_file(model, seed=18, single=False)
    save_file(sd, tmp_path / "k.safetensors", metadata={"ss_network_dim": "3"})
    info = L.describe_lora(tmp_path / "k.safetensors")
    assert info["format"] == "kohya" and info["ranks"] == [3] and info["components"] == ["transformer"]
    x = make_inputs()
    L.load_lora(model, tmp_path / "k.safetensors")
    assert max_err(run_ours(model, x), run_ours(merged_copy(model, deltas), x)) <= TOL
    L.unload_lora(model)
    (tmp_path / "bad.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(Exception, match="bad.safetensors"):
        L.load_lora(model, tmp_path / "bad.safetensors")
    copy.deepcopy  # noqa: B018


def test_one_file_for_transformer_clip_and_t5():
    from fluxcore.text.clip import CLIP_PRESETS, CLIPTextEncoder
    from fluxcore.text.t5 import T5_PRESETS, T5Encoder

    model, clip, t5 = tiny_flux(19), CLIPTextEncoder(CLIP_PRESETS["tiny"]), T5Encoder(T5_PRESETS["tiny"])
    g = torch.Generator().manual_seed(20)
    sd = {}
    for k, (o, i) in {
        "lora_unet_double_blocks_0_img_attn_proj": (H, H),
        "lora_te1_text_model_encoder_layers_1_mlp_fc2": (32, 64),
        "lora_te3_encoder_block_1_layer_1_DenseReluDense_wo": (32, 64),
    }.items():
        sd |= {f"{k}.lora_down.weight": rand(g, 2, i), f"{k}.lora_up.weight": rand(g, o, 2)}
    with pytest.raises(L.LoraError, match=r"parts for \['t5'\]"):
        L.load_lora_components({"transformer": model, "clip": clip, "t5": None}, sd)
    got = L.load_lora_components({"transformer": model, "clip": clip, "t5": t5}, sd, weight=0.5)
    assert {c: a.targets for c, a in got.items()} == {
        "transformer": ["double_blocks.0.img_attn.proj"],
        "clip": ["text_model.encoder.layers.1.mlp.fc2"],
        "t5": ["encoder.block.1.layer.1.DenseReluDense.wo"],
    }
    assert got["transformer"] == got["clip"] == got["t5"] == "default_0"
    assert got["transformer"].skipped == {"clip": 1, "t5": 1}
    for m in (model, clip, t5):
        assert L.get_active_adapters(m) == ["default_0"]
        L.unload_lora(m)
