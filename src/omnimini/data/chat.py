"""Chat / instruction data: the common record shapes, normalised to OpenAI messages, with assistant-only labels.

Accepted records: OpenAI `{"messages": [...]}` (string or part-list content, `tool_calls`, `tool` turns),
ShareGPT `{"conversations": [{"from", "value"}], "tools"?}` with `function_call` / `observation` turns, and
Alpaca `{"instruction", "input", "output", "system"?, "history"?}`. Only assistant turns (their text, tool calls
and closing `<|im_end|>`) carry labels; every other token is -100.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from pathlib import Path

from omnimini.data.text import MALFORMED, DataError, Problems, parse_json_line, resolve_path

IGNORE = -100
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "model": "assistant",
                  "chatgpt": "assistant", "bing": "assistant", "bard": "assistant", "system": "system",
                  "observation": "tool", "tool": "tool", "function": "tool", "function_call": "assistant"}


# ---- record shapes -> (messages, tools) --------------------------------------------------------------------


def _openai_tools(tools) -> list[dict] | None:
    if tools in (None, "", []):
        return None
    if isinstance(tools, str):
        try:
            tools = json.loads(tools)
        except json.JSONDecodeError as e:
            raise DataError(f"'tools' is a string but not valid JSON ({e.msg})") from None
    if not isinstance(tools, list):
        raise DataError("'tools' must be a list of function specs")
    return [t if t.get("type") == "function" else {"type": "function", "function": t} for t in tools]


def _tool_call(value: str) -> dict:
    try:
        call = json.loads(value)
    except json.JSONDecodeError as e:
        raise DataError(f"function_call turn is not valid JSON ({e.msg})") from None
    if not isinstance(call, dict) or not isinstance(call.get("name"), str):
        raise DataError("function_call turn needs a 'name'")
    return {"type": "function", "function": {"name": call["name"], "arguments": call.get("arguments", {})}}


def _content(content):
    # some exports spell text parts {"type": "text", "value": ...}; the template wants "text"
    if isinstance(content, list):
        return [{"type": "text", "text": p.get("text", p.get("value", ""))} if p.get("type") == "text" else p
                for p in content]
    return content


def from_sharegpt(turns: list, tools=None) -> tuple[list[dict], list[dict] | None]:
    msgs = []
    for t in turns:
        role = SHAREGPT_ROLES.get(str(t.get("from", "")).lower()) if isinstance(t, dict) else None
        if role is None:
            raise DataError(f"unknown ShareGPT speaker {t.get('from') if isinstance(t, dict) else t!r}")
        value = t.get("value", "")
        if t["from"] == "function_call":
            msgs.append({"role": "assistant", "content": "", "tool_calls": [_tool_call(value)]})
        else:
            msgs.append({"role": role, "content": value})
    return msgs, _openai_tools(tools)


def from_alpaca(rec: dict) -> tuple[list[dict], None]:
    msgs = [{"role": "system", "content": rec["system"]}] if rec.get("system") else []
    for q, a in rec.get("history") or []:
        msgs += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
    user = rec["instruction"] + (f"\n\n{rec['input']}" if rec.get("input") else "")
    return msgs + [{"role": "user", "content": user}, {"role": "assistant", "content": rec["output"]}], None


def normalize_record(rec) -> tuple[list[dict], list[dict] | None]:
    """Any supported record shape -> (OpenAI messages, OpenAI tools or None). Raises DataError otherwise."""
    if not isinstance(rec, dict):
        raise DataError(f"a chat record must be an object, got {type(rec).__name__}")
    if "messages" in rec:
        msgs = [{k: (_content(v) if k == "content" else v) for k, v in m.items() if k != "loss_weight"}
                for m in rec["messages"]]
        tools = _openai_tools(rec.get("tools"))
    elif "conversations" in rec:
        msgs, tools = from_sharegpt(rec["conversations"], rec.get("tools"))
    elif "instruction" in rec and "output" in rec:
        msgs, tools = from_alpaca(rec)
    else:
        raise DataError(f"unrecognised chat record (keys {sorted(rec)}); expected messages, conversations "
                        "or instruction/output")
    if not any(m.get("role") == "assistant" for m in msgs):
        raise DataError("chat record has no assistant turn to learn from")
    return msgs, tools


def read_records(path: str | Path, problems: Problems) -> Iterator[tuple[dict, str]]:
    """Raw records of a .json (list) or .jsonl file, each with a 'file:line' / 'file[i]' location."""
    p = Path(path)
    if not p.is_file():
        raise DataError(f"chat data file not found: {p}")
    raw = p.read_bytes()
    if not raw.strip():
        problems.report(f"{p}: empty file")
        return
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        problems.report(f"{p}: not UTF-8 text (bad byte at offset {e.start})")
        return
    if p.suffix in (".jsonl", ".ndjson"):
        for i, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            rec = parse_json_line(line, f"{p}:{i}", problems)
            if rec is not MALFORMED:
                yield rec, f"{p}:{i}"
        return
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        problems.report(f"{p}:{e.lineno}: malformed JSON ({e.msg})")
        return
    if isinstance(data, dict):
        data = data.get("data", [data])
    for i, rec in enumerate(data):
        yield rec, f"{p}[{i}]"


def load_conversations(paths: list[str], problems: Problems, substitutions: dict | None = None,
                       data_dir=None) -> list[tuple[list[dict], list[dict] | None]]:
    out = []
    for path in paths:
        for rec, where in read_records(resolve_path(path, data_dir), problems):
            if substitutions:
                s = json.dumps(rec, ensure_ascii=False)
                for k, v in substitutions.items():
                    s = s.replace(k, v)
                rec = json.loads(s)
            try:
                out.append(normalize_record(rec))
            except (DataError, KeyError, TypeError, AttributeError) as e:
                problems.report(f"{where}: {e}")
    if not out:
        raise DataError(f"no usable conversations in {paths}")
    return out


# ---- tokenisation with assistant-only labels ---------------------------------------------------------------


def assistant_spans(tok, messages: list[dict], tools, image_tokens: int = 0) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character spans [start, end) the model must learn to produce."""
    full = tok.render_chat(messages, tools, add_generation_prompt=False, image_tokens=image_tokens)
    spans = []
    for i, m in enumerate(messages):
        if m.get("role") != "assistant":
            continue
        before = tok.render_chat(messages[:i], tools, add_generation_prompt=True, image_tokens=image_tokens)
        upto = tok.render_chat(messages[:i + 1], tools, add_generation_prompt=False, image_tokens=image_tokens)
        if not (full.startswith(upto) and upto.startswith(before)):
            raise DataError("chat template is not prefix-stable; cannot locate assistant turns")
        end = len(upto) - 1 if upto.endswith("\n") else len(upto)  # the turn's <|im_end|> is learned, not "\n"
        spans.append((len(before), end))
    return full, spans


def encode_chat_sample(tok, messages: list[dict], tools=None, image_tokens: int = 0,
                       max_len: int | None = None) -> dict | None:
    """{"input_ids", "labels"} (already shifted: labels[j] is the target after input_ids[j]); None when
    truncation to max_len leaves no assistant token to learn."""
    text, spans = assistant_spans(tok, messages, tools, image_tokens)
    enc = tok.hf.encode(text, add_special_tokens=False)
    ids = enc.ids
    learn = [any(s <= a < e for s, e in spans) for a, _ in enc.offsets]
    if max_len is not None and len(ids) > max_len + 1:
        ids, learn = ids[:max_len + 1], learn[:max_len + 1]
    labels = [t if m else IGNORE for t, m in zip(ids[1:], learn[1:], strict=True)]
    if all(x == IGNORE for x in labels):
        return None
    return {"input_ids": ids[:-1], "labels": labels}


class ChatSource:
    """Conversations from files, shuffled per epoch (seeded), tokenised lazily; resumable by (epoch, index)."""

    def __init__(self, paths: list[str], tok, seq_len: int, *, seed: int = 0, strict: bool = False,
                 substitutions: dict | None = None, data_dir=None):
        self.problems = Problems(strict=strict)
        self.convs = load_conversations(paths, self.problems, substitutions, data_dir)
        self.tok, self.seq_len, self.seed = tok, seq_len, seed
        self.epoch, self.index = 0, 0
        self._cached: tuple[int, list[int]] = (-1, [])

    def _order(self) -> list[int]:
        if self._cached[0] != self.epoch:
            order = list(range(len(self.convs)))
            random.Random(f"{self.seed}/{self.epoch}").shuffle(order)
            self._cached = (self.epoch, order)
        return self._cached[1]

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        for _ in range(2 * len(self.convs) + 1):
            if self.index >= len(self.convs):
                self.epoch, self.index = self.epoch + 1, 0
            msgs, tools = self.convs[self._order()[self.index]]
            self.index += 1
            try:
                s = encode_chat_sample(self.tok, msgs, tools, max_len=self.seq_len)
            except ValueError as e:  # ChatTemplateError is a ValueError
                self.problems.report(f"conversation {self.index - 1} of epoch {self.epoch}: {e}")
                continue
            if s is not None:
                return s
        raise DataError("no conversation yields a trainable sample within seq_len")

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "index": self.index}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.index = state["epoch"], state["index"]
