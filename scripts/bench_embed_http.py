"""Embedding throughput over HTTP with many concurrent clients, against the same work through the offline API.

One pooling engine (the default embedding model, all-MiniLM-L6-v2, unless `--model` says otherwise; the engine's
default limits, as `jaxserve serve` has them) serves both paths, one after the other:

1. offline: `LLM(model, runner="pooling").embed(texts)` on all the texts of a workload in one call (tokenization
   included), after an untimed warm-up call. The offline `LLM` is built and measured first, because once an
   `AsyncEngine` wraps its engine, the engine belongs to the `AsyncEngine`'s thread.
2. http: the same `llm.engine` wrapped in an `AsyncEngine` and served by the OpenAI server (uvicorn in a daemon
   thread of this process, on a free loopback port). `--clients` (64) coroutines share one `httpx.AsyncClient`
   whose pool holds a connection per client; each takes the next request of the workload as soon as its last
   one is answered, and POSTs it to /v1/embeddings. A request's latency runs from the call to the parsed JSON
   response; a workload's wall time from the first request sent to the last response parsed. An untimed round
   of one 1-text request per client opens the connections first.
3. offline again, once the `AsyncEngine` has stopped and handed the engine back: the offline figure is the mean
   of the two runs, so that a machine that speeds up or slows down during the run biases the ratio less.

Workloads: each request carries 1 text, and (separately) 32 texts (`--texts-per-request`); every text tokenizes
to exactly `--tokens` (128) tokens, [CLS] and [SEP] included, being built from single-token words (with the
helpers of scripts/bench_embed.py). Requests per workload (`--requests`): by default 768 texts' worth, and at
least one request per client: 768 requests of 1 text (about 20-30 s on a 2-core CPU), 64 requests of 32 texts
(2,048 texts, the least that keeps 64 clients busy at once; about 45-60 s).

Reported per workload: HTTP requests/s, tokens/s, p50 and p99 latency; offline tokens/s; and the ratio of the two
throughputs (HTTP / offline; the target is >= 0.8). The clients run in the server's process, so their work
(building requests, parsing the JSON replies) shares its CPU and its GIL; on a small CPU that is part of what the
ratio measures. Before each workload one HTTP response is checked against the offline embeddings of its texts.

    python scripts/bench_embed_http.py [--model NAME_OR_PATH] [--clients 64] [--tokens 128]
                                       [--texts-per-request 1 32] [--requests N [N ...]] [--json out.json]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import logging
import platform
import sys
import time

import httpx
import numpy as np
from bench_embed import single_token_words, texts_of  # scripts/bench_embed.py, next to this file
from bench_http import package_version

from jaxserve import LLM
from jaxserve.async_engine import AsyncEngine
from jaxserve.model_source import DEFAULT_POOLING_MODEL
from jaxserve.server.launch import background_server
from jaxserve.server.served_models import ServedModel

TEXTS_PER_WORKLOAD = 768


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=(
            "Embedding throughput through the HTTP server (/v1/embeddings, many concurrent clients) against "
            "LLM.embed on the same texts and the same engine; prints requests/s, tokens/s, p50/p99 latency and "
            "the HTTP/offline ratio."
        ),
        epilog=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--model",
        default=DEFAULT_POOLING_MODEL,
        metavar="NAME_OR_PATH",
        help=f"embedding model: a name or a folder (default {DEFAULT_POOLING_MODEL})",
    )
    parser.add_argument("--clients", type=int, default=64, metavar="N", help="concurrent HTTP clients (default 64)")
    parser.add_argument(
        "--tokens", type=int, default=128, metavar="N", help="tokens per text, special tokens included (default 128)"
    )
    parser.add_argument(
        "--texts-per-request",
        type=int,
        nargs="+",
        default=[1, 32],
        metavar="K",
        help="texts in each request, one workload per value (default: 1 32)",
    )
    parser.add_argument(
        "--requests",
        type=int,
        nargs="+",
        metavar="N",
        help=f"requests per workload: one value for all, or one per --texts-per-request value (default: "
        f"{TEXTS_PER_WORKLOAD} texts' worth, at least one request per client)",
    )
    parser.add_argument(
        "--max-num-seqs", type=int, metavar="N", help="engine limit (default: the engine's, as `jaxserve serve`)"
    )
    parser.add_argument(
        "--max-num-batched-tokens",
        type=int,
        metavar="N",
        help="engine token budget per step (default: the engine's, as `jaxserve serve`)",
    )
    parser.add_argument(
        "--encoding-format",
        choices=["float", "base64"],
        default="float",
        help="how the server sends the embeddings back (default float: JSON numbers)",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the random texts (default 0)")
    parser.add_argument("--json", metavar="PATH", help="also write the settings, results and latencies here")
    args = parser.parse_args(argv)
    if args.requests is None:
        args.requests = [max(args.clients, TEXTS_PER_WORKLOAD // k) for k in args.texts_per_request]
    elif len(args.requests) == 1:
        args.requests = args.requests * len(args.texts_per_request)
    elif len(args.requests) != len(args.texts_per_request):
        parser.error("give one --requests value, or one per --texts-per-request value")
    if min(args.clients, args.tokens, *args.texts_per_request, *args.requests) < 1:
        parser.error("--clients, --tokens, --texts-per-request and --requests must be positive")
    return args


# ---------------------------------------------------------------------------------------------------------------------
# the two paths


def offline_seconds(llm: LLM, texts: list[str]) -> tuple[float, np.ndarray]:
    """Seconds of one `LLM.embed` call on all `texts`, and the embeddings."""
    began = time.perf_counter()
    outputs = llm.embed(texts, use_tqdm=False)
    seconds = time.perf_counter() - began
    return seconds, np.asarray([o.outputs.embedding for o in outputs], np.float32)


class HTTPFailure(Exception):
    pass


def embeddings_of(reply: dict) -> np.ndarray:
    rows = sorted(reply["data"], key=lambda item: item["index"])
    if rows and isinstance(rows[0]["embedding"], str):
        return np.stack([np.frombuffer(base64.b64decode(r["embedding"]), np.float32) for r in rows])
    return np.asarray([r["embedding"] for r in rows], np.float32)


async def post(client: httpx.AsyncClient, body: dict) -> dict:
    response = await client.post("/v1/embeddings", json=body)
    if response.is_error:
        raise HTTPFailure(f"HTTP {response.status_code} from /v1/embeddings: {response.text[:500]}")
    return response.json()


async def run_workload(client: httpx.AsyncClient, bodies: list[dict], clients: int) -> tuple[float, list[float], int]:
    """Send `bodies` from `clients` concurrent workers; (wall seconds, latency of each request, prompt tokens)."""
    latencies = [0.0] * len(bodies)
    prompt_tokens = 0
    order = iter(range(len(bodies)))  # shared: each worker takes the next request when its last one is answered

    async def worker() -> None:
        nonlocal prompt_tokens
        for i in order:
            began = time.perf_counter()
            reply = await post(client, bodies[i])
            latencies[i] = time.perf_counter() - began
            prompt_tokens += reply["usage"]["prompt_tokens"]

    began = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(min(clients, len(bodies)))))
    return time.perf_counter() - began, latencies, prompt_tokens


async def http_path(url: str, name: str, args, workloads, offline_embeddings: list[np.ndarray]) -> list[dict]:
    """The HTTP side of every workload: throughput, latencies, and how far the first request's embeddings are
    from the offline ones."""
    limits = httpx.Limits(max_connections=args.clients, max_keepalive_connections=args.clients)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=600, trust_env=False) as client:
        # warm-up: one request per client, so every connection is open before the clock starts
        first_texts = workloads[0][1]
        warm = [{"model": name, "input": first_texts[i % len(first_texts)]} for i in range(args.clients)]
        await run_workload(client, warm, args.clients)
        results = []
        for (k, texts), expected in zip(workloads, offline_embeddings):
            bodies = [
                {"model": name, "input": texts[i : i + k], "encoding_format": args.encoding_format}
                for i in range(0, len(texts), k)
            ]
            got = embeddings_of(await post(client, bodies[0]))
            max_diff = float(np.abs(got - expected[:k]).max())
            wall, latencies, tokens = await run_workload(client, bodies, args.clients)
            if tokens != len(texts) * args.tokens:
                print(f"warning: the server counted {tokens} prompt tokens, not {len(texts) * args.tokens}")
            ms = np.asarray(latencies) * 1e3
            results.append(
                {
                    "http_seconds": wall,
                    "http_requests_per_s": len(bodies) / wall,
                    "http_tokens_per_s": len(texts) * args.tokens / wall,
                    "http_p50_ms": float(np.percentile(ms, 50)),
                    "http_p99_ms": float(np.percentile(ms, 99)),
                    "http_mean_ms": float(ms.mean()),
                    "max_abs_diff_vs_offline": max_diff,
                    "latencies_ms": ms.round(3).tolist(),
                }
            )
            r = results[-1]
            print(
                f"  {len(bodies)} requests of {k}: {r['http_tokens_per_s']:,.0f} tok/s, "
                f"{r['http_requests_per_s']:,.1f} req/s, p50 {r['http_p50_ms']:,.0f} ms, p99 {r['http_p99_ms']:,.0f} ms",
                flush=True,
            )
        return results


# ---------------------------------------------------------------------------------------------------------------------
# report


def table(rows: list[dict], clients: int, tokens: int) -> str:
    header = (
        f"{'workload':<30} {'requests':>8} {'req/s':>7} {'tok/s':>7} {'p50 ms':>7} {'p99 ms':>7} "
        f"{'offline tok/s':>13} {'ratio':>5}"
    )
    lines = [header, "-" * len(header)]
    for r in rows:
        label = f"{clients} clients, {r['texts_per_request']} x {tokens} tok/req"
        lines.append(
            f"{label:<30} {r['requests']:>8} {r['http_requests_per_s']:>7.1f} {r['http_tokens_per_s']:>7,.0f} "
            f"{r['http_p50_ms']:>7,.0f} {r['http_p99_ms']:>7,.0f} {r['offline_tokens_per_s']:>13,.0f} "
            f"{r['ratio']:>5.2f}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    import jax

    run_began = time.perf_counter()
    engine_args = {"max_num_seqs": args.max_num_seqs, "max_num_batched_tokens": args.max_num_batched_tokens}
    llm = LLM(args.model, runner="pooling", progress=False, **{k: v for k, v in engine_args.items() if v})
    engine = llm.engine
    if args.tokens > engine.max_model_len:
        raise SystemExit(f"error: --tokens {args.tokens} is over the model's max_model_len {engine.max_model_len}")
    device = jax.devices()[0]
    print(
        f"{args.model} on {device.platform} ({device.device_kind}): load {engine.startup.load_seconds:.1f} s, "
        f"compile {engine.startup.compile_seconds:.1f} s; max_num_seqs "
        f"{engine.runner.shape.max_num_seqs}, max_num_batched_tokens {engine.runner.shape.max_num_batched_tokens}",
        flush=True,
    )

    rng = np.random.default_rng(args.seed)
    words = single_token_words(llm)
    workloads = [
        (k, texts_of(words, [args.tokens] * (k * n), rng)) for k, n in zip(args.texts_per_request, args.requests)
    ]
    tokenizer = llm.get_tokenizer()
    for _, texts in workloads:
        lengths = {len(tokenizer.encode(t)) for t in texts}
        if lengths != {args.tokens}:
            raise SystemExit(f"error: the texts tokenize to {sorted(lengths)} tokens, not {args.tokens}")

    def offline(when: str) -> list[tuple[float, np.ndarray]]:
        print(f"offline, {when} (LLM.embed, the texts of a workload in one call):", flush=True)
        measured = []
        for k, texts in workloads:
            seconds, embeddings = offline_seconds(llm, texts)
            measured.append((seconds, embeddings))
            print(f"  {len(texts)} texts (for {k} per request): {len(texts) * args.tokens / seconds:,.0f} tok/s")
        return measured

    llm.embed(workloads[0][1][: 2 * args.clients], use_tqdm=False)  # warm-up
    before = offline("before HTTP")
    print(f"http (/v1/embeddings, {args.clients} concurrent clients):", flush=True)
    async_engine = AsyncEngine(engine)  # its thread owns the engine until shutdown: no `llm` calls meanwhile
    try:
        served = ServedModel.from_engine([args.model], args.model, async_engine, "auto")
        with background_server([served]) as url:
            http = asyncio.run(http_path(url, args.model, args, workloads, [e for _, e in before]))
    except HTTPFailure as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    finally:
        async_engine.shutdown()
    after = offline("after HTTP")
    wall = time.perf_counter() - run_began

    rows = []
    for (k, texts), n, (before_s, _), (after_s, _), h in zip(workloads, args.requests, before, after, http):
        tokens = len(texts) * args.tokens
        offline_s = (before_s + after_s) / 2
        rows.append(
            {
                "texts_per_request": k,
                "requests": n,
                "texts": len(texts),
                "tokens": tokens,
                **h,
                "offline_seconds_before": before_s,
                "offline_seconds_after": after_s,
                "offline_tokens_per_s": tokens / offline_s,
                "ratio": offline_s / h["http_seconds"],
            }
        )
    print()
    print(table(rows, args.clients, args.tokens))
    print(
        "\nratio: HTTP tok/s over offline tok/s (the mean of the runs before and after HTTP); target >= 0.8. "
        f"Whole run {wall:.0f} s."
    )
    worst = max(r["max_abs_diff_vs_offline"] for r in rows)
    print(f"max |HTTP - offline| over the checked embeddings: {worst:.1e}")

    if args.json:
        report = {
            "model": args.model,
            "clients": args.clients,
            "tokens_per_text": args.tokens,
            "encoding_format": args.encoding_format,
            "max_num_seqs": engine.runner.shape.max_num_seqs,
            "max_num_batched_tokens": engine.runner.shape.max_num_batched_tokens,
            "device": f"{device.platform}: {device.device_kind}",
            "platform": platform.platform(),
            "host": platform.node(),
            "python": platform.python_version(),
            "versions": {p: package_version(p) for p in ("jaxserve", "jax", "uvicorn", "fastapi", "httpx")},
            "wall_seconds": wall,
            "results": rows,
        }
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
            f.write("\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
