"""Start-up time: from launching `jaxserve serve` to its first /health 200, cold (an empty compile cache) and
warm (the same cache again), split into weight loading and compilation as the server exports them on /metrics.

Targets (issue 7): the 1B shape on a GPU under 60 s cold and 15 s warm; the two embedded default models on CPU
under 30 s warm. Without --strict-compile the server answers once its first buckets are compiled (every bucket
up to --max-num-seqs, and the largest); the rest compile in the background.

    python scripts/bench_startup.py                       # both embedded defaults (make serve's command)
    python scripts/bench_startup.py --llama-1b            # the Llama-3.2-1B shape, random weights (GPU)
    python scripts/bench_startup.py ... --json out.json --docs
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import httpx
from _harness import launched_server, markdown_table, provenance, provenance_lines, write_docs_section
from prometheus_client.parser import text_string_to_metric_families

from jaxserve.server.launch import free_port

PER_MODEL = ("jaxserve:startup_load_seconds", "jaxserve:startup_compile_seconds", "jaxserve:buckets_compiled",
             "jaxserve:buckets_total")  # fmt: skip


def startup_metrics(url: str) -> dict:
    """The server's own account: seconds since launch, and per model loading, compiling and buckets."""
    families = {f.name: f for f in text_string_to_metric_families(httpx.get(f"{url}/metrics").text)}
    models: dict[str, dict] = {}
    for name in PER_MODEL:
        for sample in families[name].samples:
            models.setdefault(sample.labels["model_name"], {})[name.split(":")[1]] = sample.value
    return {"startup_seconds": families["jaxserve:startup_seconds"].samples[0].value, "models": models}


def measure(serve_args: list[str], label: str) -> dict:
    with launched_server(serve_args, free_port()) as (url, seconds):
        return {"run": label, "seconds_to_health": seconds, **startup_metrics(url)}


def rows(runs: list[dict]) -> list[dict]:
    table = []
    for run in runs:
        for model, m in run["models"].items():
            table.append({
                "run": run["run"],
                "to /health (s)": round(run["seconds_to_health"], 1),
                "model": model,
                "load (s)": round(m["startup_load_seconds"], 1),
                "compile (s)": round(m["startup_compile_seconds"], 1),
                "buckets at start": f"{m['buckets_compiled']:.0f} of {m['buckets_total']:.0f}",
            })  # fmt: skip
    return table


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("models", nargs="*", help="models to serve (default: the two embedded defaults)")
    parser.add_argument("--llama-1b", action="store_true", help="serve the Llama-3.2-1B shape with random weights")
    parser.add_argument("--serve-args", default="--max-model-len 2048", help="more `jaxserve serve` flags")
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("--docs", action="store_true", help="write the table into docs/benchmarks.md")
    args = parser.parse_args()

    import jax

    serve_args = list(args.models) + args.serve_args.split()
    if args.llama_1b:
        from bench_generate import llama_1b_folder

        serve_args = [str(llama_1b_folder()), "--load-format", "dummy", *args.serve_args.split()]
    cache = Path(tempfile.mkdtemp(prefix="jaxserve-xla-"))
    with_cache = [*serve_args, "--compile-cache-dir", str(cache)]
    runs = [measure(with_cache, "cold"), measure(with_cache, "warm"), measure([*with_cache, "--strict-compile"],
            "warm, --strict-compile")]  # fmt: skip
    record = {**provenance(jax.devices()[0].device_kind), "runs": runs}
    table = markdown_table(rows(runs))
    print(table)
    if args.json:
        args.json.write_text(json.dumps(record, indent=2))
    if args.docs:
        write_docs_section(f"startup-{jax.default_backend()}", f"{provenance_lines(record)}\n\n{table}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
