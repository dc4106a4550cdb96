"""Soak test of the OpenAI server: many concurrent clients for a while, then checks that nothing leaked or drifted.

For `--duration` seconds, `--clients` generation clients (streaming completions and chat completions, a few not
streamed) and `--embedding-clients` embedding clients send requests back to back over loopback. Along the way:

- a share of streams (`--disconnect-rate`) is dropped by the client: after a random number of chunks, or before
  the response starts;
- a share of requests (`--bad-rate`) is a bad request: malformed or non-UTF-8 JSON, wrong types, negative or
  zero counts, an unknown model, a prompt longer than the context, lone surrogates ("\\ud800"), unknown routes;
- /metrics is read every `--metrics-interval` seconds (and the gauges must stay in range).

Every request is greedy (temperature 0) and comes from a fixed set of prompts whose answers were first computed
one at a time, alone on the server, before the load. At the end the script checks:

1. every completed answer (text, finish reason, completion tokens) equals its sequential answer, and the
   sequential answers computed again after the load equal those computed before it;
2. every embedding equals the embedding of its text sent alone, within `--embedding-atol`;
3. once the clients stop, `vllm:kv_cache_usage_perc`, `vllm:num_requests_running` and
   `vllm:num_requests_waiting` go back to 0 (within `--settle` seconds): no KV page and no request leaked;
4. the resident memory of the process hosting the server grew by at most `--max-rss-growth-mib` from the start of
   the load to the end;
5. no response was a 5xx, every good request succeeded (no error event in a stream, no unexpected status, no
   dropped connection the client did not drop itself);
6. every bad request got a 4xx (the expected one where there is one: 404 for an unknown model) whose body is the
   OpenAI error envelope `{"error": {"message", "type", "param", "code"}}`.

It prints a JSON summary (requests by kind, disconnects, bad requests, mismatches, 5xx, RSS start/end, duration,
the failed checks) and exits 1 if any check failed.

By default it serves the tiny random-weight test models (tiny-llama and tiny-bert-mean, built by
scripts/make_test_models.py) in this process, with small engine settings that suit a 2-core CPU; `--model` and
`--embedding-model` serve other folders or names instead. With `--url` it targets a server already running: then
`--model` and `--embedding-model` are served names (default: the first listed model, and no embedding clients),
and the RSS check reads /proc/PID/status of `--pid` (skipped without it).

    python scripts/soak.py --duration 300 --clients 32 --embedding-clients 8
    python scripts/soak.py --url http://127.0.0.1:8000 --pid 12345 --model my-llm --embedding-model my-embedder
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import gc
import json
import os
import random
import sys
import textwrap
import time
from collections import Counter, defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
TEST_MODELS = Path(os.environ.get("JAXSERVE_TEST_CACHE", ROOT / ".cache")) / "test-models"

# engine settings for serving in-process: as the tests' tiny engines (tests/conftest.py), small enough for 2 cores
GENERATE_ENGINE = dict(max_model_len=256, max_num_seqs=8, max_num_batched_tokens=64, num_kv_pages=48)
POOLING_ENGINE = dict(runner="pooling", max_num_seqs=16, max_num_batched_tokens=256)

GAUGES = ("vllm:kv_cache_usage_perc", "vllm:num_requests_running", "vllm:num_requests_waiting")
COUNTERS = {  # reported as their growth over the load, not checked
    "vllm:num_preemptions_total": "preemptions",
    "vllm:prefix_cache_hits_total": "prefix_cache_hit_tokens",
    "jaxserve:compiles_after_warmup_total": "compiles_after_warmup",
}
ENVELOPE_KEYS = {"message", "type", "param", "code"}
MAX_LISTED = 20  # failures of each sort listed in the report; the counts count them all

# the prompts: short and long (the long ones take several prefill chunks at --max-num-batched-tokens 64), some
# sharing a long prefix (prefix caching), some with non-ASCII text (incremental detokenization)
_STORY = (
    "The lighthouse keeper climbed the spiral stairs every evening at dusk, counting the one hundred and twelve "
    "steps, checking the brass lamp, the wick, the oil and the great lens that threw its beam across the bay "
    "to the fishing boats coming home through the fog and the rain."
)
PROMPTS = [
    "Once upon a time",
    "The capital of France is",
    "def fibonacci(n):",
    "List three colours:",
    "Translate to German: good morning, how are you?",
    "Les élèves écrivent: 日本語のテキスト and emoji 🚀✨ mixed in",
    f"{_STORY} What did the keeper check first?",
    f"{_STORY} How many steps were there?",
    f"{_STORY} Summarize the story in one line.",
    "1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20,",
    "Q: Why is the sky blue?\nA:",
    "Write a haiku about the sea.",
]
TEXTS = [
    "The cat sits outside.",
    "A man is playing guitar in the park today.",
    "Pasta!",
    "Quantum bits and bytes",
    "Über den Wolken muss die Freiheit wohl grenzenlos sein.",
    "東京は日本の首都です。",
    "The lighthouse keeper climbed the spiral stairs every evening at dusk, counting the steps.",
    "a",
    "Embeddings map text to vectors; similar texts land close together in that space.",
    "🚀 launch at dawn",
]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=textwrap.fill(
            "Soak test of the OpenAI server: concurrent streaming generation and embedding clients, with random "
            "client disconnects and bad requests, for --duration seconds; then checks that every greedy answer "
            "equals its sequential answer, every embedding its single-text one, the KV-cache and request gauges "
            "are back at 0, the server's RSS grew by at most --max-rss-growth-mib, no response was a 5xx and every "
            "bad request got a 4xx in the OpenAI error envelope. Prints a JSON summary; exits 1 if a check failed.",
            width=100,
        ),
        epilog=(
            "examples:\n"
            "  python scripts/soak.py --duration 300 --clients 32 --embedding-clients 8\n"
            "  python scripts/soak.py --url http://127.0.0.1:8000 --pid 12345 --model my-llm "
            "--embedding-model my-embedder\n\n"
            "The module docstring (scripts/soak.py) describes each check."
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    target = parser.add_argument_group("what to load (default: the tiny test models, served in this process)")
    target.add_argument("--url", metavar="URL", help="soak this running server instead (its root, without /v1)")
    target.add_argument(
        "--pid", type=int, metavar="PID", help="with --url: the server's process id, to read its RSS (else unchecked)"
    )
    target.add_argument(
        "--model",
        metavar="PATH",
        help="generation model: a folder or name to serve (default: the tiny-llama test model); with --url, a "
        "served name (default: the first model /v1/models lists)",
    )
    target.add_argument(
        "--embedding-model",
        metavar="PATH",
        help="embedding model: a folder or name to serve (default: the tiny-bert-mean test model); with --url, a "
        "served name (default: none, and no embedding clients)",
    )
    engine = parser.add_argument_group("the generation engine served in this process (not with --url)")
    defaults = GENERATE_ENGINE
    engine.add_argument(
        "--max-model-len", type=int, default=defaults["max_model_len"], metavar="N", help="context length (%(default)s)"
    )
    engine.add_argument(
        "--max-num-seqs", type=int, default=defaults["max_num_seqs"], metavar="N", help="batch size (%(default)s)"
    )
    engine.add_argument(
        "--max-num-batched-tokens",
        type=int,
        default=defaults["max_num_batched_tokens"],
        metavar="N",
        help="tokens per step; longer prompts are prefilled in chunks (%(default)s)",
    )
    engine.add_argument(
        "--num-kv-pages",
        type=int,
        default=defaults["num_kv_pages"],
        metavar="N",
        help="KV-cache pages of 16 tokens; the default is small enough that the pool fills and requests get "
        "preempted (%(default)s)",
    )
    load = parser.add_argument_group("the load")
    load.add_argument("--duration", type=float, default=60.0, metavar="S", help="seconds of load (%(default)s)")
    load.add_argument(
        "--clients", type=int, default=16, metavar="N", help="concurrent generation clients (%(default)s)"
    )
    load.add_argument(
        "--embedding-clients", type=int, default=4, metavar="N", help="concurrent embedding clients (%(default)s)"
    )
    load.add_argument(
        "--disconnect-rate",
        type=float,
        default=0.15,
        metavar="P",
        help="share of requests the client drops mid-stream or before the response (%(default)s)",
    )
    load.add_argument(
        "--bad-rate", type=float, default=0.1, metavar="P", help="share of requests that are bad (%(default)s)"
    )
    load.add_argument(
        "--stream-rate",
        type=float,
        default=0.85,
        metavar="P",
        help="share of generation requests that stream (%(default)s)",
    )
    load.add_argument(
        "--prompts",
        type=int,
        default=len(PROMPTS),
        metavar="N",
        help="distinct prompts, each sent as a completion and as a chat (%(default)s, the most)",
    )
    load.add_argument(
        "--max-tokens",
        type=int,
        default=48,
        metavar="N",
        help="longest answer; each prompt has its own max_tokens up to this (%(default)s)",
    )
    load.add_argument(
        "--metrics-interval",
        type=float,
        default=1.0,
        metavar="S",
        help="seconds between reads of /metrics (%(default)s)",
    )
    load.add_argument("--seed", type=int, default=0, help="seeds the prompts' settings and the clients' choices")
    checks = parser.add_argument_group("the checks")
    checks.add_argument(
        "--max-rss-growth-mib",
        type=float,
        default=256.0,
        metavar="MIB",
        help="most the server process's RSS may grow from the start of the load to its end (%(default)s)",
    )
    checks.add_argument(
        "--embedding-atol",
        type=float,
        default=1e-4,
        metavar="X",
        help="largest absolute difference allowed between an embedding and its single-text one (%(default)s)",
    )
    checks.add_argument(
        "--settle",
        type=float,
        default=30.0,
        metavar="S",
        help="seconds the gauges may take to reach 0 once the clients have stopped (%(default)s)",
    )
    checks.add_argument(
        "--request-timeout",
        type=float,
        default=300.0,
        metavar="S",
        help="longest wait for a response; a longer one is an error (%(default)s)",
    )
    parser.add_argument("--json", metavar="PATH", help="also write the JSON summary to this file")
    args = parser.parse_args(argv)
    for name in ("disconnect_rate", "bad_rate", "stream_rate"):
        if not 0 <= getattr(args, name) <= 1:
            parser.error(f"--{name.replace('_', '-')} must be between 0 and 1")
    if (
        args.duration <= 0
        or args.clients < 0
        or args.embedding_clients < 0
        or args.clients + args.embedding_clients < 1
    ):
        parser.error("--duration must be positive and there must be at least one client")
    if not 1 <= args.prompts <= len(PROMPTS):
        parser.error(f"--prompts must be between 1 and {len(PROMPTS)}")
    if args.max_tokens < 1:
        parser.error("--max-tokens must be at least 1")
    if args.pid is not None and not args.url:
        parser.error("--pid goes with --url (in this process, the script reads its own RSS)")
    return args


# --- the report ------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class SoakReport:
    """What a soak run did and found. `failures` lists the checks that failed; empty: all passed."""

    url: str
    model: str
    embedding_model: str | None
    duration_s: float = 0.0
    clients: int = 0
    embedding_clients: int = 0
    requests: Counter = dataclasses.field(default_factory=Counter)  # by kind, sent (bad and metrics included)
    completed: Counter = dataclasses.field(default_factory=Counter)  # by kind, answered in full and compared
    disconnects: Counter = dataclasses.field(default_factory=Counter)  # by when the client dropped the request
    bad_requests: defaultdict = dataclasses.field(default_factory=lambda: defaultdict(Counter))  # kind -> statuses
    statuses: Counter = dataclasses.field(default_factory=Counter)  # every HTTP status received
    references: int = 0  # distinct sequential answers (generation) and single-text embeddings
    mismatches: list[dict] = dataclasses.field(default_factory=list)  # answers unequal to their sequential one
    reference_drift: list[dict] = dataclasses.field(default_factory=list)  # sequential answers unequal after load
    embedding_mismatches: list[dict] = dataclasses.field(default_factory=list)
    max_embedding_diff: float = 0.0
    server_errors: list[dict] = dataclasses.field(default_factory=list)  # 5xx responses
    errors: list[dict] = dataclasses.field(default_factory=list)  # good requests that failed another way
    bad_request_failures: list[dict] = dataclasses.field(default_factory=list)  # not a 4xx in the envelope
    metrics_reads: int = 0
    metrics_failures: list[dict] = dataclasses.field(default_factory=list)  # gauges out of range, unreadable
    gauges_max: dict[str, float] = dataclasses.field(default_factory=dict)  # highest value read during the load
    gauges_end: dict[str, float] = dataclasses.field(default_factory=dict)  # last value read after the load
    settle_s: float | None = None  # seconds after the load until the gauges read 0
    counters: dict[str, float] = dataclasses.field(default_factory=dict)  # COUNTERS' growth from start to end
    rss_start_mib: float | None = None
    rss_end_mib: float | None = None
    rss_peak_mib: float | None = None
    max_rss_growth_mib: float | None = None
    counts: dict[str, int] = dataclasses.field(default_factory=dict)  # of each failure list, before truncation
    failures: list[str] = dataclasses.field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.failures

    def note(self, name: str, entry: dict) -> None:
        """Add `entry` to the list `name`, keeping the first MAX_LISTED and counting all."""
        self.counts[name] = self.counts.get(name, 0) + 1
        listed = getattr(self, name)
        if len(listed) < MAX_LISTED:
            listed.append(entry)

    def count(self, name: str) -> int:
        return self.counts.get(name, 0)

    def judge(self) -> None:
        """Fill `failures` from what was recorded."""
        checks = [
            ("mismatches", "completed answers differ from their sequential answer"),
            ("reference_drift", "sequential answers after the load differ from those before it"),
            ("embedding_mismatches", "embeddings differ from their single-text embedding"),
            ("server_errors", "responses were 5xx"),
            ("errors", "good requests failed"),
            ("bad_request_failures", "bad requests did not get a 4xx in the OpenAI error envelope"),
            ("metrics_failures", "reads of /metrics failed or showed gauges out of range"),
        ]
        self.failures = [f"{self.count(name)} {what}" for name, what in checks if self.count(name)]
        if sum(self.completed.values()) == 0:
            self.failures.append("no request completed")
        nonzero = {name: value for name, value in self.gauges_end.items() if value != 0}
        if nonzero or not self.gauges_end:
            self.failures.append(f"the gauges did not return to 0 after the load: {nonzero or 'never read'}")
        if self.rss_growth_mib is not None and self.max_rss_growth_mib is not None:
            if self.rss_growth_mib > self.max_rss_growth_mib:
                self.failures.append(
                    f"RSS grew by {self.rss_growth_mib:.1f} MiB, more than {self.max_rss_growth_mib:.1f} MiB"
                )

    @property
    def rss_growth_mib(self) -> float | None:
        if self.rss_start_mib is None or self.rss_end_mib is None:
            return None
        return self.rss_end_mib - self.rss_start_mib

    def summary(self) -> dict[str, Any]:
        """The JSON summary: figures first, then the (truncated) lists of what went wrong."""
        return {
            "ok": self.ok,
            "failures": self.failures,
            "url": self.url,
            "model": self.model,
            "embedding_model": self.embedding_model,
            "duration_s": round(self.duration_s, 1),
            "clients": self.clients,
            "embedding_clients": self.embedding_clients,
            "requests": dict(sorted(self.requests.items())),
            "requests_total": sum(self.requests.values()),
            "completed": dict(sorted(self.completed.items())),
            "disconnects": dict(sorted(self.disconnects.items())),
            "disconnects_total": sum(self.disconnects.values()),
            "bad_requests": {
                name: {str(status): n for status, n in sorted(statuses.items(), key=lambda item: str(item[0]))}
                for name, statuses in sorted(self.bad_requests.items())
            },
            "bad_requests_total": sum(sum(statuses.values()) for statuses in self.bad_requests.values()),
            "statuses": {str(k): v for k, v in sorted(self.statuses.items())},
            "references": self.references,
            "mismatches": self.count("mismatches"),
            "reference_drift": self.count("reference_drift"),
            "embedding_mismatches": self.count("embedding_mismatches"),
            "max_embedding_diff": self.max_embedding_diff,
            "server_errors_5xx": self.count("server_errors"),
            "errors": self.count("errors"),
            "bad_request_failures": self.count("bad_request_failures"),
            "metrics_reads": self.metrics_reads,
            "metrics_failures": self.count("metrics_failures"),
            "gauges_max": self.gauges_max,
            "gauges_end": self.gauges_end,
            "settle_s": None if self.settle_s is None else round(self.settle_s, 2),
            **self.counters,
            "rss_start_mib": _round(self.rss_start_mib),
            "rss_end_mib": _round(self.rss_end_mib),
            "rss_peak_mib": _round(self.rss_peak_mib),
            "rss_growth_mib": _round(self.rss_growth_mib),
            "max_rss_growth_mib": self.max_rss_growth_mib,
            "details": {
                name: getattr(self, name)
                for name in (
                    "mismatches",
                    "reference_drift",
                    "embedding_mismatches",
                    "server_errors",
                    "errors",
                    "bad_request_failures",
                    "metrics_failures",
                )
                if getattr(self, name)
            },
        }


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 1)


def rss_mib(pid: int) -> float | None:
    """Resident memory of process `pid` in MiB (VmRSS of /proc/PID/status), or None where unreadable."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


# --- the requests ----------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class GenItem:
    """One greedy request of the fixed set: `key` names it; its answer must always be the same."""

    key: str
    path: str  # /v1/completions or /v1/chat/completions
    body: dict  # without "stream"

    @property
    def chat(self) -> bool:
        return self.path.endswith("/chat/completions")


@dataclasses.dataclass(frozen=True)
class Answer:
    text: str
    finish_reason: str | None
    completion_tokens: int | None

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


def generation_items(model: str, num_prompts: int, max_tokens: int, seed: int) -> list[GenItem]:
    """Each prompt as a completion and as a chat, each with its own max_tokens, ignore_eos and whether it turns a
    default repetition penalty off (seeded)."""
    rng = random.Random(seed)
    items = []
    for i, prompt in enumerate(PROMPTS[:num_prompts]):
        for chat in (False, True):
            fields = {
                "model": model,
                "max_tokens": rng.randint(max(1, max_tokens // 4), max_tokens),
                "temperature": 0,
                "ignore_eos": rng.random() < 0.5,
            }
            if rng.random() < 0.5:  # a repetition penalty (as generation_config.json may set) keeps the prefix
                fields["repetition_penalty"] = 1.0  # cache out of a request; without one it reads it
            if chat:
                body = {"messages": [{"role": "user", "content": prompt}], **fields}
                items.append(GenItem(f"chat/{i}", "/v1/chat/completions", body))
            else:
                items.append(GenItem(f"completion/{i}", "/v1/completions", {"prompt": prompt, **fields}))
    return items


class Dropped(Exception):
    """The client dropped the request on purpose."""


async def generate(
    client: httpx.AsyncClient, item: GenItem, stream: bool, drop_after: int | None = None
) -> tuple[int, Answer | dict]:
    """Send `item`; return (status, its answer), or (status, the error body) for a non-200 or an error event.
    With `drop_after`, close the stream after that many chunks (raises Dropped)."""
    body = {**item.body, "stream": stream}
    if stream:
        body["stream_options"] = {"include_usage": True}
    if not stream:
        response = await client.post(item.path, json=body)
        data = _json_or_text(response.content)
        if response.status_code != 200:
            return response.status_code, data
        choice = data["choices"][0]
        text = choice["message"]["content"] if item.chat else choice["text"]
        return 200, Answer(text or "", choice["finish_reason"], (data.get("usage") or {}).get("completion_tokens"))
    parts: list[str] = []
    finish_reason = usage = None
    chunks = 0
    async with client.stream("POST", item.path, json=body) as response:
        if response.status_code != 200:
            return response.status_code, _json_or_text(await response.aread())
        if drop_after == 0:
            raise Dropped
        done = False
        async for line in response.aiter_lines():
            if not line.startswith("data:"):
                continue
            payload = line[len("data:") :].strip()
            if payload == "[DONE]":
                done = True
                break
            event = json.loads(payload)
            if "error" in event:
                return response.status_code, event
            chunks += 1
            if drop_after is not None and chunks >= drop_after:
                raise Dropped
            usage = event.get("usage") or usage
            for choice in event.get("choices") or []:
                parts.append((choice.get("delta") or {}).get("content") or "" if item.chat else choice.get("text", ""))
                finish_reason = choice.get("finish_reason") or finish_reason
        if not done:
            return response.status_code, {"error": "the stream ended without [DONE]"}
    return 200, Answer("".join(parts), finish_reason, (usage or {}).get("completion_tokens"))


async def embed(client: httpx.AsyncClient, model: str, texts: list[str]) -> tuple[int, list[np.ndarray] | dict]:
    response = await client.post("/v1/embeddings", json={"model": model, "input": texts})
    data = _json_or_text(response.content)
    if response.status_code != 200:
        return response.status_code, data
    rows = sorted(data["data"], key=lambda row: row["index"])
    return 200, [np.asarray(row["embedding"], dtype=np.float64) for row in rows]


def _json_or_text(content: bytes) -> Any:
    try:
        return json.loads(content)
    except ValueError:
        return content.decode(errors="replace")[:500]


@dataclasses.dataclass(frozen=True)
class BadRequest:
    """A request the server must refuse with a 4xx (`status`, when a particular one is due) in the envelope.
    `body`: bytes are sent as they are, anything else as JSON."""

    name: str
    path: str
    body: Any = None
    status: int | None = None
    method: str = "POST"

    def content(self) -> bytes | None:
        if self.body is None or isinstance(self.body, bytes):
            return self.body
        return encode_json(self.body)


def bad_requests(model: str, embedding_model: str | None, max_model_len: int) -> list[BadRequest]:
    """The catalogue of bad requests; one is drawn at random each time. Those without an expected status (the
    text is not valid Unicode) may get any 4xx."""
    long_prompt = "hello " * (2 * max_model_len + 16)  # more tokens than the context holds, in any tokenizer
    cmpl, chat, emb = "/v1/completions", "/v1/chat/completions", "/v1/embeddings"
    name = json.dumps(model).encode()
    gen = {"model": model, "max_tokens": 4}
    hi = {**gen, "prompt": "hi"}
    user = {**gen, "messages": [{"role": "user", "content": "hi"}]}
    cases = [
        BadRequest("malformed-json", cmpl, b'{"model": "x", "prompt": "hi", ', 400),
        BadRequest("json-not-an-object", cmpl, b"[1, 2, 3]", 400),
        BadRequest("empty-body", chat, b"", 400),
        BadRequest("invalid-utf8", cmpl, b'{"model": %s, "prompt": "\xff\xfe", "max_tokens": 4}' % name),
        BadRequest("utf8-encoded-surrogate", cmpl, b'{"model": %s, "prompt": "\xed\xa0\x80", "max_tokens": 4}' % name),
        BadRequest("lone-surrogate-prompt", cmpl, {**gen, "prompt": "a\ud800b"}),
        BadRequest("lone-surrogate-chat", chat, {**gen, "messages": [{"role": "user", "content": "\udfff"}]}),
        BadRequest("wrong-type-max-tokens", cmpl, {**hi, "max_tokens": "ten"}, 400),
        BadRequest("wrong-type-temperature", cmpl, {**hi, "temperature": "hot"}, 400),
        BadRequest("wrong-type-messages", chat, {**gen, "messages": "hi"}, 400),
        BadRequest("wrong-type-prompt", cmpl, {**gen, "prompt": {"text": "hi"}}, 400),
        BadRequest("missing-prompt", cmpl, gen, 400),
        BadRequest("negative-max-tokens", cmpl, {**hi, "max_tokens": -3}, 400),
        BadRequest("zero-n", chat, {**user, "n": 0}, 400),
        BadRequest("unknown-model", cmpl, {**hi, "model": "no-such-model"}, 404),
        BadRequest("unknown-model-chat", chat, {**user, "model": "no-such-model"}, 404),
        BadRequest("over-long-prompt", cmpl, {**gen, "prompt": long_prompt}, 400),
        BadRequest(
            "over-long-chat-stream",
            chat,
            {**gen, "messages": [{"role": "user", "content": long_prompt}], "stream": True},
            400,
        ),
        BadRequest("max-tokens-over-context", cmpl, {**hi, "max_tokens": 10 * max_model_len}, 400),
        BadRequest("unknown-route", "/v1/no-such-route", hi, 404),
        BadRequest("wrong-method", cmpl, None, 405, method="GET"),
    ]
    if embedding_model:
        cases += [
            BadRequest("embedding-unknown-model", emb, {"model": "no-such-model", "input": "hi"}, 404),
            BadRequest("embedding-wrong-type", emb, {"model": embedding_model, "input": {"text": "hi"}}, 400),
            BadRequest("embedding-over-long", emb, {"model": embedding_model, "input": long_prompt}, 400),
            BadRequest("embedding-lone-surrogate", emb, {"model": embedding_model, "input": ["ok", "\ud800"]}),
            BadRequest("embedding-malformed-json", emb, b'{"input": [', 400),
        ]
    return cases


def encode_json(body: Any) -> bytes:
    """JSON as bytes; lone surrogates go out escaped (`\\ud800`), as JSON allows and Python's json writes them."""
    return json.dumps(body, ensure_ascii=True).encode()


def check_envelope(status: int, body: Any) -> str | None:
    """Why `body` is not the OpenAI error envelope for `status`, or None when it is."""
    error = body.get("error") if isinstance(body, dict) else None
    if not isinstance(error, dict):
        return "no error object"
    if set(error) != ENVELOPE_KEYS:
        return f"error keys {sorted(error)}"
    if not isinstance(error["message"], str) or not isinstance(error["type"], str):
        return "message or type is not a string"
    if error["param"] is not None and not isinstance(error["param"], str):
        return "param is neither a string nor null"
    if error["code"] != status:
        return f"code {error['code']!r} is not the status {status}"
    return None


# --- the run ---------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class SoakConfig:
    """The load and the checks; see the command-line flags for what each means."""

    duration_s: float = 60.0
    clients: int = 16
    embedding_clients: int = 4
    disconnect_rate: float = 0.15
    bad_rate: float = 0.1
    stream_rate: float = 0.85
    prompts: int = len(PROMPTS)
    max_tokens: int = 48
    metrics_interval_s: float = 1.0
    seed: int = 0
    embedding_atol: float = 1e-4
    max_rss_growth_mib: float | None = 256.0
    settle_s: float = 30.0
    request_timeout_s: float = 300.0


def run_soak(
    url: str,
    model: str | None = None,
    embedding_model: str | None = None,
    config: SoakConfig | None = None,
    pid: int | None = None,
    **overrides: Any,
) -> SoakReport:
    """Soak the server at `url` (its root, without /v1) and return the report, its `failures` filled in.

    `model` and `embedding_model` are served names (`model` None: the first listed; `embedding_model` None: no
    embedding clients). `pid`: the process hosting the server, for the RSS check (None: not checked). Keyword
    `overrides` replace fields of `config`, e.g. `run_soak(url, duration_s=20, clients=8)`."""
    config = dataclasses.replace(config or SoakConfig(), **overrides)
    return asyncio.run(_soak(url, model, embedding_model, config, pid))


async def _soak(url: str, model: str | None, embedding_model: str | None, config: SoakConfig, pid: int | None):
    timeout = httpx.Timeout(config.request_timeout_s, connect=30)
    limits = httpx.Limits(max_connections=config.clients + config.embedding_clients + 8, max_keepalive_connections=64)
    async with httpx.AsyncClient(base_url=url, timeout=timeout, limits=limits, trust_env=False) as client:
        listed = (await client.get("/v1/models")).raise_for_status().json()["data"]
        cards = {card["id"]: card for card in listed}
        model = model or listed[0]["id"]
        if model not in cards:
            raise ValueError(f"the server does not serve {model!r}; it serves {sorted(cards)}")
        if embedding_model is not None and embedding_model not in cards:
            raise ValueError(f"the server does not serve {embedding_model!r}; it serves {sorted(cards)}")
        report = SoakReport(url=url, model=model, embedding_model=embedding_model)
        report.clients = config.clients
        report.embedding_clients = config.embedding_clients if embedding_model else 0
        report.max_rss_growth_mib = config.max_rss_growth_mib if pid is not None else None
        context = max(cards[name].get("max_model_len") or 2048 for name in (model, embedding_model) if name)
        soak = _Soak(client, report, config, model, embedding_model, context, pid)
        await soak.run()
    report.judge()
    return report


class _Soak:
    def __init__(self, client, report, config, model, embedding_model, max_model_len, pid):
        self.client: httpx.AsyncClient = client
        self.report: SoakReport = report
        self.config: SoakConfig = config
        self.model = model
        self.embedding_model = embedding_model
        self.pid = pid
        self.items = generation_items(model, config.prompts, config.max_tokens, config.seed)
        self.bad = bad_requests(model, embedding_model, max_model_len)
        self.answers: dict[str, Answer] = {}
        self.embeddings: dict[str, np.ndarray] = {}
        self.counters: dict[str, float] = {}  # COUNTERS as last read by wait_for_idle_gauges
        self.deadline = 0.0

    async def run(self) -> None:
        report, config = self.report, self.config
        await self.sequential_answers(self.answers)
        for text in TEXTS if self.embedding_model else ():
            status, result = await embed(self.client, self.embedding_model, [text])
            if status != 200:
                raise RuntimeError(f"embedding {text!r} alone failed with {status}: {result}")
            self.embeddings[text] = result[0]
        report.references = len(self.answers) + len(self.embeddings)
        await self.wait_for_idle_gauges(config.settle_s)  # the references' requests are gone before the start
        counters_start = self.counters
        gc.collect()
        report.rss_start_mib = self.rss()
        report.rss_peak_mib = report.rss_start_mib

        began = time.monotonic()
        self.deadline = began + config.duration_s
        clients = [self.generation_client(i) for i in range(config.clients)]
        clients += [self.embedding_client(i) for i in range(report.embedding_clients)]
        stop = asyncio.Event()
        watcher = asyncio.create_task(self.watch_metrics(stop))
        await asyncio.gather(*clients)
        report.duration_s = time.monotonic() - began
        stop.set()
        await watcher

        report.settle_s = await self.wait_for_idle_gauges(config.settle_s)
        report.counters = {
            COUNTERS[name]: self.counters.get(name, 0) - counters_start.get(name, 0) for name in COUNTERS
        }
        gc.collect()
        report.rss_end_mib = self.rss()
        if report.rss_end_mib is not None and report.rss_peak_mib is not None:
            report.rss_peak_mib = max(report.rss_peak_mib, report.rss_end_mib)
        after: dict[str, Answer] = {}
        await self.sequential_answers(after)
        for key, answer in after.items():
            if answer != self.answers[key]:
                before = self.answers[key].as_dict()
                report.note("reference_drift", {"key": key, "before": before, "after": answer.as_dict()})

    def rss(self) -> float | None:
        return rss_mib(self.pid) if self.pid is not None else None

    async def sequential_answers(self, into: dict[str, Answer]) -> None:
        """Each item alone, streamed, one after the other."""
        for item in self.items:
            status, answer = await generate(self.client, item, stream=True)
            if status != 200:
                raise RuntimeError(f"the sequential request {item.key} failed with {status}: {answer}")
            into[item.key] = answer

    # -- the clients

    async def generation_client(self, index: int) -> None:
        rng = random.Random(f"{self.config.seed}/generation/{index}")
        while time.monotonic() < self.deadline:
            if rng.random() < self.config.bad_rate:
                await self.send_bad(rng)
                continue
            item = rng.choice(self.items)
            stream = rng.random() < self.config.stream_rate
            drop = rng.random() < self.config.disconnect_rate
            kind = ("chat" if item.chat else "completion") + ("-stream" if stream else "")
            self.report.requests[kind] += 1
            if drop:
                await self.dropped_generation(rng, item, stream, kind)
                continue
            try:
                status, answer = await generate(self.client, item, stream)
            except (httpx.HTTPError, ValueError, KeyError) as exc:
                self.report.note("errors", {"kind": kind, "key": item.key, "error": f"{type(exc).__name__}: {exc}"})
                continue
            self.record(status, kind, item.key, answer)

    async def dropped_generation(self, rng: random.Random, item: GenItem, stream: bool, kind: str) -> None:
        """Drop the request: a stream after a few chunks (0: as soon as the headers came), or any request
        before its response (a cancel after a random moment)."""
        if stream and rng.random() < 0.7:
            drop_after = rng.randint(0, max(1, item.body["max_tokens"] // 2))
            try:
                status, answer = await generate(self.client, item, stream, drop_after)
            except Dropped:
                self.report.disconnects["mid-stream" if drop_after else "after-headers"] += 1
                return
            except (httpx.HTTPError, ValueError, KeyError) as exc:
                self.report.note("errors", {"kind": kind, "key": item.key, "error": f"{type(exc).__name__}: {exc}"})
                return
            self.record(status, kind, item.key, answer)  # it finished before the chunk it was to be dropped at
            return
        try:
            status, answer = await asyncio.wait_for(generate(self.client, item, stream), rng.uniform(0.001, 0.3))
        except TimeoutError:
            self.report.disconnects["timed-cancel"] += 1
            return
        except (httpx.HTTPError, ValueError, KeyError) as exc:
            self.report.note("errors", {"kind": kind, "key": item.key, "error": f"{type(exc).__name__}: {exc}"})
            return
        self.record(status, kind, item.key, answer)

    def record(self, status: int, kind: str, key: str, answer: Answer | dict) -> None:
        self.report.statuses[status] += 1
        if status >= 500:
            self.report.note("server_errors", {"kind": kind, "key": key, "status": status, "body": answer})
        elif status != 200 or not isinstance(answer, Answer):
            self.report.note("errors", {"kind": kind, "key": key, "status": status, "body": answer})
        elif answer != self.answers[key]:
            self.report.note(
                "mismatches",
                {"kind": kind, "key": key, "expected": self.answers[key].as_dict(), "got": answer.as_dict()},
            )
        else:
            self.report.completed[kind.removesuffix("-stream")] += 1

    async def embedding_client(self, index: int) -> None:
        rng = random.Random(f"{self.config.seed}/embedding/{index}")
        report = self.report
        while time.monotonic() < self.deadline:
            if rng.random() < self.config.bad_rate:
                await self.send_bad(rng, embeddings=True)
                continue
            texts = rng.sample(TEXTS, rng.randint(1, 4))
            report.requests["embedding"] += 1
            try:
                if rng.random() < self.config.disconnect_rate:
                    try:
                        status, result = await asyncio.wait_for(
                            embed(self.client, self.embedding_model, texts), rng.uniform(0.001, 0.05)
                        )
                    except TimeoutError:
                        report.disconnects["embedding-timed-cancel"] += 1
                        continue
                else:
                    status, result = await embed(self.client, self.embedding_model, texts)
            except (httpx.HTTPError, ValueError, KeyError) as exc:
                report.note("errors", {"kind": "embedding", "error": f"{type(exc).__name__}: {exc}"})
                continue
            report.statuses[status] += 1
            if status >= 500:
                report.note("server_errors", {"kind": "embedding", "status": status, "body": result})
                continue
            if status != 200 or len(result) != len(texts):
                report.note("errors", {"kind": "embedding", "status": status, "body": result})
                continue
            for text, vector in zip(texts, result):
                reference = self.embeddings[text]
                diff = float(np.max(np.abs(vector - reference))) if vector.shape == reference.shape else float("inf")
                report.max_embedding_diff = max(report.max_embedding_diff, diff)
                if diff > self.config.embedding_atol:
                    report.note("embedding_mismatches", {"text": text, "batch": texts, "max_abs_diff": diff})
            report.completed["embedding"] += 1

    async def send_bad(self, rng: random.Random, embeddings: bool = False) -> None:
        cases = [c for c in self.bad if c.path.endswith("/embeddings") == embeddings] or self.bad
        case = rng.choice(cases)
        self.report.requests["bad"] += 1
        content = case.content()
        headers = {"Content-Type": "application/json"} if content is not None else {}
        try:
            response = await self.client.request(case.method, case.path, content=content, headers=headers)
        except httpx.HTTPError as exc:
            self.report.bad_requests[case.name]["error"] += 1
            self.report.note("bad_request_failures", {"case": case.name, "error": f"{type(exc).__name__}: {exc}"})
            return
        status, body = response.status_code, _json_or_text(response.content)
        self.report.bad_requests[case.name][status] += 1
        self.report.statuses[status] += 1
        if status >= 500:
            self.report.note("server_errors", {"kind": f"bad/{case.name}", "status": status, "body": body})
        problem = None
        if not 400 <= status < 500:
            problem = f"status {status}"
        elif case.status is not None and status != case.status:
            problem = f"status {status}, expected {case.status}"
        else:
            problem = check_envelope(status, body)
        if problem:
            self.report.note("bad_request_failures", {"case": case.name, "problem": problem, "body": body})

    # -- /metrics

    async def read_metrics(self) -> dict[str, float] | None:
        """GAUGES and COUNTERS, each summed over the served models, or None (and a metrics failure) if
        unreadable."""
        from prometheus_client.parser import text_string_to_metric_families

        self.report.requests["metrics"] += 1
        try:
            response = await self.client.get("/metrics")
        except httpx.HTTPError as exc:
            self.report.note("metrics_failures", {"error": f"{type(exc).__name__}: {exc}"})
            return None
        self.report.statuses[response.status_code] += 1
        if response.status_code != 200:
            if response.status_code >= 500:
                self.report.note("server_errors", {"kind": "metrics", "status": response.status_code})
            self.report.note("metrics_failures", {"status": response.status_code})
            return None
        self.report.metrics_reads += 1
        values = dict.fromkeys([*GAUGES, *COUNTERS], 0.0)
        for family in text_string_to_metric_families(response.text):
            for sample in family.samples:
                if sample.name in values:
                    values[sample.name] += sample.value
        return values

    async def watch_metrics(self, stop: asyncio.Event) -> None:
        report = self.report
        while not stop.is_set():
            values = await self.read_metrics()
            if values is not None:
                values = {name: values[name] for name in GAUGES}
                for name, value in values.items():
                    report.gauges_max[name] = max(report.gauges_max.get(name, 0.0), value)
                usage = values["vllm:kv_cache_usage_perc"]
                negative = {name: value for name, value in values.items() if value < 0}
                if negative or usage > 1 + 1e-9:
                    report.note("metrics_failures", {"gauges": values, "problem": "out of range"})
            rss = self.rss()
            if rss is not None and report.rss_peak_mib is not None:
                report.rss_peak_mib = max(report.rss_peak_mib, rss)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), self.config.metrics_interval_s)

    async def wait_for_idle_gauges(self, limit_s: float) -> float | None:
        """Read /metrics until the gauges are all 0 (returns the seconds that took) or `limit_s` passed (None);
        the last values read are in `report.gauges_end`."""
        began = time.monotonic()
        while True:
            values = await self.read_metrics()
            if values is not None:
                self.counters = {name: values[name] for name in COUNTERS}
                self.report.gauges_end = {name: values[name] for name in GAUGES}
                if not any(self.report.gauges_end.values()):
                    return time.monotonic() - began
            if time.monotonic() - began > limit_s:
                return None
            await asyncio.sleep(0.1)


# --- serving in this process -----------------------------------------------------------------------------------


@contextlib.contextmanager
def serve_in_process(
    model: str | None, embedding_model: str | None, engine_args: dict[str, Any]
) -> Iterator[tuple[str, str, str | None]]:
    """Build the engines, serve them on a loopback port from this process; yields (URL, served generation model
    name, served embedding model name or None). Without `model`/`embedding_model`, the tiny test models."""
    sys.path.insert(0, str(ROOT))
    os.environ.setdefault("JAXSERVE_CACHE_DIR", str(TEST_MODELS.parent / "jaxserve"))
    from jaxserve.async_engine import AsyncEngine
    from jaxserve.config import EngineConfig
    from jaxserve.llm import create_engine
    from jaxserve.server.launch import background_server
    from jaxserve.server.served_models import ServedModel

    if model is None or embedding_model is None:
        from scripts.make_test_models import build_test_models

        tiny = build_test_models(TEST_MODELS, ["tiny-llama", "tiny-bert-mean"])
        model = model or str(tiny["tiny-llama"])
        embedding_model = embedding_model or str(tiny["tiny-bert-mean"])
    began = time.perf_counter()
    engines = [AsyncEngine(create_engine(EngineConfig(model=model, runner="generate", progress=False, **engine_args)))]
    engines.append(AsyncEngine(create_engine(EngineConfig(model=embedding_model, progress=False, **POOLING_ENGINE))))
    print(f"engines ready in {time.perf_counter() - began:.1f} s", file=sys.stderr, flush=True)
    served = [
        ServedModel.from_engine(["generate"], model, engines[0], "auto"),
        ServedModel.from_engine(["embed"], embedding_model, engines[1], "auto"),
    ]
    try:
        with background_server(served) as url:
            yield url, "generate", "embed"
    finally:
        for engine in engines:
            engine.shutdown()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    config = SoakConfig(
        duration_s=args.duration,
        clients=args.clients,
        embedding_clients=args.embedding_clients,
        disconnect_rate=args.disconnect_rate,
        bad_rate=args.bad_rate,
        stream_rate=args.stream_rate,
        prompts=args.prompts,
        max_tokens=args.max_tokens,
        metrics_interval_s=args.metrics_interval,
        seed=args.seed,
        embedding_atol=args.embedding_atol,
        max_rss_growth_mib=args.max_rss_growth_mib,
        settle_s=args.settle,
        request_timeout_s=args.request_timeout,
    )
    if args.url:
        report = run_soak(args.url.rstrip("/"), args.model, args.embedding_model, config, args.pid)
    else:
        engine_args = dict(
            max_model_len=args.max_model_len,
            max_num_seqs=args.max_num_seqs,
            max_num_batched_tokens=args.max_num_batched_tokens,
            num_kv_pages=args.num_kv_pages,
        )
        with serve_in_process(args.model, args.embedding_model, engine_args) as (url, model, embedding_model):
            report = run_soak(url, model, embedding_model, config, os.getpid())
    summary = json.dumps(report.summary(), indent=2, ensure_ascii=False, default=str)
    print(summary)
    if args.json:
        Path(args.json).write_text(summary + "\n")
    if not report.ok:
        print("soak FAILED: " + "; ".join(report.failures), file=sys.stderr)
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
