"""T5 and CLIP tokenizers against transformers' T5TokenizerFast / CLIPTokenizer on vocabularies
trained here (a sentencepiece unigram model, a byte-level BPE): identical ids over a few hundred
awkward prompts, padding and truncation at several max_lengths, and the truncation warning."""

import io
import json
import random
import string
import warnings

import pytest
import torch

from fluxcore.text.tokenizers import CLIPTokenizer, PromptTruncatedWarning, T5Tokenizer

WORDS = (
    "a photo of an astronaut riding horse on mars cat dog in the style of van gogh cinematic lighting "
    "café naïve résumé Ångström ÉCOLE straße Ça señor São Paulo Zürich 東京 日本語 中文 한국어 Ελληνικά "
    "русский العربية emoji 🙂 🚀 👩‍🚀 ❤️ it's don't we're I'll they've she'd I'm 42 3.14 1,000,000 "
    "hello, world! (parenthesis) [brackets] {braces} \"quotes\" 'single' -- ... ?! #hashtag @user "
    "e-mail x+y=z 50% $100 C++ <html> a/b\\c ~tilde ^caret _under_ `tick` ©®™ ½ ｆｕｌｌ ﬁ"
).split()


def make_prompts(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    fixed = [
        "",
        " ",
        "   ",
        "\t\n",
        "a",
        "A",
        "hello world",
        "  hello   world  ",
        "HELLO World",
        "tab\there\nnewline\r\nend",
        "multiple     spaces",
        "ÀÉÎÕÜ àéîõü",
        "e\u0301 composed vs é",
        "🙂🙂🙂",
        "👩‍🚀 astronaut",
        "☃ snowman ⛄",
        "123456789",
        "3.14159",
        "it's",
        "IT'S",
        "!!!???...",
        "a,b,c;d:e",
        "x</s>y",
        "hello</s>",
        "<pad> <unk>",
        "a <extra_id_0> b <extra_id_10>c",
        "<|startoftext|>hi<|endoftext|>",
        "<|endoftext|>",
        "▁ok",
        "zero\u200bwidth",
        "non\u00a0breaking",
        "ﬁne ligature",
        "ｆｕｌｌ width",
        "ß ẞ",
        "İstanbul",
        "x" * 300,
        "word " * 200,
    ]
    out = list(fixed)
    while len(out) < n:
        k = rng.choice([1, 3, 8, 20, 60, 150])
        words = [rng.choice(WORDS) for _ in range(k)]
        seps = [rng.choice([" ", " ", " ", "  ", ", ", "\t", "\n", ""]) for _ in range(k)]
        text = "".join(w + s for w, s in zip(words, seps))
        if rng.random() < 0.2:
            text = text.upper()
        if rng.random() < 0.1:
            text = "   " + text + "   "
        out.append(text)
    return out


PROMPTS = make_prompts(300)


def corpus(seed=1, n=3000) -> list[str]:
    rng = random.Random(seed)
    extra = [
        "".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(2, 8))) for _ in range(500)
    ]
    pool = WORDS + extra
    return [" ".join(rng.choice(pool) for _ in range(rng.randint(1, 15))) for _ in range(n)]


# --- T5 -------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def t5_folders(tmp_path_factory):
    """(spiece-only folder, folder saved by transformers with tokenizer.json, HF tokenizer)."""
    import sentencepiece as spm
    from transformers import T5TokenizerFast

    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus()),
        model_writer=buf,
        vocab_size=500,
        model_type="unigram",
        pad_id=0,
        eos_id=1,
        unk_id=2,
        bos_id=-1,
        character_coverage=1.0,
        minloglevel=2,
    )
    spiece = tmp_path_factory.mktemp("t5_spiece")
    (spiece / "spiece.model").write_bytes(buf.getvalue())
    hf = T5TokenizerFast.from_pretrained(spiece)
    saved = tmp_path_factory.mktemp("t5_saved")
    hf.save_pretrained(saved)
    assert (saved / "tokenizer.json").is_file()
    return spiece, saved, hf


@pytest.mark.parametrize("backend", ["sentencepiece", "tokenizer.json"])
@pytest.mark.parametrize("max_length", [512, 16])
def test_t5_ids_match_transformers(t5_folders, backend, max_length):
    spiece, saved, hf = t5_folders
    folder = spiece if backend == "sentencepiece" else saved
    ours = T5Tokenizer.from_folder(folder)
    want = hf(
        PROMPTS, padding="max_length", max_length=max_length, truncation=True, return_tensors="pt"
    ).input_ids
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PromptTruncatedWarning)
        got = ours(PROMPTS, max_length=max_length)
    assert got.dtype == torch.int64 and got.shape == (len(PROMPTS), max_length)
    bad = [i for i in range(len(PROMPTS)) if not torch.equal(got[i], want[i])]
    assert not bad, (
        f"{len(bad)} prompts differ, first {PROMPTS[bad[0]]!r}: {got[bad[0]].tolist()[:24]} vs {want[bad[0]].tolist()[:24]}"
    )


def test_t5_layout_and_warning(t5_folders, tmp_path):
    spiece, _, _ = t5_folders
    (tmp_path / "spiece.model").write_bytes((spiece / "spiece.model").read_bytes())
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 24, "extra_ids": 0}))
    assert T5Tokenizer.from_folder(tmp_path).max_length == 24  # the folder's model_max_length
    assert T5Tokenizer.from_folder(spiece).max_length == 512
    tok = T5Tokenizer.from_folder(spiece, max_length=8)
    ids = tok(["", "a"])
    assert ids[0].tolist() == [tok.eos_id] + [tok.pad_id] * 7  # empty prompt: </s> then padding
    assert ids[1, -1] == tok.pad_id
    long = " ".join(["astronaut"] * 20)
    n = len(tok._encode_batch([long])[0])
    with pytest.warns(PromptTruncatedWarning, match=rf"{n - 7} tokens were dropped"):
        out = tok(long)
    assert out[0, -1] == tok.eos_id
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tok("short")  # no warning when nothing is lost


# --- CLIP -----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def clip_folder(tmp_path_factory):
    """A byte-level BPE vocabulary trained here with CLIP's pre-tokenization; like the real one,
    the two special tokens get the highest ids."""
    from tokenizers import Regex, Tokenizer, normalizers, pre_tokenizers, trainers
    from tokenizers.models import BPE

    from fluxcore.text.tokenizers import CLIP_PATTERN

    tok = Tokenizer(BPE(unk_token="<|endoftext|>", end_of_word_suffix="</w>"))
    tok.normalizer = normalizers.Sequence(
        [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()]
    )
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(CLIP_PATTERN), behavior="removed", invert=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False),
        ]
    )
    trainer = trainers.BpeTrainer(
        vocab_size=700,
        special_tokens=["<|startoftext|>", "<|endoftext|>"],
        end_of_word_suffix="</w>",
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus(seed=2), trainer=trainer)
    folder = tmp_path_factory.mktemp("clip_tok")
    model = json.loads(tok.to_str())["model"]
    specials = ["<|startoftext|>", "<|endoftext|>"]
    words = [
        w for w, _ in sorted(model["vocab"].items(), key=lambda kv: kv[1]) if w not in specials
    ] + specials
    (folder / "vocab.json").write_text(json.dumps({w: i for i, w in enumerate(words)}, ensure_ascii=False))
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    (folder / "special_tokens_map.json").write_text(
        json.dumps(
            {
                "bos_token": "<|startoftext|>",
                "eos_token": "<|endoftext|>",
                "pad_token": "<|endoftext|>",
                "unk_token": "<|endoftext|>",
            }
        )
    )
    (folder / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 77, "do_lower_case": True}))
    return folder


@pytest.mark.parametrize("max_length", [77, 10])
def test_clip_ids_match_transformers(clip_folder, max_length):
    from transformers import CLIPTokenizer as HFCLIPTokenizer

    hf = HFCLIPTokenizer.from_pretrained(clip_folder)
    ours = CLIPTokenizer.from_folder(clip_folder)
    want = hf(
        PROMPTS, padding="max_length", max_length=max_length, truncation=True, return_tensors="pt"
    ).input_ids
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PromptTruncatedWarning)
        got = ours(PROMPTS, max_length=max_length)
    assert got.shape == (len(PROMPTS), max_length)
    bad = [i for i in range(len(PROMPTS)) if not torch.equal(got[i], want[i])]
    assert not bad, (
        f"{len(bad)} prompts differ, first {PROMPTS[bad[0]]!r}: {got[bad[0]].tolist()[:24]} vs {want[bad[0]].tolist()[:24]}"
    )


def test_clip_layout_and_warning(clip_folder):
    tok = CLIPTokenizer.from_folder(clip_folder)
    assert tok.max_length == 77
    ids = tok("")
    assert ids[0, :2].tolist() == [tok.bos_id, tok.eos_id] and (ids[0, 2:] == tok.pad_id).all()
    assert tok("A Cat")[0].tolist() == tok("a    cat")[0].tolist()  # lower case, whitespace runs
    with pytest.warns(
        PromptTruncatedWarning, match=r"100 tokens but max_length=77 keeps 75 .*: 25 tokens were dropped"
    ):
        out = tok(" ".join(["7"] * 100))  # digits are one token each
    assert out[0, 0] == tok.bos_id and out[0, -1] == tok.eos_id


# --- encode_prompt: tokenizers + encoders, against the reference flow with transformers ----------


def test_encode_prompt_matches_reference_flow(t5_folders, clip_folder):
    """BFL's HFEmbedder: tokenizer(padding="max_length", truncation=True) → encoder with no attention
    mask → T5 last_hidden_state / CLIP pooler_output."""
    from transformers import CLIPTextConfig as HFCLIPConfig
    from transformers import CLIPTextModel, T5EncoderModel
    from transformers import CLIPTokenizer as HFCLIPTokenizer
    from transformers import T5Config as HFT5Config

    from fluxcore.text import encode_prompt
    from fluxcore.text.clip import CLIPTextEncoder
    from fluxcore.text.t5 import T5Encoder

    spiece, _, hf_t5_tok = t5_folders
    hf_clip_tok = HFCLIPTokenizer.from_pretrained(clip_folder)
    torch.manual_seed(0)
    hf_t5 = T5EncoderModel(
        HFT5Config(
            vocab_size=len(hf_t5_tok),
            d_model=32,
            d_kv=8,
            d_ff=48,
            num_layers=2,
            num_heads=4,
            feed_forward_proj="gated-gelu",
            dropout_rate=0.0,
        )
    ).eval()
    hf_clip = CLIPTextModel(
        HFCLIPConfig(
            vocab_size=len(hf_clip_tok),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=77,
            eos_token_id=2,
            bos_token_id=0,
            pad_token_id=1,
        )
    ).eval()
    t5 = T5Encoder(_t5_config(hf_t5.config)).eval()
    t5.load_state_dict({k: v for k, v in hf_t5.state_dict().items() if k != "encoder.embed_tokens.weight"})
    clip = CLIPTextEncoder(_clip_config(hf_clip.config)).eval()
    clip.load_state_dict({"text_model." + k: v for k, v in hf_clip.state_dict().items()})

    prompts = ["a photo of a cat", "", "ÉCOLE 🙂 " * 30]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PromptTruncatedWarning)
        txt, txt_ids, vec = encode_prompt(
            prompts,
            t5=t5,
            clip=clip,
            t5_tokenizer=T5Tokenizer.from_folder(spiece),
            clip_tokenizer=CLIPTokenizer.from_folder(clip_folder),
            max_length=64,
            num_images_per_prompt=2,
        )
    kw = dict(padding="max_length", truncation=True, return_tensors="pt")
    with torch.no_grad():
        want_txt = hf_t5(input_ids=hf_t5_tok(prompts, max_length=64, **kw).input_ids).last_hidden_state
        want_vec = hf_clip(input_ids=hf_clip_tok(prompts, max_length=77, **kw).input_ids).pooler_output
    assert txt.shape == (6, 64, 32) and txt_ids.shape == (6, 64, 3) and vec.shape == (6, 32)
    assert txt_ids.dtype == torch.float32 and not txt_ids.any()
    for i in range(3):
        for j in (2 * i, 2 * i + 1):
            assert ((txt[j] - want_txt[i]).abs().max() / want_txt[i].abs().max()).item() <= 1e-5
            assert ((vec[j] - want_vec[i]).abs().max() / want_vec[i].abs().max()).item() <= 1e-5


def _t5_config(c):
    from fluxcore.text.t5 import T5Config

    return T5Config.from_hf_dict(c.to_dict())


def _clip_config(c):
    from fluxcore.text.clip import CLIPTextConfig

    return CLIPTextConfig.from_hf_dict(c.to_dict())
