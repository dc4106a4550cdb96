"""The batches a forward pass consumes (docs/architecture.md §3): ragged decoder steps over the paged cache (with
cross-attention for an encoder-decoder), and packed one-shot passes."""

from __future__ import annotations

import dataclasses

import jax
import numpy as np


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class RaggedBatch:
    """T tokens of S sequences, flat. See `kernels_pallas.ragged_paged_attention` for the conventions."""

    token_ids: jax.Array  # [T] int32
    positions: jax.Array  # [T] int32
    kv_lens: jax.Array  # [S] int32, cached + new tokens per sequence
    block_table: jax.Array  # [S, pages_per_seq] int32
    cu_q_lens: jax.Array  # [S + 1] int32
    num_seqs: jax.Array  # [1] int32

    @classmethod
    def padding(cls, num_tokens: int, num_seqs: int, pages_per_seq: int) -> RaggedBatch:
        """Numpy buffers of a step's shape holding no sequence (zero lengths throughout)."""
        return cls(
            token_ids=np.zeros(num_tokens, np.int32),
            positions=np.zeros(num_tokens, np.int32),
            kv_lens=np.zeros(num_seqs, np.int32),
            block_table=np.zeros((num_seqs, pages_per_seq), np.int32),
            cu_q_lens=np.zeros(num_seqs + 1, np.int32),
            num_seqs=np.zeros(1, np.int32),
        )


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class EncoderDecoderBatch(RaggedBatch):
    """A ragged decoder step of an encoder-decoder (Whisper): each sequence also reads its encoder output's keys
    and values from the cache pages of `cross_block_table`, `cross_kv_lens` of them (0 for padding rows)."""

    cross_kv_lens: jax.Array  # [S] int32
    cross_block_table: jax.Array  # [S, cross_pages] int32

    @classmethod
    def padding(cls, num_tokens: int, num_seqs: int, pages_per_seq: int, cross_pages: int) -> EncoderDecoderBatch:
        return cls(
            **dataclasses.asdict(RaggedBatch.padding(num_tokens, num_seqs, pages_per_seq)),
            cross_kv_lens=np.zeros(num_seqs, np.int32),
            cross_block_table=np.zeros((num_seqs, cross_pages), np.int32),
        )


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class PackedBatch:
    """T tokens of S whole sequences packed back to back, with no cache (encoders and one-shot poolers).
    Sequence s owns tokens cu_seqlens[s]:cu_seqlens[s + 1]; tokens past cu_seqlens[num_seqs] are padding."""

    token_ids: jax.Array  # [T] int32
    positions: jax.Array  # [T] int32, position within the sequence (0-based)
    token_type_ids: jax.Array  # [T] int32, 0/1 segment of a text pair
    cu_seqlens: jax.Array  # [S + 1] int32
    num_seqs: jax.Array  # [1] int32
