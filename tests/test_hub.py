"""Hub ids resolve through a (fake) Hugging Face cache, offline; single files (ComfyUI's layouts)
load into the same pipeline. Nothing here touches the network."""

import shutil

import numpy as np
import pytest
import torch

from fluxcore.errors import WeightsError
from fluxcore.pipeline import FluxPipeline
from fluxcore.weights.errors import CheckpointNotFoundError
from fluxcore.weights.hub import flux_patterns, is_hub_id

pytest.importorskip("diffusers")
pytest.importorskip("huggingface_hub")

from tiny_snapshot import write_tiny_snapshot  # noqa: E402

COMMIT = "0123456789abcdef0123456789abcdef01234567"
KW = dict(height=32, width=48, num_inference_steps=2, generator=3, max_sequence_length=16, output_type="np",
          progress=False)  # fmt: skip


@pytest.fixture(scope="module")
def snapshot(tmp_path_factory):
    return write_tiny_snapshot(tmp_path_factory.mktemp("hub") / "model", variant="schnell", seed=4)


@pytest.fixture(scope="module")
def reference(snapshot):
    return FluxPipeline.from_pretrained(snapshot)("a cat on mars", **KW).images


def fake_cache(root, snapshot, repo="black-forest-labs/FLUX.1-tiny"):
    """The layout huggingface_hub writes: models--owner--name/{snapshots/<commit>/..., refs/main}."""
    repo_dir = root / ("models--" + repo.replace("/", "--"))
    shutil.copytree(snapshot, repo_dir / "snapshots" / COMMIT)
    (repo_dir / "refs").mkdir()
    (repo_dir / "refs" / "main").write_text(COMMIT)
    return repo_dir / "snapshots" / COMMIT


@pytest.fixture
def offline(monkeypatch, tmp_path):
    cache = tmp_path / "hf-cache"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    return cache


def test_hub_id_resolves_offline_from_the_cache(offline, snapshot, reference):
    fake_cache(offline, snapshot)
    pipe = FluxPipeline.from_pretrained("black-forest-labs/FLUX.1-tiny")
    assert pipe.is_schnell and pipe.scheduler.config["use_dynamic_shifting"] is False
    np.testing.assert_array_equal(pipe("a cat on mars", **KW).images, reference)
    # revision= a commit, and the explicit cache_dir / local_files_only route (no environment)
    FluxPipeline.from_pretrained("black-forest-labs/FLUX.1-tiny", revision=COMMIT)


def test_missing_file_in_the_cache_is_named(offline, snapshot):
    snap = fake_cache(offline, snapshot)
    (snap / "transformer" / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(
        CheckpointNotFoundError, match=r"incomplete: .*transformer/\*\.safetensors is missing"
    ):
        FluxPipeline.from_pretrained("black-forest-labs/FLUX.1-tiny")
    snap = fake_cache(offline, snapshot, "someone/other")
    (snap / "vae" / "config.json").unlink()
    with pytest.raises(CheckpointNotFoundError, match=r"vae/config.json is missing"):
        FluxPipeline.from_pretrained("someone/other")


def test_not_cached_offline_says_so(offline):
    with pytest.raises(
        CheckpointNotFoundError, match="not in .*hf-cache.*HF_HUB_OFFLINE is set.*hf download"
    ):
        FluxPipeline.from_pretrained("black-forest-labs/FLUX.1-dev")
    with pytest.raises(CheckpointNotFoundError, match="no such folder, and not a Hugging Face Hub id"):
        FluxPipeline.from_pretrained("./no/such/model/here")


def test_explicit_cache_dir_and_local_files_only(tmp_path, snapshot, monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    fake_cache(tmp_path, snapshot, "someone/flux-tiny")
    pipe = FluxPipeline.from_pretrained("someone/flux-tiny", cache_dir=tmp_path, local_files_only=True)
    assert pipe.transformer.config.in_channels == 64


def test_patterns_fetch_only_the_diffusers_folders():
    pats = flux_patterns()
    assert "transformer/*.safetensors" in pats and "tokenizer_2/*.model" in pats
    assert not any(p.startswith("*") or p.startswith("flux1") or p == "ae.safetensors" for p in pats)
    assert "sub/transformer/*.fp16.safetensors" in flux_patterns(variant="fp16", subfolder="sub")
    assert is_hub_id("black-forest-labs/FLUX.1-dev") and not is_hub_id("/abs/path") and not is_hub_id("a/b/c")


# --- single files -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def single_files(snapshot, tmp_path_factory):
    """ComfyUI-style files from the snapshot: the BFL transformer alone, and an all-in-one
    checkpoint with every part under ComfyUI's prefixes."""
    from safetensors.torch import load_file, save_file

    from fluxcore.weights import load_flux, save_flux
    from fluxcore.weights.encoders import load_autoencoder, save_autoencoder

    out = tmp_path_factory.mktemp("single")
    flux_file = save_flux(load_flux(snapshot), out / "flux1-schnell.safetensors", format="bfl")
    ae_file = save_autoencoder(load_autoencoder(snapshot), out / "ae.safetensors", format="bfl")
    clip = load_file(snapshot / "text_encoder" / "model.safetensors")
    t5 = load_file(snapshot / "text_encoder_2" / "model.safetensors")
    everything = {f"model.diffusion_model.{k}": v for k, v in load_file(flux_file).items()}
    everything |= {f"vae.{k}": v for k, v in load_file(ae_file).items()}
    everything |= {
        "text_encoders.clip_l.transformer." + (k if k.startswith("text_model.") else f"text_model.{k}"): v
        for k, v in clip.items()
    }
    everything |= {f"text_encoders.t5xxl.transformer.{k}": v for k, v in t5.items()}
    aio = out / "flux1-schnell-all-in-one.safetensors"
    from safetensors import safe_open

    with safe_open(ae_file, "pt") as f:  # the tiny autoencoder's norm_groups live in its metadata
        metadata = f.metadata()
    save_file({k: v.contiguous() for k, v in everything.items()}, aio, metadata=metadata)
    return {"flux": flux_file, "ae": ae_file, "aio": aio}


def test_all_in_one_checkpoint(single_files, snapshot, reference):
    pipe = FluxPipeline.from_single_file(single_files["aio"], tokenizers=snapshot)
    ref = FluxPipeline.from_pretrained(snapshot)
    for part in ("transformer", "t5", "clip", "ae"):
        ours, theirs = getattr(pipe, part).state_dict(), getattr(ref, part).state_dict()
        assert ours.keys() == theirs.keys(), part
        assert all(torch.equal(ours[k], theirs[k]) for k in ours), part
    # Two settings of these toy encoders are not in their tensor shapes (a 32-wide CLIP's head count,
    # T5's relative_attention_max_distance 20): the configs inferred from shapes are the official
    # models' (CLIP-L: 768 → 12 heads; T5-XXL: 128), so compare images with the snapshot's encoders.
    pipe.clip, pipe.t5 = ref.clip, ref.t5
    np.testing.assert_allclose(pipe("a cat on mars", **KW).images, reference, atol=1e-6, rtol=0)


def test_separate_files_and_missing_parts_are_named(single_files, snapshot, reference):
    with pytest.raises(
        WeightsError, match=r"has no T5 weights; pass t5=PATH .*comfyanonymous/flux_text_encoders"
    ):
        FluxPipeline.from_single_file(single_files["flux"], tokenizers=snapshot)
    with pytest.raises(WeightsError, match=r"has no autoencoder weights; pass ae=PATH .*FLUX.1-schnell"):
        FluxPipeline.from_single_file(
            single_files["flux"],
            t5=snapshot / "text_encoder_2",
            clip=snapshot / "text_encoder",
            tokenizers=snapshot,
        )
    pipe = FluxPipeline.from_single_file(
        single_files["flux"],
        t5=snapshot / "text_encoder_2" / "model.safetensors",
        clip=snapshot / "text_encoder" / "model.safetensors",
        ae=single_files["ae"],
        tokenizers=snapshot,
    )
    np.testing.assert_allclose(pipe("a cat on mars", **KW).images, reference, atol=1e-6, rtol=0)


def test_single_file_tokenizers_default_to_the_hub(single_files, offline):
    with pytest.raises(WeightsError, match=r"pass tokenizers= a folder holding tokenizer/ and tokenizer_2/"):
        FluxPipeline.from_single_file(single_files["aio"])
