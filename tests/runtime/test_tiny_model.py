"""make_tiny_model: deterministic, loadable by transformers, a working byte-level tokenizer and chat template."""

from __future__ import annotations

import hashlib
import unicodedata
from pathlib import Path

import pytest
import torch

from radixlm.runtime.tiny_model import make_tiny_model

ARCHS = ("llama", "qwen2", "mistral")
TEXTS = [
    "Hello, world! The answer is 42.",
    '{"name": "café", "items": [1, 2.5, null], "ok": true}',
    "def f(x):\n    return x * 2  # comment\n\n\tindented\r\n",
    "naïve résumé façade Zürich São Москва Ελλάδα",
    "中文 你好世界 日本語 こんにちは 한국어 — “quotes” → €",
    "emoji 😀🚀👍🏽🎉 and a rare one: 🦜 and 𝔘𝔫𝔦",
    "   leading and trailing spaces   ",
    "",
]


def _digest(d: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(d.iterdir())}


def _tok(path: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


@pytest.mark.slow
def test_same_arguments_give_byte_identical_files(tmp_path, make_model):
    from radixlm.runtime.cli import main

    make_tiny_model(str(tmp_path / "a"), arch="qwen2", preset="tiny", seed=0)
    main(["make-tiny-model", str(tmp_path / "b"), "--arch", "qwen2", "--preset", "tiny", "--seed", "0"])
    a, b = _digest(tmp_path / "a"), _digest(tmp_path / "b")
    assert set(a) >= {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
                      "generation_config.json", "special_tokens_map.json"}
    assert a == b
    assert _digest(Path(make_model("qwen2"))) == a  # the fixture's build agrees too
    make_tiny_model(str(tmp_path / "c"), arch="qwen2", preset="tiny", seed=1)
    c = _digest(tmp_path / "c")
    assert c["model.safetensors"] != a["model.safetensors"] and c["tokenizer.json"] == a["tokenizer.json"]


def test_bad_arguments_raise(tmp_path):
    with pytest.raises(ValueError, match="arch"):
        make_tiny_model(str(tmp_path / "x"), arch="gpt2")
    with pytest.raises(ValueError, match="preset"):
        make_tiny_model(str(tmp_path / "x"), preset="huge")


@pytest.mark.parametrize("arch", ARCHS)
def test_loads_in_transformers_with_expected_shape(make_model, arch):
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    path = make_model(arch)
    cfg = AutoConfig.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path)
    assert type(model).__name__ == {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM",
                                    "mistral": "MistralForCausalLM"}[arch]
    assert model.dtype == torch.float32
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads) == (64, 2, 4, 2)
    assert cfg.tie_word_embeddings == (arch == "qwen2")
    n = sum(p.numel() for p in model.parameters())
    assert 100_000 < n < 1_000_000
    tok = _tok(path)
    assert len(tok) == cfg.vocab_size
    gen = GenerationConfig.from_pretrained(path)
    assert tok.eos_token_id in gen.eos_token_id and tok.convert_tokens_to_ids("<|im_end|>") in gen.eos_token_id
    assert (gen.bos_token_id, gen.pad_token_id) == (tok.bos_token_id, tok.pad_token_id)


@pytest.mark.slow
def test_small_preset_size(make_model):
    from transformers import AutoConfig, AutoModelForCausalLM

    path = make_model("llama", "small")
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path))
    n = sum(p.numel() for p in model.parameters())
    assert 20_000_000 <= n <= 32_000_000
    assert 4096 <= len(_tok(path)) <= 8192


@pytest.mark.parametrize("arch", ARCHS)
def test_tokenizer_round_trips_and_adds_bos(make_model, arch):
    tok = _tok(make_model(arch))
    for text in TEXTS:
        ids = tok.encode(text, add_special_tokens=False)
        assert all(0 <= i < len(tok) for i in ids)
        assert tok.decode(ids) == text
        with_bos = tok.encode(text)
        assert with_bos == [tok.bos_token_id] + ids
        assert tok.decode(with_bos, skip_special_tokens=True) == text
    assert (tok.bos_token, tok.eos_token, tok.pad_token) == ("<s>", "</s>", "<pad>")
    assert tok.unk_token_id is None


def test_vocabulary_is_real_bpe(tiny_llama):
    tok = _tok(tiny_llama)
    ids = tok.encode("the people were there and the answer is yes", add_special_tokens=False)
    assert len(ids) < 12  # common words are single tokens
    pieces = [tok.decode([i]) for i in range(len(tok))]
    assert sum(len(p) >= 3 for p in pieces) > 300
    # A rare multi-byte character splits into byte tokens that are not valid UTF-8 alone: the
    # detokenizer's UTF-8 handling gets exercised.
    ids = tok.encode("🦜", add_special_tokens=False)
    assert len(ids) > 1 and all("\ufffd" in tok.decode([i]) for i in ids)
    assert tok.decode(ids) == "🦜"


def test_qwen2_tokenizer_normalizes_nfc_others_preserve_bytes(make_model):
    decomposed = unicodedata.normalize("NFD", "café")
    assert decomposed != "café"
    qwen, llama = _tok(make_model("qwen2")), _tok(make_model("llama"))
    assert qwen.decode(qwen.encode(decomposed, add_special_tokens=False)) == "café"
    assert llama.decode(llama.encode(decomposed, add_special_tokens=False)) == decomposed


@pytest.mark.parametrize("arch", ARCHS)
def test_chat_template(make_model, arch):
    tok = _tok(make_model(arch))
    messages = [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Say hi in 中文."},
        {"role": "assistant", "content": "你好"},
        {"role": "user", "content": "Again?"},
    ]
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text == (
        "<s><|im_start|>system\nYou are terse.<|im_end|>\n<|im_start|>user\nSay hi in 中文.<|im_end|>\n"
        "<|im_start|>assistant\n你好<|im_end|>\n<|im_start|>user\nAgain?<|im_end|>\n<|im_start|>assistant\n"
    )
    no_prompt = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=False)
    assert text.startswith(no_prompt) and not no_prompt.endswith("assistant\n")
    ids = tok.apply_chat_template(messages, add_generation_prompt=True, return_dict=False)
    assert ids == tok.encode(text, add_special_tokens=False)
    assert ids.count(tok.bos_token_id) == 1 and ids[0] == tok.bos_token_id
    im_start, im_end = tok.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"])
    assert ids.count(im_start) == 5 and ids.count(im_end) == 4  # role markers are single tokens


@pytest.mark.parametrize("arch", ARCHS)
def test_random_model_is_peaky_and_context_dependent(make_model, arch):
    from transformers import AutoModelForCausalLM

    path = make_model(arch)
    tok, model = _tok(path), AutoModelForCausalLM.from_pretrained(path)
    continuations, max_probs, gaps = set(), [], []
    with torch.no_grad():
        for text in TEXTS[:6]:
            x = torch.tensor([tok.encode(text)])
            logits = model(x).logits[0]  # [L, V]
            top2 = logits.topk(2, dim=-1).values
            max_probs.append(logits.softmax(-1).max(-1).values.mean().item())
            gaps.append((top2[:, 0] - top2[:, 1]).min().item())
            out = model.generate(x, max_new_tokens=8, do_sample=False, eos_token_id=None, pad_token_id=0)
            cont = out[0, x.shape[1]:].tolist()
            assert len(set(cont)) > 1  # not one token repeated
            continuations.add(tuple(cont))
    assert len(continuations) == 6  # different prompts, different greedy outputs
    assert sum(max_probs) / len(max_probs) > 0.3  # far from uniform (1/1536)
    assert min(gaps) > 1e-3  # greedy comparisons do not hinge on near-ties
