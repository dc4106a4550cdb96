"""The engine as the server sees it: `generate` (an async iterator of outputs), `encode` (one pooled
output), and `abort`.

One thread per engine runs the step loop. Requests and aborts reach it through a queue that it drains
between steps, so the event loop never waits for a step; outputs go back to each request's asyncio queue
with `call_soon_threadsafe`. For generation the thread runs only the engine core; each request's text, stop
strings and logprob entries are made in the event loop (`OutputProcessor`'s `RequestState`), which tells the
core to finish a sample a stop string ended. A caller that stops waiting (a client that disconnected) aborts its request,
and the engine frees its KV pages before the next step. If a step raises, the engine is dead: every open
request gets the error and `errored` turns true (the server's /health then answers 503).
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import itertools
import logging
import queue
import threading
from collections.abc import AsyncIterator, Callable
from typing import Any

from .beam_search import (
    BeamSearch,
    BeamSearchParams,
    as_request_output,
    continuations,
    search_output,
    step_params,
)
from .engine import LLMEngine
from .engine_core import EngineCore
from .errors import EngineDeadError
from .output_processor import EngineCoreOutput, RequestState
from .outputs import PoolingRequestOutput, RequestOutput
from .pooling_engine import PoolingEngine
from .pooling_params import PoolingParams, PoolingPrompt
from .request import EngineRequest
from .sampling_params import SamplingParams
from .scoring import ScorePlan, plan_scores
from .stats import EngineStats

logger = logging.getLogger(__name__)


class AsyncEngine:
    def __init__(self, engine: EngineCore):
        self.engine = engine
        # (kind, request id, argument): the add callable of "add", the sample index of "finish"
        self._commands: queue.SimpleQueue[tuple[str, str | None, Any]] = queue.SimpleQueue()
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
    def runner(self) -> str:
        """ "generate" or "pooling": what the engine serves."""
        return "generate" if isinstance(self.engine, LLMEngine) else "pooling"

    @property
    def errored(self) -> bool:
        return self.error is not None

    @property
    def runners(self) -> list:
        """The engine's model runner (a data-parallel engine has one per replica)."""
        return [self.engine.runner]

    def process(
        self,
        prompt_token_ids: list[int],
        params: SamplingParams | PoolingParams | BeamSearchParams,
        request_id: str,
        prompt: str | None = None,
        **options: Any,
    ) -> EngineRequest:
        """The request validated once, as the engine's `process_request` does it (ValueError in vLLM's words),
        before any streaming starts or other inputs of the same HTTP request are sent. `options`: `priority`
        and `cache_salt` for generation, `token_type_ids` and `start_offset` for pooling."""
        if isinstance(params, PoolingParams):
            return self._engine_for(PoolingEngine, "pooling").process_request(
                request_id, prompt_token_ids, params, **options
            )
        engine = self._engine_for(LLMEngine, "generation")
        return engine.process_request(request_id, prompt_token_ids, params, prompt=prompt, **options)

    async def generate(
        self, prompt_token_ids: list[int], params: SamplingParams, request_id: str, prompt: str | None = None, **options
    ) -> AsyncIterator[RequestOutput]:
        """`generate_request` of the request processed here."""
        request = self.process(prompt_token_ids, params, request_id, prompt, **options)
        async for output in self.generate_request(request):
            yield output

    async def generate_request(self, request: EngineRequest) -> AsyncIterator[RequestOutput]:
        """Yield the request's outputs (deltas with `RequestOutputKind.DELTA`) until it finishes. The engine
        thread only steps the engine core; text, stop strings and logprob entries are made here, in the event
        loop's thread."""
        engine = self._engine_for(LLMEngine, "generation")
        state = RequestState.of(request, engine.tokenizer)
        ended_by_core: set[int] = set()

        def core_done(outputs: list[EngineCoreOutput]) -> bool:
            ended_by_core.update(o.index for o in outputs if o.finished)
            return len(ended_by_core) == request.params.n

        results = self._results(request.request_id, functools.partial(engine.add_engine_request, request), core_done)
        try:
            async for outputs in results:
                for core in outputs:
                    if state.add(core):
                        self._commands.put(("finish", request.request_id, core.index))
                output = state.take_output()
                if output is not None:
                    yield output
                if state.finished:
                    return
        finally:
            await results.aclose()

    async def beam_search(self, request: EngineRequest, skip_special_tokens: bool = True) -> RequestOutput:
        """A processed beam-search request's beams as one finished output (a completion per beam, best first).
        Each round runs every live beam as a one-token request; their shared prefix comes from the prefix
        cache."""
        engine = self._engine_for(LLMEngine, "generation")
        prompt_ids = request.prompt_token_ids
        search = BeamSearch(request.params, engine.eos_token_ids)
        sampling = step_params(search)
        options = {"priority": request.priority, "cache_salt": request.cache_salt}
        for round_index in itertools.count():
            if search.done:
                break
            beams = [
                self._final(self.generate(prompt_ids + beam.tokens, sampling, f"{request.request_id}-beam{round_index}-{k}", **options))
                for k, beam in enumerate(search.live)
            ]  # fmt: skip
            search.advance([continuations(output) for output in await asyncio.gather(*beams)])
        output = search_output(prompt_ids, search, engine.tokenizer, skip_special_tokens)
        return as_request_output(request.request_id, request.prompt, prompt_ids, output)

    @staticmethod
    async def _final(outputs: AsyncIterator[RequestOutput]) -> RequestOutput:
        async for output in outputs:
            if output.finished:
                return output
        raise AssertionError("unreachable: a generation request ends with a finished output")

    async def encode(
        self,
        prompt_token_ids: list[int],
        params: PoolingParams,
        request_id: str,
        token_type_ids: list[int] | None = None,
        start_offset: int = 0,
    ) -> PoolingRequestOutput:
        """`encode_request` of the request processed here."""
        options = {"token_type_ids": token_type_ids, "start_offset": start_offset}
        return await self.encode_request(self.process(prompt_token_ids, params, request_id, **options))

    async def encode_request(self, request: EngineRequest) -> PoolingRequestOutput:
        """The processed request's pooled output."""
        engine = self._engine_for(PoolingEngine, "pooling")
        add = functools.partial(engine.add_engine_request, request)
        async for output in self._results(request.request_id, add, lambda output: True):
            return output
        raise AssertionError("unreachable: a pooling request yields exactly one output")

    def stats(self) -> EngineStats:
        """The engine's load; requests handed in but not yet picked up by the loop count as waiting."""
        stats = self.engine.stats()
        with self._lock:
            num_open = len(self._streams)
        return dataclasses.replace(stats, num_requests_waiting=max(0, num_open - stats.num_requests_running))

    def replica_stats(self) -> dict[str, EngineStats]:
        """The load by engine, as `/metrics` labels it: this one engine is "0" (see data_parallel.py)."""
        return {"0": self.stats()}

    def prepare(self, prompt: str | list[int], **options) -> PoolingPrompt:
        """A pooling input from a text (or text pair, `text_pair=`) or token ids: `PoolingEngine.prepare`."""
        return self._engine_for(PoolingEngine, "pooling").prepare(prompt, **options)

    def plan_scores(
        self, pairs: list[tuple[str, str]], truncate_prompt_tokens: int | None = None, instruction: str | None = None
    ) -> ScorePlan:
        return plan_scores(self._engine_for(PoolingEngine, "pooling"), pairs, truncate_prompt_tokens, instruction)

    def reset_prefix_cache(self) -> None:
        """Empty the engine's prefix cache, between two steps (an engine without a KV cache has none)."""
        self._commands.put(("reset_prefix_cache", None, None))

    def abort(self, request_id: str) -> None:
        self._commands.put(("abort", request_id, None))

    def shutdown(self) -> None:
        """Stop the loop and leave the engine holding nothing of ours: the aborts queued while the loop took its
        last step, and the requests whose callers never closed their streams, are aborted here (the engine may
        be driven by someone else afterwards)."""
        self._stopping = True
        self._commands.put(("stop", None, None))
        self._thread.join(timeout=None if self.error is None else 5)  # a dead engine's loop may never return
        if not self._thread.is_alive():
            self._drain(block=False)
            with self._lock:
                orphans = list(self._streams)
            for request_id in orphans:
                self.engine.abort_request(request_id)
        self.engine.shutdown()

    def _engine_for(self, kind: type, what: str):
        if self.error is not None:
            raise EngineDeadError("The engine loop has died.") from self.error
        if not isinstance(self.engine, kind):
            raise ValueError(f"This model does not support {what}.")
        return self.engine

    async def _results(self, request_id: str, add: Callable[[], None], done: Callable[[Any], bool]) -> AsyncIterator:
        """What the engine thread sends for the request, until `done(item)`; a caller that stops reading before
        then aborts the request."""
        stream: asyncio.Queue = asyncio.Queue()
        with self._lock:
            if request_id in self._streams:
                raise ValueError(f"Request id {request_id!r} is already in use.")
            self._streams[request_id] = (asyncio.get_running_loop(), stream)
        self._commands.put(("add", request_id, add))
        finished = False
        try:
            while not finished:
                item = await stream.get()
                if isinstance(item, ValueError):
                    raise item
                if isinstance(item, BaseException):
                    raise EngineDeadError("The engine loop has died.") from item
                finished = done(item)
                yield item
        finally:
            with self._lock:
                self._streams.pop(request_id, None)
            if not finished:
                self.abort(request_id)

    def _loop(self) -> None:
        try:
            while not self._stopping:
                self._drain(block=not self._has_work())
                if self._has_work():
                    self._step()
        except BaseException as exc:  # noqa: BLE001 - any failure kills the engine, and every caller must hear of it
            logger.exception("The engine loop died")
            self.fail(exc)

    def fail(self, error: BaseException) -> None:
        """The engine is dead: every open request gets `error`, and new ones are refused. Called by the loop when a
        step raises, or from outside when the engine cannot go on (a serving process died: distributed.py),
        while the loop may be stuck in a step that will never end."""
        self.error = error
        with self._lock:
            streams = list(self._streams.values())
        for loop, stream in streams:
            loop.call_soon_threadsafe(stream.put_nowait, error)

    def _step(self) -> None:
        """One engine step; a generation engine's core outputs go to their requests, grouped per request."""
        if not isinstance(self.engine, LLMEngine):
            for output in self.engine.step():
                self._send(output.request_id, output)
            return
        grouped: dict[str, list[EngineCoreOutput]] = {}
        for core in self.engine.core_step():
            grouped.setdefault(core.request_id, []).append(core)
        for request_id, outputs in grouped.items():
            self._send(request_id, outputs)

    def _has_work(self) -> bool:
        """Steps are taken only while some caller waits for results: with no stream open, whatever the engine
        still holds is being aborted, and the engine is left to whoever else drives it (LLM, offline)."""
        with self._lock:
            waiting = bool(self._streams)
        return waiting and self.engine.has_unfinished_requests()

    def _drain(self, block: bool) -> None:
        """Carry out queued commands: wait for the first one if `block`, then take whatever else is there."""
        try:
            command = self._commands.get(block=block)
        except queue.Empty:
            return
        while True:
            kind, request_id, argument = command
            if kind == "add":
                try:
                    argument()
                except ValueError as exc:
                    self._send(request_id, exc)
            elif kind == "abort":
                self.engine.abort_request(request_id)
            elif kind == "finish":
                self.engine.finish_sequence(request_id, argument)
            elif kind == "reset_prefix_cache":
                self.engine.reset_prefix_cache()
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                return

    def _send(self, request_id: str, item: list[EngineCoreOutput] | PoolingRequestOutput | BaseException) -> None:
        with self._lock:
            target = self._streams.get(request_id)
        if target is not None:
            loop, stream = target
            loop.call_soon_threadsafe(stream.put_nowait, item)
