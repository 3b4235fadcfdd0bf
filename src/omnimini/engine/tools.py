"""Tool calling: prompt rendering help, grammar for forced calls, and parsing model output into `tool_calls`.

Formats understood in the output:
  - ours:    <|tool_call|>{"name": ..., "arguments": {...}}<|/tool_call|>
  - Hermes / Qwen / SmolLM style: <tool_call>{"name": ..., "arguments": {...}}</tool_call>
  - forced calls (tool_choice "required" or a named function): the grammar makes the whole reply a bare
    JSON object {"name": ..., "arguments": {...}}, which is model-agnostic and always parseable.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field

from omnimini.engine.structured import GrammarError, compile_constraint, json_schema_grammar

MARKERS = (("<|tool_call|>", "<|/tool_call|>"), ("<tool_call>", "</tool_call>"))


class ToolError(ValueError):
    """Bad `tools` / `tool_choice` in a request."""


@dataclass
class ToolCall:
    name: str
    arguments: str  # JSON text, as OpenAI sends it
    id: str = field(default_factory=lambda: "call_" + uuid.uuid4().hex[:24])

    def to_openai(self) -> dict:
        return {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}


def tool_names(tools: list[dict]) -> list[str]:
    return [t["function"]["name"] for t in tools]


def resolve_choice(tools: list[dict] | None, tool_choice) -> str | None:
    """Normalise tool_choice to None (no tools), "none", "auto", "required" or a function name."""
    if not tools:
        if tool_choice not in (None, "none"):
            raise ToolError("tool_choice was given but the request has no tools")
        return None
    if tool_choice is None:
        return "auto"
    if isinstance(tool_choice, str):
        if tool_choice not in ("none", "auto", "required"):
            raise ToolError(f"tool_choice must be none, auto, required or a function, got {tool_choice!r}")
        return tool_choice
    name = tool_choice.get("function", {}).get("name") if isinstance(tool_choice, dict) else None
    if name not in tool_names(tools):
        raise ToolError(f"tool_choice names function {name!r}, which is not in tools ({', '.join(tool_names(tools))})")
    return name


def _call_schema(tool: dict) -> dict:
    fn = tool["function"]
    params = fn.get("parameters") or {"type": "object", "properties": {}}
    return {"type": "object", "properties": {"name": {"const": fn["name"]}, "arguments": params},
            "required": ["name", "arguments"], "additionalProperties": False}


def forced_call_schema(tools: list[dict], choice: str, parallel: bool) -> dict:
    chosen = tools if choice == "required" else [t for t in tools if t["function"]["name"] == choice]
    one = _call_schema(chosen[0]) if len(chosen) == 1 else {"anyOf": [_call_schema(t) for t in chosen]}
    if parallel and choice == "required":
        return {"anyOf": [one, {"type": "array", "items": one, "minItems": 1}]}
    return one


def tool_constraint(tokenizer, tools: list[dict], choice: str | None, parallel: bool = True):
    """Grammar for tool_choice required / named; None when the model may answer freely."""
    if choice in (None, "none", "auto"):
        return None
    try:
        return compile_constraint(tokenizer, json_schema_grammar(forced_call_schema(tools, choice, parallel)),
                                  "tool parameters schema")
    except GrammarError as e:
        raise ToolError(str(e)) from None


def tools_system_prompt(tools: list[dict]) -> str:
    """For chat templates that ignore `tools`: describe them in a system message (Hermes convention)."""
    specs = "\n".join(json.dumps(t["function"], ensure_ascii=False) for t in tools)
    return ("You are a function-calling assistant. You may call these functions:\n<tools>\n" + specs + "\n</tools>\n"
            "To call a function, reply with <tool_call>{\"name\": <function-name>, \"arguments\": <args-object>}"
            "</tool_call> for each call.")


def template_knows_tools(template: str | None) -> bool:
    return bool(template) and "tools" in template


def inject_tools(messages: list[dict], tools: list[dict]) -> list[dict]:
    """Prepend (or extend) the system message with the tool descriptions."""
    text = tools_system_prompt(tools)
    if messages and messages[0].get("role") in ("system", "developer") and isinstance(messages[0].get("content"), str):
        first = dict(messages[0], content=messages[0]["content"] + "\n\n" + text)
        return [first, *messages[1:]]
    return [{"role": "system", "content": text}, *messages]


def inline_tool_calls(messages: list[dict]) -> list[dict]:
    """For templates that ignore `tool_calls`: write past calls into the assistant text (Hermes convention),
    so the model still sees what it called before reading the tool results."""
    out = []
    for m in messages:
        calls = m.get("tool_calls")
        if m.get("role") == "assistant" and calls:
            text = "".join(f"<tool_call>{json.dumps({'name': c['function']['name'], 'arguments': _args(c)})}"
                           "</tool_call>" for c in calls)
            m = {k: v for k, v in m.items() if k != "tool_calls"}
            m["content"] = (m.get("content") or "") + text
        out.append(m)
    return out


def _args(call: dict):
    a = call["function"].get("arguments") or "{}"
    try:
        return json.loads(a) if isinstance(a, str) else a
    except json.JSONDecodeError:
        return a


# ---- parsing ------------------------------------------------------------------------------------------------

def _to_call(obj) -> ToolCall | None:
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return None
    args = obj.get("arguments", obj.get("parameters", {}))
    if isinstance(args, str):
        try:
            args = json.loads(args)
        except json.JSONDecodeError:
            return None
    return ToolCall(obj["name"], json.dumps(args, ensure_ascii=False))


def _json_calls(text: str) -> list[ToolCall] | None:
    try:
        obj = json.loads(text)
    except json.JSONDecodeError:
        return None
    items = obj if isinstance(obj, list) else [obj]
    calls = [_to_call(o) for o in items]
    return calls if calls and all(calls) else None


def parse_tool_calls(text: str, forced: bool = False, parallel: bool = True) -> tuple[str | None, list[ToolCall]]:
    """Split model output into (content, tool calls). Unparseable calls stay in the content."""
    if forced:
        calls = _json_calls(text.strip())
        if calls:
            return None, calls if parallel else calls[:1]
    for start, end in MARKERS:
        if start not in text:
            continue
        calls: list[ToolCall] = []
        pos = text.index(start)
        content = text[:pos]
        while pos >= 0:
            body_start = pos + len(start)
            stop = text.find(end, body_start)
            body = text[body_start: stop if stop >= 0 else len(text)]
            parsed = _json_calls(body.strip())
            if not parsed:
                return text, []
            calls.extend(parsed)
            pos = text.find(start, stop) if stop >= 0 else -1
        content = content.strip()
        return (content or None), calls if parallel else calls[:1]
    return text, []


class ToolStreamParser:
    """Streams content until a tool-call marker appears; everything after it is held and parsed at the end."""

    def __init__(self, forced: bool = False, parallel: bool = True):
        self.forced, self.parallel = forced, parallel
        self.text = ""
        self.sent = 0
        self.in_call = forced

    def feed(self, delta: str) -> str:
        """Add model text; return the content that can be streamed now."""
        self.text += delta
        if self.in_call:
            return ""
        hits = [i for i in (self.text.find(s, self.sent) for s, _ in MARKERS) if i >= 0]
        if hits:
            self.in_call = True
            out = self.text[self.sent: min(hits)]
            self.sent = min(hits)
            return out
        hold = 0
        for s, _ in MARKERS:  # a marker may be split across deltas: hold back a possible beginning of one
            for k in range(min(len(s) - 1, len(self.text) - self.sent), hold, -1):
                if self.text.endswith(s[:k]):
                    hold = k
                    break
        end = len(self.text) - hold
        out, self.sent = self.text[self.sent:end], end
        return out

    def finish(self) -> tuple[str, list[ToolCall]]:
        """End of output: (content not yet streamed, tool calls)."""
        content, calls = parse_tool_calls(self.text, self.forced, self.parallel)
        if calls:  # all content before the first marker has already been streamed
            return "", calls
        return self.text[self.sent:], []
