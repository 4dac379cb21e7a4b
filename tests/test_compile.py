"""Regional compilation (fluxcore.compile_blocks) on CPU, with a backend that counts the graphs it
is handed (every trace is one call; the traced graphs then run, so outputs are checked too).
Inductor itself is exercised by benchmarks/compile.py (a C++ build per graph is too slow here).

- One graph per block class (2 for FLUX), then none: across steps, image sizes, prompt lengths,
  and with a step cache applied and removed.
- Outputs match eager; state-dict keys are unchanged; `remove` restores eager calls; a second
  `compile_blocks` compiles nothing; a block swapped in later runs eagerly; compiling after a
  step cache was applied works (the cache's decisions stay outside the graphs).
- LoRA: loading one changes the blocks it wraps (one new graph per new block structure); after
  `prepare_hotswap`, swapping in another LoRA and changing strengths recompile nothing, and the
  compiled outputs follow the swapped weights.
- CUDA-graph modes are refused on CPU with a reason.
"""

import pytest
import torch

import fluxcore
import fluxcore.cache
import fluxcore.compile
from fluxcore import PRESETS, Flux
from fluxcore import lora as L
from fluxcore.errors import FluxcoreError


@pytest.fixture
def model():
    torch._dynamo.reset()
    torch.manual_seed(0)
    yield Flux(PRESETS["tiny-dev"]).eval()
    torch._dynamo.reset()


def inputs(model, batch, h, w, txt_len, t=0.5):
    cfg = model.config
    L = h * w
    ids = torch.zeros(batch, L, 3)
    ids[..., 1] = torch.arange(L) // w
    ids[..., 2] = torch.arange(L) % w
    return (
        torch.randn(batch, L, cfg.in_channels),
        ids,
        torch.randn(batch, txt_len, cfg.context_in_dim),
        torch.zeros(batch, txt_len, 3),
        torch.full((batch,), t),
        torch.randn(batch, cfg.vec_in_dim),
        torch.full((batch,), 3.5),
    )


class Counting:
    def __init__(self):
        self.graphs = 0

    def __call__(self, gm, example_inputs):
        self.graphs += 1
        return gm.forward


def test_one_graph_per_block_class_and_no_recompiles(model):
    backend = Counting()
    keys = list(model.state_dict())
    a = inputs(model, 1, 4, 4, 7)
    with torch.no_grad():
        ref = model(*a)
        paths = fluxcore.compile_blocks(model, backend=backend)
        assert paths == ["double_blocks.0", "double_blocks.1", "single_blocks.0", "single_blocks.1"]
        assert list(model.state_dict()) == keys
        assert fluxcore.compile_blocks(model, backend=backend) == []  # already compiled
        torch.testing.assert_close(model(*a), ref, rtol=1e-5, atol=1e-5)
        assert backend.graphs == 2  # DoubleStreamBlock and SingleStreamBlock, shared by every instance
        for h, w, txt_len in [
            (4, 6, 9),
            (8, 8, 7),
            (3, 5, 20),
            (6, 2, 2),
        ]:  # sizes, prompt lengths (≥ 2: dynamo specialises 0 and 1)
            eager_free = inputs(model, 1, h, w, txt_len)
            model(*eager_free)
        for t in (1.0, 0.7, 0.2):  # steps
            model(*inputs(model, 1, 4, 4, 7, t))
        handle = fluxcore.cache.apply(model, "first_block", threshold=0.5)  # cache on: decisions stay eager
        b = list(a)
        for t in (1.0, 0.9, 0.8, 0.7):
            b[4] = torch.full((1,), t)
            model(*b)
        assert handle.stats.skipped > 0
        handle.remove()
        model(*a)  # cache off again
        assert backend.graphs == 2
    assert fluxcore.compile.remove(model) == paths
    assert fluxcore.compile.compiled_blocks(model) == []
    assert all(b._compiled_call_impl is None for b in [*model.double_blocks, *model.single_blocks])


def test_compile_after_cache_and_swapped_blocks(model):
    backend = Counting()
    handle = fluxcore.cache.apply(model, "taylorseer", interval=2)
    try:
        compiled = fluxcore.compile_blocks(model, backend=backend)
        assert len(compiled) == 4
        fresh = Flux(PRESETS["tiny-dev"]).eval().single_blocks[0]
        model.single_blocks[0] = fresh  # swapped in after compiling: runs eagerly
        assert fluxcore.compile.compiled_blocks(model) == [
            "double_blocks.0",
            "double_blocks.1",
            "single_blocks.1",
        ]
        with torch.no_grad():
            for t in (1.0, 0.8, 0.6, 0.4):
                model(*inputs(model, 1, 4, 4, 7, t))
        assert backend.graphs == 2 and handle.stats.skipped == 1
    finally:
        handle.remove()
        fluxcore.compile.remove(model)


def _lora(model, seed, rank):
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for path in ("double_blocks.0.img_attn.qkv", "double_blocks.1.img_mlp.0", "single_blocks.1.linear1"):
        m = model.get_submodule(path)
        sd[f"{path}.lora_A.weight"] = torch.randn(rank, m.in_features, generator=g) * 0.1
        sd[f"{path}.lora_B.weight"] = torch.randn(m.out_features, rank, generator=g) * 0.1
    return sd


def test_lora_hotswap_and_strengths_do_not_recompile(model):
    backend = Counting()
    a = inputs(model, 1, 4, 4, 7)
    eager = Flux(PRESETS["tiny-dev"]).eval()
    eager.load_state_dict(model.state_dict())
    with torch.no_grad():
        fluxcore.compile_blocks(model, backend=backend)
        model(*a)
        assert backend.graphs == 2
        L.prepare_hotswap(model, max_rank=8)
        L.load_lora(model, _lora(model, 1, 4), adapter_name="slot")
        model(*a)
        # double 0 (qkv wrapped), double 1 (MLP wrapped), single 1 (linear1 wrapped) differ from
        # the plain blocks; single 0 is unchanged and reuses its graph
        assert backend.graphs == 5
        for seed, rank, weight in ((2, 6, 0.3), (3, 8, 1.0), (4, 2, 0.7)):
            L.load_lora(model, _lora(model, seed, rank), adapter_name="slot", hotswap=True, weight=weight)
            out = model(*a)
            L.load_lora(eager, _lora(model, seed, rank), adapter_name="slot", weight=weight)
            torch.testing.assert_close(out, eager(*a), rtol=1e-5, atol=1e-5)
            L.unload_lora(eager)
            L.set_adapters(model, "slot", 0.5 * weight)
            model(*a)
        assert backend.graphs == 5
        L.unload_lora(model)
        torch.testing.assert_close(model(*a), eager(*a), rtol=1e-5, atol=1e-5)
        assert backend.graphs == 5  # the plain blocks' graphs are reused


@pytest.mark.parametrize(
    "kwargs", [{"mode": "reduce-overhead"}, {"options": {"triton.cudagraphs": True}}], ids=["mode", "options"]
)
def test_cuda_graphs_are_refused_on_cpu(model, kwargs):
    with pytest.raises(FluxcoreError, match="CUDA-graph replay .* on 'cpu'"):
        fluxcore.compile_blocks(model, **kwargs)
    assert fluxcore.compile.compiled_blocks(model) == []
