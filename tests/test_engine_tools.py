"""Tool calls: parsing our and Hermes formats, streaming hold-back of markers, tool_choice handling."""

from __future__ import annotations

import json

import pytest

from omnimini.engine.tools import (
    ToolError,
    ToolStreamParser,
    forced_call_schema,
    inject_tools,
    inline_tool_calls,
    parse_tool_calls,
    resolve_choice,
)

TOOLS = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object",
                                                                        "properties": {"a": {"type": "integer"}}}}},
         {"type": "function", "function": {"name": "g"}}]


@pytest.mark.parametrize("start,end", [("<|tool_call|>", "<|/tool_call|>"), ("<tool_call>", "</tool_call>")])
def test_parse_both_marker_formats(start, end):
    text = f'Sure. {start}{{"name": "f", "arguments": {{"a": 1}}}}{end}\n{start}{{"name": "g", "arguments": {{}}}}{end}'
    content, calls = parse_tool_calls(text)
    assert content == "Sure."
    assert [(c.name, json.loads(c.arguments)) for c in calls] == [("f", {"a": 1}), ("g", {})]
    assert all(c.id.startswith("call_") for c in calls) and calls[0].id != calls[1].id
    _, one = parse_tool_calls(text, parallel=False)
    assert len(one) == 1


def test_unparseable_call_stays_content_and_forced_json():
    bad = '<tool_call>{"name": "f", "arguments": {oops</tool_call>'
    assert parse_tool_calls(bad) == (bad, [])
    assert parse_tool_calls("plain answer") == ("plain answer", [])
    content, calls = parse_tool_calls('{"name": "f", "arguments": {"a": 2}}', forced=True)
    assert content is None and json.loads(calls[0].arguments) == {"a": 2}
    _, calls = parse_tool_calls('[{"name": "f", "arguments": {}}, {"name": "g", "arguments": "{}"}]', forced=True)
    assert [c.name for c in calls] == ["f", "g"]


def test_stream_parser_holds_back_split_marker():
    p = ToolStreamParser()
    pieces = ["Hel", "lo <", "tool_", "call>{\"name\": \"f\",", " \"arguments\": {\"a\": 3}}</tool_call>"]
    streamed = "".join(p.feed(x) for x in pieces)
    assert streamed == "Hello "
    rest, calls = p.finish()
    assert rest == "" and calls[0].name == "f" and json.loads(calls[0].arguments) == {"a": 3}
    q = ToolStreamParser()
    assert "".join(q.feed(x) for x in ["a <", "b"]) + q.finish()[0] == "a <b"  # a lone '<' is released


def test_tool_choice_resolution_and_schema():
    assert resolve_choice(None, None) is None
    assert resolve_choice(TOOLS, None) == "auto"
    assert resolve_choice(TOOLS, {"type": "function", "function": {"name": "g"}}) == "g"
    with pytest.raises(ToolError, match="not in tools"):
        resolve_choice(TOOLS, {"type": "function", "function": {"name": "zzz"}})
    with pytest.raises(ToolError):
        resolve_choice(None, "required")
    s = forced_call_schema(TOOLS, "f", parallel=True)
    assert s["properties"]["name"] == {"const": "f"}
    assert "anyOf" in forced_call_schema(TOOLS, "required", parallel=False)


def test_prompt_helpers_for_templates_without_tools():
    msgs = inject_tools([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}], TOOLS)
    assert msgs[0]["content"].startswith("Be brief.") and "<tool_call>" in msgs[0]["content"]
    past = inline_tool_calls([{"role": "assistant", "content": None, "tool_calls": [
        {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{\"a\": 1}"}}]}])
    assert past[0]["content"] == '<tool_call>{"name": "f", "arguments": {"a": 1}}</tool_call>'
