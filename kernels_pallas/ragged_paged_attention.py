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

With `causal=False` the call only reads (cross-attention over K/V written into the pages beforehand, e.g. an
encoder's by `write_kv_pages`): k and v are None, kv_lens[s] counts the keys already in sequence s's pages, every
query token of s sees all of them, with no mask and no window, and kv_pages comes back unchanged (the same
array, so that both modes return (out, kv_pages)).

This file holds the pure-`jnp` reference. It attends in two parts under one online softmax: the cached
context, read from the pages in blocks of positions up to the longest cached context in the step, and the
step's own new tokens, read straight from k/v in blocks of keys. So a fresh prefill never gathers from the
pages at all, and memory stays O(T x block) for any context length.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from . import ragged_paged_attention_tpu as tpu
from ._lowering import compiler_params, lowering_platform
from ._online_softmax import (
    KERNEL_MASKED,
    _accumulate,
    attend_packed_keys,
    finish,
    init_carry,
    kernel_finish,
    kernel_init,
    kernel_step,
    soft_capped,
)

_MAX_GATHERED_ELEMENTS = 1 << 24  # bound on T * block_tokens * 2Hkv * D per loop iteration
_MAX_BLOCK_TOKENS = 128  # short contexts should not gather much past their end


def _kv_block_pages(num_tokens: int, page_size: int, pages_per_seq: int, row_elements: int) -> int:
    """Pages per attention block: within the gather bound and the block length, at least one page."""
    fit = _MAX_GATHERED_ELEMENTS // max(1, num_tokens * page_size * row_elements)
    return max(1, min(pages_per_seq, fit, _MAX_BLOCK_TOKENS // page_size))


def padded_to_cache(q: jax.Array, k: jax.Array | None, v: jax.Array | None, cache_head_dim: int):
    """q, k, v zero-padded to the cache's head dim (kv_cache_shape pads it on TPU); scores and the used lanes of
    the output are unchanged by the zeros. None (a read-only call's k and v) stays None."""
    pad = cache_head_dim - q.shape[-1]
    if pad == 0:
        return q, k, v
    return tuple(None if x is None else jnp.pad(x, ((0, 0), (0, 0), (0, pad))) for x in (q, k, v))


def check_mode(k: jax.Array | None, v: jax.Array | None, causal: bool, sliding_window: int | None) -> None:
    """A causal call writes k and v; a non-causal one only reads the cache, so it takes neither, nor a window."""
    if causal and (k is None or v is None):
        raise ValueError("ragged_paged_attention needs k and v unless causal=False (a read-only call).")
    if not causal and (k is not None or v is not None):
        raise ValueError("ragged_paged_attention with causal=False only reads the cache: pass k=None and v=None.")
    if not causal and sliding_window is not None:
        raise ValueError(f"ragged_paged_attention with causal=False takes no sliding window; got {sliding_window}.")


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
    k: jax.Array | None,
    v: jax.Array | None,
    kv_pages: jax.Array,
    kv_lens: jax.Array,
    block_table: jax.Array,
    cu_q_lens: jax.Array,
    num_seqs: jax.Array,
    *,
    sm_scale: float,
    sliding_window: int | None = None,
    soft_cap: float | None = None,
    causal: bool = True,
) -> tuple[jax.Array, jax.Array]:
    check_mode(k, v, causal, sliding_window)
    model_head_dim = q.shape[-1]
    q, k, v = padded_to_cache(q, k, v, kv_pages.shape[-1])
    num_tokens, num_q_heads, head_dim = q.shape
    _, page_size, two_hkv, _ = kv_pages.shape
    num_kv_heads = two_hkv // 2
    group = num_q_heads // num_kv_heads
    pages_per_seq = block_table.shape[1]

    seq, position, real = token_layout(kv_lens, cu_q_lens, num_seqs, num_tokens)
    if causal:
        safe_position = jnp.maximum(position, 0)
        page = block_table[seq, safe_position // page_size]
        slots = jnp.where(real, page * page_size + safe_position % page_size, kv_pages.shape[0] * page_size)
        kv_pages = write_kv_pages(kv_pages, k, v, slots)
        cached = (kv_lens - (cu_q_lens[1:] - cu_q_lens[:-1]))[seq]  # [T] cached positions of each token's sequence
    else:
        cached = kv_lens[seq]  # read-only: every key is in the pages

    qg = q.astype(jnp.float32).reshape(num_tokens, num_kv_heads, group, head_dim) * sm_scale
    lowest = position - sliding_window + 1 if sliding_window else jnp.zeros_like(position)

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
    if causal:
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
    out = finish(carry).reshape(num_tokens, num_q_heads, head_dim)[..., :model_head_dim]
    return out.astype(q.dtype), kv_pages


# --- Pallas -------------------------------------------------------------------------------------------------------
#
# The kernel works on query blocks: each sequence's new tokens are cut into blocks of `block_q` tokens, and the
# blocks are laid out aligned, one after another, sequence after sequence ([num_blocks, block_q] slots, the tail of
# each sequence's last block empty). A program (block, KV head, split) takes the block's tokens times the KV head's
# G query heads as one [block_q * G, D] matrix of query rows (so a decode token alone still fills G rows of the
# matmul), walks the cached pages of its sequence and then the aligned blocks of the sequence's new keys under one
# online softmax, and, in split 0, writes its tokens' K/V into their pages. New keys are read from the step's
# inputs, never from the pages being written, and a step writes only positions at or past each sequence's cached
# length, which no program reads: so the fused write needs no ordering between programs.
#
# Split-K: with few programs (small decode batches), the cached pages of each block are divided among
# `num_splits` programs, each leaving its normalized output and log-sum-exp, which `_combine_splits` merges.
#
# A read-only call (causal=False) is the same walk with every key counted as cached (kv_lens) and no new keys: the
# kernel takes no kv_new, writes nothing, and does not alias the cache to an output.

_MIN_ROWS = 16  # query rows per program a tensor-core matmul wants at least
_MAX_ROWS = 128  # and at most: the accumulator lives in registers
_TARGET_PROGRAMS = 512  # about four programs per SM on an H100; split-K fills the grid up to this
_MAX_SPLITS = 16
_KV_BLOCK_TOKENS = 64  # cached tokens per online-softmax step: whole pages, gathered by the block table


def default_pages_per_block(page_size: int, platform: str | None = None) -> int:
    """Cache pages per online-softmax step: _KV_BLOCK_TOKENS worth (a gather of whole pages) on GPU, a DMA'd
    block of `tpu.KV_BLOCK_TOKENS` on TPU."""
    if lowering_platform(platform) == "tpu":
        return tpu.default_pages_per_block(page_size)
    return max(1, _KV_BLOCK_TOKENS // page_size)


def default_block_q(num_tokens: int, num_seqs: int, group: int) -> int:
    """Query tokens per program: the bucket's new tokens per sequence slot (T / S, so 1 in a decode bucket),
    rounded up to a power of two, then raised to give at least _MIN_ROWS query rows and capped at _MAX_ROWS."""
    per_seq = pl.next_power_of_2(-(-num_tokens // max(1, num_seqs)))
    fewest, most = pl.next_power_of_2(-(-_MIN_ROWS // group)), max(1, _MAX_ROWS // group)
    return max(1, min(most, max(per_seq, fewest)))


def default_num_splits(num_blocks: int, num_kv_heads: int) -> int:
    """Splits of the cached context per block: enough to give about _TARGET_PROGRAMS programs."""
    return max(1, min(_MAX_SPLITS, pl.next_power_of_2(-(-_TARGET_PROGRAMS // (num_blocks * num_kv_heads)))))


def _query_blocks(kv_lens, cu_q_lens, num_seqs, num_blocks: int, block_q: int, causal: bool):
    """Per aligned query block: (sequence, its first new token, its token count, 0 for an unused block); per
    sequence: (cached tokens, first block). Sequences past num_seqs own no tokens and no blocks. A read-only
    (non-causal) call's keys are all cached: kv_lens of them."""
    in_use = jnp.arange(kv_lens.shape[0]) < num_seqs[0]
    q_lens = jnp.where(in_use, cu_q_lens[1:] - cu_q_lens[:-1], 0)
    cached = jnp.where(in_use, kv_lens - q_lens if causal else kv_lens, 0)
    blocks = (q_lens + block_q - 1) // block_q
    ends = jnp.cumsum(blocks)
    first_block = ends - blocks
    i = jnp.arange(num_blocks, dtype=jnp.int32)
    seq = jnp.minimum(jnp.searchsorted(ends, i, side="right"), kv_lens.shape[0] - 1).astype(jnp.int32)
    first = (i - first_block[seq]) * block_q
    count = jnp.where(i < ends[-1], jnp.clip(q_lens[seq] - first, 0, block_q), 0)
    return (seq, first, count), (cached.astype(jnp.int32), first_block.astype(jnp.int32))


def _ragged_kernel(
    block_seq_ref, block_first_ref, block_count_ref, seq_cached_ref, seq_first_block_ref, block_table_ref,
    q_ref, *refs, group, block_q, page_size, pages_per_block, num_splits, sm_scale, sliding_window, soft_cap, causal,
):  # fmt: skip
    """One (query block, KV head, split): attend over the split's share of the cached pages, then (last split)
    over the new keys up to each row's own position; in split 0, write the block's new K/V into their pages.
    Read-only (not causal): the cached pages alone, every row seeing every key, and no kv_new ref, no write."""
    if causal:
        kv_new_ref, kv_pages_ref, out_ref, *lse_ref, kv_out_ref = refs
    else:
        kv_pages_ref, out_ref, *lse_ref = refs
    block, head, split = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    seq, first, count = block_seq_ref[block], block_first_ref[block], block_count_ref[block]
    cached = seq_cached_ref[seq]
    num_rows = block_q * group
    token = jax.lax.broadcasted_iota(jnp.int32, (num_rows, 1), 0) // group  # rows are token-major
    row_real = token < count
    q_pos = cached + first + token
    # matmuls in the cache's dtype (bf16 on tensor cores), accumulated in float32
    q = (q_ref[...].astype(jnp.float32) * sm_scale).astype(kv_pages_ref.dtype)
    lowest = jnp.maximum(cached + first - sliding_window + 1, 0) if sliding_window else 0

    def attend(k, v, start, limit, carry):
        """Fold the keys k, v [K, D] at positions [start, start + K) into the carry; positions at or past
        `limit` are not keys (stale slots, empty slots) and their values are zeroed."""
        k_pos = start + jax.lax.broadcasted_iota(jnp.int32, (1, k.shape[0]), 1)
        key_real = k_pos < limit
        v = jnp.where(jnp.transpose(key_real), v, 0)  # stale slots may hold NaN
        visible = row_real & key_real
        if causal:
            visible &= k_pos <= q_pos
        if sliding_window:
            visible &= k_pos > q_pos - sliding_window
        return kernel_step(carry, q, k, v, visible, soft_cap)

    block_tokens = pages_per_block * page_size

    def cached_block(i, carry):
        if pages_per_block == 1:
            page = block_table_ref[seq, i]
            k, v = kv_pages_ref[page, :, 2 * head, :], kv_pages_ref[page, :, 2 * head + 1, :]
        else:  # a gather of whole pages by a vector of page numbers (a Triton load)
            pages = block_table_ref[seq, pl.ds(pl.multiple_of(i * pages_per_block, pages_per_block), pages_per_block)]
            k = kv_pages_ref[pages, :, 2 * head, :].reshape(block_tokens, -1)
            v = kv_pages_ref[pages, :, 2 * head + 1, :].reshape(block_tokens, -1)
        return attend(k, v, i * block_tokens, cached, carry)

    first_kv_block = lowest // block_tokens
    last_kv_block = jnp.where(count > 0, pl.cdiv(cached, block_tokens), first_kv_block)
    per_split = pl.cdiv(last_kv_block - first_kv_block, num_splits)
    split_start = first_kv_block + split * per_split
    carry = kernel_init(num_rows, q.shape[1])
    carry = jax.lax.fori_loop(split_start, jnp.minimum(split_start + per_split, last_kv_block), cached_block, carry)

    if causal:

        def new_block(b, carry):
            index = seq_first_block_ref[seq] + b
            k, v = kv_new_ref[index, :, 2 * head, :], kv_new_ref[index, :, 2 * head + 1, :]
            return attend(k, v, cached + b * block_q, cached + first + count, carry)

        first_new = jnp.maximum(lowest - cached, 0) // block_q
        last_new = jnp.where((split == num_splits - 1) & (count > 0), (first + count - 1) // block_q + 1, first_new)
        carry = jax.lax.fori_loop(first_new, last_new, new_block, carry)

    out_ref[...] = kernel_finish(carry, row_real).astype(out_ref.dtype)
    if lse_ref:
        m, l, _ = carry
        lse_ref[0][...] = jnp.where(l > 0, m + jnp.log(jnp.where(l > 0, l, 1.0)), KERNEL_MASKED)

    if causal:

        def write(j, carry):
            position = cached + first + j
            page = block_table_ref[seq, position // page_size]
            kv_out_ref[page, position % page_size, pl.ds(2 * head, 2), :] = kv_new_ref[block, j, pl.ds(2 * head, 2), :]
            return carry

        jax.lax.fori_loop(0, jnp.where(split == 0, count, 0), write, 0)


def _combine_splits(out: jax.Array, lse: jax.Array) -> jax.Array:
    """Merge the splits' normalized outputs [splits, ..., D] by their log-sum-exps [splits, ..., 1]."""
    weights = jnp.exp(lse - lse.max(axis=0))
    return (weights * out).sum(axis=0) / weights.sum(axis=0)


def ragged_paged_attention_pallas(
    q: jax.Array,
    k: jax.Array | None,
    v: jax.Array | None,
    kv_pages: jax.Array,
    kv_lens: jax.Array,
    block_table: jax.Array,
    cu_q_lens: jax.Array,
    num_seqs: jax.Array,
    *,
    sm_scale: float,
    sliding_window: int | None = None,
    soft_cap: float | None = None,
    causal: bool = True,
    block_q: int | None = None,
    num_splits: int | None = None,
    pages_per_block: int | None = None,
    interpret: bool = False,
    platform: str | None = None,
) -> tuple[jax.Array, jax.Array]:
    """`ragged_paged_attention_reference` as one Pallas kernel that also writes the cache (kv_pages is aliased
    to the returned pages: donate it under jit and the update is in place). The tiling defaults to the heuristics
    above: `block_q` query tokens per program, `num_splits` splits of the cached context, `pages_per_block`
    cache pages per online-softmax step. `platform` picks the lowering (`_lowering.lowering_platform`); on TPU
    `ragged_paged_attention_tpu` moves the pages by DMA (one program per block and head in order, so no
    split-K). A read-only call (causal=False) neither takes nor aliases the cache as an output: it returns the
    kv_pages it was given."""
    check_mode(k, v, causal, sliding_window)
    model_head_dim = q.shape[-1]
    q, k, v = padded_to_cache(q, k, v, kv_pages.shape[-1])
    num_tokens, num_q_heads, head_dim = q.shape
    num_pages, page_size, two_hkv, _ = kv_pages.shape
    num_kv_heads, max_seqs = two_hkv // 2, kv_lens.shape[0]
    group = num_q_heads // num_kv_heads
    on_tpu = lowering_platform(platform) == "tpu"
    block_q = block_q or default_block_q(num_tokens, max_seqs, group)
    num_blocks = -(-(num_tokens + max_seqs * (block_q - 1)) // block_q)  # sum of ceil(q_len / block_q), at most
    num_splits = 1 if on_tpu else num_splits or default_num_splits(num_blocks, num_kv_heads)
    num_rows = block_q * group
    pages_per_block = pages_per_block or default_pages_per_block(page_size, platform)
    block_table = jnp.pad(block_table, ((0, 0), (0, -block_table.shape[1] % pages_per_block)))  # whole blocks

    (block_seq, block_first, block_count), (seq_cached, seq_first_block) = _query_blocks(
        kv_lens, cu_q_lens, num_seqs, num_blocks, block_q, causal
    )
    # token slot of every aligned query slot (num_tokens: empty, read as zeros), and aligned slot of every token
    c = jnp.arange(block_q, dtype=jnp.int32)
    source = jnp.where(
        c[None, :] < block_count[:, None], cu_q_lens[block_seq][:, None] + block_first[:, None] + c, num_tokens
    ).reshape(-1)
    seq, _, real = token_layout(kv_lens, cu_q_lens, num_seqs, num_tokens)
    target = seq_first_block[seq] * block_q + jnp.arange(num_tokens, dtype=jnp.int32) - cu_q_lens[seq]

    def aligned(x: jax.Array) -> jax.Array:
        return jnp.take(x, source, axis=0, mode="fill", fill_value=0)

    q_rows = aligned(q).reshape(num_blocks, block_q, num_kv_heads, group, head_dim).swapaxes(1, 2)
    q_rows = q_rows.reshape(num_blocks, num_kv_heads, num_rows, head_dim)
    kv_new = None  # a read-only call has no new K/V
    if causal:
        kv_new = aligned(jnp.stack([k, v], axis=2).reshape(num_tokens, two_hkv, head_dim).astype(kv_pages.dtype))
        if on_tpu:  # per head: [blocks, Hkv, block_q, 2, D], so that a block's rows of one head are a legal tile
            kv_new = kv_new.reshape(num_blocks, block_q, num_kv_heads, 2, head_dim).swapaxes(1, 2)
        else:
            kv_new = kv_new.reshape(num_blocks, block_q, two_hkv, head_dim)
    if on_tpu:
        out, kv_pages = tpu.ragged_attention_tpu(
            block_seq, block_first, block_count, seq_cached, block_table, q_rows, kv_new, kv_pages,
            group=group, pages_per_block=pages_per_block, sm_scale=sm_scale, sliding_window=sliding_window,
            soft_cap=soft_cap, interpret=interpret,
        )  # fmt: skip
        return _unaligned(out, target, real, num_q_heads)[..., :model_head_dim], kv_pages

    rows_spec = pl.BlockSpec((pl.squeezed, pl.squeezed, num_rows, head_dim), lambda i, h, s: (i, h, 0, 0))
    split_spec = pl.BlockSpec((pl.squeezed,) * 3 + (num_rows, head_dim), lambda i, h, s: (s, i, h, 0, 0))
    lse_spec = pl.BlockSpec((pl.squeezed,) * 3 + (num_rows, 1), lambda i, h, s: (s, i, h, 0, 0))
    whole = pl.no_block_spec
    split_shape = (num_splits, num_blocks, num_kv_heads, num_rows)
    if num_splits == 1:
        out_shapes = [jax.ShapeDtypeStruct((num_blocks, num_kv_heads, num_rows, head_dim), q.dtype)]
        out_specs = [rows_spec]
    else:
        out_shapes = [
            jax.ShapeDtypeStruct((*split_shape, head_dim), jnp.float32),
            jax.ShapeDtypeStruct((*split_shape, 1), jnp.float32),
        ]
        out_specs = [split_spec, lse_spec]
    kernel = functools.partial(
        _ragged_kernel,
        group=group,
        block_q=block_q,
        page_size=page_size,
        pages_per_block=pages_per_block,
        num_splits=num_splits,
        sm_scale=sm_scale,
        sliding_window=sliding_window,
        soft_cap=soft_cap,
        causal=causal,
    )
    # a causal call also takes the new K/V and returns the cache written, aliased to its input
    kv_operands = [kv_new, kv_pages] if causal else [kv_pages]
    cache_out = [jax.ShapeDtypeStruct(kv_pages.shape, kv_pages.dtype)] if causal else []
    outs = pl.pallas_call(
        kernel,
        grid=(num_blocks, num_kv_heads, num_splits),
        in_specs=[whole] * 6 + [rows_spec] + [whole] * len(kv_operands),
        out_specs=[*out_specs] + [whole] * len(cache_out),
        out_shape=[*out_shapes, *cache_out],
        input_output_aliases={8: len(out_shapes)} if causal else {},
        interpret=interpret,
        compiler_params=compiler_params(platform),
    )(block_seq, block_first, block_count, seq_cached, seq_first_block, block_table, q_rows, *kv_operands)
    if causal:
        *outs, kv_pages = outs
    out = outs[0] if num_splits == 1 else _combine_splits(*outs).astype(q.dtype)
    return _unaligned(out, target, real, num_q_heads)[..., :model_head_dim], kv_pages


def _unaligned(out: jax.Array, target: jax.Array, real: jax.Array, num_q_heads: int) -> jax.Array:
    """The kernel's [blocks, Hkv, block_q * G, D] rows back in token order [T, Hq, D]; padding tokens zero."""
    num_blocks, num_kv_heads, num_rows, head_dim = out.shape
    block_q = num_rows * num_kv_heads // num_q_heads
    out = out.reshape(num_blocks, num_kv_heads, block_q, num_q_heads // num_kv_heads, head_dim).swapaxes(1, 2)
    out = out.reshape(num_blocks * block_q, num_q_heads, head_dim)
    return jnp.where(real[:, None, None], jnp.take(out, target, axis=0, mode="fill", fill_value=0), 0)
