"""What each benchmark request measured (`RequestRecord`), the summary `vllm bench serve` computes from those
records (its field names: throughputs, and mean, median, std and percentiles of TTFT, TPOT, ITL and end-to-end
latency in milliseconds), and the summary as a readable table."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np

METRICS = ("ttft", "tpot", "itl", "e2el")
METRIC_TITLES = {
    "ttft": ("Time to First Token", "TTFT"),
    "tpot": ("Time per Output Token (excl. 1st token)", "TPOT"),
    "itl": ("Inter-token Latency", "ITL"),
    "e2el": ("End-to-end Latency", "E2EL"),
}
DEFAULT_PERCENTILES = (50.0, 90.0, 99.0)
BANNER_WIDTH = 50
LABEL_WIDTH = 40


@dataclass
class RequestRecord:
    """One HTTP request of a benchmark. Times are in seconds; `start_time` is on the `time.perf_counter` clock.
    `num_inputs` counts the inputs of an embeddings request (1 for generation)."""

    success: bool
    input_tokens: int = 0
    output_tokens: int = 0
    ttft: float = 0.0
    itls: list[float] = field(default_factory=list)
    latency: float = 0.0
    start_time: float = 0.0
    num_inputs: int = 1
    error: str = ""


def percentile_label(percentile: float) -> str:
    """vLLM's spelling of a percentile in field names: 99 → "99", 99.9 → "99.9"."""
    return str(int(percentile)) if float(percentile).is_integer() else str(percentile)


def tpot(record: RequestRecord) -> float | None:
    """Time per output token after the first: (e2e latency - TTFT) / (output tokens - 1); None for fewer than 2."""
    if record.output_tokens <= 1:
        return None
    return (record.latency - record.ttft) / (record.output_tokens - 1)


def latency_stats(metric: str, seconds: Sequence[float], percentiles: Iterable[float]) -> dict[str, float]:
    """mean_, median_, std_ and p{P}_ `{metric}_ms` of latencies given in seconds; all 0 when there are none."""
    values = np.asarray(seconds, dtype=float) * 1000 if len(seconds) else np.zeros(1)
    stats = {
        f"mean_{metric}_ms": float(np.mean(values)),
        f"median_{metric}_ms": float(np.median(values)),
        f"std_{metric}_ms": float(np.std(values)),
    }
    for p in percentiles:
        stats[f"p{percentile_label(p)}_{metric}_ms"] = float(np.percentile(values, p))
    return stats


def metric_values(records: Sequence[RequestRecord], metric: str) -> list[float]:
    """The samples of a metric over successful requests: one per request, except ITL (one per token gap)."""
    done = [r for r in records if r.success]
    if metric == "ttft":
        return [r.ttft for r in done]
    if metric == "tpot":
        return [t for t in map(tpot, done) if t is not None]
    if metric == "itl":
        return [gap for r in done for gap in r.itls]
    if metric == "e2el":
        return [r.latency for r in done]
    raise ValueError(f"unknown metric {metric!r}; expected one of {METRICS}")


def generation_summary(
    records: Sequence[RequestRecord],
    duration: float,
    percentiles: Iterable[float] = DEFAULT_PERCENTILES,
    metrics: Iterable[str] = METRICS,
) -> dict[str, float | int]:
    """vLLM's result fields for completions or chat: counts, token totals, throughputs over `duration` seconds,
    and the latency statistics of each of `metrics`."""
    done = [r for r in records if r.success]
    input_tokens = sum(r.input_tokens for r in done)
    output_tokens = sum(r.output_tokens for r in done)
    summary: dict[str, float | int] = {
        "completed": len(done),
        "failed": len(records) - len(done),
        "total_input_tokens": input_tokens,
        "total_output_tokens": output_tokens,
        "request_throughput": len(done) / duration,
        "output_throughput": output_tokens / duration,
        "total_token_throughput": (input_tokens + output_tokens) / duration,
    }
    percentiles = tuple(percentiles)
    for metric in metrics:
        summary.update(latency_stats(metric, metric_values(records, metric), percentiles))
    return summary


def embedding_summary(
    records: Sequence[RequestRecord], duration: float, percentiles: Iterable[float] = DEFAULT_PERCENTILES
) -> dict[str, float | int]:
    """The result fields for embeddings: counts, requests/s, inputs/s (`embedding_throughput`), input tokens/s
    (`total_token_throughput`, vLLM's name for it with pooling models) and the end-to-end latency statistics."""
    done = [r for r in records if r.success]
    inputs = sum(r.num_inputs for r in done)
    input_tokens = sum(r.input_tokens for r in done)
    summary: dict[str, float | int] = {
        "completed": len(done),
        "failed": len(records) - len(done),
        "total_inputs": inputs,
        "total_input_tokens": input_tokens,
        "request_throughput": len(done) / duration,
        "embedding_throughput": inputs / duration,
        "total_token_throughput": input_tokens / duration,
    }
    summary.update(latency_stats("e2el", metric_values(records, "e2el"), percentiles))
    return summary


def format_summary(result: dict) -> str:
    """The result as a table in the manner of vLLM's "Serving Benchmark Result" block."""
    lines = [" Serving Benchmark Result ".center(BANNER_WIDTH, "=")]
    lines += [_row(label, value) for label, value in _headline(result)]
    for metric in METRICS:
        if f"mean_{metric}_ms" in result:
            lines += _metric_rows(result, metric)
    lines.append("=" * BANNER_WIDTH)
    return "\n".join(lines)


def _headline(result: dict) -> list[tuple[str, object]]:
    rows: list[tuple[str, object]] = [
        ("Successful requests:", result["completed"]),
        ("Failed requests:", result["failed"]),
    ]
    if result.get("max_concurrency") is not None:
        rows.append(("Maximum request concurrency:", result["max_concurrency"]))
    if "request_rate" in result:
        rows.append(("Request rate (req/s):", result["request_rate"]))
    if "duration" in result:
        rows.append(("Benchmark duration (s):", result["duration"]))
    if "embedding_throughput" in result:
        return rows + [
            ("Total inputs:", result["total_inputs"]),
            ("Total input tokens:", result["total_input_tokens"]),
            ("Request throughput (req/s):", result["request_throughput"]),
            ("Input throughput (inputs/s):", result["embedding_throughput"]),
            ("Input token throughput (tok/s):", result["total_token_throughput"]),
        ]
    return rows + [
        ("Total input tokens:", result["total_input_tokens"]),
        ("Total generated tokens:", result["total_output_tokens"]),
        ("Request throughput (req/s):", result["request_throughput"]),
        ("Output token throughput (tok/s):", result["output_throughput"]),
        ("Total token throughput (tok/s):", result["total_token_throughput"]),
    ]


def _metric_rows(result: dict, metric: str) -> list[str]:
    title, short = METRIC_TITLES[metric]
    rows = [f" {title} ".center(BANNER_WIDTH, "-")]
    rows.append(_row(f"Mean {short} (ms):", result[f"mean_{metric}_ms"]))
    rows.append(_row(f"Median {short} (ms):", result[f"median_{metric}_ms"]))
    rows.append(_row(f"Std {short} (ms):", result[f"std_{metric}_ms"]))
    suffix = f"_{metric}_ms"
    for key in result:
        if key.startswith("p") and key.endswith(suffix):
            rows.append(_row(f"P{key[1 : -len(suffix)]} {short} (ms):", result[key]))
    return rows


def _row(label: str, value: object) -> str:
    shown = f"{value:.2f}" if isinstance(value, float) else str(value)
    return f"{label:<{LABEL_WIDTH}}{shown}"
