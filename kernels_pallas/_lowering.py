"""Which compiler lowers the Pallas kernels: Triton on GPU, Mosaic on TPU, the interpreter in tests on CPU."""

from __future__ import annotations

import jax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jax.experimental.pallas import triton as pl_triton

GPU_PLATFORMS = ("gpu", "cuda", "rocm")


def lowering_platform(platform: str | None = None) -> str:
    """ "gpu", "tpu" or "cpu": `platform` when given, else that of the default device (which a compile for an
    absent target sets, `jaxserve.targets`), else JAX's default backend."""
    if platform is None:
        device = jax.config.jax_default_device
        if isinstance(device, jax.Device):
            platform = device.platform
        else:
            platform = device if isinstance(device, str) else jax.default_backend()
    return "gpu" if platform in GPU_PLATFORMS else platform


def compiler_params(platform: str | None = None, vmem_bytes: int | None = None) -> pl.CompilerParams | None:
    """Triton's parameters on GPU; on TPU, Mosaic's with a scoped-VMEM limit of `vmem_bytes` when given; None
    elsewhere (the interpreter ignores them).

    The GPU kernels read their large operands (the KV cache, the packed hidden states) whole, by index, from
    global memory, which is how the Triton lowering treats operands without a block spec. Mosaic GPU, JAX's
    default GPU lowering for `pallas_call`, would stage those operands in shared memory instead, and a KV cache
    never fits there."""
    platform = lowering_platform(platform)
    if platform == "gpu":
        return pl_triton.CompilerParams()
    if platform == "tpu" and vmem_bytes is not None:
        return pltpu.CompilerParams(vmem_limit_bytes=vmem_bytes)
    return None


def tpu_vmem_limit(needed_bytes: int) -> int:
    """A scoped-VMEM limit for a TPU kernel that holds `needed_bytes` of buffers: room for Mosaic's own
    temporaries on top, at least the 32 MiB default of recent chips, at most 100 MiB (v5e and v6e have 128)."""
    return min(100 << 20, max(32 << 20, 2 * needed_bytes))
