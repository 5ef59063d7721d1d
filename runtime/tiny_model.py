"""Hub-free tiny models: write a real Hugging Face model directory with random weights.

``make_tiny_model(out_dir, arch, preset, seed)`` writes::

    config.json              transformers config for LlamaForCausalLM / Qwen2ForCausalLM / MistralForCausalLM
    model.safetensors        float32 weights drawn from ``torch.Generator().manual_seed(seed)``
    tokenizer.json           byte-level BPE trained locally with ``tokenizers`` on a generated corpus
    tokenizer_config.json    special tokens + a chat template (``chat_template_family``: ChatML by default; a
                             tool-calling or reasoning family from ``runtime/tiny_chat_templates.py``)
    special_tokens_map.json
    generation_config.json   bos / eos / pad ids (eos is a list: ``</s>`` and ``<|im_end|>``)

Same arguments → byte-identical files. No network, no hub.

Tokenizer choices (documented because callers depend on them):
  * ids 0..4 are ``<pad>``, ``<s>`` (BOS), ``</s>`` (EOS), ``<|im_start|>``, ``<|im_end|>``.
  * BOS is prepended by the tokenizer itself (a TemplateProcessing post-processor in tokenizer.json, as
    Llama-3 does), so ``tok(text)`` / ``tok.encode(text)`` start with ``<s>``; ``add_special_tokens=False``
    leaves it out. The chat template also starts with ``{{ bos_token }}``: tokenize a rendered chat prompt
    with ``add_special_tokens=False`` (``apply_chat_template(tokenize=True)`` already does) to avoid two BOS.
  * Byte-level BPE with Qwen2's pre-tokenizer regex, no prefix space: ``decode(encode(s,
    add_special_tokens=False)) == s`` for any string, multi-byte UTF-8 included. Exception: ``qwen2``
    directories carry an NFC normalizer (transformers' Qwen2Tokenizer always adds one), so there the
    round trip gives ``NFC(s)``. Vocabulary and merges are the same for every arch of a preset.
  * ``tie_word_embeddings``: qwen2 tied; llama and mistral untied. Qwen2 has q/k/v biases.

Weight init is chosen so the untrained model is *peaky* (logit std ≈ 6, unit-gain projections, norm
gains ≠ 1): greedy decoding differs across contexts and top-1 logits are rarely near-ties, so token
comparisons against transformers are meaningful.
"""

from __future__ import annotations

import json
import math
import os
import random
from dataclasses import dataclass

import torch

from radixlm.runtime.tiny_chat_templates import CHATML, FAMILIES, FAMILY_TOKENS

SPECIAL_TOKENS = ("<pad>", "<s>", "</s>", "<|im_start|>", "<|im_end|>")
PAD, BOS, EOS, IM_START, IM_END = range(len(SPECIAL_TOKENS))

PRETOKENIZE_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

CHAT_TEMPLATE = CHATML  # the default family: ChatML, no tools


@dataclass(frozen=True)
class Preset:
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    intermediate_size: int
    max_position_embeddings: int


PRESETS = {
    # ~0.3M parameters: fast tests.
    "tiny": Preset(1536, 64, 2, 4, 2, 128, 2048),
    # ~0.5M parameters with head size 64 (the sizes the native CPU attention kernels are built for): tests.
    "tiny64": Preset(1536, 128, 2, 2, 1, 256, 2048),
    # ~25-30M parameters: benchmarks.
    "small": Preset(6144, 512, 8, 8, 4, 1408, 4096),
}


@dataclass(frozen=True)
class ArchSpec:
    model_type: str
    architecture: str
    tie_word_embeddings: bool
    attention_bias: bool  # Qwen2: bias on q/k/v
    rope_theta: float


ARCHS = {
    "llama": ArchSpec("llama", "LlamaForCausalLM", False, False, 10000.0),
    "qwen2": ArchSpec("qwen2", "Qwen2ForCausalLM", True, True, 1000000.0),
    "mistral": ArchSpec("mistral", "MistralForCausalLM", False, False, 1000000.0),
}


# --------------------------------------------------------------------------- corpus + tokenizer
_ONSETS = ["", "b", "c", "d", "f", "g", "h", "j", "k", "l", "m", "n", "p", "r", "s", "t", "v", "w", "st", "tr", "ch",
           "sh", "th", "pl", "gr", "br", "cl"]
_NUCLEI = ["a", "e", "i", "o", "u", "ai", "ea", "ou", "io", "ee"]
_CODAS = ["", "", "n", "r", "s", "t", "l", "m", "nd", "st", "ng", "ck"]
_COMMON = ("the of and to in is it that for on with as was be by this are or from at an not have but what all "
           "were when we there can your which their said if will each about how up out them then she many some "
           "so these would other into has more her two like him see time could no make than first been its who "
           "now people my made over did down only way find use may water long little very after words called "
           "just where most know get through back much before go good new write our used me man too any day same "
           "right look think also around another came come work three word must because does part even place well "
           "yes answer question name city number color red blue green true false null json list key value").split()
_UNICODE = ["café", "naïve", "résumé", "über", "façade", "niño", "Zürich", "São", "Ελλάδα", "Москва", "中文",
            "你好", "世界", "日本語", "こんにちは", "한국어", "😀", "🚀", "👍🏽", "🎉", "∑", "→", "€", "—", "“quoted”"]
_CODE = [
    "def {w}(x, y):\n    return x + y * {n}\n",
    "for i in range({n}):\n    print(i, '{w}')\n",
    "if ({w} != null) {{ return {n}; }}\n",
    "const {w} = [{n}, {n2}, {n3}];\n",
    "import os\nclass {W}:\n    pass\n",
    "SELECT {w} FROM t WHERE id = {n};\n",
]


def _word(rng: random.Random) -> str:
    return "".join(rng.choice(_ONSETS) + rng.choice(_NUCLEI) + rng.choice(_CODAS) for _ in range(rng.randint(1, 3)))


def _corpus(num_lines: int) -> list[str]:
    """A deterministic English-like corpus with numbers, JSON, code and multi-byte characters."""
    rng = random.Random(1234)  # fixed: every arch/seed shares one tokenizer
    lexicon = _COMMON + [_word(rng) for _ in range(3000)]
    # Zipf-like sampling so frequent words become single tokens and rare ones stay split.
    weights = [1.0 / (i + 1) ** 0.9 for i in range(len(lexicon))]
    lines: list[str] = []
    for _ in range(num_lines):
        kind = rng.random()
        words = rng.choices(lexicon, weights, k=rng.randint(4, 14))
        n, n2, n3 = rng.randint(0, 9999), rng.randint(0, 99), round(rng.uniform(-100, 100), 2)
        if kind < 0.55:
            if rng.random() < 0.3:
                words.insert(rng.randrange(len(words)), str(n))
            if rng.random() < 0.25:
                words.insert(rng.randrange(len(words)), rng.choice(_UNICODE))
            s = " ".join(words)
            lines.append(s[0].upper() + s[1:] + rng.choice([".", ".", "!", "?", ",", ";", ":"]))
        elif kind < 0.75:
            obj = {words[0]: n, words[1]: words[2], "ok": rng.random() < 0.5, "items": [n2, n3],
                   "text": rng.choice(_UNICODE)}
            lines.append(json.dumps(obj, ensure_ascii=False))
        elif kind < 0.92:
            t = rng.choice(_CODE)
            lines.append(t.format(w=words[0], W=words[0].capitalize(), n=n, n2=n2, n3=n3))
        else:
            lines.append(" ".join(rng.choices(_UNICODE, k=rng.randint(2, 6))) + " " + words[0])
    return lines


def _train_tokenizer(vocab_size: int):
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    # Qwen2's split rule (transformers' Qwen2Tokenizer rebuilds exactly this pipeline on load, so using it for
    # every arch keeps tokenizer.json and AutoTokenizer in agreement): single digits, letters with one
    # leading non-letter, punctuation runs, newlines, whitespace.
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(6000 if vocab_size <= 2048 else 20000), trainer=trainer)
    for i, t in enumerate(SPECIAL_TOKENS):
        assert tok.token_to_id(t) == i, "special tokens must take ids 0..4"
    tok.post_processor = processors.Sequence([
        processors.ByteLevel(trim_offsets=False),
        processors.TemplateProcessing(
            single="<s> $A", pair="<s> $A <s> $B:1", special_tokens=[("<s>", BOS)]
        ),
    ])
    return tok


# --------------------------------------------------------------------------- config + weights
def _config(spec: ArchSpec, p: Preset, vocab_size: int):
    from transformers import AutoConfig

    kwargs = dict(
        vocab_size=vocab_size,
        hidden_size=p.hidden_size,
        intermediate_size=p.intermediate_size,
        num_hidden_layers=p.num_layers,
        num_attention_heads=p.num_heads,
        num_key_value_heads=p.num_kv_heads,
        head_dim=p.hidden_size // p.num_heads,
        hidden_act="silu",
        max_position_embeddings=p.max_position_embeddings,
        rms_norm_eps=1e-6,
        rope_parameters={"rope_type": "default", "rope_theta": spec.rope_theta},
        tie_word_embeddings=spec.tie_word_embeddings,
        bos_token_id=BOS,
        eos_token_id=EOS,
        pad_token_id=PAD,
        dtype="float32",
        architectures=[spec.architecture],
    )
    if spec.model_type == "llama":
        kwargs["attention_bias"] = False
    if spec.model_type in ("mistral", "qwen2"):
        kwargs["sliding_window"] = None  # full attention; our backends have no sliding window
    if spec.model_type == "qwen2":
        kwargs["use_sliding_window"] = False
    return AutoConfig.for_model(spec.model_type, **kwargs)


def _weights(config, spec: ArchSpec, seed: int) -> dict[str, torch.Tensor]:
    """Random float32 weights for every parameter transformers expects, in sorted-name order."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in AutoModelForCausalLM.from_config(config).state_dict().items()}
    if spec.tie_word_embeddings:
        shapes.pop("lm_head.weight", None)
    g = torch.Generator().manual_seed(seed)
    H = config.hidden_size
    # Target logit std ≈ 6 after the final RMSNorm (peaky distributions, few near-ties). Untied: from the
    # lm_head's std. Tied: the embeddings stay small so the residual stream is dominated by the layers (else
    # every position predicts its own input token), and the final norm's gain supplies the scale.
    emb_std = 0.1 if spec.tie_word_embeddings else 1.0
    final_gain = 6.0 / (emb_std * math.sqrt(H)) if spec.tie_word_embeddings else 1.0
    out: dict[str, torch.Tensor] = {}
    for name in sorted(shapes):
        shape = shapes[name]
        if name.endswith("norm.weight"):
            # Not all ones, so a loader that skips norms is caught.
            gain = final_gain if name == "model.norm.weight" else 1.0
            t = gain * (1.0 + 0.1 * torch.randn(shape, generator=g))
        elif name.endswith(".bias"):
            t = 0.1 * torch.randn(shape, generator=g)
        elif name == "model.embed_tokens.weight":
            t = emb_std * torch.randn(shape, generator=g)
        elif name == "lm_head.weight":
            t = (6.0 / math.sqrt(H)) * torch.randn(shape, generator=g)
        else:
            # Unit-gain projections: attention/MLP contributions are comparable to the residual, so outputs
            # depend on context, not just on the current token.
            t = torch.randn(shape, generator=g) / math.sqrt(shape[1])
        out[name] = t.to(torch.float32).contiguous()
    return out


def _write_json(path: str, obj: dict) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.write(json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False) + "\n")


def make_tiny_model(
    out_dir: str, arch: str = "llama", preset: str = "tiny", seed: int = 0, chat_template_family: str = "chatml"
) -> None:
    """Write a loadable Hugging Face model directory (see the module docstring) to ``out_dir``.

    ``chat_template_family`` picks the chat template (one of ``FAMILIES``): the weights and tokenizer do not
    depend on it, so a family only changes how prompts (tools, tool results, reasoning) are rendered.
    """
    from safetensors.torch import save_file

    if arch not in ARCHS:
        raise ValueError(f"arch must be one of {sorted(ARCHS)}, got {arch!r}")
    if preset not in PRESETS:
        raise ValueError(f"preset must be one of {sorted(PRESETS)}, got {preset!r}")
    if chat_template_family not in FAMILIES:
        raise ValueError(f"chat_template_family must be one of {sorted(FAMILIES)}, got {chat_template_family!r}")
    spec, p = ARCHS[arch], PRESETS[preset]
    os.makedirs(out_dir, exist_ok=True)

    tok = _train_tokenizer(p.vocab_size)
    if FAMILY_TOKENS.get(chat_template_family):
        from tokenizers import AddedToken

        # The family's markers as single (non-special) tokens after the trained vocabulary, as Qwen2.5's
        # <tool_call> is: a model can open a call in one step, and grammars may emit them.
        tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in FAMILY_TOKENS[chat_template_family]])
    vocab_size = tok.get_vocab_size()
    if arch == "qwen2":
        from tokenizers import normalizers

        # transformers' Qwen2Tokenizer always adds NFC; say so in tokenizer.json too, so both agree.
        tok.normalizer = normalizers.NFC()
    tok.save(os.path.join(out_dir, "tokenizer.json"), pretty=True)
    # unk_token null: byte-level BPE never needs one (and Qwen2Tokenizer would otherwise add a new token).
    special = {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>", "unk_token": None}
    _write_json(os.path.join(out_dir, "special_tokens_map.json"),
                {**special, "additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    _write_json(os.path.join(out_dir, "tokenizer_config.json"), {
        **special,
        "tokenizer_class": "PreTrainedTokenizerFast",
        "additional_special_tokens": ["<|im_start|>", "<|im_end|>"],
        "chat_template": FAMILIES[chat_template_family],
        "model_max_length": p.max_position_embeddings,
        "clean_up_tokenization_spaces": False,
        "padding_side": "left",
    })

    config = _config(spec, p, vocab_size)
    # No version stamp, so the files do not change with the installed transformers.
    cfg = config.to_dict()
    for key in ("transformers_version", "_name_or_path", "id2label", "label2id", "return_dict", "output_attentions",
                "output_hidden_states", "problem_type", "chunk_size_feed_forward", "is_encoder_decoder"):
        cfg.pop(key, None)  # generic PretrainedConfig noise
    _write_json(os.path.join(out_dir, "config.json"), cfg)
    _write_json(os.path.join(out_dir, "generation_config.json"), {
        "bos_token_id": BOS,
        "eos_token_id": [EOS, IM_END],
        "pad_token_id": PAD,
        "do_sample": False,
    })
    save_file(_weights(config, spec, seed), os.path.join(out_dir, "model.safetensors"), metadata={"format": "pt"})
