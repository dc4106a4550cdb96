"""Attention and pooling kernels behind backend-independent signatures.

Every kernel has a pure-`jnp` reference; Pallas lowerings for GPU and TPU plug in behind the same
signatures (DESIGN.md §5). Until they land, every backend runs the reference.
"""

from __future__ import annotations

import jax

from .ragged_paged_attention import ragged_paged_attention_reference
from .segment_pool import POOLING_MODES, segment_pool_reference, truncate_and_normalize
from .varlen_attention import varlen_attention_reference


def kv_cache_shape(num_pages: int, page_size: int, num_kv_heads: int, head_dim: int) -> tuple[int, int, int, int]:
    """Shape of one layer's paged KV cache: K and V interleaved per head, so one page copy brings both."""
    return (num_pages, page_size, 2 * num_kv_heads, head_dim)


# jitted so that a model traces it once per shape rather than once per layer (start-up time)
ragged_paged_attention = jax.jit(
    ragged_paged_attention_reference, static_argnames=("sm_scale", "sliding_window", "soft_cap")
)

varlen_attention = jax.jit(
    varlen_attention_reference, static_argnames=("sm_scale", "causal", "sliding_window", "soft_cap")
)
segment_pool = jax.jit(segment_pool_reference, static_argnames=("mode",))

__all__ = [
    "POOLING_MODES",
    "kv_cache_shape",
    "ragged_paged_attention",
    "ragged_paged_attention_reference",
    "segment_pool",
    "segment_pool_reference",
    "truncate_and_normalize",
    "varlen_attention",
    "varlen_attention_reference",
]
