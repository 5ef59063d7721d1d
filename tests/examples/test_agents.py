"""Agent frameworks against a radixlm server of a tiny Qwen2.5-template model: the examples' openai-client
agent and LangChain agent (bind_tools and create_agent), and a litellm call with tools. Every call's
arguments are validated with jsonschema; the agent's second prompt, read back through /tokenize, holds
the tool result as the chat template renders it."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import jsonschema
import openai
import pytest
import requests

from radixlm.runtime.server import Runtime
from tests import REPO_ROOT

pytestmark = pytest.mark.slow  # starts a server and subprocesses

EXAMPLES_DIR = os.path.join(REPO_ROOT, "examples")


@pytest.fixture(scope="module")
def url(make_model):
    rt = Runtime(model_path=make_model("qwen2", family="qwen25"), device="cpu", max_total_tokens=8192,
                 log_level="warning", log_interval_s=0.0)
    yield rt.url
    rt.shutdown()


@pytest.fixture(scope="module")
def examples():
    sys.path.insert(0, EXAMPLES_DIR)
    yield
    sys.path.remove(EXAMPLES_DIR)


def test_openai_client_agent_loop(url, examples):
    import agent_openai_tools as ex

    client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=120)
    answer, transcript = ex.agent(client, "default", "Weather in Rome, in celsius?")
    assert transcript[2]["role"] == "assistant" and transcript[2]["tool_calls"]
    for call in transcript[2]["tool_calls"]:  # run_tool validated them; check again here
        jsonschema.validate(json.loads(call["function"]["arguments"]), ex.SCHEMAS[call["function"]["name"]])
    tool_msgs = [m for m in transcript if m["role"] == "tool"]
    assert tool_msgs and transcript[-1]["role"] == "assistant" and isinstance(answer, str)
    # The second turn's prompt is the history through the template: the result inside Qwen2.5's tool turn.
    second = requests.post(url + "/tokenize", json={"messages": transcript[:4], "tools": ex.TOOLS}, timeout=30).json()
    text = requests.post(url + "/detokenize", json={"tokens": second["tokens"]}, timeout=30).json()["prompt"]
    assert f"<tool_response>\n{tool_msgs[0]['content']}\n</tool_response>" in text
    assert text.endswith("<|im_start|>assistant\n")


def test_langchain_bind_tools_and_create_agent(url, examples):
    pytest.importorskip("langchain.agents", reason="create_agent needs langchain>=1 (the 'agents' extra)")
    pytest.importorskip("langchain_openai")
    from langchain_core.messages import AIMessage, ToolMessage

    import agent_langchain as ex

    msg = ex.bind_tools_step(url)
    assert [c["name"] for c in msg.tool_calls] == ["get_weather"]
    for c in msg.tool_calls:
        jsonschema.validate(c["args"], ex.ARGS_SCHEMA)
    messages = ex.run_agent(url)
    calls = [c for m in messages if isinstance(m, AIMessage) for c in m.tool_calls]
    assert calls and all(c["name"] == "get_weather" for c in calls)
    for c in calls:
        jsonschema.validate(c["args"], ex.ARGS_SCHEMA)
    results = [m for m in messages if isinstance(m, ToolMessage)]
    assert len(results) == len(calls) and all(json.loads(r.content)["temperature"] == 21 for r in results
                                              if json.loads(r.content)["unit"] == "celsius")
    assert isinstance(messages[-1], AIMessage) and not messages[-1].tool_calls


def test_litellm_tools_call(url):
    os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")  # no network here
    litellm = pytest.importorskip("litellm")
    schema = {"type": "object", "properties": {"zone": {"type": "string", "maxLength": 8}}, "required": ["zone"],
              "additionalProperties": False}
    tools = [{"type": "function", "function": {"name": "get_time", "description": "time", "parameters": schema}}]
    r = litellm.completion(model="openai/default", api_base=url + "/v1", api_key="unused", tools=tools,
                           tool_choice="required", parallel_tool_calls=False,
                           messages=[{"role": "user", "content": "time in UTC?"}],
                           max_tokens=64, temperature=0.5, seed=1)
    calls = r.choices[0].message.tool_calls
    assert calls and r.choices[0].finish_reason == "tool_calls"
    for c in calls:
        assert c.function.name == "get_time"
        jsonschema.validate(json.loads(c.function.arguments), schema)


@pytest.mark.parametrize("script", ["agent_openai_tools.py", "agent_langchain.py"])
def test_agent_examples_run(url, script, tmp_path):
    if script == "agent_langchain.py":
        pytest.importorskip("langchain.agents")
    env = dict(os.environ, RADIXLM_TOOLS_URL=url)
    proc = subprocess.run([sys.executable, os.path.join(EXAMPLES_DIR, script)], cwd=tmp_path, env=env,
                          timeout=420, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "get_weather" in proc.stdout
