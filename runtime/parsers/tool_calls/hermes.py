"""Hermes / Qwen2.5 / Qwen3: each call is ``<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>``."""

from __future__ import annotations

import json

from radixlm.runtime.parsers.tool_calls.base import Piece, ToolCallParser, as_call, held_prefix


class HermesParser(ToolCallParser):
    name = "hermes"
    open_marker = "<tool_call>"
    close_marker = "</tool_call>"
    separator = "\n"
    template_markers = ("<tool_call>",)

    def split(self, text: str, final: bool) -> list[Piece]:
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
            body_at = start + len(self.open_marker)
            end = text.find(self.close_marker, body_at)
            if end < 0:
                if final:  # cut off (max_tokens): a complete JSON body still counts, as vLLM does
                    call = _call(text[body_at:])
                    pieces.append(call if call else text[start:])
                return pieces
            call = _call(text[body_at:end])
            pieces.append(call if call else text[start : end + len(self.close_marker)])
            pos = end + len(self.close_marker)

    def call_regex(self, body_regex: str) -> str:
        return f"<tool_call>\\n{body_regex}\\n</tool_call>"


def _call(body: str):
    try:
        return as_call(json.loads(body), "arguments")
    except json.JSONDecodeError:
        return None
