"""ASGI middleware: the root path behind a proxy, Bearer-key authentication, `X-Request-Id` on every response, and a request body read whole
within a size limit and a deadline.

Plain ASGI rather than Starlette's BaseHTTPMiddleware, so that streamed responses pass straight through."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import uuid
from collections.abc import Awaitable, Callable, MutableMapping
from http import HTTPStatus
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

    def __init__(self, app: ASGIApp, api_keys: list[str], all_routes: bool = False):
        self.app = app
        self.digests = [hashlib.sha256(key.encode()).digest() for key in api_keys]
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
        path, root_path = scope["path"], scope.get("root_path", "")
        if root_path and path.startswith(root_path):
            path = path[len(root_path) :]
        if self._protected(path) and not self._authorized(scope):
            return await send_json(send, 401, {"error": "Unauthorized"})
        return await self.app(scope, receive, send)


class RootPathMiddleware:
    """Serve the API under `root_path` (`--root-path`) behind a proxy, whether it keeps the prefix or strips it.

    uvicorn's own root path would prepend it to every path, so a request that kept it would have it twice. Set in
    the scope instead, the router strips it from paths that have it and leaves the rest (vLLM's behaviour), and
    `/openapi.json` lists it as the server's URL."""

    def __init__(self, app: ASGIApp, root_path: str):
        self.app = app
        self.root_path = root_path.rstrip("/")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] in ("http", "websocket"):
            scope["root_path"] = self.root_path
        await self.app(scope, receive, send)


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


class RequestBodyMiddleware:
    """Read the whole body before the route sees it, within two limits: 413 for a body over `max_bytes` (at once by
    its Content-Length, or once that many bytes of a chunked body have arrived), 408 for one not complete within
    `timeout_s` seconds of the headers (a client trickling its body must not hold the connection for ever; None:
    no deadline). Both answer in the error envelope and the connection is closed."""

    def __init__(self, app: ASGIApp, max_bytes: int, timeout_s: float | None = None):
        self.app = app
        self.max_bytes = max_bytes
        self.timeout_s = timeout_s

    async def _read(self, receive: Receive) -> list[bytes] | None:
        """The body's chunks, or None (413) once they are over the limit."""
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client went away
                return chunks
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_bytes:
                return None
            if not message.get("more_body", False):
                return chunks

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            return await self._reject(send, 413, f"Request body exceeds the limit of {self.max_bytes} bytes.")
        try:
            chunks = await asyncio.wait_for(self._read(receive), self.timeout_s)
        except TimeoutError:
            return await self._reject(send, 408, f"The request body did not arrive within {self.timeout_s:g} seconds.")
        if chunks is None:
            return await self._reject(send, 413, f"Request body exceeds the limit of {self.max_bytes} bytes.")
        pending = [{"type": "http.request", "body": b"".join(chunks), "more_body": False}]

        async def replay() -> Message:
            return pending.pop() if pending else await receive()

        await self.app(scope, replay, send)

    @staticmethod
    async def _reject(send: Send, status: int, message: str) -> None:
        kind = HTTPStatus(status).phrase
        await send_json(send, status, error_body(message, kind, status), [(b"connection", b"close")])
