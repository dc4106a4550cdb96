"""The kernels over a device mesh: each call runs per device under `shard_map`, on that device's heads.

Attention is independent per head, so a tensor-parallel step splits it by heads over the mesh's "model" axis
with no communication: queries [T, Hq, D] by query heads, keys, values and the paged cache [P, page_size,
2 * Hkv, D] by KV heads (each device holds its heads' K and V rows). When a model has fewer KV heads than
devices, its keys and values are repeated up to one head per device before the call (the cache is sized so:
`jaxserve.parallel.cache_kv_heads`), so each device's query heads find their KV head locally, as vLLM
replicates KV heads. The per-sequence metadata is whole on every device.

Pooling reads hidden states that are whole on every device after the last row-parallel projection; each device
pools them all (no communication, no gathering).
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, PartitionSpec

HEADS_AXIS = "model"

_WHOLE = PartitionSpec()
_BY_HEAD = PartitionSpec(None, HEADS_AXIS, None)  # [T, H, D]
_PAGES_BY_HEAD = PartitionSpec(None, None, HEADS_AXIS, None)  # [P, page_size, 2 * Hkv, D]


def _per_shard(fn: Callable, mesh: Mesh, in_specs: tuple, out_specs) -> Callable:
    # check_vma off: the kernels (pallas_call) do not declare how their outputs vary over the mesh
    return jax.shard_map(fn, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_vma=False)


def repeat_kv_heads(x: jax.Array | None, num_heads: int) -> jax.Array | None:
    """[T, Hkv, D] with each head repeated up to `num_heads` heads (Hkv divides it); None stays None."""
    if x is None or x.shape[1] == num_heads:
        return x
    return jnp.repeat(x, num_heads // x.shape[1], axis=1)


def sharded_ragged_paged_attention(kernel: Callable, mesh: Mesh) -> Callable:
    """`ragged_paged_attention` by heads over the mesh (same signature)."""

    @functools.wraps(kernel)
    def attention(q, k, v, kv_pages, kv_lens, block_table, cu_q_lens, num_seqs, **static):
        cache_heads = kv_pages.shape[2] // 2
        k, v = repeat_kv_heads(k, cache_heads), repeat_kv_heads(v, cache_heads)

        def shard(q, k, v, kv_pages, kv_lens, block_table, cu_q_lens, num_seqs):
            return kernel(q, k, v, kv_pages, kv_lens, block_table, cu_q_lens, num_seqs, **static)

        in_specs = (_BY_HEAD, _BY_HEAD, _BY_HEAD, _PAGES_BY_HEAD, _WHOLE, _WHOLE, _WHOLE, _WHOLE)
        run = _per_shard(shard, mesh, in_specs, (_BY_HEAD, _PAGES_BY_HEAD))
        return run(q, k, v, kv_pages, kv_lens, block_table, cu_q_lens, num_seqs)

    return attention


def sharded_varlen_attention(kernel: Callable, mesh: Mesh) -> Callable:
    """`varlen_attention` by heads over the mesh; ALiBi slopes [H] split with their heads. A call with a
    `relative_bias` (DeBERTa) runs the kernel as it is, partitioned by XLA (the bias is per bucket, not per head)."""

    @functools.wraps(kernel)
    def attention(q, k, v, cu_seqlens, num_seqs, *, alibi_slopes=None, relative_bias=None, **static):
        if relative_bias is not None:
            return kernel(
                q, k, v, cu_seqlens, num_seqs, relative_bias=relative_bias, alibi_slopes=alibi_slopes, **static
            )
        num_heads = q.shape[1]
        k, v = repeat_kv_heads(k, num_heads), repeat_kv_heads(v, num_heads)

        def shard(q, k, v, cu_seqlens, num_seqs, slopes):
            return kernel(q, k, v, cu_seqlens, num_seqs, alibi_slopes=slopes, **static)

        in_specs = (_BY_HEAD, _BY_HEAD, _BY_HEAD, _WHOLE, _WHOLE, PartitionSpec(HEADS_AXIS))
        return _per_shard(shard, mesh, in_specs, _BY_HEAD)(q, k, v, cu_seqlens, num_seqs, alibi_slopes)

    return attention


def sharded_segment_pool(kernel: Callable, mesh: Mesh) -> Callable:
    """`segment_pool` run whole on every device (its input, the final hidden states, is whole on each)."""

    @functools.wraps(kernel)
    def pool(hidden, cu_seqlens, num_seqs, *, start_offsets=None, dimensions=None, normalize=None, **static):
        def shard(hidden, cu_seqlens, num_seqs, start_offsets, dimensions, normalize):
            return kernel(
                hidden, cu_seqlens, num_seqs, start_offsets=start_offsets, dimensions=dimensions, normalize=normalize,
                **static,
            )  # fmt: skip

        args = (hidden, cu_seqlens, num_seqs, start_offsets, dimensions, normalize)
        return _per_shard(shard, mesh, (_WHOLE,) * len(args), _WHOLE)(*args)

    return pool
