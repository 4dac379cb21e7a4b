"""The transform seam: blocks have one forward, fused kernels are a module swap that honours every
module a user replaced, and the swapping examples give the swap on every backend.

Without CUDA, conftest sets TRITON_INTERPRET=1, so the fused modules run their Triton kernels in
the interpreter on CPU tensors (float32).
"""

import re
from pathlib import Path

import pytest
import torch
from torch import nn

from fluxcore import PRESETS, Flux, attention_backend, set_attention_backend
from fluxcore.attention import _REGISTRY
from fluxcore.layers import AdaLayerNorm, GatedResidual, ParallelJoin, QKNorm, RMSNorm, SingleStreamBlock
from fluxcore.transforms import exact_modules, replace_module

K = pytest.importorskip("fluxcore.kernels")
from fluxcore.kernels import transform as KT  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")
DOCS = Path(__file__).resolve().parent.parent / "docs"
PLAIN = (AdaLayerNorm, QKNorm, GatedResidual, ParallelJoin)


def tiny(seed=0, name="tiny-dev"):
    torch.manual_seed(seed)
    model = Flux(PRESETS[name]).eval()
    with torch.no_grad():  # move norm scales and biases off their trivial initial values
        for p in model.parameters():
            p.add_(0.2 * torch.randn_like(p))
    return model


def inputs(model, b=2, n_img=15, n_txt=7):
    c = model.config
    g = torch.Generator().manual_seed(1)
    grid = torch.stack([torch.zeros(n_img), torch.arange(n_img) // 5, torch.arange(n_img) % 5], -1)
    return dict(
        img=torch.randn(b, n_img, c.in_channels, generator=g),
        img_ids=grid[None].expand(b, -1, -1),
        txt=torch.randn(b, n_txt, c.context_in_dim, generator=g),
        txt_ids=torch.zeros(b, n_txt, 3),
        timesteps=torch.tensor([0.3, 0.9])[:b],
        y=torch.randn(b, c.vec_in_dim, generator=g),
        guidance=torch.tensor([3.5, 1.0])[:b],
    )


def run(model, x, backend):
    with torch.no_grad(), attention_backend(backend):
        return model(**x)


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


class SquaredReLU(nn.Module):
    def forward(self, x):
        return torch.relu(x) ** 2


class L2Norm(RMSNorm):
    def forward(self, x):
        return nn.functional.normalize(x.float(), dim=-1).to(x.dtype) * self.scale


def swap(model):
    """A swapped MLP activation in every single block and swapped QK-norms in double block 0."""
    for block in model.single_blocks:
        block.mlp_act = SquaredReLU()
    norm = model.double_blocks[0].img_attn.norm
    for name in ("query_norm", "key_norm"):
        l2 = L2Norm(model.config.head_dim)
        l2.load_state_dict(getattr(norm, name).state_dict())
        setattr(norm, name, l2)
    return model


def test_swapped_model_after_kernels_apply_equals_its_eager_output():
    plain, swapped = tiny(), swap(tiny())
    x = inputs(plain)
    ref_plain, ref_swapped = run(plain, x, "eager"), run(swapped, x, "eager")
    assert rel(ref_swapped, ref_plain) > 1e-2  # the swap changes the output

    replaced = K.apply(swapped)
    assert "double_blocks.0.img_attn.norm" not in replaced  # holds swapped norms: left alone
    assert "double_blocks.0.txt_attn.norm" in replaced and "single_blocks.0.join" in replaced
    for backend in ("triton", "sdpa", "eager"):
        out = run(swapped, x, backend)
        assert rel(out, ref_swapped) <= 1e-5, backend
        assert rel(out, ref_plain) > 1e-2

    K.apply(plain)
    assert rel(run(plain, x, "triton"), ref_plain) <= 1e-5


def test_apply_replaces_only_exact_types_keeps_keys_and_params_and_undoes():
    model = tiny()
    keys, params = list(model.state_dict()), dict(model.named_parameters())

    class MyResidual(GatedResidual):  # a user's subclass: never replaced
        def forward(self, x, gate, y):
            return x + 0.5 * gate * y

    model.single_blocks[1].residual = MyResidual()
    replaced = K.apply(model)
    c = model.config
    assert len(replaced) == 7 * c.depth + 4 * c.depth_single_blocks + 1 - 1
    assert "single_blocks.1.residual" not in replaced
    assert type(model.single_blocks[1].residual) is MyResidual
    assert exact_modules(model, *PLAIN) == []  # every plain module of an exact type is fused
    assert list(model.state_dict()) == keys  # official keys under the transform
    assert all(a is params[n] for n, a in model.named_parameters())  # the same parameter objects
    assert K.apply(model) == []  # twice is a no-op

    restored = K.remove(model)
    assert sorted(restored) == sorted(replaced)
    assert {type(m) for _, m in exact_modules(model, *PLAIN)} == set(PLAIN)
    assert len(exact_modules(model, *PLAIN)) == len(replaced)
    assert not exact_modules(model, *KT.FUSED.values())
    assert all(a is params[n] for n, a in model.named_parameters())


def test_module_swapped_in_after_apply_is_honoured():
    model = tiny()
    x = inputs(model)
    K.apply(model)
    for block in model.single_blocks:
        block.mlp_act = SquaredReLU()  # replaces nothing fused: the join checks the activation
    model.double_blocks[1].img_norm1 = AdaLayerNorm(model.config.hidden_size, eps=1e-2)
    ref = tiny()  # same seed, same weights, the same swaps, never transformed
    for block in ref.single_blocks:
        block.mlp_act = SquaredReLU()
    ref.double_blocks[1].img_norm1 = AdaLayerNorm(model.config.hidden_size, eps=1e-2)
    assert rel(run(model, x, "triton"), run(ref, x, "eager")) <= 1e-5


def test_fused_modules_fall_back_for_training_and_match_gradients():
    """Kernels are forward-only: with gradients the twins run the plain math, so training a
    transformed model gives the plain model's gradients."""
    a, b = tiny(), tiny()
    K.apply(b)
    x = inputs(a)
    grads = []
    for model in (a, b):
        model.zero_grad()
        with attention_backend("sdpa"):
            model(**x).square().mean().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    for name, g in grads[0].items():
        torch.testing.assert_close(grads[1][name], g, rtol=1e-5, atol=1e-7, msg=name)


def test_fused_twins_run_the_kernels_when_they_can(monkeypatch):
    """Guard against a twin that silently always falls back: count kernel calls."""
    calls = []
    for name in ("adaln_modulate", "qk_norm_rope", "gated_residual", "gelu_concat"):
        original = getattr(KT, name)
        monkeypatch.setattr(KT, name, lambda *a, _o=original, _n=name, **k: calls.append(_n) or _o(*a, **k))
    model = tiny(name="tiny-schnell")
    K.apply(model)
    x = inputs(model)
    x.pop("guidance")
    run(model, x, "sdpa")
    c = model.config
    assert calls.count("qk_norm_rope") == 2 * c.depth + c.depth_single_blocks
    assert calls.count("adaln_modulate") == 4 * c.depth + c.depth_single_blocks + 1
    assert calls.count("gated_residual") == 4 * c.depth + c.depth_single_blocks
    assert calls.count("gelu_concat") == c.depth_single_blocks


def test_blocks_are_built_from_the_config():
    """A replacement block reads its own hyper-parameters from a config subclass."""
    from dataclasses import dataclass

    from fluxcore.config import FluxConfig

    @dataclass(frozen=True)
    class WideConfig(FluxConfig):
        join_scale: float = 0.5

    class ScaledJoinBlock(SingleStreamBlock):
        def __init__(self, config):
            super().__init__(config)
            self.join_scale = config.join_scale

    class MyFlux(Flux):
        single_block = ScaledJoinBlock

    config = WideConfig(**{f: getattr(PRESETS["tiny-dev"], f) for f in PRESETS["tiny-dev"].__dataclass_fields__})
    model = MyFlux(config)
    assert all(b.join_scale == 0.5 for b in model.single_blocks)
    model.load_state_dict(Flux(PRESETS["tiny-dev"]).state_dict(), strict=True)


def test_replace_module_returns_the_old_one():
    model = tiny()
    new = GatedResidual()
    old = replace_module(model, "single_blocks.0.residual", new)
    assert model.single_blocks[0].residual is new and type(old) is GatedResidual and old is not new


@pytest.mark.parametrize("backend", ["eager", "sdpa", "triton"])
def test_swapping_examples_give_the_swap_on_every_backend(backend):
    """docs/swapping.md runs start to finish with the backend set globally; its own assertions
    check that each swap changes the output and survives the kernel transform."""
    blocks = re.findall(r"```python\n(.*?)```", (DOCS / "swapping.md").read_text(), flags=re.S)
    before = set(_REGISTRY)
    set_attention_backend(backend)
    try:
        namespace: dict = {}
        for i, code in enumerate(blocks):
            exec(compile(code, f"swapping.md[block {i}]", "exec"), namespace)
    finally:
        set_attention_backend(None)
        for name in set(_REGISTRY) - before:
            _REGISTRY.pop(name)
