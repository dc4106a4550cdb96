"""A snapshot of an engine's load, read by the server for `/metrics`, `/load` and admission control."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class EngineStats:
    num_requests_running: int  # requests with a sequence scheduled to run
    num_requests_waiting: int  # requests accepted but not yet running
    kv_cache_usage: float  # fraction of KV pages in use, 0..1 (0 for pooling engines, which have no cache)
    num_preemptions: int  # sequences preempted for lack of pages, since start
    compiles_after_warmup: int  # JAX traces or compiles inside steps, since start (should stay 0)
    max_num_seqs: int = 0  # sequences the engine runs at once: more requests than this wait for capacity
    prefix_cache_queries: int = 0  # prompt tokens looked up in the prefix cache, since start
    prefix_cache_hits: int = 0  # of those, tokens found cached (not computed)
    load_seconds: float = 0.0  # start-up: building the model and loading its weights
    compile_seconds: float = 0.0  # start-up: compiling the buckets needed before the first step
    buckets_compiled: int = 0  # compiled programs so far (the rest compile in the background)
    buckets_total: int = 0
