"""Tensor parallelism over a device mesh (docs/scale.md).

An engine that spans several devices runs its one jitted step over a `jax.sharding.Mesh` with a single axis,
"model", of `--tensor-parallel-size` devices. Parameters name their dimensions with logical axes where they are
created (`models/layers.py`: `heads`, `kv_heads`, `mlp`, `vocab`, `experts`), once per layer type; `logical_rules`
maps those names to the mesh axis for one model (Megatron's layout: Q/K/V and gate/up split by output rows, the
attention output and down projections by input columns, embedding and LM head by vocabulary rows, experts
whole per device), and XLA's SPMD partitioner inserts the collectives the layout implies (one all-reduce after
each row-parallel projection). The attention and pooling kernels run per shard under `shard_map`
(`kernels_pallas/sharded.py`); the KV cache is split by KV heads, which are repeated up to one per device when
there are fewer of them than devices.

A dimension a mesh axis does not divide stays whole on every device (a vocabulary of 51865 over 8 devices);
heads must divide, as in vLLM.
"""

from __future__ import annotations

import collections
import dataclasses
import re
from collections.abc import Callable, Mapping, Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from .models.layers import LOGICAL_AXES

MODEL_AXIS = "model"


def model_mesh(tensor_parallel_size: int, devices: Sequence[jax.Device]) -> Mesh:
    """A one-axis mesh ("model") over the first `tensor_parallel_size` of `devices`."""
    if tensor_parallel_size < 1:
        raise ValueError(f"tensor_parallel_size must be at least 1, got {tensor_parallel_size}.")
    if tensor_parallel_size > len(devices):
        raise ValueError(
            f"tensor_parallel_size={tensor_parallel_size} needs {tensor_parallel_size} devices; "
            f"{len(devices)} are available."
        )
    return Mesh(np.asarray(devices[:tensor_parallel_size]), (MODEL_AXIS,))


def mesh_size(mesh: Mesh | None) -> int:
    return 1 if mesh is None else mesh.shape[MODEL_AXIS]


def check_heads(num_heads: int, num_kv_heads: int, tensor_parallel_size: int) -> None:
    """Heads must split evenly over the devices (vLLM's rule); KV heads too, or each device takes a copy of one."""
    tp = tensor_parallel_size
    if num_heads % tp:
        raise ValueError(
            f"Total number of attention heads ({num_heads}) must be divisible by tensor parallel size ({tp})."
        )
    if num_kv_heads % tp and tp % num_kv_heads:
        raise ValueError(
            f"Total number of KV heads ({num_kv_heads}) must divide, or be divisible by, tensor parallel size ({tp})."
        )


def cache_kv_heads(num_kv_heads: int, tensor_parallel_size: int) -> int:
    """KV heads the paged cache holds: the model's, or one per device when there are fewer (each repeated)."""
    return num_kv_heads if num_kv_heads % tensor_parallel_size == 0 else tensor_parallel_size


def logical_rules(mesh: Mesh | None, num_kv_heads: int | None = None) -> dict[str, str | None]:
    """Logical axis → mesh axis. KV projections split with their heads when the heads divide over the mesh, and are
    whole on every device otherwise (each device computes the KV heads it holds a copy of)."""
    if mesh_size(mesh) == 1:
        return dict.fromkeys(LOGICAL_AXES)
    rules: dict[str, str | None] = dict.fromkeys(LOGICAL_AXES, MODEL_AXIS)
    if num_kv_heads is not None and num_kv_heads % mesh_size(mesh):
        rules["kv_heads"] = None
    return rules


def partition_spec(axes: Sequence[str | None], shape: Sequence[int], rules: Mapping, size: int) -> PartitionSpec:
    """The spec of one array: each dimension on the mesh axis its logical axis maps to, when the mesh divides it."""
    dims = [rules.get(a) if a is not None and dim % size == 0 else None for a, dim in zip(axes, shape)]
    return PartitionSpec(*dims)


def param_sharding(mesh: Mesh | None, rules: Mapping) -> Callable[[nnx.Variable], NamedSharding | None]:
    """A parameter's sharding from its `logical_axes` metadata (replicated without); None without a mesh."""

    def sharding(var: nnx.Variable) -> NamedSharding | None:
        if mesh is None:
            return None
        axes = var.get_metadata().get("logical_axes") or ()
        shape = var.get_value().shape
        return NamedSharding(mesh, partition_spec(axes, shape, rules, mesh_size(mesh)))

    return sharding


def state_shardings(state: nnx.State, sharding: Callable[[nnx.Variable], NamedSharding | None]) -> nnx.State:
    """The tree of `state` with each parameter's sharding in place of its value."""
    flat = nnx.to_flat_state(state)
    return nnx.from_flat_state([(path, var.replace(sharding(var))) for path, var in flat])


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def kv_pages_sharding(mesh: Mesh) -> NamedSharding:
    """A layer's pages [P, page_size, 2 * Hkv, D] split by KV heads (each head's K and V rows stay together)."""
    return NamedSharding(mesh, PartitionSpec(None, None, MODEL_AXIS, None))


def vocab_sharding(mesh: Mesh, vocab_size: int) -> NamedSharding:
    """Per-slot vocabulary rows [S, V] (token histories) split like the logits, when the mesh divides V."""
    return NamedSharding(mesh, partition_spec((None, "vocab"), (1, vocab_size), logical_rules(mesh), mesh_size(mesh)))


def bytes_per_device(tree) -> dict[jax.Device, int]:
    """How many bytes of the arrays in `tree` each device holds (from their shards)."""
    held: dict[jax.Device, int] = collections.Counter()
    for leaf in jax.tree.leaves(tree):
        for shard in leaf.addressable_shards:
            held[shard.device] += shard.data.nbytes
    return dict(held)


@dataclasses.dataclass
class Collectives:
    """One kind of collective in a compiled program: how many, and the bytes of their results on one device."""

    count: int = 0
    bytes: int = 0


_COLLECTIVE = re.compile(
    r"= \(?([a-z0-9]+)\[([\d,]*)\][^=]*?\b(all-reduce|all-gather|reduce-scatter|all-to-all|collective-permute)"
    r"(?:-start)?\("
)
_BYTES = {"pred": 1, "s8": 1, "u8": 1, "bf16": 2, "f16": 2, "s16": 2, "u16": 2, "f32": 4, "s32": 4, "u32": 4}


def collectives(hlo_text: str) -> dict[str, Collectives]:
    """The collectives of a compiled program's HLO text by kind (an async start/done pair counts once; a tuple
    result counts its first element)."""
    found: dict[str, Collectives] = collections.defaultdict(Collectives)
    for dtype, dims, kind in _COLLECTIVE.findall(hlo_text):
        elements = int(np.prod([int(d) for d in dims.split(",") if d]))
        found[kind].count += 1
        found[kind].bytes += elements * _BYTES.get(dtype, 8)
    return dict(found)
