"""Attention and pooling kernels behind backend-independent signatures.

Every kernel has a pure-`jnp` reference; Pallas lowerings for GPU and TPU plug in behind the same
signatures (DESIGN.md §5). Until they land, every backend runs the reference.
"""

from __future__ import annotations

import jax

from .ragged_paged_attention import ragged_paged_attention_reference


def kv_cache_shape(num_pages: int, page_size: int, num_kv_heads: int, head_dim: int) -> tuple[int, int, int, int]:
    """Shape of one layer's paged KV cache: K and V interleaved per head, so one page copy brings both."""
    return (num_pages, page_size, 2 * num_kv_heads, head_dim)


# jitted so that a model traces it once per shape rather than once per layer (start-up time)
ragged_paged_attention = jax.jit(
    ragged_paged_attention_reference, static_argnames=("sm_scale", "sliding_window", "soft_cap")
)

__all__ = ["kv_cache_shape", "ragged_paged_attention", "ragged_paged_attention_reference"]
