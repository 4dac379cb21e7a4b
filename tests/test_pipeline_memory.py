"""FluxPipeline's offload modes give the very same images on the CPU (the hooks move weights, the
math is unchanged), and a memory budget refuses what cannot fit before any model runs."""

import numpy as np
import pytest

from fluxcore.memory import MemoryPlanError
from fluxcore.pipeline import FluxPipeline

pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from tiny_snapshot import write_tiny_snapshot  # noqa: E402

CALL = dict(prompt="a cat on mars", height=32, width=48, num_inference_steps=2, generator=3,
            max_sequence_length=16, output_type="np", progress=False)  # fmt: skip


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return write_tiny_snapshot(tmp_path_factory.mktemp("memory") / "dev", variant="dev")


@pytest.mark.parametrize("mode", ["model", "sequential", "group", "group2"])
def test_offload_modes_are_bit_identical(folder, mode):
    pipe = FluxPipeline.from_pretrained(folder)
    want = pipe(**CALL).images
    {
        "model": lambda: pipe.enable_model_cpu_offload(device="cpu"),
        "sequential": lambda: pipe.enable_sequential_cpu_offload(device="cpu"),
        "group": lambda: pipe.enable_group_offload("cpu"),
        "group2": lambda: pipe.enable_group_offload("cpu", offload_type="leaf_level"),
    }[mode]()
    assert np.array_equal(pipe(**CALL).images, want)
    if mode != "model":
        assert pipe.transformer._fluxcore_offload is not None
    pipe.to("cpu")  # ends offloading: the hooks are gone
    assert getattr(pipe.transformer, "_fluxcore_offload", None) is None
    assert np.array_equal(pipe(**CALL).images, want)


def test_vae_tiling_passthrough(folder):
    pipe = FluxPipeline.from_pretrained(folder).enable_vae_tiling(tile_sample_size=32)
    assert pipe.vae.use_tiling and pipe(**CALL).images.shape == (1, 32, 48, 3)


def test_max_memory_refuses_up_front(folder, monkeypatch):
    with pytest.raises(MemoryPlanError, match="nothing fits max_memory"):
        FluxPipeline.from_pretrained(folder, max_memory="1GB")
    pipe = FluxPipeline.from_pretrained(folder, max_memory="40GB")  # fits without offload or quantization
    p = pipe.memory_plan
    assert (p.quant, p.offload) == ("bf16", "none") and "peak" in str(p)
    assert pipe(**CALL).images.shape == (1, 32, 48, 3)
    ran = []
    monkeypatch.setattr(pipe.t5, "forward", lambda *a, **k: ran.append(1))
    with pytest.raises(MemoryPlanError, match="exceeds max_memory"):
        pipe(**{**CALL, "height": 8192, "width": 8192})  # the VAE decode alone would not fit
    assert ran == []  # refused before any model ran
