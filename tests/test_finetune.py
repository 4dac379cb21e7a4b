"""LoRA fine-tuning (fluxcore.finetune, fluxcore.lora.save): gradients against an explicitly merged
W + s·B·A model, a frozen base that never changes, saved files read by diffusers (PEFT and kohya)
with the same output as fluxcore, exact resume, the data folder's errors, and the demo's smoke run."""

import copy
import sys
from pathlib import Path

import pytest
import torch
from test_lora import diffusers_twin, make_inputs, max_err, run_ours, run_ref, snapshot, tiny_flux

from fluxcore import lora as L
from fluxcore.errors import ConfigError
from fluxcore.finetune import (
    FinetuneConfig,
    ImageTooSmallError,
    LoraTrainer,
    MissingCaptionError,
    UnreadableImageError,
    add_trainable_lora,
    apply_checkpointing,
    fp8_base,
    make_buckets,
    remove_checkpointing,
    scan_folder,
    train_lora_main,
    transformer_targets,
)
from fluxcore.finetune.config import TIMESTEPS
from fluxcore.finetune.loop import training_timesteps

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "fluxcore" / "assets" / "flux-tiny"
needs_tiny = pytest.mark.skipif(not (TINY / "transformer" / "config.json").is_file(), reason="no tiny model")


def lora_model(preset="all", blocks="both", seed=0, rank=3, alpha=1.5):
    model = tiny_flux(seed)
    made = add_trainable_lora(model, transformer_targets(model, preset, blocks), rank=rank, alpha=alpha)
    g = torch.Generator().manual_seed(seed + 7)
    with torch.no_grad():
        for a in made.values():
            a.B.normal_(0, 0.2, generator=g)
    return model, made


def call(model, x, fn=None, params=None):
    b = x["img"].shape[0]
    args = (x["img"], x["img_ids"].expand(b, -1, -1), x["txt"], x["txt_ids"].expand(b, -1, -1),
            x["timesteps"], x["y"], x["guidance"])  # fmt: skip
    if params is not None:
        return torch.func.functional_call(model, params, args, strict=False)
    return model(*args)


# --- the adapters ----------------------------------------------------------------------------------


@pytest.mark.parametrize("preset", ["attention", "all"])
def test_gradients_equal_the_merged_model_and_base_stays_frozen(preset):
    model, made = lora_model(preset)
    base = snapshot(model)
    x = make_inputs()
    call(model, x).square().mean().backward()

    # the oracle: a plain model whose weights are W + s·B·A, differentiated through A and B
    ref = tiny_flux(0)
    A = {p: a.A.detach().clone().requires_grad_(True) for p, a in made.items()}
    B = {p: a.B.detach().clone().requires_grad_(True) for p, a in made.items()}
    params = dict(ref.named_parameters())
    merged = {}
    for p, a in made.items():
        full = torch.nn.functional.pad(B[p], (0, 0, a.start, a.out_features - a.start - a.length))
        merged[p + ".weight"] = params[p + ".weight"].detach() + a.scale * full @ A[p]
    call(ref, x, params=merged).square().mean().backward()
    worst = max(max(max_err(a.A.grad, A[p].grad), max_err(a.B.grad, B[p].grad)) for p, a in made.items())
    assert worst <= 1e-6, worst
    assert all(a.B.grad.abs().sum() > 0 for a in made.values())
    # an optimizer step on the adapter never touches the base, bit for bit
    opt = torch.optim.AdamW([q for a in made.values() for q in a.parameters()], lr=1e-2)
    opt.step()
    assert all(torch.equal(v, base[k]) for k, v in model.state_dict().items())
    trainable = [n for n, q in model.named_parameters() if q.requires_grad]
    assert trainable and all(n.endswith((".A", ".B")) for n in trainable)


def test_attention_preset_trains_only_qkv_rows_of_linear1():
    model, made = lora_model("attention")
    H = model.config.hidden_size
    a = made["single_blocks.0.linear1"]
    assert (a.start, a.length, a.out_features) == (0, 3 * H, a.out_features)
    assert a.delta_weight()[3 * H :].abs().max() == 0
    assert "double_blocks.0.img_mlp.0" not in made and "double_blocks.0.img_mod.lin" not in made
    assert "single_blocks.0.modulation.lin" in transformer_targets(tiny_flux(), "all")
    n_single = len(model.single_blocks)
    assert set(transformer_targets(tiny_flux(), "all", "single")) == {
        f"single_blocks.{i}.{n}" for i in range(n_single) for n in ("linear1", "linear2", "modulation.lin")
    }


def test_checkpointing_fp8_and_dropout_keep_keys_and_values():
    model, made = lora_model("attention_mlp")
    keys = list(model.state_dict())
    x = make_inputs()
    want = call(model, x).square().mean()
    want.backward()
    grads = {p: a.A.grad.clone() for p, a in made.items()}
    for a in made.values():
        a.A.grad = a.B.grad = None
    wrapped = apply_checkpointing(model)
    assert len(wrapped) == len(model.double_blocks) + len(model.single_blocks)
    assert list(model.state_dict()) == keys
    assert "double_blocks.0.img_attn.qkv" in dict(model.named_modules())  # paths unchanged
    model.train()
    got = call(model, x).square().mean()
    got.backward()
    assert max_err(got, want) <= 1e-6
    assert max(max_err(a.A.grad, grads[p]) for p, a in made.items()) <= 1e-6
    assert remove_checkpointing(model) == wrapped and list(model.state_dict()) == keys

    q = tiny_flux(0)
    assert fp8_base(q)
    made = add_trainable_lora(q, transformer_targets(q, "attention"), rank=2, alpha=2.0, dropout=0.5)
    assert q.double_blocks[0].img_attn.qkv.base.weight.dtype == torch.float8_e4m3fn
    q.train()
    call(q, x).square().mean().backward()
    assert all(a.A.grad is not None for a in made.values())


def test_timesteps_methods():
    cfg = FinetuneConfig()
    for method in TIMESTEPS:
        t = training_timesteps(4096, FinetuneConfig(timesteps=method), 1024, torch.Generator().manual_seed(0))
        assert t.shape == (4096,) and 0 < t.min() and t.max() < 1, method
    s = training_timesteps(4096, FinetuneConfig(timesteps="shift"), 16, torch.Generator().manual_seed(0))
    base = training_timesteps(4096, cfg, 16, torch.Generator().manual_seed(0))
    k = cfg.discrete_flow_shift
    torch.testing.assert_close(s, base * k / (1 + (k - 1) * base))


# --- saving: fluxcore and diffusers read the files ------------------------------------------------


@pytest.mark.parametrize("fmt", ["peft", "kohya"])
def test_saved_files_load_in_fluxcore_and_diffusers(tmp_path, fmt):
    diffusers = pytest.importorskip("diffusers")
    # diffusers' kohya converter assumes full-size single blocks (linear1 split at 3072), so the
    # kohya file for it holds double blocks; fluxcore reads both kinds at any size
    model, _ = lora_model("all", "both" if fmt == "peft" else "double")
    x = make_inputs()
    ours = run_ours(model, x)
    path = L.save_lora(model, tmp_path / "pytorch_lora_weights.safetensors", format=fmt)

    back = tiny_flux(0)
    name = L.load_lora(back, path)
    assert name.format == ("diffusers/peft" if fmt == "peft" else "kohya")
    assert max_err(run_ours(back, x), ours) <= 1e-5

    ref = diffusers_twin(tiny_flux(0))
    if fmt == "peft":
        ref.load_lora_adapter(str(tmp_path), weight_name=path.name, adapter_name="t", prefix="transformer")
    else:
        sd, alphas = diffusers.FluxPipeline.lora_state_dict(str(path), return_alphas=True)
        diffusers.FluxPipeline.load_lora_into_transformer(sd, network_alphas=alphas, transformer=ref)
    assert max_err(run_ref(ref, x), ours) <= 1e-5


# --- data ------------------------------------------------------------------------------------------


def write_images(folder, n=4, size=(64, 64), caption=True, start=0):
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    for i in range(start, start + n):
        Image.new("RGB", size, ((40 * i) % 256, 90, 200)).save(folder / f"img{i}.png")
        if caption:
            (folder / f"img{i}.txt").write_text(f"a red circle number {i}")


def test_folder_errors_buckets_and_trigger(tmp_path):
    write_images(tmp_path / "ok", 2)
    write_images(tmp_path / "ok", 1, size=(96, 48), start=2)
    items = scan_folder(tmp_path / "ok", resolution=64, bucket_step=16, trigger_word="zxq")
    assert items[0].caption == "zxq, a red circle number 0"
    assert items[2].bucket == (80, 48) and items[0].bucket == (64, 64)
    assert all(w * h <= 64 * 64 and w % 16 == h % 16 == 0 for w, h in make_buckets(64, 16))
    (tmp_path / "ok" / "img0.txt").write_text("a photo of [trigger] at night")
    assert (
        scan_folder(tmp_path / "ok", resolution=64, trigger_word="zxq")[0].caption
        == "a photo of zxq at night"
    )

    write_images(tmp_path / "nocap", 1, caption=False)
    with pytest.raises(MissingCaptionError, match="img0.txt"):
        scan_folder(tmp_path / "nocap", resolution=64)
    write_images(tmp_path / "bad", 1)
    (tmp_path / "bad" / "img0.png").write_bytes(b"not a png")
    with pytest.raises(UnreadableImageError, match="img0.png"):
        scan_folder(tmp_path / "bad", resolution=64)
    write_images(tmp_path / "small", 1, size=(20, 20))
    with pytest.raises(ImageTooSmallError, match="20x20"):
        scan_folder(tmp_path / "small", resolution=64)
    with pytest.raises(ConfigError, match="rank"):
        FinetuneConfig(rank=0)
    toml = tmp_path / "c.toml"
    toml.write_text('model = "m"\n[lora]\nrank = 4\nalpha = 4\n[data]\ndata_dir = "d"\nbogus = 1\n')
    with pytest.raises(ConfigError, match="bogus"):
        FinetuneConfig.from_toml(toml)


# --- the run: resume, outputs, command ----------------------------------------------------------------


@pytest.fixture(scope="module")
def pipe():
    from fluxcore import FluxPipeline

    torch.set_num_threads(min(2, torch.get_num_threads()))
    return FluxPipeline.from_pretrained(TINY)


def run_config(out, data, **kw):
    values = dict(
        model=str(TINY), data_dir=str(data), output_dir=str(out), resolution=64, bucket_step=16, rank=4,
        alpha=4.0, targets="attention", steps=6, batch_size=2, lr=1e-3, warmup=2, scheduler="cosine",
        dropout=0.1, ema_decay=0.9, checkpoint_every=3,
    )  # fmt: skip
    values.update(kw)
    return FinetuneConfig(**values)


@needs_tiny
def test_resume_reproduces_the_loss_sequence_exactly(tmp_path, pipe):
    data = tmp_path / "data"
    write_images(data, 3)
    write_images(data, 2, size=(96, 64), start=3)  # a second bucket
    want = LoraTrainer(run_config(tmp_path / "a", data), pipe=pipe).train(progress=False)
    assert len(want) == 6

    first = LoraTrainer(run_config(tmp_path / "b", data), pipe=pipe)
    assert first.train(stop_after=4, progress=False) == want[:4]  # stops after step 4; step 3 was saved
    second = LoraTrainer(run_config(tmp_path / "b", data, resume="auto"), pipe=pipe)
    assert second.cache_stats == {"latents": 0, "text": 0}  # everything came from the disk cache
    assert second.train(progress=False) == want[3:]
    a = L.read_lora(tmp_path / "a" / "lora.safetensors")[0]
    b = L.read_lora(tmp_path / "b" / "lora.safetensors")[0]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert sorted(p.name for p in (tmp_path / "b" / "checkpoints").iterdir()) == [
        "step-000003",
        "step-000006",
    ]


@needs_tiny
def test_command_writes_both_formats_and_samples(tmp_path, pipe):
    write_images(tmp_path / "data", 2)
    toml = tmp_path / "run.toml"
    toml.write_text(
        f'model = "{TINY}"\ndata_dir = "data"\noutput_dir = "out"\n[train]\nsteps = 2\nresolution = 64\n'
        'bucket_step = 16\nrank = 2\nalpha = 2\nformats = ["peft", "kohya"]\ntrain_text_encoder = true\n'
        'sample_prompts = ["a red ring"]\nsample_steps = 2\ngradient_checkpointing = true\n'
    )
    assert (
        train_lora_main(
            [str(toml), "--quiet", "--lr", "1e-3", "--timesteps", "flux_shift", "--mixed-precision", "bf16"]
        )
        == 0
    )
    out = tmp_path / "out"
    assert (out / "samples" / "step-000002_0.png").is_file()
    peft, meta, _ = L.read_lora(out / "lora.safetensors")
    assert any(k.startswith("text_encoder.") for k in peft) and "lora_adapter_metadata" in meta
    kohya = L.read_lora(out / "lora_kohya.safetensors")[0]
    assert any(k.startswith("lora_te1_") for k in kohya) and any(k.endswith(".alpha") for k in kohya)
    t = copy.deepcopy(pipe.transformer)
    assert L.load_lora(t, out / "lora_kohya.safetensors").format == "kohya"
    clip = copy.deepcopy(pipe.clip)
    assert L.load_lora(clip, out / "lora.safetensors").targets
    L.load_lora(t := copy.deepcopy(pipe.transformer), out / "lora.safetensors")

    # diffusers' pipeline reads the PEFT file (transformer + CLIP) and computes what fluxcore does
    diffusers = pytest.importorskip("diffusers")
    ref = diffusers.FluxPipeline.from_pretrained(TINY)
    ref.load_lora_weights(str(out), weight_name="lora.safetensors")
    ids = pipe.clip_tokenizer(["a red ring in the center"])
    with torch.no_grad():
        ours, theirs = clip(ids).pooler_output, ref.text_encoder(ids).pooler_output
        assert (ours - pipe.clip(ids).pooler_output).abs().max() > 0  # the adapter does something
    assert max_err(ours, theirs) <= 1e-5
    x = make_inputs(t.config, grid=(4, 4))
    assert max_err(run_ours(t, x), run_ref(ref.transformer, x)) <= 1e-5
    assert train_lora_main(["--model", str(TINY), "--data-dir", str(tmp_path / "nothing")]) == 2


@needs_tiny
def test_demo_smoke(tmp_path):
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        import finetune_tiny
    finally:
        sys.path.remove(str(ROOT / "scripts"))
    assert finetune_tiny.main(["--smoke", "--out", str(tmp_path), "--threads", "1"]) == 0
    assert (tmp_path / "lora" / "ring.safetensors").is_file()
    from fluxcore.toydata import ShapeSpec, classify, render

    ring = finetune_tiny.render_ring("red", "center", "blue")
    assert finetune_tiny.is_ring(ring, classify(ring))
    disc = render(ShapeSpec("red", "circle", "center", "blue"))
    assert not finetune_tiny.is_ring(disc, classify(disc))
