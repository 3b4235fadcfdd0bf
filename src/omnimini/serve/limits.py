"""Request limits: body size (ASGI middleware), concurrency (429 + Retry-After) and per-field caps."""

from __future__ import annotations

import json
from dataclasses import dataclass

from omnimini.serve.errors import APIError
from omnimini.serve.protocol import error_body


@dataclass
class ServeLimits:
    max_body_bytes: int = 32 * 1024 * 1024
    max_image_bytes: int = 20 * 1024 * 1024
    max_image_pixels: int = 40_000_000
    max_images: int = 8
    max_messages: int = 1024
    max_tokens: int = 4096
    max_n: int = 8
    max_concurrent: int = 64  # generation requests in flight; more get 429
    max_file_bytes: int = 100 * 1024 * 1024  # one upload to /v1/files (a batch input file)
    max_batch_lines: int = 50_000
    retry_after_s: int = 1


class ConcurrencyLimiter:
    """Counts in-flight generation requests (the event loop is single-threaded: no lock needed)."""

    def __init__(self, limit: int, retry_after: int):
        self.limit, self.retry_after, self.active = limit, retry_after, 0

    def acquire(self) -> None:
        if self.active >= self.limit:
            raise APIError(429, f"The server is busy ({self.active} requests in flight, limit {self.limit}); "
                                "retry shortly.", code="rate_limit_exceeded",
                           headers={"Retry-After": str(self.retry_after)})
        self.active += 1

    def release(self) -> None:
        self.active = max(0, self.active - 1)


class BodySizeLimit:
    """Refuse request bodies above `limit` bytes (413) without reading them into memory first; `paths` gives
    some routes their own limit (file uploads)."""

    def __init__(self, app, limit: int, paths: dict[str, int] | None = None):
        self.app, self.default, self.paths = app, limit, paths or {}

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        limit = self.paths.get(scope.get("path", ""), self.default)
        for k, v in scope.get("headers", []):
            if k == b"content-length" and v.isdigit() and int(v) > limit:
                return await self._refuse(send, limit)
        seen = 0

        async def counting_receive():
            nonlocal seen
            msg = await receive()
            if msg["type"] == "http.request":
                seen += len(msg.get("body", b""))
                if seen > limit:
                    raise _TooLarge(413, f"Request body exceeds the {limit}-byte limit.")
            return msg

        try:
            await self.app(scope, counting_receive, send)
        except _TooLarge:
            await self._refuse(send, limit)

    @staticmethod
    async def _refuse(send, limit: int):
        body = json.dumps(error_body(f"Request body exceeds the {limit}-byte limit.")).encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})


class _TooLarge(APIError):
    """Raised while the app reads the body; the APIError handler (or this middleware) answers 413."""
