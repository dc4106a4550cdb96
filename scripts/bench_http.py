"""What the HTTP server adds to a request: the latency of a 1-token chat completion (a short user message,
`max_tokens=1`, temperature 0) sent through the OpenAI server, against the same request sent to `AsyncEngine`
directly, in the same process and on the same engine.

One engine is built and wrapped in one `AsyncEngine`; the server (uvicorn, in a background thread, on a free
loopback port) serves that same `AsyncEngine`, so the two paths differ only in the HTTP layer:

- direct: render the chat template and tokenize (inside the timed region, because the server does both for
  every request), then `AsyncEngine.generate` until the request finishes. The requests run on a private event
  loop owned by the main thread (`loop.run_until_complete`, one loop for the whole run), and each one is timed
  inside its coroutine, so neither an event-loop start-up (as with `asyncio.run` per request) nor a thread
  hand-off (as with `run_coroutine_threadsafe`) is counted. The template is rendered inline: the server's
  hop to a worker thread for it is part of what the server adds.
- http: POST /v1/chat/completions (non-streaming) through one keep-alive `httpx.Client`, created once, or with
  `--client openai` through the official `openai` client; timed from the call to the parsed response, so the
  client's request building and JSON parsing count as well as uvicorn, FastAPI, validation and the response.

The sampling parameters are the ones the server derives for the request: temperature 0 and max_tokens 1 over
the model's generation_config defaults, with delta outputs. Requests go one at a time, the two paths alternating
(direct, http, direct, ...) so that drift on a busy machine falls on both alike, after `--warmup` requests of
each. The table gives p50, p90, mean, min and max per path in milliseconds, and the difference of p50, p90 and
mean: what the server adds. Because the paths alternate, the median of the paired differences (each http
request minus the direct request just before it) is printed too; it is the steadier figure on a noisy machine.

    python scripts/bench_http.py [--model NAME_OR_PATH] [--max-model-len 2048] [--requests 50] [--warmup 5]
                                 [--client httpx|openai] [--message TEXT] [--json out.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import platform
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from importlib.metadata import PackageNotFoundError, version

import httpx
import numpy as np

from jaxserve.async_engine import AsyncEngine
from jaxserve.config import EngineConfig
from jaxserve.llm import create_engine
from jaxserve.model_source import DEFAULT_GENERATE_MODEL
from jaxserve.sampling_params import RequestOutputKind, SamplingParams
from jaxserve.server.launch import background_server
from jaxserve.server.served_models import ServedModel

DEFAULT_MESSAGE = "What is the capital of France?"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=(
            "Latency of a 1-token chat completion through the HTTP server against the same request sent to "
            "AsyncEngine directly (same engine, same process); prints p50/p90/mean per path and the difference."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "--model", default=DEFAULT_GENERATE_MODEL, metavar="NAME_OR_PATH", help="generation model: a name or a folder"
    )
    parser.add_argument(
        "--max-model-len",
        type=int,
        default=2048,
        metavar="N",
        help="context length of the engine (small: faster start-up)",
    )
    parser.add_argument("--requests", type=int, default=50, metavar="N", help="timed requests per path")
    parser.add_argument(
        "--warmup", type=int, default=5, metavar="N", help="untimed requests per path before the timed ones"
    )
    parser.add_argument(
        "--client",
        choices=["httpx", "openai"],
        default="httpx",
        help="HTTP client: one keep-alive httpx.Client posting JSON, or the official openai client",
    )
    parser.add_argument("--message", default=DEFAULT_MESSAGE, metavar="TEXT", help="the user message of every request")
    parser.add_argument("--access-log", action="store_true", help="keep uvicorn's access log on (printed per request)")
    parser.add_argument("--json", metavar="PATH", help="also write the settings, samples and statistics here")
    args = parser.parse_args(argv)
    if args.requests < 1:
        parser.error("--requests must be at least 1")
    if args.warmup < 0:
        parser.error("--warmup must not be negative")
    return args


# ---------------------------------------------------------------------------------------------------------------------
# the server


@contextmanager
def serve(async_engine: AsyncEngine, name: str, root: str, access_log: bool) -> Iterator[str]:
    """The OpenAI server over `async_engine`, under uvicorn in a daemon thread; yields its base URL."""
    served = ServedModel.from_engine([name], root, async_engine, "auto")
    with background_server([served], access_log=access_log) as url:
        yield url


# ---------------------------------------------------------------------------------------------------------------------
# the two paths: each returns a callable that sends one request and gives back (seconds, text, prompt tokens)

Request = Callable[[], tuple[float, str, int]]


def direct_path(async_engine: AsyncEngine, loop: asyncio.AbstractEventLoop, message: str) -> Request:
    tokenizer = async_engine.tokenizer
    core = async_engine.engine
    params = SamplingParams(
        **{**core.sampling_defaults, "temperature": 0.0, "max_tokens": 1, "output_kind": RequestOutputKind.DELTA}
    )
    messages = [{"role": "user", "content": message}]
    counter = iter(range(sys.maxsize))

    async def one() -> tuple[float, str, int]:
        began = time.perf_counter()
        text = tokenizer.render_chat(messages, add_generation_prompt=True)
        token_ids = tokenizer.encode(text, add_special_tokens=False)  # as the chat route does by default
        completion = ""
        async for output in async_engine.generate(token_ids, params, f"bench-direct-{next(counter)}", text):
            completion += output.outputs[0].text
        return time.perf_counter() - began, completion, len(token_ids)

    return lambda: loop.run_until_complete(one())


def httpx_path(base_url: str, name: str, message: str) -> tuple[Request, Callable[[], None]]:
    client = httpx.Client(base_url=base_url, timeout=120, trust_env=False)
    body = {"model": name, "messages": [{"role": "user", "content": message}], "max_tokens": 1, "temperature": 0}

    def one() -> tuple[float, str, int]:
        began = time.perf_counter()
        response = client.post("/v1/chat/completions", json=body)
        response.raise_for_status()
        reply = response.json()
        elapsed = time.perf_counter() - began
        return elapsed, reply["choices"][0]["message"]["content"] or "", reply["usage"]["prompt_tokens"]

    return one, client.close


def openai_path(base_url: str, name: str, message: str) -> tuple[Request, Callable[[], None]]:
    import openai

    http_client = openai.DefaultHttpxClient(trust_env=False)
    client = openai.OpenAI(
        base_url=f"{base_url}/v1", api_key="EMPTY", max_retries=0, timeout=120, http_client=http_client
    )
    messages = [{"role": "user", "content": message}]

    def one() -> tuple[float, str, int]:
        began = time.perf_counter()
        reply = client.chat.completions.create(model=name, messages=messages, max_tokens=1, temperature=0)
        elapsed = time.perf_counter() - began
        return elapsed, reply.choices[0].message.content or "", reply.usage.prompt_tokens

    return one, client.close


# ---------------------------------------------------------------------------------------------------------------------
# statistics and report


def stats_ms(seconds: list[float]) -> dict[str, float]:
    ms = np.asarray(seconds) * 1e3
    return {
        "p50": float(np.percentile(ms, 50)),
        "p90": float(np.percentile(ms, 90)),
        "mean": float(ms.mean()),
        "min": float(ms.min()),
        "max": float(ms.max()),
    }


def table(rows: list[tuple[str, dict[str, float]]]) -> str:
    columns = ["p50", "p90", "mean", "min", "max"]
    width = max(len(label) for label, _ in rows)
    lines = [f"{'ms':<{width}}  " + "  ".join(f"{c:>8}" for c in columns)]
    for label, values in rows:
        cells = (f"{values[c]:>8.2f}" if c in values else f"{'-':>8}" for c in columns)
        lines.append(f"{label:<{width}}  " + "  ".join(cells))
    return "\n".join(lines)


def package_version(name: str) -> str | None:
    try:
        return version(name)
    except PackageNotFoundError:
        return None


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    import jax

    began = time.perf_counter()
    async_engine = AsyncEngine(create_engine(EngineConfig(model=args.model, max_model_len=args.max_model_len)))
    print(f"engine ready in {time.perf_counter() - began:.1f}s: {args.model} on {jax.default_backend()}", flush=True)
    name = args.model
    loop = asyncio.new_event_loop()
    try:
        with serve(async_engine, name, args.model, args.access_log) as base_url:
            direct = direct_path(async_engine, loop, args.message)
            make_http = openai_path if args.client == "openai" else httpx_path
            http, close_http = make_http(base_url, name, args.message)
            try:
                for _ in range(args.warmup):
                    direct()
                    http()
                _, direct_text, direct_prompt = direct()
                _, http_text, http_prompt = http()
                if (direct_text, direct_prompt) != (http_text, http_prompt):
                    print(
                        f"warning: the paths differ: direct {direct_prompt} prompt tokens -> {direct_text!r}, "
                        f"http {http_prompt} prompt tokens -> {http_text!r}",
                        file=sys.stderr,
                    )
                direct_s: list[float] = []
                http_s: list[float] = []
                for _ in range(args.requests):
                    direct_s.append(direct()[0])
                    http_s.append(http()[0])
            finally:
                close_http()
    finally:
        loop.close()
        async_engine.shutdown()

    direct_stats, http_stats = stats_ms(direct_s), stats_ms(http_s)
    added = {key: http_stats[key] - direct_stats[key] for key in ("p50", "p90", "mean")}
    print()
    print(
        f"1-token chat completion, {direct_prompt} prompt tokens -> {direct_text!r}; {args.requests} sequential "
        f"requests per path after {args.warmup} warm-up"
    )
    print(table([("direct (AsyncEngine)", direct_stats), (f"http ({args.client})", http_stats), ("added", added)]))
    share = added["p50"] / direct_stats["p50"] * 100
    paired = float(np.median(np.subtract(http_s, direct_s)) * 1e3)
    print(
        f"\nThe server adds {added['p50']:.2f} ms per request at p50 ({share:+.0f}% over the direct path); "
        f"median of the paired differences (each http request minus the direct one just before it): {paired:.2f} ms."
    )

    if args.json:
        report = {
            "model": args.model,
            "max_model_len": args.max_model_len,
            "client": args.client,
            "message": args.message,
            "prompt_tokens": direct_prompt,
            "completion": direct_text,
            "requests": args.requests,
            "warmup": args.warmup,
            "backend": jax.default_backend(),
            "platform": platform.platform(),
            "python": platform.python_version(),
            "versions": {pkg: package_version(pkg) for pkg in ("jaxserve", "jax", "uvicorn", "fastapi", "httpx")}
            | ({"openai": package_version("openai")} if args.client == "openai" else {}),
            "direct_ms": direct_stats,
            "http_ms": http_stats,
            "added_ms": added,
            "added_paired_median_ms": paired,
            "samples_ms": {"direct": [s * 1e3 for s in direct_s], "http": [s * 1e3 for s in http_s]},
        }
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
            f.write("\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
