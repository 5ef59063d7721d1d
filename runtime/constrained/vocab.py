"""The tokenizer's vocabulary as raw bytes, and the outlines-core ``Vocabulary`` built from it (no hub access).

outlines-core matches grammars on bytes, so every token must be turned into the exact bytes the detokenizer
would emit for it in the middle of a sequence:

* byte-level BPE (GPT-2, Llama-3, Qwen, our tiny models): token strings spell bytes through the GPT-2
  byte↔unicode table (``'Ġthe'`` → ``b' the'``);
* SentencePiece (Llama-2, Mistral): ``▁`` is a space and byte-fallback tokens ``<0xNN>`` are single bytes;
* anything else: the token string's UTF-8.

Special tokens (BOS, PAD, chat markers, ...) are left out so a grammar can never emit them; the EOS ids are
handed to outlines-core separately and are allowed only where the grammar accepts.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
from outlines_core import Vocabulary

_BYTE_FALLBACK = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")


def gpt2_unicode_to_bytes() -> dict[str, int]:
    """The inverse of GPT-2's ``bytes_to_unicode``: printable Latin-1 bytes stand for themselves, the other
    bytes are shifted to code points 256+ in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {chr(b): b for b in printable}
    others = [b for b in range(256) if b not in set(printable)]
    table.update({chr(256 + k): b for k, b in enumerate(others)})
    return table


@dataclass(frozen=True)
class TokenizerVocab:
    """Everything the grammar side needs to know about one tokenizer, computed once.

    ``token_bytes[i]`` is ``None`` for ids that a grammar may never emit (special tokens, EOS, ids past the
    tokenizer's vocabulary up to the model's logits width).
    """

    vocab_size: int  # the model's logits width (>= the tokenizer's vocabulary)
    eos_token_ids: tuple[int, ...]  # the first one is outlines-core's EOS; all are allowed where accepting
    scheme: str  # "byte_level" | "sentencepiece" | "plain"
    token_bytes: list[bytes | None]  # [vocab_size]
    outlines: Vocabulary
    first_byte: torch.Tensor  # int16 [vocab_size], -1 where token_bytes is None; finds forced bytes fast
    single_byte_ids: tuple[int, ...]  # [256] a token id spelling exactly that byte, -1 if none
    bytes_to_id: dict[bytes, int]  # for greedy retokenization
    max_token_len: int
    encode: Callable[[str], list[int]]  # the tokenizer's own encoding, no special tokens added

    def decode(self, token_ids: Sequence[int], errors: str = "strict") -> str:
        """The text that grammar tokens spell, mid-sequence (EOS and special tokens add nothing)."""
        return b"".join(self.token_bytes[i] or b"" for i in token_ids).decode("utf-8", errors)


def _backend(tokenizer: Any):
    """The ``tokenizers.Tokenizer`` behind a transformers fast tokenizer (or the object itself)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        return backend
    if hasattr(tokenizer, "get_vocab") and hasattr(tokenizer, "get_added_tokens_decoder"):
        return tokenizer  # already a tokenizers.Tokenizer
    raise ValueError(
        f"tokenizer must be a transformers fast tokenizer or a tokenizers.Tokenizer, got {type(tokenizer).__name__}"
    )


def _component_types(component: Any) -> list[dict]:
    """The JSON descriptions of a (possibly Sequence) decoder / pre-tokenizer, flattened."""
    if component is None:
        return []
    state = json.loads(component.__getstate__())
    out: list[dict] = []
    stack = [state]
    while stack:
        node = stack.pop()
        out.append(node)
        for key in ("decoders", "pretokenizers"):
            stack.extend(node.get(key) or [])
    return out


def detect_scheme(backend: Any) -> str:
    """How token strings map to bytes, read from the tokenizer's decoder (then its pre-tokenizer)."""
    parts = _component_types(backend.decoder) or _component_types(backend.pre_tokenizer)
    types = {p.get("type") for p in parts}
    if "ByteLevel" in types:
        return "byte_level"
    replaces_metaspace = any(p.get("type") == "Replace" and "▁" in json.dumps(p, ensure_ascii=False) for p in parts)
    if types & {"Metaspace", "ByteFallback"} or replaces_metaspace:
        return "sentencepiece"
    return "plain"


def _token_to_bytes(token: str, scheme: str, u2b: dict[str, int]) -> bytes:
    if scheme == "byte_level":
        try:
            return bytes(u2b[c] for c in token)
        except KeyError:  # an added token stored as plain text
            return token.encode("utf-8")
    if scheme == "sentencepiece":
        m = _BYTE_FALLBACK.match(token)
        if m:
            return bytes([int(m.group(1), 16)])
        return token.replace("▁", " ").encode("utf-8")
    return token.encode("utf-8")


# Appended to every compiled regex and held by one synthetic token (id ``vocab_size``, never sampled): the
# automaton then accepts only after it, so "the pattern may end here" is "END_MARK may follow". Needed because
# outlines-core 0.2's Index drops a token whose last byte leaves an accepting position for a non-accepting
# one (``a(?:bc)?`` never allows a lone ``b`` after ``a``; ``1(?:\.5)?`` never a lone ``.``); with END_MARK no
# position but the last is accepting. Real tokens must not spell it, so tokens holding its lead byte 0xF4
# (which only starts characters U+100000..U+10FFFF, the plane-16 private use area) stay out of grammars.
END_MARK = "\U0010ffff"
_END_LEAD = END_MARK.encode("utf-8")[:1]


def build_vocab(tokenizer: Any, vocab_size: int, eos_token_ids: Sequence[int] | None = None) -> TokenizerVocab:
    """Build the byte vocabulary and the outlines-core ``Vocabulary`` for ``tokenizer``.

    ``eos_token_ids`` defaults to the tokenizer's ``eos_token_id``; pass the model's generation-config list
    when it has several (e.g. ``</s>`` and ``<|im_end|>``).
    """
    backend = _backend(tokenizer)
    vocab = backend.get_vocab(with_added_tokens=True)  # {token string: id}
    if not isinstance(vocab_size, int) or vocab_size < 1:
        raise ValueError(f"vocab_size must be a positive integer, got {vocab_size!r}")
    if vocab and max(vocab.values()) >= vocab_size:
        raise ValueError(f"vocab_size ({vocab_size}) must be >= the tokenizer's vocabulary ({max(vocab.values()) + 1})")

    if eos_token_ids is None:
        eos = getattr(tokenizer, "eos_token_id", None)
        if eos is None:
            raise ValueError("eos_token_ids: the tokenizer has no eos_token_id; pass eos_token_ids explicitly")
        eos_token_ids = [eos]
    eos_ids = tuple(dict.fromkeys(int(i) for i in eos_token_ids))
    if not eos_ids or any(not 0 <= i < vocab_size for i in eos_ids):
        raise ValueError(f"eos_token_ids must be non-empty ids below vocab_size, got {list(eos_token_ids)}")

    special = {i for i, tok in backend.get_added_tokens_decoder().items() if tok.special}
    special.update(getattr(tokenizer, "all_special_ids", None) or ())
    excluded = special | set(eos_ids)

    scheme = detect_scheme(backend)
    u2b = gpt2_unicode_to_bytes()
    token_bytes: list[bytes | None] = [None] * vocab_size
    by_bytes: dict[bytes, list[int]] = {}
    for token, i in vocab.items():
        if i in excluded:
            continue
        data = _token_to_bytes(token, scheme, u2b)
        if not data or _END_LEAD in data:
            continue
        token_bytes[i] = data
        by_bytes.setdefault(data, []).append(i)
    if not by_bytes:
        raise ValueError("tokenizer: no usable (non-special) tokens")

    first = torch.full((vocab_size,), -1, dtype=torch.int16)
    single = [-1] * 256
    for data, ids in by_bytes.items():
        first[ids] = data[0]
        if len(data) == 1 and single[data[0]] < 0:
            single[data[0]] = min(ids)

    def encode(text: str) -> list[int]:
        return backend.encode(text, add_special_tokens=False).ids

    return TokenizerVocab(
        vocab_size=vocab_size,
        eos_token_ids=eos_ids,
        scheme=scheme,
        token_bytes=token_bytes,
        outlines=Vocabulary(eos_ids[0], {**by_bytes, END_MARK.encode("utf-8"): [vocab_size]}),
        first_byte=first,
        single_byte_ids=tuple(single),
        bytes_to_id={data: min(ids) for data, ids in by_bytes.items()},
        max_token_len=max(len(d) for d in by_bytes),
        encode=encode,
    )
