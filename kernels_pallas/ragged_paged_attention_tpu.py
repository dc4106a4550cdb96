"""Ragged paged attention on TPU (Mosaic): the KV pages stay in HBM, a program copies the pages it needs into
VMEM by DMA, double-buffered, and writes the step's new K/V into their pages by DMA.

The wrapper `ragged_paged_attention_pallas` lays the step out in aligned query blocks (each block holds up to
`block_q` new tokens of one sequence, times the G query heads of a KV head, as [block_q * G, D] rows). Program
(block, KV head) first copies its block's new K/V rows into their cache slots and waits for them, then walks the
block's sequence from its first visible position to its last new token, `pages_per_block` pages at a time,
reading the new keys back from the pages like the cached ones. While it attends over one block of pages, the
DMAs of the next are in flight. The grid runs in order on a TensorCore, and a sequence's blocks are consecutive,
so the earlier blocks of the sequence have written their tokens by then.

(Writing in the kernel rather than by an XLA scatter before it matters for head_dim 64: XLA's TPU scatter into
a cache whose minor dimension is 64 relayouts the whole cache, twice, every step.)

Shapes (B aligned query blocks, R = block_q * G rows, S sequence slots, P pages of `page_size` tokens):

    block_seq, block_first, block_count  [B] int32   (SMEM) sequence, first new token, new-token count of a block
    seq_cached   [S] int32                 (SMEM) tokens each sequence had in the cache before the step
    block_table  [S * pages_per_seq] int32 (SMEM) the sequences' pages, row after row; pages_per_seq is a multiple
                                           of pages_per_block
    q_rows       [B, Hkv, R, D]            (VMEM blocks) the queries, token-major rows
    kv_new       [B, Hkv, block_q, 2, D]   (VMEM blocks) the block's new K and V rows, per head
    kv_pages     [P, page_size, 2 * Hkv, D] (HBM) the cache, aliased to the second output

Returns ([B, Hkv, R, D] in q's dtype, the cache with the step's K/V written); rows past a block's count, and
blocks with no tokens, come out as zeros.

Read-only (kv_new None, for a non-causal call): seq_cached holds every key of a sequence, a program writes
nothing and walks [0, seq_cached) with every row seeing every key, and the cache, read in place from HBM, is
not an output (it is returned as given).

Each DMA brings one page's K and V rows of one head ([page_size, 2, D]: rows 2h and 2h + 1 are adjacent in the
cache layout); the K and V tiles are then strided reads of the buffer.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from ._lowering import compiler_params, tpu_vmem_limit
from ._online_softmax import kernel_finish, kernel_init, kernel_step

KV_BLOCK_TOKENS = 256  # cached tokens per online-softmax step: the width of the score tile (v6e's MXU is 256)


def default_pages_per_block(page_size: int) -> int:
    return max(1, KV_BLOCK_TOKENS // page_size)


def _kernel(
    block_seq_ref, block_first_ref, block_count_ref, seq_cached_ref, block_table_ref, q_ref, *refs, group, page_size,
    pages_per_block, pages_per_seq, sm_scale, sliding_window, soft_cap, causal,
):  # fmt: skip
    if causal:  # the cache's input ref is unused: its aliased output ref is read and written
        kv_new_ref, _, out_ref, kv_hbm, kv_buf, sems, write_sem = refs
    else:
        kv_hbm, out_ref, kv_buf, sems = refs
    block, head = pl.program_id(0), pl.program_id(1)
    seq, first, count = block_seq_ref[block], block_first_ref[block], block_count_ref[block]
    cached = seq_cached_ref[seq]
    num_rows, head_dim = q_ref.shape
    block_tokens = pages_per_block * page_size
    end = cached + first + count if causal else cached  # keys are the positions [lowest, end)
    token = jax.lax.broadcasted_iota(jnp.int32, (num_rows, 1), 0) // group  # rows are token-major
    row_real = token < count
    q_pos = cached + first + token
    lowest = jnp.maximum(cached + first - sliding_window + 1, 0) if sliding_window else 0
    q = (q_ref[...].astype(jnp.float32) * sm_scale).astype(kv_buf.dtype)

    if causal:

        def write(j):
            position = cached + first + j
            page = block_table_ref[seq * pages_per_seq + position // page_size]
            destination = kv_hbm.at[pl.ds(page, 1), pl.ds(position % page_size, 1), pl.ds(2 * head, 2), :]
            return pltpu.make_async_copy(kv_new_ref.at[:, pl.ds(j, 1)], destination, write_sem)

        def start_write(j, carry):
            write(j).start()
            return carry

        def wait_write(j, carry):
            write(j).wait()
            return carry

        jax.lax.fori_loop(0, count, start_write, 0)
        jax.lax.fori_loop(0, count, wait_write, 0)

    def copies(kv_block, slot):
        """The DMAs of one block of pages: page j of it into rows [j * page_size, (j + 1) * page_size)."""
        base = seq * pages_per_seq + kv_block * pages_per_block
        return [
            pltpu.make_async_copy(
                kv_hbm.at[block_table_ref[base + j], :, pl.ds(2 * head, 2), :],
                kv_buf.at[slot, pl.ds(j * page_size, page_size)],
                sems.at[slot, j],
            )
            for j in range(pages_per_block)
        ]

    first_kv_block = lowest // block_tokens
    last_kv_block = jnp.where(count > 0, pl.cdiv(end, block_tokens), first_kv_block)

    @pl.when(first_kv_block < last_kv_block)
    def _():
        for copy in copies(first_kv_block, 0):
            copy.start()

    def step(kv_block, carry):
        slot = (kv_block - first_kv_block) % 2

        @pl.when(kv_block + 1 < last_kv_block)
        def _():
            for copy in copies(kv_block + 1, 1 - slot):
                copy.start()

        for copy in copies(kv_block, slot):
            copy.wait()
        start = kv_block * block_tokens
        k = kv_buf[slot, :, 0, :]
        v = kv_buf[slot, :, 1, :]
        key_real = start + jax.lax.broadcasted_iota(jnp.int32, (block_tokens, 1), 0) < end
        v = jnp.where(key_real, v, 0)  # slots past the sequence's end may hold anything, NaN included
        k_pos = start + jax.lax.broadcasted_iota(jnp.int32, (1, block_tokens), 1)
        visible = row_real & (k_pos <= q_pos if causal else k_pos < end)
        if sliding_window:
            visible &= k_pos > q_pos - sliding_window
        return kernel_step(carry, q, k, v, visible, soft_cap)

    carry = jax.lax.fori_loop(first_kv_block, last_kv_block, step, kernel_init(num_rows, head_dim))
    out_ref[...] = kernel_finish(carry, row_real).astype(out_ref.dtype)


def ragged_attention_tpu(
    block_seq: jax.Array,
    block_first: jax.Array,
    block_count: jax.Array,
    seq_cached: jax.Array,
    block_table: jax.Array,
    q_rows: jax.Array,
    kv_new: jax.Array | None,
    kv_pages: jax.Array,
    *,
    group: int,
    pages_per_block: int,
    sm_scale: float,
    sliding_window: int | None,
    soft_cap: float | None,
    interpret: bool = False,
) -> tuple[jax.Array, jax.Array]:
    """Attention of the aligned query blocks over the cache, with their K/V written in (none when kv_new is None:
    read-only); see the module docstring."""
    num_blocks, num_kv_heads, num_rows, head_dim = q_rows.shape
    _, page_size, _, _ = kv_pages.shape
    pages_per_seq = block_table.shape[1]
    writes = kv_new is not None
    rows_spec = pl.BlockSpec((None, None, num_rows, head_dim), lambda i, h, *_: (i, h, 0, 0))
    cache_spec = pl.BlockSpec(memory_space=pl.ANY)
    buffer = (2, pages_per_block * page_size, 2, head_dim)
    # VMEM holds the two page buffers (the pair of K/V rows padded to a sublane tile) and the double-buffered
    # query and output blocks
    sublanes = 32 // kv_pages.dtype.itemsize
    needed = 2 * pages_per_block * page_size * sublanes * max(head_dim, 128) * kv_pages.dtype.itemsize
    needed += 4 * num_rows * max(head_dim, 128) * 4
    kernel = functools.partial(
        _kernel,
        group=group,
        page_size=page_size,
        pages_per_block=pages_per_block,
        pages_per_seq=pages_per_seq,
        sm_scale=sm_scale,
        sliding_window=sliding_window,
        soft_cap=soft_cap,
        causal=writes,
    )
    operands, in_specs = [q_rows], [rows_spec]
    out_shape, out_specs = [jax.ShapeDtypeStruct(q_rows.shape, q_rows.dtype)], [rows_spec]
    scratch = [pltpu.VMEM(buffer, kv_pages.dtype), pltpu.SemaphoreType.DMA((2, pages_per_block))]
    if writes:
        # the new K/V as [B * Hkv, block_q, 2, D], unsqueezed blocks: Mosaic slices a block for a DMA only along
        # its own dims; the cache is aliased to the second output, and the writes have a semaphore of their own
        operands.append(kv_new.reshape(num_blocks * num_kv_heads, *kv_new.shape[2:]))
        in_specs.append(pl.BlockSpec((1, *kv_new.shape[2:]), lambda i, h, *_: (i * num_kv_heads + h, 0, 0, 0)))
        out_shape.append(jax.ShapeDtypeStruct(kv_pages.shape, kv_pages.dtype))
        out_specs.append(cache_spec)
        scratch.append(pltpu.SemaphoreType.DMA)
    outs = pl.pallas_call(
        kernel,
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=5,
            grid=(num_blocks, num_kv_heads),
            in_specs=[*in_specs, cache_spec],
            out_specs=out_specs,
            scratch_shapes=scratch,
        ),
        out_shape=out_shape,
        input_output_aliases={7: 1} if writes else {},  # the cache (after the five scalar operands, q_rows and kv_new)
        interpret=pltpu.InterpretParams() if interpret else False,
        compiler_params=compiler_params("tpu", tpu_vmem_limit(needed)),
    )(block_seq, block_first, block_count, seq_cached, block_table.reshape(-1), *operands, kv_pages)
    return outs[0], outs[1] if writes else kv_pages
