"""Runs batches in the background: each input line goes through the server's own HTTP handler, in process.

Lines are sent to the app over an in-process ASGI transport, so a batch line is validated, limited and answered
by exactly the code that answers the same request over HTTP (and every endpoint the app serves works in a batch
without code here). They run under the engine's background priority: interactive requests are admitted and
prefilled first and keep slots of their own. A few workers run lines concurrently, so batch lines still share
decode steps with each other and with interactive traffic.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid

import httpx

from omnimini.engine.scheduler import background_priority
from omnimini.serve.batch_store import BatchStore
from omnimini.serve.files import FileStore
from omnimini.serve.store import StoreError

log = logging.getLogger("omnimini.batch")

POLL_S = 0.5  # how often a running batch checks for cancellation (also by another server sharing the store)
HEARTBEAT_S = 10.0
IDLE_S = 5.0  # how often an idle runner looks for batches left by a dead server sharing the store


def split_lines(data: bytes) -> list[tuple[int, str]]:
    """(line index, text) of every non-blank line; undecodable bytes become U+FFFD (and that line fails)."""
    text = data.decode("utf-8", errors="replace")
    return [(i, ln) for i, ln in enumerate(text.splitlines()) if ln.strip()]


def parse_line(text: str, endpoint: str) -> tuple[dict | None, str | None, str | None]:
    """(request, custom_id, error message): request is {custom_id, method, url, body} when the line is valid."""
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        return None, None, f"the line is not valid JSON ({e.msg} at column {e.colno})"
    if not isinstance(obj, dict):
        return None, None, "the line must be a JSON object with custom_id, method, url and body"
    cid = obj.get("custom_id")
    if not isinstance(cid, str) or not cid:
        return None, None, "custom_id must be a non-empty string"
    if obj.get("method", "POST") != "POST":
        return None, cid, f"method must be POST, got {obj.get('method')!r}"
    if obj.get("url") != endpoint:
        return None, cid, f"url {obj.get('url')!r} does not match the batch's endpoint {endpoint}"
    body = obj.get("body")
    if not isinstance(body, dict):
        return None, cid, "body must be a JSON object (the request of the endpoint)"
    if body.get("stream"):
        return None, cid, "stream is not supported in a batch"
    return obj, cid, None


def _req_id() -> str:
    return "batch_req_" + uuid.uuid4().hex[:24]


def error_record(cid: str | None, code: str, message: str, line: int) -> dict:
    return {"id": _req_id(), "custom_id": cid, "response": None,
            "error": {"code": code, "message": f"line {line + 1}: {message}"}}


class BatchRunner:
    def __init__(self, app, batches: BatchStore, files: FileStore, concurrency: int = 8,
                 api_key: str | None = None):
        self.app, self.batches, self.files = app, batches, files
        self.concurrency = max(1, concurrency)
        self.headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._wake = asyncio.Event()
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._loop(), name="omnimini-batches")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    def wake(self) -> None:
        self._wake.set()

    # ---- the loop ---------------------------------------------------------------------------------------

    async def _loop(self) -> None:
        transport = httpx.ASGITransport(app=self.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://omnimini.batch", timeout=None) as client:
            while True:
                try:
                    for bid in self.batches.active_ids():
                        if self.batches.claim(bid):
                            await self._run(client, bid)
                except StoreError as e:  # e.g. a full disk: retry later, the server keeps serving
                    log.error("batch runner: %s", e)
                except Exception:
                    log.exception("batch runner failed")
                self._wake.clear()
                try:
                    await asyncio.wait_for(self._wake.wait(), IDLE_S)
                except TimeoutError:
                    pass

    async def _run(self, client: httpx.AsyncClient, bid: str) -> None:
        row = self.batches.row(bid)
        if row["status"] == "validating":
            self.batches.set_status(bid, "in_progress", "in_progress_at", only_from=("validating",))
        if self.batches.row(bid)["status"] == "in_progress":
            if self.files.get(row["input_file_id"]) is None:  # deleted while the batch waited or ran
                err = [{"code": "input_file_missing", "message": f"the input file {row['input_file_id']} was "
                        "deleted", "param": "input_file_id", "line": None}]
                self.batches.set_status(bid, "failed", "failed_at", errors=json.dumps(err))
                return
            lines = split_lines(self.files.read(row["input_file_id"]))
            done = self.batches.done_lines(bid)
            todo = [(i, t) for i, t in lines if i not in done]
            log.info("batch %s: %d of %d lines to run", bid, len(todo), len(lines))
            await self._run_lines(client, bid, row["endpoint"], todo)
            self.batches.set_status(bid, "finalizing", "finalizing_at", only_from=("in_progress",))
        status = self.batches.row(bid)["status"]
        if status in ("finalizing", "cancelling"):
            self._finalize(bid, "completed" if status == "finalizing" else "cancelled")

    async def _run_lines(self, client, bid: str, endpoint: str, todo: list[tuple[int, str]]) -> None:
        queue: asyncio.Queue = asyncio.Queue()
        for item in todo:
            queue.put_nowait(item)

        async def worker():
            while not queue.empty():
                i, text = queue.get_nowait()
                ok, record = await self._answer(client, endpoint, i, text)
                self.batches.add_result(bid, i, ok, record)

        workers = [asyncio.create_task(worker()) for _ in range(min(self.concurrency, len(todo)))]
        beat = time.monotonic()
        try:
            while not all(w.done() for w in workers):
                await asyncio.wait(workers, timeout=POLL_S)
                if self.batches.row(bid)["status"] != "in_progress":  # cancelled (maybe by another server)
                    break
                if time.monotonic() - beat > HEARTBEAT_S:
                    self.batches.heartbeat(bid)
                    beat = time.monotonic()
        finally:
            for w in workers:
                w.cancel()  # a cancelled line's engine request is aborted; it stays unanswered
            for r in await asyncio.gather(*workers, return_exceptions=True):
                if isinstance(r, Exception) and not isinstance(r, asyncio.CancelledError):
                    raise r

    async def _answer(self, client, endpoint: str, i: int, text: str) -> tuple[bool, dict]:
        req, cid, err = parse_line(text, endpoint)
        if err:
            return False, error_record(cid, "invalid_request", err, i)
        with background_priority():
            resp = await client.post(endpoint, json=req["body"], headers=self.headers)
        try:
            body = resp.json()
        except ValueError:
            body = {"error": {"message": resp.text[:1000], "type": "server_error", "param": None, "code": None}}
        record = {"id": _req_id(), "custom_id": cid,
                  "response": {"status_code": resp.status_code, "request_id": "req_" + uuid.uuid4().hex[:24],
                               "body": body}, "error": None}
        return 200 <= resp.status_code < 300, record

    def _finalize(self, bid: str, final: str) -> None:
        """Write the output and error files from the committed results, then mark the batch done. Redoable:
        the file ids are derived from the batch id, so a crash here rewrites the same files on resume."""
        cols = {}
        for ok, col, suffix in ((True, "output_file_id", "output"), (False, "error_file_id", "errors")):
            records = self.batches.results(bid, ok)
            if records:
                data = ("\n".join(records) + "\n").encode()
                rec = self.files.put(data, f"{bid}_{suffix}.jsonl", "batch_output", f"file-{suffix}-{bid[6:]}")
                cols[col] = rec.id
        stamp = "completed_at" if final == "completed" else "cancelled_at"
        self.batches.set_status(bid, final, stamp, **cols)
        log.info("batch %s %s", bid, final)
