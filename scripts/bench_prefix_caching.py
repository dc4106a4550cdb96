"""Automatic prefix caching: time to first token (TTFT) of chats that share a long system prompt, with the
prefix cache on and off, side by side in one run.

The workload: `--chats` (32) conversations rendered with the model's chat template, each a system message of
about `--system-tokens` (1,000) tokens, the same in every chat (a made-up policy document assembled from a
seeded word list, so it is the same text in every run), and a distinct short user question. Each request is
greedy with EOS ignored and generates `--max-tokens` (8) tokens.

Two engines of the embedded default model (SmolLM2-135M-Instruct) run in this process, built alike
(max_model_len 2048, the engine's other defaults) except `enable_prefix_caching` (True / False). Both are built
first; then each is warmed up with one unrelated request per compiled token bucket (random prompts of 1, 2,
4, ..., 512 tokens, the engine's token budget on CPU), so that no timed step is the first run of its program,
which on CPU costs well beyond a later run. Before each scenario the caching engine's prefix cache is reset,
so the first chat of a scenario always computes the system prompt.

Scenarios (`--scenarios`):

* sequential: chats arrive one after another (the chat-server case): a chat is added, the engine steps until
  it has generated all its tokens (it runs to completion, it is not aborted), then the next chat is added.
  TTFT = time from `add_request` to the return of the `step()` that carried the chat's first token. The two
  engines take turns chat by chat, so that load from other processes falls on both alike. With caching, every
  chat after the first finds the system prompt's full pages (16 tokens each) cached and computes only the
  rest: its last partial page and its question.
* burst: all chats are added at once; TTFT of each = time from the common start to the return of the step that
  carried its first token. Chats admitted in the same step cannot hit each other's pages (a page joins the
  cache once the step computing it is dispatched), and chats queue behind one another's prefills under the
  step's token budget. Under the CPU budget (512 tokens) the first chat's 1,000-token prefill spans several
  steps, so the chats admitted in its last step and after find the system prompt's pages cached.

Per engine and scenario it reports TTFT p50, p90 and mean, the prompt tokens computed (prompt tokens less the
prefix-cache hits), the prefix-cache hits and queries (tokens; both stay 0 with caching off), the speedup of the
p50 (off / on), and in how many chats the two engines generated the same tokens. It prints a Markdown table
for docs/benchmarks.md, and with `--json` writes the figures and every TTFT.

On a 2-core CPU a run takes about 20 minutes, most of it the burst without caching.

    python scripts/bench_prefix_caching.py [--chats 32] [--system-tokens 1000] [--max-tokens 8]
        [--scenarios sequential,burst] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from collections.abc import Callable
from pathlib import Path

import jax
import numpy as np
from _harness import markdown_table, provenance, provenance_lines

from jaxserve import LLM, SamplingParams
from jaxserve.engine import LLMEngine
from jaxserve.model_source import DEFAULT_GENERATE_MODEL
from jaxserve.stats import EngineStats
from jaxserve.tokenizer import Tokenizer

MAX_MODEL_LEN = 2048
SEED = 0
WORDS = (
    "account", "approval", "archive", "audit", "budget", "client", "compliance", "contract", "customer", "data",
    "deadline", "department", "document", "employee", "escalation", "exception", "expense", "invoice", "manager",
    "meeting", "office", "partner", "payment", "policy", "procedure", "record", "refund", "report", "request",
    "review", "schedule", "security", "service", "supplier", "support", "team", "ticket", "training", "travel",
    "vendor",
)  # fmt: skip
VERBS = (
    "must approve", "should review", "may archive", "must record", "should escalate", "may reject", "must verify",
    "should document", "must report", "may delegate",
)  # fmt: skip
TOPICS = (
    "a late invoice", "a lost laptop", "a refund request", "a travel expense", "a new supplier", "a data breach",
    "an overdue report", "a contract renewal",
)  # fmt: skip
ASKS = ("Who approves {}?", "How fast must we handle {}?", "What records do we keep for {}?", "Who do I tell about {}?")
ENGINES = {"on": True, "off": False}  # prefix caching of each engine

Runs = dict[str, tuple[list[float], list[list[int]]]]  # per engine: each chat's TTFT (s) and output tokens


def system_prompt(tokenizer: Tokenizer, target_tokens: int) -> str:
    """A made-up policy document of at least `target_tokens` tokens, the same text in every run."""
    rng = random.Random(SEED)
    sentences = ["You are the assistant of Example Corp. Answer questions using the company policy below."]
    section = 0
    while len(tokenizer.encode(" ".join(sentences), add_special_tokens=False)) < target_tokens:
        if len(sentences) % 8 == 1:
            section += 1
            sentences.append(f"\n\nSection {section}: {rng.choice(WORDS).title()} {rng.choice(WORDS)} rules.")
        subject, verb, thing, other = rng.choice(WORDS), rng.choice(VERBS), rng.choice(WORDS), rng.choice(WORDS)
        sentences.append(f"The {subject} team {verb} every {thing} {other} within {rng.randint(2, 30)} days.")
    return " ".join(sentences)


def chat_prompts(tokenizer: Tokenizer, system: str, num_chats: int) -> list[list[int]]:
    """Token ids of each chat (system prompt, one distinct question, the assistant's turn opened), as
    `LLM.chat` renders and encodes them."""
    prompts = []
    for i in range(num_chats):
        question = f"Question {i + 1}: " + ASKS[i % len(ASKS)].format(TOPICS[i // len(ASKS) % len(TOPICS)])
        messages = [{"role": "system", "content": system}, {"role": "user", "content": question}]
        text = tokenizer.render_chat(messages, add_generation_prompt=True)
        prompts.append(tokenizer.encode(text, add_special_tokens=False))
    return prompts


def common_prefix_length(prompts: list[list[int]]) -> int:
    length = 0
    for column in zip(*prompts):
        if len(set(column)) > 1:
            break
        length += 1
    return length


def warm_up(engine: LLMEngine) -> None:
    """Run every compiled token bucket once: one request per bucket, its prompt that bucket's length."""
    rng = np.random.default_rng(SEED)
    params = SamplingParams(temperature=0, max_tokens=1, ignore_eos=True)
    for rung in engine.runner.shape.token_rungs:
        run_to_completion(engine, {f"warm-up-{rung}": rng.integers(3, engine.vocab_size, rung).tolist()}, params)


def run_to_completion(
    engine: LLMEngine, requests: dict[str, list[int]], params: SamplingParams
) -> tuple[list[float], list[list[int]]]:
    """Add `requests` (request id: prompt) at once and step until all finish: each one's TTFT (seconds from the
    start to the return of the step carrying its first token) and its output tokens, in the order given."""
    began = time.perf_counter()
    for request_id, prompt in requests.items():
        engine.add_request(request_id, prompt, params)
    ttft: dict[str, float] = {}
    tokens: dict[str, list[int]] = {}
    while engine.has_unfinished_requests():
        outputs = engine.step()
        now = time.perf_counter()
        for output in outputs:
            if output.outputs[0].token_ids:
                ttft.setdefault(output.request_id, now - began)
            tokens[output.request_id] = list(output.outputs[0].token_ids)
    return [ttft[r] for r in requests], [tokens[r] for r in requests]


def sequential(engines: dict[str, LLMEngine], prompts: list[list[int]], params: SamplingParams) -> Runs:
    """One chat at a time, each to completion; the engines take turns chat by chat."""
    runs: Runs = {name: ([], []) for name in engines}
    for i, prompt in enumerate(prompts):
        for name, engine in engines.items():
            (ttft,), (tokens,) = run_to_completion(engine, {f"sequential-{i}": prompt}, params)
            runs[name][0].append(ttft)
            runs[name][1].append(tokens)
    return runs


def burst(engines: dict[str, LLMEngine], prompts: list[list[int]], params: SamplingParams) -> Runs:
    """Every chat added at once, one engine after the other."""
    return {
        name: run_to_completion(engine, {f"burst-{i}": p for i, p in enumerate(prompts)}, params)
        for name, engine in engines.items()
    }


SCENARIOS: dict[str, Callable[[dict[str, LLMEngine], list[list[int]], SamplingParams], Runs]] = {
    "sequential": sequential,
    "burst": burst,
}


def summary(ttft: list[float], num_prompt_tokens: int, before: EngineStats, after: EngineStats) -> dict:
    """TTFT statistics (ms) and the prefix-cache deltas of one engine over one scenario."""
    hits = after.prefix_cache_hits - before.prefix_cache_hits
    ms = np.array(ttft) * 1e3
    return dict(
        ttft_p50_ms=float(np.percentile(ms, 50)),
        ttft_p90_ms=float(np.percentile(ms, 90)),
        ttft_mean_ms=float(ms.mean()),
        prompt_tokens=num_prompt_tokens,
        tokens_computed=num_prompt_tokens - hits,
        prefix_cache_hits=hits,
        prefix_cache_queries=after.prefix_cache_queries - before.prefix_cache_queries,
        compiles_after_warmup=after.compiles_after_warmup - before.compiles_after_warmup,
        ttft_ms=ms.round(2).tolist(),
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--chats", type=int, default=32, help="conversations sharing the system prompt")
    parser.add_argument("--system-tokens", type=int, default=1000, help="length of the shared system prompt")
    parser.add_argument("--max-tokens", type=int, default=8, help="tokens generated per chat")
    parser.add_argument("--scenarios", default="sequential,burst", help=f"comma-separated: {', '.join(SCENARIOS)}")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    scenarios = args.scenarios.split(",")
    if unknown := set(scenarios) - set(SCENARIOS):
        parser.error(f"unknown scenarios: {', '.join(sorted(unknown))}")

    llms = {}
    for name, caching in ENGINES.items():
        began = time.perf_counter()
        llms[name] = LLM(
            DEFAULT_GENERATE_MODEL, max_model_len=MAX_MODEL_LEN, enable_prefix_caching=caching, progress=False
        )
        print(f"engine with prefix caching {name}: built in {time.perf_counter() - began:.1f} s", file=sys.stderr)
    engines = {name: llm.engine for name, llm in llms.items()}
    tokenizer = llms["on"].get_tokenizer()
    system = system_prompt(tokenizer, args.system_tokens)
    prompts = chat_prompts(tokenizer, system, args.chats)
    params = SamplingParams(temperature=0, max_tokens=args.max_tokens, ignore_eos=True)
    for name, engine in engines.items():
        began = time.perf_counter()
        warm_up(engine)
        print(f"engine with prefix caching {name}: warmed up in {time.perf_counter() - began:.1f} s", file=sys.stderr)

    device = jax.devices()[0]
    results = dict(
        **provenance(device.platform),
        model=DEFAULT_GENERATE_MODEL,
        dtype=np.dtype(engines["on"].dtype).name,
        chats=args.chats,
        max_tokens=args.max_tokens,
        system_prompt_tokens=len(tokenizer.encode(system, add_special_tokens=False)),
        shared_prefix_tokens=common_prefix_length(prompts),
        prompt_tokens=[len(p) for p in prompts],
        scenarios={},
    )
    print(
        f"{args.chats} chats: system prompt {results['system_prompt_tokens']} tokens, shared prefix "
        f"{results['shared_prefix_tokens']} tokens, prompts {min(map(len, prompts))}-{max(map(len, prompts))} "
        f"tokens",
        file=sys.stderr,
    )
    num_prompt_tokens = sum(map(len, prompts))
    for scenario in scenarios:
        engines["on"].reset_prefix_cache()
        before = {name: engine.stats() for name, engine in engines.items()}
        runs = SCENARIOS[scenario](engines, prompts, params)
        record = {
            name: summary(ttft, num_prompt_tokens, before[name], engines[name].stats())
            for name, (ttft, _) in runs.items()
        }
        record["speedup_p50"] = record["off"]["ttft_p50_ms"] / record["on"]["ttft_p50_ms"]
        record["same_outputs"] = sum(a == b for a, b in zip(runs["on"][1], runs["off"][1]))
        results["scenarios"][scenario] = record
        print(
            f"{scenario}: TTFT p50 {record['off']['ttft_p50_ms']:.1f} ms without caching, "
            f"{record['on']['ttft_p50_ms']:.1f} ms with: {record['speedup_p50']:.1f}x",
            file=sys.stderr,
        )

    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    rows = []
    for scenario, record in results["scenarios"].items():
        for name in ENGINES:
            run = record[name]
            rows.append({
                "scenario": scenario, "prefix caching": name,
                "TTFT p50 (ms)": f"{run['ttft_p50_ms']:,.1f}", "TTFT p90 (ms)": f"{run['ttft_p90_ms']:,.1f}",
                "TTFT mean (ms)": f"{run['ttft_mean_ms']:,.1f}",
                "prompt tokens computed": f"{run['tokens_computed']:,} of {run['prompt_tokens']:,}",
                "cache hits / queries": f"{run['prefix_cache_hits']:,} / {run['prefix_cache_queries']:,}",
                "p50 speedup": f"{record['speedup_p50']:.1f}x" if name == "on" else "(baseline)",
                "same outputs": f"{record['same_outputs']} of {args.chats}" if name == "on" else "",
            })  # fmt: skip
    print(provenance_lines(results))
    print(
        f"- Model: {DEFAULT_GENERATE_MODEL}, {results['dtype']}; {args.chats} chats, system prompt "
        f"{results['system_prompt_tokens']} tokens (shared prefix {results['shared_prefix_tokens']}), "
        f"{args.max_tokens} output tokens each\n"
    )
    print(markdown_table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
