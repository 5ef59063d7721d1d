"""Tool-call parsers, one per model family, chosen by ``--tool-call-parser`` or detected from the chat template.

Each parser knows its family's wire format both ways: it turns generated text into ``ToolCall``s
(``ToolCallParser.parse``; streamed through ``ToolCallStream``) and writes the regex that constrains a model
to emit well-formed calls whose arguments match the tools' JSON schemas (``calls_regex`` / ``auto_regex``).
"""

from radixlm.runtime.parsers.tool_calls.base import FunctionSpec, ParseResult, ToolCall, ToolCallParser, ToolCallStream
from radixlm.runtime.parsers.tool_calls.registry import PARSER_NAMES, detect_parser, get_parser

__all__ = ["FunctionSpec", "ParseResult", "ToolCall", "ToolCallParser", "ToolCallStream", "PARSER_NAMES",
           "detect_parser", "get_parser"]
