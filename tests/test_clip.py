"""fluxcore's CLIP text encoder against transformers' CLIPTextModel (tiny random configs, weights
written by its save_pretrained, sharded too): last hidden state and pooled output, both EOS rules,
and the full-size parameter count."""

import pytest
import torch
from safetensors.torch import save_file

from fluxcore.errors import WeightsError
from fluxcore.text.clip import CLIP_PRESETS, LEGACY_EOS_TOKEN_ID, CLIPTextConfig, CLIPTextEncoder
from fluxcore.weights.encoders import load_clip, save_clip

VOCAB = 100
BOS, EOS = VOCAB - 2, VOCAB - 1  # like the real vocabulary: the special tokens have the top ids


def rel_err(a, b):
    return ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()


def hf_model(eos_token_id, seed=0, **kw):
    from transformers import CLIPTextConfig as HFConfig
    from transformers import CLIPTextModel

    cfg = dict(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        max_position_embeddings=20,
        hidden_act="quick_gelu",
        eos_token_id=eos_token_id,
        bos_token_id=BOS,
        pad_token_id=1,
    )
    cfg.update(kw)
    torch.manual_seed(seed)
    model = CLIPTextModel(HFConfig(**cfg)).eval()
    with torch.no_grad():  # layer norms start at (1, 0): make them non-trivial
        for name, p in model.named_parameters():
            if "layer_norm" in name:
                p.add_(torch.randn_like(p) * 0.2)
    return model


def official_names(sd):
    """transformers >= 5 drops the `text_model.` prefix that the official files (and fluxcore) use."""
    return {(k if k.startswith("text_model.") else "text_model." + k): v.contiguous() for k, v in sd.items()}


def prompt_ids(lengths, L=20, pad=EOS):
    """[BOS, content..., EOS, pad...] rows, content ids below the special ones."""
    g = torch.Generator().manual_seed(3)
    rows = []
    for n in lengths:
        content = torch.randint(2, BOS, (n,), generator=g).tolist()
        row = [BOS] + content + [EOS]
        rows.append(row + [pad] * (L - len(row)))
    return torch.tensor(rows)


@pytest.mark.parametrize("eos_rule", ["legacy", "eos_id"])
def test_matches_transformers(tmp_path, eos_rule):
    # legacy: eos_token_id=2 → argmax of ids (the official FLUX config); else the first EOS id.
    model = hf_model(LEGACY_EOS_TOKEN_ID if eos_rule == "legacy" else EOS)
    model.save_pretrained(tmp_path, max_shard_size="20KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    ours = load_clip(tmp_path)
    assert ours.config.eos_token_id == model.config.eos_token_id
    ids = prompt_ids([0, 3, 17, 9])
    with torch.no_grad():
        want = model(input_ids=ids)
        got = ours(ids)
    assert got.last_hidden_state.shape == (4, 20, 32) and got.pooler_output.shape == (4, 32)
    assert rel_err(got.last_hidden_state, want.last_hidden_state) <= 1e-5
    assert rel_err(got.pooler_output, want.pooler_output) <= 1e-5
    # The pooled vector is the final-normed state at the EOS position.
    assert torch.equal(got.pooler_output[2], got.last_hidden_state[2, 18])


def test_eos_rules_differ_like_transformers():
    """With eos_token_id=2 (legacy) the pooled position is the argmax of the ids; with any other
    value it is the first position of that id. Both match transformers under their own config."""
    ids = torch.tensor([[BOS - 1, 10, 7, 11, 12, EOS, 7, 0], [3, 7, 4, 5, EOS, 6, 0, 0]])
    for eos_id, pos in ((LEGACY_EOS_TOKEN_ID, [5, 4]), (7, [2, 1])):
        model = hf_model(eos_id)
        ours = CLIPTextEncoder(
            CLIPTextConfig(
                vocab_size=VOCAB,
                hidden_size=32,
                intermediate_size=64,
                num_hidden_layers=3,
                num_attention_heads=4,
                max_position_embeddings=20,
                eos_token_id=eos_id,
            )
        )
        ours.load_state_dict(official_names(model.state_dict()))
        with torch.no_grad():
            got, want = ours(ids), model(input_ids=ids)
        assert rel_err(got.pooler_output, want.pooler_output) <= 1e-5
        assert torch.equal(got.pooler_output, got.last_hidden_state[[0, 1], pos])


def test_file_without_config_and_position_ids(tmp_path):
    model = hf_model(LEGACY_EOS_TOKEN_ID)
    sd = official_names(model.state_dict())  # the official layout, as in FLUX's text_encoder/
    sd["text_model.embeddings.position_ids"] = torch.arange(20)[None]  # older transformers saved this buffer
    save_file(sd, tmp_path / "clip_l.safetensors")
    ours = load_clip(tmp_path / "clip_l.safetensors", config=None)
    # Shapes give everything but the head count (CLIP heads are 64 wide → 1 head at width 32), so pass it.
    assert ours.config.num_hidden_layers == 3 and ours.config.max_position_embeddings == 20
    ours = load_clip(tmp_path / "clip_l.safetensors", config=ours.config.replace(num_attention_heads=4))
    ids = prompt_ids([5, 12])
    with torch.no_grad():
        assert rel_err(ours(ids).pooler_output, model(input_ids=ids).pooler_output) <= 1e-5
    del sd["text_model.final_layer_norm.bias"]
    save_file(sd, tmp_path / "broken.safetensors")
    with pytest.raises(WeightsError, match="final_layer_norm.bias"):
        load_clip(tmp_path / "broken.safetensors")


def test_save_clip_loads_in_transformers(tmp_path):
    from transformers import CLIPTextModel

    torch.manual_seed(0)
    ours = CLIPTextEncoder(CLIP_PRESETS["tiny"]).eval()
    save_clip(ours, tmp_path / "text_encoder")
    ref = CLIPTextModel.from_pretrained(tmp_path / "text_encoder").eval()
    ids = torch.tensor([[49406, 320, 1929, 49407] + [49407] * 73])
    with torch.no_grad():
        assert rel_err(ours(ids).pooler_output, ref(input_ids=ids).pooler_output) <= 1e-5
    again = load_clip(tmp_path)  # model root with text_encoder/ inside
    assert again.config == ours.config


def test_too_long_input_is_an_error():
    model = CLIPTextEncoder(CLIP_PRESETS["tiny"].replace(max_position_embeddings=8))
    with pytest.raises(ValueError, match="at most 8 tokens"):
        model(torch.zeros(1, 9, dtype=torch.long))


def test_full_size_parameter_count():
    cfg = CLIP_PRESETS["clip-vit-large-patch14"]
    assert (
        cfg.vocab_size,
        cfg.hidden_size,
        cfg.intermediate_size,
        cfg.num_hidden_layers,
        cfg.num_attention_heads,
        cfg.max_position_embeddings,
        cfg.hidden_act,
        cfg.eos_token_id,
    ) == (49408, 768, 3072, 12, 12, 77, "quick_gelu", 2)
    with torch.device("meta"):
        model = CLIPTextEncoder(cfg)
    assert sum(p.numel() for p in model.parameters()) == 123_060_480
