"""The API's own description (`/openapi.json`) made to say what the server sends: errors are 400, never
FastAPI's default 422, and every error has the OpenAI envelope; the probes answer with an empty body and
`/metrics` with Prometheus text."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

ERROR_SCHEMA = {
    "type": "object",
    "required": ["error"],
    "properties": {
        "error": {
            "type": "object",
            "required": ["message", "type", "code"],
            "properties": {
                "message": {"type": "string"},
                "type": {"type": "string"},
                "param": {"type": ["string", "null"]},
                "code": {"type": "integer"},
            },
        }
    },
}
POST_ERRORS = {
    "400": "The request is invalid (a bad body or value).",
    "401": "The API key is missing or wrong.",
    "404": "No served model has that name, or the route does not exist.",
    "413": "The body is over --max-request-size.",
    "500": "The engine failed.",
    "503": "The model's queue is full (with Retry-After).",
}
EMPTY_BODY_PATHS = ("/health", "/ping")


def install_openapi(app: FastAPI) -> None:
    def schema() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = _corrected(
                get_openapi(title=app.title, version=app.version, routes=app.routes, servers=app.servers)
            )
        return app.openapi_schema

    app.openapi = schema


def _corrected(spec: dict[str, Any]) -> dict[str, Any]:
    error_ref = {"$ref": "#/components/schemas/ErrorResponse"}
    spec.setdefault("components", {}).setdefault("schemas", {})["ErrorResponse"] = ERROR_SCHEMA
    for path, operations in spec.get("paths", {}).items():
        for method, operation in operations.items():
            responses = operation.setdefault("responses", {})
            responses.pop("422", None)
            if method == "post":
                for status, text in POST_ERRORS.items():
                    responses[status] = {"description": text, "content": {"application/json": {"schema": error_ref}}}
            if path in EMPTY_BODY_PATHS:
                responses["200"] = {"description": "Healthy (an empty body); 503 when an engine has died."}
            elif path == "/metrics":
                responses["200"] = {"description": "Prometheus metrics.", "content": {"text/plain": {}}}
    schemas = spec["components"]["schemas"]
    for unused in ("HTTPValidationError", "ValidationError"):
        schemas.pop(unused, None)
    return spec
