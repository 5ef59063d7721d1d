"""Llama 3.1 / 3.2 / 3.3 JSON tool calls: the whole reply is ``{"name": ..., "parameters": {...}}`` (optionally
after ``<|python_tag|>``), several calls separated by ``; ``. Prose that does not start with ``{`` is content.
"""

from __future__ import annotations

import json
import re

from radixlm.runtime.parsers.tool_calls.base import FunctionSpec, Piece, ToolCallParser, as_call

_DECODER = json.JSONDecoder()
_WS = " \t\n\r\f\v"
_SEP = re.compile(r"[ \t\n\r]*;[ \t\n\r]*")
PYTHON_TAG = "<|python_tag|>"


class Llama3JsonParser(ToolCallParser):
    name = "llama3"
    open_marker = "{"
    separator = "; "
    template_markers = ("<|start_header_id|>", '"parameters"')

    @property
    def args_key(self) -> str:
        return "parameters"

    def split(self, text: str, final: bool) -> list[Piece]:
        body = text.lstrip(_WS)
        if body.startswith(PYTHON_TAG):
            body = body[len(PYTHON_TAG) :].lstrip(_WS)
        elif not body or PYTHON_TAG.startswith(body):
            return [text] if final else []  # nothing decides yet
        if not body.startswith("{"):
            return [text]  # plain prose: this family only calls at the start of a reply
        pieces: list[Piece] = []
        pos = 0
        while True:
            try:
                obj, end = _DECODER.raw_decode(body, pos)
            except json.JSONDecodeError:
                if final:
                    return pieces + [body[pos:]] if pieces else [text]
                return pieces  # the object may still be arriving
            call = as_call(obj, "parameters")
            if call is None:
                return pieces + [body[pos:]] if pieces else [text]
            pieces.append(call)
            m = _SEP.match(body, end)
            if m is None or (m.end() == len(body) and not final):
                rest = body[end:]
                if not final and (not rest.strip(_WS) or m is not None):
                    return pieces  # a separator or whitespace may still lead to another call
                return pieces + [rest] if rest else pieces
            pos = m.end()
            if pos == len(body):
                return pieces  # final and a dangling ';'

    def call_regex(self, body_regex: str) -> str:
        return body_regex

    def auto_regex(self, tools: list[FunctionSpec], parallel: bool, whitespace: str | None = None) -> str:
        # Either calls from the first character, or prose whose first non-blank character is not '{' (calls
        # first and the empty prose last: see text_without on outlines-core's leftmost-first automata).
        prose = r"[ \t\n\r\f\v]*(?:[^ \t\n\r\f\v{][\s\S]*|)"
        return f"(?:{self.calls_regex(tools, parallel, whitespace)})|(?:{prose})"
