"""Attention and pooling kernels behind backend-independent signatures.

Every kernel has a pure-`jnp` reference and a Pallas kernel with the same signature (docs/architecture.md §5).
`select_kernels(backend)` gives the set an engine runs: "auto" is Pallas on GPU and TPU (the platform of the
default device, which is the target's in a compile for another chip) and the references on CPU; "pallas" and
"reference" force one; "interpret" runs the Pallas kernels in Pallas' interpreter (tests on CPU).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

import jax
from jax.sharding import Mesh

from . import sharded
from ._lowering import lowering_platform
from .ragged_paged_attention import ragged_paged_attention_pallas, ragged_paged_attention_reference
from .segment_pool import POOLING_MODES, segment_pool_pallas, segment_pool_reference, truncate_and_normalize
from .varlen_attention import varlen_attention_pallas, varlen_attention_reference

ATTENTION_BACKENDS = ("auto", "pallas", "reference", "interpret")


def kv_cache_shape(
    num_pages: int, page_size: int, num_kv_heads: int, head_dim: int, platform: str | None = None
) -> tuple[int, int, int, int]:
    """Shape of one layer's paged KV cache: K and V interleaved per head, so one page copy brings both. On TPU
    the head dim is padded to a multiple of 128 lanes: a cache whose minor dimension is 64 is laid out by XLA in
    an order Mosaic cannot read, and every step would copy the whole cache there and back (the attention
    functions zero-pad q, k and v to the cache's head dim and drop the padding from the result)."""
    if lowering_platform(platform) == "tpu":
        head_dim = -(-head_dim // 128) * 128
    return (num_pages, page_size, 2 * num_kv_heads, head_dim)


_RAGGED_STATIC = ("sm_scale", "sliding_window", "soft_cap", "causal")
_VARLEN_STATIC = ("sm_scale", "causal", "sliding_window", "soft_cap")
_POOL_STATIC = ("mode",)

# jitted so that a model traces each once per shape rather than once per layer (start-up time)
ragged_paged_attention = jax.jit(ragged_paged_attention_reference, static_argnames=_RAGGED_STATIC)
varlen_attention = jax.jit(varlen_attention_reference, static_argnames=_VARLEN_STATIC)
segment_pool = jax.jit(segment_pool_reference, static_argnames=_POOL_STATIC)


@dataclasses.dataclass(frozen=True)
class Kernels:
    """The kernels one engine's models call, all jitted so that a model traces each once per shape. On the
    Pallas sets, a `varlen_attention` call that carries a `relative_bias` runs the reference whatever the
    backend (`_relative_bias_to_reference`). `ragged_paged_attention(q, None, None, kv_pages, ..., causal=False)`
    is the read-only cross-attention call (see its module docstring)."""

    backend: str
    ragged_paged_attention: Callable
    varlen_attention: Callable
    segment_pool: Callable
    mesh: Mesh | None = None  # a tensor-parallel engine's device mesh: the kernels run per device (`on_mesh`)

    def on_mesh(self, mesh: Mesh | None) -> Kernels:
        """These kernels run per device by heads over `mesh` (sharded.py); unchanged on one device."""
        if mesh is None or mesh.size == 1:
            return self
        return Kernels(
            self.backend,
            jax.jit(
                sharded.sharded_ragged_paged_attention(self.ragged_paged_attention, mesh),
                static_argnames=_RAGGED_STATIC,
            ),
            jax.jit(sharded.sharded_varlen_attention(self.varlen_attention, mesh), static_argnames=_VARLEN_STATIC),
            jax.jit(sharded.sharded_segment_pool(self.segment_pool, mesh), static_argnames=_POOL_STATIC),
            mesh,
        )


def _relative_bias_to_reference(pallas_varlen: Callable) -> Callable:
    """The Pallas varlen attention, except that a call with a `relative_bias` (DeBERTa's bucketed c2p / p2c
    tables) runs the jitted reference: the kernels would gather along the bucket axis, which Triton does not
    lower (and Mosaic only in narrow cases), so such calls take the reference on every backend."""

    @functools.wraps(pallas_varlen)
    def varlen(q, k, v, cu_seqlens, num_seqs, *, relative_bias=None, **kwargs):
        if relative_bias is not None:
            return varlen_attention(q, k, v, cu_seqlens, num_seqs, relative_bias=relative_bias, **kwargs)
        return pallas_varlen(q, k, v, cu_seqlens, num_seqs, **kwargs)

    return varlen


def _pallas_kernels(backend: str, interpret: bool) -> Kernels:
    def jitted(kernel: Callable, static: tuple[str, ...]) -> Callable:
        return jax.jit(functools.partial(kernel, interpret=interpret), static_argnames=static)

    return Kernels(
        backend,
        jitted(ragged_paged_attention_pallas, _RAGGED_STATIC),
        _relative_bias_to_reference(jitted(varlen_attention_pallas, _VARLEN_STATIC)),
        jitted(segment_pool_pallas, _POOL_STATIC),
    )


REFERENCE_KERNELS = Kernels("reference", ragged_paged_attention, varlen_attention, segment_pool)
PALLAS_KERNELS = _pallas_kernels("pallas", interpret=False)
INTERPRET_KERNELS = _pallas_kernels("interpret", interpret=True)


def select_kernels(backend: str = "auto") -> Kernels:
    """The kernel set for `--attention-backend`: auto (Pallas on GPU/TPU, references on CPU), pallas,
    reference, or interpret (Pallas kernels in the interpreter)."""
    if backend not in ATTENTION_BACKENDS:
        raise ValueError(f"attention backend must be one of {', '.join(ATTENTION_BACKENDS)}; got {backend!r}.")
    if backend == "auto":
        backend = "reference" if lowering_platform() == "cpu" else "pallas"
    return {"reference": REFERENCE_KERNELS, "pallas": PALLAS_KERNELS, "interpret": INTERPRET_KERNELS}[backend]


__all__ = [
    "ATTENTION_BACKENDS",
    "Kernels",
    "POOLING_MODES",
    "REFERENCE_KERNELS",
    "select_kernels",
    "kv_cache_shape",
    "ragged_paged_attention",
    "ragged_paged_attention_reference",
    "segment_pool",
    "segment_pool_reference",
    "truncate_and_normalize",
    "varlen_attention",
    "varlen_attention_reference",
]
