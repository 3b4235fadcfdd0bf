"""The OpenAI-compatible HTTP server: routes, SSE streaming, auth, limits, metrics, graceful shutdown."""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import weakref
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import Depends, FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse

from omnimini.engine.scheduler import EngineError, EngineRequest
from omnimini.serve import embeddings as E
from omnimini.serve import generation as G
from omnimini.serve import protocol as P
from omnimini.serve.batch_routes import install_batch_api
from omnimini.serve.batch_runner import BatchRunner
from omnimini.serve.batch_store import BatchStore
from omnimini.serve.config import ServeConfig, add_serve_args, serve_config_from_args
from omnimini.serve.errors import APIError, install_handlers, parse_body
from omnimini.serve.files import FileStore
from omnimini.serve.limits import BodySizeLimit, ConcurrencyLimiter
from omnimini.serve.metrics import Metrics
from omnimini.serve.prepare import PreparedChat, prepare_chat, prepare_completion
from omnimini.serve.registry import ModelRegistry, ServedModel, load_registry
from omnimini.serve.responses_routes import install_responses
from omnimini.serve.responses_store import ResponseStore
from omnimini.serve.store import Store, StoreError

__all__ = ["ServeConfig", "add_serve_args", "build_app", "run_server", "serve_config_from_args"]

log = logging.getLogger("omnimini.serve")
STATIC = Path(__file__).parent / "static"


def _sse(obj) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


class _CountRequests:
    """Pure ASGI (BaseHTTPMiddleware would get in the way of streaming and disconnect detection)."""

    def __init__(self, app, metrics: Metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        status = [500]

        async def send_status(msg):
            if msg["type"] == "http.response.start":
                status[0] = msg["status"]
            await send(msg)

        try:
            await self.app(scope, receive, send_status)
        finally:
            route = getattr(scope.get("route"), "path", "other")
            self.metrics.http.labels(route, str(status[0])).inc()


def build_app(config: ServeConfig, registry: ModelRegistry | None = None) -> FastAPI:
    try:  # before loading models: a bad --state-dir should fail in a second, not after the weights
        store = Store(config.state_dir)
    except StoreError as e:
        raise ValueError(f"--state-dir: {e}") from None
    registry = registry or load_registry(
        config.models, config.aliases, config.quantize, config.mmproj, max_batch=config.max_batch,
        max_context=config.max_context, kv_budget_tokens=config.kv_budget_tokens, prefill_chunk=config.prefill_chunk,
        prefix_cache_tokens=config.prefix_cache_tokens,
        kv_cache=config.kv_cache)
    limiter = ConcurrencyLimiter(config.limits.max_concurrent, config.limits.retry_after_s)
    metrics = Metrics(registry)
    files, batches = FileStore(store), BatchStore(store)
    runner: BatchRunner | None = None

    @asynccontextmanager
    async def lifespan(_app):
        runner.start()  # resumes batches a previous run left unfinished
        yield
        await runner.stop()
        await asyncio.to_thread(registry.shutdown, True, config.shutdown_timeout_s)
        store.close()

    app = FastAPI(title="omnimini", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.registry, app.state.config, app.state.limiter = registry, config, limiter
    app.state.store = store  # the state database (stored responses; other features add their table sets)
    install_handlers(app)
    if config.cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=config.cors_origins, allow_methods=["*"],
                           allow_headers=["*"])
    upload_limit = config.limits.max_file_bytes + 64 * 1024  # the file plus its multipart envelope
    app.add_middleware(BodySizeLimit, limit=config.limits.max_body_bytes, paths={"/v1/files": upload_limit})

    keys = config.keys()

    async def auth(request: Request) -> None:
        if not keys:
            return
        header = request.headers.get("authorization", "")
        given = header[7:].strip() if header.lower().startswith("bearer ") else ""
        if not given:
            raise APIError(401, "You didn't provide an API key. Send it as 'Authorization: Bearer <key>'.",
                           code="invalid_api_key")
        if not any(secrets.compare_digest(given, k) for k in keys):
            raise APIError(401, "Incorrect API key provided.", code="invalid_api_key")

    app.add_middleware(_CountRequests, metrics=metrics)

    @app.get("/health")
    async def health():
        # 503 until every engine thread serves: requests would only queue
        starting = [m for m, s in registry.models.items() if not s.engine.ready.is_set()]
        if starting:
            return JSONResponse({"status": "starting", "models": list(registry.models), "starting": starting}, 503)
        return {"status": "ok", "models": list(registry.models)}

    @app.get("/metrics")
    async def prometheus():
        return Response(metrics.render(), media_type="text/plain; version=0.0.4")

    @app.get("/")
    async def index():
        page = STATIC / "index.html"
        if not page.is_file():
            raise APIError(404, "The web chat page is not installed.")
        return FileResponse(page, media_type="text/html")

    @app.get("/v1/models", dependencies=[Depends(auth)])
    async def list_models():
        data = [P.model_card(m.id, m.created) for m in registry.models.values()]
        data += [P.model_card(a, registry.models[t].created) for a, t in registry.aliases.items()
                 if a not in registry.models]
        return {"object": "list", "data": data}

    @app.get("/v1/models/{model_id:path}", dependencies=[Depends(auth)])
    async def get_model(model_id: str):
        m = registry.get(model_id)
        return P.model_card(model_id, m.created)

    @app.post("/v1/chat/completions", dependencies=[Depends(auth)])
    async def chat(request: Request):
        body = await parse_body(request, P.ChatCompletionRequest)
        served = registry.get(body.model)
        prep = await prepare_chat(body, served, config)
        lease = G.Lease(limiter)
        if body.stream:
            include = bool(body.stream_options and body.stream_options.include_usage)
            gen = _chat_stream(served, prep, body.model, include, lease)
            weakref.finalize(gen, lease.release)
            return StreamingResponse(gen, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        try:
            return await _chat_full(served, prep, body.model, request)
        finally:
            lease.release()

    @app.post("/v1/completions", dependencies=[Depends(auth)])
    async def completions(request: Request):
        body = await parse_body(request, P.CompletionRequest)
        served = registry.get(body.model)
        reqs = prepare_completion(body, served, config)
        lease = G.Lease(limiter)
        if body.stream:
            include = bool(body.stream_options and body.stream_options.include_usage)
            gen = _completion_stream(served, reqs, body, include, lease)
            weakref.finalize(gen, lease.release)
            return StreamingResponse(gen, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        try:
            return await _completion_full(served, reqs, body, request)
        finally:
            lease.release()

    embedders: dict[str, E.Embedder] = {}

    @app.post("/v1/embeddings", dependencies=[Depends(auth)])
    async def embeddings(request: Request):
        body = await parse_body(request, E.EmbeddingsRequest)
        served = registry.get(body.model)
        E.check_dimensions(body.dimensions, served.model.config.hidden_size)
        inputs = E.token_inputs(body, served.tokenizer, served.context)
        embed = embedders.setdefault(served.id, E.Embedder(served.model, served.engine.pad_id))
        lease = G.Lease(limiter)
        try:
            vecs = await asyncio.to_thread(embed, inputs)
        finally:
            lease.release()
        return E.embeddings_response(body.model, E.shape_vectors(vecs, body.dimensions), body.encoding_format,
                                     sum(len(x) for x in inputs))

    install_responses(app, auth, ResponseStore(store))

    keys_list = sorted(keys)
    runner = BatchRunner(app, batches, files, config.batch_concurrency, keys_list[0] if keys_list else None)
    install_batch_api(app, auth, files, batches, runner, registry, config.limits.max_file_bytes,
                      config.limits.max_batch_lines)
    return app


# ---- chat / completions output ------------------------------------------------------------------------------

async def _chat_full(served: ServedModel, prep: PreparedChat, model_name: str, request: Request):
    async def build():
        choices = await G.collect(served, prep)
        out = []
        for c in choices:
            msg = {"role": "assistant", "content": c.content, "refusal": None}
            if c.calls:
                msg["tool_calls"] = [t.to_openai() for t in c.calls]
            out.append({"index": c.index, "message": msg, "finish_reason": c.finish_reason,
                        "logprobs": P.chat_logprobs(c.logprobs) if prep.request.params.logprobs else None})
        use = P.usage(prep.prompt_tokens, sum(c.completion_tokens for c in choices),
                      max(c.cached_tokens for c in choices))
        return P.chat_completion(P.new_id("chatcmpl"), P.now(), model_name, out, use)

    return await G.run_until_done(build(), request)


async def _chat_stream(served, prep: PreparedChat, model_name: str, include_usage: bool, lease: G.Lease):
    rid, created, n = P.new_id("chatcmpl"), P.now(), prep.request.n
    chunk = lambda choices, use=None: _sse(P.chat_chunk(rid, created, model_name, choices, use))  # noqa: E731
    toks, cached = [0] * n, 0
    try:
        for i in range(n):
            yield chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                          "finish_reason": None}])
        async for p in G.pieces(served, prep):
            i = p.index
            if p.finish_reason is None:
                lp = P.chat_logprobs(p.logprobs) if p.logprobs else None
                yield chunk([{"index": i, "delta": {"content": p.text}, "logprobs": lp, "finish_reason": None}])
                continue
            toks[i], cached = p.completion_tokens, max(cached, p.cached_tokens)
            for k, c in enumerate(p.calls):
                head = {"index": k, "id": c.id, "type": "function", "function": {"name": c.name, "arguments": ""}}
                yield chunk([{"index": i, "delta": {"tool_calls": [head]}, "logprobs": None, "finish_reason": None}])
                args = {"index": k, "function": {"arguments": c.arguments}}
                yield chunk([{"index": i, "delta": {"tool_calls": [args]}, "logprobs": None, "finish_reason": None}])
            yield chunk([{"index": i, "delta": {}, "logprobs": None, "finish_reason": p.finish_reason}])
        if include_usage:
            yield chunk([], P.usage(prep.prompt_tokens, sum(toks), cached))
        yield "data: [DONE]\n\n"
    except EngineError as e:
        yield _sse(P.error_body(f"Generation failed: {e}", "server_error", None, "engine_error"))
    finally:
        lease.release()


async def _completion_full(served, reqs: list[EngineRequest], body: P.CompletionRequest, request: Request):
    tok = served.tokenizer

    async def collect():
        n = body.n
        parts: dict[int, dict] = {}
        try:
            async for ri, ev in G.merged(served, reqs):
                c = parts.setdefault(ri * n + ev.index, {"text": [], "lp": [], "reason": None, "toks": 0, "cached": 0})
                c["text"].append(ev.text)
                c["lp"].extend(ev.logprobs)
                if ev.finish_reason:
                    c["reason"], c["toks"], c["cached"] = ev.finish_reason, ev.completion_tokens, ev.cached_tokens
        except EngineError as e:
            raise G.engine_error(e) from None
        choices = []
        for idx in sorted(parts):
            c = parts[idx]
            prefix = tok.decode(reqs[idx // n].prompt_ids) if body.echo else ""
            choices.append({"index": idx, "text": prefix + "".join(c["text"]),
                            "logprobs": P.completion_logprobs(c["lp"], len(prefix)) if body.logprobs is not None
                            else None, "finish_reason": G.FINISH.get(c["reason"], "stop")})
        prompt_tokens = sum(len(r.prompt_ids) for r in reqs)
        # each prompt is its own engine request: its choices share one cached prefix, so count it once
        cached = sum(max((c["cached"] for i, c in parts.items() if i // n == ri), default=0)
                     for ri in range(len(reqs)))
        return {"id": P.new_id("cmpl"), "object": "text_completion", "created": P.now(), "model": body.model,
                "system_fingerprint": "omnimini", "choices": choices,
                "usage": P.usage(prompt_tokens, sum(c["toks"] for c in parts.values()), cached)}

    return await G.run_until_done(collect(), request)


async def _completion_stream(served, reqs, body: P.CompletionRequest, include_usage: bool, lease: G.Lease):
    rid, created, n = P.new_id("cmpl"), P.now(), body.n
    toks: dict[int, int] = {}
    cached: dict[int, int] = {}

    def chunk(choices, use=None):
        return _sse({"id": rid, "object": "text_completion", "created": created, "model": body.model,
                     "system_fingerprint": "omnimini", "choices": choices, "usage": use})

    try:
        if body.echo:
            for ri, r in enumerate(reqs):
                for j in range(n):
                    yield chunk([{"index": ri * n + j, "text": served.tokenizer.decode(r.prompt_ids),
                                  "logprobs": None, "finish_reason": None}])
        async for ri, ev in G.merged(served, reqs):
            idx = ri * n + ev.index
            lp = P.completion_logprobs(ev.logprobs, 0) if body.logprobs is not None and ev.logprobs else None
            reason = G.FINISH.get(ev.finish_reason) if ev.finish_reason else None
            if ev.text or lp or reason:
                yield chunk([{"index": idx, "text": ev.text, "logprobs": lp, "finish_reason": reason}])
            if ev.finish_reason:
                toks[idx] = ev.completion_tokens
                cached[ri] = max(cached.get(ri, 0), ev.cached_tokens)
        if include_usage:
            yield chunk([], P.usage(sum(len(r.prompt_ids) for r in reqs), sum(toks.values()), sum(cached.values())))
        yield "data: [DONE]\n\n"
    except EngineError as e:
        yield _sse(P.error_body(f"Generation failed: {e}", "server_error", None, "engine_error"))
    finally:
        lease.release()


# ---- running ------------------------------------------------------------------------------------------------

def run_server(config: ServeConfig) -> None:
    import uvicorn

    logging.basicConfig(level=config.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    app = build_app(config)
    where = f"http://{config.host}:{config.port}"
    log.info("serving %s at %s/v1 (web chat: %s/)", ", ".join(app.state.registry.ids()), where, where)
    uvicorn.run(app, host=config.host, port=config.port, log_level=config.log_level,
                timeout_graceful_shutdown=int(config.shutdown_timeout_s))

