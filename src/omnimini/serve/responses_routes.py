"""Routes of the Responses API: create (whole or streamed), retrieve, delete, list input items."""

from __future__ import annotations

import asyncio
import time
import weakref

from fastapi import Depends, FastAPI, Request
from fastapi.responses import StreamingResponse

from omnimini.engine.scheduler import EngineError
from omnimini.serve import generation as G
from omnimini.serve import responses_api as R
from omnimini.serve.errors import APIError, bad_request, parse_body
from omnimini.serve.prepare import PreparedChat, prepare_chat
from omnimini.serve.registry import ServedModel
from omnimini.serve.responses_store import ResponseStore
from omnimini.serve.store import StoreError


def not_found(rid: str) -> APIError:
    return APIError(404, f"Response with id '{rid}' not found.", "response_id", "not_found")


def install_responses(app: FastAPI, auth, store: ResponseStore) -> None:
    registry, config, limiter = app.state.registry, app.state.config, app.state.limiter

    @app.post("/v1/responses", dependencies=[Depends(auth)])
    async def create(request: Request):
        body = await parse_body(request, R.ResponsesRequest)
        served = registry.get(body.model)
        body.check_supported()
        history: list[dict] = []
        if body.previous_response_id:
            found = await asyncio.to_thread(store.conversation, body.previous_response_id)
            if found is None:
                raise APIError(400, f"Previous response with id '{body.previous_response_id}' not found.",
                               "previous_response_id", "previous_response_not_found")
            history = found
        items = R.normalize_input(body)
        R.check_call_outputs(history + items)
        chat = R.to_chat_request(body, R.to_messages(body.instructions, history + items))
        try:
            prep = await prepare_chat(chat, served, config)
        except APIError as e:
            raise R.rename_param(e) from None
        turn = _Turn(served, prep, body, items, store)
        lease = G.Lease(limiter)
        if body.stream:
            gen = turn.stream(lease)
            weakref.finalize(gen, lease.release)
            return StreamingResponse(gen, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        try:
            return await G.run_until_done(turn.whole(), request)
        finally:
            lease.release()

    @app.get("/v1/responses/{rid}", dependencies=[Depends(auth)])
    async def retrieve(rid: str):
        resp = await asyncio.to_thread(store.get, rid)
        if resp is None:
            raise not_found(rid)
        return resp

    @app.delete("/v1/responses/{rid}", dependencies=[Depends(auth)])
    async def delete(rid: str):
        if not await asyncio.to_thread(store.delete, rid):
            raise not_found(rid)
        return {"id": rid, "object": "response.deleted", "deleted": True}

    @app.get("/v1/responses/{rid}/input_items", dependencies=[Depends(auth)])
    async def input_items(rid: str, after: str | None = None, before: str | None = None, limit: int = 20,
                          order: str = "desc"):
        if not 1 <= limit <= 100:
            raise bad_request(f"limit must be between 1 and 100, got {limit}", "limit")
        if order not in ("asc", "desc"):
            raise bad_request(f"order must be asc or desc, got {order!r}", "order")
        items = await asyncio.to_thread(store.input_items, rid)
        if items is None:
            raise not_found(rid)
        items = items if order == "asc" else items[::-1]
        ids = [it["id"] for it in items]
        for cursor, name in ((after, "after"), (before, "before")):
            if cursor is not None and cursor not in ids:
                raise bad_request(f"No item with id '{cursor}' in this response's input.", name)
        lo = ids.index(after) + 1 if after else 0
        hi = ids.index(before) if before else len(items)
        page = items[lo:hi][:limit]
        return {"object": "list", "data": page, "first_id": page[0]["id"] if page else None,
                "last_id": page[-1]["id"] if page else None, "has_more": lo + len(page) < hi}


class _Turn:
    """One Responses request after preparation: generate, build the Response, store it."""

    def __init__(self, served: ServedModel, prep: PreparedChat, body: R.ResponsesRequest, items: list[dict],
                 store: ResponseStore):
        self.served, self.prep, self.body, self.items, self.store = served, prep, body, items, store
        self.id, self.created = R.item_id("resp"), time.time()

    def _final(self, output: list[dict], end: G.Choice | G.Piece) -> dict:
        done = end.finish_reason != "length"
        use = R.response_usage(self.prep.prompt_tokens, end.completion_tokens, end.cached_tokens)
        return R.response_object(self.id, self.created, self.body, "completed" if done else "incomplete", output,
                                 use, None if done else "max_output_tokens", time.time() if done else None)

    async def _keep(self, resp: dict) -> None:
        if self.body.store is not False:
            await asyncio.to_thread(self.store.put, resp, self.items)

    async def whole(self) -> dict:
        choice = (await G.collect(self.served, self.prep))[0]
        resp = self._final(R.output_items(choice), choice)
        try:
            await self._keep(resp)
        except StoreError as e:
            raise APIError(500, f"The response was generated but could not be stored: {e}", None,
                           "store_error") from None
        return resp

    async def stream(self, lease: G.Lease):
        ev = R.EventStream()
        start = R.response_object(self.id, self.created, self.body, "in_progress", [])
        output: list[dict] = []
        msg, text, lps, pending = None, [], [], []
        try:
            yield ev.event("response.created", response=start)
            yield ev.event("response.in_progress", response=start)
            end = None
            async for p in G.pieces(self.served, self.prep):
                if p.finish_reason is not None:
                    end = p
                    continue
                lp = pending + R.text_logprobs(p.logprobs)
                lps += R.text_logprobs(p.logprobs)
                if not p.text:  # held back (a possible tool-call marker, part of a UTF-8 character): its logprobs
                    pending = lp  # come with the next delta, and with the done event in any case
                    continue
                pending = []
                if msg is None:
                    msg = R.message_item("", "in_progress")
                    for e in self._open_message(ev, msg):
                        yield e
                text.append(p.text)
                yield ev.event("response.output_text.delta", item_id=msg["id"], output_index=0, content_index=0,
                               delta=p.text, logprobs=lp)
            status = "incomplete" if end.finish_reason == "length" else "completed"
            if msg is None and not end.calls:  # an empty reply is still a message
                msg = R.message_item("", "in_progress")
                for e in self._open_message(ev, msg):
                    yield e
            if msg is not None:
                full = "".join(text)
                lps = lps if not end.calls else []
                part = R.output_text(full, lps)
                yield ev.event("response.output_text.done", item_id=msg["id"], output_index=0, content_index=0,
                               text=full, logprobs=lps)
                yield ev.event("response.content_part.done", item_id=msg["id"], output_index=0, content_index=0,
                               part=part)
                done = R.message_item(full, status, msg["id"], lps)
                yield ev.event("response.output_item.done", output_index=0, item=done)
                output.append(done)
            for call in end.calls:
                idx, item = len(output), R.call_item(call, "in_progress")
                yield ev.event("response.output_item.added", output_index=idx, item={**item, "arguments": ""})
                yield ev.event("response.function_call_arguments.delta", item_id=item["id"], output_index=idx,
                               delta=call.arguments)
                yield ev.event("response.function_call_arguments.done", item_id=item["id"], output_index=idx,
                               name=call.name, arguments=call.arguments)
                item = {**item, "status": "completed"}
                yield ev.event("response.output_item.done", output_index=idx, item=item)
                output.append(item)
            resp = self._final(output, end)
            await self._keep(resp)
            yield ev.event("response.completed" if status == "completed" else "response.incomplete", response=resp)
        except (EngineError, StoreError) as e:
            code = "store_error" if isinstance(e, StoreError) else "server_error"
            yield ev.event("error", code=code, message=str(e), param=None)
            failed = R.response_object(self.id, self.created, self.body, "failed", output)
            failed["error"] = {"code": "server_error", "message": str(e)}
            yield ev.event("response.failed", response=failed)
        finally:
            lease.release()

    @staticmethod
    def _open_message(ev: R.EventStream, msg: dict):
        yield ev.event("response.output_item.added", output_index=0, item={**msg, "content": []})
        yield ev.event("response.content_part.added", item_id=msg["id"], output_index=0, content_index=0,
                       part=R.output_text(""))
