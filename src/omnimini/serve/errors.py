"""OpenAI-shaped errors: one exception type and the handlers that turn every failure into its JSON body."""

from __future__ import annotations

import json
import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from omnimini.serve.protocol import error_body
from omnimini.serve.store import StoreError

log = logging.getLogger("omnimini.serve")

TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
         404: "invalid_request_error", 405: "invalid_request_error", 413: "invalid_request_error",
         429: "rate_limit_error", 500: "server_error", 503: "server_error"}


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type_: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.type = type_ or TYPES.get(status, "invalid_request_error")
        self.headers = headers

    def response(self) -> JSONResponse:
        return JSONResponse(error_body(self.message, self.type, self.param, self.code), status_code=self.status,
                            headers=self.headers)


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param, code)


_TYPE_LABELS = {"str", "int", "float", "bool", "dict", "list", "none"}


def _loc_param(loc) -> str | None:
    parts = [str(p) for p in loc if p not in ("body",)]
    # pydantic adds union-member names (e.g. "str", "list[...]") to locations; keep field names and indexes
    keep = [p for p in parts if (p.isidentifier() and p not in _TYPE_LABELS) or p.isdigit()]
    return ".".join(keep) or None


def validation_error(errs) -> APIError:
    msg, param = _validation_message(errs)
    return APIError(400, msg, param)


def _validation_message(errs) -> tuple[str, str | None]:
    if any(e.get("type") == "json_invalid" for e in errs):
        return "We could not parse the JSON body of your request: it is not valid JSON.", None
    # of a union's branch errors, the one that got deepest names what the client meant to send
    errs = sorted(errs, key=lambda e: -len(e.get("loc", ())))
    first = errs[0] if errs else {}
    param = _loc_param(first.get("loc", ()))
    if first.get("type") == "missing" and param is None:
        return "The request body must be a JSON object.", None
    msgs = []
    for e in errs[:3]:
        where = _loc_param(e.get("loc", ())) or "body"
        msgs.append(f"{where}: {e.get('msg')}")
    return "Invalid request: " + "; ".join(msgs), param


def install_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api(_: Request, exc: APIError):
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError):  # FastAPI says 422; OpenAI says 400
        return validation_error(exc.errors()).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException):
        return APIError(exc.status_code, str(exc.detail), code=None, headers=getattr(exc, "headers", None)).response()

    @app.exception_handler(StoreError)
    async def _store(_: Request, exc: StoreError):
        log.error("state database: %s", exc)
        return APIError(500, f"The server could not use its state database: {exc}", code="store_error").response()

    @app.exception_handler(Exception)
    async def _crash(_: Request, exc: Exception):
        log.exception("request failed")
        return APIError(500, f"The server had an error while processing your request ({type(exc).__name__}).")\
            .response()


async def parse_body(request: Request, model: type[BaseModel]):
    """JSON body -> request model (whatever the Content-Type says); errors become OpenAI-shaped 400s."""
    raw = await request.body()
    try:
        obj = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise APIError(400, f"We could not parse the JSON body of your request ({e.msg if hasattr(e, 'msg') else e})."
                       " The OpenAI API expects a JSON payload.") from None
    if not isinstance(obj, dict):
        raise APIError(400, "The request body must be a JSON object.")
    try:
        return model.model_validate(obj)
    except ValidationError as e:
        raise validation_error(e.errors()) from None
