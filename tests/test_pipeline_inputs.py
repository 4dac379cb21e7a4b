"""The diffusers call surface of FluxPipeline beyond the images: arguments, components, devices,
seeding of stochastic samplers, and the errors for misuse."""

import numpy as np
import pytest
import torch

from fluxcore.errors import ConfigError
from fluxcore.pipeline import FluxPipeline
from fluxcore.schedules import ScheduleConfig

pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from tiny_snapshot import write_tiny_snapshot  # noqa: E402

KW = dict(
    height=32, width=32, num_inference_steps=3, max_sequence_length=16, output_type="np", progress=False
)


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    return FluxPipeline.from_pretrained(
        write_tiny_snapshot(tmp_path_factory.mktemp("inputs") / "dev", variant="dev")
    )


def test_components_have_diffusers_names(pipe):
    assert pipe.vae is pipe.ae and pipe.text_encoder is pipe.clip and pipe.text_encoder_2 is pipe.t5
    assert pipe.tokenizer is pipe.clip_tokenizer and pipe.tokenizer_2 is pipe.t5_tokenizer
    assert set(pipe.components) == {"scheduler", "vae", "text_encoder", "tokenizer", "text_encoder_2",
                                    "tokenizer_2", "transformer"}  # fmt: skip
    cfg = pipe.scheduler.config
    assert cfg["use_dynamic_shifting"] is True and cfg["base_image_seq_len"] == 256
    saved = pipe.schedule
    try:
        pipe.scheduler = {"use_dynamic_shifting": False, "shift": 3.0}
        assert pipe.schedule == ScheduleConfig(use_dynamic_shifting=False, shift=3.0)
        import diffusers

        pipe.scheduler = diffusers.FlowMatchEulerDiscreteScheduler(shift=1.0)
        assert pipe.schedule == ScheduleConfig.unshifted()
    finally:
        pipe.schedule = saved


def test_output_indexing_and_return_dict(pipe):
    out = pipe("a cat", generator=1, **KW)
    assert out[0] is out.images is out["images"]
    (images,) = pipe("a cat", generator=1, return_dict=False, **KW)
    np.testing.assert_array_equal(images, out.images)


def test_sigmas_are_shifted_and_ended_with_zero_as_in_diffusers(pipe):
    import diffusers

    sig = [1.0, 0.8, 0.5, 0.3, 0.1]
    ours = pipe.get_timesteps(len(sig), 4, sigmas=sig)  # 32x32 pixels: 4 packed tokens
    sch = diffusers.FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True)
    mu = 0.5 + (4 - 256) * 0.65 / 3840
    sch.set_timesteps(sigmas=sig, mu=mu)
    np.testing.assert_allclose(ours, sch.sigmas.double().numpy(), atol=1e-6)
    out = pipe("a cat", generator=1, sigmas=sig, **{**KW, "num_inference_steps": None})
    assert out.info["num_inference_steps"] == 5 and out.info["timesteps"] == pytest.approx(ours)


@pytest.mark.parametrize("sampler", ["euler_ancestral", "dpmpp_2m_sde", "dpmpp_3m_sde", "lcm"])
def test_stochastic_samplers_batch_equals_single(pipe, sampler):
    torch.manual_seed(0)
    state = torch.get_rng_state()
    batch = pipe(["a cat", "a dog"], generator=[4, 5], sampler=sampler, **KW).images
    assert torch.equal(torch.get_rng_state(), state)  # the global RNG is never drawn from
    for i, (p, s) in enumerate([("a cat", 4), ("a dog", 5)]):
        np.testing.assert_allclose(
            pipe(p, generator=[s], sampler=sampler, **KW).images[0], batch[i], atol=1e-5
        )
    gens = pipe(
        ["a cat", "a dog"],
        generator=[torch.Generator().manual_seed(s) for s in (4, 5)],
        sampler=sampler,
        **KW,
    )
    one = pipe("a dog", generator=[torch.Generator().manual_seed(5)], sampler=sampler, **KW)
    np.testing.assert_allclose(one.images[0], gens.images[1], atol=1e-5)  # fp32 batching: ~1e-6


def test_scheduler_names_run(pipe):
    a = pipe("a cat", generator=1, scheduler="karras", **KW)
    assert a.info["timesteps"][-2] < 0.01  # karras ends near σ_min
    b = pipe("a cat", generator=1, scheduler="simple", **KW)
    assert np.abs(a.images - b.images).max() > 1e-3


def test_joint_attention_kwargs(pipe):
    base = pipe("a cat", generator=1, **KW).images
    np.testing.assert_array_equal(
        pipe("a cat", generator=1, joint_attention_kwargs={"scale": 0.5}, **KW).images, base
    )
    with pytest.raises(ConfigError, match=r"only \{'scale': s\}.*got keys \['ip_adapter_masks'\]"):
        pipe("a cat", joint_attention_kwargs={"ip_adapter_masks": 1}, **KW)


def test_max_sequence_length_is_capped_with_a_warning(pipe):
    trained = pipe.tokenizer_2.max_length
    with pytest.warns(UserWarning, match=f"above the {trained} tokens"):
        txt, _, ids = pipe.encode_prompt("a cat", max_sequence_length=trained + 8)
    assert txt.shape[1] == trained and ids.shape == (trained, 3)


def test_to_and_offload(pipe):
    pipe.to(torch.float64)
    try:
        assert pipe.transformer.dtype == torch.float64 and pipe.t5.dtype == torch.float64
        assert pipe.ae.dtype == torch.float32  # the reference keeps the autoencoder in fp32
    finally:
        pipe.to("cpu", torch.float32)
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="no CUDA device to offload to"):
            pipe.enable_model_cpu_offload()
    with pytest.raises(ConfigError, match="not a torch device"):
        pipe.to("warp-drive")


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (
            dict(prompt="x", prompt_embeds=torch.zeros(1, 4, 48), pooled_prompt_embeds=torch.zeros(1, 32)),
            "either prompt",
        ),
        (dict(prompt_embeds=torch.zeros(1, 4, 48)), "needs pooled_prompt_embeds"),
        (dict(prompt="x", pooled_prompt_embeds=torch.zeros(1, 32)), "goes with prompt_embeds"),
        (dict(prompt=["a", "b"], prompt_2=["c"]), "1 prompt_2s for 2 prompts"),
        (dict(prompt="x", sigmas=[1.0, 1.2]), r"sigmas must be flow times in \(0, 1\]"),
        (dict(prompt="x", sigmas=[0.5, 0.8]), "decrease strictly"),
        (dict(prompt="x", sigmas=[1.0, 0.5], scheduler="karras"), "either sigmas= or scheduler="),
        (dict(prompt="x", scheduler="linear"), "unknown scheduler 'linear'"),
        (
            dict(
                prompt="x", callback_on_step_end=lambda *a: {}, callback_on_step_end_tensor_inputs=["noise"]
            ),
            "among",
        ),
        (dict(prompt="x", callback_on_step_end=lambda *a: {}, sampler=lambda m, x, s, **k: x), "step_end"),
        (dict(prompt="x", max_sequence_length=600), r"in \[1, 512\]"),
        (dict(prompt="x", image=object(), strength=0.5), "PIL image, a numpy array, a torch tensor"),
        (dict(prompt="x", image=np.zeros((32, 32, 3)) + 2, strength=0.5), r"values must lie in \[0, 1\]"),
    ],
)
def test_misuse_is_a_config_error(pipe, kwargs, match):
    with pytest.raises(ConfigError, match=match):
        pipe(**{**KW, **kwargs})


def test_callback_on_step_end_can_replace_prompt_embeds(pipe):
    def zero_text(p, i, t, kw):
        assert set(kw) == {"latents", "prompt_embeds"} and t.ndim == 0
        return {"prompt_embeds": torch.zeros_like(kw["prompt_embeds"])} if i == 0 else {}

    a = pipe("a cat", generator=1, callback_on_step_end=zero_text,
             callback_on_step_end_tensor_inputs=["latents", "prompt_embeds"], **KW).images  # fmt: skip
    b = pipe("a cat", generator=1, **KW).images
    assert np.abs(a - b).max() > 1e-4
