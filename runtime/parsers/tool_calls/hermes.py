"""Hermes / Qwen2.5 / Qwen3: each call is ``<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>``."""

from __future__ import annotations

import json

from radixlm.runtime.parsers.tool_calls.base import ToolCall, ToolCallParser, as_call


class HermesParser(ToolCallParser):
    name = "hermes"
    open_marker = "<tool_call>"
    close_marker = "</tool_call>"
    separator = "\n"
    template_markers = ("<tool_call>",)

    def parse_body(self, text: str, at: int, final: bool) -> tuple[list[ToolCall], int] | None:
        end = text.find(self.close_marker, at)
        if end < 0:
            if final:  # cut off (max_tokens): a complete JSON body still counts, as vLLM does
                call = _call(text[at:])
                return ([call], len(text)) if call else None
            return None
        call = _call(text[at:end])
        return ([call] if call else []), end + len(self.close_marker)

    def call_regex(self, body_regex: str) -> str:
        return f"<tool_call>\\n{body_regex}\\n</tool_call>"


def _call(body: str) -> ToolCall | None:
    try:
        return as_call(json.loads(body), "arguments")
    except json.JSONDecodeError:
        return None
