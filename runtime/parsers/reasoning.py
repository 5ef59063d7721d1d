"""Reasoning parsers: split a reasoning model's ``<think>…</think>`` block from its answer.

Families (SGLang's ``--reasoning-parser`` names):
  * ``deepseek-r1``: the chat template's generation prompt already opened ``<think>``, so a reply starts inside
    the reasoning; an unclosed block is all reasoning.
  * ``qwen3``: a reply is reasoning only if it opens ``<think>`` itself (``enable_thinking=False`` templates
    write an empty block into the prompt, and the reply is all answer).
Whitespace that only pads the block (``<think>\\n … \\n</think>\\n\\n``) belongs to neither part. As with tool
calls, ``split(text, final=False)`` returns only what more text cannot change, so streams reassemble exactly.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from radixlm.runtime.parsers.text_regex import held_prefix, text_without  # pure: the DSL imports this module

_WS = " \t\n\r\f\v"


@dataclass(frozen=True)
class ReasoningSplit:
    reasoning: str
    content: str
    closed: bool  # the reasoning block ended (or there is none): what follows is answer


class ReasoningParser:
    name = ""
    start = "<think>"
    end = "</think>"
    starts_inside = False

    def wrap_grammar(self, grammar: str, prose_first: bool) -> str:
        """The output regex of a reasoning model whose answer must match ``grammar`` (tool calls): the
        reasoning block is free text (anything but the end marker, tool-call markers included: they are
        not calls there), then the answer. ``prose_first`` (tool_choice "auto"): the answer may be prose,
        which may itself begin with the start marker, so a family whose block is optional leaves it to
        the prose rather than make the two readings compete."""
        after = f"{re.escape(self.end)}[ \t\n]{{0,4}}(?:{grammar})"
        block = text_without(self.end, after, then_required=True)
        if self.starts_inside:
            return block
        if prose_first:
            return grammar
        return f"(?:{re.escape(self.start)}{block})|(?:{grammar})"

    def split(self, text: str, final: bool = True) -> ReasoningSplit:
        body = text.lstrip(_WS)
        if body.startswith(self.start):
            body = body[len(self.start) :]
        elif not self.starts_inside:
            if not final and (not body or self.start.startswith(body)):
                return ReasoningSplit("", "", False)  # it may still open a block
            return ReasoningSplit("", text, True)
        at = body.find(self.end)
        if at < 0:
            inner = body if final else body[: len(body) - held_prefix(body, self.end)]
            return ReasoningSplit(inner.strip(_WS) if final else inner.lstrip(_WS).rstrip(_WS), "", final)
        return ReasoningSplit(body[:at].strip(_WS), body[at + len(self.end) :].lstrip(_WS), True)


class DeepSeekR1Parser(ReasoningParser):
    name = "deepseek-r1"
    starts_inside = True


class Qwen3Parser(ReasoningParser):
    name = "qwen3"


_PARSERS: dict[str, type[ReasoningParser]] = {"deepseek-r1": DeepSeekR1Parser, "qwen3": Qwen3Parser}
REASONING_PARSER_NAMES = tuple(_PARSERS)


def get_reasoning_parser(name: str) -> ReasoningParser:
    try:
        return _PARSERS[name]()
    except KeyError:
        raise ValueError(f"reasoning_parser must be one of {sorted(_PARSERS)}, got {name!r}") from None


class ReasoningStream:
    """Streaming view of one output: feed text deltas, get (reasoning delta, content delta)."""

    def __init__(self, parser: ReasoningParser) -> None:
        self.parser = parser
        self.text = ""
        self.sent_reasoning = 0
        self.sent_content = 0

    def feed(self, delta: str, final: bool = False) -> tuple[str, str]:
        self.text += delta
        s = self.parser.split(self.text, final)
        r = s.reasoning[self.sent_reasoning :]
        c = s.content[self.sent_content :]
        self.sent_reasoning = max(self.sent_reasoning, len(s.reasoning))
        self.sent_content = max(self.sent_content, len(s.content))
        return r, c

    @property
    def closed(self) -> bool:
        return self.parser.split(self.text, False).closed
