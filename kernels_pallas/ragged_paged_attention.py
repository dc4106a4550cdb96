"""Ragged paged attention: one call per layer for a flat batch of prefill chunks and decode tokens.

Shapes (T tokens of S sequences in the step, P pages of `page_size` tokens, G = Hq // Hkv):

    q            [T, Hq, D]      queries of the step's new tokens, sequence after sequence
    k, v         [T, Hkv, D]     their keys and values
    kv_pages     [P, page_size, 2 * Hkv, D]   the cache; row 2h holds K of KV head h, row 2h + 1 its V
    kv_lens      [S] int32       tokens of each sequence in the cache after this step (cached + new)
    block_table  [S, pages_per_seq] int32   the pages of each sequence, in order
    cu_q_lens    [S + 1] int32   prefix sums of the new-token counts; sequence s owns q[cu_q_lens[s]:cu_q_lens[s+1]]
    num_seqs     [1] int32       sequences in use; the rest of S (and every token past cu_q_lens[num_seqs]) is padding

The new token t of sequence s sits at position kv_lens[s] - (cu_q_lens[s + 1] - t). The call first writes the
new K/V into their pages, then attends: each token sees the cached tokens and the new tokens up to its own
position (so causal over the new tokens, full over the cache), within `sliding_window` when one is set.
Returns (out [T, Hq, D] in q's dtype, kv_pages with the new K/V written). Padding tokens write nothing and
come out as zeros.

This file holds the pure-`jnp` reference. It attends in two parts under one online softmax: the cached
context, read from the pages in blocks of positions up to the longest cached context in the step, and the
step's own new tokens, read straight from k/v in blocks of keys. So a fresh prefill never gathers from the
pages at all, and memory stays O(T x block) for any context length.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from ._online_softmax import _accumulate, attend_packed_keys, finish, init_carry, soft_capped

_MAX_GATHERED_ELEMENTS = 1 << 24  # bound on T * block_tokens * 2Hkv * D per loop iteration
_MAX_BLOCK_TOKENS = 128  # short contexts should not gather much past their end


def _kv_block_pages(num_tokens: int, page_size: int, pages_per_seq: int, row_elements: int) -> int:
    """Pages per attention block: within the gather bound and the block length, at least one page."""
    fit = _MAX_GATHERED_ELEMENTS // max(1, num_tokens * page_size * row_elements)
    return max(1, min(pages_per_seq, fit, _MAX_BLOCK_TOKENS // page_size))


def write_kv_pages(kv_pages: jax.Array, k: jax.Array, v: jax.Array, slots: jax.Array) -> jax.Array:
    """Scatter K/V rows into the flat slot index `page * page_size + offset`; out-of-range slots are dropped."""
    num_pages, page_size, two_hkv, head_dim = kv_pages.shape
    interleaved = jnp.stack([k, v], axis=2).reshape(k.shape[0], two_hkv, head_dim)
    flat = kv_pages.reshape(num_pages * page_size, two_hkv, head_dim)
    flat = flat.at[slots].set(interleaved.astype(kv_pages.dtype), mode="drop")
    return flat.reshape(kv_pages.shape)


def token_layout(kv_lens: jax.Array, cu_q_lens: jax.Array, num_seqs: jax.Array, num_tokens: int):
    """(sequence index, position, is-real) of every token slot in a ragged step."""
    t = jnp.arange(num_tokens, dtype=jnp.int32)
    num_real = cu_q_lens[num_seqs[0]]
    seq = jnp.searchsorted(cu_q_lens[1:], t, side="right").astype(jnp.int32)
    seq = jnp.minimum(seq, kv_lens.shape[0] - 1)
    position = kv_lens[seq] - (cu_q_lens[seq + 1] - t)
    return seq, position, t < num_real


def ragged_paged_attention_reference(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    kv_pages: jax.Array,
    kv_lens: jax.Array,
    block_table: jax.Array,
    cu_q_lens: jax.Array,
    num_seqs: jax.Array,
    *,
    sm_scale: float,
    sliding_window: int | None = None,
    soft_cap: float | None = None,
) -> tuple[jax.Array, jax.Array]:
    num_tokens, num_q_heads, head_dim = q.shape
    _, page_size, two_hkv, _ = kv_pages.shape
    num_kv_heads = two_hkv // 2
    group = num_q_heads // num_kv_heads
    pages_per_seq = block_table.shape[1]

    seq, position, real = token_layout(kv_lens, cu_q_lens, num_seqs, num_tokens)
    safe_position = jnp.maximum(position, 0)
    page = block_table[seq, safe_position // page_size]
    slots = jnp.where(real, page * page_size + safe_position % page_size, kv_pages.shape[0] * page_size)
    kv_pages = write_kv_pages(kv_pages, k, v, slots)

    qg = q.astype(jnp.float32).reshape(num_tokens, num_kv_heads, group, head_dim) * sm_scale
    lowest = position - sliding_window + 1 if sliding_window else jnp.zeros_like(position)
    cached = (kv_lens - (cu_q_lens[1:] - cu_q_lens[:-1]))[seq]  # [T] cached positions of each token's sequence

    # 1. the cached context, gathered from the pages per token
    block_pages = _kv_block_pages(num_tokens, page_size, pages_per_seq, two_hkv * head_dim)
    num_blocks_total = -(-pages_per_seq // block_pages)
    padded_table = jnp.pad(block_table, ((0, 0), (0, num_blocks_total * block_pages - pages_per_seq)))
    block_tokens = block_pages * page_size
    longest_cached = jnp.max(jnp.where(real, cached, 0))

    def cached_block(j, carry):
        pages = jax.lax.dynamic_slice_in_dim(padded_table, j * block_pages, block_pages, axis=1)[seq]
        kv = kv_pages[pages].astype(jnp.float32).reshape(num_tokens, block_tokens, num_kv_heads, 2, head_dim)
        kv_pos = j * block_tokens + jnp.arange(block_tokens, dtype=jnp.int32)
        visible = (kv_pos[None, :] < cached[:, None]) & (kv_pos[None, :] >= lowest[:, None]) & real[:, None]
        # stale slots of reused pages may hold anything, NaN included: keep them out of p @ V entirely
        values = jnp.where(visible[:, :, None, None], kv[..., 1, :], 0.0)
        scores = soft_capped(jnp.einsum("tngd,tknd->tngk", qg, kv[..., 0, :]), soft_cap)

        def weighted_values(p):
            return jnp.einsum("tngk,tknd->tngd", p, values)

        return _accumulate(carry, scores, visible[:, None, None, :], weighted_values)

    init = init_carry(num_tokens, num_kv_heads, group, head_dim)
    carry = jax.lax.fori_loop(0, (longest_cached + block_tokens - 1) // block_tokens, cached_block, init)

    # 2. the step's new tokens: causal within each sequence, keys shared by every query (_online_softmax.py,
    # the same walk as varlen_attention's)
    carry = attend_packed_keys(
        carry,
        qg,
        k,
        v,
        seq,
        position,
        real,
        (cu_q_lens[seq], cu_q_lens[seq + 1]),
        cu_q_lens[num_seqs[0]],
        block=min(num_tokens, _MAX_BLOCK_TOKENS),
        causal=True,
        sliding_window=sliding_window,
        soft_cap=soft_cap,
    )
    return finish(carry).reshape(num_tokens, num_q_heads, head_dim).astype(q.dtype), kv_pages
