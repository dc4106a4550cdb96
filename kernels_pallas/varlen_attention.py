"""Variable-length (packed) attention: one call per layer for a flat batch of whole sequences, no KV cache.

Shapes (T token slots holding S segments, G = Hq // Hkv):

    q            [T, Hq, D]      queries, segment after segment
    k, v         [T, Hkv, D]     keys and values of the same tokens
    cu_seqlens   [S + 1] int32   prefix sums of the segment lengths; segment s owns tokens cu_seqlens[s]:cu_seqlens[s+1]
    num_seqs     [1] int32       segments in use; the rest of S (and every token past cu_seqlens[num_seqs]) is padding
    alibi_slopes [Hq] float32    optional ALiBi slopes (None: no position bias)
    relative_bias                optional (c2p [T, Hq, B] | None, p2c [T, Hq, B] | None, buckets [2R + 1] int32):
                                 a bucketed relative-position bias from per-token tables (DeBERTa's c2p / p2c)

Attention is block-diagonal: token t of segment s attends to the tokens of segment s only (query head h to KV
head h // G). With causal=True a token sees the tokens at or before it; with causal=False all of its segment. A
`sliding_window` W keeps keys at distance < W: j in (i - W, i] when causal, |i - j| < W when bidirectional.
`soft_cap` applies soft_cap * tanh(scores / soft_cap) to the scaled scores. `alibi_slopes` adds ALiBi's bias
-alibi_slopes[h] * |i - j| to the (scaled, soft-capped) score of query head h at position i for the key at position j
of the same segment, before the softmax (symmetric when bidirectional, as jina-embeddings-v2 uses it; with causal
the keys past i are masked anyway). `relative_bias` then adds c2p[t, h, b] + p2c[u, h, b] to the score of query
token t and key token u of one segment, b = buckets[clip(i - j, -R, R) + R] for their positions i and j
(`_online_softmax`); the Pallas kernels do not take it (a gather along the bucket axis does not lower to Triton),
so `Kernels` sends such calls to the reference on every backend. Returns out [T, Hq, D] in q's dtype;
padding tokens come out as exact zeros, and nothing in them (NaN, inf, garbage cu_seqlens entries past num_seqs)
reaches a real row.

This file holds the pure-`jnp` reference: the block-sparse walk over packed keys under an online softmax that
ragged paged attention runs over a step's new tokens (`_online_softmax.attend_packed_keys`): blocks of
`_MAX_BLOCK_TOKENS` queries, each against the key blocks of its own segments only, up to the real token count.
Memory is O(block x block) for any segment length.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from . import varlen_attention_tpu as tpu
from ._lowering import compiler_params, lowering_platform
from ._online_softmax import (
    alibi_bias,
    attend_packed_keys,
    finish,
    init_carry,
    kernel_finish,
    kernel_init,
    kernel_step,
    kernel_visible,
)

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
    alibi_slopes: jax.Array | None = None,
    relative_bias: tuple[jax.Array | None, jax.Array | None, jax.Array] | None = None,
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
        alibi_slopes=alibi_slopes,
        relative_bias=relative_bias,
    )
    return finish(carry).reshape(num_tokens, num_q_heads, head_dim).astype(q.dtype)


# --- Pallas -------------------------------------------------------------------------------------------------------

_BLOCK_Q = 32  # query tokens per program
_BLOCK_K = 32  # key tokens per online-softmax step


def _key_ranges(seq, real, bounds, num_tokens: int, causal: bool, block: int = _BLOCK_Q) -> tuple[jax.Array, jax.Array]:
    """Per query block (of `block` tokens), the token range its keys lie in: from its first segment's start to its last segment's
    end (to its last token, when causal). Blocks of padding get an empty range."""
    starts, ends = bounds
    t = jnp.arange(num_tokens, dtype=jnp.int32)
    lo = jnp.where(real, starts, num_tokens).reshape(-1, block).min(axis=1)
    hi = jnp.where(real, t + 1 if causal else ends, 0).reshape(-1, block).max(axis=1)
    return lo.astype(jnp.int32), hi.astype(jnp.int32)


def _varlen_kernel(
    lo_ref, hi_ref, seq_ref, real_ref, slopes_ref, q_ref, k_ref, v_ref, out_ref, *, head_dim, group, sm_scale, causal,
    sliding_window, soft_cap, alibi,
):  # fmt: skip
    """One (query block, query head): an online softmax over the key blocks of the block's own segments. With
    `alibi`, the head's slope (`slopes_ref` [Hq]) biases the scores by distance."""
    block, head = pl.program_id(0), pl.program_id(1)
    rows = pl.ds(pl.multiple_of(block * _BLOCK_Q, _BLOCK_Q), _BLOCK_Q)
    q_cols = pl.ds(pl.multiple_of(head * head_dim, head_dim), head_dim)
    kv_cols = pl.ds(pl.multiple_of((head // group) * head_dim, head_dim), head_dim)
    q = q_ref[rows, q_cols].astype(jnp.float32) * sm_scale
    q_seq = seq_ref[rows][:, None]
    q_pos = block * _BLOCK_Q + jax.lax.broadcasted_iota(jnp.int32, (_BLOCK_Q, 1), 0)
    lo, hi = lo_ref[block], hi_ref[block]
    slope = slopes_ref[head] if alibi else None

    def step(key_block, carry):
        keys = pl.ds(pl.multiple_of(key_block * _BLOCK_K, _BLOCK_K), _BLOCK_K)
        key_real = real_ref[keys] != 0
        k = k_ref[keys, kv_cols].astype(jnp.float32)
        v = jnp.where(key_real[:, None], v_ref[keys, kv_cols].astype(jnp.float32), 0.0)  # padding may hold NaN
        k_pos = key_block * _BLOCK_K + jax.lax.broadcasted_iota(jnp.int32, (1, _BLOCK_K), 1)
        visible = (q_seq == seq_ref[keys][None, :]) & key_real[None, :]
        visible &= kernel_visible(q_pos, k_pos, causal, sliding_window)
        bias = alibi_bias(slope, q_pos, k_pos) if alibi else None  # token slots of one segment: their distance
        return kernel_step(carry, q, k, v, visible, soft_cap, bias)

    first, last = lo // _BLOCK_K, jnp.where(hi > lo, pl.cdiv(hi, _BLOCK_K), lo // _BLOCK_K)
    carry = jax.lax.fori_loop(first, last, step, kernel_init(_BLOCK_Q, head_dim))
    out_ref[rows, q_cols] = kernel_finish(carry, real_ref[rows][:, None] != 0).astype(out_ref.dtype)


def varlen_attention_pallas(
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
    alibi_slopes: jax.Array | None = None,
    relative_bias: None = None,
    interpret: bool = False,
    platform: str | None = None,
) -> jax.Array:
    """`varlen_attention_reference` as one Pallas kernel: a grid of (query block, query head), each walking
    only the key blocks of its own segments (block-diagonal tiles outside them are never read). `platform` picks
    the lowering (`_lowering.lowering_platform`); TPU runs `varlen_attention_tpu`. A `relative_bias` is refused:
    `Kernels.varlen_attention` routes it to the reference."""
    if relative_bias is not None:
        raise NotImplementedError("varlen_attention_pallas takes no relative_bias; call varlen_attention_reference.")
    num_tokens, num_q_heads, head_dim = q.shape
    num_kv_heads = k.shape[1]
    if num_tokens == 0:
        return jnp.zeros_like(q)
    alibi = alibi_slopes is not None
    slopes = alibi_slopes.astype(jnp.float32) if alibi else jnp.zeros((num_q_heads,), jnp.float32)
    if lowering_platform(platform) == "tpu":
        return _varlen_tpu(
            q, k, v, cu_seqlens, num_seqs, slopes, sm_scale, causal, sliding_window, soft_cap, alibi, interpret
        )
    padded = pl.cdiv(num_tokens, max(_BLOCK_Q, _BLOCK_K)) * max(_BLOCK_Q, _BLOCK_K)
    seq, _, real, bounds = segment_layout(cu_seqlens, num_seqs, padded)
    lo, hi = _key_ranges(seq, real, bounds, padded, causal)

    def flat(x: jax.Array) -> jax.Array:  # [T, H, D] -> [T_padded, H * D]: 2-D tiles for every backend
        x = x.reshape(num_tokens, -1)
        return jnp.pad(x, ((0, padded - num_tokens), (0, 0))) if padded != num_tokens else x

    whole = pl.no_block_spec
    kernel = functools.partial(
        _varlen_kernel,
        head_dim=head_dim,
        group=num_q_heads // num_kv_heads,
        sm_scale=sm_scale,
        causal=causal,
        sliding_window=sliding_window,
        soft_cap=soft_cap,
        alibi=alibi,
    )
    out = pl.pallas_call(
        kernel,
        grid=(padded // _BLOCK_Q, num_q_heads),
        in_specs=[whole] * 8,
        out_specs=whole,
        out_shape=jax.ShapeDtypeStruct((padded, num_q_heads * head_dim), q.dtype),
        interpret=interpret,
        compiler_params=compiler_params(platform),
    )(lo, hi, seq, real.astype(jnp.int32), slopes, flat(q), flat(k), flat(v))
    return out[:num_tokens].reshape(num_tokens, num_q_heads, head_dim)


def _varlen_tpu(
    q, k, v, cu_seqlens, num_seqs, slopes, sm_scale, causal, sliding_window, soft_cap, alibi, interpret
) -> jax.Array:
    """The TPU kernel's layout: tokens padded to its block, heads in front, v zeroed at padding."""
    num_tokens = q.shape[0]
    padded = pl.cdiv(num_tokens, tpu.BLOCK) * tpu.BLOCK
    seq, _, real, bounds = segment_layout(cu_seqlens, num_seqs, padded)
    lo, hi = _key_ranges(seq, real, bounds, padded, causal, tpu.BLOCK)
    v = jnp.where(real[:num_tokens, None, None], v, 0)

    def head_major(x: jax.Array) -> jax.Array:
        return jnp.pad(x, ((0, padded - num_tokens), (0, 0), (0, 0))).swapaxes(0, 1)

    out = tpu.varlen_attention_tpu(
        lo, hi, jnp.where(real, seq, -1), head_major(q), head_major(k), head_major(v),
        sm_scale=sm_scale, causal=causal, sliding_window=sliding_window, soft_cap=soft_cap,
        alibi_slopes=slopes if alibi else None, interpret=interpret,
    )  # fmt: skip
    return out.swapaxes(0, 1)[:num_tokens]
