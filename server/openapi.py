"""The API's own description (`/openapi.json`) made to say what the server sends: errors are 400, never
FastAPI's default 422, and every error has the OpenAI envelope; each route's 200 body is its response model (an
SSE stream of chunks for `stream: true`, raw arrays for the `bytes` encodings); the probes answer with an empty
body and `/metrics` with Prometheus text."""

from __future__ import annotations

from typing import Any, Union

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

COMPONENTS = "#/components/schemas/"
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
    "408": "The body did not arrive within --request-body-timeout.",
    "413": "The body is over --max-request-size (an audio upload: over VLLM_MAX_AUDIO_CLIP_FILESIZE_MB).",
    "500": "The engine failed.",
    "503": "The model's queue is full (with Retry-After).",
}
EMPTY_BODIES = {
    "/health": "Healthy (an empty body); 503 when an engine has died.",
    "/ping": "Healthy (an empty body); 503 when an engine has died.",
    "/reset_prefix_cache": "The prefix cache is empty (an empty body).",
}


def ok(
    *models: type[BaseModel],
    streams: tuple[type[BaseModel], ...] = (),
    binary: bool = False,
    text: tuple[str, ...] = (),
) -> dict[int, Any]:
    """`responses` for a route whose handler returns a `Response` it built: the 200 body is one of `models`, or,
    for `stream: true`, server-sent events each carrying one of `streams`, or, with `binary`, the raw arrays of
    the `bytes` encodings, or a text body of one of the `text` media types (the speech routes' text, srt, vtt)."""
    content: dict[str, Any] = {}
    if streams:
        content["text/event-stream"] = {"schema": _sse_event(streams)}
    if binary:
        content["application/octet-stream"] = {"schema": {"type": "string", "format": "binary"}}
    for media_type in text:
        content[media_type.split(";")[0]] = {"schema": {"type": "string"}}
    model = models[0] if len(models) == 1 else Union[models]  # noqa: UP007 (a runtime union of classes)
    return {200: {"model": model, "description": "Successful Response", "content": content}}


def _sse_event(streams: tuple[type[BaseModel], ...]) -> dict[str, Any]:
    """One server-sent event of a stream: `data:` a chunk (or an error) as JSON, and `data: [DONE]` last."""
    payloads = [{"$ref": f"{COMPONENTS}{stream.__name__}"} for stream in streams]
    chunk = {
        "type": "string",
        "contentMediaType": "application/json",
        "contentSchema": {"anyOf": [*payloads, {"$ref": f"{COMPONENTS}ErrorResponse"}]},
    }
    return {"type": "object", "required": ["data"], "properties": {"data": {"anyOf": [{"const": "[DONE]"}, chunk]}}}


def install_openapi(app: FastAPI, stream_models: tuple[type[BaseModel], ...] = ()) -> None:
    """Serve the corrected description; `stream_models` (the chunks `ok(streams=...)` names) join its schemas."""

    def schema() -> dict[str, Any]:
        if app.openapi_schema is None:
            spec = get_openapi(title=app.title, version=app.version, routes=app.routes, servers=app.servers)
            app.openapi_schema = _corrected(spec, stream_models)
        return app.openapi_schema

    app.openapi = schema


def _corrected(spec: dict[str, Any], stream_models: tuple[type[BaseModel], ...]) -> dict[str, Any]:
    error_ref = {"$ref": f"{COMPONENTS}ErrorResponse"}
    schemas = spec.setdefault("components", {}).setdefault("schemas", {})
    schemas["ErrorResponse"] = ERROR_SCHEMA
    if stream_models:
        _, top = models_json_schema(
            [(model, "serialization") for model in stream_models], ref_template=COMPONENTS + "{model}"
        )
        schemas.update(top.get("$defs", {}))
    for path, operations in spec.get("paths", {}).items():
        for method, operation in operations.items():
            responses = operation.setdefault("responses", {})
            responses.pop("422", None)
            if method == "post":
                for status, text in POST_ERRORS.items():
                    responses[status] = {"description": text, "content": {"application/json": {"schema": error_ref}}}
            elif "{" in path:  # a GET of something by id
                text = "Nothing has that id."
                responses["404"] = {"description": text, "content": {"application/json": {"schema": error_ref}}}
            if path in EMPTY_BODIES:
                responses["200"] = {"description": EMPTY_BODIES[path]}
            elif path == "/metrics":
                responses["200"] = {"description": "Prometheus metrics.", "content": {"text/plain": {}}}
    for unused in ("HTTPValidationError", "ValidationError"):
        schemas.pop(unused, None)
    return spec
