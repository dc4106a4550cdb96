"""`jaxserve bench serve`: the datasets, the arrival schedule and the statistics as pure functions, SSE parsing
against canned streams, and whole runs against a real uvicorn server on loopback serving a tiny decoder and a
tiny embedding model. Nothing here asserts on speed."""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import subprocess
import sys

import httpx
import numpy as np
import pytest

from jaxserve import AsyncEngine
from jaxserve.bench.datasets import (
    DATASETS,
    MIN_RANDOM_TOKEN_ID,
    WORDS,
    BenchRequest,
    random_requests,
    sharegpt_like_requests,
)
from jaxserve.bench.serve import (
    BenchmarkError,
    ServeBenchConfig,
    add_serve_bench_args,
    arrival_times,
    config_from_args,
    main_serve_bench,
    run_serve_bench,
    send_request,
)
from jaxserve.bench.stats import (
    RequestRecord,
    embedding_summary,
    format_summary,
    generation_summary,
    latency_stats,
    tpot,
)
from jaxserve.server.launch import background_server, free_port
from jaxserve.server.served_models import ServedModel
from jaxserve.server.settings import ServerSettings

from .conftest import TINY_ENGINE, TINY_POOLING

API_KEY = "bench-key"
NUM_PROMPTS, INPUT_LEN, OUTPUT_LEN = 12, 16, 8


def test_the_client_does_not_import_jax():
    code = "import sys, jaxserve.bench.serve; assert 'jax' not in sys.modules, 'jax was imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


# --- datasets -------------------------------------------------------------------------------------------------


def test_random_requests_have_lengths_in_range_and_token_ids_above_the_special_ones():
    requests = random_requests(200, input_len=20, output_len=10, range_ratio=0.5, seed=1, vocab_size=512)
    assert len(requests) == 200
    assert all(10 <= r.input_len <= 30 and len(r.prompt) == r.input_len for r in requests)
    assert all(5 <= r.output_len <= 15 for r in requests)
    assert len({r.input_len for r in requests}) > 5
    ids = np.concatenate([r.prompt for r in requests])
    assert ids.min() >= MIN_RANDOM_TOKEN_ID and ids.max() < 512


def test_random_requests_are_fixed_lengths_without_range_and_seeded():
    requests = random_requests(5, input_len=7, output_len=3, seed=4, vocab_size=50)
    assert [(r.input_len, r.output_len) for r in requests] == [(7, 3)] * 5
    assert min(min(r.prompt) for r in requests) >= 25  # a small vocabulary keeps its upper half
    assert random_requests(5, 7, 3, seed=4, vocab_size=50) == requests
    assert random_requests(5, 7, 3, seed=5, vocab_size=50) != requests


def test_random_requests_without_a_vocabulary_are_words():
    requests = random_requests(3, input_len=16, output_len=4, seed=0, vocab_size=None)
    for request in requests:
        words = request.prompt.split(" ")
        assert len(words) == request.input_len == 16
        assert set(words) <= set(WORDS)


def test_random_lengths_are_at_least_one_and_the_range_ratio_is_checked():
    requests = random_requests(50, input_len=1, output_len=1, range_ratio=0.9, seed=0, vocab_size=300)
    assert min(r.input_len for r in requests) >= 1 and min(r.output_len for r in requests) >= 1
    for ratio in (-0.1, 1.0):
        with pytest.raises(ValueError, match="range_ratio"):
            random_requests(1, 8, 8, range_ratio=ratio)


def test_sharegpt_like_lengths_follow_the_documented_distribution():
    requests = sharegpt_like_requests(4000, seed=0, vocab_size=1000, max_input_len=512, max_output_len=600)
    inputs = np.array([r.input_len for r in requests])
    outputs = np.array([r.output_len for r in requests])
    assert inputs.min() >= 4 and inputs.max() == 512 and outputs.min() >= 4 and outputs.max() == 600
    assert 90 <= np.median(inputs) <= 110 and 160 <= np.median(outputs) <= 200
    assert all(len(r.prompt) == r.input_len for r in requests)
    assert DATASETS == ("random", "sharegpt-like")


# --- arrival schedule -----------------------------------------------------------------------------------------


def test_an_infinite_rate_sends_everything_at_once():
    assert arrival_times(4, float("inf")) == [0.0] * 4


def test_poisson_arrivals_are_seeded_and_average_the_rate():
    times = arrival_times(5000, request_rate=20.0, seed=3)
    assert times == arrival_times(5000, request_rate=20.0, seed=3)
    assert times != arrival_times(5000, request_rate=20.0, seed=4)
    gaps = np.diff(times)
    assert times[0] == 0.0 and (gaps >= 0).all()
    assert gaps.mean() == pytest.approx(1 / 20, rel=0.05)
    assert gaps.std() / gaps.mean() == pytest.approx(1.0, rel=0.1)  # exponential gaps


def test_burstiness_below_one_makes_gaps_more_uneven():
    bursty = np.diff(arrival_times(5000, request_rate=20.0, burstiness=0.25, seed=0))
    even = np.diff(arrival_times(5000, request_rate=20.0, burstiness=4.0, seed=0))
    assert bursty.mean() == pytest.approx(1 / 20, rel=0.1) and even.mean() == pytest.approx(1 / 20, rel=0.1)
    assert bursty.std() / bursty.mean() == pytest.approx(2.0, rel=0.1)  # gamma: 1 / sqrt(shape)
    assert even.std() / even.mean() == pytest.approx(0.5, rel=0.1)


# --- statistics -----------------------------------------------------------------------------------------------


def test_latency_stats_match_numpy():
    values = np.random.default_rng(0).random(101)
    stats = latency_stats("ttft", values.tolist(), (50, 90, 99, 99.9))
    ms = values * 1000
    assert stats["mean_ttft_ms"] == pytest.approx(ms.mean())
    assert stats["median_ttft_ms"] == pytest.approx(np.median(ms))
    assert stats["std_ttft_ms"] == pytest.approx(ms.std())
    for key, p in (("p50", 50), ("p90", 90), ("p99", 99), ("p99.9", 99.9)):
        assert stats[f"{key}_ttft_ms"] == pytest.approx(np.percentile(ms, p))
    assert set(latency_stats("itl", [], (50,)).values()) == {0.0}


def test_tpot_excludes_the_first_token():
    assert tpot(RequestRecord(True, output_tokens=5, ttft=0.2, latency=1.0)) == pytest.approx(0.2)
    assert tpot(RequestRecord(True, output_tokens=1, ttft=0.2, latency=0.2)) is None


def test_generation_summary_counts_successes_only():
    records = [
        RequestRecord(True, input_tokens=10, output_tokens=5, ttft=0.1, itls=[0.2, 0.2, 0.3], latency=0.9),
        RequestRecord(True, input_tokens=20, output_tokens=1, ttft=0.3, latency=0.3),
        RequestRecord(False, input_tokens=99, output_tokens=99, ttft=9.0, latency=9.0, error="boom"),
    ]
    summary = generation_summary(records, duration=2.0, percentiles=(50, 99))
    assert summary["completed"] == 2 and summary["failed"] == 1
    assert summary["total_input_tokens"] == 30 and summary["total_output_tokens"] == 6
    assert summary["request_throughput"] == 1.0
    assert summary["output_throughput"] == 3.0 and summary["total_token_throughput"] == 18.0
    assert summary["mean_ttft_ms"] == pytest.approx(200.0)
    assert summary["mean_tpot_ms"] == pytest.approx(200.0)  # (0.9 - 0.1) / 4; the 1-token request has none
    assert summary["mean_itl_ms"] == pytest.approx(700 / 3)
    assert summary["median_e2el_ms"] == pytest.approx(600.0)
    assert "p99_itl_ms" in summary and "p90_itl_ms" not in summary


def test_generation_summary_reports_only_the_chosen_metrics():
    summary = generation_summary([RequestRecord(True, output_tokens=2, latency=1.0)], 1.0, (50,), ("ttft",))
    assert "mean_ttft_ms" in summary and not any(k.endswith(("_tpot_ms", "_itl_ms", "_e2el_ms")) for k in summary)


def test_embedding_summary_counts_inputs():
    records = [
        RequestRecord(True, input_tokens=40, latency=0.5, num_inputs=4),
        RequestRecord(True, input_tokens=10, latency=0.25, num_inputs=1),
        RequestRecord(False, latency=0.1, num_inputs=4, error="boom"),
    ]
    summary = embedding_summary(records, duration=0.5)
    assert summary["completed"] == 2 and summary["failed"] == 1
    assert summary["total_inputs"] == 5 and summary["total_input_tokens"] == 50
    assert summary["request_throughput"] == 4.0 and summary["embedding_throughput"] == 10.0
    assert summary["total_token_throughput"] == 100.0
    assert summary["mean_e2el_ms"] == pytest.approx(375.0)
    assert not any("ttft" in key for key in summary)


def test_format_summary_is_a_table_of_the_result():
    records = [RequestRecord(True, input_tokens=10, output_tokens=4, ttft=0.1, itls=[0.1] * 3, latency=0.4)]
    result = {"duration": 1.0, "max_concurrency": 4, **generation_summary(records, 1.0, (50, 99.9))}
    text = format_summary(result)
    assert text.splitlines()[0].startswith("=") and "Serving Benchmark Result" in text.splitlines()[0]
    for expected in ("Successful requests:", "Failed requests:", "Maximum request concurrency:", "Mean TTFT (ms):"):
        assert expected in text
    assert re.search(r"P99\.9 ITL \(ms\):\s+100\.00", text)
    assert re.search(r"Total generated tokens:\s+4\n", text)


# --- command line and config ----------------------------------------------------------------------------------


def parse(argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_serve_bench_args(parser)
    return parser.parse_args(argv.split())


def test_defaults_are_vllms():
    args = parse("")
    assert config_from_args(args) == ServeBenchConfig()
    assert not args.save_result and args.result_dir is None and args.result_filename is None


def test_a_vllm_command_line_parses():
    args = parse(
        "--backend vllm --model meta-llama/Llama-3.1-8B-Instruct --host localhost --port 9000 --dataset-name random "
        "--random-input-len 512 --random-output-len 64 --random-range-ratio 0.25 --num-prompts 200 "
        "--request-rate 10 --burstiness 0.5 --max-concurrency 32 --seed 7 --percentile-metrics ttft,tpot,itl,e2el "
        "--metric-percentiles 50,90,99.9 --save-result --result-dir out --result-filename r.json --disable-tqdm"
    )
    config = config_from_args(args)
    assert config.base_url == "http://localhost:9000" and config.endpoint == "/v1/completions"
    assert config.model == "meta-llama/Llama-3.1-8B-Instruct" and config.dataset == "random"
    assert (config.random_input_len, config.random_output_len, config.random_range_ratio) == (512, 64, 0.25)
    assert (config.num_prompts, config.request_rate, config.burstiness) == (200, 10.0, 0.5)
    assert (config.max_concurrency, config.seed, config.disable_tqdm, config.ignore_eos) == (32, 7, True, True)
    assert config.percentile_metrics == ("ttft", "tpot", "itl", "e2el")
    assert config.percentiles == (50.0, 90.0, 99.9)
    assert (args.save_result, args.result_dir, args.result_filename) == (True, "out", "r.json")


def test_flags_for_the_url_endpoint_and_eos():
    config = config_from_args(
        parse("--base-url http://gpu:8080 --port 1 --backend openai-chat --no-ignore-eos --api-key k --vocab-size 9")
    )
    assert config.base_url == "http://gpu:8080" and config.endpoint == "/v1/chat/completions"
    assert not config.ignore_eos and config.api_key == "k" and config.vocab_size == 9
    config = config_from_args(parse("--endpoint /v1/embeddings --embed-batch-size 8 --dataset-name sharegpt-like"))
    assert (config.endpoint, config.embed_batch_size, config.dataset) == ("/v1/embeddings", 8, "sharegpt-like")


@pytest.mark.parametrize("argv", ["--percentile-metrics ttft,speed", "--metric-percentiles 50,101", "--endpoint /x"])
def test_bad_flags_are_usage_errors(argv):
    with pytest.raises(SystemExit):
        parse(argv)


@pytest.mark.parametrize(
    "field", [{"endpoint": "/v1/score"}, {"request_rate": 0}, {"max_concurrency": 0}, {"percentiles": (0,)}]
)
def test_config_rejects_bad_values(field):
    with pytest.raises(ValueError):
        ServeBenchConfig(**field)


# --- one request against canned streams -----------------------------------------------------------------------


def sse_body(*events: dict | str) -> bytes:
    lines = [": a comment", ""]
    for event in events:
        lines += [f"data: {event if isinstance(event, str) else json.dumps(event)}", ""]
    return "\n".join(lines).encode()


def send_canned(response: httpx.Response, endpoint: str = "/v1/completions") -> RequestRecord:
    async def go() -> RequestRecord:
        transport = httpx.MockTransport(lambda request: response)
        async with httpx.AsyncClient(transport=transport, base_url="http://bench.test") as client:
            config = ServeBenchConfig(base_url="http://bench.test", endpoint=endpoint)
            return await send_request(client, config, "m", [BenchRequest([5, 6, 7], 3, 4)])

    return asyncio.run(go())


def text_chunk(text: str, finish_reason: str | None = None) -> dict:
    return {"choices": [{"index": 0, "text": text, "finish_reason": finish_reason}]}


def test_a_stream_is_timed_by_its_output_chunks_and_counted_by_its_usage():
    usage = {"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 5}}
    chunks = [text_chunk("a"), text_chunk(""), text_chunk("b"), text_chunk("c"), text_chunk("", "length")]
    body = sse_body(*chunks, usage, "[DONE]", "not json")
    record = send_canned(httpx.Response(200, content=body))
    assert record.success, record.error
    assert (record.input_tokens, record.output_tokens, len(record.itls)) == (3, 5, 3)
    assert 0 < record.ttft <= record.latency


def test_without_usage_the_tokens_are_the_text_chunks_and_the_prompt_length():
    record = send_canned(httpx.Response(200, content=sse_body(text_chunk("a"), text_chunk("b"), "[DONE]")))
    assert record.success and (record.input_tokens, record.output_tokens) == (3, 2)


def test_chat_streams_count_content_deltas_not_the_role():
    role = {"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]}
    content = {"choices": [{"index": 0, "delta": {"content": "hi"}}]}
    record = send_canned(
        httpx.Response(200, content=sse_body(role, content, content, "[DONE]")), "/v1/chat/completions"
    )
    assert record.success and record.output_tokens == 2 and len(record.itls) == 1


@pytest.mark.parametrize(
    ("response", "error"),
    [
        (httpx.Response(400, json={"error": {"message": "too long", "code": 400}}), "HTTP 400: too long"),
        (httpx.Response(503, text="busy"), "HTTP 503: busy"),
        (httpx.Response(200, content=sse_body(text_chunk("a"), {"error": {"message": "engine died"}})), "engine died"),
        (httpx.Response(200, content=sse_body(text_chunk(""), "[DONE]")), "no generated output"),
        (httpx.Response(200, content=sse_body("{broken")), "JSONDecodeError"),
    ],
)
def test_failures_are_recorded_not_raised(response, error):
    record = send_canned(response)
    assert not record.success and error in record.error and record.latency >= 0


# --- whole runs against a real server -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def vocab_sizes(tiny_models) -> dict[str, int]:
    return {
        name: json.loads((tiny_models[folder] / "config.json").read_text())["vocab_size"]
        for name, folder in (("llama", "tiny-llama"), ("bert", "tiny-bert-mean"))
    }


@pytest.fixture(scope="module")
def url(tiny_models, llm_cache):
    engines = {
        "llama": llm_cache(tiny_models["tiny-llama"], TINY_ENGINE),
        "bert": llm_cache(tiny_models["tiny-bert-mean"], TINY_POOLING),
    }
    served = [ServedModel.from_engine([name], name, AsyncEngine(llm.engine), "auto") for name, llm in engines.items()]
    with background_server(served, ServerSettings(api_keys=[API_KEY])) as base:
        yield base
    for model in served:
        model.engine.shutdown()


def bench(url: str, requests: list[BenchRequest] | None = None, **overrides) -> dict:
    settings = dict(
        base_url=url,
        model="llama",
        api_key=API_KEY,
        num_prompts=NUM_PROMPTS,
        random_input_len=INPUT_LEN,
        random_output_len=OUTPUT_LEN,
        disable_tqdm=True,
    )
    return asyncio.run(run_serve_bench(ServeBenchConfig(**{**settings, **overrides}), requests))


def assert_generation_measured(result: dict, output_lens: list[int] | None = None) -> None:
    output_lens = output_lens or [OUTPUT_LEN] * NUM_PROMPTS
    assert result["completed"] == NUM_PROMPTS and result["failed"] == 0 and not any(result["errors"])
    assert result["output_lens"] == output_lens  # ignore_eos: exactly max_tokens each
    assert result["total_output_tokens"] == sum(output_lens)
    assert result["total_input_tokens"] == sum(result["input_lens"])
    for ttft, e2el, itls, output_len in zip(result["ttfts"], result["e2els"], result["itls"], result["output_lens"]):
        assert 0 < ttft <= e2el
        assert 0 <= len(itls) <= output_len - 1  # a chunk per token that decodes to text, and the last
        assert ttft + sum(itls) <= e2el
    for metric in ("ttft", "tpot", "itl"):
        assert result[f"p50_{metric}_ms"] <= result[f"p90_{metric}_ms"] <= result[f"p99_{metric}_ms"]
    assert result["duration"] > 0 and result["request_throughput"] > 0


def test_completions_with_token_ids(url, vocab_sizes):
    result = bench(url, vocab_size=vocab_sizes["llama"], random_range_ratio=0.5)
    requested = random_requests(NUM_PROMPTS, INPUT_LEN, OUTPUT_LEN, 0.5, 0, vocab_sizes["llama"])
    assert_generation_measured(result, [r.output_len for r in requested])
    input_lens = [r.input_len for r in requested]
    assert result["input_lens"] == input_lens and len(set(input_lens)) > 1  # token ids reach the model as they are
    assert result["num_prompts"] == NUM_PROMPTS and result["model_id"] == "llama"
    assert result["backend"] == "openai" and result["endpoint"] == "/v1/completions" and result["request_rate"] == "inf"
    assert "mean_e2el_ms" not in result  # not among the default percentile metrics


def test_completions_with_word_prompts_count_tokens_from_usage(url):
    result = bench(url, vocab_size=None, percentile_metrics=("ttft", "tpot", "itl", "e2el"))
    assert_generation_measured(result)
    assert all(n >= INPUT_LEN for n in result["input_lens"])  # at least a token per word
    assert result["p50_e2el_ms"] <= result["p99_e2el_ms"]


def test_chat_completions_send_words(url, vocab_sizes):
    result = bench(url, endpoint="/v1/chat/completions", vocab_size=vocab_sizes["llama"])
    assert_generation_measured(result)
    assert all(n > INPUT_LEN for n in result["input_lens"])  # the words and the chat template around them


def test_the_model_defaults_to_the_first_listed(url):
    result = bench(url, model=None, num_prompts=2)
    assert result["model_id"] == "llama" and result["completed"] == 2


def test_unlimited_requests_overlap(url, vocab_sizes):
    result = bench(url, vocab_size=vocab_sizes["llama"])
    first, second = sorted(zip(result["start_times"], result["e2els"]))[:2]
    assert second[0] < first[0] + first[1]


def test_max_concurrency_one_runs_requests_one_after_another(url, vocab_sizes):
    result = bench(url, vocab_size=vocab_sizes["llama"], max_concurrency=1)
    assert_generation_measured(result)
    spans = sorted(zip(result["start_times"], result["e2els"]))
    for (start, e2el), (next_start, _) in zip(spans, spans[1:]):
        assert next_start >= start + e2el - 1e-6


def test_requests_start_no_earlier_than_their_poisson_arrival(url, vocab_sizes):
    result = bench(url, vocab_size=vocab_sizes["llama"], num_prompts=6, request_rate=40.0, seed=3)
    assert result["completed"] == 6 and result["request_rate"] == 40.0
    for start, arrival in zip(result["start_times"], arrival_times(6, 40.0, seed=3)):
        assert start >= arrival - 1e-3  # asyncio may wake a timer up to its clock resolution early


def test_embeddings_in_batches(url, vocab_sizes):
    result = bench(
        url, model="bert", endpoint="/v1/embeddings", vocab_size=vocab_sizes["bert"], num_prompts=10, embed_batch_size=4
    )
    assert result["completed"] == 3 and result["failed"] == 0 and result["num_prompts"] == 10
    assert result["total_inputs"] == 10 and result["input_lens"] == [4 * INPUT_LEN, 4 * INPUT_LEN, 2 * INPUT_LEN]
    assert result["total_input_tokens"] == 10 * INPUT_LEN
    assert result["p50_e2el_ms"] <= result["p90_e2el_ms"] <= result["p99_e2el_ms"]
    assert not any(key.endswith("_ttft_ms") for key in result)
    assert "Input throughput (inputs/s):" in format_summary(result)


def test_failed_requests_are_recorded_and_the_run_finishes(url):
    fits, too_long = BenchRequest([300] * INPUT_LEN, INPUT_LEN, 4), BenchRequest([300] * 300, 300, 4)
    result = bench(url, [fits, too_long, fits, too_long])
    assert result["completed"] == 2 and result["failed"] == 2 and result["num_prompts"] == 4
    assert result["errors"][0] == result["errors"][2] == ""
    assert all("HTTP 400" in e and "maximum context length" in e for e in result["errors"][1::2])
    assert result["output_lens"] == [4, 0, 4, 0] and result["input_lens"] == [INPUT_LEN, 300, INPUT_LEN, 300]
    assert result["total_input_tokens"] == 2 * INPUT_LEN
    assert re.search(r"Failed requests:\s+2\n", format_summary(result))


def test_an_unknown_model_fails_the_warm_up(url):
    with pytest.raises(BenchmarkError, match=r"warm-up.*no-such-model.*HTTP 404"):
        bench(url, model="no-such-model", num_prompts=2)


def test_a_wrong_api_key_fails_the_warm_up_and_the_environment_supplies_one(url, monkeypatch):
    with pytest.raises(BenchmarkError, match="HTTP 401"):
        bench(url, api_key="wrong", num_prompts=2)
    monkeypatch.setenv("OPENAI_API_KEY", API_KEY)
    assert bench(url, api_key=None, num_prompts=2)["completed"] == 2


def test_an_unreachable_server_is_a_clear_error():
    base_url = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(BenchmarkError, match="Cannot reach the server"):
        bench(base_url, model=None)
    with pytest.raises(BenchmarkError, match="warm-up.*ConnectError"):
        bench(base_url)


def test_main_prints_the_summary_and_saves_the_result(url, vocab_sizes, tmp_path, capsys):
    config = ServeBenchConfig(
        base_url=url,
        model="llama",
        api_key=API_KEY,
        num_prompts=4,
        random_input_len=INPUT_LEN,
        random_output_len=OUTPUT_LEN,
        max_concurrency=2,
        vocab_size=vocab_sizes["llama"],
        disable_tqdm=True,
    )
    result = main_serve_bench(config, save_result=True, result_dir=str(tmp_path / "results"))
    assert "Serving Benchmark Result" in capsys.readouterr().out
    (path,) = (tmp_path / "results").iterdir()
    assert re.fullmatch(r"openai-infqps-concurrency2-llama-\d{8}-\d{6}\.json", path.name)
    saved = json.loads(path.read_text())
    assert saved == json.loads(json.dumps(result))
    for key in ("date", "backend", "endpoint", "model_id", "num_prompts", "request_rate", "burstiness", "duration"):
        assert key in saved
    assert saved["max_concurrency"] == 2 and saved["completed"] == 4 and len(saved["itls"]) == 4
    main_serve_bench(config, save_result=True, result_dir=str(tmp_path), result_filename="mine.json")
    assert json.loads((tmp_path / "mine.json").read_text())["total_output_tokens"] == 4 * OUTPUT_LEN
