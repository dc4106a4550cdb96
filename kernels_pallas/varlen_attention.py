"""Variable-length (packed) attention: one call per layer for a flat batch of whole sequences, no KV cache.

Shapes (T token slots holding S segments, G = Hq // Hkv):

    q            [T, Hq, D]      queries, segment after segment
    k, v         [T, Hkv, D]     keys and values of the same tokens
    cu_seqlens   [S + 1] int32   prefix sums of the segment lengths; segment s owns tokens cu_seqlens[s]:cu_seqlens[s+1]
    num_seqs     [1] int32       segments in use; the rest of S (and every token past cu_seqlens[num_seqs]) is padding

Attention is block-diagonal: token t of segment s attends to the tokens of segment s only (query head h to KV
head h // G). With causal=True a token sees the tokens at or before it; with causal=False all of its segment. A
`sliding_window` W keeps keys at distance < W: j in (i - W, i] when causal, |i - j| < W when bidirectional.
`soft_cap` applies soft_cap * tanh(scores / soft_cap) to the scaled scores. Returns out [T, Hq, D] in q's dtype;
padding tokens come out as exact zeros, and nothing in them (NaN, inf, garbage cu_seqlens entries past num_seqs)
reaches a real row.

This file holds the pure-`jnp` reference: the block-sparse walk over packed keys under an online softmax that
ragged paged attention runs over a step's new tokens (`_online_softmax.attend_packed_keys`): blocks of
`_MAX_BLOCK_TOKENS` queries, each against the key blocks of its own segments only, up to the real token count.
Memory is O(block x block) for any segment length.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from ._online_softmax import attend_packed_keys, finish, init_carry

_MAX_BLOCK_TOKENS = 128  # queries and keys per online-softmax step


def segment_layout(cu_seqlens: jax.Array, num_seqs: jax.Array, num_tokens: int):
    """(segment index, position in the segment, is-real, (segment start, segment end)) of every token slot of a
    packed batch.

    Entries of cu_seqlens past num_seqs are read as cu_seqlens[num_seqs], whatever they hold."""
    n = num_seqs[0]
    cu = jnp.where(jnp.arange(cu_seqlens.shape[0]) <= n, cu_seqlens, cu_seqlens[n]).astype(jnp.int32)
    t = jnp.arange(num_tokens, dtype=jnp.int32)
    seq = jnp.searchsorted(cu[1:], t, side="right").astype(jnp.int32)
    seq = jnp.minimum(seq, cu.shape[0] - 2)
    return seq, t - cu[seq], t < cu[n], (cu[seq], cu[seq + 1])


def varlen_attention_reference(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    cu_seqlens: jax.Array,
    num_seqs: jax.Array,
    *,
    sm_scale: float,
    causal: bool,
    sliding_window: int | None = None,
    soft_cap: float | None = None,
) -> jax.Array:
    num_tokens, num_q_heads, head_dim = q.shape
    num_kv_heads = k.shape[1]
    group = num_q_heads // num_kv_heads
    if num_tokens == 0:
        return jnp.zeros_like(q)

    seq, position, real, segment_bounds = segment_layout(cu_seqlens, num_seqs, num_tokens)
    qg = q.astype(jnp.float32).reshape(num_tokens, num_kv_heads, group, head_dim) * sm_scale
    carry = attend_packed_keys(
        init_carry(num_tokens, num_kv_heads, group, head_dim),
        qg,
        k,
        v,
        seq,
        position,
        real,
        segment_bounds,
        jnp.sum(real, dtype=jnp.int32),
        block=min(num_tokens, _MAX_BLOCK_TOKENS),
        causal=causal,
        sliding_window=sliding_window,
        soft_cap=soft_cap,
    )
    return finish(carry).reshape(num_tokens, num_q_heads, head_dim).astype(q.dtype)
