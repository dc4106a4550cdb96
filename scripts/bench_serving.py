"""Serving sweep: `jaxserve serve` in a subprocess, then `jaxserve bench serve` against it at each concurrency
(output tokens/s, TTFT and TPOT percentiles) and on /v1/embeddings at each batch size (one client, so a request
of B texts is a batch of B), with the HF transformers baseline measured in the same command and two plots:
output tokens/s against concurrency, and embedding tokens/s against batch size.

The serving target (issue 7): at 64 concurrent clients, 128 in / 128 out, output tokens/s at least 5x HF
`generate` at batch 64 (measured here with --hf on the same model, dtype and lengths), and TTFT p99 under 200 ms.

    python scripts/bench_serving.py --hf --docs                         # CPU: the two embedded defaults
    python scripts/bench_serving.py --llama-1b --hf --docs              # GPU: the 1B shape, random weights
    python scripts/bench_serving.py --concurrency 1 4 16 --input-len 64 --output-len 32 --embed-batch-sizes 1 8
"""

from __future__ import annotations

import argparse
import asyncio
import json
from pathlib import Path

import numpy as np
from _harness import ROOT, launched_server, markdown_table, provenance, provenance_lines, write_docs_section

from jaxserve.bench.serve import ServeBenchConfig, run_serve_bench
from jaxserve.model_source import DEFAULT_GENERATE_MODEL, DEFAULT_POOLING_MODEL
from jaxserve.server.launch import free_port

PLOTS = ROOT / "docs" / "img"


def generation_sweep(url: str, model: str, vocab: int, args: argparse.Namespace) -> list[dict]:
    rows = []
    for clients in args.concurrency:
        config = ServeBenchConfig(
            base_url=url, model=model, num_prompts=max(8, args.prompts_per_client * clients), max_concurrency=clients,
            random_input_len=args.input_len, random_output_len=args.output_len, vocab_size=vocab, disable_tqdm=True,
            percentile_metrics=("ttft", "tpot", "itl", "e2el"),
        )  # fmt: skip
        result = asyncio.run(run_serve_bench(config))
        rows.append({
            "clients": clients,
            "requests": result["completed"],
            "output tok/s": round(result["output_throughput"], 1),
            "TTFT p50 ms": round(result["median_ttft_ms"], 1),
            "TTFT p99 ms": round(result["p99_ttft_ms"], 1),
            "TPOT p50 ms": round(result["median_tpot_ms"], 1),
            "TPOT p99 ms": round(result["p99_tpot_ms"], 1),
        })  # fmt: skip
        print(rows[-1], flush=True)
    return rows


def embedding_sweep(url: str, model: str, vocab: int, args: argparse.Namespace) -> list[dict]:
    rows = []
    for batch in args.embed_batch_sizes:
        config = ServeBenchConfig(
            base_url=url, model=model, endpoint="/v1/embeddings", embed_batch_size=batch, max_concurrency=1,
            num_prompts=batch * args.embed_requests, random_input_len=args.embed_input_len, vocab_size=vocab,
            disable_tqdm=True,
        )  # fmt: skip
        result = asyncio.run(run_serve_bench(config))
        rows.append({
            "batch": batch,
            "requests": result["completed"],
            "input tok/s": round(result["total_token_throughput"], 1),
            "latency p50 ms": round(result["median_e2el_ms"], 1),
            "latency p99 ms": round(result["p99_e2el_ms"], 1),
        })  # fmt: skip
        print(rows[-1], flush=True)
    return rows


def hf_baseline(folder: Path, dummy: bool, dtype: str, batch: int, vocab: int, args: argparse.Namespace) -> dict:
    """HF transformers `generate` on one batch of `batch` random prompts of the same lengths."""
    from bench_generate import hf_generate_seconds

    rng = np.random.default_rng(0)
    prompts = [rng.integers(100, vocab, args.input_len).tolist() for _ in range(batch)]
    seconds = hf_generate_seconds(folder, dummy, dtype, prompts, args.output_len)
    return {"batch": batch, "seconds": seconds, "output tok/s": round(batch * args.output_len / seconds, 1)}


def plot(generation: list[dict], embedding: list[dict], hf: dict | None, device: str, stem: str) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    PLOTS.mkdir(parents=True, exist_ok=True)
    paths = []
    if generation:
        fig, ax = plt.subplots(figsize=(6, 4))
        ax.plot([r["clients"] for r in generation], [r["output tok/s"] for r in generation], "o-", label="jaxserve")
        if hf:
            ax.axhline(hf["output tok/s"], color="gray", linestyle="--", label=f"HF generate, batch {hf['batch']}")
        ax.set(xscale="log", xlabel="concurrent clients", ylabel="output tokens/s", title=f"Serving on {device}")
        ax.set_xticks([r["clients"] for r in generation], [str(r["clients"]) for r in generation])
        ax.legend()
        paths.append(PLOTS / f"{stem}-generation.png")
        fig.savefig(paths[-1], dpi=120, bbox_inches="tight")
    if embedding:
        fig, ax = plt.subplots(figsize=(6, 4))
        ax.plot([r["batch"] for r in embedding], [r["input tok/s"] for r in embedding], "o-")
        ax.set(xscale="log", xlabel="texts per request (one client)", ylabel="embedding tokens/s",
               title=f"/v1/embeddings on {device}")  # fmt: skip
        ax.set_xticks([r["batch"] for r in embedding], [str(r["batch"]) for r in embedding])
        paths.append(PLOTS / f"{stem}-embeddings.png")
        fig.savefig(paths[-1], dpi=120, bbox_inches="tight")
    return paths


def docs_body(record: dict, plots: list[Path]) -> str:
    parts = [provenance_lines(record)]
    if record["generation"]:
        parts.append(f"Generation ({record['input_len']} in / {record['output_len']} out, {record['generate_model']}):")
        parts.append(markdown_table(record["generation"]))
    if record.get("hf"):
        hf = record["hf"]
        parts.append(
            f"HF transformers `generate`, batch {hf['batch']}, same lengths: {hf['output tok/s']} output tok/s."
        )
    if record["embedding"]:
        parts.append(f"Embeddings ({record['embed_input_len']} tokens per text, {record['pooling_model']}):")
        parts.append(markdown_table(record["embedding"]))
    parts += [f"![{p.stem}](img/{p.name})" for p in plots]
    return "\n\n".join(parts)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--llama-1b", action="store_true", help="generate with the Llama-3.2-1B shape (random weights)")
    parser.add_argument("--concurrency", type=int, nargs="*", default=[1, 2, 4, 8, 16, 32, 64])
    parser.add_argument("--prompts-per-client", type=int, default=4, help="requests per client at each level")
    parser.add_argument("--input-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--embed-batch-sizes", type=int, nargs="*", default=[1, 4, 16, 64])
    parser.add_argument("--embed-input-len", type=int, default=128)
    parser.add_argument("--embed-requests", type=int, default=8, help="requests at each batch size")
    parser.add_argument("--hf", action="store_true", help="time HF generate at the largest concurrency as a batch")
    parser.add_argument("--serve-args", default="", help="more `jaxserve serve` flags")
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("--docs", action="store_true", help="write the tables and plots into docs/benchmarks.md")
    args = parser.parse_args()

    import jax

    from jaxserve.model_source import load_hf_config, resolve_model

    device = jax.devices()[0].device_kind
    if args.llama_1b:
        from bench_generate import llama_1b_folder

        generate_model, dummy, dtype = str(llama_1b_folder()), True, "bfloat16"
        extra = ["--load-format", "dummy", "--dtype", "bfloat16"]
    else:
        generate_model, dummy, dtype, extra = DEFAULT_GENERATE_MODEL, False, "float32", []
    largest = max(args.concurrency, default=1)
    max_len = max(args.input_len + args.output_len, args.embed_input_len) + 16
    # --strict-compile: measure the steady state, not steps padded up while buckets compile in the background
    serve_args = [generate_model, DEFAULT_POOLING_MODEL, "--max-num-seqs", str(max(largest, 8)), "--max-model-len",
                  str(max_len), "--strict-compile", *extra, *args.serve_args.split()]  # fmt: skip
    generate_folder, pooling_folder = resolve_model(generate_model), resolve_model(DEFAULT_POOLING_MODEL)
    gen_vocab, pool_vocab = (load_hf_config(f).vocab_size for f in (generate_folder, pooling_folder))

    record = {**provenance(device), "input_len": args.input_len, "output_len": args.output_len,
              "embed_input_len": args.embed_input_len, "generate_model": generate_model,
              "pooling_model": DEFAULT_POOLING_MODEL}  # fmt: skip
    with launched_server(serve_args, free_port()) as (url, startup):
        record["startup_seconds"] = startup
        record["generation"] = generation_sweep(url, generate_model, gen_vocab, args)
        record["embedding"] = embedding_sweep(url, DEFAULT_POOLING_MODEL, pool_vocab, args)
    if args.hf and args.concurrency:
        record["hf"] = hf_baseline(generate_folder, dummy, dtype, largest, gen_vocab, args)
        print("HF", record["hf"])
    stem = f"serving-{jax.default_backend()}"
    plots = plot(record["generation"], record["embedding"], record.get("hf"), record["device"], stem)
    if args.json:
        args.json.write_text(json.dumps(record, indent=2))
    if args.docs:
        write_docs_section(f"serving-{jax.default_backend()}", docs_body(record, plots))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
