"""Chat-template rendering: our default ChatML-style template and an HF-compatible jinja2 environment.

The environment mirrors what `transformers` gives chat templates (trim_blocks, lstrip_blocks, loopcontrols,
`tojson`, `raise_exception`, `strftime_now`, a no-op `{% generation %}` tag) so templates shipped with
Hugging Face or GGUF models render here exactly as they do there.
"""

from __future__ import annotations

import copy
import json
import re
from datetime import datetime
from functools import lru_cache
from typing import Any

import jinja2
from jinja2 import nodes
from jinja2.ext import Extension
from jinja2.sandbox import ImmutableSandboxedEnvironment


class TokenizerError(ValueError):
    """Bad tokenizer input: a missing/corrupt tokenizer file, an untrainable corpus, an unrenderable chat.

    Defined here (and re-exported by `omnimini.tokenizer`) so this module needs no import of the tokenizer."""


class ChatTemplateError(TokenizerError):
    """A conversation or chat template that cannot be rendered."""


ROLES = ("system", "developer", "user", "assistant", "tool")
IMAGE_PART_TYPES = ("image", "image_url")

# ChatML turns (like SmolLM2). Images become <|image_start|><|image|>*N<|image_end|>; tools go into the system
# turn; assistant tool calls are rendered as <|tool_call|>{"name":..,"arguments":{..}}<|/tool_call|>.
DEFAULT_CHAT_TEMPLATE = (
    # One line, no whitespace control: every newline in the output is an explicit {{ nl }} (trim_blocks
    # would otherwise eat newlines that follow block tags).
    "{% set nl = '\\n' %}"
    "{% macro render_content(content) %}"
    "{% if content is string %}{{ content }}"
    "{% elif content is not none %}"
    "{% for part in content %}"
    "{% if part.type == 'text' %}{{ part.text }}"
    "{% else %}{{ image_start }}{{ image_token * image_tokens }}{{ image_end }}"
    "{% endif %}"
    "{% endfor %}"
    "{% endif %}"
    "{% endmacro %}"
    "{% set ns = namespace(start=0) %}"
    "{% if messages and messages[0].role in ['system', 'developer'] %}{% set ns.start = 1 %}{% endif %}"
    "{% if tools or ns.start == 1 %}"
    "<|im_start|>system{{ nl }}"
    "{% if ns.start == 1 %}{{ render_content(messages[0].content) }}{% endif %}"
    "{% if tools %}"
    "{% if ns.start == 1 %}{{ nl }}{{ nl }}{% endif %}"
    "# Tools{{ nl }}{{ nl }}You may call one or more of these functions:{{ nl }}"
    "{{ tools | tojson }}{{ nl }}"
    "To call a function, answer with <|tool_call|>{\"name\": <function-name>, "
    "\"arguments\": <args-json-object>}<|/tool_call|> for each call."
    "{% endif %}"
    "<|im_end|>{{ nl }}"
    "{% endif %}"
    "{% for message in messages[ns.start:] %}"
    "<|im_start|>{{ 'system' if message.role == 'developer' else message.role }}{{ nl }}"
    "{{ render_content(message.content) }}"
    "{% for call in message.tool_calls or [] %}"
    "<|tool_call|>{{ {'name': call.function.name, 'arguments': call.function.arguments} | tojson }}"
    "<|/tool_call|>"
    "{% endfor %}"
    "<|im_end|>{{ nl }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant{{ nl }}{% endif %}"
)


class _GenerationTag(Extension):
    """`{% generation %}...{% endgeneration %}` (used by some HF templates to mark assistant text): a no-op."""

    tags = {"generation"}

    def parse(self, parser: Any) -> nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return nodes.Scope(body, lineno=lineno)


def _raise_exception(message: str) -> None:
    raise ChatTemplateError(f"chat template error: {message}")


def _tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None,
            sort_keys: bool = False) -> str:
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


@lru_cache(maxsize=16)
def compile_template(source: str) -> jinja2.Template:
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols, _GenerationTag]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    try:
        return env.from_string(source)
    except jinja2.TemplateSyntaxError as e:
        raise ChatTemplateError(f"chat template has a syntax error at line {e.lineno}: {e.message}") from e


def template_supports_images(source: str) -> bool:
    # Vision templates (ours, Qwen2-VL, Llava, ...) all mention "image"; text-only ones never do.
    return "image" in source


# `for part in message['content']` or `message['content'] | selectattr(...)` (not a `| trim` of a string)
_ITERATES_CONTENT = re.compile(r"""in\s+message\[['"]content['"]\]|message\[['"]content['"]\]\s*\|\s*selectattr""")


def template_reads_parts(source: str) -> bool:
    """Whether a template walks message['content'] as a list of parts (LLaVA's processor templates): it then
    gets string content as one text part, as vLLM's content-format detection does."""
    return bool(_ITERATES_CONTENT.search(source))


def _check_part(part: Any, index: int) -> None:
    if not isinstance(part, dict) or "type" not in part:
        raise ChatTemplateError(f"message {index}: content parts must be objects with a 'type'")
    kind = part["type"]
    if kind == "text":
        if not isinstance(part.get("text"), str):
            raise ChatTemplateError(f"message {index}: text part without a string 'text'")
    elif kind not in IMAGE_PART_TYPES:
        raise ChatTemplateError(f"message {index}: unsupported content part type {kind!r}")


def _normalize_tool_calls(calls: Any, index: int) -> list[dict]:
    """OpenAI tool calls carry `arguments` as a JSON string; templates (ours and HF's) want a dict."""
    if not isinstance(calls, list):
        raise ChatTemplateError(f"message {index}: tool_calls must be a list")
    out = []
    for call in calls:
        fn = call.get("function") if isinstance(call, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise ChatTemplateError(f"message {index}: each tool call needs function.name")
        args = fn.get("arguments", {})
        if isinstance(args, str):
            try:
                args = json.loads(args) if args.strip() else {}
            except json.JSONDecodeError as e:
                raise ChatTemplateError(
                    f"message {index}: tool call {fn['name']!r} has arguments that are not valid JSON: {e}"
                ) from e
        new = dict(call)
        new["function"] = {**fn, "arguments": args}
        out.append(new)
    return out


def normalize_messages(messages: list[dict], foreign: bool, images_ok: bool, parts: bool = False) -> list[dict]:
    """Validate OpenAI-shaped messages and adapt them to the template that will render them.

    Foreign templates mostly understand only string content, so text parts are flattened; they also rarely
    know the `developer` role, which we map to `system`. parts=True (a foreign template that walks content
    parts): string content becomes one text part, and image_url parts become transformers' {"type": "image"}."""
    if not isinstance(messages, list):
        raise ChatTemplateError("messages must be a list of message objects")
    out = []
    for i, msg in enumerate(messages):
        if not isinstance(msg, dict) or msg.get("role") not in ROLES:
            role = msg.get("role") if isinstance(msg, dict) else None
            raise ChatTemplateError(f"message {i}: role must be one of {', '.join(ROLES)}, got {role!r}")
        msg = copy.deepcopy(msg)
        content = msg.get("content")
        if isinstance(content, list):
            for part in content:
                _check_part(part, i)
            has_image = any(p["type"] in IMAGE_PART_TYPES for p in content)
            if has_image and not images_ok:
                raise ChatTemplateError(
                    f"message {i} has an image part but this model's chat template has no image support"
                )
            if foreign and parts:
                msg["content"] = [{"type": "image"} if p["type"] in IMAGE_PART_TYPES else p for p in content]
            elif foreign and not has_image:
                msg["content"] = "".join(p["text"] for p in content)
        elif content is None:
            if foreign:
                msg["content"] = [] if parts else ""
        elif foreign and parts and isinstance(content, str):
            msg["content"] = [{"type": "text", "text": content}]
        elif not isinstance(content, str):
            raise ChatTemplateError(f"message {i}: content must be a string, null or a list of parts")
        if msg.get("tool_calls"):
            msg["tool_calls"] = _normalize_tool_calls(msg["tool_calls"], i)
        if foreign and msg["role"] == "developer":
            msg["role"] = "system"
        out.append(msg)
    return out


def render(source: str, messages: list[dict], *, tools: list[dict] | None, add_generation_prompt: bool,
           bos_token: str, eos_token: str, extra: dict[str, Any], foreign: bool) -> str:
    images_ok = template_supports_images(source)
    msgs = normalize_messages(messages, foreign=foreign, images_ok=images_ok, parts=template_reads_parts(source))
    template = compile_template(source)
    try:
        return template.render(
            messages=msgs, tools=tools or None, add_generation_prompt=add_generation_prompt,
            bos_token=bos_token, eos_token=eos_token, **extra,
        )
    except ChatTemplateError:
        raise
    except jinja2.TemplateError as e:
        raise ChatTemplateError(f"chat template failed to render: {e}") from e
