"""Run the app under uvicorn. SIGTERM and SIGINT drain: uvicorn stops accepting connections, lets the
requests in flight finish, and only then are the engines stopped and the process exits with status 0."""

from __future__ import annotations

import contextlib
import logging
import signal
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import uvicorn
from fastapi import FastAPI

from .app import build_app
from .header_timeout import with_header_timeout
from .served_models import ModelRegistry, ServedModel
from .settings import ServerSettings

logger = logging.getLogger(__name__)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def uvicorn_config(app: FastAPI, settings: ServerSettings, **kwargs: Any) -> uvicorn.Config:
    """uvicorn's configuration for `app`: never uvicorn's root path (the app sets its own, see
    `RootPathMiddleware`), and the header deadline as a protocol of ours (uvicorn has none; the body's deadline
    is in the middleware)."""
    http = "auto" if settings.request_header_timeout is None else with_header_timeout(settings.request_header_timeout)
    return uvicorn.Config(app, http=http, timeout_graceful_shutdown=None, **kwargs)


@contextlib.contextmanager
def background_server(
    models: list[ServedModel], settings: ServerSettings | None = None, access_log: bool = False
) -> Iterator[str]:
    """Serve `models` on a free loopback port from a daemon thread until the block ends; yields the base URL.
    For tests and benchmarks; the engines stay with the caller."""
    settings = settings or ServerSettings()
    app = build_app(ModelRegistry(models), settings)
    port = free_port()
    config = uvicorn_config(app, settings, host="127.0.0.1", port=port, log_level="warning", access_log=access_log)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name=f"uvicorn-{port}", daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the server did not start")
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)


def run_server(
    models: list[ServedModel],
    settings: ServerSettings,
    host: str | None = None,
    port: int = 8000,
    log_level: str = "info",
    access_log: bool = True,
) -> None:
    app = build_app(ModelRegistry(models), settings)
    config = uvicorn_config(
        app, settings, host=host or "0.0.0.0", port=port, log_level=log_level, access_log=access_log
    )
    for model in models:
        logger.info("Serving %s (%s) as %s", model.root, model.runner, ", ".join(model.names))
    # uvicorn re-raises the signal that stopped it once it has drained; a no-op handler lets it return to us
    previous = {sig: signal.signal(sig, _ignore) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        uvicorn.Server(config).run()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        for model in models:
            model.engine.shutdown()
        logger.info("Stopped")


def _ignore(signum: int, frame) -> None:
    pass
