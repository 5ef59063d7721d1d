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


@pytest.mark.parametrize("parser, family, arch", [("deepseek-r1", "deepseek-r1", "llama"), ("qwen3", "qwen3", "qwen2")])
def test_response_format_follows_the_reasoning_block(make_model, parser, family, arch):
    """With a reasoning parser, a JSON answer is constrained after the block (DeepSeek-R1's prompt opens it:
    before, the JSON was written inside the reasoning and the content came back empty)."""
    import json
    import re

    from radixlm.runtime.hf_tokenizer import load_tokenizer
    from radixlm.runtime.server.openai_api import prepare_chat
    from radixlm.runtime.server.openai_protocol import ChatCompletionRequest
    from radixlm.runtime.server.openai_tools import ChatConfig

    tok = load_tokenizer(make_model(arch, family=family))
    cfg = ChatConfig.build(None, "auto", parser, "")
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"], "additionalProperties": False}
    req = ChatCompletionRequest(messages=[{"role": "user", "content": "x"}], max_tokens=8,
                                response_format={"type": "json_schema", "json_schema": {"name": "s", "schema": schema}})
    regex = prepare_chat(req, tok, cfg, {"context_length": 512}, "m").obj.sampling_params["regex"]
    opened = "" if parser == "deepseek-r1" else "<think>\n"
    assert re.fullmatch(regex, opened + 'I think {"a": 2} fits\n</think>\n\n{"a":1}')
    assert bool(re.fullmatch(regex, '{"a":1}')) is (parser == "qwen3")  # Qwen3 may skip the block
    assert not re.fullmatch(regex, opened + "thinking\n</think>\n\nprose")
    answer = parse_choice(opened + "hm\n</think>\n\n" + '{"a":1}', ToolPlan("none"), get_reasoning_parser(parser))
    assert json.loads(answer.content) == {"a": 1}
