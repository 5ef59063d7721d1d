"""Parser names (SGLang's ``--tool-call-parser`` values) and detection from a chat template."""

from __future__ import annotations

from radixlm.runtime.parsers.tool_calls.base import ToolCallParser
from radixlm.runtime.parsers.tool_calls.hermes import HermesParser
from radixlm.runtime.parsers.tool_calls.llama3 import Llama3JsonParser
from radixlm.runtime.parsers.tool_calls.mistral import MistralParser

_PARSERS: dict[str, type[ToolCallParser]] = {
    "hermes": HermesParser,
    "qwen25": HermesParser,  # SGLang's name for the same format
    "qwen": HermesParser,
    "llama3": Llama3JsonParser,
    "mistral": MistralParser,
}
PARSER_NAMES = tuple(_PARSERS)
_DETECT_ORDER = (MistralParser, HermesParser, Llama3JsonParser)


def get_parser(name: str) -> ToolCallParser:
    try:
        return _PARSERS[name]()
    except KeyError:
        raise ValueError(f"tool_call_parser must be one of {sorted(_PARSERS)}, got {name!r}") from None


def detect_parser(template: str | None) -> ToolCallParser | None:
    """The family whose markers the chat template writes, or None (the template does not render tools)."""
    if not template:
        return None
    for cls in _DETECT_ORDER:
        if cls.matches_template(template):
            return cls()
    return None
