"""The Pallas kernels lower to Triton for CUDA, checked on CPU by lowering across platforms, without the CUDA
plugin: this catches an operation or a block shape Triton's lowering rejects. Compiling for real chips, TPU and
GPU, at real shapes is tests/test_compile_targets.py."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import pytest

from jaxserve.kernels_pallas.ragged_paged_attention import ragged_paged_attention_pallas
from jaxserve.kernels_pallas.segment_pool import POOLING_MODES, segment_pool_pallas
from jaxserve.kernels_pallas.varlen_attention import varlen_attention_pallas

pytestmark = pytest.mark.kernels

NUM_TOKENS, NUM_SEQS = 256, 16


def ragged_inputs(head_dim: int, page_size: int):
    """A Llama-3.2-1B-shaped layer (32 query heads, 8 KV heads), bf16, in a 256-token bucket."""
    pages_per_seq = 64
    num_pages = NUM_SEQS * pages_per_seq
    q = jnp.zeros((NUM_TOKENS, 32, head_dim), jnp.bfloat16)
    k = jnp.zeros((NUM_TOKENS, 8, head_dim), jnp.bfloat16)
    kv_pages = jnp.zeros((num_pages, page_size, 16, head_dim), jnp.bfloat16)
    kv_lens = jnp.zeros((NUM_SEQS,), jnp.int32)
    block_table = jnp.zeros((NUM_SEQS, pages_per_seq), jnp.int32)
    cu_q_lens = jnp.zeros((NUM_SEQS + 1,), jnp.int32)
    return q, k, k, kv_pages, kv_lens, block_table, cu_q_lens, jnp.ones((1,), jnp.int32)


def kernel_cases(platform: str):
    """(name, function, example inputs) for every kernel, lowered for `platform`."""
    cu = jnp.array([0, 100, NUM_TOKENS], jnp.int32)
    num_seqs = jnp.array([2], jnp.int32)
    bert_q = jnp.zeros((NUM_TOKENS, 12, 64), jnp.bfloat16)
    hidden = jnp.zeros((NUM_TOKENS, 768), jnp.float32)
    cases = []
    # the non-causal case is the read-only one (cross-attention): no k, v, and no cache written
    for head_dim, page_size, num_splits, causal in [(64, 16, 1, True), (128, 32, 4, True), (64, 16, 4, False)]:
        ragged = functools.partial(
            ragged_paged_attention_pallas,
            sm_scale=0.125,
            soft_cap=30.0,
            causal=causal,
            num_splits=num_splits,
            platform=platform,
        )
        q, k, v, *cache = ragged_inputs(head_dim, page_size)
        inputs = (q, k, v, *cache) if causal else (q, None, None, *cache)
        name = f"ragged-d{head_dim}-ps{page_size}-splits{num_splits}" + ("" if causal else "-noncausal")
        cases.append((name, ragged, inputs))
    for causal in (False, True):
        varlen = functools.partial(
            varlen_attention_pallas, sm_scale=0.125, causal=causal, sliding_window=64, platform=platform
        )
        cases.append((f"varlen-causal{causal}", varlen, (bert_q, bert_q, bert_q, cu, num_seqs)))
    for mode in POOLING_MODES:
        pool = functools.partial(segment_pool_pallas, mode=mode, platform=platform)
        cases.append((f"pool-{mode}", pool, (hidden, cu, num_seqs)))
    return cases


CASE_NAMES = [name for name, _, _ in kernel_cases("gpu")]


def lowered_text(function, inputs, platform: str) -> str:
    return jax.jit(function).trace(*inputs).lower(lowering_platforms=(platform,)).as_text()


@pytest.mark.parametrize("index", range(len(CASE_NAMES)), ids=CASE_NAMES)
def test_lowers_to_triton_for_cuda(index):
    _, function, inputs = kernel_cases("gpu")[index]
    text = lowered_text(function, inputs, "cuda")
    assert "__gpu$xla.gpu.triton" in text
