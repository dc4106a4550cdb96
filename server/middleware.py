"""ASGI middleware: Bearer-key authentication, `X-Request-Id` on every response, and a request body limit.

Plain ASGI rather than Starlette's BaseHTTPMiddleware, so that streamed responses pass straight through."""

from __future__ import annotations

import hashlib
import hmac
import json
import uuid
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from .errors import error_body

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

PROTECTED_PREFIXES = ("/v1", "/v2", "/inference", "/cohere")
# open even with --api-key-all-routes: health and load probes, metrics, version, the API's own description
OPEN_PATHS = ("/health", "/ping", "/version", "/load", "/metrics", "/openapi.json", "/docs", "/redoc")


async def send_json(send: Send, status: int, body: dict, headers: list[tuple[bytes, bytes]] = ()) -> None:
    payload = json.dumps(body).encode()
    head = [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode()), *headers]
    await send({"type": "http.response.start", "status": status, "headers": head})
    await send({"type": "http.response.body", "body": payload})


class AuthMiddleware:
    """`Authorization: Bearer <key>` on /v1, /v2, /inference and /cohere (vLLM's choice), or with `all_routes`
    on every route but the probes and the API description (`OPEN_PATHS`); 401 `{"error": "Unauthorized"}`,
    before any body is read. Keys are compared as SHA-256 digests in constant time."""

    def __init__(self, app: ASGIApp, api_keys: list[str], root_path: str | None = None, all_routes: bool = False):
        self.app = app
        self.digests = [hashlib.sha256(key.encode()).digest() for key in api_keys]
        self.root_path = root_path or ""
        self.all_routes = all_routes

    def _protected(self, path: str) -> bool:
        if self.all_routes:
            return not path.startswith(OPEN_PATHS)
        return path.startswith(PROTECTED_PREFIXES)

    def _authorized(self, scope: Scope) -> bool:
        header = dict(scope["headers"]).get(b"authorization", b"").decode("latin-1")
        scheme, _, key = header.partition(" ")
        if scheme.lower() != "bearer":
            return False
        digest = hashlib.sha256(key.strip().encode()).digest()
        return any(hmac.compare_digest(digest, known) for known in self.digests)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket") or scope.get("method") == "OPTIONS":
            return await self.app(scope, receive, send)
        path = scope["path"]
        if self.root_path and path.startswith(self.root_path):
            path = path[len(self.root_path) :]
        if self._protected(path) and not self._authorized(scope):
            return await send_json(send, 401, {"error": "Unauthorized"})
        return await self.app(scope, receive, send)


class RequestIdMiddleware:
    """Echo the request's `X-Request-Id` (or a fresh one) on every response."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        request_id = dict(scope["headers"]).get(b"x-request-id") or uuid.uuid4().hex.encode()

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), (b"x-request-id", request_id)]
            await send(message)

        await self.app(scope, receive, send_with_id)


class BodyLimitMiddleware:
    """413 for a body over `max_bytes`: at once by its Content-Length, or, for a chunked body, once that many
    bytes have arrived (the body is read here and handed on whole)."""

    def __init__(self, app: ASGIApp, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    async def _reject(self, send: Send) -> None:
        body = error_body(f"Request body exceeds the limit of {self.max_bytes} bytes.", "Payload Too Large", 413)
        await send_json(send, 413, body)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None:
            if length.isdigit() and int(length) > self.max_bytes:
                return await self._reject(send)
            return await self.app(scope, receive, send)
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_bytes:
                return await self._reject(send)
            if not message.get("more_body", False):
                break
        whole = {"type": "http.request", "body": b"".join(chunks), "more_body": False}
        pending = [whole]

        async def replay() -> Message:
            return pending.pop() if pending else await receive()

        await self.app(scope, replay, send)
