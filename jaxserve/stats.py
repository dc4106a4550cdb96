"""A snapshot of an engine's load, read by the server for `/metrics`, `/load` and admission control; and the
per-step count of scheduled tokens behind `vllm:iteration_tokens_total`."""

from __future__ import annotations

import bisect
import dataclasses

# vLLM's bucket bounds for `vllm:iteration_tokens_total` (tokens scheduled in one engine step)
ITERATION_TOKENS_BUCKETS = (1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384)


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
    # steps by tokens scheduled, since start: the count per bucket of ITERATION_TOKENS_BUCKETS (not cumulative),
    # the last for more than the largest bound; and the tokens of all of them
    iteration_tokens_counts: tuple[int, ...] = ()
    iteration_tokens_sum: int = 0
    # the KV cache's configuration, as labels of `vllm:cache_config_info` (vLLM's names); empty without a cache
    cache_config: tuple[tuple[str, str], ...] = ()


class IterationTokens:
    """Counts the engine's steps by how many tokens each scheduled: one bisect per step."""

    def __init__(self) -> None:
        self.counts = [0] * (len(ITERATION_TOKENS_BUCKETS) + 1)
        self.total = 0

    def observe(self, num_tokens: int) -> None:
        self.counts[bisect.bisect_left(ITERATION_TOKENS_BUCKETS, num_tokens)] += 1
        self.total += num_tokens
