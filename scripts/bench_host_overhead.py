"""Host overhead per generation step: how much of a decode step's wall time is the engine's own Python work.

For each model and each batch size B (default 1, 64 and 256 running sequences), the benchmark adds B requests
(8-token prompts, greedy, EOS ignored) to an `LLMEngine` with random weights and steps until every request is
decoding. Then, `--rounds` times, it times `--steps` pure-decode `engine.step()` calls and measures how long the
device needed for them (below). Per step it reports, for the round whose host time is the median:

* wall:   the wall time of `engine.step()` (of `engine.core_step()` with `--loop core`);
* device: the time the compiled step program keeps the device busy;
* host:   wall - device, the engine's host work that the device does not hide (scheduling, filling the input
          arrays, dispatch, reading back and processing the outputs);
* idle:   1 - device / wall, the fraction of wall time the device sits idle between steps.

How device time is obtained: `engine.runner.programs` (the bucketed compiled step, called as
`programs(rung, params, state, inputs) -> (state, out)`) is replaced by a proxy that passes every call through
and, during the timed steps, records each call's rung and inputs (numpy arrays copied: an engine may refill its
staging buffers). After the timed steps, the recorded calls run again, in order and back to back, with their
inputs already on the device, each call taking the state the previous one returned (the state is donated),
blocking only at the end: the same device work without the host in between. Device time per step = replay time
/ `--steps`. The replay still pays each call's dispatch (tens of microseconds), so device time is slightly over-
and host time slightly under-estimated.

Two random-weight Llama models, built offline (`config.json` plus the test models' ChatML tokenizer, whose
vocabulary of 500 tokens they share):

* tiny: hidden 64, 2 layers (~140k parameters): device time is small next to host time, at least at B = 1;
* 2ms:  hidden 512, 6 layers (~19M parameters): a decode step takes >= 2 ms of device time even at B = 1,
        for the idle fraction of a model whose device time is not negligible.

Goals (the issue): host work per decode step <= 0.5 ms at 1 sequence and <= 3 ms at 256 on a 2-core CPU, and,
with host work overlapped with the device, an idle fraction under 10% for the 2ms model.

Limitation: on CPU the "device" is XLA's CPU runtime on the same cores as the host. Host work that overlaps a
step competes with it for the cores (the step runs slower than in the replay, where it runs alone), and a step
that follows host work may wait for XLA's worker threads to wake up; both count as host time here. Other
processes on the cores disturb the timed steps and the replays unequally (the median round damps this, but the
figures need a quiet machine).

Engine arguments beyond the benchmark's own (`max_num_seqs` and `max_num_batched_tokens` = the largest B,
`max_model_len` 512, a KV cache that holds every sequence at that length) go to `EngineConfig` as
`--engine-arg KEY=VALUE` (VALUE is read as JSON when it parses, else as a string), for instance
`--engine-arg async_scheduling=true`; they override the benchmark's defaults.

    python scripts/bench_host_overhead.py [--model tiny|2ms|both] [--batches 1,64,256] [--steps 50]
        [--rounds 3] [--loop step|core] [--engine-arg KEY=VALUE ...] [--profile] [--json out.json]
"""

from __future__ import annotations

import argparse
import cProfile
import dataclasses
import json
import math
import pstats
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np
from _harness import markdown_table, provenance
from make_test_models import DECODER_DEFAULTS, chatml_tokenizer

from jaxserve.config import EngineConfig
from jaxserve.engine import LLMEngine
from jaxserve.sampling_params import SamplingParams

PROMPT_TOKENS = 8
MAX_MODEL_LEN = 512
MAX_PREFILL_STEPS = 200  # a batch that is not all decoding by then is a scheduler bug
PROFILE_LINES = 15

MODEL_SHAPES: dict[str, dict[str, int]] = {
    "tiny": dict(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2
    ),
    "2ms": dict(
        hidden_size=512, intermediate_size=1536, num_hidden_layers=6, num_attention_heads=8, num_key_value_heads=4
    ),
}


def write_model_folder(folder: Path, shape: dict[str, int]) -> int:
    """A LlamaForCausalLM `config.json` of `shape` and the test models' ChatML tokenizer (no weights: the engine
    runs with load_format=dummy); returns the vocabulary size, the tokenizer's."""
    from transformers import LlamaConfig

    tokenizer = chatml_tokenizer()
    vocab_size = len(tokenizer)  # no ids past the tokenizer's, which random weights could otherwise emit
    config = DECODER_DEFAULTS | shape | {"vocab_size": vocab_size, "architectures": ["LlamaForCausalLM"]}
    LlamaConfig(**config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return vocab_size


class RecordingPrograms:
    """Stands in for `engine.runner.programs`: passes every call through and, while `recording`, appends each
    call's rung and inputs to `calls`, numpy arrays copied (an engine may refill its staging buffers; device arrays
    are immutable). Every other attribute is the wrapped object's."""

    def __init__(self, programs: Any):
        self.wrapped = programs
        self.recording = False
        self.calls: list[tuple[int, Any]] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self.wrapped, name)

    def __call__(self, rung: int, params: Any, state: Any, inputs: Any) -> tuple[Any, Any]:
        if self.recording:
            self.calls.append((rung, jax.tree.map(lambda x: x.copy() if isinstance(x, np.ndarray) else x, inputs)))
        return self.wrapped(rung, params, state, inputs)


def replay_seconds(runner: Any, programs: RecordingPrograms) -> float:
    """Seconds to run the recorded calls again, in order and back to back, with their inputs already on the
    device, each call taking the state the previous one returned; the final state goes back to `runner.state`
    (the one it started from was donated)."""
    if not programs.calls:
        raise RuntimeError("the timed steps made no call through engine.runner.programs")
    leaves = jax.tree.leaves([inputs for _, inputs in programs.calls])
    if any(isinstance(leaf, jax.Array) and leaf.is_deleted() for leaf in leaves):
        raise RuntimeError("the engine donated a step's inputs: the replay needs them")
    calls = [(rung, jax.tree.map(_on_device, inputs)) for rung, inputs in programs.calls]
    jax.block_until_ready(calls)
    rung, inputs = calls[0]
    state, out = programs.wrapped(rung, runner.params, runner.state, inputs)  # untimed: wakes the device up
    jax.block_until_ready((state, out))
    began = time.perf_counter()
    for rung, inputs in calls:
        state, out = programs.wrapped(rung, runner.params, state, inputs)
    jax.block_until_ready((state, out))
    elapsed = time.perf_counter() - began
    runner.state = state
    return elapsed


def _on_device(leaf: Any) -> Any:
    return jax.device_put(leaf) if isinstance(leaf, np.ndarray) else leaf


@dataclasses.dataclass
class Round:
    """One timed run of decode steps and the replay of their programs, per step."""

    wall_ms: float
    device_ms: float
    rungs: list[int]  # the token buckets of the programs the steps ran, one entry per call

    @property
    def host_ms(self) -> float:
        return self.wall_ms - self.device_ms

    @property
    def idle_fraction(self) -> float:
        return 1 - self.device_ms / self.wall_ms

    def row(self) -> dict[str, Any]:
        return {
            "wall_ms": self.wall_ms,
            "device_ms": self.device_ms,
            "host_ms": self.host_ms,
            "idle_fraction": self.idle_fraction,
            "program_calls_by_rung": {str(rung): self.rungs.count(rung) for rung in sorted(set(self.rungs))},
        }


@dataclasses.dataclass
class BatchResult:
    batch: int
    prefill_steps: int  # steps until every request had sampled a token
    rounds: list[Round]

    @property
    def median(self) -> Round:
        """The round whose host time is the median (the lower middle one of an even count)."""
        return sorted(self.rounds, key=lambda r: r.host_ms)[(len(self.rounds) - 1) // 2]

    def row(self) -> dict[str, Any]:
        head = {"batch": self.batch, "prefill_steps": self.prefill_steps}
        return head | self.median.row() | {"rounds": [r.row() for r in self.rounds]}


def run_steps(engine: LLMEngine, steps: int, loop: str = "step") -> None:
    """`steps` calls of `engine.step()` (the offline loop: core step and output processing on one thread) or,
    with loop "core", of `engine.core_step()` (what AsyncEngine's engine thread runs; the text is made in the
    event loop's thread)."""
    step = getattr(engine, "core_step" if loop == "core" else "step")
    for _ in range(steps):
        step()


def measure_batch(
    engine: LLMEngine, programs: RecordingPrograms, batch: int, vocab_size: int, args: argparse.Namespace
) -> BatchResult:
    """Add `batch` requests and step until all decode; then, `args.rounds` times, time `args.steps` decode steps
    and replay their programs; then abort the requests. With `args.profile`, `args.steps` more steps run
    under cProfile and its top functions print."""
    max_tokens = MAX_MODEL_LEN - PROMPT_TOKENS
    params = SamplingParams(max_tokens=max_tokens, ignore_eos=True, temperature=0)
    request_ids = [f"b{batch}-{i}" for i in range(batch)]
    for i, request_id in enumerate(request_ids):
        prompt = [3 + (i * PROMPT_TOKENS + j) % (vocab_size - 3) for j in range(PROMPT_TOKENS)]  # past the specials
        engine.add_request(request_id, prompt, params)

    prefill_steps = 1
    while len({output.request_id for output in engine.step()}) < batch:  # the last prefill chunks sample too
        prefill_steps += 1
        if prefill_steps > MAX_PREFILL_STEPS:
            raise RuntimeError(f"B={batch}: not every request decoding after {MAX_PREFILL_STEPS} steps")
    needed = prefill_steps + args.warm_steps + args.steps * (args.rounds + args.profile)
    if needed >= max_tokens:
        raise ValueError(f"B={batch}: {needed} steps would finish requests (max_tokens {max_tokens}); lower --steps")
    run_steps(engine, args.warm_steps, args.loop)

    rounds = []
    for _ in range(args.rounds):
        programs.calls, programs.recording = [], True
        began = time.perf_counter()
        run_steps(engine, args.steps, args.loop)
        wall = time.perf_counter() - began
        programs.recording = False
        device = replay_seconds(engine.runner, programs)
        rounds.append(Round(wall / args.steps * 1e3, device / args.steps * 1e3, [rung for rung, _ in programs.calls]))

    if args.profile:
        profiler = cProfile.Profile()
        profiler.runcall(run_steps, engine, args.steps, args.loop)
        for order in ("cumulative", "tottime"):
            print(f"\ncProfile of {args.steps} decode steps at B={batch}, top {PROFILE_LINES} by {order}:")
            pstats.Stats(profiler, stream=sys.stdout).sort_stats(order).print_stats(PROFILE_LINES)

    for request_id in request_ids:
        engine.abort_request(request_id)
    while engine.has_unfinished_requests():
        engine.step()
    return BatchResult(batch, prefill_steps, rounds)


def measure_model(name: str, batches: list[int], args: argparse.Namespace) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix=f"jaxserve-host-overhead-{name}-") as folder:
        vocab_size = write_model_folder(Path(folder), MODEL_SHAPES[name])
        largest = max(batches)
        page_size = args.engine_args.get("page_size", EngineConfig.page_size)
        defaults = dict(
            model=folder,
            load_format="dummy",
            max_num_seqs=largest,
            max_num_batched_tokens=largest,
            max_model_len=MAX_MODEL_LEN,
            num_kv_pages=largest * math.ceil(MAX_MODEL_LEN / page_size),
            progress=False,
        )
        engine_config = defaults | args.engine_args
        began = time.perf_counter()
        engine = LLMEngine(EngineConfig(**engine_config))
        startup = time.perf_counter() - began
        num_params = sum(leaf.size for leaf in jax.tree.leaves(engine.runner.params))
        print(f"{name}: {num_params:,} parameters, engine ready in {startup:.1f} s", flush=True)
        programs = RecordingPrograms(engine.runner.programs)
        engine.runner.programs = programs
        results = []
        for batch in batches:
            result = measure_batch(engine, programs, batch, vocab_size, args)
            median = result.median
            print(
                f"  B={batch:4d}: wall {median.wall_ms:8.3f} ms  device {median.device_ms:8.3f} ms  "
                f"host {median.host_ms:8.3f} ms  idle {median.idle_fraction:6.1%}",
                flush=True,
            )
            results.append(result.row())
        engine.shutdown()
    return {
        "model": name,
        "shape": MODEL_SHAPES[name],
        "parameters": num_params,
        "engine_config": {key: value for key, value in engine_config.items() if key != "model"},
        "startup_s": startup,
        "runs": results,
    }


def engine_arg(text: str) -> tuple[str, Any]:
    """KEY=VALUE, VALUE read as JSON (true, 512, "x", {...}) when it parses and as a plain string otherwise."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


def batch_list(text: str) -> list[int]:
    return [int(b) for b in text.split(",")]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=["tiny", "2ms", "both"], default="both", help="which model (default both)")
    parser.add_argument(
        "--batches", type=batch_list, default=[1, 64, 256], help="running sequences, comma-separated (default 1,64,256)"
    )
    parser.add_argument(
        "--steps", type=int, default=50, help="decode steps timed, and replayed, per round (default 50)"
    )
    parser.add_argument(
        "--rounds",
        type=int,
        default=3,
        help="timed runs of --steps steps, each with its replay; the median one is shown (default 3)",
    )
    parser.add_argument("--warm-steps", type=int, default=3, help="decode steps before timing (default 3)")
    parser.add_argument(
        "--loop",
        choices=["step", "core"],
        default="step",
        help="time engine.step() (offline: core step and output processing) or engine.core_step() (the engine "
        "thread of the server, whose text is made elsewhere; engines that have it) (default step)",
    )
    parser.add_argument(
        "--engine-arg",
        type=engine_arg,
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="an EngineConfig field for the engine, e.g. async_scheduling=true (repeatable)",
    )
    parser.add_argument(
        "--profile", action="store_true", help="after each measurement, cProfile as many more steps and print the top"
    )
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    args.engine_args = dict(args.engine_arg)

    device = jax.devices()[0]
    record: dict[str, Any] = provenance(device.platform) | {
        "engine_args": args.engine_args,
        "loop": args.loop,
        "steps": args.steps,
        "rounds": args.rounds,
    }
    names = list(MODEL_SHAPES) if args.model == "both" else [args.model]
    record["models"] = [measure_model(name, args.batches, args) for name in names]

    rows = [
        {
            "model": model["model"],
            "B": run["batch"],
            "wall ms/step": f"{run['wall_ms']:.3f}",
            "device ms/step": f"{run['device_ms']:.3f}",
            "host ms/step": f"{run['host_ms']:.3f}",
            "device idle": f"{run['idle_fraction']:.1%}",
        }
        for model in record["models"]
        for run in model["runs"]
    ]
    print(f"\n{record['device']}, commit {record['commit']}, engine args {args.engine_args or 'none'}\n")
    print(markdown_table(rows))
    if args.json:
        args.json.write_text(json.dumps(record, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
