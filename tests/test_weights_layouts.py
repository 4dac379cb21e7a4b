"""Checkpoint layouts: adding one is one file (here: one class in this file), and the built-in ones
plan every BFL key exactly once, on the full-size key sets.

Oracles: diffusers' own FluxTransformer2DModel (its state-dict keys and shapes, built on the meta
device at full size), and loading the same weights from the official BFL layout.
"""

import collections
import re
from pathlib import Path

import pytest
import torch

from fluxcore import PRESETS, Flux, load_flux, save_flux
from fluxcore.errors import ConfigError
from fluxcore.weights import (
    LAYOUTS,
    KeyMismatchError,
    Plan,
    bfl_to_diffusers,
    diffusers_to_bfl,
    inspect_flux,
    register_layout,
    write_safetensors,
)
from fluxcore.weights.flux_config import diffusers_config
from fluxcore.weights.layouts import SWAP_HALVES, bfl, detect_layout, diffusers
from fluxcore.weights.layouts.base import convert, plan_shapes

FULL = ["flux-dev", "flux-schnell"]


def tiny(name="tiny-dev", seed=0):
    torch.manual_seed(seed)
    model = Flux(PRESETS[name]).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():  # every tensor distinct, so a mis-mapped one shows
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return model


def meta_state(preset):
    with torch.device("meta"):
        return Flux(PRESETS[preset]).state_dict()


def same_state(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def run(model):
    cfg = model.config
    g = torch.Generator().manual_seed(1)
    img_ids = torch.stack(
        torch.meshgrid(torch.zeros(1), torch.arange(3.0), torch.arange(4.0), indexing="ij"), -1
    )
    with torch.no_grad():
        return model(
            torch.randn(1, 12, cfg.in_channels, generator=g),
            img_ids.reshape(1, 12, 3),
            torch.randn(1, 5, cfg.context_in_dim, generator=g),
            torch.zeros(1, 5, 3),
            torch.rand(1, generator=g),
            torch.randn(1, cfg.vec_in_dim, generator=g),
            torch.tensor([3.5]) if cfg.guidance_embed else None,
        )


# --- a new layout is one file ---------------------------------------------------------------------


class CommunityLayout:
    """A made-up community layout: every key under `net.`, and the final adaLN renamed to
    `head.ada` and stored (scale, shift) like diffusers does. Everything else is BFL, so the
    built-in BFL layout also claims these files (with `net.` as its prefix); being registered
    later, this one is asked first."""

    name = "community-test"
    PREFIX = "net."
    RENAMED = {
        "final_layer.adaLN_modulation.1.weight": "head.ada.weight",
        "final_layer.adaLN_modulation.1.bias": "head.ada.bias",
    }

    def detect(self, keys):
        return self.PREFIX if self.PREFIX + "head.ada.weight" in keys else None

    def plan(self, keys, prefix=""):
        to_bfl = {v: k for k, v in self.RENAMED.items()}
        plans = {}
        for key in keys:
            rest = key[len(prefix) :]
            if rest in to_bfl:
                plans[to_bfl[rest]] = Plan((key,), SWAP_HALVES)
            else:
                plans[rest] = Plan((key,))
        return plans

    def export(self, state_dict):
        return {
            self.PREFIX + self.RENAMED.get(k, k): SWAP_HALVES.inverse(t) if k in self.RENAMED else t
            for k, t in state_dict.items()
        }


@pytest.fixture
def community():
    saved = dict(LAYOUTS)
    layout = register_layout(CommunityLayout())
    yield layout
    LAYOUTS.clear()
    LAYOUTS.update(saved)


def test_registered_layout_is_detected_loaded_and_saved(tmp_path, community):
    model = tiny()
    save_flux(model, tmp_path / "flux.safetensors")  # the official layout, for comparison
    write_safetensors(tmp_path / "community.safetensors", community.export(model.state_dict()))

    assert list(LAYOUTS)[0] == "community-test"
    fc = inspect_flux(tmp_path / "community.safetensors")
    fc.checkpoint.close()
    assert (fc.layout, fc.prefix) == ("community-test", "net.")
    assert fc.plans["final_layer.adaLN_modulation.1.bias"] == Plan(("net.head.ada.bias",), SWAP_HALVES)

    reference = load_flux(tmp_path / "flux.safetensors")
    loaded = load_flux(tmp_path / "community.safetensors")
    assert same_state(loaded, reference) and same_state(loaded, model)
    assert torch.equal(run(loaded), run(reference))

    # save_flux writes any registered layout that can export, and it reads back the same
    save_flux(model, tmp_path / "again.safetensors", format="community-test")
    assert same_state(load_flux(tmp_path / "again.safetensors"), model)


def test_register_layout_refuses_what_is_not_a_layout():
    before = list(LAYOUTS)
    with pytest.raises(ConfigError, match="has no name, detect, plan"):
        register_layout(object())
    assert list(LAYOUTS) == before
    # built-ins: the quantized layouts (marker keys of their own) first, then BFL before diffusers
    assert before == ["gguf", "nf4", "scaled_fp8", "bfl", "diffusers"]


def test_without_the_layout_the_same_file_is_bfl_with_an_unknown_key(tmp_path):
    model = tiny()
    write_safetensors(tmp_path / "community.safetensors", CommunityLayout().export(model.state_dict()))
    assert "community-test" not in LAYOUTS
    with pytest.raises(KeyMismatchError, match=r"unexpected key.*'head.ada"):
        load_flux(tmp_path / "community.safetensors")


# --- the built-in layouts on full-size key sets ---------------------------------------------------


def covers_once(plans, source_keys):
    used = collections.Counter(k for p in plans.values() for k in p.sources)
    return set(used) == set(source_keys) and set(used.values()) == {1}


@pytest.mark.parametrize("preset", FULL)
def test_bfl_layout_detects_and_plans_every_key_once(preset):
    sd = meta_state(preset)
    shapes = {k: tuple(v.shape) for k, v in sd.items()}
    assert len(shapes) == {"flux-dev": 780, "flux-schnell": 776}[preset]
    assert bfl.detect(shapes) == "" and diffusers.detect(shapes) is None
    assert detect_layout(shapes)[0] is bfl
    plans = bfl.plan(shapes)
    assert set(plans) == set(shapes) and covers_once(plans, shapes)
    assert all(p.transform is None and p.sources == (k,) for k, p in plans.items())
    assert plan_shapes(plans, shapes.__getitem__) == shapes
    # community/ComfyUI files: the same keys under a prefix, beside other models' keys
    for prefix in ("model.diffusion_model.", "diffusion_model."):
        keys = {prefix + k for k in shapes} | {"first_stage_model.encoder.conv_in.weight"}
        assert bfl.detect(keys) == prefix
        plans = bfl.plan([k for k in keys if k.startswith(prefix)], prefix)
        assert set(plans) == set(shapes) and covers_once(plans, {prefix + k for k in shapes})


@pytest.mark.parametrize("preset", FULL)
def test_diffusers_layout_matches_diffusers_and_plans_every_key_once(preset):
    dm = pytest.importorskip("diffusers")
    sd = meta_state(preset)
    shapes = {k: tuple(v.shape) for k, v in sd.items()}
    exported = diffusers.export(sd)
    cfg = {k: v for k, v in diffusers_config(PRESETS[preset]).items() if not k.startswith("_")}
    with torch.device("meta"):
        ref = dm.FluxTransformer2DModel(**cfg).state_dict()
    assert {k: tuple(v.shape) for k, v in exported.items()} == {k: tuple(v.shape) for k, v in ref.items()}

    dshapes = {k: tuple(v.shape) for k, v in ref.items()}
    assert diffusers.detect(dshapes) == "" and bfl.detect(dshapes) is None
    assert detect_layout(dshapes)[0] is diffusers
    plans = diffusers.plan(dshapes)
    assert set(plans) == set(shapes) and covers_once(plans, dshapes)
    assert plan_shapes(plans, dshapes.__getitem__) == shapes
    blocks = collections.Counter(len(p.sources) for p in plans.values())
    depth, single = PRESETS[preset].depth, PRESETS[preset].depth_single_blocks
    assert blocks[3] == 2 * 2 * depth and blocks[4] == 2 * single  # qkv (img, txt; w, b), linear1 (w, b)
    swapped = sorted(k for k, p in plans.items() if p.transform is SWAP_HALVES)
    assert swapped == ["final_layer.adaLN_modulation.1.bias", "final_layer.adaLN_modulation.1.weight"]
    assert plans["single_blocks.7.linear1.weight"].sources == tuple(
        f"single_transformer_blocks.7.{p}.weight" for p in ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp")
    )
    prefixed = {"transformer." + k for k in dshapes}
    assert diffusers.detect(prefixed) == "transformer."
    assert set(diffusers.plan(prefixed, "transformer.")) == set(shapes)


def test_in_memory_conversion_reads_the_same_plan():
    sd = tiny("tiny-schnell").state_dict()
    dsd = bfl_to_diffusers(sd)
    back = diffusers_to_bfl(dsd)
    assert back.keys() == sd.keys() and all(torch.equal(back[k], sd[k]) for k in sd)
    via_plan = convert(diffusers.plan(dsd), dsd)
    assert all(torch.equal(via_plan[k], sd[k]) for k in sd)
    half = sd["final_layer.adaLN_modulation.1.weight"].shape[0] // 2
    assert torch.equal(
        dsd["norm_out.linear.weight"][:half], sd["final_layer.adaLN_modulation.1.weight"][half:]
    )


def test_diffusers_plan_errors_name_the_key(tmp_path):
    dsd = bfl_to_diffusers(tiny().state_dict())
    with pytest.raises(
        KeyError, match="not a diffusers FLUX transformer key: 'transformer_blocks.0.attn.to_x"
    ):
        diffusers.plan([*dsd, "transformer_blocks.0.attn.to_x.weight"])
    partial = {k: v for k, v in dsd.items() if k != "transformer_blocks.1.attn.add_v_proj.bias"}
    with pytest.raises(KeyError, match=r"txt_attn.qkv.bias.*add_v_proj.bias'\] are missing"):
        diffusers.plan(partial)
    folder = tmp_path / "transformer"
    folder.mkdir()
    write_safetensors(folder / "diffusion_pytorch_model.safetensors", partial)
    with pytest.raises(KeyMismatchError, match=r"diffusion_pytorch_model.safetensors: cannot rebuild"):
        load_flux(folder)
    bad = {**dsd, "transformer_blocks.0.attn.to_k.weight": torch.zeros(16, 3)}
    write_safetensors(folder / "diffusion_pytorch_model.safetensors", bad)
    with pytest.raises(KeyMismatchError, match=r"pieces of 'double_blocks.0.img_attn.qkv.weight' do not fit"):
        load_flux(folder)


def test_one_safetensors_stack():
    """Every read and write of safetensors in fluxcore goes through fluxcore.weights.io: no module
    imports the safetensors package."""
    root = Path(__file__).resolve().parents[1] / "fluxcore"
    pattern = re.compile(r"^\s*(from|import)\s+safetensors\b", flags=re.MULTILINE)
    offenders = [str(p.relative_to(root)) for p in root.rglob("*.py") if pattern.search(p.read_text("utf-8"))]
    assert offenders == []
