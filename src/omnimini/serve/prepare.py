"""Turn a validated OpenAI request into an EngineRequest: template, images, limits, sampling, grammar."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import httpx

from omnimini.chat_template import TokenizerError
from omnimini.engine.sampling import SamplingParams
from omnimini.engine.scheduler import EngineRequest, RequestTooLargeError
from omnimini.engine.structured import GrammarError, json_object_constraint, schema_constraint
from omnimini.engine.tools import (
    ToolError,
    inject_tools,
    inline_tool_calls,
    resolve_choice,
    template_knows_tools,
    tool_constraint,
)
from omnimini.images import ImageError, ImageInputs, ImageLimits, decode_data_url, image_inputs, open_image
from omnimini.serve.errors import APIError, bad_request
from omnimini.serve.protocol import ChatCompletionRequest, CompletionRequest
from omnimini.serve.registry import ServedModel


@dataclass
class PreparedChat:
    request: EngineRequest
    tool_mode: str | None  # None: plain text; "auto": parse markers; "forced": the reply is a call
    parallel_tools: bool
    prompt_tokens: int


def _max_tokens(requested: int | None, n_prompt: int, served: ServedModel, limit: int) -> int:
    ctx = served.context
    if n_prompt >= ctx:
        raise bad_request(f"This model's maximum context length is {ctx} tokens. However, your messages resulted "
                          f"in {n_prompt} tokens. Please reduce the length of the messages.",
                          "messages", "context_length_exceeded")
    if requested is None:
        return min(ctx - n_prompt, limit)
    if requested > limit:
        raise bad_request(f"max_tokens is too large: {requested}. This server supports at most {limit} "
                          f"completion tokens.", "max_tokens", "invalid_value")
    if n_prompt + requested > ctx:
        raise bad_request(f"This model's maximum context length is {ctx} tokens. However, you requested "
                          f"{n_prompt + requested} tokens ({n_prompt} in the messages, {requested} in the "
                          f"completion). Please reduce the length of the messages or completion.",
                          "max_tokens", "context_length_exceeded")
    return requested


def _bias(raw: dict[str, float] | None, vocab: int) -> dict[int, float]:
    out = {}
    for k, v in (raw or {}).items():
        t = int(k)
        if not 0 <= t < vocab:
            raise bad_request(f"logit_bias token id {t} is outside the vocabulary (0..{vocab - 1})", "logit_bias")
        out[t] = float(v)
    return out


def sampling_params(body, served: ServedModel, max_tokens: int) -> SamplingParams:
    if body.n > 1 and body.n > served.engine.max_batch:
        raise bad_request(f"n={body.n} exceeds this server's batch size {served.engine.max_batch}", "n")
    return SamplingParams(
        temperature=1.0 if body.temperature is None else body.temperature,
        top_p=1.0 if body.top_p is None else body.top_p, top_k=body.top_k or 0, seed=body.seed,
        max_tokens=max_tokens, stop=body.stop_list(), presence_penalty=body.presence_penalty,
        frequency_penalty=body.frequency_penalty, logit_bias=_bias(body.logit_bias, served.tokenizer.vocab_size))


async def _fetch(url: str, limits: ImageLimits, timeout: float) -> bytes:
    async with httpx.AsyncClient(timeout=timeout, follow_redirects=True) as client:
        async with client.stream("GET", url) as resp:
            if resp.status_code != 200:
                raise ImageError(f"fetching the image returned HTTP {resp.status_code}")
            data = bytearray()
            async for chunk in resp.aiter_bytes():
                data += chunk
                if len(data) > limits.max_bytes:
                    raise ImageError(f"remote image exceeds the {limits.max_bytes}-byte limit")
            return bytes(data)


async def _load_images(urls: list[str], served: ServedModel, cfg) -> ImageInputs | None:
    if not urls:
        return None
    vision = served.model.config.vision
    if vision is None:
        raise bad_request(f"The model `{served.id}` does not accept images.", "messages", "image_not_supported")
    lim = cfg.limits
    if len(urls) > lim.max_images:
        raise bad_request(f"Too many images: {len(urls)} (limit {lim.max_images}).", "messages")
    il = ImageLimits(max_bytes=lim.max_image_bytes, max_pixels=lim.max_image_pixels)
    images = []
    for i, url in enumerate(urls):
        try:
            if url.startswith("data:"):
                img = await asyncio.to_thread(decode_data_url, url, il)
            elif url.startswith(("http://", "https://")):
                if not cfg.allow_remote_images:
                    raise ImageError("remote image URLs are disabled on this server; send the image inline as a "
                                     "data: URL (data:image/png;base64,...)")
                raw = await _fetch(url, il, cfg.remote_image_timeout_s)
                img = await asyncio.to_thread(open_image, raw, il)
            else:
                raise ImageError("image_url.url must be a data: URL (or http(s) when remote images are enabled)")
        except ImageError as e:
            raise bad_request(f"Invalid image {i}: {e}", "messages", "invalid_image") from None
        except httpx.HTTPError as e:
            raise bad_request(f"Could not fetch image {i}: {e}", "messages", "invalid_image") from None
        images.append(img)
    return await asyncio.to_thread(image_inputs, images, vision, served.tokenizer.image_token)


def _constraint(body: ChatCompletionRequest, tok, choice: str | None, tools: list[dict]):
    try:
        forced = tool_constraint(tok, tools, choice, body.parallel_tool_calls) if tools else None
        if forced is not None:
            return forced
        rf = body.response_format
        if rf is None or rf.type == "text":
            return None
        if rf.type == "json_object":
            return json_object_constraint(tok)
        if rf.json_schema is None or rf.json_schema.schema_ is None:
            raise bad_request("response_format json_schema needs json_schema.schema", "response_format")
        return schema_constraint(tok, rf.json_schema.schema_)
    except ToolError as e:
        raise bad_request(str(e), "tools") from None
    except GrammarError as e:
        raise bad_request(str(e), "response_format", "invalid_json_schema") from None


async def prepare_chat(body: ChatCompletionRequest, served: ServedModel, cfg) -> PreparedChat:
    lim = cfg.limits
    if len(body.messages) > lim.max_messages:
        raise bad_request(f"Too many messages: {len(body.messages)} (limit {lim.max_messages}).", "messages")
    if body.top_logprobs and not body.logprobs:
        raise bad_request("top_logprobs requires logprobs=true", "top_logprobs")
    tok = served.tokenizer
    tools = [t.model_dump(exclude_none=True) for t in body.tools or []]
    try:
        choice = resolve_choice(tools, body.tool_choice.model_dump() if hasattr(body.tool_choice, "model_dump")
                                else body.tool_choice)
    except ToolError as e:
        raise bad_request(str(e), "tool_choice") from None
    messages = [m.to_template() for m in body.messages]
    urls = [p.image_url.url for m in body.messages if isinstance(m.content, list)
            for p in m.content if p.type == "image_url"]
    images = await _load_images(urls, served, cfg)
    use_tools = tools if choice not in (None, "none") else None
    if tools and not template_knows_tools(tok.chat_template):
        messages = inline_tool_calls(messages)
        if use_tools:
            messages, use_tools = inject_tools(messages, use_tools), None
    try:
        ids = tok.encode_chat(messages, tools=use_tools, image_tokens=images.image_tokens if images else 0,
                              image_texts=images.texts if images else None)
    except TokenizerError as e:
        raise bad_request(str(e), "messages") from None
    max_tokens = _max_tokens(body.requested_max_tokens(), len(ids), served, lim.max_tokens)
    if body.n > lim.max_n:
        raise bad_request(f"n={body.n} is above this server's limit of {lim.max_n}", "n")
    params = sampling_params(body, served, max_tokens)
    params.logprobs, params.top_logprobs = body.logprobs, body.top_logprobs or 0
    req = EngineRequest(ids, params, n=body.n, pixels=images.pixels if images else None,
                        constraint=_constraint(body, tok, choice, tools))
    check(served, req)
    mode = None if choice in (None, "none") else "auto" if choice == "auto" else "forced"
    return PreparedChat(req, mode, body.parallel_tool_calls, len(ids))


def check(served: ServedModel, req: EngineRequest) -> None:
    if served.engine.closed:
        raise APIError(503, "The server is shutting down.")
    try:
        served.engine.check(req)
    except RequestTooLargeError as e:
        raise bad_request(str(e), None, "context_length_exceeded") from None
    except ValueError as e:
        raise bad_request(str(e)) from None


def prepare_completion(body: CompletionRequest, served: ServedModel, cfg) -> list[EngineRequest]:
    tok = served.tokenizer
    p = body.prompt
    if isinstance(p, str):
        prompts = [tok.encode_prompt(p)]
    elif all(isinstance(x, str) for x in p):
        prompts = [tok.encode_prompt(x) for x in p]
    elif all(isinstance(x, int) for x in p):
        prompts = [list(p)]
    else:
        prompts = [list(x) for x in p]
    if body.n > cfg.limits.max_n:
        raise bad_request(f"n={body.n} is above this server's limit of {cfg.limits.max_n}", "n")
    reqs = []
    for ids in prompts:
        if not ids:
            raise bad_request("prompt is empty", "prompt")
        if any(not 0 <= t < tok.vocab_size for t in ids):
            raise bad_request("prompt contains token ids outside the vocabulary", "prompt")
        mt = _max_tokens(body.max_tokens, len(ids), served, cfg.limits.max_tokens)
        params = sampling_params(body, served, mt)
        params.logprobs, params.top_logprobs = body.logprobs is not None, body.logprobs or 0
        req = EngineRequest(ids, params, n=body.n)
        check(served, req)
        reqs.append(req)
    return reqs
