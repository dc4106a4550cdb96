"""scripts/soak.py, short: about 20 s of concurrent streaming generation and embedding clients (with dropped
streams and bad requests mixed in) against the tiny models on a loopback server, then every soak check must pass:
greedy answers equal their sequential ones, embeddings their single-text ones, the KV cache and request gauges
are back at 0, RSS grew within its bound, no 5xx, every bad request a 4xx in the OpenAI error envelope."""

from __future__ import annotations

import json
import os

import pytest

from jaxserve import AsyncEngine
from jaxserve.server.launch import background_server
from jaxserve.server.served_models import ServedModel
from scripts.soak import SoakConfig, check_envelope, run_soak

pytestmark = pytest.mark.optimized  # thousands of requests: the programs are compiled with optimizations

SOAK_SECONDS = 20


@pytest.fixture
def url(tiny_models, make_llm, make_pooling_llm):
    """The engines test_server.py builds too (the same arguments), so that in one session they compile once."""
    llms = {"llama": make_llm(tiny_models["tiny-llama"]), "bert": make_pooling_llm(tiny_models["tiny-bert-mean"])}
    served = [ServedModel.from_engine([name], name, AsyncEngine(llm.engine), "auto") for name, llm in llms.items()]
    try:
        with background_server(served) as base:
            yield base
    finally:
        for model in served:
            model.engine.shutdown()


def test_soak_short(url):
    config = SoakConfig(
        duration_s=SOAK_SECONDS,
        clients=8,
        embedding_clients=2,
        prompts=8,
        max_tokens=24,
        disconnect_rate=0.2,
        bad_rate=0.1,
        max_rss_growth_mib=200,
    )
    report = run_soak(url, "llama", "bert", config, pid=os.getpid())
    summary = json.dumps(report.summary(), indent=1, default=str)
    assert report.ok, summary
    # the load did what it is for: every kind of request, dropped streams and bad requests
    assert {"chat", "completion", "embedding"} <= set(report.completed), summary
    assert sum(report.disconnects.values()) > 0 and report.disconnects["mid-stream"] > 0, summary
    assert len(report.bad_requests) >= 5, summary
    assert report.metrics_reads >= SOAK_SECONDS // 2, summary
    # what report.ok stands for, spelled out
    assert report.count("mismatches") == report.count("reference_drift") == report.count("server_errors") == 0
    assert report.count("embedding_mismatches") == report.count("errors") == 0
    assert not any(status >= 500 for status in report.statuses), summary
    assert all(status != "error" and 400 <= status < 500 for s in report.bad_requests.values() for status in s)
    assert report.gauges_end == dict.fromkeys(
        ["vllm:kv_cache_usage_perc", "vllm:num_requests_running", "vllm:num_requests_waiting"], 0.0
    )
    assert report.rss_growth_mib is not None and report.rss_growth_mib <= 200, summary


def test_envelope_check():
    good = {"error": {"message": "no", "type": "BadRequestError", "param": None, "code": 400}}
    assert check_envelope(400, good) is None
    assert check_envelope(404, good) == "code 400 is not the status 404"
    assert check_envelope(400, {"detail": "no"}) == "no error object"
    assert (
        check_envelope(400, {"error": {"message": "no", "type": "x", "code": 400}})
        == "error keys ['code', 'message', 'type']"
    )
