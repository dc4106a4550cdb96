"""The server's Prometheus metrics (`jaxserve.server.metrics`), driven with a fake clock and fake engine stats."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from prometheus_client import CONTENT_TYPE_LATEST
from prometheus_client.parser import text_string_to_metric_families

from jaxserve.server.metrics import ServerMetrics
from jaxserve.stats import EngineStats


class FakeClock:
    def __init__(self, t: float = 1000.0):
        self.t = t

    def __call__(self) -> float:
        return self.t

    def advance(self, dt: float) -> None:
        self.t += dt


def scrape(metrics: ServerMetrics) -> tuple[dict[str, str], dict[tuple[str, frozenset], float]]:
    """Render and parse: (family name -> type, (sample name, labels) -> value)."""
    body, content_type = metrics.render()
    assert content_type == CONTENT_TYPE_LATEST
    assert isinstance(body, bytes)
    types: dict[str, str] = {}
    samples: dict[tuple[str, frozenset], float] = {}
    for family in text_string_to_metric_families(body.decode()):
        types[family.name] = family.type
        for s in family.samples:
            key = (s.name, frozenset(s.labels.items()))
            assert key not in samples, f"duplicate sample {key}"
            samples[key] = s.value
    return types, samples


def lab(model: str, **extra: str) -> frozenset:
    return frozenset({"model_name": model, "engine": "0", **extra}.items())


STATS = {
    "llama": EngineStats(
        num_requests_running=3, num_requests_waiting=5, kv_cache_usage=0.25, num_preemptions=7, compiles_after_warmup=0
    ),
    "bert": EngineStats(
        num_requests_running=1, num_requests_waiting=0, kv_cache_usage=0.0, num_preemptions=0, compiles_after_warmup=2
    ),
}


def by_engine(stats: dict) -> dict:
    """Each model's stats as its one engine's, "0" (what an engine that is not data-parallel reports)."""
    return {model: {"0": st} for model, st in stats.items()}


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def metrics(clock: FakeClock) -> ServerMetrics:
    return ServerMetrics(lambda: by_engine(STATS), clock=clock)


def test_engine_stats_read_at_scrape_time(clock: FakeClock):
    current = dict(STATS)
    calls = []

    def engine_stats():
        calls.append(1)
        return by_engine(current)

    metrics = ServerMetrics(engine_stats, clock=clock)
    assert not calls  # nothing read before a scrape
    types, samples = scrape(metrics)
    assert len(calls) == 1
    assert types["vllm:num_requests_running"] == "gauge"
    assert types["vllm:num_requests_waiting"] == "gauge"
    assert types["vllm:kv_cache_usage_perc"] == "gauge"
    assert types["vllm:num_preemptions"] == "counter"
    assert types["jaxserve:compiles_after_warmup"] == "counter"
    for model, stats in STATS.items():
        assert samples["vllm:num_requests_running", lab(model)] == stats.num_requests_running
        assert samples["vllm:num_requests_waiting", lab(model)] == stats.num_requests_waiting
        assert samples["vllm:kv_cache_usage_perc", lab(model)] == stats.kv_cache_usage
        assert samples["vllm:num_preemptions_total", lab(model)] == stats.num_preemptions
        assert samples["jaxserve:compiles_after_warmup_total", lab(model)] == stats.compiles_after_warmup

    current["llama"] = EngineStats(0, 0, 0.75, 9, 1)
    _, samples = scrape(metrics)
    assert samples["vllm:kv_cache_usage_perc", lab("llama")] == 0.75
    assert samples["vllm:num_preemptions_total", lab("llama")] == 9
    assert samples["jaxserve:compiles_after_warmup_total", lab("llama")] == 1
    assert samples["vllm:num_requests_running", lab("bert")] == 1


def test_data_parallel_replicas_are_engines(clock: FakeClock):
    replicas = {"0": STATS["llama"], "1": STATS["bert"]}
    _, samples = scrape(ServerMetrics(lambda: {"llama": replicas}, clock=clock))
    for engine, stats in replicas.items():
        labels = frozenset({"model_name": "llama", "engine": engine}.items())
        assert samples["vllm:num_requests_running", labels] == stats.num_requests_running
        assert samples["vllm:kv_cache_usage_perc", labels] == stats.kv_cache_usage


def test_help_text(metrics: ServerMetrics):
    body, _ = metrics.render()
    assert "JAX compiles inside engine steps after warm-up; should stay 0" in body.decode()


def test_no_engines(clock: FakeClock):
    types, samples = scrape(ServerMetrics(dict, clock=clock))
    assert "vllm:num_requests_running" in types  # the family is there, without series
    assert not any(name == "vllm:num_requests_running" for name, _ in samples)


def test_request_metrics(metrics: ServerMetrics, clock: FakeClock):
    # llama request 1: TTFT 0.5, then gaps 0.02 and 0.03 (two inter-token latencies), e2e 0.6, 1+4+2 tokens
    r1 = metrics.start_request("llama", prompt_tokens=12)
    clock.advance(0.5)
    r1.tokens_generated(1)
    clock.advance(0.02)
    r1.tokens_generated(4)
    clock.advance(0.03)
    r1.tokens_generated(2)
    clock.advance(0.05)
    r1.finish("stop")

    # llama request 2, overlapping with nothing: TTFT 2.0, no second step, e2e 2.0, hits max_tokens
    r2 = metrics.start_request("llama", prompt_tokens=300)
    clock.advance(2.0)
    r2.tokens_generated(16)
    r2.finish("length")

    # bert request, aborted before any token: no TTFT, e2e 1.5
    r3 = metrics.start_request("bert", prompt_tokens=8)
    clock.advance(1.5)
    r3.finish("abort")

    types, s = scrape(metrics)
    assert types["vllm:prompt_tokens"] == "counter"
    assert types["vllm:generation_tokens"] == "counter"
    assert types["vllm:request_success"] == "counter"
    for name in (
        "vllm:time_to_first_token_seconds",
        "vllm:inter_token_latency_seconds",
        "vllm:e2e_request_latency_seconds",
        "vllm:request_prompt_tokens",
        "vllm:request_generation_tokens",
    ):
        assert types[name] == "histogram"

    llama, bert = lab("llama"), lab("bert")
    assert s["vllm:prompt_tokens_total", llama] == 312
    assert s["vllm:generation_tokens_total", llama] == 23
    assert s["vllm:prompt_tokens_total", bert] == 8
    assert s["vllm:generation_tokens_total", bert] == 0
    assert s["vllm:request_success_total", lab("llama", finished_reason="stop")] == 1
    assert s["vllm:request_success_total", lab("llama", finished_reason="length")] == 1
    assert s["vllm:request_success_total", lab("llama", finished_reason="abort")] == 0
    assert s["vllm:request_success_total", lab("bert", finished_reason="abort")] == 1
    assert s["vllm:request_success_total", lab("bert", finished_reason="stop")] == 0

    assert s["vllm:time_to_first_token_seconds_count", llama] == 2
    assert s["vllm:time_to_first_token_seconds_sum", llama] == pytest.approx(2.5)
    assert s["vllm:time_to_first_token_seconds_bucket", lab("llama", le="0.5")] == 1
    assert s["vllm:time_to_first_token_seconds_bucket", lab("llama", le="0.25")] == 0
    assert s["vllm:time_to_first_token_seconds_bucket", lab("llama", le="2.5")] == 2
    assert s["vllm:time_to_first_token_seconds_bucket", lab("llama", le="+Inf")] == 2
    assert s["vllm:time_to_first_token_seconds_count", bert] == 0

    assert s["vllm:inter_token_latency_seconds_count", llama] == 2
    assert s["vllm:inter_token_latency_seconds_sum", llama] == pytest.approx(0.05)
    assert s["vllm:inter_token_latency_seconds_bucket", lab("llama", le="0.025")] == 1
    assert s["vllm:inter_token_latency_seconds_bucket", lab("llama", le="0.05")] == 2
    assert s["vllm:inter_token_latency_seconds_count", bert] == 0

    assert s["vllm:e2e_request_latency_seconds_count", llama] == 2
    assert s["vllm:e2e_request_latency_seconds_sum", llama] == pytest.approx(2.6)
    assert s["vllm:e2e_request_latency_seconds_bucket", lab("llama", le="0.8")] == 1
    assert s["vllm:e2e_request_latency_seconds_bucket", lab("llama", le="0.5")] == 0
    assert s["vllm:e2e_request_latency_seconds_count", bert] == 1
    assert s["vllm:e2e_request_latency_seconds_sum", bert] == pytest.approx(1.5)

    assert s["vllm:request_prompt_tokens_count", llama] == 2
    assert s["vllm:request_prompt_tokens_sum", llama] == 312
    assert s["vllm:request_prompt_tokens_bucket", lab("llama", le="20.0")] == 1
    assert s["vllm:request_prompt_tokens_bucket", lab("llama", le="500.0")] == 2
    assert s["vllm:request_generation_tokens_count", llama] == 2
    assert s["vllm:request_generation_tokens_sum", llama] == 23
    assert s["vllm:request_generation_tokens_bucket", lab("llama", le="10.0")] == 1
    assert s["vllm:request_generation_tokens_bucket", lab("llama", le="20.0")] == 2
    assert s["vllm:request_generation_tokens_count", bert] == 1
    assert s["vllm:request_generation_tokens_sum", bert] == 0

    # the engine gauges still come from engine_stats alongside
    assert s["vllm:num_requests_waiting", llama] == 5


def test_histogram_buckets(metrics: ServerMetrics):
    metrics.start_request("llama", 1)
    _, s = scrape(metrics)

    def bounds(name: str) -> list[float]:
        return sorted(float(dict(labels)["le"]) for n, labels in s if n == name + "_bucket")

    inf = float("inf")
    assert bounds("vllm:time_to_first_token_seconds") == [
        0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1, 2.5, 5, 7.5, 10, 20, 40, 80, 160, 640,
        2560, inf,
    ]  # fmt: skip
    assert bounds("vllm:inter_token_latency_seconds") == [
        0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1, 2.5, 5, 7.5, 10, 20, 40, 80, inf,
    ]  # fmt: skip
    assert bounds("vllm:e2e_request_latency_seconds") == [
        0.3, 0.5, 0.8, 1, 1.5, 2, 2.5, 5, 10, 15, 20, 30, 40, 50, 60, 120, 240, 480, 960, 1920, 7680, inf,
    ]  # fmt: skip
    tokens = [1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 20000, 50000, 100000, inf]
    assert bounds("vllm:request_prompt_tokens") == tokens
    assert bounds("vllm:request_generation_tokens") == tokens


def test_series_exist_after_first_request(metrics: ServerMetrics):
    _, s = scrape(metrics)
    assert ("vllm:prompt_tokens_total", lab("llama")) not in s
    metrics.start_request("llama", 4)  # not finished yet
    _, s = scrape(metrics)
    assert s["vllm:prompt_tokens_total", lab("llama")] == 0
    assert s["vllm:generation_tokens_total", lab("llama")] == 0
    assert s["vllm:time_to_first_token_seconds_count", lab("llama")] == 0
    for reason in ("stop", "length", "abort"):
        assert s["vllm:request_success_total", lab("llama", finished_reason=reason)] == 0


def test_finish_is_idempotent(metrics: ServerMetrics, clock: FakeClock):
    r = metrics.start_request("llama", prompt_tokens=3)
    clock.advance(0.1)
    r.tokens_generated(2)
    clock.advance(0.2)
    r.finish("stop")
    assert r.finished
    clock.advance(5.0)
    r.finish("stop")
    r.finish("error")
    r.tokens_generated(10)  # ignored after finish
    _, s = scrape(metrics)
    assert s["vllm:request_success_total", lab("llama", finished_reason="stop")] == 1
    assert ("vllm:request_success_total", lab("llama", finished_reason="error")) not in s
    assert s["vllm:prompt_tokens_total", lab("llama")] == 3
    assert s["vllm:generation_tokens_total", lab("llama")] == 2
    assert s["vllm:e2e_request_latency_seconds_count", lab("llama")] == 1
    assert s["vllm:e2e_request_latency_seconds_sum", lab("llama")] == pytest.approx(0.3)
    assert s["vllm:time_to_first_token_seconds_count", lab("llama")] == 1
    assert s["vllm:inter_token_latency_seconds_count", lab("llama")] == 0
    assert s["vllm:request_prompt_tokens_count", lab("llama")] == 1


def test_other_finish_reasons_and_zero_counts(metrics: ServerMetrics, clock: FakeClock):
    r = metrics.start_request("bert", prompt_tokens=5)
    r.tokens_generated(0)  # nothing arrived: no TTFT
    clock.advance(0.4)
    r.finish("error")
    _, s = scrape(metrics)
    assert s["vllm:request_success_total", lab("bert", finished_reason="error")] == 1
    assert s["vllm:time_to_first_token_seconds_count", lab("bert")] == 0
    assert s["vllm:e2e_request_latency_seconds_sum", lab("bert")] == pytest.approx(0.4)


def test_instances_do_not_clash(clock: FakeClock):
    a = ServerMetrics(lambda: by_engine(STATS), clock=clock)
    b = ServerMetrics(lambda: {"other": {"0": STATS["llama"]}}, clock=clock)  # no duplicate-registration error
    a.start_request("llama", 10).finish("stop")
    _, sa = scrape(a)
    _, sb = scrape(b)
    assert sa["vllm:prompt_tokens_total", lab("llama")] == 10
    assert ("vllm:prompt_tokens_total", lab("llama")) not in sb
    assert ("vllm:num_requests_running", lab("llama")) not in sb
    assert sb["vllm:num_requests_running", lab("other")] == 3
    # and nothing landed in prometheus_client's global registry
    from prometheus_client import REGISTRY

    assert REGISTRY.get_sample_value("vllm:prompt_tokens_total", {"model_name": "llama", "engine": "0"}) is None


def test_default_clock_is_monotonic():
    m = ServerMetrics(dict)
    r = m.start_request("llama", 1)
    r.tokens_generated(1)
    r.finish("stop")
    _, s = scrape(m)
    assert s["vllm:e2e_request_latency_seconds_sum", lab("llama")] >= 0


def test_does_not_import_jax():
    code = "import sys, jaxserve.server.metrics; assert 'jax' not in sys.modules, 'jax imported'"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[1])


# --- the series vLLM adds: engine timelines per request, request parameters, steps, waiting reasons, cache ---------


def timeline(queued=0.0, scheduled=None, first=None, last=None, preemptions=0):
    from jaxserve.outputs import RequestStateStats

    return RequestStateStats(queued, scheduled, first, last, preemptions)


def test_request_phases_params_and_preemptions(metrics: ServerMetrics, clock: FakeClock):
    r1 = metrics.start_request("llama", prompt_tokens=4, n=2, max_tokens=30)
    r1.tokens_generated(3)
    r1.engine_finished(timeline(10.0, 10.5, 11.5, 14.0, preemptions=2))  # queue .5, prefill 1, decode 2.5, run 3.5
    r1.finish("length")
    r1.engine_finished(timeline(0.0, 1.0, 2.0, 3.0))  # ignored after finish
    r2 = metrics.start_request("llama", prompt_tokens=4, n=1, max_tokens=700)
    r2.engine_finished(timeline(5.0, 5.25))  # aborted while prefilling: only its queue time and preemptions
    r2.finish("abort")
    pool = metrics.start_request("bert", prompt_tokens=8)  # pooling: no n, max_tokens, prefill or decode
    pool.engine_finished(timeline(1.0, 1.5, 2.25, 2.25), pooling=True)
    pool.engine_finished(timeline(1.0, 1.0, 1.75, 1.75), pooling=True)  # a second input of the same request
    pool.finish("stop")

    types, s = scrape(metrics)
    names = ("queue", "inference", "prefill", "decode")
    for name in [f"vllm:request_{p}_time_seconds" for p in names] + ["vllm:request_params_n"]:
        assert types[name] == "histogram"
    assert types["vllm:request_params_max_tokens"] == types["vllm:request_num_preemptions"] == "histogram"
    llama, bert = lab("llama"), lab("bert")
    expected = {"queue": (2, 0.75), "inference": (1, 3.5), "prefill": (1, 1.0), "decode": (1, 2.5)}
    for phase, (count, total) in expected.items():
        assert s[f"vllm:request_{phase}_time_seconds_count", llama] == count, phase
        assert s[f"vllm:request_{phase}_time_seconds_sum", llama] == pytest.approx(total), phase
    assert s["vllm:request_queue_time_seconds_bucket", lab("llama", le="0.3")] == 1
    assert s["vllm:request_queue_time_seconds_bucket", lab("llama", le="0.5")] == 2
    assert s["vllm:request_queue_time_seconds_count", bert] == 2
    assert s["vllm:request_queue_time_seconds_sum", bert] == pytest.approx(0.5)
    assert s["vllm:request_inference_time_seconds_sum", bert] == pytest.approx(1.5)
    assert s["vllm:request_prefill_time_seconds_count", bert] == s["vllm:request_decode_time_seconds_count", bert] == 0
    assert s["vllm:request_num_preemptions_count", llama] == 2
    assert s["vllm:request_num_preemptions_sum", llama] == 2
    assert s["vllm:request_num_preemptions_bucket", lab("llama", le="1.0")] == 1  # the 0
    assert s["vllm:request_num_preemptions_bucket", lab("llama", le="2.0")] == 2
    assert s["vllm:request_num_preemptions_count", bert] == 2
    assert s["vllm:request_params_n_count", llama] == 2 and s["vllm:request_params_n_sum", llama] == 3
    assert s["vllm:request_params_n_bucket", lab("llama", le="1.0")] == 1
    assert s["vllm:request_params_max_tokens_sum", llama] == 730
    assert s["vllm:request_params_max_tokens_bucket", lab("llama", le="50.0")] == 1
    assert s["vllm:request_params_max_tokens_bucket", lab("llama", le="1000.0")] == 2
    assert s["vllm:request_params_n_count", bert] == s["vllm:request_params_max_tokens_count", bert] == 0


def test_new_histogram_buckets(metrics: ServerMetrics):
    metrics.start_request("llama", 1)
    _, s = scrape(metrics)

    def bounds(name: str) -> list[float]:
        return sorted(float(dict(labels)["le"]) for n, labels in s if n == name + "_bucket")

    inf = float("inf")
    latency = [0.3, 0.5, 0.8, 1, 1.5, 2, 2.5, 5, 10, 15, 20, 30, 40, 50, 60, 120, 240, 480, 960, 1920, 7680, inf]
    for phase in ("queue", "inference", "prefill", "decode"):
        assert bounds(f"vllm:request_{phase}_time_seconds") == latency
    assert bounds("vllm:request_params_n") == [1, 2, 5, 10, 20, inf]
    assert bounds("vllm:request_num_preemptions") == [1, 2, 3, 4, 5, 10, 20, inf]
    assert bounds("vllm:request_params_max_tokens") == bounds("vllm:request_prompt_tokens")


def test_engine_series_iteration_tokens_waiting_reasons_and_cache_config(clock: FakeClock):
    import dataclasses

    counts = [0] * 14
    counts[0], counts[3], counts[13] = 2, 5, 1  # two 1-token steps, five of 17..32, one past 16384
    cache = (("block_size", "16"), ("num_gpu_blocks", "128"), ("enable_prefix_caching", "True"))
    stats = {
        "llama": dataclasses.replace(
            STATS["llama"], iteration_tokens_counts=tuple(counts), iteration_tokens_sum=20000, cache_config=cache
        ),
        "bert": STATS["bert"],  # a pooling engine without a cache and without steps yet
    }
    types, s = scrape(ServerMetrics(lambda: by_engine(stats), clock=clock))
    assert types["vllm:iteration_tokens_total"] == "histogram"
    bounds = sorted(float(dict(k)["le"]) for n, k in s if n == "vllm:iteration_tokens_total_bucket")
    assert bounds == [1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384, float("inf")]
    assert s["vllm:iteration_tokens_total_bucket", lab("llama", le="1.0")] == 2
    assert s["vllm:iteration_tokens_total_bucket", lab("llama", le="16.0")] == 2
    assert s["vllm:iteration_tokens_total_bucket", lab("llama", le="32.0")] == 7
    assert s["vllm:iteration_tokens_total_bucket", lab("llama", le="16384.0")] == 7
    assert s["vllm:iteration_tokens_total_bucket", lab("llama", le="+Inf")] == 8
    assert s["vllm:iteration_tokens_total_count", lab("llama")] == 8
    assert s["vllm:iteration_tokens_total_sum", lab("llama")] == 20000
    assert not any(n.startswith("vllm:iteration_tokens_total") and dict(k)["model_name"] == "bert" for n, k in s)

    assert types["vllm:num_requests_waiting_by_reason"] == "gauge"
    for model, st in STATS.items():
        assert s["vllm:num_requests_waiting_by_reason", lab(model, reason="capacity")] == st.num_requests_waiting
        assert s["vllm:num_requests_waiting_by_reason", lab(model, reason="deferred")] == 0

    assert types["vllm:cache_config_info"] == "gauge"
    info = [(dict(k), v) for (n, k), v in s.items() if n == "vllm:cache_config_info"]
    assert info == [({"model_name": "llama", "engine": "0", **dict(cache)}, 1)]


# --- the engine's side: timelines, preemptions and steps, counted where they happen --------------------------

SMALL_POOL = dict(max_model_len=128, max_num_seqs=8, max_num_batched_tokens=32, num_kv_pages=16)


def test_engine_timelines_preemptions_and_iteration_tokens(tiny_models, make_llm):
    """Under async scheduling, with a pool small enough to preempt: every finished output carries its timeline in
    order, the per-request preemptions add up to the engine's, and the steps add up to the tokens scheduled."""
    import bisect

    from jaxserve import SamplingParams
    from jaxserve.stats import ITERATION_TOKENS_BUCKETS

    engine = make_llm(tiny_models["tiny-llama"], enable_prefix_caching=False, async_scheduling=True, **SMALL_POOL)
    engine = engine.engine
    before = engine.stats()
    scheduled = []
    schedule = engine.scheduler.schedule

    def counting():
        plan = schedule()
        if plan is not None:
            scheduled.append(plan.num_tokens)
        return plan

    engine.scheduler.schedule = counting
    try:
        params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
        for i in range(6):
            engine.add_request(str(i), list(range(10 + i, 50 + i)), params)
        engine.add_request("n3", list(range(5, 25)), params.clone(n=3, temperature=1.0, seed=5))
        finished = {}
        while engine.has_unfinished_requests():
            finished |= {o.request_id: o.metrics for o in engine.step() if o.finished}
    finally:
        del engine.scheduler.schedule
    after = engine.stats()

    assert len(finished) == 7
    for request_id, m in finished.items():
        assert m is not None, request_id
        assert m.queued_ts <= m.scheduled_ts <= m.first_token_ts <= m.last_token_ts, request_id
        assert m.queue_time >= 0 and m.prefill_time >= 0 and m.decode_time > 0
        assert m.inference_time == pytest.approx(m.prefill_time + m.decode_time)
    preempted = sum(m.num_preemptions for m in finished.values())
    assert preempted == after.num_preemptions - before.num_preemptions > 0, "the pool was meant to force preemption"

    steps = [a - b for a, b in zip(after.iteration_tokens_counts, before.iteration_tokens_counts)]
    expected = [0] * (len(ITERATION_TOKENS_BUCKETS) + 1)
    for tokens in scheduled:
        expected[bisect.bisect_left(ITERATION_TOKENS_BUCKETS, tokens)] += 1
    assert steps == expected and sum(steps) == len(scheduled)
    assert after.iteration_tokens_sum - before.iteration_tokens_sum == sum(scheduled)
    config = dict(after.cache_config)
    assert config["block_size"] == "16" and config["num_gpu_blocks"] == "16"
    assert config["enable_prefix_caching"] == "False" and config["cache_dtype"]


def test_pooling_engine_timelines(tiny_models, make_pooling_llm):
    from jaxserve import PoolingParams

    engine = make_pooling_llm(tiny_models["tiny-bert-mean"]).engine
    before = engine.stats()
    for i in range(3):
        engine.add_request(f"p{i}", list(range(3, 12 + i)), PoolingParams(task="embed"))
    outputs = []
    while engine.has_unfinished_requests():
        outputs += engine.step()
    assert len(outputs) == 3
    for output in outputs:
        m = output.metrics
        assert m.queued_ts <= m.scheduled_ts <= m.first_token_ts == m.last_token_ts and m.num_preemptions == 0
    after = engine.stats()
    assert after.iteration_tokens_sum - before.iteration_tokens_sum == 9 + 10 + 11
    assert after.cache_config == ()  # packed batches: no KV cache
