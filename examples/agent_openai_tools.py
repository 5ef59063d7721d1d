"""A tool-using agent on the OpenAI tools API of a radixlm server, through the official ``openai`` client,
followed by an SGLang-style program (``@sgl.function`` on the ``sgl.OpenAI`` backend) that writes the report.

    python examples/agent_openai_tools.py

The loop is the usual one: the model gets the tools, answers with ``tool_calls``, each call runs here (its
arguments checked against the tool's JSON schema first), the results go back as ``role: "tool"`` messages,
and the model answers. The first turn uses ``tool_choice="required"`` so that even the tiny random model
calls a tool (the server constrains the call to the schema); later turns let the model choose, and the
last one asks for prose. With a real model (``RADIXLM_TOOLS_URL``) the same loop does the task.
"""

from __future__ import annotations

import json

import jsonschema
import openai

import radixlm as sgl
from common import tool_server

WEATHER_SCHEMA = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 24},
                                                   "unit": {"enum": ["celsius", "fahrenheit"]}},
                  "required": ["city", "unit"], "additionalProperties": False}
ADD_SCHEMA = {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
              "required": ["a", "b"], "additionalProperties": False}
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "description": "Current weather in a city.",
                                      "parameters": WEATHER_SCHEMA}},
    {"type": "function", "function": {"name": "add", "description": "Add two integers.", "parameters": ADD_SCHEMA}},
]
SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}


def get_weather(city: str, unit: str) -> dict:
    return {"city": city, "temperature": 21 if unit == "celsius" else 70, "unit": unit, "sky": "clear"}


def add(a: int, b: int) -> dict:
    return {"sum": a + b}


IMPLEMENTATIONS = {"get_weather": get_weather, "add": add}


def run_tool(name: str, arguments: str) -> str:
    """Execute one call; the arguments must validate against the tool's schema (the server guarantees it)."""
    args = json.loads(arguments)
    jsonschema.validate(args, SCHEMAS[name])
    return json.dumps(IMPLEMENTATIONS[name](**args))


def agent(client: openai.OpenAI, model: str, question: str, max_turns: int = 3) -> tuple[str, list[dict]]:
    """Run the tool loop; returns the final answer and the transcript (OpenAI messages)."""
    messages: list[dict] = [{"role": "system", "content": "Use the tools when they help."},
                            {"role": "user", "content": question}]
    for turn in range(max_turns):
        choice = "required" if turn == 0 else ("none" if turn == max_turns - 1 else "auto")
        # One call per turn keeps the tiny model's turns short; a real model may use parallel calls.
        resp = client.chat.completions.create(model=model, messages=messages, tools=TOOLS, tool_choice=choice,
                                              parallel_tool_calls=False, max_tokens=128, temperature=0.7, seed=turn)
        msg = resp.choices[0].message
        if not msg.tool_calls:
            messages.append({"role": "assistant", "content": msg.content})
            return msg.content or "", messages
        messages.append({"role": "assistant", "content": msg.content, "tool_calls": [
            {"id": c.id, "type": "function", "function": {"name": c.function.name, "arguments": c.function.arguments}}
            for c in msg.tool_calls]})
        for c in msg.tool_calls:
            messages.append({"role": "tool", "tool_call_id": c.id, "content": run_tool(c.function.name, c.function.arguments)})
    return "", messages


@sgl.function
def report(s, question, observations):
    s += sgl.system("You write one-sentence reports.")
    s += sgl.user(f"Question: {question}\nTool results: {observations}\nReport:")
    s += sgl.assistant(sgl.gen("report", max_tokens=32))


def main() -> None:
    with tool_server() as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused")
        model = client.models.list().data[0].id
        question = "What is the weather in Paris, in celsius?"
        answer, transcript = agent(client, model, question)
        for m in transcript:
            calls = [f"{c['function']['name']}({c['function']['arguments']})" for c in m.get("tool_calls", [])]
            print(f"{m['role']:>9}: {m.get('content') or ''}{' calls ' + ', '.join(calls) if calls else ''}")
        print("answer:", repr(answer))
        observations = [m["content"] for m in transcript if m["role"] == "tool"]
        st = report.run(question=question, observations="; ".join(observations),
                        backend=sgl.OpenAI(model, base_url=url + "/v1", api_key="unused"), temperature=0)
        print("report:", repr(st["report"]))


if __name__ == "__main__":
    main()
