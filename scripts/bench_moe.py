"""The mixture-of-experts layer: grouped experts (tokens sorted by expert, `jax.lax.ragged_dot`; what the models
run, models/moe.py) against dense experts (every expert on every token, the unselected ones weighted 0), side by
side in one run, each jit-compiled, the median of several runs.

Shape: Qwen3-MoE-like, scaled down: hidden 256, expert intermediate 128, 32 experts, top-8 renormalised; 512 and
2048 tokens; float32 (the CPU dtype). The layer includes the router. "Expert GFLOP" counts the two grouped
products' multiply-adds the layer must do (6 * tokens * k * hidden * intermediate); the dense layer does
experts / k times as many.

    python scripts/bench_moe.py [--tokens 512 2048] [--repeats 10] [--json out.json] [--docs]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from _harness import markdown_table, provenance, provenance_lines, write_docs_section

from jaxserve.models.moe import grouped_experts, route


@dataclasses.dataclass(frozen=True)
class Shape:
    hidden: int = 256
    intermediate: int = 128
    experts: int = 32
    top_k: int = 8


def dense_experts(x, expert_ids, weights, gate_up, down, act) -> jax.Array:
    """Every expert on every token ([T, E, ...]), combined with the routing weights scattered over [T, E]."""
    gate, up = jnp.split(jnp.einsum("th,eih->tei", x, gate_up), 2, axis=-1)
    out = jnp.einsum("tei,ehi->teh", act(gate) * up, down)
    combine = jnp.zeros(expert_ids.shape[:1] + gate_up.shape[:1], jnp.float32)
    combine = combine.at[jnp.arange(x.shape[0])[:, None], expert_ids].set(weights)
    return jnp.einsum("teh,te->th", out, combine, preferred_element_type=jnp.float32).astype(x.dtype)


def moe_layer(experts_fn, top_k: int):
    def layer(x, router, gate_up, down):
        expert_ids, weights = route(x @ router.T, top_k, renormalize=True)
        return experts_fn(x, expert_ids, weights, gate_up, down, jax.nn.silu)

    return jax.jit(layer)


def median_seconds(fn, args, repeats: int) -> float:
    """Median wall time over `repeats` runs after two warm-up runs (the first compiles), each synchronized."""
    for _ in range(2):
        jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def run(shape: Shape, token_counts: list[int], repeats: int, dtype=jnp.float32) -> list[dict]:
    rng = np.random.default_rng(0)
    h, i, e = shape.hidden, shape.intermediate, shape.experts
    weights = (
        rng.standard_normal((e, h)) * h**-0.5,  # router
        rng.standard_normal((e, 2 * i, h)) * h**-0.5,
        rng.standard_normal((e, h, i)) * i**-0.5,
    )
    router, gate_up, down = (jnp.asarray(w, dtype) for w in weights)
    layers = {"grouped (ragged_dot)": grouped_experts, "dense (all experts)": dense_experts}
    rows = []
    for tokens in token_counts:
        x = jnp.asarray(rng.standard_normal((tokens, h)), dtype)
        useful = 6 * tokens * shape.top_k * h * i
        outputs, seconds = {}, {}
        for name, experts_fn in layers.items():
            fn = moe_layer(experts_fn, shape.top_k)
            outputs[name] = np.asarray(fn(x, router, gate_up, down), np.float32)
            seconds[name] = median_seconds(fn, (x, router, gate_up, down), repeats)
        grouped, dense = outputs.values()
        scale = np.abs(dense).max()
        if np.abs(grouped - dense).max() > 1e-4 * scale:
            raise AssertionError(
                f"{tokens} tokens: grouped and dense outputs differ by {np.abs(grouped - dense).max()}"
            )
        counts = np.bincount(np.asarray(route(x @ router.T, shape.top_k, True)[0]).ravel(), minlength=e)
        for name, s in seconds.items():
            rows.append({
                "tokens": tokens,
                "experts": name,
                "ms": round(s * 1e3, 2),
                "expert GFLOP/s": round(useful / s / 1e9, 1),
                "vs dense": f"{seconds['dense (all experts)'] / s:.2f}x",
                "tokens per expert (min-max)": f"{counts.min()}-{counts.max()}",
            })  # fmt: skip
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, nargs="+", default=[512, 2048], help="tokens per layer call")
    parser.add_argument("--repeats", type=int, default=10, help="timed runs per variant (the median is reported)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--docs", action="store_true", help="write the table into docs/benchmarks.md")
    args = parser.parse_args(argv)

    shape = Shape()
    rows = run(shape, args.tokens, args.repeats)
    device = jax.devices()[0].device_kind
    table = markdown_table(rows)
    print(f"device: {device}; {dataclasses.asdict(shape)}, float32")
    print(table)
    record = {**provenance(device), "jax": jax.__version__, "shape": dataclasses.asdict(shape), "results": rows}
    if args.json:
        args.json.write_text(json.dumps(record, indent=2))
    if args.docs:
        write_docs_section(f"moe-{jax.default_backend()}", f"{provenance_lines(record)}\n\n{table}")


if __name__ == "__main__":
    main()
