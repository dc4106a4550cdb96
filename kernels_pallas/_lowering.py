"""Which compiler lowers the Pallas kernels: Triton on GPU, Mosaic on TPU, the interpreter in tests on CPU."""

from __future__ import annotations

import jax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pl_triton

GPU_PLATFORMS = ("gpu", "cuda", "rocm")


def compiler_params(platform: str | None = None) -> pl.CompilerParams | None:
    """Triton's parameters on GPU, else None (Mosaic on TPU; ignored by the interpreter).

    Every kernel here reads its large operands (the KV cache, the packed hidden states) whole, by index, from
    global memory, which is how the Triton lowering treats operands without a block spec. Mosaic GPU, JAX's
    default GPU lowering for `pallas_call`, would stage those operands in shared memory instead, and a KV cache
    never fits there. `platform` defaults to JAX's default backend."""
    return pl_triton.CompilerParams() if (platform or jax.default_backend()) in GPU_PLATFORMS else None
