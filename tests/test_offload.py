"""Offload hooks on the CPU (synchronous copies): outputs bit-exact, and the weights live in
their host copies between calls and in distinct onloaded copies while their group runs."""

import pytest
import torch

from fluxcore import PRESETS, Flux
from fluxcore.offload import enable_group_offload, enable_sequential_cpu_offload, remove


def inputs():
    g = torch.Generator().manual_seed(1)
    return dict(img=torch.randn(2, 12, 64, generator=g), img_ids=torch.rand(2, 12, 3, generator=g) * 4,
                txt=torch.randn(2, 5, 48, generator=g), txt_ids=torch.zeros(2, 5, 3),
                timesteps=torch.full((2,), 0.7), y=torch.randn(2, 32, generator=g), guidance=torch.full((2,), 3.5))  # fmt: skip


@pytest.mark.parametrize("kind", ["block_level", "block_level_2", "leaf_level", "sequential"])
@torch.no_grad()
def test_offload_exact_and_where_weights_live(kind):
    torch.manual_seed(0)
    model = Flux(PRESETS["tiny-dev"]).eval()
    x = inputs()
    want = model(**x)
    params = dict(model.named_parameters())
    if kind == "sequential":
        h = enable_sequential_cpu_offload(model, "cpu")
    else:
        h = enable_group_offload(
            model, "cpu", offload_type=kind[:11], num_blocks_per_group=2 if kind.endswith("_2") else 1
        )
    host = {n: p.data_ptr() for n, p in model.named_parameters()}
    seen = {}
    probe = model.single_blocks[1].linear1

    def spy(mod, args):
        seen["during"] = probe.weight.data_ptr()
        seen["other_group"] = model.double_blocks[0].img_attn.qkv.weight.data_ptr()

    hook = probe.register_forward_pre_hook(spy)
    got = model(**x)
    hook.remove()
    assert torch.equal(got, want)
    assert seen["during"] != host["single_blocks.1.linear1.weight"]  # onloaded copy while it runs
    assert seen["other_group"] == host["double_blocks.0.img_attn.qkv.weight"]  # others stay home
    assert {n: p.data_ptr() for n, p in model.named_parameters()} == host  # back home after the call
    assert dict(model.named_parameters()) == params  # the same Parameter objects
    if kind == "block_level_2":
        assert h.groups[0] == ["double_blocks.0", "double_blocks.1"]
    remove(model)
    assert torch.equal(model(**x), want)
    assert not model._forward_pre_hooks and not model.single_blocks[1]._forward_pre_hooks


@torch.no_grad()
def test_t5_block_offload():
    """Nested block lists (T5's encoder.block) are found too; the output is bit-exact."""
    from fluxcore.text import T5Config, T5Encoder

    torch.manual_seed(0)
    t5 = T5Encoder(T5Config(vocab_size=64, d_model=32, d_kv=8, d_ff=48, num_layers=3, num_heads=4)).eval()
    ids = torch.randint(0, 64, (2, 9))
    want = t5(ids)
    h = enable_group_offload(t5, "cpu", num_blocks_per_group=2)
    assert h.groups == [["encoder.block.0", "encoder.block.1"], ["encoder.block.2"], ["<rest>"]]
    assert torch.equal(t5(ids), want)
    h.remove()
