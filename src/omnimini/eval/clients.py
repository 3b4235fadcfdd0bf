"""Clients that turn chat messages into model answers.

Messages follow OpenAI's chat schema; an image may be given either as an OpenAI
``{"type": "image_url", "image_url": {"url": "data:..."}}`` part or, inside the harness, as
``{"type": "image", "image": PIL.Image}`` (the endpoint client encodes it as a ``data:`` URL,
the in-process client hands the PIL image to the engine untouched).
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import httpx

from omnimini.eval.errors import EvalError


@dataclass
class ChatResult:
    text: str
    usage: dict = field(default_factory=dict)
    raw: Any = None
    error: str | None = None  # set when every retry failed; the item is then scored as wrong
    cached: bool = False
    latency_s: float = 0.0


@runtime_checkable
class Client(Protocol):
    model_id: str

    async def chat(self, messages: list[dict], **params) -> ChatResult: ...

    async def loglikelihood(self, context: str, continuations: list[str]) -> list[float] | None: ...


def image_to_data_url(image, fmt: str = "PNG") -> str:
    """Encode a PIL image as a base64 ``data:`` URL (PNG keeps the scene pixels exact)."""
    buf = io.BytesIO()
    image.save(buf, format=fmt)
    return f"data:image/{fmt.lower()};base64,{base64.b64encode(buf.getvalue()).decode('ascii')}"


def to_openai_messages(messages: list[dict]) -> list[dict]:
    """Replace harness-internal PIL image parts by OpenAI image_url parts."""
    out = []
    for m in messages:
        content = m.get("content")
        if isinstance(content, list):
            content = [
                {"type": "image_url", "image_url": {"url": image_to_data_url(p["image"])}}
                if p.get("type") == "image"
                else p
                for p in content
            ]
        out.append({**m, "content": content})
    return out


class RetryableError(Exception):
    """A failure worth retrying (429, 5xx, timeout, unparsable body)."""

    def __init__(self, message: str, retry_after: float | None = None):
        super().__init__(message)
        self.retry_after = retry_after


def _retry_after(resp: httpx.Response) -> float | None:
    value = resp.headers.get("retry-after")
    try:
        return max(0.0, float(value)) if value is not None else None
    except ValueError:
        return None  # HTTP-date form: fall back to our own backoff


def _parse_chat_body(resp: httpx.Response) -> ChatResult:
    try:
        body = resp.json()
        text = body["choices"][0]["message"]["content"]
    except (ValueError, KeyError, IndexError, TypeError) as exc:
        raise RetryableError(f"unparsable response body ({type(exc).__name__}): {resp.text[:200]!r}") from exc
    if text is not None and not isinstance(text, str):
        raise RetryableError(f"message content is not a string: {type(text).__name__}")
    return ChatResult(text=text or "", usage=body.get("usage") or {}, raw=body)


class OpenAIEndpointClient:
    """Async client for any OpenAI-compatible ``/chat/completions`` endpoint.

    Bounded concurrency (a semaphore), per-request timeouts, and retries with exponential
    backoff + jitter on 429 / 5xx / timeouts / garbage bodies; after ``max_retries`` the item is
    returned with ``error`` set so one bad item never sinks the run.
    """

    RETRY_STATUS = {408, 409, 425, 429} | set(range(500, 600))

    def __init__(
        self,
        base_url: str,
        api_key: str | None = None,
        model: str = "default",
        concurrency: int = 8,
        timeout: float = 120.0,
        max_retries: int = 4,
        backoff_base: float = 1.0,
        backoff_max: float = 60.0,
    ):
        if concurrency < 1:
            raise EvalError(f"concurrency must be >= 1, got {concurrency}")
        self.base_url = base_url.rstrip("/")
        self.model = model
        self.model_id = f"endpoint:{self.base_url}:{model}"
        self.api_key = api_key
        self.timeout = timeout
        self.max_retries = max_retries
        self.backoff_base = backoff_base
        self.backoff_max = backoff_max
        self._sem = asyncio.Semaphore(concurrency)
        self._http: httpx.AsyncClient | None = None
        self.requests_sent = 0  # observable by tests and reports
        self.supports_loglikelihood = False  # chat endpoints expose no prompt log-probs

    def _client(self) -> httpx.AsyncClient:
        if self._http is None:
            headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
            self._http = httpx.AsyncClient(base_url=self.base_url, headers=headers, timeout=self.timeout)
        return self._http

    async def aclose(self) -> None:
        if self._http is not None:
            await self._http.aclose()
            self._http = None

    def _backoff(self, attempt: int, retry_after: float | None) -> float:
        if retry_after is not None:
            return min(retry_after, self.backoff_max)
        delay = min(self.backoff_base * 2**attempt, self.backoff_max)
        return delay * (0.5 + random.random() / 2)  # jitter spreads clients that failed together

    async def _post_once(self, payload: dict) -> ChatResult:
        self.requests_sent += 1
        try:
            resp = await self._client().post("/chat/completions", json=payload)
        except (httpx.TimeoutException, httpx.TransportError) as exc:
            raise RetryableError(f"{type(exc).__name__}: {exc}") from exc
        if resp.status_code in self.RETRY_STATUS:
            raise RetryableError(f"HTTP {resp.status_code}: {resp.text[:200]!r}", _retry_after(resp))
        if resp.status_code >= 400:  # a bad request will not get better by asking again
            return ChatResult(text="", raw=None, error=f"HTTP {resp.status_code}: {resp.text[:300]!r}")
        return _parse_chat_body(resp)

    async def chat(self, messages: list[dict], **params) -> ChatResult:
        payload = {"model": self.model, "messages": to_openai_messages(messages), **params}
        start = time.perf_counter()
        async with self._sem:
            last = "no attempt made"
            for attempt in range(self.max_retries + 1):
                try:
                    result = await self._post_once(payload)
                    break
                except RetryableError as exc:
                    last = str(exc)
                    if attempt == self.max_retries:
                        result = ChatResult(text="", error=f"failed after {attempt + 1} attempts: {last}")
                        break
                    await asyncio.sleep(self._backoff(attempt, exc.retry_after))
        result.latency_s = time.perf_counter() - start
        return result

    async def loglikelihood(self, context: str, continuations: list[str]) -> list[float] | None:
        return None  # chat endpoints do not expose prompt log-probs; tasks fall back to generation


GenerateFn = Callable[[list[list[dict]], dict], list[str]]
LoglikFn = Callable[[list[tuple[str, list[str]]]], list[list[float]]]


class InProcessClient:
    """Batches concurrent requests into calls of a blocking ``generate_fn`` (the engine).

    Requests with identical params are collected for up to ``max_wait_s`` or until
    ``max_batch`` are waiting, then sent together in a worker thread so the event loop keeps
    feeding the queue while the model runs.
    """

    def __init__(
        self,
        generate_fn: GenerateFn,
        loglik_fn: LoglikFn | None = None,
        model_id: str = "in-process",
        max_batch: int = 16,
        max_wait_s: float = 0.01,
        stats_fn=None,
    ):
        self.generate_fn = generate_fn
        # items the runner should keep in flight: an in-process model scores best given many requests at once
        # (log-likelihood batches are sorted by length inside one call; 8 in flight padded each batch to its
        # longest item and ran 0.8x transformers' speed on MMLU, measured)
        self.preferred_concurrency = max_batch
        if stats_fn is not None:  # {"tokens_scored", "truncated"} so far: the runner's progress bar and report
            self.stats = stats_fn
        self.loglik_fn = loglik_fn
        self.model_id = model_id
        self.max_batch = max_batch
        self.max_wait_s = max_wait_s
        self.batch_sizes: list[int] = []  # for tests and throughput reports
        self.supports_loglikelihood = loglik_fn is not None
        self._queues: dict[str, list] = {}
        self._lock = asyncio.Lock()

    async def _submit(self, kind: str, request, params: dict):
        key = kind + json.dumps(params, sort_keys=True, default=str)
        fut = asyncio.get_running_loop().create_future()
        queue = self._queues.setdefault(key, [])
        queue.append((request, fut))
        if len(queue) == 1:  # first request of a new batch schedules its flush
            asyncio.get_running_loop().create_task(self._flush_later(key, kind, params))
        elif len(queue) >= self.max_batch:
            self._flush_now(key, kind, params)
        return await fut

    async def _flush_later(self, key: str, kind: str, params: dict) -> None:
        await asyncio.sleep(self.max_wait_s)
        self._flush_now(key, kind, params)

    def _flush_now(self, key: str, kind: str, params: dict) -> None:
        batch = self._queues.pop(key, [])
        if batch:
            asyncio.get_running_loop().create_task(self._run_batch(kind, batch, params))

    async def _run_batch(self, kind: str, batch: list, params: dict) -> None:
        requests = [r for r, _ in batch]
        self.batch_sizes.append(len(requests))
        async with self._lock:  # one model call at a time; the engine owns the device
            try:
                if kind == "chat":
                    outputs = await asyncio.to_thread(self.generate_fn, requests, params)
                else:
                    outputs = await asyncio.to_thread(self.loglik_fn, requests)
                if len(outputs) != len(requests):
                    raise EvalError(f"{kind} returned {len(outputs)} outputs for {len(requests)} inputs")
            except Exception as exc:  # noqa: BLE001 - report per item, keep the run alive
                for _, fut in batch:
                    if not fut.done():
                        fut.set_exception(exc)
                return
        for (_, fut), out in zip(batch, outputs, strict=True):
            if not fut.done():
                fut.set_result(out)

    async def chat(self, messages: list[dict], **params) -> ChatResult:
        start = time.perf_counter()
        try:
            text = await self._submit("chat", messages, params)
        except Exception as exc:  # noqa: BLE001
            return ChatResult(text="", error=f"{type(exc).__name__}: {exc}")
        return ChatResult(text=text, latency_s=time.perf_counter() - start)

    async def loglikelihood(self, context: str, continuations: list[str]) -> list[float] | None:
        if self.loglik_fn is None:
            return None
        return list(await self._submit("loglik", (context, continuations), {}))

    async def aclose(self) -> None:
        return None


def make_local_client(model_name_or_dir: str, quantize: str = "none") -> Client:
    """``omnimini eval --model``: an InProcessClient over the model (batched generation + log-likelihood)."""
    from omnimini.eval.local import make_local_client as local

    return local(model_name_or_dir, quantize=quantize)
