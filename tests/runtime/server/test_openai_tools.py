"""Tool calling through the official ``openai`` client against ``radixlm serve`` on tiny models of each
tool-call family (Hermes/Qwen2.5, Llama 3 JSON, Mistral): every ``tool_choice`` mode, streamed and not, single
and parallel calls, legacy functions, logprobs, and a two-turn agent loop whose second prompt (read back
through /tokenize) holds the tool result as the template renders it. Arguments are validated with
``jsonschema`` against the tool's schema every time. Reasoning separation runs on a Qwen3 server."""

from __future__ import annotations

import json

import jsonschema
import openai
import pytest
import requests
from transformers import AutoTokenizer

from radixlm.runtime.server import Runtime

pytestmark = pytest.mark.slow  # starts servers

WEATHER = {"type": "object", "properties": {"city": {"type": "string", "minLength": 1, "maxLength": 10},
                                            "unit": {"enum": ["c", "f"]}},
           "required": ["city", "unit"], "additionalProperties": False}
TIME = {"type": "object", "properties": {"zone": {"type": "string", "maxLength": 6}}, "required": ["zone"],
        "additionalProperties": False}
SCHEMAS = {"get_weather": WEATHER, "get_time": TIME}
TOOLS = [{"type": "function", "function": {"name": n, "description": f"{n} tool", "parameters": s}}
         for n, s in SCHEMAS.items()]
MESSAGES = [{"role": "system", "content": "You can call tools."},
            {"role": "user", "content": "What is the weather in Paris?"}]
FAMILIES = {"qwen25": "qwen2", "llama3": "llama", "mistral": "mistral"}
# The token that opens a call in each family (a single token: biasing it makes "auto" choose to call).
OPEN = {"qwen25": "<tool_call>", "llama3": "{", "mistral": "[TOOL_CALLS]"}


def _check_calls(calls, names=tuple(SCHEMAS)) -> None:
    assert calls, "expected tool calls"
    for c in calls:
        assert c.type == "function" and c.function.name in names
        jsonschema.validate(json.loads(c.function.arguments), SCHEMAS[c.function.name])
    assert len({c.id for c in calls}) == len(calls)


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def server(request, make_model):
    family = request.param
    path = make_model(FAMILIES[family], family=family)
    rt = Runtime(model_path=path, device="cpu", max_total_tokens=8192, log_level="warning", log_interval_s=0.0,
                 constrained_json_whitespace_pattern="")
    client = openai.OpenAI(base_url=rt.url + "/v1", api_key="unused", max_retries=0, timeout=120)
    yield family, rt, client, AutoTokenizer.from_pretrained(path)
    rt.shutdown()


def _chat(client, **kw):
    kw.setdefault("model", "default")
    kw.setdefault("messages", MESSAGES)
    kw.setdefault("max_tokens", 160)
    kw.setdefault("temperature", 1.0)
    return client.chat.completions.create(**kw)


def test_required_single_and_parallel(server):
    family, _, client, _ = server
    r = _chat(client, tools=TOOLS, tool_choice="required", parallel_tool_calls=False, n=3, seed=1)
    for ch in r.choices:
        assert ch.finish_reason == "tool_calls" and len(ch.message.tool_calls) == 1
        _check_calls(ch.message.tool_calls)
        if family == "mistral":
            assert all(len(c.id) == 9 and c.id.isalnum() for c in ch.message.tool_calls)
    r = _chat(client, tools=TOOLS, tool_choice="required", n=4, seed=2, max_tokens=240)
    for ch in r.choices:  # one or more calls; a call cut off by max_tokens is not reported as a call
        _check_calls(ch.message.tool_calls)
        assert ch.finish_reason in ("tool_calls", "length")


def test_named_function_streamed_equals_calls(server):
    _, _, client, _ = server
    choice = {"type": "function", "function": {"name": "get_time"}}
    whole = _chat(client, tools=TOOLS, tool_choice=choice, seed=3)
    _check_calls(whole.choices[0].message.tool_calls, names=("get_time",))
    chunks = list(_chat(client, tools=TOOLS, tool_choice=choice, seed=3, stream=True))
    calls: dict[int, dict] = {}
    finish = None
    for c in chunks:
        for ch in c.choices:
            finish = ch.finish_reason or finish
            for d in ch.delta.tool_calls or []:
                acc = calls.setdefault(d.index, {"id": "", "name": "", "arguments": ""})
                acc["id"] += d.id or ""
                acc["name"] += (d.function.name or "") if d.function else ""
                acc["arguments"] += (d.function.arguments or "") if d.function else ""
    assert finish == "tool_calls" and len(calls) == 1
    got = calls[0]
    assert got["name"] == "get_time"
    jsonschema.validate(json.loads(got["arguments"]), TIME)
    # same seed, same sampled tokens: the streamed call is the non-streamed one
    assert json.loads(got["arguments"]) == json.loads(whole.choices[0].message.tool_calls[0].function.arguments)


def test_auto_calls_when_the_model_opens_a_call(server):
    family, _, client, tok = server
    open_ids = tok(OPEN[family], add_special_tokens=False).input_ids
    assert len(open_ids) == 1
    r = _chat(client, tools=TOOLS, tool_choice="auto", parallel_tool_calls=False, seed=4, n=2,
              logit_bias={str(open_ids[0]): 100})
    for ch in r.choices:
        assert ch.finish_reason == "tool_calls"
        _check_calls(ch.message.tool_calls)
    # without the push, auto may answer in prose; whatever it writes, calls (if any) are valid
    for ch in _chat(client, tools=TOOLS, seed=5, n=3, max_tokens=40).choices:
        if ch.message.tool_calls:
            _check_calls(ch.message.tool_calls)
        else:
            assert ch.finish_reason in ("stop", "length")


def test_none_renders_tools_but_never_calls(server):
    family, rt, client, tok = server
    open_ids = tok(OPEN[family], add_special_tokens=False).input_ids
    r = _chat(client, tools=TOOLS, tool_choice="none", max_tokens=12, seed=6, logit_bias={str(open_ids[0]): 100})
    assert r.choices[0].message.tool_calls is None and r.choices[0].finish_reason in ("stop", "length")
    with_tools = requests.post(rt.url + "/tokenize", json={"messages": MESSAGES, "tools": TOOLS}, timeout=30).json()
    without = requests.post(rt.url + "/tokenize", json={"messages": MESSAGES}, timeout=30).json()
    assert r.usage.prompt_tokens == with_tools["count"] > without["count"]


def test_legacy_functions(server):
    _, _, client, _ = server
    r = _chat(client, functions=[t["function"] for t in TOOLS], function_call={"name": "get_weather"}, seed=7)
    ch = r.choices[0]
    assert ch.finish_reason == "function_call" and ch.message.tool_calls is None
    assert ch.message.function_call.name == "get_weather"
    jsonschema.validate(json.loads(ch.message.function_call.arguments), WEATHER)


def test_logprobs_of_sampled_tool_calls_are_numbers(server):
    """Tool-call grammars force much of the text (jump-forward); every token still has its logprob."""
    _, _, client, _ = server
    r = _chat(client, tools=TOOLS, tool_choice="required", parallel_tool_calls=False, n=4, seed=8, logprobs=True,
              top_logprobs=2)
    for ch in r.choices:
        content = ch.logprobs.content
        assert content and all(isinstance(t.logprob, float) and len(t.top_logprobs) == 2 for t in content)


def test_two_turn_agent_loop_feeds_the_tool_result_through_the_template(server):
    _, rt, client, tok = server
    first = _chat(client, tools=TOOLS, tool_choice={"type": "function", "function": {"name": "get_weather"}}, seed=9)
    call = first.choices[0].message.tool_calls[0]
    args = json.loads(call.function.arguments)
    jsonschema.validate(args, WEATHER)
    result = json.dumps({"city": args["city"], "temperature": 21, "unit": args["unit"]})
    history = MESSAGES + [
        {"role": "assistant", "content": None,
         "tool_calls": [{"id": call.id, "type": "function",
                         "function": {"name": call.function.name, "arguments": call.function.arguments}}]},
        {"role": "tool", "tool_call_id": call.id, "content": result},
    ]
    second = _chat(client, messages=history, tools=TOOLS, tool_choice="none", max_tokens=8, temperature=0)
    assert second.choices[0].message.content is not None
    prompt = requests.post(rt.url + "/tokenize", json={"messages": history, "tools": TOOLS}, timeout=30).json()
    assert prompt["count"] == second.usage.prompt_tokens
    text = requests.post(rt.url + "/detokenize", json={"tokens": prompt["tokens"]}, timeout=30).json()["prompt"]
    template_history = [dict(m) for m in history]  # what a template reads: arguments as an object
    template_history[2] = dict(template_history[2], tool_calls=[
        {"id": call.id, "type": "function", "function": {"name": call.function.name, "arguments": args}}])
    expected = tok.apply_chat_template(template_history, tools=TOOLS, tokenize=False, add_generation_prompt=True)
    assert text == expected
    assert result in text or json.dumps(result) in text  # Mistral's template writes the result with tojson
    assert call.function.arguments in text or json.dumps(args) in text  # the call is in the history too


# --------------------------------------------------------------------------- reasoning (Qwen3 family)
THINK = r"<think>\n[a-z]{2,8}( [a-z]{2,8}){0,3}\n</think>\n\n[a-z]{2,8}( [a-z]{2,8}){0,2}"


@pytest.fixture(scope="module")
def qwen3(make_model):
    rt = Runtime(model_path=make_model("qwen2", family="qwen3"), device="cpu", max_total_tokens=4096,
                 log_level="warning", log_interval_s=0.0, reasoning_parser="qwen3")
    yield openai.OpenAI(base_url=rt.url + "/v1", api_key="unused", max_retries=0, timeout=120)
    rt.shutdown()


def _think(client, **kw):
    return client.chat.completions.create(
        model="default", messages=[{"role": "user", "content": "Think first."}], max_tokens=80, temperature=1.0,
        seed=11, extra_body={"regex": THINK, "skip_special_tokens": False, **kw.pop("extra_body", {})}, **kw)


def test_reasoning_separated_streamed_and_not(qwen3):
    msg = _think(qwen3).choices[0].message
    reasoning = msg.model_extra["reasoning_content"]
    assert reasoning and "<think>" not in reasoning and "</think>" not in msg.content and msg.content
    chunks = list(_think(qwen3, stream=True))
    streamed_r = "".join(c.choices[0].delta.model_extra.get("reasoning_content") or "" for c in chunks if c.choices)
    streamed_c = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert (streamed_r, streamed_c) == (reasoning, msg.content)
    # stream_reasoning=false: the reasoning arrives in one delta once the block is closed
    held = [c.choices[0].delta.model_extra.get("reasoning_content") for c in
            _think(qwen3, stream=True, extra_body={"stream_reasoning": False}) if c.choices]
    assert [r for r in held if r] == [reasoning]
    # separate_reasoning=false: the block stays in the content
    raw = _think(qwen3, extra_body={"separate_reasoning": False}).choices[0].message
    assert raw.model_extra.get("reasoning_content") is None and raw.content.startswith("<think>")
    assert raw.content.endswith(msg.content)


def test_reasoning_model_required_call(qwen3):
    """With --reasoning-parser, "required" lets the model reason first; whatever it does, a reported call
    validates, and a choice without calls is one still reasoning at max_tokens."""
    r = qwen3.chat.completions.create(model="default", messages=MESSAGES, tools=TOOLS, tool_choice="required",
                                      parallel_tool_calls=False, max_tokens=160, temperature=1.0, seed=12, n=4)
    with_calls = [ch for ch in r.choices if ch.message.tool_calls]
    assert with_calls
    for ch in r.choices:
        if ch.message.tool_calls:
            assert ch.finish_reason == "tool_calls"
            _check_calls(ch.message.tool_calls)
        else:
            assert ch.finish_reason == "length" and ch.message.model_extra.get("reasoning_content")


def test_reasoning_model_json_answer(qwen3):
    """A JSON answer is constrained after the reasoning block; biasing "</think>" closes the block at once
    (the tiny model would otherwise reason until max_tokens), and the content is the schema-valid JSON."""
    url = str(qwen3.base_url).rstrip("/").removesuffix("/v1")
    end = requests.post(url + "/tokenize", json={"prompt": "</think>", "add_special_tokens": False}, timeout=30).json()
    assert end["count"] == 1
    r = qwen3.chat.completions.create(
        model="default", messages=[{"role": "user", "content": "Time zone?"}], max_tokens=120, temperature=1.0,
        seed=13, n=3, logit_bias={str(end["tokens"][0]): 100},
        response_format={"type": "json_schema", "json_schema": {"name": "t", "schema": TIME}})
    for ch in r.choices:
        assert ch.finish_reason == "stop" and ch.message.model_extra.get("reasoning_content") == ""
        jsonschema.validate(json.loads(ch.message.content), TIME)
