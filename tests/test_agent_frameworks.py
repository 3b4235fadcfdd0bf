"""Agent frameworks on `/v1/responses`: the OpenAI Agents SDK (its default OpenAIResponsesModel) and
langchain-openai with use_responses_api=True, against a live 127.0.0.1 server with a tiny random model.

Protocol, not wisdom: forced tool choice makes the tiny model call the tool, the grammar makes structured output
parse; the frameworks must run their loops to the end on what the server answers.
"""

from __future__ import annotations

import json
from typing import Literal

import pydantic
import pytest
from test_responses import KEY, make_server

agents = pytest.importorskip("agents")
langchain_openai = pytest.importorskip("langchain_openai")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from test_server import tiny_model, tiny_tokenizer

    tok = tiny_tokenizer(tmp_path_factory.mktemp("tok"))
    srv = make_server((tok, tiny_model(tok, False), tiny_model(tok, True)), tmp_path_factory.mktemp("state"))
    yield srv
    srv.stop()


class Weather(pydantic.BaseModel):
    city: str = pydantic.Field(max_length=10)
    temp_c: int = pydantic.Field(ge=-50, le=60)


def _agents_model(server):
    import openai

    agents.set_tracing_disabled(True)  # the SDK would otherwise export traces to OpenAI
    client = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=120)
    return agents.OpenAIResponsesModel(model="gpt-4o-mini", openai_client=client)


def test_agents_sdk_tool_loop(server):
    calls = []

    @agents.function_tool
    def get_weather(city: Literal["Paris", "Rome"]) -> str:  # an enum: the random model's string stays short
        """Current weather for a city."""
        calls.append(city)
        return json.dumps({"city": city, "temp_c": 21})

    # turn 1: tool_choice=required forces the call; the SDK runs the tool, sends function_call +
    # function_call_output back, resets tool_choice to auto, and turn 2's structured output (grammar) ends the run
    agent = agents.Agent(name="weather", instructions="Use the tool, then report.", tools=[get_weather],
                         output_type=Weather, model=_agents_model(server),
                         model_settings=agents.ModelSettings(tool_choice="required", max_tokens=80,
                                                             parallel_tool_calls=False))
    result = agents.Runner.run_sync(agent, "What is the weather in Paris?", max_turns=4)
    assert len(calls) == 1 and isinstance(calls[0], str)
    assert isinstance(result.final_output, Weather) and len(result.raw_responses) == 2
    first, second = result.raw_responses
    assert [o.type for o in first.output] == ["function_call"] and second.output[0].type == "message"
    assert second.usage.input_tokens > first.usage.input_tokens  # the call and its output were sent back


def test_agents_sdk_streamed(server):
    agent = agents.Agent(name="structured", instructions="Report the weather.", output_type=Weather,
                         model=_agents_model(server), model_settings=agents.ModelSettings(max_tokens=80))

    async def run():
        result = agents.Runner.run_streamed(agent, "Weather in Rome?")
        kinds = [e.type async for e in result.stream_events()]
        return result, kinds

    import asyncio

    result, kinds = asyncio.run(run())
    assert isinstance(result.final_output, Weather) and "raw_response_event" in kinds


def test_langchain_responses_api(server):
    from langchain_core.tools import tool

    llm = langchain_openai.ChatOpenAI(model="gpt-4o-mini", base_url=server.url + "/v1", api_key=KEY,
                                      use_responses_api=True, max_tokens=8, max_retries=0, temperature=0)
    msg = llm.invoke("hello world")
    assert isinstance(msg.text, str) and msg.usage_metadata["input_tokens"] > 0
    assert msg.response_metadata.get("id", "").startswith("resp_")

    @tool
    def get_weather(city: Literal["Paris", "Rome"]) -> str:
        """Current weather for a city."""
        return "sunny"

    forced = langchain_openai.ChatOpenAI(model="gpt-4o-mini", base_url=server.url + "/v1", api_key=KEY,
                                         use_responses_api=True, max_tokens=60, max_retries=0,
                                         model_kwargs={"parallel_tool_calls": False})
    ai = forced.bind_tools([get_weather], tool_choice="get_weather", strict=True).invoke("weather in Paris?")
    assert ai.tool_calls and ai.tool_calls[0]["name"] == "get_weather" and "city" in ai.tool_calls[0]["args"]
    chunks = list(llm.stream("the quick brown"))
    assert chunks and sum((c for c in chunks[1:]), chunks[0]).usage_metadata["output_tokens"] >= 1
    structured = forced.with_structured_output(Weather, method="json_schema").invoke("weather in Rome?")
    assert isinstance(structured, Weather)
