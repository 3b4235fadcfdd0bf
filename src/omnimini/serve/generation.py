"""The one generation path of the server: engine events -> choices (whole) or pieces (streamed), with tool calls.

Chat Completions, legacy Completions and the Responses API all run their requests through these helpers, so
sampling, grammar, tool-call parsing, cancellation and slot accounting behave the same on every endpoint.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import aclosing
from dataclasses import dataclass, field

from fastapi import Request
from fastapi.responses import Response

from omnimini.engine.scheduler import EngineError, EngineEvent, EngineRequest, TokenLogprob
from omnimini.engine.tools import ToolCall, ToolStreamParser, parse_tool_calls
from omnimini.serve.errors import APIError
from omnimini.serve.limits import ConcurrencyLimiter
from omnimini.serve.prepare import PreparedChat
from omnimini.serve.registry import ServedModel

FINISH = {"stop": "stop", "length": "length", "abort": "stop"}


class Lease:
    """One slot of the concurrency limiter, released exactly once (also if a stream never starts)."""

    def __init__(self, limiter: ConcurrencyLimiter):
        limiter.acquire()
        self.limiter, self.held = limiter, True

    def release(self) -> None:
        if self.held:
            self.held = False
            self.limiter.release()


@dataclass
class Choice:
    """One finished sequence of a chat-style request."""

    index: int
    content: str | None  # None when the reply is only tool calls
    calls: list[ToolCall]
    finish_reason: str  # stop | length | tool_calls
    completion_tokens: int
    logprobs: list[TokenLogprob] = field(default_factory=list)
    cached_tokens: int = 0  # prompt tokens whose KV came from the engine's prefix cache


@dataclass
class Piece:
    """A streamable part of one sequence: content now, or (finish_reason set) the end with its tool calls."""

    index: int
    text: str = ""
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: str | None = None
    calls: list[ToolCall] = field(default_factory=list)
    completion_tokens: int = 0
    cached_tokens: int = 0


def engine_error(e: Exception) -> APIError:
    return APIError(500, f"Generation failed: {e}", code="engine_error")


async def merged(served: ServedModel, reqs: list[EngineRequest]) -> AsyncIterator[tuple[int, EngineEvent]]:
    """Events of several engine requests as one stream of (request number, event)."""
    if len(reqs) == 1:
        async with aclosing(served.engine.stream(reqs[0])) as events:
            async for ev in events:
                yield 0, ev
        return
    q: asyncio.Queue = asyncio.Queue()

    async def pump(i, r):
        try:
            async with aclosing(served.engine.stream(r)) as events:
                async for ev in events:
                    await q.put((i, ev))
        except Exception as e:  # handed to the consumer
            await q.put((i, e))
        await q.put((i, None))

    tasks = [asyncio.create_task(pump(i, r)) for i, r in enumerate(reqs)]
    try:
        left = len(tasks)
        while left:
            i, ev = await q.get()
            if ev is None:
                left -= 1
            elif isinstance(ev, Exception):
                raise ev
            else:
                yield i, ev
    finally:
        for t in tasks:
            t.cancel()


async def collect(served: ServedModel, prep: PreparedChat) -> list[Choice]:
    """Run a chat-style request to the end; EngineError becomes an OpenAI-shaped 500."""
    n = prep.request.n
    texts, lps = [[] for _ in range(n)], [[] for _ in range(n)]
    reasons, toks, cached = [None] * n, [0] * n, [0] * n
    try:
        async for _, ev in merged(served, [prep.request]):
            texts[ev.index].append(ev.text)
            lps[ev.index].extend(ev.logprobs)
            cached[ev.index] = max(cached[ev.index], ev.cached_tokens)
            if ev.finish_reason:
                reasons[ev.index], toks[ev.index] = ev.finish_reason, ev.completion_tokens
    except EngineError as e:
        raise engine_error(e) from None
    choices = []
    for i in range(n):
        text, reason, calls = "".join(texts[i]), FINISH.get(reasons[i], "stop"), []
        content: str | None = text
        if prep.tool_mode:
            parsed, found = parse_tool_calls(text, prep.tool_mode == "forced", prep.parallel_tools)
            if found:
                content, calls, reason = parsed, found, "tool_calls"
        choices.append(Choice(i, content, calls, reason, toks[i], lps[i], cached[i]))
    return choices


async def pieces(served: ServedModel, prep: PreparedChat) -> AsyncIterator[Piece]:
    """Stream a chat-style request: content as it comes (held back inside a tool call), then one end piece per
    sequence carrying its finish reason and tool calls. Raises EngineError."""
    parsers = [ToolStreamParser(prep.tool_mode == "forced", prep.parallel_tools) if prep.tool_mode else None
               for _ in range(prep.request.n)]
    cached = [0] * prep.request.n
    async for _, ev in merged(served, [prep.request]):
        i, parser = ev.index, parsers[ev.index]
        cached[i] = max(cached[i], ev.cached_tokens)
        text = parser.feed(ev.text) if parser else ev.text
        if text or ev.logprobs:
            yield Piece(i, text, ev.logprobs)
        if ev.finish_reason is None:
            continue
        reason, calls = FINISH.get(ev.finish_reason, "stop"), []
        if parser:
            rest, calls = parser.finish()
            if rest:
                yield Piece(i, rest)
            if calls:
                reason = "tool_calls"
        yield Piece(i, finish_reason=reason, calls=calls, completion_tokens=ev.completion_tokens,
                    cached_tokens=cached[i])


async def _watch_disconnect(request: Request, task: asyncio.Task) -> None:
    while not task.done():
        if await request.is_disconnected():
            task.cancel()
            return
        await asyncio.sleep(0.25)


async def run_until_done(coro, request: Request):
    """Run a non-streaming generation, cancelling it (and freeing its slots) if the client goes away."""
    task = asyncio.ensure_future(coro)
    watcher = asyncio.create_task(_watch_disconnect(request, task))
    try:
        return await task
    except asyncio.CancelledError:
        return Response(status_code=499)
    finally:
        watcher.cancel()
