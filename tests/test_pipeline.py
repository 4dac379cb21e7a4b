"""FluxPipeline end to end on tiny random models saved in the official layouts, against diffusers'
pipelines on the same folders (an oracle nobody here wrote)."""

import shutil

import numpy as np
import pytest
import torch

from fluxcore.errors import ConfigError, FluxcoreError, WeightsError
from fluxcore.latents import get_noise, pack
from fluxcore.pipeline import FluxPipeline
from fluxcore.sampling import ScheduleConfig, get_schedule

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from tiny_snapshot import write_tiny_snapshot  # noqa: E402

KW = dict(max_sequence_length=16, progress=False)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny_flux")
    return {
        "dev": write_tiny_snapshot(root / "dev", variant="dev"),
        "dev_bfl": write_tiny_snapshot(root / "dev_bfl", variant="dev", layout="bfl"),
        "schnell": write_tiny_snapshot(root / "schnell", variant="schnell", seed=1),
    }


@pytest.fixture(scope="module")
def pipes(folders):
    return {k: FluxPipeline.from_pretrained(v) for k, v in folders.items()}


def noise(n, h, w, seed=1):
    return pack(get_noise(n, h, w, dtype=torch.float32, seed=seed))


# --- diffusers oracle -------------------------------------------------------------------------


@pytest.mark.parametrize("which,steps,cfg", [("dev", 5, 1.0), ("schnell", 4, 1.0), ("dev", 3, 3.0)])
def test_matches_diffusers(folders, pipes, which, steps, cfg):
    prompts = ["a cat on mars", "red house by the river"]
    lat = noise(2, 64, 48)
    neg = "blurry dark" if cfg > 1 else None
    ours = pipes[which](
        prompts,
        height=64,
        width=48,
        num_inference_steps=steps,
        guidance_scale=4.0,
        latents=lat,
        output_type="np",
        negative_prompt=neg,
        true_cfg_scale=cfg,
        **KW,
    ).images
    ref = diffusers.FluxPipeline.from_pretrained(folders[which])
    ref.set_progress_bar_config(disable=True)
    theirs = ref(
        prompts,
        height=64,
        width=48,
        num_inference_steps=steps,
        guidance_scale=4.0,
        latents=lat,
        output_type="np",
        max_sequence_length=16,
        negative_prompt=neg,
        true_cfg_scale=cfg,
    ).images
    assert ours.shape == theirs.shape == (2, 64, 48, 3)
    assert ours.std() > 0.05  # a real image, not a constant
    assert np.abs(ours - theirs).max() <= 1e-4


@pytest.mark.parametrize("variant", ["kontext", "fill", "canny"])
def test_conditioning_modes_match_diffusers(tmp_path, variant):
    from PIL import Image

    folder = write_tiny_snapshot(tmp_path / variant, variant=variant, seed=2)
    pipe = FluxPipeline.from_pretrained(folder)
    rng = np.random.default_rng(0)
    picture = Image.fromarray(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8))  # 64 wide, 48 high
    mask = np.zeros((48, 64), dtype=np.uint8)
    mask[8:40, 16:48] = 255
    mask = Image.fromarray(mask)
    lat = noise(1, 48, 64, seed=3)
    common = dict(
        prompt="a cat on mars",
        height=48,
        width=64,
        num_inference_steps=3,
        guidance_scale=5.0,
        latents=lat,
        output_type="np",
        max_sequence_length=16,
    )
    if variant == "kontext":
        assert pipe.mode == "kontext"
        ours = pipe(image=picture, kontext_auto_resize=False, progress=False, **common).images
        ref = diffusers.FluxKontextPipeline.from_pretrained(folder)
        ref.set_progress_bar_config(disable=True)
        theirs = ref(image=picture, _auto_resize=False, max_area=48 * 64, **common).images
    elif variant == "fill":
        assert pipe.mode == "fill"
        ours = pipe(image=picture, mask_image=mask, progress=False, **common).images
        ref = diffusers.FluxFillPipeline.from_pretrained(folder)
        ref.set_progress_bar_config(disable=True)
        theirs = ref(image=picture, mask_image=mask, **common).images
    else:
        assert pipe.mode == "control"
        ours = pipe(control_image=picture, progress=False, **common).images
        ref = diffusers.FluxControlPipeline.from_pretrained(folder)
        ref.set_progress_bar_config(disable=True)
        theirs = ref(control_image=picture, **common).images
    assert ours.shape == theirs.shape == (1, 48, 64, 3)
    assert np.abs(ours - theirs).max() <= 1e-4
    # the condition matters: another condition image gives another result
    other = Image.fromarray(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8))
    key = "control_image" if variant == "canny" else "image"
    extra = (
        {"mask_image": mask}
        if variant == "fill"
        else {"kontext_auto_resize": False}
        if variant == "kontext"
        else {}
    )
    changed = pipe(**{key: other}, progress=False, **extra, **common).images
    assert np.abs(changed - ours).max() > 1e-3


def test_img2img_starts_from_the_reference_mix(pipes):
    from PIL import Image

    pipe = pipes["dev"]
    picture = Image.fromarray(np.random.default_rng(1).integers(0, 256, (32, 48, 3), dtype=np.uint8))
    seen = []
    pipe(
        "a cat",
        height=32,
        width=48,
        num_inference_steps=10,
        image=picture,
        strength=0.6,
        generator=4,
        callback=lambda info: seen.append((info["i"], info["sigma"], info["x"].clone())),
        output_type="latent",
        **KW,
    )
    full = pipe("a cat", height=32, width=48, num_inference_steps=10, generator=4, output_type="latent", **KW)
    ts = full.info["timesteps"]
    t_idx = int((1 - 0.6) * 10)
    assert len(seen) == 10 - t_idx and seen[0][1] == ts[t_idx]
    init = pack(
        pipe.ae.encode(torch.from_numpy(np.array(picture)).float().permute(2, 0, 1)[None] / 127.5 - 1)
    )
    want = ts[t_idx] * noise(1, 32, 48, seed=4) + (1 - ts[t_idx]) * init
    torch.testing.assert_close(seen[0][2], want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "scheduler",
    [
        dict(
            use_dynamic_shifting=True,
            base_shift=0.2,
            max_shift=2.0,
            base_image_seq_len=2,
            max_image_seq_len=40,
        ),
        dict(use_dynamic_shifting=False, shift=3.0),
    ],
)
def test_scheduler_config_of_the_snapshot_sets_the_schedule(folders, tmp_path, scheduler):
    """A snapshot's scheduler/scheduler_config.json is the schedule: flow times from diffusers'
    scheduler with diffusers' μ, and the same image as diffusers' pipeline on that folder."""
    import json

    folder = tmp_path / "dev"
    shutil.copytree(folders["dev"], folder)
    path = folder / "scheduler" / "scheduler_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **scheduler}))
    pipe = FluxPipeline.from_pretrained(folder)
    assert pipe.schedule == ScheduleConfig.from_scheduler_config(json.loads(path.read_text()))
    lat = noise(1, 64, 48)
    args = dict(height=64, width=48, num_inference_steps=4, guidance_scale=4.0, latents=lat, output_type="np")
    ours = pipe("a cat on mars", **args, **KW)
    ref = diffusers.FluxPipeline.from_pretrained(folder)
    ref.set_progress_bar_config(disable=True)
    c = ref.scheduler.config
    seq = lat.shape[1]
    m = (c.max_shift - c.base_shift) / (c.max_image_seq_len - c.base_image_seq_len)
    mu = seq * m + c.base_shift - m * c.base_image_seq_len  # diffusers' calculate_shift
    ref.scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / 4, 4), mu=mu)
    np.testing.assert_allclose(ours.info["timesteps"], ref.scheduler.sigmas.double().numpy(), atol=1e-6)
    assert not np.allclose(ours.info["timesteps"], get_schedule(4, seq), atol=1e-3)  # not the default
    theirs = ref("a cat on mars", **args, max_sequence_length=16).images
    assert np.abs(ours.images - theirs).max() <= 1e-4


def test_schedule_defaults_without_a_scheduler_config(pipes):
    """BFL folders carry no scheduler config: the reference's schedule for the variant."""
    assert pipes["dev_bfl"].schedule == ScheduleConfig()
    assert pipes["dev_bfl"].get_timesteps(7, 100) == pipes["dev"].get_timesteps(7, 100)
    assert pipes["schnell"].schedule == ScheduleConfig.unshifted()
    p = pipes["schnell"]
    assert FluxPipeline(p.transformer, p.ae, p.t5, p.clip, p.t5_tokenizer, p.clip_tokenizer).schedule == (
        ScheduleConfig.unshifted()
    )


# --- layouts, sizes, seeds ---------------------------------------------------------------------


def test_hf_and_bfl_folders_give_the_same_image(pipes):
    a = pipes["dev"]("a cat", height=32, width=32, num_inference_steps=3, generator=7, output_type="np", **KW)
    b = pipes["dev_bfl"](
        "a cat", height=32, width=32, num_inference_steps=3, generator=7, output_type="np", **KW
    )
    np.testing.assert_allclose(a.images, b.images, atol=1e-6)


@pytest.mark.parametrize("hw", [(64, 48), (32, 80)])
def test_size_and_seed(pipes, hw):
    pipe = pipes["schnell"]
    h, w = hw
    a = pipe("a cat", height=h, width=w, generator=11, **KW)
    assert pipe.is_schnell and a.info["num_inference_steps"] == 4
    assert len(a.images) == 1 and a.images[0].size == (w, h) and a.seeds == [11]
    b = pipe("a cat", height=h, width=w, generator=11, **KW)
    c = pipe("a cat", height=h, width=w, generator=12, **KW)
    assert np.array_equal(np.array(a.images[0]), np.array(b.images[0]))
    assert not np.array_equal(np.array(a.images[0]), np.array(c.images[0]))


def test_batch_seeds_and_images_per_prompt(pipes):
    pipe = pipes["dev"]
    out = pipe(
        ["a cat", "a dog"],
        height=32,
        width=32,
        num_inference_steps=2,
        num_images_per_prompt=2,
        generator=[1, 2, 3, 4],
        output_type="np",
        **KW,
    )
    assert out.images.shape == (4, 32, 32, 3) and out.seeds == [1, 2, 3, 4]
    # image 3 is prompt 2 with seed 3, alone
    one = pipe("a dog", height=32, width=32, num_inference_steps=2, generator=3, output_type="np", **KW)
    np.testing.assert_allclose(out.images[2], one.images[0], atol=1e-5)


def test_rounds_to_multiples_of_16_with_a_warning(pipes):
    with pytest.warns(UserWarning, match="height 50 is not a multiple of 16; rounded down to 48"):
        out = pipes["schnell"]("a cat", height=50, width=33, generator=0, **KW)
    assert out.images[0].size == (32, 48)


@pytest.mark.parametrize("sampler", ["heun", "dpmpp_2m", "euler_ancestral"])
def test_other_samplers_run_and_are_seeded(pipes, sampler):
    pipe = pipes["dev"]
    a = pipe(
        "a cat",
        height=32,
        width=32,
        num_inference_steps=3,
        generator=5,
        sampler=sampler,
        output_type="np",
        **KW,
    )
    b = pipe(
        "a cat",
        height=32,
        width=32,
        num_inference_steps=3,
        generator=5,
        sampler=sampler,
        output_type="np",
        **KW,
    )
    e = pipe("a cat", height=32, width=32, num_inference_steps=3, generator=5, output_type="np", **KW)
    assert np.array_equal(a.images, b.images)
    assert not np.array_equal(a.images, e.images)


def test_true_cfg_doubles_transformer_calls(pipes):
    pipe = pipes["dev"]
    calls = []
    handle = pipe.transformer.register_forward_hook(lambda *a: calls.append(1))
    try:
        pipe("a cat", height=32, width=32, num_inference_steps=3, generator=0, **KW)
        n_plain = len(calls)
        pipe(
            "a cat",
            height=32,
            width=32,
            num_inference_steps=3,
            generator=0,
            negative_prompt="dog",
            true_cfg_scale=2.0,
            **KW,
        )
    finally:
        handle.remove()
    assert n_plain == 3 and len(calls) - n_plain == 6


def test_cpu_offload_gives_the_same_image(folders):
    pipe = FluxPipeline.from_pretrained(folders["schnell"])
    a = pipe("a cat", height=32, width=32, generator=2, output_type="np", **KW).images
    pipe.enable_model_cpu_offload("cpu")
    b = pipe("a cat", height=32, width=32, generator=2, output_type="np", **KW).images
    assert np.array_equal(a, b)
    assert all(p.device.type == "cpu" for m in pipe._modules() for p in m.parameters())


def test_fused_kernels_default_off_without_cuda_and_exact_when_forced(folders, monkeypatch):
    """Without CUDA the default leaves the model plain; forcing the transform (the Triton
    interpreter runs the kernels on CPU in tests) gives the same image; a GPU machine gets it by
    default (simulated: the decision only asks torch.cuda.is_available)."""
    pytest.importorskip("fluxcore.kernels")
    plain = FluxPipeline.from_pretrained(folders["schnell"])
    assert plain.fused_modules == []
    fused = FluxPipeline.from_pretrained(folders["schnell"], fused_kernels=True)
    c = fused.transformer.config
    assert len(fused.fused_modules) == 7 * c.depth + 4 * c.depth_single_blocks + 1
    a = plain("a cat", height=32, width=32, generator=2, output_type="np", **KW).images
    b = fused("a cat", height=32, width=32, generator=2, output_type="np", **KW).images
    np.testing.assert_allclose(b, a, atol=1e-5)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert FluxPipeline.from_pretrained(folders["schnell"]).fused_modules
    assert FluxPipeline.from_pretrained(folders["schnell"], fused_kernels=False).fused_modules == []


def test_redux_tokens_are_appended(pipes, tmp_path):
    from safetensors.torch import save_file

    from fluxcore.conditioning import ReduxProjector

    pipe = pipes["dev"]
    torch.manual_seed(0)
    proj = ReduxProjector(siglip_dim=24, txt_dim=48)
    save_file({k: v.contiguous() for k, v in proj.state_dict().items()}, str(tmp_path / "redux.safetensors"))
    with pytest.raises(ConfigError, match="load_redux"):
        pipe("a cat", height=32, width=32, image_embeds=torch.randn(5, 24), **KW)
    pipe.load_redux(tmp_path / "redux.safetensors")
    try:
        seen = []
        hook = pipe.transformer.register_forward_hook(
            lambda m, a, kw, out: seen.append(kw["txt"].shape), with_kwargs=True
        )
        emb = torch.randn(5, 24)
        out = pipe(
            "a cat",
            height=32,
            width=32,
            num_inference_steps=2,
            image_embeds=emb,
            generator=0,
            output_type="np",
            **KW,
        )
        hook.remove()
        plain = pipe("a cat", height=32, width=32, num_inference_steps=2, generator=0, output_type="np", **KW)
    finally:
        pipe.redux = None
    assert seen[0] == (1, 16 + 5, 48)
    assert not np.allclose(out.images, plain.images)


# --- bad input ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(height=0), "height must be in"),
        (dict(width=-32), "width must be in"),
        (dict(height=100_000), "height must be in"),
        (dict(width=8), "at least 16"),
        (dict(height=32.0), "integer number of pixels"),
        (dict(num_inference_steps=0), "num_inference_steps must be an integer >= 1"),
        (dict(sampler="ddpm9"), "known samplers: euler, heun, dpmpp_2m, euler_ancestral"),
        (dict(generator=[1, 2]), "got 2 seeds/generators for 1 images"),
        (dict(generator=-1), "non-negative"),
        (dict(prompt=[]), "non-empty list"),
        (dict(prompt=None), "prompt must be"),
        (dict(max_sequence_length=600), "max_sequence_length"),
        (dict(mask_image=torch.zeros(32, 32)), "mask_image on a text-to-image model inpaints image="),
        (dict(ip_adapter_image=torch.zeros(3, 32, 32)), "call pipe.load_ip_adapter"),
        (dict(redux_image=torch.zeros(3, 32, 32)), "load_redux"),
        (dict(joint_attention_kwargs={"ip_adapter_image_embeds": 1}), "only {'scale': s}"),
        (dict(control_image=torch.zeros(3, 32, 32)), "control_image is for Canny/Depth"),
        (dict(strength=0.5), "strength is for img2img"),
        (dict(output_type="jpeg"), "output_type"),
    ],
)
def test_bad_input(pipes, kwargs, match):
    args = dict(prompt="a cat", height=32, width=32, num_inference_steps=1, generator=0, **KW)
    args.update(kwargs)
    with pytest.raises(ConfigError, match=match):
        pipes["schnell"](**args)


def test_missing_part_is_named(folders, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(folders["dev"], broken)
    shutil.rmtree(broken / "text_encoder_2")
    with pytest.raises(WeightsError, match="missing: text_encoder_2/"):
        FluxPipeline.from_pretrained(broken)
    with pytest.raises(WeightsError, match="no such folder, and not a Hugging Face Hub id"):
        FluxPipeline.from_pretrained(tmp_path / "nowhere")


def test_nan_stops_and_names_the_step(folders):
    pipe = FluxPipeline.from_pretrained(folders["schnell"])
    with torch.no_grad():
        pipe.transformer.final_layer.linear.bias.fill_(float("nan"))
    with pytest.raises(FluxcoreError, match=r"NaN or infinite at sampling step 1 of 4 \(t = 1.0000\)"):
        pipe("a cat", height=32, width=32, generator=0, **KW)


def test_out_of_range_image_and_mask_tensors_are_refused():
    """0-255 tensors would silently give a wrong fill (image·(1 − mask) with mask 255)."""
    from fluxcore.images import to_mask_tensor, to_rgb_tensor

    with pytest.raises(
        ConfigError, match=r"mask_image values must lie in \[0, 1\] .*found \[0, 255\]"
    ):
        to_mask_tensor(torch.full((32, 32), 255.0).index_fill_(0, torch.tensor([0]), 0), 32, 32)
    with pytest.raises(ConfigError, match=r"image values must lie in \[0, 1\] \(or \[-1, 1\]\)"):
        to_rgb_tensor(torch.full((3, 32, 32), 128.0), 32, 32, "image")
    assert to_mask_tensor(torch.ones(32, 32), 32, 32).shape == (1, 1, 32, 32)
    assert to_rgb_tensor(torch.zeros(3, 32, 32), 32, 32, "image").shape == (1, 3, 32, 32)


def test_cache_keyword_reports_saved_evaluations_and_leaves_no_trace(pipes):
    pipe = pipes["dev"]
    kw = dict(height=32, width=32, generator=3, num_inference_steps=8, output_type="np", **KW)
    plain = pipe("a cat", **kw)
    never = pipe("a cat", cache="first_block:0", **kw)  # threshold 0 never skips: bit-identical
    assert np.array_equal(never.images, plain.images) and never.info["cache"]["skipped"] == 0
    cached = pipe("a cat", cache="taylorseer:2", **kw)
    assert cached.info["cache"]["skipped"] > 0 and cached.info["cache"]["full"] < 8
    assert "cache" not in plain.info
    assert type(pipe.transformer.double_blocks) is torch.nn.ModuleList  # removed after the call
    assert np.array_equal(pipe("a cat", **kw).images, plain.images)
    with pytest.raises(ConfigError):
        pipe("a cat", cache="warp", **kw)
