"""Every error the gateway answers with, in OpenAI's shape (``{"error": {...}}``, docs/api.md).

The exception handlers are module-level functions that count each error on the app's own
``app.state.metrics``; ``create_app`` installs them with ``EXCEPTION_HANDLERS``.
``backend_error`` maps what a backend raises to the error the client gets.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Coroutine
from typing import Any

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from composer.engine_protocol import RequestError
from registry.errors import MoergeError, NotFoundError
from services.gateway.protocol import APIError, ErrorInfo, ErrorResponse

log = logging.getLogger("moerge.gateway")


def backend_error(exc: BaseException, model: str) -> APIError:
    """A backend failure as the error the client gets."""
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, TimeoutError):
        return APIError(504, f"{model!r} did not answer in time", type="timeout_error", code="request_timeout")
    if isinstance(exc, NotFoundError):
        return APIError(404, f"model {model!r} not found: {exc}", code="model_not_found", param="model")
    if isinstance(exc, RequestError):  # the request cannot be served as asked, anywhere
        return APIError(400, str(exc), code=exc.code, param=exc.param)
    if isinstance(exc, MoergeError):
        # each error declares its status: 503 (the default: an engine, a router or a composer that
        # exists cannot answer now, so a client may retry), 400 for a refused definition
        status = exc.http_status
        if status == 503:
            return APIError(503, str(exc), type="service_unavailable_error", code="engine_unavailable")
        return APIError(status, str(exc), type=_ERROR_TYPES.get(status, "invalid_request_error"))
    raise exc


# OpenAI's error types by status (what the openai client maps to its exception classes)
_ERROR_TYPES = {400: "invalid_request_error", 404: "not_found_error"}


def endpoint_of(request: Request) -> str:
    """The route's path template (the metrics' ``endpoint`` label), or "unmatched"."""
    return getattr(request.scope.get("route"), "path", None) or "unmatched"


def count_error(request: Request, type_: str) -> None:
    request.app.state.metrics.error(endpoint_of(request), type_)


def json_error(err: APIError) -> JSONResponse:
    return JSONResponse(err.body().model_dump(), status_code=err.status, headers=err.headers)


async def api_error(request: Request, exc: APIError) -> JSONResponse:
    count_error(request, exc.type)
    return json_error(exc)


async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    errors = exc.errors()
    if any(e.get("type") == "json_invalid" for e in errors):
        err = APIError(400, "the request body is not valid JSON", code="invalid_json")
    else:
        parts, param = [], None
        for e in errors[:5]:
            loc = ".".join(str(x) for x in e.get("loc", ()) if x != "body")
            param = param or loc or None
            parts.append(f"{loc}: {e.get('msg')}" if loc else str(e.get("msg")))
        err = APIError(422, "invalid request: " + "; ".join(parts), code="invalid_request", param=param)
    count_error(request, err.type)
    return json_error(err)


async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
    err = APIError(exc.status_code, str(exc.detail), type=kind, headers=dict(exc.headers or {}))
    count_error(request, err.type)
    return json_error(err)


async def unexpected_error(request: Request, exc: Exception) -> JSONResponse:
    log.exception("unexpected error on %s %s", request.method, request.url.path)
    count_error(request, "server_error")
    body = ErrorResponse(error=ErrorInfo(message=f"internal error: {type(exc).__name__}", type="server_error"))
    return JSONResponse(body.model_dump(), status_code=500)


EXCEPTION_HANDLERS: dict[int | type[Exception], Callable[[Request, Any], Coroutine[Any, Any, Response]]] = {
    APIError: api_error,
    RequestValidationError: validation_error,
    StarletteHTTPException: http_error,
    Exception: unexpected_error,
}
