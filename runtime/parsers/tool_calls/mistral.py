"""Mistral (v3 tokenizers, Mistral-7B-Instruct-v0.3, Mistral-Nemo...): ``[TOOL_CALLS] [{"name": ..., "arguments":
{...}}, ...]``, all calls of a turn in one JSON array after one marker.

On real Mistral tokenizers ``[TOOL_CALLS]`` is a special token, so the server decodes tool-enabled requests
with ``skip_special_tokens=False`` (see ``keeps_special_tokens``).
"""

from __future__ import annotations

import json
import re

from radixlm.runtime.parsers.tool_calls.base import ToolCall, ToolCallParser, as_call

_DECODER = json.JSONDecoder()


class MistralParser(ToolCallParser):
    name = "mistral"
    open_marker = "[TOOL_CALLS]"
    separator = ", "
    template_markers = ("[TOOL_CALLS]",)
    id_length = 9  # Mistral's templates reject other tool_call ids
    keeps_special_tokens = True

    def parse_body(self, text: str, at: int, final: bool) -> tuple[list[ToolCall], int] | None:
        while at < len(text) and text[at] in " \t\n\r":
            at += 1
        try:
            arr, end = _DECODER.raw_decode(text, at)
        except json.JSONDecodeError:
            # Still arriving; or, final, cut off (max_tokens): its complete leading calls count, as a cut-off
            # Hermes output keeps the calls before the cut, and the rest stays prose.
            return _complete_leading_calls(text, at) if final else None
        calls = [as_call(x, "arguments") for x in arr] if isinstance(arr, list) and arr else [None]
        return ([c for c in calls if c] if all(calls) else []), end

    def call_regex(self, body_regex: str) -> str:
        return body_regex

    def wrap_calls(self, calls_regex: str) -> str:
        return f"\\[TOOL_CALLS\\] ?\\[{calls_regex}\\]"


_COMMA = re.compile(r"[ \t\n\r]*,[ \t\n\r]*")


def _complete_leading_calls(text: str, at: int) -> tuple[list[ToolCall], int] | None:
    """The calls that are complete at the start of a cut-off ``[{...}, {...`` array (None if there are none)."""
    if not text.startswith("[", at):
        return None
    pos, calls, end = at + 1, [], at
    while True:
        try:
            obj, e = _DECODER.raw_decode(text, pos)
        except json.JSONDecodeError:
            break
        call = as_call(obj, "arguments")
        if call is None:
            break
        calls.append(call)
        end = e
        m = _COMMA.match(text, e)
        if m is None:
            break
        pos = m.end()
    return (calls, end) if calls else None
