"""Mixture-of-experts MLP blocks (Mixtral, Qwen2-MoE, Qwen3-MoE): a softmax router picks each token's top-k
experts, and the experts run as grouped matrix products over the tokens sorted by expert (`jax.lax.ragged_dot`),
so each expert computes only the tokens routed to it.

Expert weights stay stacked per layer, as transformers 5 holds them: `experts.gate_up_proj` [E, 2I, H] (each
expert's gate rows, then its up rows) and `experts.down_proj` [E, H, I], with the router as `gate.weight` [E, H].
A checkpoint that stores each expert apart (`block_sparse_moe.experts.N.w1/w2/w3` for Mixtral,
`mlp.experts.N.{gate,up,down}_proj` for Qwen-MoE: what `save_pretrained` writes by default) has its tensors
stacked at load (`expert_tensors`); one saved in the fused layout loads as is."""

from __future__ import annotations

import functools
import re
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, PartitionSpec

from .layers import Linear, _normal, activation, param

if TYPE_CHECKING:
    from .llama import DecoderConfig

# rows of the lhs grouped by expert (ragged dim 0); each expert's weight is HF's [out, in]: contract its last dim
EXPERT_AXIS = "model"  # the mesh axis experts split over (jaxserve/parallel.py's model axis)

_GROUPED_DIMS = jax.lax.RaggedDotDimensionNumbers(
    dot_dimension_numbers=(((1,), (2,)), ((), ())), lhs_ragged_dimensions=[0], rhs_group_dimensions=[0]
)


def grouped_matmul(rows: jax.Array, weights: jax.Array, group_sizes: jax.Array) -> jax.Array:
    """rows [M, in], sorted so that group g's `group_sizes[g]` rows are contiguous; weights [G, out, in] → [M, out],
    each row times its group's weight."""
    return jax.lax.ragged_dot_general(rows, weights, group_sizes, _GROUPED_DIMS, preferred_element_type=rows.dtype)


def route(router_logits: jax.Array, top_k: int, renormalize: bool) -> tuple[jax.Array, jax.Array]:
    """(expert ids [T, k] int32, weights [T, k] float32): the top-k of the softmax over experts in float32, rescaled
    to sum to 1 when `renormalize` (Mixtral always; Qwen-MoE under `norm_topk_prob`)."""
    probs = jax.nn.softmax(router_logits.astype(jnp.float32), axis=-1)
    weights, ids = jax.lax.top_k(probs, top_k)
    if renormalize:
        weights = weights / jnp.sum(weights, axis=-1, keepdims=True)
    return ids.astype(jnp.int32), weights


def grouped_experts(x, expert_ids, weights, gate_up, down, act, first_expert=0) -> jax.Array:
    """x [T, H]; expert_ids, weights [T, k]; gate_up [E, 2I, H], down [E, H, I] → [T, H] float32: sum over each
    token's k experts of weight * down(act(gate(x)) * up(x)), over the experts `first_expert` .. + E - 1 (the
    others contribute nothing: a device's share under expert parallelism).

    The T * k (token, expert) assignments are sorted by expert (stable), each assignment's token row gathered, and
    both projections run as one grouped product each over the per-expert group sizes (an expert with no tokens is
    an empty group; assignments to other experts sort last, outside every group, and come out as zeros). The
    outputs go back to (token, slot) order by a permutation (unique indices: deterministic, unlike a scatter-add)
    and are summed per token with the routing weights, in float32."""
    t, k = expert_ids.shape
    num_local = gate_up.shape[0]
    local = expert_ids.reshape(-1) - first_expert
    mine = (local >= 0) & (local < num_local)
    flat = jnp.where(mine, local, num_local)
    order = jnp.argsort(flat, stable=True)  # assignment slots, grouped by expert
    group_sizes = jnp.bincount(flat, length=num_local + 1)[:num_local].astype(jnp.int32)
    gate, up = jnp.split(grouped_matmul(x[order // k], gate_up, group_sizes), 2, axis=-1)
    out = grouped_matmul(act(gate) * up, down, group_sizes)
    out = jnp.zeros_like(out).at[order].set(out, unique_indices=True)  # back to (token, slot) order
    weights = jnp.where(mine.reshape(t, k), weights, 0.0)
    return jnp.einsum("tkh,tk->th", out.reshape(t, k, -1), weights, preferred_element_type=jnp.float32)


def expert_parallel(mesh: Mesh, axis: str, x, expert_ids, weights, gate_up, down, act) -> jax.Array:
    """`grouped_experts` with the experts split over the mesh `axis`: each device runs the tokens routed to its
    own experts (tokens and routing are whole on every device) and the partial sums are added over the axis."""

    def shard(x, expert_ids, weights, gate_up, down):
        first = jax.lax.axis_index(axis) * gate_up.shape[0]
        return jax.lax.psum(grouped_experts(x, expert_ids, weights, gate_up, down, act, first), axis)

    whole, split = PartitionSpec(), PartitionSpec(axis)
    return jax.shard_map(
        shard, mesh=mesh, in_specs=(whole, whole, whole, split, split), out_specs=whole, check_vma=False
    )(x, expert_ids, weights, gate_up, down)


class Experts(nnx.Module):
    """E SwiGLU experts stacked: `gate_up_proj` [E, 2I, H] and `down_proj` [E, H, I], split by expert over a device
    mesh (`mesh`: the engine's, whose "model" axis they split over when it divides E; None: one device)."""

    def __init__(self, num_experts: int, hidden: int, intermediate: int, act: str, *, dtype, rngs: nnx.Rngs, mesh=None):
        self.gate_up_proj = param(_normal(rngs, (num_experts, 2 * intermediate, hidden), dtype), ("experts",))
        self.down_proj = param(_normal(rngs, (num_experts, hidden, intermediate), dtype), ("experts",))
        self.act = activation(act)
        self.mesh = mesh if mesh is not None and num_experts % mesh.shape[EXPERT_AXIS] == 0 else None

    def __call__(self, x: jax.Array, expert_ids: jax.Array, weights: jax.Array) -> jax.Array:
        args = (x, expert_ids, weights, self.gate_up_proj[...], self.down_proj[...], self.act)
        if self.mesh is None or self.mesh.shape[EXPERT_AXIS] == 1:
            return grouped_experts(*args).astype(x.dtype)
        return expert_parallel(self.mesh, EXPERT_AXIS, *args).astype(x.dtype)


class SparseMoeBlock(nnx.Module):
    """The router (`gate`), the routed experts, and Qwen2-MoE's optional shared expert, which every token runs
    and which is scaled by sigmoid(`shared_expert_gate`(x))."""

    def __init__(self, cfg: DecoderConfig, *, dtype, rngs: nnx.Rngs, shared_expert: nnx.Module | None = None):
        h = cfg.hidden_size
        self.top_k = cfg.num_experts_per_tok
        self.renormalize = cfg.norm_topk_prob
        self.gate = Linear(h, cfg.num_experts, bias=False, dtype=dtype, rngs=rngs)
        self.experts = Experts(
            cfg.num_experts, h, cfg.moe_intermediate_size, cfg.hidden_act, dtype=dtype, rngs=rngs,
            mesh=cfg.kernels.mesh,
        )  # fmt: skip
        self.shared_expert = shared_expert
        self.shared_expert_gate = Linear(h, 1, bias=False, dtype=dtype, rngs=rngs) if shared_expert else None

    def __call__(self, x: jax.Array) -> jax.Array:
        expert_ids, weights = route(self.gate(x), self.top_k, self.renormalize)
        out = self.experts(x, expert_ids, weights)
        if self.shared_expert is not None:
            out = out + jax.nn.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)
        return out


# model_type -> (the checkpoint's name for the MoE block, each expert's gate / up / down projection)
_PER_EXPERT_LAYOUTS = {
    "mixtral": ("block_sparse_moe", "w1", "w3", "w2"),
    "qwen2_moe": ("mlp", "gate_proj", "up_proj", "down_proj"),
    "qwen3_moe": ("mlp", "gate_proj", "up_proj", "down_proj"),
}


def expert_tensors(folder: Path, hf_config) -> Mapping[str, np.ndarray]:
    """The stacked tensors a per-expert MoE checkpoint lacks, for `load_weights(extra=...)`; empty for any other
    model. Lazy: the checkpoint is indexed on first use and each stacked tensor read when it is asked for."""
    layout = _PER_EXPERT_LAYOUTS.get(getattr(hf_config, "model_type", None))
    return {} if layout is None else StackedExperts(folder, hf_config.num_experts, *layout)


class StackedExperts(Mapping):
    """`<layer>.mlp.experts.gate_up_proj` / `.down_proj` (and Mixtral's router, `<layer>.mlp.gate.weight`) built
    from a checkpoint's per-expert tensors, for each layer whose expert 0 the checkpoint holds."""

    def __init__(self, folder: Path, num_experts: int, block: str, gate: str, up: str, down: str):
        self.folder, self.num_experts = folder, num_experts
        self.block, self.projections = block, (gate, up, down)

    @functools.cached_property
    def _index(self) -> dict[str, Path]:
        from jaxserve.weights import tensor_index

        return tensor_index(self.folder)

    @functools.cached_property
    def _sources(self) -> dict[str, list[list[str]]]:
        """Each derived tensor → groups of checkpoint names: each group stacked over experts, the stacks
        concatenated along the rows (gate then up); a one-name group is taken as is (the router)."""
        gate, up, down = self.projections
        pattern = re.compile(rf"(.+)\.{re.escape(self.block)}\.experts\.0\.{re.escape(gate)}\.weight")
        sources = {}
        for name in self._index:
            match = pattern.fullmatch(name)
            if match is None:
                continue
            layer, block = match[1], f"{match[1]}.{self.block}"

            def per_expert(projection: str, block: str = block) -> list[str]:
                return [f"{block}.experts.{e}.{projection}.weight" for e in range(self.num_experts)]

            sources[f"{layer}.mlp.experts.gate_up_proj"] = [per_expert(gate), per_expert(up)]
            sources[f"{layer}.mlp.experts.down_proj"] = [per_expert(down)]
            if self.block != "mlp":
                sources[f"{layer}.mlp.gate.weight"] = [[f"{block}.gate.weight"]]
        missing = [n for groups in sources.values() for group in groups for n in group if n not in self._index]
        if missing:
            raise ValueError(f"Checkpoint {self.folder} lacks {len(missing)} expert tensors, e.g. {missing[:3]}.")
        return sources

    def __getitem__(self, name: str) -> np.ndarray:
        from jaxserve.weights import read_tensor

        groups = self._sources[name]
        read = functools.partial(read_tensor, self.folder, index=self._index)
        if len(groups) == 1 and len(groups[0]) == 1:
            return read(groups[0][0])
        return np.concatenate([np.stack([read(n) for n in group]) for group in groups], axis=1)

    def __contains__(self, name: object) -> bool:  # Mapping's default would read the tensor
        return name in self._sources

    def __iter__(self) -> Iterator[str]:
        return iter(self._sources)

    def __len__(self) -> int:
        return len(self._sources)
