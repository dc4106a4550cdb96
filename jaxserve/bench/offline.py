"""`jaxserve bench latency` and `jaxserve bench throughput`: offline benchmarks through the `LLM` API, in the
manner of `vllm bench latency` / `vllm bench throughput`.

Prompts are random token ids (so input lengths are exact) and outputs ignore EOS (so output lengths are
exact). Every bucket is compiled before timing starts, so no measurement includes a compile.

- latency: one batch of `batch_size` requests, end to end, `num_iters` times after `num_iters_warmup`; reports
  the mean and percentiles of the batch latency. `--profile DIR` records one more iteration with
  `jax.profiler` (open it in TensorBoard or Perfetto).
- throughput: `num_prompts` requests at once; reports requests/s, total tokens/s and output tokens/s. A pooling
  model embeds its prompts instead (requests/s and input tokens/s).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # the CLI builds its parser from this module without importing JAX
    from .. import LLM, SamplingParams

LATENCY_PERCENTILES = (10, 25, 50, 75, 90, 99)


@dataclasses.dataclass(frozen=True)
class Workload:
    input_len: int
    output_len: int
    seed: int = 0


def random_prompts(llm: LLM, count: int, workload: Workload) -> list[dict]:
    """`count` prompts of exactly `input_len` random token ids, avoiding the low ids where special tokens sit."""
    vocab = llm.engine.vocab_size
    low = min(100, vocab // 2)
    rng = np.random.default_rng(workload.seed)
    return [{"prompt_token_ids": rng.integers(low, vocab, workload.input_len).tolist()} for _ in range(count)]


def sampling_params(workload: Workload, n: int) -> SamplingParams:
    from .. import SamplingParams

    return SamplingParams(n=n, temperature=1.0, top_p=1.0, ignore_eos=True, max_tokens=workload.output_len)


def measure_latency(
    llm: LLM, workload: Workload, batch_size: int, n: int, num_iters_warmup: int, num_iters: int, profile: Path | None
) -> dict:
    prompts = random_prompts(llm, batch_size, workload)
    params = sampling_params(workload, n)

    def run_once() -> float:
        began = time.perf_counter()
        llm.generate(prompts, params, use_tqdm=False)
        return time.perf_counter() - began

    for _ in range(num_iters_warmup):
        run_once()
    latencies = np.array([run_once() for _ in range(num_iters)])
    if profile is not None:
        import jax

        with jax.profiler.trace(str(profile)):
            run_once()
    return {
        "avg_latency": float(latencies.mean()),
        "latencies": latencies.tolist(),
        "percentiles": {str(p): float(np.percentile(latencies, p)) for p in LATENCY_PERCENTILES},
        "batch_size": batch_size,
        "input_len": workload.input_len,
        "output_len": workload.output_len,
        "ms_per_output_token": float(latencies.mean()) / max(1, workload.output_len) * 1e3,  # prefill included
    }


def measure_throughput(llm: LLM, workload: Workload, num_prompts: int, n: int) -> dict:
    from ..pooling_engine import PoolingEngine

    prompts = random_prompts(llm, num_prompts, workload)
    began = time.perf_counter()
    if isinstance(llm.engine, PoolingEngine):
        outputs = llm.embed(prompts, use_tqdm=False)
        output_tokens = 0
    else:
        outputs = llm.generate(prompts, sampling_params(workload, n), use_tqdm=False)
        output_tokens = sum(len(c.token_ids) for o in outputs for c in o.outputs)
    elapsed = time.perf_counter() - began
    input_tokens = sum(len(o.prompt_token_ids) for o in outputs)
    return {
        "elapsed_time": elapsed,
        "num_requests": num_prompts,
        "total_num_tokens": input_tokens + output_tokens,
        "total_output_tokens": output_tokens,
        "requests_per_second": num_prompts / elapsed,
        "tokens_per_second": (input_tokens + output_tokens) / elapsed,
        "output_tokens_per_second": output_tokens / elapsed,
        "input_len": workload.input_len,
        "output_len": workload.output_len,
    }


def add_common_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", help="HF folder, .gguf file, or a name in the local HF cache (default: the "
                        "embedded generation model)")  # fmt: skip
    parser.add_argument("--input-len", type=int, default=32, help="prompt tokens per request (default 32)")
    parser.add_argument("--output-len", type=int, default=128, help="output tokens per request (default 128)")
    parser.add_argument("--n", type=int, default=1, help="completions per prompt (default 1)")
    parser.add_argument("--output-json", type=Path, help="write the results here as JSON")


def add_latency_args(parser: argparse.ArgumentParser) -> None:
    add_common_args(parser)
    parser.add_argument("--batch-size", type=int, default=8, help="requests per batch (default 8)")
    parser.add_argument("--num-iters-warmup", type=int, default=3, help="untimed batches first (default 3)")
    parser.add_argument("--num-iters", type=int, default=10, help="timed batches (default 10)")
    parser.add_argument("--profile", type=Path, metavar="DIR", help="record one more batch with jax.profiler here")


def add_throughput_args(parser: argparse.ArgumentParser) -> None:
    add_common_args(parser)
    parser.add_argument("--num-prompts", type=int, default=1000, help="requests, all submitted at once (default 1000)")


def write_json(path: Path | None, result: dict) -> None:
    if path is not None:
        path.write_text(json.dumps(result, indent=2))


def run_latency(llm: LLM, args: argparse.Namespace) -> dict:
    result = measure_latency(
        llm, Workload(args.input_len, args.output_len), args.batch_size, args.n, args.num_iters_warmup,
        args.num_iters, args.profile,
    )  # fmt: skip
    print(f"Avg latency: {result['avg_latency']:.4f} s ({result['ms_per_output_token']:.2f} ms per output token)")
    for p, value in result["percentiles"].items():
        print(f"{p}% percentile latency: {value:.4f} s")
    write_json(args.output_json, result)
    return result


def run_throughput(llm: LLM, args: argparse.Namespace) -> dict:
    result = measure_throughput(llm, Workload(args.input_len, args.output_len), args.num_prompts, args.n)
    print(
        f"Throughput: {result['requests_per_second']:.2f} requests/s, {result['tokens_per_second']:.2f} total "
        f"tokens/s, {result['output_tokens_per_second']:.2f} output tokens/s"
    )
    write_json(args.output_json, result)
    return result
