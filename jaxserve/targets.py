"""Compile targets: accelerators to build programs for, whether or not one is attached.

JAX compiles for a device that is not present through a compile-only topology: libtpu (`jax[tpu]`) describes
TPU slices, the CUDA plugin (`jax[cuda13]`) an NVIDIA GPU from a target description. A program lowered from
unsharded shapes under `jax.default_device(device)` (Mosaic asks the default device for the TPU generation) is
the program a serving engine on that chip lowers, and compiles as it would there, into the persistent
compilation cache, for `jaxserve serve` on that chip to load (whether the real chip's cache key matches the
compile-only one is for the first run on hardware to show: the manifest and the engine's log say).

`cpu` is this machine's own CPU, and a target that is the attached accelerator is that device.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
from collections.abc import Iterator

import jax

GIB = 1 << 30

# XLA's GPU target description (gpu_device_info and the runtime versions), per chip. H100 and H200 share the
# Hopper die (sm_90, 132 SMs); the H200 has 141 GB of HBM3e at 4.8 TB/s.
_HOPPER = """
gpu_device_info {{
  threads_per_block_limit: 1024  threads_per_warp: 32
  shared_memory_per_block: 49152  shared_memory_per_core: 233472  shared_memory_per_block_optin: 232448
  threads_per_core_limit: 2048  core_count: 132  fpus_per_core: 128
  block_dim_limit_x: 2147483647  block_dim_limit_y: 65535  block_dim_limit_z: 65535
  memory_bandwidth: {bandwidth}  l2_cache_size: 52428800  clock_rate_ghz: 1.98
  device_memory_size: {memory}
  cuda_compute_capability {{ major: 9 }}
  registers_per_core_limit: 65536  registers_per_block_limit: 65536
}}
platform_name: "CUDA"
dnn_version_info {{ major: 9 minor: 7 }}
runtime_version {{ major: 13 minor: 0 patch: 0 }}
device_description_str: "{name}"
"""


@dataclasses.dataclass(frozen=True)
class Target:
    """A chip to compile for. `topology` is libtpu's name of the slice (TPU) or XLA's target description (GPU);
    the engine runs on the slice's first chip."""

    name: str
    platform: str  # "cpu", "tpu" or "gpu"
    device_kind: str  # what jax.Device.device_kind says on the real chip
    memory_bytes: int  # device memory of one chip
    topology: str = ""
    plugin: str = ""  # the pip extra that brings the compiler

    def device(self) -> jax.Device:
        """The chip's first device: the attached one when it is this chip, else a compile-only one."""
        return _devices(self)[0]

    def devices(self) -> tuple[jax.Device, ...]:
        """Every chip of the slice (a tensor-parallel engine's mesh spans them): attached or compile-only."""
        return _devices(self)

    def is_attached(self) -> bool:
        device = jax.devices()[0]
        return self.platform == "cpu" or (
            _platform_of(device) == self.platform and device.device_kind == self.device_kind
        )

    @contextlib.contextmanager
    def lowering(self) -> Iterator[jax.Device]:
        """Lower and compile for this target inside: the default device is the target's (Mosaic reads the TPU
        generation from it)."""
        device = self.device()
        with jax.default_device(device):
            yield device


def _platform_of(device: jax.Device) -> str:
    return "gpu" if device.platform in ("gpu", "cuda", "rocm") else device.platform


def _tpu(name: str, kind: str, slice_shape: str, memory_gib: int) -> Target:
    return Target(name, "tpu", kind, memory_gib * GIB, topology=slice_shape, plugin="jax[tpu]")


def _hopper(name: str, description: str, memory: int, bandwidth: int) -> Target:
    topology = _HOPPER.format(name=description, memory=memory, bandwidth=bandwidth)
    return Target(name, "gpu", description, memory, topology=topology, plugin="jax[cuda13]")


TARGETS: dict[str, Target] = {
    t.name: t
    for t in (
        Target("cpu", "cpu", "cpu", 0),
        _tpu("tpu-v5e", "TPU v5 lite", "v5e:1x1", 16),
        _tpu("tpu-v5e-4", "TPU v5 lite", "v5e:2x2", 16),
        _tpu("tpu-v5e-8", "TPU v5 lite", "v5e:2x4", 16),
        _tpu("tpu-v6e", "TPU v6 lite", "v6e:1x1", 32),
        _tpu("tpu-v6e-4", "TPU v6 lite", "v6e:2x2", 32),
        _tpu("tpu-v6e-8", "TPU v6 lite", "v6e:2x4", 32),
        _hopper("h100", "NVIDIA H100 80GB HBM3", 84_929_347_584, 3_352_320_000_000),
        _hopper("h200", "NVIDIA H200", 150_754_820_096, 4_800_000_000_000),
    )
}


def get_target(name: str) -> Target:
    if name not in TARGETS:
        raise ValueError(f"Unknown compile target {name!r}; choose one of {', '.join(TARGETS)}.")
    return TARGETS[name]


def attached_target() -> Target | None:
    """The chip this process runs on, when it is one of TARGETS (else None: another accelerator)."""
    return next((t for t in TARGETS.values() if t.is_attached()), None)


class TargetUnavailable(RuntimeError):
    """The compiler for a target is not installed here."""


@functools.cache
def _devices(target: Target) -> tuple[jax.Device, ...]:
    if target.is_attached():
        return tuple(jax.devices())
    from jax.experimental import topologies

    if target.platform == "tpu":
        # libtpu guards a real TPU with a lockfile that admits one process; a compile-only topology touches no chip,
        # so let a second process (a test run beside a `jaxserve compile`) load it too
        os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    try:
        if target.platform == "tpu":
            chips = target.topology.split(":")[1].split("x")
            bounds = (int(chips[0]), int(chips[1]), 1)
            topo = topologies.get_topology_desc(
                topology_name=target.topology, platform="tpu", chips_per_host_bounds=bounds
            )
        else:
            topo = topologies.get_topology_desc(
                topology_name=target.name, platform="cuda", topology="1x1x1", target_config=target.topology
            )
    except Exception as error:  # a missing plugin shows as an ImportError or a RuntimeError, by JAX version
        raise TargetUnavailable(
            f"Cannot compile for {target.name}: {str(error).strip().splitlines()[0]}. Its compiler comes with "
            f"pip install '{target.plugin}=={jax.__version__}'"
        ) from error
    return tuple(topo.devices)
