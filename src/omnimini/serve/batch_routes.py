"""HTTP routes of the Files and Batch APIs: /v1/files and /v1/batches (OpenAI's shapes, OpenAI's errors)."""

from __future__ import annotations

from fastapi import Depends, FastAPI, File, Form, Query, UploadFile
from fastapi.responses import Response
from pydantic import BaseModel

from omnimini.serve.batch_runner import BatchRunner, parse_line, split_lines
from omnimini.serve.batch_store import BatchStore
from omnimini.serve.errors import APIError, bad_request
from omnimini.serve.files import UPLOAD_PURPOSES, FileStore

# endpoints a batch may name (OpenAI's list); a batch is accepted for those this server actually serves
BATCH_ENDPOINTS = ("/v1/chat/completions", "/v1/responses", "/v1/embeddings", "/v1/completions")
WINDOWS = ("24h",)


class BatchCreate(BaseModel):
    input_file_id: str
    endpoint: str
    completion_window: str
    metadata: dict[str, str] | None = None


def served_endpoints(app: FastAPI) -> list[str]:
    posts = {r.path for r in app.routes if "POST" in (getattr(r, "methods", None) or ())}
    return [e for e in BATCH_ENDPOINTS if e in posts]


def _page(data: list[dict], has_more: bool) -> dict:
    """OpenAI's cursor page: the client asks for the next one with after=last_id while has_more."""
    return {"object": "list", "data": data, "has_more": has_more,
            "first_id": data[0]["id"] if data else None, "last_id": data[-1]["id"] if data else None}


def _not_found(kind: str, oid: str, param: str) -> APIError:
    return APIError(404, f"No such {kind}: '{oid}'", param=param, code=None)


def install_batch_api(app: FastAPI, auth, files: FileStore, batches: BatchStore, runner: BatchRunner,
                      registry, max_file_bytes: int, max_lines: int) -> None:
    dep = [Depends(auth)]

    @app.post("/v1/files", dependencies=dep)
    async def upload(file: UploadFile = File(...), purpose: str = Form(...)):
        if purpose not in UPLOAD_PURPOSES:
            raise bad_request(f"Invalid purpose {purpose!r}: this server accepts {', '.join(UPLOAD_PURPOSES)}.",
                              "purpose", "invalid_value")
        data = await file.read(max_file_bytes + 1)
        if len(data) > max_file_bytes:
            raise APIError(413, f"The file exceeds this server's {max_file_bytes}-byte limit.", "file",
                           "file_too_large")
        return files.put(data, file.filename or "upload.jsonl", purpose).to_openai()

    @app.get("/v1/files", dependencies=dep)
    async def list_files(purpose: str | None = None, limit: int = Query(10_000, ge=1, le=10_000)):
        return _page([f.to_openai() for f in files.list(purpose, limit)], False)

    @app.get("/v1/files/{file_id}", dependencies=dep)
    async def get_file(file_id: str):
        rec = files.get(file_id)
        if rec is None:
            raise _not_found("file", file_id, "file_id")
        return rec.to_openai()

    @app.get("/v1/files/{file_id}/content", dependencies=dep)
    async def file_content(file_id: str):
        if files.get(file_id) is None:
            raise _not_found("file", file_id, "file_id")
        return Response(files.read(file_id), media_type="application/octet-stream")

    @app.delete("/v1/files/{file_id}", dependencies=dep)
    async def delete_file(file_id: str):
        if not files.delete(file_id):
            raise _not_found("file", file_id, "file_id")
        return {"id": file_id, "object": "file", "deleted": True}

    @app.post("/v1/batches", dependencies=dep)
    async def create_batch(body: BatchCreate):
        endpoints = served_endpoints(app)
        if body.endpoint not in endpoints:
            later = " (not served by this server yet)" if body.endpoint in BATCH_ENDPOINTS else ""
            raise bad_request(f"Invalid endpoint {body.endpoint!r}{later}; batches may use: {', '.join(endpoints)}.",
                              "endpoint", "invalid_value")
        if body.completion_window not in WINDOWS:
            raise bad_request(f"Invalid completion_window {body.completion_window!r}; supported: "
                              f"{', '.join(WINDOWS)}.", "completion_window", "invalid_value")
        rec = files.get(body.input_file_id)
        if rec is None or rec.purpose != "batch":
            raise bad_request(f"Invalid input_file_id {body.input_file_id!r}: no uploaded file with purpose 'batch' "
                              "has this id.", "input_file_id", "invalid_value")
        total = _validate_lines(files.read(rec.id), body.endpoint, registry, max_lines)
        bid = batches.create(body.endpoint, rec.id, body.completion_window, total, body.metadata)
        runner.wake()
        return batches.to_openai(batches.row(bid))

    @app.get("/v1/batches", dependencies=dep)
    async def list_batches(after: str | None = None, limit: int = Query(20, ge=1, le=100)):
        rows, more = batches.page(after, limit)
        return _page([batches.to_openai(r) for r in rows], more)

    @app.get("/v1/batches/{batch_id}", dependencies=dep)
    async def get_batch(batch_id: str):
        row = batches.row(batch_id)
        if row is None:
            raise _not_found("batch", batch_id, "batch_id")
        return batches.to_openai(row)

    @app.post("/v1/batches/{batch_id}/cancel", dependencies=dep)
    async def cancel_batch(batch_id: str):
        row = batches.row(batch_id)
        if row is None:
            raise _not_found("batch", batch_id, "batch_id")
        if not batches.set_status(batch_id, "cancelling", "cancelling_at", only_from=("validating", "in_progress")):
            status = batches.row(batch_id)["status"]
            if status not in ("cancelling", "cancelled"):
                raise APIError(409, f"Cannot cancel a batch with status {status!r}.", "batch_id", "invalid_state")
        runner.wake()
        return batches.to_openai(batches.row(batch_id))


def _validate_lines(data: bytes, endpoint: str, registry, max_lines: int) -> int:
    """Refuse the batch (400) for what dooms it as a whole: no lines, too many, a duplicate custom_id, a model
    this server does not serve. Malformed single lines are not refused: they fail alone, in the error file."""
    lines = split_lines(data)
    if not lines:
        raise bad_request("The input file has no request lines.", "input_file_id", "invalid_value")
    if len(lines) > max_lines:
        raise bad_request(f"The input file has {len(lines)} lines; a batch holds at most {max_lines}.",
                          "input_file_id", "invalid_value")
    seen: set[str] = set()
    for i, text in lines:
        req, cid, _err = parse_line(text, endpoint)
        if cid is not None:
            if cid in seen:
                raise bad_request(f"Line {i + 1}: duplicate custom_id {cid!r}; each line needs its own.",
                                  "input_file_id", "duplicate_custom_id")
            seen.add(cid)
        model = req["body"].get("model") if req else None
        if isinstance(model, str):
            try:
                registry.get(model)
            except APIError:
                raise bad_request(f"Line {i + 1}: the model {model!r} is not served here (served: "
                                  f"{', '.join(registry.ids())}).", "input_file_id", "model_not_found") from None
    return len(lines)
