"""Mistral (v3 tokenizers, Mistral-7B-Instruct-v0.3, Mistral-Nemo...): ``[TOOL_CALLS] [{"name": ..., "arguments":
{...}}, ...]``, all calls of a turn in one JSON array after one marker.

On real Mistral tokenizers ``[TOOL_CALLS]`` is a special token, so the server decodes tool-enabled requests
with ``skip_special_tokens=False`` (see ``keeps_special_tokens``).
"""

from __future__ import annotations

import json

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
            return None  # the array may still be arriving (or, final, was cut off: prose)
        calls = [as_call(x, "arguments") for x in arr] if isinstance(arr, list) and arr else [None]
        return ([c for c in calls if c] if all(calls) else []), end

    def call_regex(self, body_regex: str) -> str:
        return body_regex

    def wrap_calls(self, calls_regex: str) -> str:
        return f"\\[TOOL_CALLS\\] ?\\[{calls_regex}\\]"
