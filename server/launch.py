"""Run the app under uvicorn. SIGTERM and SIGINT drain: uvicorn stops accepting connections, lets the
requests in flight finish, and only then are the engines stopped."""

from __future__ import annotations

import logging

import uvicorn

from .app import build_app
from .served_models import ModelRegistry, ServedModel
from .settings import ServerSettings

logger = logging.getLogger(__name__)


def run_server(
    models: list[ServedModel],
    settings: ServerSettings,
    host: str | None = None,
    port: int = 8000,
    log_level: str = "info",
    access_log: bool = True,
) -> None:
    app = build_app(ModelRegistry(models), settings)
    config = uvicorn.Config(
        app,
        host=host or "0.0.0.0",
        port=port,
        log_level=log_level,
        access_log=access_log,
        timeout_graceful_shutdown=None,
        root_path=settings.root_path or "",
    )
    for model in models:
        logger.info("Serving %s (%s) as %s", model.root, model.runner, ", ".join(model.names))
    try:
        uvicorn.Server(config).run()
    finally:
        for model in models:
            model.engine.shutdown()
        logger.info("Stopped")
