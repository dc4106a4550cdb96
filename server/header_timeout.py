"""A deadline on reading a request's headers, which uvicorn lacks: a client that opens a connection and sends its
headers a byte at a time (or nothing at all) would otherwise hold the connection open for ever.

`with_header_timeout(timeout_s)` wraps the HTTP protocol uvicorn would pick (httptools if installed, else h11).
The clock starts when a connection opens and again when the first bytes of a later request on a kept-alive
connection arrive; it stops once the headers are complete (the protocol starts a new request-response cycle). A
client still sending headers at the deadline gets a 408 in the error envelope and the connection is closed. The
body has its own deadline (`middleware.RequestBodyMiddleware`)."""

from __future__ import annotations

import asyncio
import json

from uvicorn.protocols.http.auto import AutoHTTPProtocol

from .errors import error_body


def _timeout_response(timeout_s: float) -> bytes:
    body = json.dumps(
        error_body(f"The request headers did not arrive within {timeout_s:g} seconds.", "Request Timeout", 408)
    ).encode()
    head = (
        "HTTP/1.1 408 Request Timeout\r\n"
        "content-type: application/json\r\n"
        f"content-length: {len(body)}\r\n"
        "connection: close\r\n\r\n"
    )
    return head.encode("latin-1") + body


def with_header_timeout(timeout_s: float, base: type[asyncio.Protocol] = AutoHTTPProtocol) -> type[asyncio.Protocol]:
    """`base` (a uvicorn HTTP protocol) with a deadline of `timeout_s` seconds on each request's headers."""
    response = _timeout_response(timeout_s)

    class HeaderTimeoutProtocol(base):
        _header_timer: asyncio.TimerHandle | None = None

        def connection_made(self, transport: asyncio.Transport) -> None:
            super().connection_made(transport)
            self._arm()

        def data_received(self, data: bytes) -> None:
            cycle = self.cycle
            if cycle is None or cycle.response_complete:  # these bytes start a request
                self._arm()
            super().data_received(data)
            if self.cycle is not cycle:  # the headers are complete
                self._disarm()

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            super().connection_lost(exc)

        def _arm(self) -> None:
            if self._header_timer is None:
                self._header_timer = self.loop.call_later(timeout_s, self._expire)

        def _disarm(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None

        def _expire(self) -> None:
            self._header_timer = None
            if not self.transport.is_closing():
                self.transport.write(response)
                self.transport.close()

    return HeaderTimeoutProtocol
