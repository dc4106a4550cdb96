"""Prometheus metrics for the HTTP server's `/metrics`, named as vLLM names them (`vllm:` prefix).

Every series carries the labels `model_name` (the served model's first name) and `engine`: the replica of a
data-parallel model (`--data-parallel-size`) for the engine-level series, "0" for the request-level ones. Each
`ServerMetrics` owns a private `CollectorRegistry`, so several apps (or tests) in one process never clash.

Request-level metrics (token counters, latency and length histograms, the `n` and `max_tokens` parameters, and
from the engine's timeline of each finished request its queue, inference, prefill and decode times and its
preemptions) are recorded by the server through a `RequestMetrics` per request. Engine-level metrics
(running/waiting requests, waiting by reason, KV-cache usage and configuration, preemptions, prefix-cache queries
and hits, steps by tokens scheduled, compiles after warm-up, start-up times and compiled buckets) are read from the
engines' `EngineStats` when the registry is scraped. `jaxserve:startup_seconds` is set once the server answers.

Never imports jax: only the standard library, prometheus_client and the plain-data `jaxserve.stats`.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Mapping
from typing import TYPE_CHECKING

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from jaxserve.stats import ITERATION_TOKENS_BUCKETS

if TYPE_CHECKING:
    from jaxserve.outputs import RequestStateStats
    from jaxserve.stats import EngineStats

__all__ = ["ServerMetrics", "RequestMetrics"]

ENGINE = "0"
LABELS = ("model_name", "engine")

# bucket boundaries as vLLM uses them
TTFT_BUCKETS = (
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0,
    160.0, 640.0, 2560.0,
)  # fmt: skip
ITL_BUCKETS = (
    0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0,
)  # fmt: skip
E2E_BUCKETS = (
    0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0, 480.0, 960.0,
    1920.0, 7680.0,
)  # fmt: skip
TOKEN_BUCKETS = (
    1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 20000, 50000, 100000,
)  # fmt: skip
N_BUCKETS = (1, 2, 5, 10, 20)
PREEMPTION_BUCKETS = (1, 2, 3, 4, 5, 10, 20)

STARTUP_GAUGES = {
    "jaxserve:startup_load_seconds": "Seconds the engine took to build the model and load its weights.",
    "jaxserve:startup_compile_seconds": "Seconds the engine took to compile the buckets it needs before serving.",
    "jaxserve:buckets_compiled": "Compiled bucket programs; the rest compile in the background.",
    "jaxserve:buckets_total": "Bucket programs the engine compiles in all.",
}

# finish reasons whose `request_success` series exist (at 0) as soon as a model has served a request
COMMON_FINISH_REASONS = ("stop", "length", "abort")


class _EngineStatsCollector(Collector):
    """Reads `engine_stats()` at scrape time and exposes it as gauges and counters, one series per model and engine
    (a data-parallel model's replicas are engines "0", "1", ...)."""

    def __init__(self, engine_stats: Callable[[], Mapping[str, Mapping[str, EngineStats]]]):
        self._engine_stats = engine_stats

    def collect(self) -> Iterator[Metric]:
        running = GaugeMetricFamily(
            "vllm:num_requests_running", "Number of requests in model execution batches.", labels=LABELS
        )
        waiting = GaugeMetricFamily(
            "vllm:num_requests_waiting", "Number of requests waiting to be processed.", labels=LABELS
        )
        waiting_by_reason = GaugeMetricFamily(
            "vllm:num_requests_waiting_by_reason",
            "Number of waiting requests by reason. Reason labels: 'capacity' = waiting for scheduling capacity; "
            "'deferred' = deferred by transient constraints. Sum of all reasons equals vllm:num_requests_waiting.",
            labels=(*LABELS, "reason"),
        )
        cache_config = Metric("vllm:cache_config_info", "Information of the LLMEngine CacheConfig", "gauge")
        iteration_tokens = HistogramMetricFamily(
            "vllm:iteration_tokens_total", "Histogram of number of tokens per engine_step.", labels=LABELS
        )
        kv_usage = GaugeMetricFamily(
            "vllm:kv_cache_usage_perc", "KV-cache usage. 1 means 100 percent usage.", labels=LABELS
        )
        preemptions = CounterMetricFamily(
            "vllm:num_preemptions", "Cumulative number of preemptions from the engine.", labels=LABELS
        )
        cache_queries = CounterMetricFamily(
            "vllm:prefix_cache_queries", "Prefix cache queries, in terms of number of queried tokens.", labels=LABELS
        )
        cache_hits = CounterMetricFamily(
            "vllm:prefix_cache_hits", "Prefix cache hits, in terms of number of cached tokens.", labels=LABELS
        )
        compiles = CounterMetricFamily(
            "jaxserve:compiles_after_warmup",
            "JAX compiles inside engine steps after warm-up; should stay 0.",
            labels=LABELS,
        )
        startup = {
            name: GaugeMetricFamily(name, text, labels=LABELS)
            for name, text in STARTUP_GAUGES.items()
        }  # fmt: skip
        for model_name, replicas in self._engine_stats().items():
            for engine, stats in replicas.items():
                labels = [model_name, engine]
                running.add_metric(labels, stats.num_requests_running)
                waiting.add_metric(labels, stats.num_requests_waiting)
                # jaxserve has none of the transient constraints (LoRA budget, KV transfer) that defer a request in
                # vLLM: every waiting request waits for capacity
                waiting_by_reason.add_metric([*labels, "capacity"], stats.num_requests_waiting)
                waiting_by_reason.add_metric([*labels, "deferred"], 0)
                if stats.cache_config:
                    cache_config.add_sample(
                        "vllm:cache_config_info",
                        {"model_name": model_name, "engine": engine, **dict(stats.cache_config)},
                        1,
                    )
                if stats.iteration_tokens_counts:
                    iteration_tokens.add_metric(
                        labels, _cumulative(stats.iteration_tokens_counts), stats.iteration_tokens_sum
                    )
                kv_usage.add_metric(labels, stats.kv_cache_usage)
                preemptions.add_metric(labels, stats.num_preemptions)
                cache_queries.add_metric(labels, stats.prefix_cache_queries)
                cache_hits.add_metric(labels, stats.prefix_cache_hits)
                compiles.add_metric(labels, stats.compiles_after_warmup)
                startup["jaxserve:startup_load_seconds"].add_metric(labels, stats.load_seconds)
                startup["jaxserve:startup_compile_seconds"].add_metric(labels, stats.compile_seconds)
                startup["jaxserve:buckets_compiled"].add_metric(labels, stats.buckets_compiled)
                startup["jaxserve:buckets_total"].add_metric(labels, stats.buckets_total)
        yield from (
            running, waiting, waiting_by_reason, kv_usage, cache_config, preemptions, cache_queries, cache_hits,
            iteration_tokens, compiles, *startup.values(),
        )  # fmt: skip

    def describe(self) -> list[Metric]:
        # the names this collector owns, without calling engine_stats() at registration time
        return [
            GaugeMetricFamily("vllm:num_requests_running", ""),
            GaugeMetricFamily("vllm:num_requests_waiting", ""),
            GaugeMetricFamily("vllm:num_requests_waiting_by_reason", ""),
            GaugeMetricFamily("vllm:kv_cache_usage_perc", ""),
            GaugeMetricFamily("vllm:cache_config_info", ""),
            HistogramMetricFamily("vllm:iteration_tokens_total", ""),
            CounterMetricFamily("vllm:num_preemptions", ""),
            CounterMetricFamily("vllm:prefix_cache_queries", ""),
            CounterMetricFamily("vllm:prefix_cache_hits", ""),
            CounterMetricFamily("jaxserve:compiles_after_warmup", ""),
            *(GaugeMetricFamily(name, "") for name in STARTUP_GAUGES),
        ]


def _cumulative(counts: tuple[int, ...]) -> list[tuple[str, int]]:
    """Per-bucket step counts (the last past the largest bound) as a histogram's cumulative `le` buckets."""
    buckets, total = [], 0
    for bound, count in zip((*map(float, ITERATION_TOKENS_BUCKETS), float("inf")), counts):
        total += count
        buckets.append(("+Inf" if bound == float("inf") else str(bound), total))
    return buckets


class ServerMetrics:
    """The server's metrics in a private registry.

    `engine_stats()` returns served model name -> engine ("0", or a replica's index) -> `EngineStats`; it is called
    on every scrape. `clock` gives the
    time in seconds for latencies (monotonic; injectable for tests).
    """

    def __init__(
        self,
        engine_stats: Callable[[], Mapping[str, Mapping[str, EngineStats]]],
        clock: Callable[[], float] = time.monotonic,
    ):
        self.clock = clock
        self.registry = CollectorRegistry()
        self.registry.register(_EngineStatsCollector(engine_stats))
        reg = self.registry
        self.prompt_tokens = Counter("vllm:prompt_tokens", "Number of prefill tokens processed.", LABELS, registry=reg)
        self.generation_tokens = Counter(
            "vllm:generation_tokens", "Number of generation tokens processed.", LABELS, registry=reg
        )
        self.request_success = Counter(
            "vllm:request_success",
            "Count of successfully processed requests.",
            (*LABELS, "finished_reason"),
            registry=reg,
        )
        self.time_to_first_token = Histogram(
            "vllm:time_to_first_token_seconds",
            "Histogram of time to first token in seconds.",
            LABELS,
            buckets=TTFT_BUCKETS,
            registry=reg,
        )
        self.inter_token_latency = Histogram(
            "vllm:inter_token_latency_seconds",
            "Histogram of inter-token latency in seconds.",
            LABELS,
            buckets=ITL_BUCKETS,
            registry=reg,
        )
        self.e2e_request_latency = Histogram(
            "vllm:e2e_request_latency_seconds",
            "Histogram of end to end request latency in seconds.",
            LABELS,
            buckets=E2E_BUCKETS,
            registry=reg,
        )
        self.request_prompt_tokens = Histogram(
            "vllm:request_prompt_tokens",
            "Number of prefill tokens processed.",
            LABELS,
            buckets=TOKEN_BUCKETS,
            registry=reg,
        )
        self.request_generation_tokens = Histogram(
            "vllm:request_generation_tokens",
            "Number of generation tokens processed.",
            LABELS,
            buckets=TOKEN_BUCKETS,
            registry=reg,
        )
        self.request_params_n = Histogram(
            "vllm:request_params_n", "Histogram of the n request parameter.", LABELS, buckets=N_BUCKETS, registry=reg
        )
        self.request_params_max_tokens = Histogram(
            "vllm:request_params_max_tokens",
            "Histogram of the max_tokens request parameter.",
            LABELS,
            buckets=TOKEN_BUCKETS,
            registry=reg,
        )
        phases = {
            "queue": "WAITING",
            "inference": "RUNNING",
            "prefill": "PREFILL",
            "decode": "DECODE",
        }
        self.request_phase_time = {
            phase: Histogram(
                f"vllm:request_{phase}_time_seconds",
                f"Histogram of time spent in {state} phase for request.",
                LABELS,
                buckets=E2E_BUCKETS,
                registry=reg,
            )
            for phase, state in phases.items()
        }
        self.request_num_preemptions = Histogram(
            "vllm:request_num_preemptions",
            "Histogram of the number of preemptions per finished request.",
            LABELS,
            buckets=PREEMPTION_BUCKETS,
            registry=reg,
        )
        self.startup_seconds = Gauge(
            "jaxserve:startup_seconds",
            "Seconds from launching the server until it answered (loading, compiling, starting up).",
            registry=reg,
        )
        self._models: set[str] = set()

    def _ensure_model(self, model_name: str) -> None:
        """Create a model's series at 0 on its first request, so they are exposed before anything is counted."""
        if model_name in self._models:
            return
        self._models.add(model_name)
        for metric in (
            self.prompt_tokens,
            self.generation_tokens,
            self.time_to_first_token,
            self.inter_token_latency,
            self.e2e_request_latency,
            self.request_prompt_tokens,
            self.request_generation_tokens,
            self.request_params_n,
            self.request_params_max_tokens,
            *self.request_phase_time.values(),
            self.request_num_preemptions,
        ):
            metric.labels(model_name, ENGINE)
        for reason in COMMON_FINISH_REASONS:
            self.request_success.labels(model_name, ENGINE, reason)

    def start_request(
        self, model_name: str, prompt_tokens: int, *, n: int | None = None, max_tokens: int | None = None
    ) -> RequestMetrics:
        """Start timing a request that arrives now, for `model_name`, with `prompt_tokens` prompt tokens; a
        generation request's `n` and `max_tokens` (the output cap it runs under) are observed when it finishes."""
        self._ensure_model(model_name)
        return RequestMetrics(self, model_name, prompt_tokens, self.clock(), n, max_tokens)

    def render(self) -> tuple[bytes, str]:
        """The Prometheus text exposition of all metrics, and its content type."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


class RequestMetrics:
    """The metrics of one request, from `ServerMetrics.start_request` to `finish`."""

    def __init__(
        self,
        metrics: ServerMetrics,
        model_name: str,
        prompt_tokens: int,
        arrival_time: float,
        n: int | None = None,
        max_tokens: int | None = None,
    ):
        self._metrics = metrics
        self.model_name = model_name
        self.prompt_tokens = prompt_tokens
        self.n = n
        self.max_tokens = max_tokens
        self.generation_tokens = 0
        self.arrival_time = arrival_time
        self._last_token_time: float | None = None
        self.finished = False

    def tokens_generated(self, count: int) -> None:
        """New output tokens arrived: the first call observes the time to first token, each later call observes
        one inter-token latency (the gap since the previous call). Ignored after `finish` or for `count <= 0`."""
        if self.finished or count <= 0:
            return
        m = self._metrics
        now = m.clock()
        if self._last_token_time is None:
            m.time_to_first_token.labels(self.model_name, ENGINE).observe(now - self.arrival_time)
        else:
            m.inter_token_latency.labels(self.model_name, ENGINE).observe(now - self._last_token_time)
        self._last_token_time = now
        self.generation_tokens += count

    def engine_finished(self, stats: RequestStateStats, pooling: bool = False) -> None:
        """An engine request of this request finished with the engine's timeline `stats`: observe its queue and
        inference times and its preemptions, and for generation its prefill and decode times (phases a timeline
        that lacks a stamp is not observed in). Ignored after `finish`."""
        if self.finished:
            return
        m = self._metrics
        labels = (self.model_name, ENGINE)
        times = {"queue": stats.queue_time, "inference": stats.inference_time}
        if not pooling:
            times |= {"prefill": stats.prefill_time, "decode": stats.decode_time}
        for phase, seconds in times.items():
            if seconds is not None:
                m.request_phase_time[phase].labels(*labels).observe(max(0.0, seconds))
        m.request_num_preemptions.labels(*labels).observe(stats.num_preemptions)

    def finish(self, finish_reason: str) -> None:
        """The request ended (`stop`, `length`, `abort`, `error`, ...): record its totals. Later calls do nothing."""
        if self.finished:
            return
        self.finished = True
        m = self._metrics
        labels = (self.model_name, ENGINE)
        m.e2e_request_latency.labels(*labels).observe(m.clock() - self.arrival_time)
        m.request_success.labels(*labels, str(finish_reason)).inc()
        m.prompt_tokens.labels(*labels).inc(self.prompt_tokens)
        m.generation_tokens.labels(*labels).inc(self.generation_tokens)
        m.request_prompt_tokens.labels(*labels).observe(self.prompt_tokens)
        m.request_generation_tokens.labels(*labels).observe(self.generation_tokens)
        if self.n is not None:
            m.request_params_n.labels(*labels).observe(self.n)
        if self.max_tokens:
            m.request_params_max_tokens.labels(*labels).observe(self.max_tokens)
