"""A real uvicorn server on a free loopback port, in a background thread of the test process."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Iterator

import uvicorn
from jaxserve.server.app import build_app
from jaxserve.server.served_models import ModelRegistry, ServedModel
from jaxserve.server.settings import ServerSettings


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def running_server(models: list[ServedModel], settings: ServerSettings | None = None) -> Iterator[str]:
    """Serve `models` until the block ends; yields the base URL."""
    settings = settings or ServerSettings()
    app = build_app(ModelRegistry(models), settings)
    port = free_port()
    config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", root_path=settings.root_path or "")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name=f"uvicorn-{port}", daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the test server did not start")
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)
