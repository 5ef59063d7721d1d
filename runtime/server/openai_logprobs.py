"""OpenAI logprob shapes: the legacy completions object (tokens, token_logprobs, top_logprobs,
text_offset, with ``echo`` scoring the prompt) and the chat ``logprobs.content`` list.

Completions promise that the token strings add up to the text: ``"".join(tokens)`` is the echoed prompt
followed by the generated text, so ``text_offset[i]`` is where token ``i`` starts in it. Decoding one
token at a time does not give that (a byte-level token may hold half a character), so token strings are
produced by the same incremental, UTF-8-safe detokenizer that makes the text: a token that ends inside a
character gets ``""`` and the token completing it carries the whole character. Special tokens the
server added to a string prompt (``add_special_tokens``: the tokenizer's BOS) are in neither the echoed
text nor the tokens; tokens the client sent (token-id prompts) are in both.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from radixlm.runtime.incremental_detokenizer import IncrementalDetokenizer


def _tok(entry: list | tuple) -> str:
    return entry[2] if len(entry) > 2 and entry[2] is not None else ""


def added_special_span(tokenizer: Any, text: str, ids: list[int]) -> tuple[int, int]:
    """``ids[start:end]`` are the tokens of ``text`` itself; the rest are special tokens the tokenizer added
    (BOS, sometimes EOS). Falls back to the whole prompt when the two encodings do not line up."""
    plain = tokenizer(text, add_special_tokens=False).input_ids
    lead = len(ids) - len(plain)
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    for start in range(max(lead, 0) + 1):
        if ids[start : start + len(plain)] == plain and all(t in special for t in ids[:start] + ids[start + len(plain):]):
            return start, start + len(plain)
    return 0, len(ids)


class _TokenTexts:
    """Token strings that concatenate exactly to the decoded text of the tokens fed so far."""

    def __init__(self, tokenizer: Any, skip_special_tokens: bool, spaces_between_special_tokens: bool) -> None:
        self._detok = IncrementalDetokenizer(tokenizer, skip_special_tokens, spaces_between_special_tokens)

    def add(self, token_id: int, last: bool) -> str:
        text = self._detok.add([token_id])
        return text + self._detok.flush() if last else text


@dataclass
class EchoPrompt:
    """What ``echo`` prepends to one choice: the prompt's ids and the span that is the client's text."""

    ids: list[int]
    span: tuple[int, int]


class CompletionLogprobs:
    """One choice's legacy ``logprobs`` object, built chunk by chunk (streaming) or all at once.

    ``prompt_text`` is the echoed text (empty without echo); each ``add`` returns the logprobs of the
    tokens in one result chunk, with offsets continuing where the previous chunk ended.
    """

    def __init__(self, tokenizer: Any, echo: EchoPrompt | None, want_top: bool,
                 skip_special_tokens: bool = True, spaces_between_special_tokens: bool = True) -> None:
        self._want_top = want_top
        self._prompt_texts: list[str] = []
        self.prompt_text = ""
        if echo is not None:
            # Prompt tokens keep their special tokens: what the client wrote (or sent as ids) is echoed whole.
            texts = _TokenTexts(tokenizer, False, spaces_between_special_tokens)
            start, end = echo.span
            kept = echo.ids[start:end]
            self._prompt_texts = [texts.add(t, k == len(kept) - 1) for k, t in enumerate(kept)]
            self.prompt_text = "".join(self._prompt_texts)
        self._echo = echo
        self._out = _TokenTexts(tokenizer, skip_special_tokens, spaces_between_special_tokens)
        self._pos = 0
        self._in_seen = 0

    def add(self, meta: dict, finished: bool) -> dict:
        tokens: list[str] = []
        token_lps: list[float | None] = []
        tops: list[dict | None] = []
        if self._echo is not None:
            entries = list(meta.get("input_token_logprobs") or [])
            in_tops = list(meta.get("input_top_logprobs") or [])
            start, end = self._echo.span
            for j, e in enumerate(entries):
                k = self._in_seen + j  # prompt scores may arrive over several chunks
                if start <= k < end:
                    tokens.append(self._prompt_texts[k - start])
                    token_lps.append(e[0])
                    tops.append(_top_dict(in_tops[j] if j < len(in_tops) else None))
            self._in_seen += len(entries)
        out_entries = list(meta.get("output_token_logprobs") or [])
        out_tops = list(meta.get("output_top_logprobs") or [])
        for k, e in enumerate(out_entries):
            tokens.append(self._out.add(e[1], finished and k == len(out_entries) - 1))
            token_lps.append(e[0])
            tops.append(_top_dict(out_tops[k] if k < len(out_tops) else None))
        offsets = []
        for t in tokens:
            offsets.append(self._pos)
            self._pos += len(t)
        return {"tokens": tokens, "token_logprobs": token_lps, "text_offset": offsets,
                "top_logprobs": tops if self._want_top else None}


def _top_dict(entries: list | None) -> dict | None:
    return None if entries is None else {_tok(x): x[0] for x in entries}


def chat_logprobs(meta: dict) -> dict:
    """Chat ``logprobs``: one entry per generated token with its bytes and top alternatives."""
    entries = meta.get("output_token_logprobs") or []
    tops = meta.get("output_top_logprobs") or []
    content = []
    for k, e in enumerate(entries):
        tok = _tok(e)
        top = tops[k] if k < len(tops) and tops[k] is not None else []
        content.append(
            {
                "token": tok,
                "logprob": e[0],
                "bytes": list(tok.encode("utf-8")),
                "top_logprobs": [{"token": _tok(x), "logprob": x[0], "bytes": list(_tok(x).encode("utf-8"))} for x in top],
            }
        )
    return {"content": content}
