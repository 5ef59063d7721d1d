"""Chat output assembly without a server: tool calls written inside reasoning are not calls (whole and
streamed), one assembly for messages and deltas, cut-off Mistral arrays keep their complete calls."""

from __future__ import annotations

import pytest

from radixlm.runtime.parsers.reasoning import get_reasoning_parser
from radixlm.runtime.parsers.tool_calls import FunctionSpec, get_parser
from radixlm.runtime.server.openai_tools import ChoiceStream, ToolPlan, chat_message, parse_choice

TOOLS = [FunctionSpec("get_time", {"type": "object", "properties": {"zone": {"type": "string"}}})]
CALL = '<tool_call>\n{"name": "get_time", "arguments": {"zone": "utc"}}\n</tool_call>'


def _plan(legacy: bool = False) -> ToolPlan:
    return ToolPlan("auto", TOOLS, TOOLS, True, legacy, get_parser("hermes"))


def _stream(text: str, plan: ToolPlan, reasoning, step: int) -> dict:
    s = ChoiceStream(plan, reasoning, True)
    deltas = [s.feed(text[i:i + step], False) for i in range(0, len(text), step)] + [s.feed("", True)]
    out = {"reasoning_content": "", "content": "", "tool_calls": []}
    for d in deltas:
        out["reasoning_content"] += d.get("reasoning_content", "")
        out["content"] += d.get("content", "")
        out["tool_calls"] += d.get("tool_calls", [])
    out["finish_reason"] = s.finish_reason("stop")
    return out


@pytest.mark.parametrize("step", [1, 3, 1000])
def test_calls_inside_reasoning_are_not_calls(step):
    text = f"<think>\nI might call {CALL} but not yet.\n</think>\n\nNo call needed."
    reasoning = get_reasoning_parser("qwen3")
    parsed = parse_choice(text, _plan(), reasoning)
    assert parsed.calls == [] and parsed.content == "No call needed." and CALL in parsed.reasoning
    msg = chat_message(parsed, _plan())
    assert "tool_calls" not in msg
    streamed = _stream(text, _plan(), reasoning, step)
    assert streamed["tool_calls"] == [] and streamed["finish_reason"] == "stop"
    assert (streamed["reasoning_content"], streamed["content"]) == (parsed.reasoning, parsed.content)


@pytest.mark.parametrize("step", [1, 5, 1000])
def test_call_after_reasoning_is_a_call_streamed_and_not(step):
    text = f"<think>\nuse the clock\n</think>\n\n{CALL}"
    reasoning = get_reasoning_parser("qwen3")
    msg = chat_message(parse_choice(text, _plan(), reasoning), _plan())
    assert msg["reasoning_content"] == "use the clock" and msg["content"] is None
    assert [c["function"] for c in msg["tool_calls"]] == [{"name": "get_time", "arguments": '{"zone": "utc"}'}]
    streamed = _stream(text, _plan(), reasoning, step)
    assert [(c["index"], c["function"]) for c in streamed["tool_calls"]] == [(0, msg["tool_calls"][0]["function"])]
    assert streamed["finish_reason"] == "tool_calls"


def test_legacy_answers_carry_one_function_call():
    text = CALL + "\n" + CALL.replace("utc", "cet")
    msg = chat_message(parse_choice(text, _plan(legacy=True), None), _plan(legacy=True))
    assert msg["function_call"] == {"name": "get_time", "arguments": '{"zone": "utc"}'} and "tool_calls" not in msg
    streamed = _stream(text, _plan(legacy=True), None, 4)
    assert streamed["tool_calls"] == [] and streamed["finish_reason"] == "function_call"


def test_cut_off_mistral_array_keeps_its_complete_calls():
    p = get_parser("mistral")
    text = '[TOOL_CALLS] [{"name": "a", "arguments": {"x": 1}}, {"name": "b", "arguments": {"y"'
    res = p.parse(text)
    assert [(c.name, c.arguments) for c in res.calls] == [("a", '{"x": 1}')]
    assert p.parse(text, final=False).calls == []  # while streaming, the array may still complete
    assert p.parse('[TOOL_CALLS] [{"name": "a", "argu').calls == []
