"""fluxcore's T5 encoder against transformers' T5EncoderModel (tiny random configs, weights written
by its save_pretrained, sharded too), the tied-embedding variants, fp16/bf16 policy, and the
full-size parameter count."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from fluxcore.errors import ConfigError, WeightsError
from fluxcore.text.t5 import T5_PRESETS, T5Config, T5Encoder, keep_wo_in_fp32, relative_position_bucket
from fluxcore.weights.encoders import load_t5, save_t5


def rel_err(a, b):
    return ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()


def hf_model(seed=0, **kw):
    from transformers import T5Config as HFConfig
    from transformers import T5EncoderModel

    cfg = dict(
        vocab_size=120,
        d_model=32,
        d_kv=8,
        d_ff=48,
        num_layers=3,
        num_heads=4,
        feed_forward_proj="gated-gelu",
        relative_attention_num_buckets=32,
        relative_attention_max_distance=128,
        dropout_rate=0.0,
    )
    cfg.update(kw)
    torch.manual_seed(seed)
    model = T5EncoderModel(HFConfig(**cfg)).eval()
    with torch.no_grad():  # layer norms start at 1: make them non-trivial
        for name, p in model.named_parameters():
            if "layer_norm" in name:
                p.uniform_(0.5, 1.5)
    return model


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    model = hf_model()
    folder = tmp_path_factory.mktemp("t5")
    model.save_pretrained(folder, max_shard_size="20KB")
    assert (folder / "model.safetensors.index.json").is_file()  # really sharded
    return model, folder


# Length 150 > max_distance 128 exercises every bucket kind: exact, log-spaced and clamped.
IDS = torch.randint(0, 120, (2, 150), generator=torch.Generator().manual_seed(1))


def test_matches_transformers_sharded(saved):
    model, folder = saved
    ours = load_t5(folder)
    assert ours.config == T5Config(vocab_size=120, d_model=32, d_kv=8, d_ff=48, num_layers=3, num_heads=4)
    assert not any(p.requires_grad for p in ours.parameters()) and not ours.training
    with torch.no_grad():
        want = model(input_ids=IDS).last_hidden_state
        got = ours(IDS)
    assert got.shape == (2, 150, 32) and got.dtype == torch.float32
    assert rel_err(got, want) <= 1e-5


def test_attention_mask_matches_transformers(saved):
    model, folder = saved
    ours = load_t5(folder)
    mask = torch.ones(2, 150, dtype=torch.long)
    mask[1, 90:] = 0
    with torch.no_grad():
        want = model(input_ids=IDS, attention_mask=mask).last_hidden_state
        got = ours(IDS, attention_mask=mask)
    assert rel_err(got, want) <= 1e-5
    with torch.no_grad():
        assert rel_err(ours(IDS), want) > 1e-3  # the mask matters: a test that can fail


def test_relative_position_bucket_closed_form():
    rel = torch.arange(-300, 301)
    b = relative_position_bucket(rel, bidirectional=True, num_buckets=32, max_distance=128)
    # Exact buckets for |d| < 8; positive distances use the upper half.
    assert (
        b[300].item() == 0
        and b[301].item() == 17
        and b[299].item() == 1
        and b[293].item() == 7
        and b[307].item() == 23
    )
    assert b[308].item() == 24  # distance +8: first log bucket of the upper half
    assert b[300 + 127].item() == 31 and b[300 + 128].item() == 31 and b[0].item() == 15  # clamped
    assert bool((b[300:].diff() >= 0).all()) and bool((b[:300].flip(0).diff() >= 0).all())  # monotone in |d|


@pytest.mark.parametrize("stored", ["shared", "embed_tokens", "both"])
def test_tied_embedding_any_way_stored(saved, tmp_path, stored):
    model, _ = saved
    sd = {k: v.contiguous() for k, v in model.state_dict().items()}
    table = sd.pop("shared.weight")
    sd.pop("encoder.embed_tokens.weight", None)
    if stored in ("shared", "both"):
        sd["shared.weight"] = table.clone()
    if stored in ("embed_tokens", "both"):
        sd["encoder.embed_tokens.weight"] = table.clone()
    save_file(sd, tmp_path / "t5.safetensors")
    ours = load_t5(tmp_path / "t5.safetensors")  # no config.json: inferred from shapes
    assert ours.config.num_layers == 3 and ours.config.num_heads == 4 and ours.config.d_kv == 8
    with torch.no_grad():
        assert rel_err(ours(IDS), model(input_ids=IDS).last_hidden_state) <= 1e-5


def test_missing_or_unexpected_keys_are_errors(saved, tmp_path):
    model, _ = saved
    sd = {k: v.contiguous() for k, v in model.state_dict().items() if k != "encoder.embed_tokens.weight"}
    missing = {k: v for k, v in sd.items() if "block.2.layer.1.DenseReluDense.wo" not in k}
    save_file(missing, tmp_path / "missing.safetensors")
    with pytest.raises(WeightsError, match="missing"):
        load_t5(
            tmp_path / "missing.safetensors",
            config=T5Config(vocab_size=120, d_model=32, d_kv=8, d_ff=48, num_layers=3, num_heads=4),
        )
    save_file(sd | {"decoder.final_layer_norm.weight": torch.ones(32)}, tmp_path / "extra.safetensors")
    with pytest.raises(WeightsError, match="unexpected"):
        load_t5(tmp_path / "extra.safetensors")


def test_save_t5_loads_in_transformers(saved, tmp_path):
    from transformers import T5EncoderModel

    model, folder = saved
    ours = load_t5(folder)
    save_t5(ours, tmp_path / "text_encoder_2")
    again = T5EncoderModel.from_pretrained(tmp_path / "text_encoder_2").eval()
    with torch.no_grad():
        assert rel_err(ours(IDS), again(input_ids=IDS).last_hidden_state) <= 1e-6
    # A model root with text_encoder_2/ inside loads too.
    assert load_t5(tmp_path).config == ours.config


def test_bf16_close_to_transformers(saved):
    from transformers import T5EncoderModel

    _, folder = saved
    ours = load_t5(folder, dtype=torch.bfloat16)
    ref = T5EncoderModel.from_pretrained(folder, dtype=torch.bfloat16).eval()
    assert ours.dtype == torch.bfloat16
    with torch.no_grad():
        got, want = ours(IDS[:, :40]), ref(input_ids=IDS[:, :40]).last_hidden_state
    assert got.dtype == torch.bfloat16 and rel_err(got, want) <= 2e-2


def test_fp16_follows_transformers_policy(saved):
    from transformers import T5EncoderModel

    _, folder = saved
    ours = load_t5(folder, dtype=torch.float16)
    wo = ours.encoder.block[0].layer[1].DenseReluDense.wo.weight
    assert ours.dtype == torch.float16 and wo.dtype == torch.float32  # wo kept in fp32, like transformers
    ref = T5EncoderModel.from_pretrained(folder, dtype=torch.float16).eval()
    assert ref.encoder.block[0].layer[1].DenseReluDense.wo.weight.dtype == torch.float32
    with torch.no_grad():
        got, want = ours(IDS[:, :40]), ref(input_ids=IDS[:, :40]).last_hidden_state
    assert got.dtype == want.dtype == torch.float16 and rel_err(got, want) <= 2e-3
    with pytest.raises(ConfigError, match="float16"):
        ours.half()(IDS[:, :8])  # every weight fp16, wo included: refused
    keep_wo_in_fp32(ours)
    ours(IDS[:, :8])


@pytest.mark.gpu
def test_cuda_load_defaults_to_bf16(saved):
    _, folder = saved
    ours = load_t5(folder, device="cuda")
    assert ours.dtype == torch.bfloat16 and ours.device.type == "cuda"
    ref = load_t5(folder)
    with torch.no_grad():
        assert rel_err(ours(IDS[:, :40].cuda()).cpu(), ref(IDS[:, :40])) <= 3e-2


def test_config_from_hf_dict(saved):
    _, folder = saved
    d = json.loads((folder / "config.json").read_text())
    assert T5Config.from_hf_dict(d).d_ff == 48
    with pytest.raises(ConfigError, match="gated"):
        T5Config.from_hf_dict(d | {"feed_forward_proj": "relu", "is_gated_act": False})


def test_full_size_parameter_count():
    assert T5_PRESETS["t5-v1_1-xxl"] == T5Config(
        vocab_size=32128,
        d_model=4096,
        d_kv=64,
        d_ff=10240,
        num_layers=24,
        num_heads=64,
        relative_attention_num_buckets=32,
        relative_attention_max_distance=128,
        layer_norm_epsilon=1e-6,
    )
    with torch.device("meta"):
        model = T5Encoder(T5_PRESETS["t5-v1_1-xxl"])
    assert sum(p.numel() for p in model.parameters()) == 4_762_310_656
    keys = set(model.state_dict())
    assert "shared.weight" in keys and "encoder.block.23.layer.1.DenseReluDense.wo.weight" in keys
    assert "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight" in keys
    assert "encoder.block.1.layer.0.SelfAttention.relative_attention_bias.weight" not in keys


def test_tiny_preset_round_trip(tmp_path):
    torch.manual_seed(0)
    model = T5Encoder(T5_PRESETS["tiny"]).eval()
    save_t5(model, tmp_path)
    again = load_t5(tmp_path)
    ids = torch.randint(0, 32128, (1, 12))
    with torch.no_grad():
        assert torch.equal(model(ids), again(ids))
    assert set(load_file(tmp_path / "model.safetensors")) == set(model.state_dict())
