"""Kernel roofline benchmark: each kernel's time, its effective bandwidth (bytes it must move / time) against a
copy measured in the same run, and attention FLOP/s against a bf16 matmul measured in the same run.

Workloads (bf16, Llama-3.2-1B-like attention: 32 query heads, 8 KV heads, head_dim 128, pages of 16 tokens):

    decode-64x2048     64 sequences, one new token each, 2048 cached tokens      target >= 70% of copy bandwidth
    decode-16x1024     16 x 1024, side by side with JAX's stock pallas.ops.gpu.paged_attention (GPU only)
    prefill-8x2048     8 fresh prompts of 2048 tokens, causal                     target >= 50% of the matmul rate
    chunk-4x2048+2048  4 prefill chunks of 2048 tokens over 2048 cached tokens
    mixed              56 decodes at 2048 + one 2048-token chunk over 1024 cached, in one call
    varlen-bert        BERT-base attention (12 heads, head_dim 64), 128 segments x 256, bidirectional
    pool-mean          segment_pool MEAN over [65536, 1024] bf16 in 256 segments   target >= 70% of copy bandwidth

Each runs on the Pallas kernel (`--backend pallas`, the default on GPU/TPU) and on the jnp reference, so the
table shows both. Bytes counted are those a kernel cannot avoid: every visible cached K/V row read once, the
new K/V written once, queries read and outputs written once (and for pooling, the hidden states read once).
FLOPs are those of the visible score and value products (4 * Hq * D per query-key pair).

    python scripts/bench_kernels.py [--only decode prefill ...] [--repeats 20] [--json out.json]
    python scripts/bench_kernels.py --smoke    # tiny shapes; on CPU (Pallas interpreted) it checks the script
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import importlib
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from _harness import markdown_table, provenance, provenance_lines, write_docs_section

from jaxserve.kernels_pallas import kv_cache_shape
from jaxserve.kernels_pallas.ragged_paged_attention import (
    ragged_paged_attention_pallas,
    ragged_paged_attention_reference,
)
from jaxserve.kernels_pallas.segment_pool import segment_pool_pallas, segment_pool_reference
from jaxserve.kernels_pallas.varlen_attention import varlen_attention_pallas, varlen_attention_reference

DTYPE = jnp.bfloat16
BYTES = 2


@dataclasses.dataclass(frozen=True)
class Attention:
    num_q_heads: int = 32
    num_kv_heads: int = 8
    head_dim: int = 128
    page_size: int = 16


@dataclasses.dataclass
class Result:
    name: str
    kernel: str  # pallas / reference / stock
    shape: str
    seconds: float
    bytes: float
    flops: float
    target: str = ""

    def row(self, copy_bw: float, matmul_rate: float) -> dict:
        bandwidth, rate = self.bytes / self.seconds, self.flops / self.seconds
        return {
            "workload": self.name,
            "kernel": self.kernel,
            "shape": self.shape,
            "ms": round(self.seconds * 1e3, 4),
            "GB/s": round(bandwidth / 1e9, 1),
            "% copy": round(100 * bandwidth / copy_bw, 1),
            "TFLOP/s": round(rate / 1e12, 2),
            "% matmul": round(100 * rate / matmul_rate, 1),
            "target": self.target,
        }


def median_seconds(call: Callable[[], object], repeats: int) -> float:
    """Median wall time of `call` over `repeats` runs after two warm-up runs, each run synchronized."""
    for _ in range(2):
        jax.block_until_ready(call())
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(call())
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def copy_bandwidth(num_bytes: int, repeats: int) -> float:
    """Bytes/s of an elementwise pass (read + write) over a bf16 array of `num_bytes`."""
    x = jnp.ones((num_bytes // BYTES,), DTYPE)
    add = jax.jit(lambda x: x + jnp.asarray(1, DTYPE))
    return 2 * num_bytes / median_seconds(lambda: add(x), repeats)


def matmul_rate(n: int, repeats: int) -> float:
    """FLOP/s of an n x n x n bf16 matmul."""
    a, b = (jax.random.normal(jax.random.key(i), (n, n), DTYPE) for i in range(2))
    mm = jax.jit(jnp.matmul)
    return 2 * n**3 / median_seconds(lambda: mm(a, b), repeats)


# --- ragged paged attention ---------------------------------------------------------------------------------------


@dataclasses.dataclass
class RaggedStep:
    """A step's inputs on device: (cached, new) tokens per sequence, pages laid out sequence after sequence."""

    seqs: list[tuple[int, int]]
    shape: Attention
    args: tuple

    @classmethod
    def build(cls, seqs: list[tuple[int, int]], shape: Attention) -> RaggedStep:
        ps = shape.page_size
        pages = [-(-(cached + new) // ps) for cached, new in seqs]
        pages_per_seq = max(pages)
        rng = np.random.default_rng(0)
        table = np.zeros((len(seqs), pages_per_seq), np.int32)
        order = rng.permutation(sum(pages)).astype(np.int32)  # scattered pages, as after a while of serving
        used = 0
        for s, n in enumerate(pages):
            table[s, :n] = order[used : used + n]
            used += n
        num_tokens = sum(new for _, new in seqs)
        key = jax.random.key(1)
        q = jax.random.normal(key, (num_tokens, shape.num_q_heads, shape.head_dim), DTYPE)
        k = jax.random.normal(key, (num_tokens, shape.num_kv_heads, shape.head_dim), DTYPE)
        cache = jax.random.normal(key, kv_cache_shape(sum(pages), ps, shape.num_kv_heads, shape.head_dim), DTYPE)
        kv_lens = jnp.asarray([c + n for c, n in seqs], jnp.int32)
        cu_q_lens = jnp.asarray(np.concatenate([[0], np.cumsum([n for _, n in seqs])]), jnp.int32)
        args = (q, k, k, cache, kv_lens, jnp.asarray(table), cu_q_lens, jnp.asarray([len(seqs)], jnp.int32))
        return cls(seqs, shape, args)

    def bytes(self) -> float:
        s = self.shape
        row = 2 * s.num_kv_heads * s.head_dim * BYTES  # one token's K and V
        cached_read = sum(cached for cached, _ in self.seqs) * row
        new = sum(n for _, n in self.seqs)
        return cached_read + new * row + 2 * new * s.num_q_heads * s.head_dim * BYTES  # + write K/V, read q, write out

    def flops(self) -> float:
        pairs = sum(new * cached + new * (new + 1) / 2 for cached, new in self.seqs)
        return 4 * self.shape.num_q_heads * self.shape.head_dim * pairs

    def seconds(self, kernel: Callable, repeats: int) -> float:
        """Time `kernel` with the cache donated and threaded through the calls, so that the write is in place."""
        step = jax.jit(functools.partial(kernel, sm_scale=self.shape.head_dim**-0.5), donate_argnums=3)
        args = list(self.args)
        args[3] = jnp.copy(args[3])

        def call():
            out, args[3] = step(*args)
            return out

        return median_seconds(call, repeats)


def stock_paged_attention_seconds(step: RaggedStep, repeats: int) -> float:
    """JAX's stock GPU paged attention (decode only, K and V in separate [Hkv, pages, page_size, D] arrays)."""
    stock = importlib.import_module("jax.experimental.pallas.ops.gpu.paged_attention")
    q, _, _, cache, kv_lens, table, _, _ = step.args
    k_pages = jnp.moveaxis(cache[:, :, 0::2], 2, 0)
    v_pages = jnp.moveaxis(cache[:, :, 1::2], 2, 0)
    call = jax.jit(stock.paged_attention)
    return median_seconds(lambda: call(q, k_pages, v_pages, table, kv_lens), repeats)


# --- varlen attention and pooling ---------------------------------------------------------------------------------


def varlen_inputs(num_segments: int, length: int, heads: int, head_dim: int):
    num_tokens = num_segments * length
    q = jax.random.normal(jax.random.key(2), (num_tokens, heads, head_dim), DTYPE)
    cu = jnp.arange(num_segments + 1, dtype=jnp.int32) * length
    return (q, q, q, cu, jnp.asarray([num_segments], jnp.int32))


def pool_inputs(num_segments: int, length: int, hidden_size: int):
    hidden = jax.random.normal(jax.random.key(3), (num_segments * length, hidden_size), DTYPE)
    cu = jnp.arange(num_segments + 1, dtype=jnp.int32) * length
    return (hidden, cu, jnp.asarray([num_segments], jnp.int32))


def plain_seconds(kernel: Callable, args: tuple, repeats: int, **static) -> float:
    call = jax.jit(functools.partial(kernel, **static))
    return median_seconds(lambda: call(*args), repeats)


# --- the run ------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Sizes:
    """Every workload's dimensions; `--smoke` shrinks them all."""

    decode: tuple[int, int] = (64, 2048)
    stock_decode: tuple[int, int] = (16, 1024)
    prefill: tuple[int, int] = (8, 2048)
    chunk: tuple[int, int, int] = (4, 2048, 2048)  # sequences, cached, new
    mixed: tuple[int, int, int, int] = (56, 2048, 1024, 2048)  # decodes at context, chunk cached, chunk new
    varlen: tuple[int, int] = (128, 256)
    pool: tuple[int, int, int] = (256, 256, 1024)
    copy_bytes: int = 1 << 30
    matmul_n: int = 8192
    attention: Attention = Attention()


SMOKE = Sizes(
    decode=(4, 40),
    stock_decode=(2, 32),
    prefill=(2, 24),
    chunk=(2, 20, 12),
    mixed=(3, 40, 17, 9),
    varlen=(4, 16),
    pool=(4, 16, 128),
    copy_bytes=1 << 20,
    matmul_n=128,
    attention=Attention(num_q_heads=4, num_kv_heads=2, head_dim=64),
)

WORKLOADS = ("decode", "stock", "prefill", "chunk", "mixed", "varlen", "pool")


def run(sizes: Sizes, only: tuple[str, ...], repeats: int, interpret: bool) -> tuple[list[Result], float, float]:
    on_gpu = jax.default_backend() == "gpu"
    pallas = functools.partial(ragged_paged_attention_pallas, interpret=interpret)
    results: list[Result] = []

    def ragged(name: str, seqs: list[tuple[int, int]], target: str = "") -> RaggedStep:
        step = RaggedStep.build(seqs, sizes.attention)
        shape = f"{len(seqs)} seqs, {sum(n for _, n in seqs)} new, {sum(c for c, _ in seqs)} cached"
        for kernel, fn in (("pallas", pallas), ("reference", ragged_paged_attention_reference)):
            results.append(Result(name, kernel, shape, step.seconds(fn, repeats), step.bytes(), step.flops(), target))
        return step

    if "decode" in only:
        n, ctx = sizes.decode
        ragged(f"decode-{n}x{ctx}", [(ctx - 1, 1)] * n, ">= 70% copy")
    if "stock" in only:
        n, ctx = sizes.stock_decode
        step = ragged(f"decode-{n}x{ctx}", [(ctx - 1, 1)] * n)
        if on_gpu:
            seconds = stock_paged_attention_seconds(step, repeats)
            results.append(Result(f"decode-{n}x{ctx}", "stock", results[-1].shape, seconds, step.bytes(), step.flops()))
    if "prefill" in only:
        n, length = sizes.prefill
        ragged(f"prefill-{n}x{length}", [(0, length)] * n, ">= 50% matmul")
    if "chunk" in only:
        n, cached, new = sizes.chunk
        ragged(f"chunk-{n}x{cached}+{new}", [(cached, new)] * n)
    if "mixed" in only:
        decodes, ctx, cached, new = sizes.mixed
        ragged("mixed", [(ctx - 1, 1)] * decodes + [(cached, new)])
    if "varlen" in only:
        segments, length = sizes.varlen
        heads, head_dim = 12, 64
        args = varlen_inputs(segments, length, heads, head_dim)
        static = dict(sm_scale=head_dim**-0.5, causal=False)
        tokens = segments * length
        moved = 4 * tokens * heads * head_dim * BYTES
        flops = 4 * heads * head_dim * segments * length**2
        kernels = (("pallas", functools.partial(varlen_attention_pallas, interpret=interpret)),
                   ("reference", varlen_attention_reference))  # fmt: skip
        for kernel, fn in kernels:
            seconds = plain_seconds(fn, args, repeats, **static)
            results.append(Result("varlen-bert", kernel, f"{segments}x{length}", seconds, moved, flops))
    if "pool" in only:
        segments, length, hidden_size = sizes.pool
        args = pool_inputs(segments, length, hidden_size)
        moved = segments * length * hidden_size * BYTES + segments * hidden_size * 4
        kernels = (("pallas", functools.partial(segment_pool_pallas, interpret=interpret)),
                   ("reference", segment_pool_reference))  # fmt: skip
        for kernel, fn in kernels:
            seconds = plain_seconds(fn, args, repeats, mode="mean")
            shape = f"[{segments * length}, {hidden_size}] in {segments}"
            results.append(Result("pool-mean", kernel, shape, seconds, moved, 0.0, ">= 70% copy"))

    return results, copy_bandwidth(sizes.copy_bytes, repeats), matmul_rate(sizes.matmul_n, repeats)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="+", choices=WORKLOADS, default=list(WORKLOADS), help="workloads to run")
    parser.add_argument("--repeats", type=int, default=20, help="timed runs per kernel (the median is reported)")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes (with the Pallas interpreter on CPU)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--docs", action="store_true", help="write the table into docs/benchmarks.md")
    args = parser.parse_args(argv)

    interpret = jax.default_backend() == "cpu"  # Pallas runs in its interpreter there: a check, not a measurement
    sizes = SMOKE if args.smoke else Sizes()
    results, copy_bw, mm_rate = run(sizes, tuple(args.only), args.repeats, interpret)
    rows = [r.row(copy_bw, mm_rate) for r in results]
    device = jax.devices()[0].device_kind
    print(f"device: {device}; copy {copy_bw / 1e9:.0f} GB/s; bf16 matmul {mm_rate / 1e12:.1f} TFLOP/s")
    table = markdown_table(rows)
    print(table)
    record = {
        **provenance(device),
        "jax": jax.__version__,
        "copy_GBps": copy_bw / 1e9,
        "matmul_TFLOPs": mm_rate / 1e12,
        "results": rows,
    }
    if args.json:
        args.json.write_text(json.dumps(record, indent=2))
    if args.docs:
        summary = f"Copy {copy_bw / 1e9:,.0f} GB/s and bf16 matmul {mm_rate / 1e12:,.1f} TFLOP/s in the same run."
        write_docs_section(f"kernels-{jax.default_backend()}", f"{provenance_lines(record)}\n\n{summary}\n\n{table}")


if __name__ == "__main__":
    main()
