"""The online softmax shared by the attention references, and its walk over packed keys.

Shapes (T token slots, Hkv KV heads, G = Hq // Hkv query heads per KV head, D head dim, K keys in a block):

    qg            [T, Hkv, G, D]  float32 queries, already multiplied by sm_scale
    carry         (m [T, Hkv, G], l [T, Hkv, G], acc [T, Hkv, G, D])   running max, sum of weights, weighted values
    seq, position [T] int32       segment (sequence) of each token slot and its position in that segment
    real          [T] bool        the token slot holds a real token (not padding)

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


def _accumulate(carry, scores, visible, weighted_values):
    """One online-softmax update of (max, sum, acc) with a block of scores [T, Hkv, G, K] visible at [T, K]."""
    m, l, acc = carry
    visible = visible[:, None, None, :]
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
    num_real: jax.Array,
    *,
    key_block: int,
    causal: bool,
    sliding_window: int | None,
    soft_cap: float | None,
):
    """Fold the packed keys k/v [T, Hkv, D] of the same token slots as the queries into `carry`.

    Query slot t sees key slot u when both are real and in the same segment (seq[u] == seq[t]), and
    - causal: position[u] <= position[t], and with a window W, position[t] - position[u] < W;
    - bidirectional: every key of the segment, and with a window W, |position[t] - position[u]| < W.
    Keys are read in blocks of `key_block` slots, and only up to `num_real` (a traced scalar: the real tokens
    are the first num_real slots), so padding costs no blocks. Memory is O(T x key_block)."""
    num_tokens = qg.shape[0]
    num_key_blocks = -(-num_tokens // key_block)
    pad = num_key_blocks * key_block - num_tokens
    keys_all, values_all = (jnp.pad(x.astype(jnp.float32), ((0, pad), (0, 0), (0, 0))) for x in (k, v))
    key_seq, key_pos, key_real = (jnp.pad(x, (0, pad)) for x in (seq, position, real))
    lowest = position - sliding_window + 1 if sliding_window else None

    def block(j, carry):
        block_of = functools.partial(jax.lax.dynamic_slice_in_dim, start_index=j * key_block, slice_size=key_block)
        ks, kp, kr = block_of(key_seq), block_of(key_pos), block_of(key_real)
        visible = (ks[None, :] == seq[:, None]) & kr[None, :] & real[:, None]
        if causal:
            visible &= kp[None, :] <= position[:, None]
        if lowest is not None:
            visible &= kp[None, :] >= lowest[:, None]
            if not causal:
                visible &= kp[None, :] < position[:, None] + sliding_window
        # padded key slots may hold NaN / inf: keep them out of p @ V entirely
        values = jnp.where(kr[:, None, None], block_of(values_all), 0.0)
        scores = soft_capped(jnp.einsum("tngd,knd->tngk", qg, block_of(keys_all)), soft_cap)
        return _accumulate(carry, scores, visible, lambda p: jnp.einsum("tngk,knd->tngd", p, values))

    return jax.lax.fori_loop(0, (num_real + key_block - 1) // key_block, block, carry)


def finish(carry) -> jax.Array:
    """acc / sum, [T, Hkv, G, D] float32; rows that saw no key are exact zeros."""
    _, l, acc = carry
    return jnp.where(l[..., None] > 0, acc / jnp.where(l > 0, l, 1.0)[..., None], 0.0)
