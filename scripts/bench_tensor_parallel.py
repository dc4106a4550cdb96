"""What tensor parallelism costs and saves, per device, for a real model shape: weights and KV cache held by each
device (from the arrays' shardings) and the collectives of one step's compiled program (count and bytes), at
tensor-parallel sizes 1, 2, 4 and 8 over 8 forced CPU devices.

Speed on forced CPU devices means nothing (they share this machine's cores), so nothing here is timed: the engine
is built compile-only (no weights are allocated) with the Llama-3.1-8B shape laid over a tiny test model's folder,
in bfloat16, with a fixed KV cache so that the sizes compare, and its programs compiled for this CPU.

    python scripts/bench_tensor_parallel.py [--model llama-8b] [--sizes 1 2 4 8] [--docs]
"""

from __future__ import annotations

import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import argparse  # noqa: E402
import sys  # noqa: E402

import numpy as np  # noqa: E402
from _harness import ROOT, markdown_table, provenance, provenance_lines, write_docs_section  # noqa: E402

sys.path.insert(0, str(ROOT))

import jax  # noqa: E402

from jaxserve import LLM  # noqa: E402
from jaxserve.parallel import collectives  # noqa: E402
from scripts.compile_targets import LLAMA_1B, LLAMA_8B  # noqa: E402
from scripts.make_test_models import build_test_models  # noqa: E402

SHAPES = {"llama-8b": LLAMA_8B, "llama-1b": LLAMA_1B}
GIB = 1 << 30


def held_per_device(tree) -> int:
    """Bytes one device holds of the (abstract, sharded) arrays in `tree`: the largest share."""
    per_device = [0] * jax.device_count()
    for leaf in jax.tree.leaves(tree):
        if leaf.sharding is None:  # one device, unsharded
            per_device[0] += leaf.size * np.dtype(leaf.dtype).itemsize
            continue
        shard = int(np.prod(leaf.sharding.shard_shape(leaf.shape))) * np.dtype(leaf.dtype).itemsize
        for device in leaf.sharding.device_set:
            per_device[device.id] += shard
    return max(per_device)


def measure(folder: str, shape: dict, tp: int, num_kv_pages: int) -> dict:
    llm = LLM(
        folder, hf_overrides=shape, dtype="bfloat16", tensor_parallel_size=tp, target="cpu", max_model_len=8192,
        max_num_seqs=16, max_num_batched_tokens=16, num_kv_pages=num_kv_pages, progress=False,
    )  # fmt: skip
    runner = llm.engine.runner
    step = collectives(runner.programs._executables[16].as_text())
    reduce, gather = step.get("all-reduce"), step.get("all-gather")
    return {
        "TP": tp,
        "weights GiB / device": f"{held_per_device(runner.params) / GIB:.2f}",
        "KV cache GiB / device": f"{held_per_device(runner.state.kv_pages) / GIB:.2f}",
        "all-reduce / step": reduce.count if reduce else 0,
        "all-reduce MiB / step": f"{reduce.bytes / (1 << 20):.2f}" if reduce else "0",
        "all-gather / step": gather.count if gather else 0,
        "all-gather KiB / step": f"{gather.bytes / 1024:.1f}" if gather else "0",
        "other collectives": ", ".join(
            f"{k} {v.count}" for k, v in step.items() if k not in ("all-reduce", "all-gather")
        )
        or "none",
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=sorted(SHAPES), default="llama-8b")
    parser.add_argument("--sizes", nargs="+", type=int, default=[1, 2, 4, 8])
    parser.add_argument("--num-kv-pages", type=int, default=4096, help="the same cache at every size")
    parser.add_argument("--docs", action="store_true", help="write the table into docs/benchmarks.md")
    args = parser.parse_args()
    folder = str(build_test_models(ROOT / ".cache" / "test-models", ["tiny-llama"])["tiny-llama"])
    rows = []
    for tp in args.sizes:
        rows.append(measure(folder, SHAPES[args.model], tp, args.num_kv_pages))
        print(rows[-1], flush=True)
    body = markdown_table(rows)
    print(body)
    if args.docs:
        record = provenance("8 CPU devices forced on this machine (compile-only: nothing allocated or timed)")
        note = (
            f"{args.model} shape in bfloat16, {args.num_kv_pages} KV pages of 16 tokens at every size; one step of "
            "16 tokens (16 sequences)."
        )
        write_docs_section("tensor-parallel-cpu", f"{provenance_lines(record)}\n\n{note}\n\n{body}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
