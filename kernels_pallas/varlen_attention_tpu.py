"""Variable-length (packed) attention on TPU (Mosaic): head-major tiles that Mosaic can address.

`varlen_attention_pallas` calls this on TPU with the tokens padded to a multiple of _BLOCK and the heads moved
in front, so every tile is a [_BLOCK, D] slab of one head (a D of 64 is the whole minor dimension, which Mosaic
accepts where a 64-wide slice of [T, H * D] is not lane-aligned). A program (query head, query block) holds its
KV head's whole K and V in VMEM (the block spec keeps them across the G query heads and all query blocks of
that head) and walks only the key blocks of its own segments, from lo to hi, under an online softmax.

Shapes (Tp padded token slots, _BLOCK-aligned; QB = Tp / _BLOCK query blocks):

    lo, hi     [QB] int32        (SMEM) per query block, the token range its keys lie in
    slopes     [Hq] float32      (SMEM) ALiBi slopes, read only with `alibi_slopes` (else zeros)
    seq_col    [Tp, 1] int32     segment of each token, -1 for padding (query side, blocked)
    seq_row    [1, Tp] int32     the same as a row (key side)
    q          [Hq, Tp, D]
    k, v       [Hkv, Tp, D]      v zero at padding tokens (they may hold NaN)

With `alibi_slopes`, a score of query slot i and key slot j (of one segment) gains -slopes[h] * |i - j|.
Returns [Hq, Tp, D] in q's dtype, zero at padding tokens.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from ._lowering import compiler_params, tpu_vmem_limit
from ._online_softmax import alibi_bias, kernel_finish, kernel_init, kernel_step, kernel_visible

BLOCK = 128  # query and key tokens per tile: a lane-aligned slice of the key-side segment row


def _kernel(lo_ref, hi_ref, slopes_ref, seq_col_ref, seq_row_ref, q_ref, k_ref, v_ref, out_ref, *, sm_scale, causal,
            sliding_window, soft_cap, alibi):  # fmt: skip
    block = pl.program_id(1)
    slope = slopes_ref[pl.program_id(0)] if alibi else None
    q = (q_ref[...].astype(jnp.float32) * sm_scale).astype(k_ref.dtype)
    q_seq = seq_col_ref[...]
    q_pos = block * BLOCK + jax.lax.broadcasted_iota(jnp.int32, (BLOCK, 1), 0)
    lo, hi = lo_ref[block], hi_ref[block]

    def step(key_block, carry):
        start = pl.multiple_of(key_block * BLOCK, BLOCK)
        k, v = k_ref[pl.ds(start, BLOCK), :], v_ref[pl.ds(start, BLOCK), :]
        k_seq = seq_row_ref[:, pl.ds(start, BLOCK)]
        k_pos = start + jax.lax.broadcasted_iota(jnp.int32, (1, BLOCK), 1)
        visible = (q_seq == k_seq) & (k_seq >= 0) & kernel_visible(q_pos, k_pos, causal, sliding_window)
        bias = alibi_bias(slope, q_pos, k_pos) if alibi else None
        return kernel_step(carry, q, k, v, visible, soft_cap, bias)

    first, last = lo // BLOCK, jnp.where(hi > lo, pl.cdiv(hi, BLOCK), lo // BLOCK)
    carry = jax.lax.fori_loop(first, last, step, kernel_init(BLOCK, q.shape[1]))
    out_ref[...] = kernel_finish(carry, q_seq >= 0).astype(out_ref.dtype)


def varlen_attention_tpu(
    lo: jax.Array,
    hi: jax.Array,
    seq: jax.Array,
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    sm_scale: float,
    causal: bool,
    sliding_window: int | None,
    soft_cap: float | None,
    alibi_slopes: jax.Array | None = None,
    interpret: bool = False,
) -> jax.Array:
    """See the module docstring; `seq` [Tp] is the segment of each token slot, -1 for padding."""
    num_q_heads, padded, head_dim = q.shape
    alibi = alibi_slopes is not None
    slopes = alibi_slopes.astype(jnp.float32) if alibi else jnp.zeros((num_q_heads,), jnp.float32)
    group = num_q_heads // k.shape[0]
    q_spec = pl.BlockSpec((None, BLOCK, head_dim), lambda h, i, *_: (h, i, 0))
    kv_spec = pl.BlockSpec((None, padded, head_dim), lambda h, i, *_: (h // group, 0, 0))
    lanes = max(head_dim, 128)
    needed = 2 * 2 * padded * lanes * k.dtype.itemsize + 4 * BLOCK * lanes * 4 + 8 * padded * 4
    kernel = functools.partial(
        _kernel, sm_scale=sm_scale, causal=causal, sliding_window=sliding_window, soft_cap=soft_cap, alibi=alibi
    )
    return pl.pallas_call(
        kernel,
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=3,
            grid=(num_q_heads, padded // BLOCK),
            in_specs=[
                pl.BlockSpec((BLOCK, 1), lambda h, i, *_: (i, 0)),
                pl.BlockSpec((1, padded), lambda h, i, *_: (0, 0)),
                q_spec,
                kv_spec,
                kv_spec,
            ],
            out_specs=q_spec,
        ),
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        interpret=pltpu.InterpretParams() if interpret else False,
        compiler_params=compiler_params("tpu", tpu_vmem_limit(needed)),
    )(lo, hi, slopes, seq[:, None], seq[None, :], q, k, v)
