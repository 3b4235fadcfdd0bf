"""The Responses API (`/v1/responses`), driven by the official `openai` client against a live 127.0.0.1 server.

A tiny random text model and a tiny vision model serve: these tests check the protocol (shapes, event order,
stored state, grammar-enforced formats and tool calls), not what the model says. One server for the module; the
restart test starts two more on the same state directory.
"""

from __future__ import annotations

import json

import httpx
import openai
import pydantic
import pytest
from test_server import LiveServer, free_port, png_url, tiny_model, tiny_tokenizer

from omnimini.serve.config import ServeConfig
from omnimini.serve.limits import ServeLimits

KEY = "sk-responses"
TOOLS = [{"type": "function", "name": "get_weather", "description": "Current weather for a city", "strict": True,
          "parameters": {"type": "object", "properties": {"city": {"type": "string", "enum": ["Paris", "Rome"]}},
                         "required": ["city"], "additionalProperties": False}}]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    tok = tiny_tokenizer(tmp_path_factory.mktemp("tok"))
    return tok, tiny_model(tok, False), tiny_model(tok, True)


def make_server(models, state_dir) -> LiveServer:
    tok, text, vision = models
    cfg = ServeConfig(models=[("main", text, tok), ("vision", vision, tok)], aliases={"gpt-4o-mini": "main"},
                      port=free_port(), api_keys=[KEY], max_batch=4, max_context=1024, state_dir=str(state_dir),
                      limits=ServeLimits(max_tokens=256, max_concurrent=16))
    return LiveServer(cfg)


@pytest.fixture(scope="module")
def state_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("responses-state")


@pytest.fixture(scope="module")
def server(models, state_dir):
    srv = make_server(models, state_dir)
    yield srv
    srv.stop()


def client_for(srv) -> openai.OpenAI:
    return openai.OpenAI(base_url=srv.url + "/v1", api_key=KEY, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def client(server):
    return client_for(server)


def post(srv, body, path="/v1/responses", method="POST"):
    return httpx.request(method, srv.url + path, json=body, headers={"Authorization": f"Bearer {KEY}"}, timeout=60)


# ---- create -------------------------------------------------------------------------------------------------

def test_text_input(client, models):
    tok = models[0]
    r = client.responses.create(model="gpt-4o-mini", input="hello world", max_output_tokens=6, temperature=0)
    assert r.object == "response" and r.id.startswith("resp_") and r.model == "gpt-4o-mini"
    assert r.status in ("completed", "incomplete")
    msg = r.output[0]
    assert msg.type == "message" and msg.role == "assistant" and msg.content[0].type == "output_text"
    assert r.output_text == msg.content[0].text
    assert r.usage.input_tokens == len(tok.encode_chat([{"role": "user", "content": "hello world"}]))
    assert 1 <= r.usage.output_tokens <= 6 and r.usage.input_tokens_details.cached_tokens == 0
    assert r.usage.total_tokens == r.usage.input_tokens + r.usage.output_tokens
    if r.status == "incomplete":
        assert r.incomplete_details.reason == "max_output_tokens" and r.usage.output_tokens == 6


def test_message_list_with_instructions_matches_chat(client, models):
    tok = models[0]
    items = [{"role": "user", "content": "the quick"},
             {"role": "assistant", "content": "brown fox"},
             {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "jumps over"}]}]
    r = client.responses.create(model="main", input=items, instructions="Answer in json.", max_output_tokens=5,
                                temperature=0, extra_body={"seed": 3})  # seed: not in the SDK's signature
    msgs = [{"role": "system", "content": "Answer in json."}, {"role": "user", "content": "the quick"},
            {"role": "assistant", "content": "brown fox"}, {"role": "user", "content": "jumps over"}]
    assert r.usage.input_tokens == len(tok.encode_chat(msgs))
    assert r.instructions == "Answer in json."
    # the same conversation through chat completions gives the same greedy text: one generation path
    chat = client.chat.completions.create(model="main", messages=msgs, max_tokens=5, temperature=0, seed=3)
    assert r.output_text == chat.choices[0].message.content


def test_streaming_event_order(client):
    stream = client.responses.create(model="main", input="hello", max_output_tokens=5, stream=True, temperature=0)
    events = list(stream)
    types = [e.type for e in events]
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert types[:5] == ["response.created", "response.in_progress", "response.output_item.added",
                         "response.content_part.added", "response.output_text.delta"]
    assert types[-4:] == ["response.output_text.done", "response.content_part.done", "response.output_item.done",
                          events[-1].type]
    assert events[-1].type in ("response.completed", "response.incomplete")
    assert events[0].response.status == "in_progress" and events[0].response.output == []
    final = events[-1].response
    deltas = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    done = next(e for e in events if e.type == "response.output_text.done")
    assert deltas == done.text == final.output_text
    item_ids = {e.item_id for e in events if hasattr(e, "item_id")}
    assert item_ids == {final.output[0].id}
    assert final.usage.output_tokens >= 1
    # the stored response is the one the stream ended with
    assert client.responses.retrieve(final.id).output_text == final.output_text


def test_logprobs_when_included(client):
    r = client.responses.create(model="main", input="hello", max_output_tokens=4, top_logprobs=2,
                                include=["message.output_text.logprobs"])
    part = r.output[0].content[0]
    assert len(part.logprobs) == r.usage.output_tokens and r.top_logprobs == 2
    assert all(len(t.top_logprobs) == 2 and t.logprob <= 0 for t in part.logprobs)
    assert bytes(b for t in part.logprobs for b in t.bytes).decode("utf-8", "replace") == part.text
    events = list(client.responses.create(model="main", input="hello", max_output_tokens=4, stream=True,
                                          include=["message.output_text.logprobs"]))
    streamed = [lp for e in events if e.type == "response.output_text.delta" for lp in e.logprobs]
    done = next(e for e in events if e.type == "response.output_text.done")
    assert len(done.logprobs) == events[-1].response.usage.output_tokens
    # a token held back (part of a UTF-8 character) sends its logprob with the next delta: only trailing ones
    # that never became text are missing from the deltas
    assert [t.model_dump() for t in streamed] == [t.model_dump() for t in done.logprobs[:len(streamed)]]
    held = done.logprobs[len(streamed):]
    assert not held or bytes(b for t in held for b in t.bytes).decode("utf-8", "replace").strip("\ufffd") == ""
    plain = client.responses.create(model="main", input="hello", max_output_tokens=2)
    assert plain.output[0].content[0].logprobs == []


class Weather(pydantic.BaseModel):
    city: str = pydantic.Field(max_length=10)
    temp_c: int = pydantic.Field(ge=-50, le=60)
    sunny: bool


def test_parse_with_pydantic_model(client):
    r = client.responses.parse(model="main", input="Weather in Paris?", text_format=Weather, max_output_tokens=120)
    assert r.status == "completed"
    w = r.output_parsed
    assert isinstance(w, Weather) and -50 <= w.temp_c <= 60
    j = client.responses.create(model="main", input="json please", text={"format": {"type": "json_object"}},
                                max_output_tokens=40, temperature=0)
    assert j.output_text.startswith("{") and j.text.format.type == "json_object"


def test_function_call_round_trip(client):
    q = [{"role": "user", "content": "What is the weather in Paris?"}]
    r = client.responses.create(model="main", input=q, tools=TOOLS, max_output_tokens=60,
                                tool_choice={"type": "function", "name": "get_weather"})
    calls = [o for o in r.output if o.type == "function_call"]
    assert r.status == "completed" and len(calls) == 1
    call = calls[0]
    assert call.name == "get_weather" and call.call_id.startswith("call_") and call.id.startswith("fc_")
    assert json.loads(call.arguments)["city"] in ("Paris", "Rome")
    assert r.tools[0].name == "get_weather" and r.tool_choice.name == "get_weather"
    # answer the call statelessly: the client sends the call back with its output
    follow = client.responses.create(
        model="main", tools=TOOLS, tool_choice="none", max_output_tokens=5, store=False,
        input=q + [call.model_dump(exclude_none=True),
                   {"type": "function_call_output", "call_id": call.call_id, "output": '{"temp_c": 21}'}])
    assert [o.type for o in follow.output] == ["message"]
    # ... and statefully: only the output, the call comes from the stored response
    chained = client.responses.create(model="main", previous_response_id=r.id, tools=TOOLS, tool_choice="none",
                                      max_output_tokens=5, temperature=0,
                                      input=[{"type": "function_call_output", "call_id": call.call_id,
                                              "output": '{"temp_c": 21}'}])
    assert chained.previous_response_id == r.id and chained.output[0].type == "message"
    assert chained.usage.input_tokens == follow.usage.input_tokens  # the same conversation either way
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(follow.id)  # store=False keeps nothing


def test_stream_helper_accumulates_our_events(client):
    """`client.responses.stream` rebuilds the response from the events; it must agree with response.completed."""
    with client.responses.stream(model="main", input="Weather in Rome?", text_format=Weather,
                                 max_output_tokens=120) as stream:
        texts = [e.delta for e in stream if e.type == "response.output_text.delta"]
        final = stream.get_final_response()
    assert final.status == "completed" and isinstance(final.output_parsed, Weather)
    assert "".join(texts) == final.output_text
    with client.responses.stream(model="main", input="Weather?", tools=TOOLS, tool_choice="required",
                                 parallel_tool_calls=False, max_output_tokens=60) as stream:
        final = stream.get_final_response()
    assert [o.type for o in final.output] == ["function_call"] and json.loads(final.output[0].arguments)


def test_function_call_streamed(client):
    # one call: a random model given room for parallel calls may keep adding them until the token limit
    events = list(client.responses.create(model="main", input="weather in Rome", tools=TOOLS, stream=True,
                                          tool_choice="required", parallel_tool_calls=False, max_output_tokens=60))
    types = [e.type for e in events]
    i = types.index("response.function_call_arguments.delta")
    assert types[i - 1] == "response.output_item.added" and events[i - 1].item.type == "function_call"
    assert types[i + 1: i + 3] == ["response.function_call_arguments.done", "response.output_item.done"]
    args = "".join(e.delta for e in events if e.type == "response.function_call_arguments.delta")
    assert json.loads(args)["city"] in ("Paris", "Rome")
    assert types[-1] == "response.completed"
    assert events[-1].response.output[-1].arguments == args


def test_image_input(client):
    content = [{"type": "input_text", "text": "What colour?"}, {"type": "input_image", "image_url": png_url()}]
    r = client.responses.create(model="vision", input=[{"role": "user", "content": content}], max_output_tokens=3)
    plain = client.responses.create(model="vision", input="What colour?", max_output_tokens=1)
    assert r.usage.input_tokens >= plain.usage.input_tokens + 4  # 4 image tokens for the tiny vision encoder


def test_cached_tokens_reported_for_a_shared_prefix(client):
    long = "You are a weather assistant. " + " ".join(["the quick brown fox jumps over a lazy dog"] * 20)
    first = client.responses.create(model="main", input="hello", instructions=long, max_output_tokens=1)
    again = client.responses.create(model="main", input="world", instructions=long, max_output_tokens=1,
                                    stream=True)
    final = list(again)[-1].response
    # the engine's prefix cache served the shared instructions (whole blocks only)
    assert final.usage.input_tokens_details.cached_tokens >= 64
    assert final.usage.input_tokens_details.cached_tokens < first.usage.input_tokens


# ---- stored responses ---------------------------------------------------------------------------------------

def test_retrieve_delete_and_input_items(client):
    first = client.responses.create(model="main", input="the quick brown", max_output_tokens=3, temperature=0)
    got = client.responses.retrieve(first.id)
    assert got.id == first.id and got.output_text == first.output_text and got.usage == first.usage
    second = client.responses.create(model="main", input="fox", previous_response_id=first.id,
                                     max_output_tokens=3, temperature=0)
    items = client.responses.input_items.list(second.id, order="asc")
    # the earlier turn (its input, its answer), then this turn's own input
    assert [(i.type, getattr(i, "role", None)) for i in items.data] == [
        ("message", "user"), ("message", "assistant"), ("message", "user")]
    assert items.data[0].content[0].text == "the quick brown" and items.data[2].content[0].text == "fox"
    assert items.data[1].id == first.output[0].id
    desc = client.responses.input_items.list(second.id, limit=2)
    assert [i.id for i in desc.data] == [items.data[2].id, items.data[1].id] and desc.has_more
    client.responses.delete(first.id)
    with pytest.raises(openai.NotFoundError) as e:
        client.responses.retrieve(first.id)
    assert e.value.body["message"] == f"Response with id '{first.id}' not found."
    with pytest.raises(openai.NotFoundError):
        client.responses.delete(first.id)
    assert client.responses.retrieve(second.id).id == second.id  # a later turn survives its parent's deletion


def test_previous_response_id_across_restart_and_servers(models, state_dir, server):
    a = make_server(models, state_dir)
    try:
        first = client_for(a).responses.create(model="main", input="hello", max_output_tokens=3, temperature=0)
    finally:
        a.stop()
    # another server on the same state directory (the module's, running all along) sees it too
    assert client_for(server).responses.retrieve(first.id).output_text == first.output_text
    b = make_server(models, state_dir)  # "restart": a new server process state, same directory
    try:
        c = client_for(b)
        second = c.responses.create(model="main", input="world", previous_response_id=first.id,
                                    max_output_tokens=3, temperature=0)
        assert c.responses.retrieve(first.id).output_text == first.output_text
        ids = [i.id for i in c.responses.input_items.list(second.id, order="asc").data]
        assert ids[:2] == [*(i.id for i in c.responses.input_items.list(first.id).data), first.output[0].id]
    finally:
        b.stop()


# ---- bad input ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name,body,status,param", [
    ("unknown previous", {"model": "main", "input": "hi", "previous_response_id": "resp_nope"}, 400,
     "previous_response_id"),
    ("output without call", {"model": "main", "input": [
        {"type": "function_call_output", "call_id": "call_x", "output": "1"}]}, 400, "input"),
    ("unknown item type", {"model": "main", "input": [{"type": "reasoning", "summary": []}]}, 400, "input.0"),
    ("input not text", {"model": "main", "input": 5}, 400, "input"),
    ("bad role", {"model": "main", "input": [{"role": "robot", "content": "x"}]}, 400, "input.0.role"),
    ("bad temperature", {"model": "main", "input": "x", "temperature": 3}, 400, "temperature"),
    ("web search tool", {"model": "main", "input": "x", "tools": [{"type": "web_search"}]}, 400, "tools.0.type"),
    ("unknown named tool", {"model": "main", "input": "x", "tools": TOOLS,
                            "tool_choice": {"type": "function", "name": "nope"}}, 400, "tool_choice"),
    ("schema missing", {"model": "main", "input": "x", "text": {"format": {"type": "json_schema", "name": "a"}}},
     400, "text.format.schema"),
    ("too many tokens", {"model": "main", "input": "x", "max_output_tokens": 100000}, 400, "max_output_tokens"),
    ("unknown model", {"model": "nope", "input": "x"}, 404, "model"),
    ("background", {"model": "main", "input": "x", "background": True}, 400, "background"),
])
def test_bad_input_openai_errors(server, name, body, status, param):
    r = post(server, body)
    assert r.status_code == status, (name, r.text)
    err = r.json()["error"]
    assert err["param"] == param and err["type"] == "invalid_request_error" and err["message"]
    assert post(server, {"model": "main", "input": "still serving", "max_output_tokens": 1}).status_code == 200


def test_unknown_ids_404(server):
    for method, path in (("GET", "/v1/responses/resp_missing"), ("DELETE", "/v1/responses/resp_missing"),
                         ("GET", "/v1/responses/resp_missing/input_items")):
        r = post(server, None, path, method)
        assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"


def test_full_store_is_a_clear_error_and_keeps_earlier_data(server, client):
    kept = client.responses.create(model="main", input="keep me", max_output_tokens=2)
    db = server.app.state.store._db
    pages = db.execute("PRAGMA page_count").fetchone()[0]
    db.execute(f"PRAGMA max_page_count = {pages}")  # SQLite's own "database or disk is full" from here on
    try:
        big = {"model": "main", "input": "x", "max_output_tokens": 1, "metadata": {"note": "x" * 20000}}
        r = post(server, big)
        assert r.status_code == 500 and r.json()["error"]["code"] == "store_error", r.text
        assert "full" in r.json()["error"]["message"]
        streamed = httpx.post(server.url + "/v1/responses", headers={"Authorization": f"Bearer {KEY}"}, timeout=60,
                              json={**big, "stream": True})
        assert '"type": "error"' in streamed.text and "response.failed" in streamed.text
        # not stored, nothing else lost, and the server keeps answering (store=false needs no space)
        assert client.responses.retrieve(kept.id).id == kept.id
        assert client.responses.create(model="main", input="hi", max_output_tokens=1, store=False).status
    finally:
        db.execute("PRAGMA max_page_count = 1073741823")
