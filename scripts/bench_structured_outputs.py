"""Structured outputs: decode step time with part of the batch held to a JSON schema, against the same batch
unconstrained, side by side in one run.

The engine is the embedded default model (SmolLM2-135M-Instruct, a 49,152-token vocabulary) or `--model`, with
async scheduling on (the default). For each batch size B (`--batches`, default 1 and 32) it runs the same B
requests (distinct chat prompts asking for a story as JSON, greedy, EOS ignored) twice per round: all free, and
with every second request constrained to SCHEMA (a JSON object with a story of at least 400 characters, so
that no constrained request can finish within the timed steps); at B = 1 the one request is constrained.
After the prefills it times `--steps` decode steps (`engine.step()` wall time; every request still decoding).
The two modes alternate for `--rounds` rounds, and the median round of each is reported with the slowdown of
the constrained batch. Every constrained output is then checked to be a prefix of some JSON text the schema
allows (its mask never let anything else through).

What the constrained steps pay for: filling the bitmask rows (llguidance, in its own threads), moving the
bitmask to the device (B x 1,536 int32 for this vocabulary), applying it (unpacking 32 bits per word), and,
under async scheduling, the loss of overlap: a constrained row needs its previous token on the host before
its mask can be computed, so such steps do not overlap the next one's preparation.

    python scripts/bench_structured_outputs.py [--model PATH] [--batches 1,32] [--steps 24] [--rounds 3]
        [--docs] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import jax  # noqa: E402

from jaxserve import LLM, SamplingParams, StructuredOutputsParams  # noqa: E402
from jaxserve.model_source import DEFAULT_GENERATE_MODEL  # noqa: E402
from scripts._harness import markdown_table, provenance, provenance_lines, write_docs_section  # noqa: E402

SCHEMA = {
    "type": "object",
    "properties": {
        "title": {"type": "string", "maxLength": 40},
        "story": {"type": "string", "minLength": 400},
    },
    "required": ["title", "story"],
}
TOPICS = ["a lighthouse", "a lost key", "the first snow", "a robot cook", "an old map", "a quiet train", "a comet"]


def prompts(llm: LLM, count: int) -> list[list[int]]:
    tokenizer = llm.get_tokenizer()
    texts = [
        tokenizer.render_chat(
            [{"role": "user", "content": f"Tell story {i} about {TOPICS[i % len(TOPICS)]} as JSON."}],
            add_generation_prompt=True,
        )
        for i in range(count)
    ]
    return [tokenizer.encode(text, add_special_tokens=False) for text in texts]


def time_steps(llm: LLM, batch: list[list[int]], constrained: list[bool], steps: int) -> tuple[float, list[str]]:
    """Seconds per decode step over `steps` steps once every request decodes; the outputs' texts so far."""
    engine = llm.engine
    structured = StructuredOutputsParams(json=SCHEMA)
    for i, (prompt, held) in enumerate(zip(batch, constrained)):
        params = SamplingParams(
            temperature=0, max_tokens=steps + 32, ignore_eos=True, structured_outputs=structured if held else None
        )
        engine.add_request(str(i), prompt, params)
    texts = {str(i): "" for i in range(len(batch))}

    def step() -> None:
        for output in engine.step():
            texts[output.request_id] = output.outputs[0].text

    while any(
        seq.num_computed_tokens < seq.num_prompt_tokens for seq in engine.scheduler.waiting + engine.scheduler.running
    ):
        step()
    for _ in range(2):
        step()
    began = time.perf_counter()
    for _ in range(steps):
        step()
    seconds = (time.perf_counter() - began) / steps
    for request_id in list(texts):
        engine.abort_request(request_id)
    while engine.has_unfinished_requests():
        engine.step()
    return seconds, [texts[str(i)] for i in range(len(batch))]


def check_prefix(llm: LLM, text: str) -> bool:
    """Whether `text` can still become JSON the schema allows (llguidance walks it)."""
    compiler = llm.engine.grammar_compiler
    matcher = compiler.matcher(compiler.compile(StructuredOutputsParams(json=SCHEMA)))
    for token in llm.get_tokenizer().encode(text, add_special_tokens=False):
        matcher.accept(token)
    return matcher.error is None


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default=DEFAULT_GENERATE_MODEL, help="model folder (default: the embedded SmolLM2)")
    parser.add_argument("--batches", default="1,32", help="batch sizes, comma-separated (default 1,32)")
    parser.add_argument("--steps", type=int, default=24, help="timed decode steps per run (default 24)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of free/constrained runs (default 3)")
    parser.add_argument("--docs", action="store_true", help="write the table into docs/benchmarks.md")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    batches = [int(b) for b in args.batches.split(",")]
    llm = LLM(args.model, max_num_seqs=max(batches), max_model_len=512)
    device = jax.devices()[0]
    rows, record = [], provenance("cpu" if device.platform == "cpu" else f"{device.platform}: {device.device_kind}")
    for size in batches:
        batch = prompts(llm, size)
        constrained = [True] if size == 1 else [i % 2 == 0 for i in range(size)]
        free, held, outputs = [], [], []
        for _ in range(args.rounds):
            free.append(time_steps(llm, batch, [False] * size, args.steps)[0])
            seconds, texts = time_steps(llm, batch, constrained, args.steps)
            held.append(seconds)
            outputs += [text for text, on in zip(texts, constrained) if on]
        valid = sum(check_prefix(llm, text) for text in outputs)
        free_ms, held_ms = statistics.median(free) * 1e3, statistics.median(held) * 1e3
        rows.append(
            {
                "batch": size,
                "constrained rows": sum(constrained),
                "free (ms/step)": f"{free_ms:.1f}",
                "constrained (ms/step)": f"{held_ms:.1f}",
                "slowdown": f"{(held_ms / free_ms - 1) * 100:+.1f}%",
                "outputs on the schema": f"{valid}/{len(outputs)}",
            }
        )
        print(rows[-1], flush=True)
    table = markdown_table(rows)
    print(table)
    record["rows"] = rows
    if args.json:
        args.json.write_text(json.dumps(record, indent=1))
    if args.docs:
        write_docs_section("structured-outputs", f"{provenance_lines(record)}\n\n{table}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
