"""The routing key of a request: the text a worker will see first, as far as the router can tell
without the tokenizer. Requests that share a prompt prefix get keys that share a prefix, which is all
the approximate trees need. Token-id prompts map to text (``"<ids:1 2 3 ...>"`` style, one id per
space-separated field) so they share prefixes with each other, never with text prompts."""

from __future__ import annotations

import json
from typing import Any


def _ids_key(ids: list) -> str:
    return "\x00ids " + " ".join(str(t) for t in ids)


def _prompt_key(prompt: Any) -> str:
    """A text or token prompt, or a batch of them (keyed by its first element: a batch's prompts
    usually share their prefix, e.g. a DSL ``select``, and a batch goes to one worker)."""
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, list) and prompt:
        first = prompt[0]
        if isinstance(first, str):
            return first
        if isinstance(first, int):
            return _ids_key(prompt)
        if isinstance(first, list):
            return _ids_key(first)
    return ""


def generate_key(body: dict) -> str:
    """Native ``/generate``: ``text`` or ``input_ids``."""
    if body.get("text") is not None:
        return _prompt_key(body["text"])
    if body.get("input_ids") is not None:
        return _prompt_key(body["input_ids"])
    return ""


def completion_key(body: dict) -> str:
    return _prompt_key(body.get("prompt"))


def _content_text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # OpenAI content parts: keep the text parts
        return "".join(p.get("text", "") for p in content if isinstance(p, dict))
    return "" if content is None else json.dumps(content, sort_keys=True)


def chat_key(body: dict) -> str:
    """Chat: the tools (templates render them first), then each message as role and content."""
    parts = []
    if body.get("tools"):
        parts.append(json.dumps(body["tools"], sort_keys=True))
    for m in body.get("messages") or []:
        if isinstance(m, dict):
            parts.append(f"<{m.get('role', '')}>{_content_text(m.get('content'))}")
    return "\n".join(parts)


def request_rids(body: dict) -> list[str]:
    """The client's request ids (native ``rid``: a string or a list), for routing ``/abort_request``."""
    rid = body.get("rid")
    if isinstance(rid, str):
        return [rid]
    if isinstance(rid, list):
        return [r for r in rid if isinstance(r, str)]
    return []
