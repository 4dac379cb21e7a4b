"""Every preset on the meta device: the official key set and shapes, the counts."""

import dataclasses
import time

import pytest
import torch

from fluxcore import PRESETS, Flux, FluxConfig
from fluxcore.config import OFFICIAL_VARIANTS, get_config
from fluxcore.errors import ConfigError


def official_shapes(in_channels: int, guidance: bool) -> dict[str, tuple[int, ...]]:
    """The official checkpoint key table, written out independently of the model code."""
    D, M = 3072, 12288
    s = {
        "img_in.weight": (D, in_channels), "img_in.bias": (D,),
        "txt_in.weight": (D, 4096), "txt_in.bias": (D,),
        "time_in.in_layer.weight": (D, 256), "time_in.in_layer.bias": (D,),
        "time_in.out_layer.weight": (D, D), "time_in.out_layer.bias": (D,),
        "vector_in.in_layer.weight": (D, 768), "vector_in.in_layer.bias": (D,),
        "vector_in.out_layer.weight": (D, D), "vector_in.out_layer.bias": (D,),
        "final_layer.linear.weight": (64, D), "final_layer.linear.bias": (64,),
        "final_layer.adaLN_modulation.1.weight": (2 * D, D), "final_layer.adaLN_modulation.1.bias": (2 * D,),
    }  # fmt: skip
    if guidance:
        s |= {
            "guidance_in.in_layer.weight": (D, 256), "guidance_in.in_layer.bias": (D,),
            "guidance_in.out_layer.weight": (D, D), "guidance_in.out_layer.bias": (D,),
        }  # fmt: skip
    for i in range(19):
        for st in ("img", "txt"):
            p = f"double_blocks.{i}.{st}"
            s |= {
                f"{p}_mod.lin.weight": (6 * D, D), f"{p}_mod.lin.bias": (6 * D,),
                f"{p}_attn.qkv.weight": (3 * D, D), f"{p}_attn.qkv.bias": (3 * D,),
                f"{p}_attn.norm.query_norm.scale": (128,), f"{p}_attn.norm.key_norm.scale": (128,),
                f"{p}_attn.proj.weight": (D, D), f"{p}_attn.proj.bias": (D,),
                f"{p}_mlp.0.weight": (M, D), f"{p}_mlp.0.bias": (M,),
                f"{p}_mlp.2.weight": (D, M), f"{p}_mlp.2.bias": (D,),
            }  # fmt: skip
    for j in range(38):
        p = f"single_blocks.{j}"
        s |= {
            f"{p}.linear1.weight": (3 * D + M, D), f"{p}.linear1.bias": (3 * D + M,),
            f"{p}.linear2.weight": (D, D + M), f"{p}.linear2.bias": (D,),
            f"{p}.norm.query_norm.scale": (128,), f"{p}.norm.key_norm.scale": (128,),
            f"{p}.modulation.lin.weight": (3 * D, D), f"{p}.modulation.lin.bias": (3 * D,),
        }  # fmt: skip
    return s


IN_CHANNELS = {"flux-dev-fill": 384, "flux-dev-canny": 128, "flux-dev-depth": 128}


@pytest.mark.parametrize("name", OFFICIAL_VARIANTS)
def test_official_presets_match_checkpoint_layout(name):
    guidance = name != "flux-schnell"
    with torch.device("meta"):
        model = Flux(PRESETS[name])
    got = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    want = official_shapes(IN_CHANNELS.get(name, 64), guidance)
    assert got.keys() == want.keys()
    assert got == want
    assert len(got) == (780 if guidance else 776)


@pytest.mark.parametrize("name,count", [("flux-dev", 11_901_408_320), ("flux-schnell", 11_891_178_560)])
def test_full_size_parameter_count_and_build_time(name, count):
    start = time.perf_counter()
    with torch.device("meta"):
        model = Flux(PRESETS[name])
    elapsed = time.perf_counter() - start
    assert sum(p.numel() for p in model.parameters()) == count
    assert elapsed < 2.0  # measured ≈ 0.1 s here; generous for a loaded CI machine


def test_config_is_flat_frozen_with_reference_names():
    names = [f.name for f in dataclasses.fields(FluxConfig)]
    assert names == [
        "in_channels", "out_channels", "vec_in_dim", "context_in_dim", "hidden_size", "mlp_ratio",
        "num_heads", "depth", "depth_single_blocks", "axes_dim", "theta", "qkv_bias", "guidance_embed",
    ]  # fmt: skip
    with pytest.raises(dataclasses.FrozenInstanceError):
        PRESETS["flux-dev"].depth = 3


def test_config_validation_messages():
    with pytest.raises(ConfigError, match="sum\\(axes_dim\\)"):
        FluxConfig(axes_dim=(16, 56, 64))
    with pytest.raises(ConfigError, match="not divisible"):
        FluxConfig(num_heads=5)
    with pytest.raises(ConfigError, match="known: .*flux-dev"):
        get_config("flux-pro")
