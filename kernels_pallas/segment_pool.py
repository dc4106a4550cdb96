"""Segment pooling: one embedding per sequence of a packed batch (sentence-transformers / vLLM pooling).

Shapes (T token slots holding S segments, H features):

    hidden        [T, H]          token states, segment after segment (any float dtype)
    cu_seqlens    [S + 1] int32   prefix sums of the segment lengths; segment s owns hidden[cu_seqlens[s]:cu_seqlens[s+1]]
    num_seqs      [1] int32       segments in use; the rest of S (and every token past cu_seqlens[num_seqs]) is padding
    start_offsets [S] int32       optional: tokens at the start of each segment left out of the pool (the prompt,
                                  for include_prompt=False); None: 0 everywhere
    dimensions    [S] int32       optional: features kept (Matryoshka); the rest are zeroed; None: all of them
    normalize     [S] bool        optional: L2-normalize the pooled row (after `dimensions`); None: no segment

Modes:
    "cls"            the segment's first token (start_offsets do not move it)
    "last"           the segment's last token (start_offsets do not move it)
    "mean"           mean over the pooled tokens (the segment's tokens from start_offsets[s] on)
    "max"            elementwise max over the pooled tokens
    "mean_sqrt_len"  sum over the pooled tokens / sqrt(their count)

Returns [S, H] float32, computed in float32 whatever hidden's dtype. Padded segments (s >= num_seqs), empty
segments, and mean / max / mean_sqrt_len with no pooled token left come out as zeros. Padding rows of hidden
(NaN included) never reach a real segment. Normalization divides by max(||x||, 1e-12) like
torch.nn.functional.normalize.

One pass over T: every token gets a segment id (padding and left-out tokens an out-of-range one, which
`jax.ops.segment_sum` / `segment_max` drop), then one segment reduction; cls / last are one gather of S rows.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from ._lowering import compiler_params, lowering_platform, tpu_vmem_limit

POOLING_MODES = ("cls", "last", "mean", "max", "mean_sqrt_len")
_NORMALIZE_EPS = 1e-12


def segment_pool_reference(
    hidden: jax.Array,
    cu_seqlens: jax.Array,
    num_seqs: jax.Array,
    *,
    mode: str,
    start_offsets: jax.Array | None = None,
    dimensions: jax.Array | None = None,
    normalize: jax.Array | None = None,
) -> jax.Array:
    if mode not in POOLING_MODES:
        raise ValueError(f"unknown pooling mode {mode!r}; expected one of {POOLING_MODES}")
    num_tokens, hidden_size = hidden.shape
    num_segments = cu_seqlens.shape[0] - 1
    n = num_seqs[0]
    index = jnp.arange(num_segments + 1)
    cu = jnp.where(index <= n, cu_seqlens, cu_seqlens[n]).astype(jnp.int32)  # garbage past num_seqs: ignored
    starts, ends = cu[:-1], cu[1:]
    lengths = ends - starts
    valid = (index[:-1] < n) & (lengths > 0)
    x = hidden.astype(jnp.float32)

    if mode in ("cls", "last"):
        row = jnp.clip(starts if mode == "cls" else ends - 1, 0, max(num_tokens - 1, 0))
        pooled = jnp.where(valid[:, None], x[row], 0.0) if num_tokens else jnp.zeros((num_segments, hidden_size))
    else:
        offsets = jnp.zeros_like(starts) if start_offsets is None else jnp.clip(start_offsets.astype(jnp.int32), 0)
        first = starts + jnp.minimum(offsets, lengths)
        counts = ends - first
        t = jnp.arange(num_tokens, dtype=jnp.int32)
        seq = jnp.minimum(jnp.searchsorted(ends, t, side="right").astype(jnp.int32), num_segments - 1)
        pooled_token = (t < cu[n]) & (t >= first[seq])
        ids = jnp.where(pooled_token, seq, num_segments)  # out of range: dropped by the segment reductions
        if mode == "max":
            reduced = jax.ops.segment_max(jnp.where(pooled_token[:, None], x, -jnp.inf), ids, num_segments)
        else:
            reduced = jax.ops.segment_sum(jnp.where(pooled_token[:, None], x, 0.0), ids, num_segments)
            safe = jnp.maximum(counts, 1).astype(jnp.float32)
            reduced = reduced / (safe if mode == "mean" else jnp.sqrt(safe))[:, None]
        pooled = jnp.where((valid & (counts > 0))[:, None], reduced, 0.0)

    return truncate_and_normalize(pooled, dimensions, normalize)


def truncate_and_normalize(
    rows: jax.Array, dimensions: jax.Array | None = None, normalize: jax.Array | None = None
) -> jax.Array:
    """Keep the first dimensions[s] features of row s (zero the rest), then L2-normalize the rows flagged in
    `normalize`; None leaves that step out. Also for rows pooled elsewhere (after a Dense layer)."""
    rows = rows.astype(jnp.float32)
    if dimensions is not None:
        rows = jnp.where(jnp.arange(rows.shape[-1])[None, :] < dimensions[:, None], rows, 0.0)
    if normalize is not None:
        norm = jnp.sqrt(jnp.sum(rows * rows, axis=-1, keepdims=True))
        rows = jnp.where(normalize[:, None], rows / jnp.maximum(norm, _NORMALIZE_EPS), rows)
    return rows


# --- Pallas -------------------------------------------------------------------------------------------------------
#
# One kernel, two launches. A program pools one segment over one feature block by walking the segment's aligned
# tiles of _BLOCK_TOKENS rows (a whole bf16 sublane tile on TPU); cls and last read the tile holding their row and
# keep the row by a mask, since Mosaic loads rows only at tile-aligned offsets.
# - GPU (Triton): a grid of (segment, feature block) over the whole hidden states in global memory; the program
#   slices its feature block out of each tile.
# - TPU (Mosaic): a grid of (feature block, segment), feature block outer, over [Tp, width] blocks of the hidden
#   states, so that each slab is copied into VMEM once for all segments; the scalars are in SMEM. `width` is
#   chosen to fit _TPU_VMEM_BUDGET.

_BLOCK_TOKENS = 16  # token rows per tile of the walk over a segment
_MAX_BLOCK_FEATURES = 512
_TPU_VMEM_BUDGET = 16 << 20  # bytes of hidden-state slab (double-buffered) a TPU feature block may take


def _feature_block(hidden_size: int) -> int:
    """GPU: the widest power of two dividing hidden_size, at most _MAX_BLOCK_FEATURES (Triton blocks are powers
    of 2)."""
    return min(hidden_size & -hidden_size, _MAX_BLOCK_FEATURES)


def _tpu_feature_block(num_tokens: int, hidden_size: int, itemsize: int) -> int:
    """TPU: the widest multiple of 128 dividing hidden_size whose double-buffered slab fits _TPU_VMEM_BUDGET (the
    whole row when hidden_size is not a multiple of 128)."""
    if hidden_size % 128:
        return hidden_size
    width = hidden_size
    while width > 128 and (2 * num_tokens * width * itemsize > _TPU_VMEM_BUDGET or hidden_size % width):
        width -= 128
    return width


def _pool_kernel(cu_ref, num_seqs_ref, offsets_ref, hidden_ref, out_ref, *, mode: str, segment_axis: int):
    """One (segment, feature block): walks the segment's token tiles once, accumulating in float32."""
    s, h = pl.program_id(segment_axis), pl.program_id(1 - segment_axis)
    width = out_ref.shape[-1]
    whole_rows = hidden_ref.shape[1] == width  # the TPU block: already this feature block
    lanes = slice(None) if whole_rows else pl.ds(pl.multiple_of(h * width, width), width)
    start, end = cu_ref[s], cu_ref[s + 1]
    real = (s < num_seqs_ref[0]) & (end > start)

    def tile(block):
        rows = pl.ds(pl.multiple_of(block * _BLOCK_TOKENS, _BLOCK_TOKENS), _BLOCK_TOKENS)
        return hidden_ref[rows, lanes].astype(jnp.float32)

    def rows(block):
        return block * _BLOCK_TOKENS + jax.lax.broadcasted_iota(jnp.int32, (_BLOCK_TOKENS, 1), 0)

    if mode in ("cls", "last"):
        row = jnp.clip(start if mode == "cls" else end - 1, 0, hidden_ref.shape[0] - 1)  # padded segments too
        block = row // _BLOCK_TOKENS
        pooled = jnp.sum(jnp.where(rows(block) == row, tile(block), 0.0), 0, keepdims=True)
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
        first_block = first // _BLOCK_TOKENS
        last_block = jnp.where(count > 0, pl.cdiv(end, _BLOCK_TOKENS), first_block)
        pooled = jax.lax.fori_loop(first_block, last_block, add_tile, initial)
        safe = jnp.maximum(count, 1).astype(jnp.float32)
        if mode == "mean":
            pooled = pooled / safe
        elif mode == "mean_sqrt_len":
            pooled = pooled / jnp.sqrt(safe)
    out_ref[...] = jnp.where(real & (count > 0), pooled, 0.0)


def segment_pool_pallas(
    hidden: jax.Array,
    cu_seqlens: jax.Array,
    num_seqs: jax.Array,
    *,
    mode: str,
    start_offsets: jax.Array | None = None,
    dimensions: jax.Array | None = None,
    normalize: jax.Array | None = None,
    interpret: bool = False,
    platform: str | None = None,
) -> jax.Array:
    """`segment_pool_reference` as one Pallas kernel: a program per (segment, feature block), each walking its
    segment's aligned token tiles once. Truncation and normalization of the [S, H] result follow in the same
    jitted program. `platform` picks the lowering and the launch (`_lowering.lowering_platform`)."""
    if mode not in POOLING_MODES:
        raise ValueError(f"unknown pooling mode {mode!r}; expected one of {POOLING_MODES}")
    num_tokens, hidden_size = hidden.shape
    num_segments = cu_seqlens.shape[0] - 1
    n = num_seqs[0]
    cu = jnp.where(jnp.arange(num_segments + 1) <= n, cu_seqlens, cu_seqlens[n]).astype(jnp.int32)
    offsets = jnp.zeros((num_segments,), jnp.int32) if start_offsets is None else start_offsets.astype(jnp.int32)
    padded_tokens = pl.cdiv(max(num_tokens, 1), _BLOCK_TOKENS) * _BLOCK_TOKENS
    if padded_tokens != num_tokens:
        hidden = jnp.pad(hidden, ((0, padded_tokens - num_tokens), (0, 0)))
    operands = (cu, num_seqs.astype(jnp.int32), jnp.maximum(offsets, 0), hidden)
    # [S, 1, H] rather than [S, H], so that a block's last two dims are (1, width): whole in the middle one, as
    # Mosaic requires of a block shorter than 8 rows
    out_shape = jax.ShapeDtypeStruct((num_segments, 1, hidden_size), jnp.float32)
    if lowering_platform(platform) == "tpu":
        width = _tpu_feature_block(padded_tokens, hidden_size, hidden.dtype.itemsize)
        needed = 2 * padded_tokens * max(width, 128) * hidden.dtype.itemsize
        pooled = pl.pallas_call(
            functools.partial(_pool_kernel, mode=mode, segment_axis=1),
            grid_spec=pltpu.PrefetchScalarGridSpec(
                num_scalar_prefetch=3,
                grid=(hidden_size // width, num_segments),
                in_specs=[pl.BlockSpec((padded_tokens, width), lambda h, s, *_: (0, h))],
                out_specs=pl.BlockSpec((None, 1, width), lambda h, s, *_: (s, 0, h)),
            ),
            out_shape=out_shape,
            interpret=pltpu.InterpretParams() if interpret else False,
            compiler_params=compiler_params("tpu", tpu_vmem_limit(needed)),
        )(*operands)
    else:
        width = _feature_block(hidden_size)
        pooled = pl.pallas_call(
            functools.partial(_pool_kernel, mode=mode, segment_axis=0),
            grid=(num_segments, hidden_size // width),
            in_specs=[pl.no_block_spec] * 4,
            out_specs=pl.BlockSpec((pl.squeezed, 1, width), lambda s, h: (s, 0, h)),
            out_shape=out_shape,
            interpret=interpret,
            compiler_params=compiler_params(platform),
        )(*operands)
    return truncate_and_normalize(pooled.reshape(num_segments, hidden_size), dimensions, normalize)
