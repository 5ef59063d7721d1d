"""LangChain on a radixlm server: ``ChatOpenAI.bind_tools`` for one tool-calling step, then a whole agent
from ``langchain.agents.create_agent`` (LangChain 1.x's agent API) that calls the tool and answers.

    pip install langchain langchain-openai   # or: pip install -e '.[agents]'
    python examples/agent_langchain.py

radixlm serves the OpenAI tools API, so LangChain needs nothing special: point ``ChatOpenAI`` at the
server's ``/v1``. A middleware forces a tool call on the agent's first model call and prose afterwards,
so the tiny random model also walks the whole loop; drop it for a real model (``RADIXLM_TOOLS_URL``).
"""

from __future__ import annotations

import json
from typing import Literal

import jsonschema
from langchain.agents import create_agent
from langchain.agents.middleware import ModelRequest, wrap_model_call
from langchain_core.messages import AIMessage, ToolMessage
from langchain_core.tools import tool
from langchain_openai import ChatOpenAI
from pydantic import BaseModel, Field

from common import tool_server


class WeatherArgs(BaseModel):
    city: str = Field(description="city name", max_length=24)  # bounded: the server constrains to the schema
    unit: Literal["celsius", "fahrenheit"]


@tool(args_schema=WeatherArgs)
def get_weather(city: str, unit: str) -> str:
    """Current weather in a city."""
    return json.dumps({"city": city, "temperature": 21 if unit == "celsius" else 70, "unit": unit})


ARGS_SCHEMA = get_weather.tool_call_schema.model_json_schema()


@wrap_model_call
def one_tool_step(request: ModelRequest, handler):
    """First model call: a tool call is required; once a tool answered: prose only."""
    called = any(isinstance(m, ToolMessage) for m in request.messages)
    return handler(request.override(tool_choice="none" if called else "required"))


def chat_model(url: str) -> ChatOpenAI:
    return ChatOpenAI(base_url=url + "/v1", api_key="unused", model="default", temperature=0.7, max_tokens=128,
                      seed=0)


def bind_tools_step(url: str) -> AIMessage:
    """One call of a tool-bound model; the call's arguments validate against the tool's schema."""
    llm = chat_model(url).bind_tools([get_weather], tool_choice="get_weather", parallel_tool_calls=False)
    msg = llm.invoke("What is the weather in Paris?")
    for call in msg.tool_calls:
        jsonschema.validate(call["args"], ARGS_SCHEMA)
    return msg


def run_agent(url: str) -> list:
    """A create_agent loop: model → get_weather → model; returns the agent's messages."""
    agent = create_agent(chat_model(url), tools=[get_weather], middleware=[one_tool_step],
                         system_prompt="Use the tools when they help.")
    out = agent.invoke({"messages": [{"role": "user", "content": "Weather in Oslo, in celsius?"}]},
                       {"recursion_limit": 8})
    for m in out["messages"]:
        for call in getattr(m, "tool_calls", None) or []:
            jsonschema.validate(call["args"], ARGS_SCHEMA)
    return out["messages"]


def main() -> None:
    with tool_server() as url:
        msg = bind_tools_step(url)
        print("bind_tools:", [(c["name"], c["args"]) for c in msg.tool_calls])
        for m in run_agent(url):
            calls = [(c["name"], c["args"]) for c in getattr(m, "tool_calls", None) or []]
            print(f"{type(m).__name__:>12}: {str(m.content)[:80]!r}{' calls ' + str(calls) if calls else ''}")


if __name__ == "__main__":
    main()
