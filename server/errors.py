"""Every error in the OpenAI envelope `{"error": {"message", "type", "param", "code"}}`, with vLLM's statuses
(docs/architecture.md §8): body validation and bad values 400 (never 422), unknown model 404, admission control
503 with `Retry-After`, anything unexpected 500 (its details stay in the log)."""

from __future__ import annotations

import logging
import re
from http import HTTPStatus
from typing import Any

import jinja2
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

from jaxserve.errors import EngineDeadError

logger = logging.getLogger(__name__)

MAX_LISTED_VALIDATION_ERRORS = 10
BUSY_MESSAGE = (
    "The engine is currently busy and cannot accept new requests. Please try again later or on a different instance."
)
RETRY_AFTER_SECONDS = 1

_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")
_FRAME = re.compile(r'File "[^"]+"')
_PATH = re.compile(r"(?<![\w.])/(?:[\w.-]+/)+[\w.-]+")


class APIError(Exception):
    """An error with its HTTP status, OpenAI `type` and `param`."""

    def __init__(
        self,
        message: str,
        status: int = HTTPStatus.BAD_REQUEST,
        type: str = "BadRequestError",
        param: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.message = message
        self.status = int(status)
        self.type = type
        self.param = param
        self.headers = headers


def not_found(message: str, param: str | None = None) -> APIError:
    return APIError(message, HTTPStatus.NOT_FOUND, "NotFoundError", param)


def busy() -> APIError:
    return APIError(
        BUSY_MESSAGE,
        HTTPStatus.SERVICE_UNAVAILABLE,
        "Service Unavailable",
        headers={"Retry-After": str(RETRY_AFTER_SECONDS)},
    )


def clean_message(message: str) -> str:
    """No memory addresses, source frames or absolute paths in what a client sees."""
    message = _ADDRESS.sub("", message)
    message = _FRAME.sub("<path>", message)
    return _PATH.sub("<path>", message)


def error_body(message: str, type: str, status: int, param: str | None = None) -> dict[str, Any]:
    return {"error": {"message": clean_message(message), "type": type, "param": param, "code": status}}


def error_response(error: APIError) -> JSONResponse:
    return JSONResponse(error_body(error.message, error.type, error.status, error.param), error.status, error.headers)


def from_exception(exc: BaseException) -> APIError:
    """The APIError for any exception a handler let through."""
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, ValidationError | RequestValidationError):
        return validation_error(exc.errors())
    if isinstance(exc, ValueError | TypeError | OverflowError | RecursionError | jinja2.TemplateError):
        return APIError(str(exc), param=getattr(exc, "param", None))
    if isinstance(exc, EngineDeadError):
        return APIError(
            "The server had an error while processing your request.",
            HTTPStatus.INTERNAL_SERVER_ERROR,
            "InternalServerError",
        )
    logger.error("Unhandled error", exc_info=exc)
    return APIError("Internal server error", HTTPStatus.INTERNAL_SERVER_ERROR, "InternalServerError")


def validation_error(errors: list[dict[str, Any]]) -> APIError:
    """vLLM's summary of a body validation failure: a count, then up to ten of the errors."""
    count = len(errors)
    lines = [f"{count} validation error{'s' if count != 1 else ''}:"]
    for error in errors[:MAX_LISTED_VALIDATION_ERRORS]:
        entry = {key: error[key] for key in ("type", "loc", "msg", "input") if key in error}
        lines.append(f"  {entry}")
    first_loc = errors[0].get("loc", ()) if errors else ()
    param = ".".join(str(part) for part in first_loc) or None
    return APIError("\n".join(lines), HTTPStatus.BAD_REQUEST, "Bad Request", param)


def allowed_methods(request: Request) -> list[str]:
    """The methods of all the routes at the request's path (a path may have one route per method)."""
    return sorted(
        {
            method
            for route in request.app.router.routes
            if route.matches(request.scope)[0] != Match.NONE
            for method in getattr(route, "methods", None) or ()
        }
    )


def install_error_handlers(app: FastAPI) -> None:
    """Every error class a request can raise gets its own handler: Starlette treats a handler for `Exception`
    as the last resort, which answers but then re-raises and drops the keep-alive connection, so only what
    is really unexpected (a 500) may reach it."""

    async def handle(request: Request, exc: Exception) -> JSONResponse:
        return error_response(from_exception(exc))

    async def handle_http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        """Starlette's own errors (unknown route, wrong method, unreadable body) in the envelope."""
        status = HTTPStatus(exc.status_code)
        body = error_body(str(exc.detail), status.phrase, exc.status_code)
        headers = exc.headers
        if status == HTTPStatus.METHOD_NOT_ALLOWED:  # every route on the path, not just the first one tried
            headers = {**(headers or {}), "Allow": ", ".join(allowed_methods(request))}
        return JSONResponse(body, exc.status_code, headers)

    for kind in (
        RequestValidationError, APIError, ValueError, TypeError, OverflowError, RecursionError,
        jinja2.TemplateError, Exception,
    ):  # fmt: skip
        app.add_exception_handler(kind, handle)
    app.add_exception_handler(StarletteHTTPException, handle_http)
