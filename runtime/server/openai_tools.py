"""Tool calling and reasoning on /v1/chat/completions: the request side (which tools, which mode, which
grammar, how the history is given to the chat template) and the response side (a choice's text → content,
reasoning_content and tool_calls, whole or streamed).

Modes (OpenAI's ``tool_choice``; legacy ``functions``/``function_call`` map onto them):
  * ``none``: tools are rendered into the prompt (as vLLM does), the output is never parsed for calls.
  * ``auto`` (the default with tools): the model writes prose or calls; a grammar lets prose run until the
    family's opening marker, then constrains each call to the tools' schemas.
  * ``required`` / a named function: the whole output is constrained to calls (of that function).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from radixlm.runtime.parsers.reasoning import ReasoningParser, ReasoningStream, get_reasoning_parser
from radixlm.runtime.parsers.tool_calls import FunctionSpec, ToolCall, ToolCallParser, ToolCallStream, detect_parser, get_parser
from radixlm.runtime.server.openai_protocol import (
    ChatCompletionRequest,
    ChatMessage,
    ContentPart,
    FunctionDefinition,
    ToolCallItem,
)
from radixlm.runtime.server.request_errors import RequestError


@dataclass(frozen=True)
class ChatConfig:
    """Server-wide chat settings, resolved once at startup."""

    template: str | None
    tool_parser: ToolCallParser | None  # --tool-call-parser, or detected from the template
    reasoning_parser: ReasoningParser | None  # --reasoning-parser
    json_whitespace: str | None = None  # --constrained-json-whitespace-pattern

    @classmethod
    def build(cls, template: str | None, tool_call_parser: str, reasoning_parser: str,
              json_whitespace: str | None = None) -> "ChatConfig":
        tp = detect_parser(template) if tool_call_parser == "auto" else get_parser(tool_call_parser)
        rp = None if reasoning_parser == "none" else get_reasoning_parser(reasoning_parser)
        return cls(template, tp, rp, json_whitespace)


@dataclass(frozen=True)
class ToolPlan:
    """What one request asks of tools."""

    mode: str  # "none" | "auto" | "required" | "named"
    tools: list[FunctionSpec] = field(default_factory=list)  # rendered into the prompt
    callable: list[FunctionSpec] = field(default_factory=list)  # may be called (named: just one)
    parallel: bool = True
    legacy: bool = False  # answer as message.function_call (the request used functions/function_call)
    parser: ToolCallParser | None = None

    @property
    def parses(self) -> bool:
        return self.mode != "none" and self.parser is not None

    def template_tools(self) -> list[dict] | None:
        if not self.tools:
            return None
        out = []
        for t in self.tools:  # OpenAI's key order: templates write tools with tojson, so order is prompt text
            fn: dict[str, Any] = {"name": t.name}
            if t.description is not None:
                fn["description"] = t.description
            fn["parameters"] = t.parameters
            out.append({"type": "function", "function": fn})
        return out

    def regex(self, json_whitespace: str | None) -> str | None:
        """The grammar for the output, or None (mode none)."""
        if not self.parses:
            return None
        try:
            if self.mode == "auto":
                return self.parser.auto_regex(self.callable, self.parallel, json_whitespace)
            return self.parser.calls_regex(self.callable, self.parallel, json_whitespace)
        except ValueError as e:  # a parameters schema constrained decoding cannot express
            raise RequestError(f"tools: {e}", param="tools") from None


def function_specs(defs: list[FunctionDefinition]) -> list[FunctionSpec]:
    """Declared functions as parsers and templates see them (no parameters: an empty object)."""
    return [FunctionSpec(d.name, d.parameters if d.parameters is not None else {"type": "object", "properties": {}},
                         d.description) for d in defs]


def plan_tools(req: ChatCompletionRequest, cfg: ChatConfig) -> ToolPlan:
    legacy = req.functions is not None
    if legacy:
        defs = req.functions or []
        choice: Any = req.function_call
        if choice is not None and not isinstance(choice, str):
            choice = {"type": "function", "function": {"name": choice.name}}
    else:
        defs = [t.function for t in (req.tools or [])]
        choice = req.tool_choice
        if choice is not None and not isinstance(choice, str):
            choice = {"type": "function", "function": {"name": choice.function.name}}
    tools = function_specs(defs)
    names = [t.name for t in tools]
    if len(set(names)) != len(names):
        raise RequestError("tools: function names must be unique", param="tools")
    param = "function_call" if legacy else "tool_choice"
    if choice is None:
        choice = "auto" if tools else "none"
    if not tools:
        if choice != "none":
            raise RequestError(f"{param} needs {'functions' if legacy else 'tools'}", param=param)
        return ToolPlan("none")
    parallel = req.parallel_tool_calls and not legacy  # legacy answers carry one function_call
    if choice == "none":
        return ToolPlan("none", tools, [], parallel, legacy)
    parser = cfg.tool_parser
    if parser is None:
        raise RequestError(
            f"{param}: the chat template writes no tool-call format this server knows; start it with "
            f"--tool-call-parser (one of hermes, qwen25, llama3, mistral), or use {param}='none'", param=param)
    if isinstance(choice, dict):
        name = choice["function"]["name"]
        if name not in names:
            raise RequestError(f"{param}: no tool named {name!r} (tools: {names})", param=param)
        return ToolPlan("named", tools, [tools[names.index(name)]], False, legacy, parser)
    return ToolPlan(choice, tools, tools, parallel, legacy, parser)


# --------------------------------------------------------------------------- history → template messages
def _text(content: str | list[ContentPart] | None, i: int) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    parts = []
    for part in content:
        if part.type != "text" or part.text is None:
            raise RequestError(f"messages[{i}].content: only text parts are supported", param="messages")
        parts.append(part.text)
    return "".join(parts)


def _template_arguments(args: str | dict, i: int) -> Any:
    """Templates write arguments with ``tojson``: give them the object (a JSON string is parsed)."""
    if isinstance(args, dict):
        return args
    try:
        return json.loads(args)
    except json.JSONDecodeError:
        raise RequestError(f"messages[{i}]: tool call arguments are not valid JSON", param="messages") from None


def template_messages(messages: list[ChatMessage]) -> list[dict]:
    """OpenAI messages → what chat templates read (tool calls with object arguments, tool_call_id kept)."""
    out: list[dict] = []
    last_legacy_id: str | None = None
    for i, m in enumerate(messages):
        d: dict[str, Any] = {"role": m.role, "content": _text(m.content, i)}
        if m.name is not None:
            d["name"] = m.name
        if m.reasoning_content is not None:
            d["reasoning_content"] = m.reasoning_content
        calls = list(m.tool_calls or [])
        if m.function_call is not None:  # legacy: one call, answered by a role "function" message
            last_legacy_id = f"call_{i}"
            calls.append(ToolCallItem(id=last_legacy_id, function=m.function_call))
        if calls:
            d["tool_calls"] = [{"id": c.id or f"call_{i}_{k}", "type": "function",
                                "function": {"name": c.function.name,
                                             "arguments": _template_arguments(c.function.arguments, i)}}
                               for k, c in enumerate(calls)]
        if m.role == "tool":
            d["tool_call_id"] = m.tool_call_id
        if m.role == "function":
            d["role"] = "tool"
            d["tool_call_id"] = last_legacy_id or m.name
        out.append(d)
    return out


# --------------------------------------------------------------------------- output → message
@dataclass(frozen=True)
class ParsedChoice:
    content: str | None
    reasoning: str | None
    calls: list[ToolCall]


def parse_choice(text: str, plan: ToolPlan, reasoning: ReasoningParser | None) -> ParsedChoice:
    """A finished choice's text → content, reasoning and calls. Calls inside the reasoning are not calls."""
    reasoning_text = None
    if reasoning is not None:
        s = reasoning.split(text, final=True)
        reasoning_text, text = s.reasoning, s.content
    if not plan.parses:
        return ParsedChoice(text, reasoning_text, [])
    res = plan.parser.parse(text, final=True)
    if not res.calls:
        return ParsedChoice(text, reasoning_text, [])
    return ParsedChoice(res.content or None, reasoning_text, res.calls)


def call_fields(calls: list[ToolCall], plan: ToolPlan, first_index: int | None = None) -> dict:
    """THE assembly of calls into a message (``first_index`` None) or a stream delta (the index of the
    first call in the choice): ``tool_calls`` with fresh ids, or the legacy ``function_call`` (one call
    per answer: the first)."""
    if not calls:
        return {}
    if plan.legacy:
        if first_index:  # a legacy answer carries one call; later ones are dropped, as OpenAI did
            return {}
        return {"function_call": {"name": calls[0].name, "arguments": calls[0].arguments}}
    items = []
    for k, c in enumerate(calls):
        item: dict[str, Any] = {} if first_index is None else {"index": first_index + k}
        item.update(id=plan.parser.new_call_id(), type="function",
                    function={"name": c.name, "arguments": c.arguments})
        items.append(item)
    return {"tool_calls": items}


def chat_message(p: ParsedChoice, plan: ToolPlan) -> dict:
    msg: dict[str, Any] = {"role": "assistant", "content": p.content}
    if p.reasoning is not None:
        msg["reasoning_content"] = p.reasoning
    msg.update(call_fields(p.calls, plan))
    return msg


def chat_finish_reason(base: str | None, num_calls: int, plan: ToolPlan) -> str | None:
    """A choice that stopped after calling answers "tool_calls" ("function_call" for legacy requests)."""
    if num_calls and base == "stop":
        return "function_call" if plan.legacy else "tool_calls"
    return base


class ChoiceStream:
    """One streamed choice: text deltas in, OpenAI ``delta`` dicts out (reasoning_content, content,
    tool_calls / function_call), reassembling exactly to the non-streamed message."""

    def __init__(self, plan: ToolPlan, reasoning: ReasoningParser | None, stream_reasoning: bool) -> None:
        self.plan = plan
        self.reasoning = ReasoningStream(reasoning) if reasoning is not None else None
        self.stream_reasoning = stream_reasoning
        self.held_reasoning = ""
        self.tools = ToolCallStream(plan.parser) if plan.parses else None
        self.num_calls = 0

    def feed(self, text: str, final: bool) -> dict:
        delta: dict[str, Any] = {}
        content = text
        if self.reasoning is not None:
            r, content = self.reasoning.feed(text, final)
            if self.stream_reasoning:
                if r:
                    delta["reasoning_content"] = r
            else:  # SGLang's stream_reasoning=false: the reasoning arrives in one piece once it is complete
                self.held_reasoning += r
                if self.held_reasoning and (final or self.reasoning.closed):
                    delta["reasoning_content"], self.held_reasoning = self.held_reasoning, ""
        if self.tools is not None:
            content, calls = self.tools.feed(content, final)
            delta.update(call_fields(calls, self.plan, self.num_calls))
            self.num_calls += len(calls)
        if content:
            delta["content"] = content
        return delta

    def finish_reason(self, base: str | None) -> str | None:
        return chat_finish_reason(base, self.num_calls, self.plan)


# --------------------------------------------------------------------------- SGLang's parser endpoints
def _str_field(body: dict, name: str, default: str | None = None) -> str:
    v = body.get(name, default)
    if not isinstance(v, str):
        raise RequestError(f"{name}: a string is required", param=name)
    return v


def parse_function_call_endpoint(body: dict, cfg: ChatConfig) -> dict:
    """SGLang's ``/parse_function_call``: ``{text, tool_call_parser, tools}`` → ``{normal_text, calls}``."""
    from radixlm.runtime.server.openai_protocol import ToolDefinition

    text = _str_field(body, "text")
    name = body.get("tool_call_parser")
    if name is None:
        if cfg.tool_parser is None:
            raise RequestError("tool_call_parser: required (the server has no tool-call parser)",
                               param="tool_call_parser")
        parser = cfg.tool_parser
    else:
        try:
            parser = get_parser(_str_field(body, "tool_call_parser"))
        except ValueError as e:
            raise RequestError(str(e), param="tool_call_parser") from None
    tools = body.get("tools") or []
    if not isinstance(tools, list):
        raise RequestError("tools: a list is required", param="tools")
    names = [ToolDefinition.model_validate(t).function.name for t in tools]
    res = parser.parse(text, final=True)
    calls = [{"tool_index": names.index(c.name) if c.name in names else -1, "name": c.name, "parameters": c.arguments}
             for c in res.calls if not names or c.name in names]
    return {"normal_text": res.content if res.calls else text, "calls": calls}


def separate_reasoning_endpoint(body: dict, cfg: ChatConfig) -> dict:
    """SGLang's ``/separate_reasoning``: ``{text, reasoning_parser}`` → ``{text, reasoning_text}``."""
    text = _str_field(body, "text")
    name = body.get("reasoning_parser")
    if name is None:
        if cfg.reasoning_parser is None:
            raise RequestError("reasoning_parser: required (the server has no reasoning parser)",
                               param="reasoning_parser")
        parser = cfg.reasoning_parser
    else:
        try:
            parser = get_reasoning_parser(_str_field(body, "reasoning_parser"))
        except ValueError as e:
            raise RequestError(str(e), param="reasoning_parser") from None
    s = parser.split(text, final=True)
    return {"text": s.content, "reasoning_text": s.reasoning}
