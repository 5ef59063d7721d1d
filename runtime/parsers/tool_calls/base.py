"""The interface every tool-call parser implements, and the family-independent machinery around it.

A parser splits text into an ordered list of pieces, prose (``str``) and calls (``ToolCall``), seeing either a
finished output (``final=True``) or a prefix of one (``final=False``: only the part that more text cannot
change). ``ToolCallParser.parse`` then applies one content rule (whitespace that only separates prose from
calls is dropped), so a streamed output, reassembled, equals the non-streamed one by construction.
"""

from __future__ import annotations

import json
import secrets
import string
from dataclasses import dataclass, field
from typing import Any, Union

from radixlm.runtime.constrained.json_schema import schema_to_regex
from radixlm.runtime.parsers.text_regex import held_prefix, text_without

_WS = " \t\n\r\f\v"  # ASCII whitespace: what the grammars' whitespace classes allow


@dataclass(frozen=True)
class FunctionSpec:
    """One tool as the request declared it (OpenAI ``tools[i].function``)."""

    name: str
    parameters: dict = field(default_factory=lambda: {"type": "object", "properties": {}})
    description: str | None = None


@dataclass(frozen=True)
class ToolCall:
    """A parsed call: the function name and its arguments as a JSON object string (OpenAI's shape)."""

    name: str
    arguments: str


Piece = Union[str, ToolCall]


@dataclass(frozen=True)
class ParseResult:
    content: str  # prose, with whitespace that only separates it from calls removed
    calls: list[ToolCall]


def dump_arguments(args: Any) -> str:
    """The one serialisation of arguments (non-streamed and streamed answers use it alike)."""
    return json.dumps(args, ensure_ascii=False)


def as_call(obj: Any, args_key: str) -> ToolCall | None:
    """``{"name": str, args_key: object}`` → ToolCall; anything else is not a call (stays text)."""
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return None
    args = obj.get(args_key, obj.get("arguments", obj.get("parameters", {})))
    if isinstance(args, str):  # some models write the arguments as a JSON string
        try:
            args = json.loads(args)
        except json.JSONDecodeError:
            return None
    if not isinstance(args, dict):
        return None
    return ToolCall(obj["name"], dump_arguments(args))


class ToolCallParser:
    """A model family's tool-call format. Subclasses set ``name`` and ``open_marker`` and implement
    ``parse_body`` (what follows one marker) and ``call_regex``; a family whose calls have no marker
    (Llama 3's bare JSON) overrides ``split`` instead."""

    name = ""
    #: text that opens the calls; "auto" lets the model write prose until it writes this
    open_marker = ""
    #: the regex that must separate two calls (between ``call_regex`` instances)
    separator = "\n"
    #: substrings that identify the family's chat template
    template_markers: tuple[str, ...] = ()
    #: OpenAI call-id style (Mistral's templates require 9 alphanumerics)
    id_length = 0

    # ------------------------------------------------------------------ parsing
    def split(self, text: str, final: bool) -> list[Piece]:
        """Ordered prose/call pieces of ``text``; when not final, omit any tail more text could reinterpret.

        Prose runs until ``open_marker``; a partial marker at the end is held back while more text may
        come. Each marker's body is the family's (``parse_body``); a malformed body stays prose, marker
        included, and a body still arriving ends the pieces (or, when final, stays prose)."""
        pieces: list[Piece] = []
        pos = 0
        while True:
            start = text.find(self.open_marker, pos)
            if start < 0:
                tail = text[pos:]
                if not final:
                    tail = tail[: len(tail) - held_prefix(tail, self.open_marker)]
                pieces.append(tail)
                return pieces
            pieces.append(text[pos:start])
            body = self.parse_body(text, start + len(self.open_marker), final)
            if body is None:
                if final:
                    pieces.append(text[start:])
                return pieces
            calls, end = body
            pieces.extend(calls if calls else [text[start:end]])
            pos = end

    def parse_body(self, text: str, at: int, final: bool) -> tuple[list[ToolCall], int] | None:
        """The calls after one ``open_marker`` (the body starts at ``text[at]``): (calls, index past the
        body), calls empty when the body is malformed; None when the body is not complete (yet)."""
        raise NotImplementedError

    def parse(self, text: str, final: bool = True) -> ParseResult:
        pieces = self.split(text, final)
        content: list[str] = []
        for i, p in enumerate(pieces):
            if isinstance(p, ToolCall):
                continue
            if i > 0 and isinstance(pieces[i - 1], ToolCall):
                p = p.lstrip(_WS)
            if i + 1 < len(pieces) and isinstance(pieces[i + 1], ToolCall):
                p = p.rstrip(_WS)
            elif not final and i == len(pieces) - 1:
                p = p.rstrip(_WS)  # a call may still follow: hold trailing whitespace back
            content.append(p)
        return ParseResult("".join(content), [p for p in pieces if isinstance(p, ToolCall)])

    def has_calls(self, text: str) -> bool:
        return bool(self.parse(text).calls)

    # ------------------------------------------------------------------ constraining
    def call_regex(self, body_regex: str) -> str:
        """The regex of one call whose JSON object (name and arguments) matches ``body_regex``."""
        raise NotImplementedError

    def wrap_calls(self, calls_regex: str) -> str:
        """Regex around a sequence of calls (e.g. a marker and a JSON array); identity by default."""
        return calls_regex

    @property
    def args_key(self) -> str:
        return "arguments"

    def body_schema(self, tools: list[FunctionSpec]) -> dict:
        """JSON schema of one call object: any of the tools, with its name fixed and its arguments' schema."""
        alts = [{
            "type": "object",
            "properties": {"name": {"const": t.name}, self.args_key: t.parameters or {"type": "object"}},
            "required": ["name", self.args_key],
            "additionalProperties": False,
        } for t in tools]
        return alts[0] if len(alts) == 1 else {"anyOf": alts}

    def calls_regex(self, tools: list[FunctionSpec], parallel: bool, whitespace: str | None = None) -> str:
        """Regex for output that is nothing but calls to ``tools`` (one, or one or more when ``parallel``)."""
        body, _ = schema_to_regex(json.dumps(self.body_schema(tools)), whitespace)
        one = self.call_regex(body)
        seq = f"{one}(?:{self.separator}{one})*" if parallel else one
        return self.wrap_calls(seq)

    def auto_regex(self, tools: list[FunctionSpec], parallel: bool, whitespace: str | None = None) -> str:
        """Regex for "auto": free prose that never opens a call, optionally followed by valid calls."""
        return text_without(self.open_marker, self.calls_regex(tools, parallel, whitespace))

    # ------------------------------------------------------------------ ids
    def new_call_id(self) -> str:
        if self.id_length:
            alphabet = string.ascii_letters + string.digits
            return "".join(secrets.choice(alphabet) for _ in range(self.id_length))
        return f"call_{secrets.token_hex(12)}"

    @classmethod
    def matches_template(cls, template: str) -> bool:
        return bool(cls.template_markers) and all(m in template for m in cls.template_markers)


class ToolCallStream:
    """Streaming view of one output: feed deltas, get (content delta, newly completed calls).

    Re-parses the text so far each time (outputs are short next to the forward passes that produce them) and
    emits only growth, so the concatenated deltas equal ``parser.parse(full_text)``.
    """

    def __init__(self, parser: ToolCallParser) -> None:
        self.parser = parser
        self.text = ""
        self.sent_content = 0
        self.sent_calls = 0

    def feed(self, delta: str, final: bool = False) -> tuple[str, list[ToolCall]]:
        self.text += delta
        res = self.parser.parse(self.text, final)
        # Content only ever grows (split's contract); guard anyway so a client never sees text retracted.
        new_content = res.content[self.sent_content :] if len(res.content) > self.sent_content else ""
        self.sent_content = max(self.sent_content, len(res.content))
        new_calls = res.calls[self.sent_calls :]
        self.sent_calls = max(self.sent_calls, len(res.calls))
        return new_content, new_calls
