"""`jaxserve bench serve`: load-test an already-running OpenAI-compatible server (jaxserve, vLLM or any other, by
URL) the way `vllm bench serve` does, with the same flags and result fields.

Generation requests (/v1/completions, /v1/chat/completions) stream: the first chunk that carries output (text,
or the finish reason: a last token may decode to no text) gives the time to first token, the gaps between later
ones the inter-token latencies, and the final usage chunk the token counts. Embeddings requests (/v1/embeddings)
send `embed_batch_size` inputs each and time the whole response. Requests go out all at once or at a Poisson
(gamma, with burstiness) rate, at most `max_concurrency` at a time if set. A failed request is recorded with its
error and never stops the run; only the warm-up request must succeed."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import time
from collections.abc import AsyncIterator, Callable, Coroutine
from dataclasses import dataclass
from datetime import datetime
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from tqdm import tqdm

from .datasets import DATASETS, BenchRequest, random_requests, sharegpt_like_requests
from .stats import (
    DEFAULT_PERCENTILES,
    METRICS,
    RequestRecord,
    embedding_summary,
    format_summary,
    generation_summary,
)

COMPLETIONS = "/v1/completions"
CHAT = "/v1/chat/completions"
EMBEDDINGS = "/v1/embeddings"
ENDPOINTS = (COMPLETIONS, CHAT, EMBEDDINGS)
BACKEND_ENDPOINTS = {  # vLLM's --backend values, for command lines written for `vllm bench serve`
    "openai": COMPLETIONS,
    "vllm": COMPLETIONS,
    "openai-chat": CHAT,
    "openai-embeddings": EMBEDDINGS,
}
DEFAULT_TIMEOUT_S = 6 * 60 * 60  # as long as vLLM's client session allows a request
DEFAULT_PERCENTILE_METRICS = ("ttft", "tpot", "itl")

Send = Callable[[list[BenchRequest]], Coroutine[Any, Any, RequestRecord]]


class BenchmarkError(RuntimeError):
    """The benchmark could not start: the server is unreachable, has no model, or the warm-up request failed."""


@dataclass
class ServeBenchConfig:
    """What to benchmark and how; the fields mirror `vllm bench serve`'s flags."""

    base_url: str = "http://127.0.0.1:8000"  # the server's root, without /v1
    endpoint: str = COMPLETIONS
    model: str | None = None  # None: the first model the server lists
    dataset: str = "random"
    num_prompts: int = 1000
    random_input_len: int = 1024
    random_output_len: int = 128
    random_range_ratio: float = 0.0
    request_rate: float = float("inf")  # requests/s; inf sends them all at once
    burstiness: float = 1.0  # shape of the gamma-distributed gaps; 1 is Poisson, lower is burstier
    max_concurrency: int | None = None
    seed: int = 0
    ignore_eos: bool = True  # vLLM's extension, so that every request generates exactly its output length
    api_key: str | None = None  # None: $OPENAI_API_KEY, if set
    embed_batch_size: int = 1
    vocab_size: int | None = None  # known: token-id prompts of exact lengths; None: word prompts
    percentile_metrics: tuple[str, ...] = DEFAULT_PERCENTILE_METRICS  # embeddings always report e2el alone
    percentiles: tuple[float, ...] = DEFAULT_PERCENTILES
    timeout: float = DEFAULT_TIMEOUT_S  # seconds to wait on the server (to connect, for each read) before failing
    disable_tqdm: bool = False

    def __post_init__(self) -> None:
        checks = [
            (self.endpoint in ENDPOINTS, f"endpoint must be one of {ENDPOINTS}, got {self.endpoint!r}"),
            (self.dataset in DATASETS, f"dataset must be one of {DATASETS}, got {self.dataset!r}"),
            (self.num_prompts >= 1, "num_prompts must be at least 1"),
            (self.request_rate > 0, "request_rate must be positive (inf: all at once)"),
            (self.burstiness > 0, "burstiness must be positive"),
            (self.max_concurrency is None or self.max_concurrency >= 1, "max_concurrency must be at least 1"),
            (self.embed_batch_size >= 1, "embed_batch_size must be at least 1"),
            (set(self.percentile_metrics) <= set(METRICS), f"percentile_metrics must be among {METRICS}"),
            (all(0 < p <= 100 for p in self.percentiles), "percentiles must be in (0, 100]"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)

    @property
    def is_embedding(self) -> bool:
        return self.endpoint == EMBEDDINGS


# --- requests to send -----------------------------------------------------------------------------------------


def sample_requests(config: ServeBenchConfig) -> list[BenchRequest]:
    """The configured dataset. Chat takes text, so its prompts are words whatever the vocabulary."""
    vocab_size = None if config.endpoint == CHAT else config.vocab_size
    if config.dataset == "sharegpt-like":
        return sharegpt_like_requests(config.num_prompts, config.seed, vocab_size)
    return random_requests(
        config.num_prompts,
        config.random_input_len,
        config.random_output_len,
        config.random_range_ratio,
        config.seed,
        vocab_size,
    )


def arrival_times(num_requests: int, request_rate: float, burstiness: float = 1.0, seed: int = 0) -> list[float]:
    """Seconds after the start at which each request is sent: all 0 for an infinite rate, else the first at 0 and
    gaps drawn (seeded) from a gamma distribution with shape `burstiness` and mean 1 / `request_rate`, as vLLM
    draws them (burstiness 1: Poisson arrivals)."""
    if math.isinf(request_rate):
        return [0.0] * num_requests
    rng = np.random.default_rng(seed)
    gaps = rng.gamma(shape=burstiness, scale=1 / (request_rate * burstiness), size=max(0, num_requests - 1))
    return [0.0, *np.cumsum(gaps).tolist()][:num_requests]


def batches(requests: list[BenchRequest], size: int) -> list[list[BenchRequest]]:
    return [requests[i : i + size] for i in range(0, len(requests), size)]


def completion_body(model: str, request: BenchRequest, config: ServeBenchConfig) -> dict[str, Any]:
    return {"model": model, "prompt": request.prompt, **_generation_fields(request, config)}


def chat_body(model: str, request: BenchRequest, config: ServeBenchConfig) -> dict[str, Any]:
    message = {"role": "user", "content": request.prompt}
    return {"model": model, "messages": [message], **_generation_fields(request, config)}


def embedding_body(model: str, requests: list[BenchRequest]) -> dict[str, Any]:
    return {"model": model, "input": [r.prompt for r in requests]}


def _generation_fields(request: BenchRequest, config: ServeBenchConfig) -> dict[str, Any]:
    fields = {
        "max_tokens": request.output_len,
        "temperature": 0.0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if config.ignore_eos:
        fields["ignore_eos"] = True
    return fields


# --- sending one request --------------------------------------------------------------------------------------


async def send_request(
    client: httpx.AsyncClient, config: ServeBenchConfig, model: str, batch: list[BenchRequest]
) -> RequestRecord:
    """Send one request (a single prompt, or a batch of inputs for embeddings) and measure it; any failure is
    recorded in the returned record, never raised."""
    start = time.perf_counter()
    try:
        if config.is_embedding:
            record = await _embed(client, embedding_body(model, batch), batch, start)
        else:
            body_of = chat_body if config.endpoint == CHAT else completion_body
            record = await _generate(client, config.endpoint, body_of(model, batch[0], config), batch[0], start)
    except Exception as exc:  # noqa: BLE001 - a benchmark records what went wrong and carries on
        record = _failure(start, f"{type(exc).__name__}: {exc}")
    record.start_time = start
    record.num_inputs = len(batch)
    if not record.success:
        record.input_tokens = sum(r.input_len for r in batch)  # as requested: the server counted nothing
    return record


async def _generate(
    client: httpx.AsyncClient, endpoint: str, body: dict, request: BenchRequest, start: float
) -> RequestRecord:
    chat = endpoint == CHAT
    chunk_times: list[float] = []
    usage: dict = {}
    async with client.stream("POST", endpoint, json=body) as response:
        if response.status_code != httpx.codes.OK:
            return _failure(start, await _http_error(response))
        async for event in sse_events(response):
            if "error" in event:
                return _failure(start, _error_message(event))
            if carries_output(event, chat):
                chunk_times.append(time.perf_counter())
            usage = event.get("usage") or usage
    latency = time.perf_counter() - start
    if not chunk_times:
        return _failure(start, "the response streamed no generated output")
    return RequestRecord(
        success=True,
        input_tokens=usage.get("prompt_tokens", request.input_len),
        output_tokens=usage.get("completion_tokens", len(chunk_times)),
        ttft=chunk_times[0] - start,
        itls=np.diff(chunk_times).tolist(),
        latency=latency,
    )


async def _embed(client: httpx.AsyncClient, body: dict, batch: list[BenchRequest], start: float) -> RequestRecord:
    response = await client.post(EMBEDDINGS, json=body)
    latency = time.perf_counter() - start
    if response.status_code != httpx.codes.OK:
        return _failure(start, await _http_error(response))
    data = response.json()
    if "error" in data:
        return _failure(start, _error_message(data))
    usage = data.get("usage") or {}
    return RequestRecord(
        success=True,
        input_tokens=usage.get("prompt_tokens", sum(r.input_len for r in batch)),
        ttft=latency,
        latency=latency,
    )


async def sse_events(response: httpx.Response) -> AsyncIterator[dict]:
    """The JSON payloads of a server-sent-events stream's `data:` lines, up to `[DONE]`."""
    async for line in response.aiter_lines():
        if not line.startswith("data:"):
            continue
        payload = line[len("data:") :].strip()
        if payload == "[DONE]":
            return
        yield json.loads(payload)


def carries_output(event: dict, chat: bool) -> bool:
    """Whether a stream chunk marks generated tokens: its first choice has text (`text`, or `delta.content` for
    chat) or a finish reason. A chat stream's opening role-only chunk and the usage chunk carry none."""
    choices = event.get("choices")
    if not choices:
        return False
    choice = choices[0]
    text = (choice.get("delta") or {}).get("content") if chat else choice.get("text")
    return bool(text) or choice.get("finish_reason") is not None


async def _http_error(response: httpx.Response) -> str:
    body = (await response.aread()).decode(errors="replace")
    with contextlib.suppress(ValueError):
        body = _error_message(json.loads(body))
    return f"HTTP {response.status_code}: {body}"


def _error_message(body: Any) -> str:
    """The message of an OpenAI error envelope `{"error": {"message": ...}}`, or the body as text."""
    error = body.get("error", body) if isinstance(body, dict) else body
    if isinstance(error, dict) and "message" in error:
        return str(error["message"])
    return str(error)


def _failure(start: float, error: str) -> RequestRecord:
    return RequestRecord(success=False, latency=time.perf_counter() - start, error=error)


# --- the run --------------------------------------------------------------------------------------------------


async def run_serve_bench(config: ServeBenchConfig, requests: list[BenchRequest] | None = None) -> dict:
    """Benchmark the server and return vLLM's result fields plus the per-request lists. `requests` replaces the
    configured dataset (for custom prompts). Raises BenchmarkError when the benchmark cannot start."""
    requests = requests if requests is not None else sample_requests(config)
    if not requests:
        raise ValueError("there are no requests to send")
    work = batches(requests, config.embed_batch_size if config.is_embedding else 1)
    async with _client(config) as client:
        model = config.model or await first_model_id(client)
        send = partial(send_request, client, config, model)
        await _warm_up(send, work[0][:1], config, model)
        started = time.perf_counter()
        records = await _send_all(send, work, config, started)
        duration = time.perf_counter() - started
    return build_result(config, model, records, started, duration)


async def first_model_id(client: httpx.AsyncClient) -> str:
    """The first model `GET /v1/models` lists."""
    try:
        response = await client.get("/v1/models")
    except httpx.HTTPError as exc:
        raise BenchmarkError(f"Cannot reach the server at {client.base_url}: {type(exc).__name__}: {exc}") from exc
    if response.status_code != httpx.codes.OK:
        raise BenchmarkError(f"Listing the server's models failed: {await _http_error(response)}")
    models = response.json().get("data") or []
    if not models:
        raise BenchmarkError(f"The server at {client.base_url} lists no models")
    return models[0]["id"]


async def _warm_up(send: Send, batch: list[BenchRequest], config: ServeBenchConfig, model: str) -> None:
    """One request before the clock starts, as vLLM's initial test run: it must succeed."""
    record = await send(batch)
    if not record.success:
        raise BenchmarkError(
            f"The warm-up request to {config.base_url}{config.endpoint} (model {model!r}) failed, so the "
            f"benchmark did not start. Check that the server is up and serves that model there. Error: {record.error}"
        )


async def _send_all(
    send: Send, work: list[list[BenchRequest]], config: ServeBenchConfig, started: float
) -> list[RequestRecord]:
    """Every request at its arrival time after `started`, at most `max_concurrency` in flight; the records in the
    order given."""
    offsets = arrival_times(len(work), config.request_rate, config.burstiness, config.seed)
    limit = asyncio.Semaphore(config.max_concurrency) if config.max_concurrency else contextlib.nullcontext()
    with tqdm(total=len(work), disable=config.disable_tqdm, desc="Benchmark") as progress:

        async def timed(batch: list[BenchRequest], offset: float) -> RequestRecord:
            await asyncio.sleep(max(0.0, started + offset - time.perf_counter()))
            async with limit:
                record = await send(batch)
            progress.update(1)
            return record

        return await asyncio.gather(*(timed(batch, offset) for batch, offset in zip(work, offsets)))


def _client(config: ServeBenchConfig) -> httpx.AsyncClient:
    """One connection per request in flight (no pool limit beyond `max_concurrency`, which would queue requests
    inside the client and inflate their latencies)."""
    api_key = config.api_key or os.environ.get("OPENAI_API_KEY")
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    limits = httpx.Limits(max_connections=config.max_concurrency, max_keepalive_connections=config.max_concurrency)
    return httpx.AsyncClient(
        base_url=config.base_url, headers=headers, timeout=httpx.Timeout(config.timeout), limits=limits
    )


def build_result(
    config: ServeBenchConfig, model: str, records: list[RequestRecord], started: float, duration: float
) -> dict:
    """The result: run settings, the summary and the per-request lists (in the order the requests were given)."""
    if config.is_embedding:
        summary = embedding_summary(records, duration, config.percentiles)
    else:
        summary = generation_summary(records, duration, config.percentiles, config.percentile_metrics)
    return {
        "date": datetime.now().strftime("%Y%m%d-%H%M%S"),
        "backend": "openai",
        "endpoint": config.endpoint,
        "model_id": model,
        "num_prompts": sum(r.num_inputs for r in records),
        "request_rate": config.request_rate if math.isfinite(config.request_rate) else "inf",
        "burstiness": config.burstiness,
        "max_concurrency": config.max_concurrency,
        "duration": duration,
        **summary,
        "input_lens": [r.input_tokens for r in records],
        "output_lens": [r.output_tokens if r.success else 0 for r in records],
        "ttfts": [r.ttft for r in records],
        "itls": [r.itls for r in records],
        "e2els": [r.latency for r in records],
        "start_times": [r.start_time - started for r in records],
        "errors": [r.error for r in records],
    }


def main_serve_bench(
    config: ServeBenchConfig,
    save_result: bool = False,
    result_dir: str | None = None,
    result_filename: str | None = None,
) -> dict:
    """Run the benchmark, print its summary, save the result as JSON when asked, and return it."""
    result = asyncio.run(run_serve_bench(config))
    print(format_summary(result))
    if save_result:
        path = Path(result_dir or ".") / (result_filename or default_result_filename(result))
        save_result_json(result, path)
        print(f"Saved the result to {path}")
    return result


def default_result_filename(result: dict) -> str:
    """vLLM's name: openai-{rate}qps[-concurrency{n}]-{model basename}-{date}.json."""
    concurrency = f"-concurrency{result['max_concurrency']}" if result["max_concurrency"] is not None else ""
    model = result["model_id"].rstrip("/").split("/")[-1]
    return f"{result['backend']}-{result['request_rate']}qps{concurrency}-{model}-{result['date']}.json"


def save_result_json(result: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2))


# --- command line ---------------------------------------------------------------------------------------------


def add_serve_bench_args(parser: argparse.ArgumentParser) -> None:
    """`vllm bench serve`'s flags (those that apply here), with its names and defaults."""
    server = parser.add_argument_group("server")
    server.add_argument("--base-url", help="The server's root URL, without /v1 (wins over --host and --port).")
    server.add_argument("--host", default="127.0.0.1", help="The server's host, when no --base-url is given.")
    server.add_argument("--port", type=int, default=8000, help="The server's port, when no --base-url is given.")
    server.add_argument(
        "--endpoint",
        choices=ENDPOINTS,
        help=f"The API route to benchmark (default: the --backend's, else {COMPLETIONS}).",
    )
    server.add_argument(
        "--backend",
        choices=tuple(BACKEND_ENDPOINTS),
        help="Accepted for vLLM command lines: picks the endpoint when --endpoint is not given.",
    )
    server.add_argument("--model", help="The model name to send (default: the first one GET /v1/models lists).")
    server.add_argument("--api-key", help="Bearer token to send (default: $OPENAI_API_KEY, if set).")
    server.add_argument(
        "--timeout",
        type=float,
        default=DEFAULT_TIMEOUT_S,
        help="Seconds to wait on the server (to connect, or for the next bytes) before a request fails.",
    )

    data = parser.add_argument_group("dataset")
    data.add_argument("--dataset-name", choices=DATASETS, default="random", help="The prompts to send.")
    data.add_argument("--num-prompts", type=int, default=1000, help="How many prompts to send.")
    data.add_argument("--random-input-len", type=int, default=1024, help="Tokens per prompt (random dataset).")
    data.add_argument("--random-output-len", type=int, default=128, help="Tokens to generate (random dataset).")
    data.add_argument(
        "--random-range-ratio",
        type=float,
        default=0.0,
        help="Lengths are drawn uniformly from [len * (1 - ratio), len * (1 + ratio)]; in [0, 1).",
    )
    data.add_argument(
        "--vocab-size",
        type=int,
        help="The model's vocabulary size: prompts become random token ids of exact lengths. Without it they are "
        "random English words, about one token each (chat prompts are always words).",
    )
    data.add_argument("--seed", type=int, default=0, help="Seed of the prompts and of the arrival times.")

    load = parser.add_argument_group("load")
    load.add_argument(
        "--request-rate",
        type=float,
        default=float("inf"),
        help="Requests per second (default inf: send them all at once); arrivals are Poisson at burstiness 1.",
    )
    load.add_argument(
        "--burstiness",
        type=float,
        default=1.0,
        help="Shape of the gamma-distributed gaps between arrivals: 1 is Poisson, below 1 burstier, above 1 more even.",
    )
    load.add_argument("--max-concurrency", type=int, help="At most this many requests in flight (default: no limit).")
    load.add_argument(
        "--ignore-eos",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="Ask the server to ignore EOS, so every request generates exactly its output length (default: on).",
    )
    load.add_argument(
        "--embed-batch-size", type=int, default=1, help="Inputs per /v1/embeddings request (embeddings only)."
    )

    out = parser.add_argument_group("results")
    out.add_argument(
        "--percentile-metrics",
        type=_metric_list,
        default=DEFAULT_PERCENTILE_METRICS,
        help=f"Comma-separated metrics to report statistics of, among {','.join(METRICS)} (default: ttft,tpot,itl).",
    )
    out.add_argument(
        "--metric-percentiles",
        type=_percentile_list,
        default=DEFAULT_PERCENTILES,
        help='Comma-separated percentiles to report, e.g. "25,50,99.9" (default: 50,90,99).',
    )
    out.add_argument("--save-result", action="store_true", help="Save the result as JSON.")
    out.add_argument("--result-dir", help="Folder for the JSON result (default: the current one).")
    out.add_argument(
        "--result-filename",
        help="File name of the JSON result (default: openai-{rate}qps[-concurrency{n}]-{model}-{date}.json).",
    )
    out.add_argument("--disable-tqdm", action="store_true", help="Do not show a progress bar.")


def config_from_args(args: argparse.Namespace) -> ServeBenchConfig:
    """The config of parsed `add_serve_bench_args` flags."""
    return ServeBenchConfig(
        base_url=args.base_url or f"http://{args.host}:{args.port}",
        endpoint=args.endpoint or BACKEND_ENDPOINTS.get(args.backend, COMPLETIONS),
        model=args.model,
        dataset=args.dataset_name,
        num_prompts=args.num_prompts,
        random_input_len=args.random_input_len,
        random_output_len=args.random_output_len,
        random_range_ratio=args.random_range_ratio,
        request_rate=args.request_rate,
        burstiness=args.burstiness,
        max_concurrency=args.max_concurrency,
        seed=args.seed,
        ignore_eos=args.ignore_eos,
        api_key=args.api_key,
        embed_batch_size=args.embed_batch_size,
        vocab_size=args.vocab_size,
        percentile_metrics=tuple(args.percentile_metrics),
        percentiles=tuple(args.metric_percentiles),
        timeout=args.timeout,
        disable_tqdm=args.disable_tqdm,
    )


def _metric_list(text: str) -> tuple[str, ...]:
    metrics = tuple(m.strip() for m in text.split(",") if m.strip())
    unknown = [m for m in metrics if m not in METRICS]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown metrics {unknown}; choose among {','.join(METRICS)}")
    return metrics


def _percentile_list(text: str) -> tuple[float, ...]:
    try:
        percentiles = tuple(float(p) for p in text.split(",") if p.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"percentiles must be numbers, got {text!r}") from None
    if not all(0 < p <= 100 for p in percentiles):
        raise argparse.ArgumentTypeError(f"percentiles must be in (0, 100], got {text!r}")
    return percentiles
