"""The online softmax shared by the attention references, and its walk over packed keys.

Shapes (T token slots, Hkv KV heads, G = Hq // Hkv query heads per KV head, D head dim, K keys in a block):

    qg            [T, Hkv, G, D]  float32 queries, already multiplied by sm_scale
    carry         (m [T, Hkv, G], l [T, Hkv, G], acc [T, Hkv, G, D])   running max, sum of weights, weighted values
    seq, position [T] int32       segment (sequence) of each token slot and its position in that segment
    real          [T] bool        the token slot holds a real token (not padding)

With ALiBi, `alibi_slopes` [Hq] float32 (query head h = n * G + g) adds -slope_h * |i - j| to the scaled
(and soft-capped) score of query position i and key position j of one segment, before the softmax.

A relative-position bias from per-token tables (DeBERTa's disentangled attention), `relative_bias` =
(c2p [T, Hq, B] | None, p2c [T, Hq, B] | None, buckets [2R + 1] int32), adds

    c2p[t, h, b] + p2c[u, h, b],   b = buckets[clip(position[t] - position[u], -R, R) + R]

to the score of query slot t and key slot u of one segment (after ALiBi): the tables hold each token's scores
against the B bucket embeddings, already scaled, and `buckets` maps a relative distance to its bucket (distances
beyond +-R take the bucket of +-R, so the table must be flat there). Gathered per (query block, key block)
tile, it costs O(block x block) memory like the rest of the walk.

A masked-out score never reaches the max, the sum or p @ V, whatever it holds (NaN, inf), and masked-out values
are zeroed before p @ V, so padding and stale cache slots cannot leak into real rows. Rows that saw no key at all
(padding) come out of `finish` as exact zeros.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp


def init_carry(num_tokens: int, num_kv_heads: int, group: int, head_dim: int):
    """(max, sum, acc) before any key: -inf, 0, 0."""
    return (
        jnp.full((num_tokens, num_kv_heads, group), -jnp.inf, jnp.float32),
        jnp.zeros((num_tokens, num_kv_heads, group), jnp.float32),
        jnp.zeros((num_tokens, num_kv_heads, group, head_dim), jnp.float32),
    )


def soft_capped(scores: jax.Array, soft_cap: float | None) -> jax.Array:
    """Gemma-style logit soft cap: soft_cap * tanh(scores / soft_cap); no-op when unset (None or 0)."""
    return soft_cap * jnp.tanh(scores / soft_cap) if soft_cap else scores


def alibi_bias(slopes: jax.Array, q_pos: jax.Array, k_pos: jax.Array) -> jax.Array:
    """ALiBi's additive score bias -slope * |q_pos - k_pos| (float32), broadcast as the operands are."""
    return -slopes * jnp.abs((q_pos - k_pos).astype(jnp.float32))


def relative_position_bias(c2p, p2c, buckets, q_pos, k_pos):
    """The `relative_bias` scores of a tile: c2p [..., Q, B] (the queries' rows) and p2c [..., K, B] (the keys'),
    either None; q_pos [Q], k_pos [K] the tokens' positions in their segments. Returns [..., Q, K] float32 (or
    0.0 when both tables are None)."""
    reach = (buckets.shape[0] - 1) // 2
    index = buckets[jnp.clip(q_pos[:, None] - k_pos[None, :], -reach, reach) + reach]  # [Q, K]
    bias = 0.0
    if c2p is not None:
        bias += jnp.take_along_axis(c2p.astype(jnp.float32), index[(None,) * (c2p.ndim - 2)], axis=-1)
    if p2c is not None:  # the keys' rows, at the same bucket: gathered [..., K, Q], then transposed
        gathered = jnp.take_along_axis(p2c.astype(jnp.float32), index.T[(None,) * (p2c.ndim - 2)], axis=-1)
        bias += jnp.swapaxes(gathered, -1, -2)
    return bias


def _accumulate(carry, scores, visible, weighted_values):
    """One online-softmax update of (max, sum, acc) with a block of scores [..., K] (the carry's layout plus the
    keys), `visible` broadcastable to the scores."""
    m, l, acc = carry
    m_new = jnp.maximum(m, jnp.max(jnp.where(visible, scores, -jnp.inf), axis=-1))
    m_safe = jnp.where(jnp.isfinite(m_new), m_new, 0.0)
    p = jnp.where(visible, jnp.exp(scores - m_safe[..., None]), 0.0)
    correction = jnp.exp(jnp.where(jnp.isfinite(m), m - m_safe, -jnp.inf))
    return m_new, l * correction + jnp.sum(p, axis=-1), acc * correction[..., None] + weighted_values(p)


def attend_packed_keys(
    carry,
    qg: jax.Array,
    k: jax.Array,
    v: jax.Array,
    seq: jax.Array,
    position: jax.Array,
    real: jax.Array,
    segment_bounds: tuple[jax.Array, jax.Array],
    num_real: jax.Array,
    *,
    block: int,
    causal: bool,
    sliding_window: int | None,
    soft_cap: float | None,
    alibi_slopes: jax.Array | None = None,
    relative_bias: tuple[jax.Array | None, jax.Array | None, jax.Array] | None = None,
):
    """Fold the packed keys k/v [T, Hkv, D] of the same token slots as the queries into `carry`.

    Query slot t sees key slot u when both are real and in the same segment (seq[u] == seq[t]), and
    - causal: position[u] <= position[t], and with a window W, position[t] - position[u] < W;
    - bidirectional: every key of the segment, and with a window W, |position[t] - position[u]| < W.
    `segment_bounds` = (first slot of t's segment, one past its last slot), [T] each. `alibi_slopes` [Hq]
    adds ALiBi's -slope * |position[t] - position[u]| to the scores, `relative_bias` the bucketed per-token
    tables' scores (see the module docstring).

    The walk is block-sparse: queries go in blocks of `block` slots, and each query block reads only the key
    blocks that overlap its own segments, so the cost is that of the segments' attention, not of the whole
    T x T square. Only the first `num_real` slots (a traced scalar) are real, so padding costs no blocks.
    Memory is O(block x block). (Taking key block r of every query block at once, in one batched matmul, is
    2x slower on CPU: the small blocks stay in cache.)"""
    num_tokens = qg.shape[0]
    pad = -num_tokens % block
    padded = functools.partial(jax.tree.map, lambda x: jnp.pad(x, [(0, pad)] + [(0, 0)] * (x.ndim - 1)))
    carry, qg, keys_all, values_all = padded((carry, qg, k.astype(jnp.float32), v.astype(jnp.float32)))
    seq, position, real, (segment_start, segment_end) = padded((seq, position, real, segment_bounds))
    # head-major inside the walk, queries [Hkv, G, T, D] and keys [Hkv, T, D], so that every block product is a
    # plain batched matmul over the KV heads (on CPU, 2x faster than token-major operands)
    carry, qg = jax.tree.map(lambda x: jnp.moveaxis(x, 0, 2), (carry, qg))
    keys_all, values_all = (jnp.moveaxis(x, 0, 1) for x in (keys_all, values_all))
    if alibi_slopes is not None:  # [Hkv, G, 1, 1], against scores [Hkv, G, queries, keys]
        alibi_slopes = alibi_slopes.astype(jnp.float32).reshape(qg.shape[0], qg.shape[1], 1, 1)
    c2p = p2c = buckets = None
    if relative_bias is not None:  # the tables head-major as the queries: [Hkv, G, T, B]
        c2p, p2c, buckets = relative_bias

        def head_major(table):
            table = padded(table.reshape(num_tokens, *qg.shape[:2], table.shape[-1]))
            return jnp.moveaxis(table, 0, 2)

        c2p, p2c = (None if t is None else head_major(t) for t in (c2p, p2c))

    def query_block(i, carry):
        rows = functools.partial(jax.lax.dynamic_slice_in_dim, start_index=i * block, slice_size=block)
        q_seq, q_pos, q_real, q_block = rows(seq), rows(position), rows(real), rows(qg, axis=2)
        q_c2p = None if c2p is None else rows(c2p, axis=2)
        last = jnp.minimum((i + 1) * block, num_real) - 1  # the block's last real query slot
        first_key = segment_start[i * block]
        stop_key = last + 1 if causal else segment_end[last]

        def key_block(j, block_carry):
            keys = functools.partial(jax.lax.dynamic_slice_in_dim, start_index=j * block, slice_size=block)
            key_seq, key_pos, key_real = keys(seq), keys(position), keys(real)
            visible = (key_seq[None, :] == q_seq[:, None]) & key_real[None, :] & q_real[:, None]
            if causal:
                visible &= key_pos[None, :] <= q_pos[:, None]
            if sliding_window:
                visible &= key_pos[None, :] > q_pos[:, None] - sliding_window
                if not causal:
                    visible &= key_pos[None, :] < q_pos[:, None] + sliding_window
            # padded key slots may hold NaN / inf: keep them out of p @ V entirely
            values = jnp.where(key_real[None, :, None], keys(values_all, axis=1), 0.0)
            scores = soft_capped(jnp.einsum("ngtd,nkd->ngtk", q_block, keys(keys_all, axis=1)), soft_cap)
            if alibi_slopes is not None:
                scores += alibi_bias(alibi_slopes, q_pos[:, None], key_pos[None, :])
            if relative_bias is not None:
                key_p2c = None if p2c is None else keys(p2c, axis=2)
                scores += relative_position_bias(q_c2p, key_p2c, buckets, q_pos, key_pos)
            return _accumulate(block_carry, scores, visible, lambda p: jnp.einsum("ngtk,nkd->ngtd", p, values))

        block_rows = jax.tree.map(lambda x: rows(x, axis=2), carry)
        block_carry = jax.lax.fori_loop(first_key // block, (stop_key + block - 1) // block, key_block, block_rows)
        return jax.tree.map(
            lambda full, part: jax.lax.dynamic_update_slice_in_dim(full, part, i * block, axis=2), carry, block_carry
        )

    carry = jax.lax.fori_loop(0, (num_real + block - 1) // block, query_block, carry)
    return jax.tree.map(lambda x: jnp.moveaxis(x, 2, 0)[:num_tokens], carry)


def finish(carry) -> jax.Array:
    """acc / sum, [T, Hkv, G, D] float32; rows that saw no key are exact zeros."""
    _, l, acc = carry
    return jnp.where(l[..., None] > 0, acc / jnp.where(l > 0, l, 1.0)[..., None], 0.0)


# --- inside a Pallas kernel -----------------------------------------------------------------------------------
#
# The kernels keep one query tile's state as (m [R, 1], l [R, 1], acc [R, D]) float32 values and fold key tiles in
# with 2-D matmuls, which every lowering (Triton, Mosaic, the interpreters) takes.

KERNEL_MASKED = -1e30  # finite, so a row that has seen no key yet never computes inf - inf


def kernel_init(num_rows: int, head_dim: int):
    """(m, l, acc) of a query tile before any key."""
    return (
        jnp.full((num_rows, 1), KERNEL_MASKED, jnp.float32),
        jnp.zeros((num_rows, 1), jnp.float32),
        jnp.zeros((num_rows, head_dim), jnp.float32),
    )


def kernel_visible(q_pos: jax.Array, k_pos: jax.Array, causal: bool, sliding_window: int | None) -> jax.Array:
    """Which keys [1, K] each query [R, 1] sees by position: causal (at or before it) or all, within a window
    W of distance < W when one is set (j in (i - W, i] causal, |i - j| < W bidirectional)."""
    visible = k_pos <= q_pos if causal else jnp.ones((q_pos.shape[0], k_pos.shape[1]), jnp.bool_)
    if sliding_window is not None:
        distance = q_pos - k_pos if causal else jnp.abs(q_pos - k_pos)
        visible &= distance < sliding_window
    return visible


def kernel_step(
    carry,
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    visible: jax.Array,
    soft_cap: float | None,
    bias: jax.Array | None = None,
):
    """Fold keys k, v [K, D] into the carry of queries q [R, D] (already scaled), where `visible` [R, K] allows;
    `bias` [R, K] float32 (ALiBi's, `alibi_bias`) is added to the (soft-capped) scores. The matmuls run in the
    operands' dtype (bf16 on tensor cores and the MXU), accumulated in float32; v must be zero wherever no row may
    see it (stale or padded slots may hold NaN)."""
    m, l, acc = carry
    scores = jax.lax.dot_general(q, k, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
    if soft_cap:
        scores = soft_cap * jnp.tanh(scores / soft_cap)
    if bias is not None:
        scores = scores + bias
    scores = jnp.where(visible, scores, KERNEL_MASKED)
    m_new = jnp.maximum(m, scores.max(axis=1, keepdims=True))
    p = jnp.where(visible, jnp.exp(scores - m_new), 0.0)
    rescale = jnp.exp(m - m_new)
    weighted = jnp.dot(p.astype(v.dtype), v, preferred_element_type=jnp.float32)
    return m_new, l * rescale + p.sum(axis=1, keepdims=True), acc * rescale + weighted


def kernel_finish(carry, real: jax.Array) -> jax.Array:
    """acc / l for the `real` rows [R, 1] that saw a key; zeros elsewhere."""
    _, l, acc = carry
    return jnp.where(real & (l > 0), acc / jnp.where(l > 0, l, 1.0), 0.0)
