"""The engine as the server sees it: an async iterator of outputs per request, and `abort`.

One thread per engine runs the step loop. Requests and aborts reach it through a queue that it drains
between steps, so the event loop never waits for a step; outputs go back to each request's asyncio queue
with `call_soon_threadsafe`. A consumer that stops iterating (a client that disconnected) aborts its
request, and the engine frees its KV pages before the next step. If a step raises, the engine is dead:
every open request gets the error and `errored` turns true (the server's /health then answers 503).
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from collections.abc import AsyncIterator
from typing import Any

from .engine import LLMEngine
from .outputs import RequestOutput
from .sampling_params import SamplingParams

logger = logging.getLogger(__name__)


class EngineDeadError(RuntimeError):
    pass


class AsyncEngine:
    def __init__(self, engine: LLMEngine):
        self.engine = engine
        self._commands: queue.SimpleQueue[tuple[str, Any]] = queue.SimpleQueue()
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._lock = threading.Lock()
        self.error: BaseException | None = None
        self._stopping = False
        self._thread = threading.Thread(target=self._loop, name="jaxserve-engine", daemon=True)
        self._thread.start()

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    @property
    def errored(self) -> bool:
        return self.error is not None

    async def generate(
        self, prompt_token_ids: list[int], params: SamplingParams, request_id: str, prompt: str | None = None
    ) -> AsyncIterator[RequestOutput]:
        """Yield the request's outputs (deltas with `RequestOutputKind.DELTA`) until it finishes."""
        if self.error is not None:
            raise EngineDeadError("The engine loop has died.") from self.error
        self.engine.validate(prompt_token_ids, params)
        stream: asyncio.Queue = asyncio.Queue()
        with self._lock:
            if request_id in self._streams:
                raise ValueError(f"Request id {request_id!r} is already in use.")
            self._streams[request_id] = (asyncio.get_running_loop(), stream)
        self._commands.put(("add", (request_id, prompt_token_ids, params, prompt)))
        finished = False
        try:
            while not finished:
                item = await stream.get()
                if isinstance(item, ValueError):
                    raise item
                if isinstance(item, BaseException):
                    raise EngineDeadError("The engine loop has died.") from item
                finished = item.finished
                yield item
        finally:
            with self._lock:
                self._streams.pop(request_id, None)
            if not finished:
                self.abort(request_id)

    def abort(self, request_id: str) -> None:
        self._commands.put(("abort", request_id))

    def shutdown(self) -> None:
        self._stopping = True
        self._commands.put(("stop", None))
        self._thread.join()

    def _loop(self) -> None:
        try:
            while not self._stopping:
                self._drain(block=not self.engine.has_unfinished_requests())
                if self.engine.has_unfinished_requests():
                    self._deliver(self.engine.step())
        except BaseException as exc:  # noqa: BLE001 - any failure kills the engine, and every caller must hear of it
            logger.exception("The engine loop died")
            self.error = exc
            with self._lock:
                streams = list(self._streams.values())
            for loop, stream in streams:
                loop.call_soon_threadsafe(stream.put_nowait, exc)

    def _drain(self, block: bool) -> None:
        try:
            command, payload = self._commands.get(block=block)
        except queue.Empty:
            return
        while True:
            if command == "add":
                request_id, ids, params, prompt = payload
                try:
                    self.engine.add_request(request_id, ids, params, prompt)
                except ValueError as exc:
                    self._send(request_id, exc)
            elif command == "abort":
                self.engine.abort_request(payload)
            try:
                command, payload = self._commands.get_nowait()
            except queue.Empty:
                return

    def _deliver(self, outputs: list[RequestOutput]) -> None:
        for output in outputs:
            self._send(output.request_id, output)

    def _send(self, request_id: str, item: RequestOutput | BaseException) -> None:
        with self._lock:
            target = self._streams.get(request_id)
        if target is not None:
            loop, stream = target
            loop.call_soon_threadsafe(stream.put_nowait, item)
