"""Segment pooling on TPU (Mosaic): a feature block of the whole packed batch stays in VMEM while every segment
is pooled from it.

`segment_pool_pallas` calls this on TPU. The grid is (feature block, segment), feature block outer, so the
[Tp, width] slab of hidden states is copied into VMEM once per feature block; `width` is chosen by the caller
to fit VMEM. A program walks its segment's aligned tiles of _TILE rows (a whole bf16 sublane tile), as the GPU
kernel does; cls and last read the tile holding their row and keep that row by a mask, since Mosaic loads rows
only at tile-aligned offsets.

Shapes (Tp token slots, a multiple of _TILE; S segments; H features, a multiple of width):

    cu          [S + 1] int32   (SMEM) segment bounds, entries past num_seqs already clamped
    num_seqs    [1] int32       (SMEM)
    offsets     [S] int32       (SMEM) tokens left out at the start of each segment (mean, max, mean_sqrt_len)
    hidden      [Tp, H]

Returns [S, 1, H] float32, zero for padded and empty segments.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from ._lowering import compiler_params, tpu_vmem_limit

TILE = 16
VMEM_BUDGET = 16 << 20  # bytes of hidden-state slab (double-buffered) a feature block may take


def feature_block(num_tokens: int, hidden_size: int, itemsize: int) -> int:
    """The widest multiple of 128 dividing hidden_size whose double-buffered slab fits VMEM_BUDGET (else the
    whole row, when hidden_size is not a multiple of 128)."""
    if hidden_size % 128:
        return hidden_size
    width = hidden_size
    while width > 128 and (2 * num_tokens * width * itemsize > VMEM_BUDGET or hidden_size % width):
        width -= 128
    return width


def _kernel(cu_ref, num_seqs_ref, offsets_ref, hidden_ref, out_ref, *, mode: str):
    s = pl.program_id(1)
    width = hidden_ref.shape[1]
    start, end = cu_ref[s], cu_ref[s + 1]
    real = (s < num_seqs_ref[0]) & (end > start)

    def tile(block):
        return hidden_ref[pl.ds(pl.multiple_of(block * TILE, TILE), TILE), :].astype(jnp.float32)

    def rows(block):
        return block * TILE + jax.lax.broadcasted_iota(jnp.int32, (TILE, 1), 0)

    if mode in ("cls", "last"):
        row = jnp.maximum(start if mode == "cls" else end - 1, 0)
        pooled = jnp.sum(jnp.where(rows(row // TILE) == row, tile(row // TILE), 0.0), 0, keepdims=True)
        count = end - start
    else:
        first = start + jnp.minimum(offsets_ref[s], end - start)
        count = jnp.where(real, end - first, 0)

        def add_tile(block, acc):
            keep = (rows(block) >= first) & (rows(block) < end)
            if mode == "max":
                return jnp.maximum(acc, jnp.max(jnp.where(keep, tile(block), -jnp.inf), 0, keepdims=True))
            return acc + jnp.sum(jnp.where(keep, tile(block), 0.0), 0, keepdims=True)

        initial = jnp.full((1, width), -jnp.inf if mode == "max" else 0.0, jnp.float32)
        first_block = first // TILE
        last_block = jnp.where(count > 0, pl.cdiv(end, TILE), first_block)
        pooled = jax.lax.fori_loop(first_block, last_block, add_tile, initial)
        safe = jnp.maximum(count, 1).astype(jnp.float32)
        if mode == "mean":
            pooled = pooled / safe
        elif mode == "mean_sqrt_len":
            pooled = pooled / jnp.sqrt(safe)
    out_ref[...] = jnp.where(real & (count > 0), pooled, 0.0)


def segment_pool_tpu(
    cu: jax.Array, num_seqs: jax.Array, offsets: jax.Array, hidden: jax.Array, *, mode: str, interpret: bool = False
) -> jax.Array:
    """See the module docstring."""
    num_tokens, hidden_size = hidden.shape
    num_segments = cu.shape[0] - 1
    width = feature_block(num_tokens, hidden_size, hidden.dtype.itemsize)
    needed = 2 * num_tokens * max(width, 128) * hidden.dtype.itemsize
    return pl.pallas_call(
        functools.partial(_kernel, mode=mode),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=3,
            grid=(hidden_size // width, num_segments),
            in_specs=[pl.BlockSpec((num_tokens, width), lambda h, s, *_: (0, h))],
            out_specs=pl.BlockSpec((None, 1, width), lambda h, s, *_: (s, 0, h)),
        ),
        out_shape=jax.ShapeDtypeStruct((num_segments, 1, hidden_size), jnp.float32),
        interpret=pltpu.InterpretParams() if interpret else False,
        compiler_params=compiler_params("tpu", tpu_vmem_limit(needed)),
    )(cu, num_seqs, offsets, hidden)
