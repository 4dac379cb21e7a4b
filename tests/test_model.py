"""fluxcore.Flux against diffusers' FluxTransformer2DModel (an oracle nobody here wrote).

Both models get the same random weights: ours in the BFL layout, diffusers' converted by our
`bfl_to_diffusers`, so the test checks the model and the key map together.
"""

import pytest
import torch

from fluxcore import PRESETS, Flux, attention_backend
from fluxcore.errors import ConfigError
from fluxcore.weights import bfl_to_diffusers

diffusers = pytest.importorskip("diffusers")


def rel_err(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def randomize(model, seed=0):
    """Default init leaves norm scales at 1 and biases small; perturb everything so that a
    swapped or mis-mapped tensor cannot go unnoticed."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("scale"):
                p.copy_(1 + 0.3 * torch.randn(p.shape, generator=g))
            else:
                p.add_(0.05 * torch.randn(p.shape, generator=g))
    return model


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


def grid_ids(h, w, index=0):
    ids = torch.zeros(h, w, 3)
    ids[..., 0] = index
    ids[..., 1] = torch.arange(h)[:, None]
    ids[..., 2] = torch.arange(w)[None, :]
    return ids.reshape(h * w, 3)


def make_inputs(config, batch=1, grid=(4, 4), l_txt=13, extra_grid=None, seed=1):
    g = torch.Generator().manual_seed(seed)
    img_ids = grid_ids(*grid)
    if extra_grid is not None:  # Kontext: reference-image tokens with axis-0 id 1
        img_ids = torch.cat([img_ids, grid_ids(*extra_grid, index=1)])
    n_img = img_ids.shape[0]
    return dict(
        img=torch.randn(batch, n_img, config.in_channels, generator=g),
        img_ids=img_ids,
        txt=torch.randn(batch, l_txt, config.context_in_dim, generator=g),
        txt_ids=torch.zeros(l_txt, 3),
        timesteps=torch.rand(batch, generator=g),
        y=torch.randn(batch, config.vec_in_dim, generator=g),
        guidance=(1 + 4 * torch.rand(batch, generator=g)) if config.guidance_embed else None,
    )


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


def run_diffusers(ref, x):
    return ref(
        hidden_states=x["img"],
        encoder_hidden_states=x["txt"],
        pooled_projections=x["y"],
        timestep=x["timesteps"],
        img_ids=x["img_ids"],
        txt_ids=x["txt_ids"],
        guidance=x["guidance"],
        return_dict=False,
    )[0]


CASES = {
    "dev": dict(preset="tiny-dev"),
    "schnell": dict(preset="tiny-schnell"),
    "fill-384-in": dict(preset="tiny-fill"),
    "canny-128-in": dict(preset="tiny-canny"),
    "non-square": dict(preset="tiny-dev", grid=(3, 5)),
    "batch2": dict(preset="tiny-dev", batch=2),
    "kontext-extra-tokens": dict(preset="tiny-dev", extra_grid=(2, 3)),
    "txt-len-7": dict(preset="tiny-schnell", l_txt=7, grid=(2, 6)),
}


@pytest.mark.parametrize("backend", ["eager", "sdpa"])
@pytest.mark.parametrize("case", list(CASES))
def test_matches_diffusers(case, backend):
    spec = dict(CASES[case])
    model = randomize(Flux(PRESETS[spec.pop("preset")])).eval()
    ref = diffusers_twin(model)
    x = make_inputs(model.config, **spec)
    with torch.no_grad(), attention_backend(backend):
        ours = run_ours(model, x)
        theirs = run_diffusers(ref, x)
    assert ours.shape == (x["img"].shape[0], x["img"].shape[1], model.config.out_channels)
    assert rel_err(ours, theirs) <= 1e-5


def test_batch_elements_are_independent():
    """Batch 2 with different timesteps equals two batch-1 runs."""
    model = randomize(Flux(PRESETS["tiny-dev"])).eval()
    x = make_inputs(model.config, batch=2)
    with torch.no_grad():
        both = run_ours(model, x)
        for i in range(2):
            xi = {
                k: (v[i : i + 1] if k in ("img", "txt", "timesteps", "y", "guidance") else v)
                for k, v in x.items()
            }
            assert rel_err(run_ours(model, xi), both[i : i + 1]) <= 1e-6


def test_missing_guidance_is_a_clear_error():
    model = Flux(PRESETS["tiny-dev"])
    x = make_inputs(model.config)
    x["guidance"] = None
    with pytest.raises(ConfigError, match="guidance"):
        run_ours(model, x)


def test_wrong_input_rank_and_channels():
    model = Flux(PRESETS["tiny-dev"])
    x = make_inputs(model.config)
    with pytest.raises(ValueError, match="3-D"):
        model(x["img"][0], x["img_ids"], x["txt"], x["txt_ids"][None], x["timesteps"], x["y"], x["guidance"])
    with pytest.raises(ValueError, match="in_channels=64"):
        model(
            x["img"][..., :32],
            x["img_ids"][None],
            x["txt"],
            x["txt_ids"][None],
            x["timesteps"],
            x["y"],
            x["guidance"],
        )


@pytest.mark.parametrize("dtype,tol", [(torch.bfloat16, 1.5e-2), (torch.float16, 2e-3)])
def test_low_precision_against_fp32(dtype, tol):
    """Arithmetic precision of a whole forward. Measured on tiny-dev, seeds 0-2: bf16 6.2e-3 to
    6.4e-3, fp16 7.6e-4 to 8.2e-4 relative error.

    Inputs are rounded to `dtype` for both runs, and t, guidance are chosen so that 1000·t is exact
    in bf16: like the reference, a bf16 model scales t by 1000 in bf16, which moves the sinusoid by
    up to 2 rad for a general t (see test_math.py) — a property of the reference, not an error.
    """
    model = randomize(Flux(PRESETS["tiny-dev"])).eval()
    x = make_inputs(model.config, batch=2)
    x["timesteps"], x["guidance"] = torch.tensor([0.5, 0.125]), torch.tensor([4.0, 2.0])
    x = {k: v.to(dtype).float() for k, v in x.items()}
    with torch.no_grad():
        ref = run_ours(model, x)
        low = run_ours(model.to(dtype), x)
    assert low.dtype == dtype
    assert torch.isfinite(low).all()
    assert rel_err(low.float(), ref) <= tol


def test_fp32_islands_in_bf16():
    """RMSNorm, RoPE and the timestep sinusoid compute in float32 even in a bf16 model."""
    model = randomize(Flux(PRESETS["tiny-dev"])).to(torch.bfloat16)
    ids = make_inputs(model.config)["img_ids"][None]
    assert model.pe_embedder(ids).dtype == torch.float32
    q = torch.randn(1, 2, 5, 16, dtype=torch.bfloat16) * 100
    normed = model.single_blocks[0].norm.query_norm(q)
    expect = (q.float() * torch.rsqrt(q.float().pow(2).mean(-1, keepdim=True) + 1e-6)).bfloat16()
    torch.testing.assert_close(normed, expect * model.single_blocks[0].norm.query_norm.scale)


def test_forward_compiles_without_graph_breaks():
    """Dynamo traces the whole forward (attention backend lookup included) as one graph."""
    model = randomize(Flux(PRESETS["tiny-schnell"])).eval()
    x = make_inputs(model.config)
    compiled = torch.compile(model, backend="eager", fullgraph=True)
    with torch.no_grad():
        torch.testing.assert_close(run_ours(compiled, x), run_ours(model, x), rtol=0, atol=0)
