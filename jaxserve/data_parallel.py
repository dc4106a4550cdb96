"""Data parallelism (`--data-parallel-size M`): M engine replicas in one server process, each over its own group of
`--tensor-parallel-size` devices, behind the interface the server already talks to (`AsyncEngine`'s).

Each request goes to the replica with the least outstanding work: its open requests, less the share of the
request's prompt its prefix cache already holds (a prompt wholly cached there counts as one request less), so
that requests sharing a prefix (a system prompt, a conversation's earlier turns) tend to meet the pages they can
reuse, unless that replica is busier. Everything that runs on the host alone (validation, tokenization, score
plans) is the first replica's; a beam search runs on one replica, where its beams share their prefix pages.
"""

from __future__ import annotations

import contextlib
import dataclasses
import threading
from collections.abc import AsyncIterator, Iterator
from typing import Any

from .async_engine import AsyncEngine
from .config import EngineConfig
from .engine_core import EngineCore
from .kv_pages import page_hashes
from .outputs import PoolingRequestOutput, RequestOutput
from .request import EngineRequest
from .stats import EngineStats


def replica_configs(config: EngineConfig) -> list[EngineConfig]:
    """The engine config of each replica: replica i on devices i * tp .. (i + 1) * tp - 1."""
    tp, dp = config.tensor_parallel_size, config.data_parallel_size
    return [
        dataclasses.replace(config, data_parallel_size=1, device_ids=tuple(range(i * tp, (i + 1) * tp)))
        for i in range(dp)
    ]


def create_serving_engine(config: EngineConfig) -> AsyncEngine | DataParallelEngine:
    """What the server runs for one model: its engine, or its `data_parallel_size` replicas, built one after the
    other (the later ones load their programs from the compile cache the first filled)."""
    from .llm import create_engine

    if config.data_parallel_size == 1:
        return AsyncEngine(create_engine(config))
    return DataParallelEngine([AsyncEngine(create_engine(replica)) for replica in replica_configs(config)])


class DataParallelEngine:
    """Replicas of one model as one engine. `outstanding[i]` counts the requests replica i is serving."""

    def __init__(self, replicas: list[AsyncEngine]):
        if not replicas:
            raise ValueError("A data-parallel engine needs at least one replica.")
        self.replicas = replicas
        self.outstanding = [0] * len(replicas)
        self._lock = threading.Lock()

    @property
    def engine(self) -> EngineCore:
        """The first replica's engine core: what the server reads of the model (all replicas load the same)."""
        return self.replicas[0].engine

    @property
    def tokenizer(self):
        return self.replicas[0].tokenizer

    @property
    def runner(self) -> str:
        return self.replicas[0].runner

    @property
    def errored(self) -> bool:
        """Any replica dead makes the model unhealthy (its requests would fail)."""
        return any(replica.errored for replica in self.replicas)

    def process(self, *args: Any, **options: Any) -> EngineRequest:
        return self.replicas[0].process(*args, **options)

    def prepare(self, *args: Any, **options: Any):
        return self.replicas[0].prepare(*args, **options)

    def plan_scores(self, *args: Any, **options: Any):
        return self.replicas[0].plan_scores(*args, **options)

    def choose(self, request: EngineRequest) -> int:
        """The replica with the least outstanding work for `request` (see the module docstring)."""
        with self._lock:
            load = list(self.outstanding)
        cached = self.cached_fractions(request)
        return min(range(len(load)), key=lambda i: load[i] - cached[i])

    def cached_fractions(self, request: EngineRequest) -> list[float]:
        """How much of the prompt each replica's prefix cache holds now (a hint: engine threads may change it);
        the prompt's page hashes are computed once, every replica having the same page size."""
        pools = [getattr(replica.engine, "page_pool", None) for replica in self.replicas]
        if not request.prompt_token_ids or not any(pool is not None and pool.enable_caching for pool in pools):
            return [0.0] * len(pools)
        page_size = next(pool.page_size for pool in pools if pool is not None)
        hashes = page_hashes(request.prompt_token_ids, page_size, request.cache_salt, [])
        return [
            len(pool.lookup(hashes)) * page_size / len(request.prompt_token_ids)
            if pool is not None and pool.enable_caching
            else 0.0
            for pool in pools
        ]

    @contextlib.contextmanager
    def _serving(self, request: EngineRequest) -> Iterator[AsyncEngine]:
        index = self.choose(request)
        with self._lock:
            self.outstanding[index] += 1
        try:
            yield self.replicas[index]
        finally:
            with self._lock:
                self.outstanding[index] -= 1

    async def generate_request(self, request: EngineRequest) -> AsyncIterator[RequestOutput]:
        with self._serving(request) as replica:
            async for output in replica.generate_request(request):
                yield output

    async def generate(
        self, prompt_token_ids: list[int], params, request_id: str, prompt: str | None = None, **options
    ) -> AsyncIterator[RequestOutput]:
        request = self.process(prompt_token_ids, params, request_id, prompt, **options)
        async for output in self.generate_request(request):
            yield output

    async def beam_search(self, request: EngineRequest, skip_special_tokens: bool = True) -> RequestOutput:
        with self._serving(request) as replica:
            return await replica.beam_search(request, skip_special_tokens)

    async def encode_request(self, request: EngineRequest) -> PoolingRequestOutput:
        with self._serving(request) as replica:
            return await replica.encode_request(request)

    async def encode(self, prompt_token_ids: list[int], params, request_id: str, **options) -> PoolingRequestOutput:
        return await self.encode_request(self.process(prompt_token_ids, params, request_id, **options))

    def stats(self) -> EngineStats:
        """The replicas' load added up (admission control sees the model as a whole)."""
        each = [replica.stats() for replica in self.replicas]
        total = each[0]
        for stats in each[1:]:
            total = dataclasses.replace(
                total,
                num_requests_running=total.num_requests_running + stats.num_requests_running,
                num_requests_waiting=total.num_requests_waiting + stats.num_requests_waiting,
                max_num_seqs=total.max_num_seqs + stats.max_num_seqs,
                kv_cache_usage=(total.kv_cache_usage + stats.kv_cache_usage),
                num_preemptions=total.num_preemptions + stats.num_preemptions,
                compiles_after_warmup=total.compiles_after_warmup + stats.compiles_after_warmup,
                prefix_cache_queries=total.prefix_cache_queries + stats.prefix_cache_queries,
                prefix_cache_hits=total.prefix_cache_hits + stats.prefix_cache_hits,
            )
        return dataclasses.replace(total, kv_cache_usage=total.kv_cache_usage / len(each))

    def replica_stats(self) -> dict[str, EngineStats]:
        """Each replica's load, by its index (the `engine` label of `/metrics`)."""
        return {str(i): replica.stats() for i, replica in enumerate(self.replicas)}

    def fail(self, error: BaseException) -> None:
        for replica in self.replicas:
            replica.fail(error)

    @property
    def runners(self) -> list:
        """Each replica's model runner, in order."""
        return [replica.engine.runner for replica in self.replicas]

    def reset_prefix_cache(self) -> None:
        for replica in self.replicas:
            replica.reset_prefix_cache()

    def shutdown(self) -> None:
        for replica in self.replicas:
            replica.shutdown()
