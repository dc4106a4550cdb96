"""The engine core: what generation and pooling share. The step loop (schedule → dispatch → process the
outputs), with async scheduling; the model folder, its config and tokenizer, the dtype, the compilation cache
and its manifest, the compile watch around each step, and model loading (a checkpoint, random weights for
benchmarks, or only the shapes when the engine is built to compile for another chip).

An engine says how it batches and what its outputs are through three hooks: `_schedule` (the next step's
plan, or None), `_dispatch` (prepare the plan's inputs and start the step on the device) and `_process` (read
a dispatched step's outputs back and turn them into the engine's outputs). Under async scheduling the loop
dispatches step N + 1 before it processes step N, so the device never waits for the host's bookkeeping."""

from __future__ import annotations

import abc
import dataclasses
import logging
import random
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils
from jax.experimental.compilation_cache import compilation_cache
from jax.sharding import Mesh

from . import compile_manifest
from .compile_manifest import CompiledModel
from .compile_watch import CompileWatch
from .compiled import BucketPrograms
from .config import DEFAULT_CPU_KV_CACHE_BYTES, EngineConfig
from .kernels_pallas import kv_cache_shape, select_kernels
from .model_source import cache_root, embedded_chat_template, load_hf_config, resolve_model
from .parallel import cache_kv_heads, check_heads, logical_rules, mesh_size, model_mesh, param_sharding, state_shardings
from .stats import EngineStats, IterationTokens
from .targets import Target, attached_target, get_target
from .tokenizer import Tokenizer, load_chat_template
from .weights import load_weights


@dataclasses.dataclass
class StartupTimes:
    load_seconds: float
    compile_seconds: float


logger = logging.getLogger(__name__)


@dataclasses.dataclass
class InFlight:
    """A dispatched step whose outputs have not been read: its plan, the device outputs, and what the engine
    needs to read them (the generation engine's logits rows)."""

    plan: Any
    out: Any
    rows: Any = None


class EngineCore(abc.ABC):
    runner_kind: str  # "generate" or "pooling": what the compile manifest calls the engine's programs

    def __init__(self, config: EngineConfig):
        self.config = config
        self.cache_dir = Path(config.compile_cache_dir) if config.compile_cache_dir else cache_root() / "xla"
        enable_compilation_cache(self.cache_dir)
        # compile only, for a chip that need not be attached (`jaxserve compile`); None: a serving engine
        self.target: Target | None = get_target(config.target) if config.target else None
        self.compiled: CompiledModel | None = None  # what a compile for `target` put in the cache (its manifest entry)
        self.model_folder = resolve_model(config.model)
        self.hf_config = load_hf_config(self.model_folder, config.hf_overrides)
        self.tokenizer = Tokenizer(
            self.model_folder, load_chat_template(config.chat_template) or embedded_chat_template(config.model)
        )
        self.dtype = config.resolved_dtype()
        self.mesh = self._mesh()  # None: one device, unsharded
        self.kernels = select_kernels(config.attention_backend).on_mesh(self.mesh)
        self.compile_watch = CompileWatch()
        self._rng = random.Random(config.seed)
        self.async_scheduling = config.async_scheduling
        self._in_flight: InFlight | None = None
        self.iteration_tokens = IterationTokens()  # steps by tokens scheduled (each `_dispatch` observes its own)

    def load_model(
        self,
        build: Callable[[], nnx.Module],
        extra: Mapping | None = None,
        aliases: Callable[[nnx.Module], Mapping] = lambda model: {},
        renames: Callable[[nnx.Module], Mapping] = lambda model: {},
    ) -> nnx.Module:
        """`build()` with the checkpoint's weights (or random ones under load_format=dummy; only the shapes
        when compiling for a target). `extra` holds tensors from outside the safetensors; `aliases(skeleton)` the
        checkpoint prefixes to try, `renames(skeleton)` its names for parts of a layer (`weights.checkpoint_names`)."""
        skeleton = nnx.eval_shape(build)
        text_config = self.hf_config.get_text_config()  # as the engine has completed it (NomicBERT's head count)
        heads = getattr(text_config, "num_attention_heads", None)
        num_kv_heads = getattr(text_config, "num_key_value_heads", None) or heads
        if heads is not None and mesh_size(self.mesh) > 1:
            check_heads(heads, num_kv_heads, mesh_size(self.mesh))
        sharding = param_sharding(self.mesh, logical_rules(self.mesh, num_kv_heads))
        if self.target is not None:
            if self.mesh is None:
                return skeleton
            graphdef, state = nnx.split(skeleton)
            shapes = [
                (p, v.replace(jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=sharding(v))))
                for p, v in nnx.to_flat_state(state)
            ]
            return nnx.merge(graphdef, nnx.from_flat_state(shapes))
        if self.config.load_format == "dummy":  # random weights, created on the device (each shard on its own)
            if self.mesh is None:
                return nnx.jit(build)()
            graphdef, state = nnx.split(skeleton)
            return nnx.merge(
                graphdef, jax.jit(lambda: nnx.state(build()), out_shardings=state_shardings(state, sharding))()
            )
        return load_weights(
            skeleton,
            self.model_folder,
            self.dtype,
            extra=extra,
            aliases=aliases(skeleton),
            renames=renames(skeleton),
            progress=self.config.progress,
            sharding=sharding if self.mesh is not None else None,
        )

    def _mesh(self) -> Mesh | None:
        """The engine's device mesh: `tensor_parallel_size` devices (of `device_ids`, else the first ones, of the
        target's slice when compiling for one); None for one device and no device group (unsharded)."""
        config = self.config
        tp = config.tensor_parallel_size
        if tp == 1 and config.device_ids is None:
            return None
        devices = self.target.devices() if self.target is not None else jax.devices()
        if config.device_ids is not None:
            devices = [devices[i] for i in config.device_ids]
        return model_mesh(tp, devices)

    def step(self) -> list:
        """Run one step; compiles inside it are counted by `compile_watch`."""
        with self.compile_watch.watching():
            return self._step()

    def _step(self) -> list:
        return self._core_step()

    def core_step(self) -> list:
        """One step of the engine core alone, its outputs unprocessed by a front end (compiles counted)."""
        with self.compile_watch.watching():
            return self._core_step()

    def _core_step(self) -> list:
        """Schedule and dispatch a step; then process a step's outputs: this one's, or under async scheduling the
        previous one's, while this one runs on the device. A step that cannot be planned before the previous
        one's tokens are on the host (`_needs_previous_tokens`) waits for them first."""
        drained = []
        if self._in_flight is not None and self._needs_previous_tokens():
            drained, self._in_flight = self._process(self._in_flight), None
        plan = self._schedule()
        dispatched = self._dispatch(plan) if plan is not None else None
        if not self.async_scheduling:
            return drained + (self._process(dispatched) if dispatched is not None else [])
        previous, self._in_flight = self._in_flight, dispatched
        return drained + (self._process(previous) if previous is not None else [])

    def _needs_previous_tokens(self) -> bool:
        """Whether the next step's inputs depend on tokens still in flight in a way the device cannot resolve."""
        return False

    @abc.abstractmethod
    def _schedule(self) -> Any | None:
        """The next step's plan, or None when there is nothing to run."""

    @abc.abstractmethod
    def _dispatch(self, plan: Any) -> InFlight:
        """Prepare the plan's inputs and start the step on the device, without waiting for it."""

    @abc.abstractmethod
    def _process(self, step: InFlight) -> list:
        """Read a dispatched step's outputs back (waiting for it) and return the engine's outputs."""

    @abc.abstractmethod
    def abort_request(self, request_id: str) -> bool: ...

    @abc.abstractmethod
    def has_unfinished_requests(self) -> bool: ...

    @abc.abstractmethod
    def stats(self) -> EngineStats:
        """A snapshot of the load; safe to call from another thread while the engine steps."""

    def shutdown(self) -> None:
        """Stop compiling buckets in the background (after the one in progress) and stop listening to JAX."""
        self.runner.programs.stop()
        self.compile_watch.close()

    # --- the compile manifest ----------------------------------------------------------------------------

    def _model_hash(self) -> str:
        return compile_manifest.model_hash(self.hf_config.to_dict(), self.runner_kind, self.config.pooler_config)

    def compiled_for_here(self) -> CompiledModel | None:
        """The manifest entry that compiled this model for the attached chip with this JAX, if the cache folder
        has one; says so when it only has the model compiled for other chips or JAX versions."""
        if self.target is not None:
            return None
        here = attached_target()
        device = jax.devices()[0]
        entry, others = compile_manifest.applicable(
            self.cache_dir, self._model_hash(), self.runner_kind, here.name if here else "", device.device_kind
        )
        if others:
            jax_version, jaxlib_version = compile_manifest.current_versions()
            logger.warning(
                "The compile cache %s holds %s compiled for %s, not for this %s with JAX %s, jaxlib %s: "
                "every bucket compiles here.",
                self.cache_dir, self.config.model, "; ".join(e.describe() for e in others),
                here.name if here else device.device_kind, jax_version, jaxlib_version,
            )  # fmt: skip
        return entry

    def after_warm_up(self, programs: BucketPrograms, limits: dict[str, Any], compiled: CompiledModel | None):
        """Compiling for a target: record what was compiled in the manifest. Serving: say how much of a
        manifest's compile the cache gave, and why not all of it."""
        buckets = [programs.reports[rung] for rung in sorted(programs.reports)]
        limits = {"dtype": np.dtype(self.dtype).name, **limits}
        if self.target is not None:
            jax_version, jaxlib_version = compile_manifest.current_versions()
            self.compiled = CompiledModel(
                self.config.model, self._model_hash(), self.runner_kind, self.target.name,
                self.target.device_kind, jax_version, jaxlib_version, limits, buckets,
            )  # fmt: skip
            compile_manifest.record(self.cache_dir, self.compiled)
            return
        if compiled is None:
            return
        missed = [b.tokens for b in buckets if not b.cache_hit]
        if not missed:
            logger.info("All %d buckets came from the compile cache (%s)", len(buckets), compiled.describe())
            return
        differ = {k: (v, limits.get(k)) for k, v in compiled.limits.items() if limits.get(k) != v}
        logger.warning(
            "%d of %d buckets (T = %s) were not in the compile cache %s and compiled here%s.",
            len(missed), len(buckets), missed, self.cache_dir,
            ": this engine's limits differ from the compiled ones (compiled, now): "
            + ", ".join(f"{k} {a} vs {b}" for k, (a, b) in differ.items()) if differ else "",
        )  # fmt: skip

    def num_kv_pages(self, model, pages_per_seq: int, max_num_seqs: int, compiled: CompiledModel | None) -> int:
        """KV pages: as configured, else what the memory budget holds (at most what max_num_seqs sequences of
        max_model_len use). A compile for this chip (`compiled`) fixes the count when the budget holds it, so
        that the programs are the compiled ones."""
        config = self.config
        num_layers, num_kv_heads, head_dim = model.kv_geometry
        devices = mesh_size(self.mesh)  # a page's heads are split over the mesh: its bytes on one device
        cache_heads = cache_kv_heads(num_kv_heads, devices)
        page_bytes = num_layers * int(np.prod(kv_cache_shape(1, config.page_size, cache_heads, head_dim)))
        page_bytes *= np.dtype(self.dtype).itemsize
        page_bytes //= devices
        if config.num_kv_pages is not None:
            num_pages = config.num_kv_pages
        else:
            if config.kv_cache_memory is not None:
                budget = config.kv_cache_memory
            elif self.target is not None:
                budget = _target_kv_budget(self.target, config.gpu_memory_utilization, model, devices)
            else:
                budget = _device_kv_budget(self._first_local_device(), config.gpu_memory_utilization)
                if jax.process_count() > 1:  # every process must size the cache alike: the smallest budget
                    budget = int(np.min(multihost_utils.process_allgather(np.int64(budget))))
            num_pages = min(budget // page_bytes, pages_per_seq * max_num_seqs)
            compiled_pages = compiled.limits.get("num_kv_pages", 0) if compiled else 0
            if config.kv_cache_memory is None and 0 < compiled_pages <= num_pages:
                num_pages = compiled_pages
        if num_pages < pages_per_seq:
            raise ValueError(
                f"The KV cache holds {num_pages} pages ({num_pages * config.page_size} tokens), fewer than one "
                f"sequence of max_model_len={self.max_model_len} needs ({pages_per_seq} pages). Give it more memory "
                "(--kv-cache-memory on CPU, --gpu-memory-utilization on GPU) or lower --max-model-len."
            )
        return int(num_pages)

    def _first_local_device(self) -> jax.Device:
        """The engine's first device of this process (one process's devices, of a mesh over several)."""
        if self.mesh is None:
            return jax.devices()[0]
        return next(d for d in self.mesh.devices.flat if d.process_index == jax.process_index())

    def _startup_stats(self, stats: EngineStats) -> EngineStats:
        """`stats` with what every engine reports filled in: the start-up times and the compiled buckets, the steps
        by tokens scheduled, and the KV cache's configuration."""
        programs = self.runner.programs
        return dataclasses.replace(
            stats,
            load_seconds=self.startup.load_seconds,
            compile_seconds=self.startup.compile_seconds,
            buckets_compiled=len(programs.ready_rungs),
            buckets_total=len(programs.rungs),
            iteration_tokens_counts=tuple(self.iteration_tokens.counts),
            iteration_tokens_sum=self.iteration_tokens.total,
            cache_config=self._cache_config(),
        )

    def _cache_config(self) -> tuple[tuple[str, str], ...]:
        """The paged KV cache's configuration under vLLM's CacheConfig names, as `vllm:cache_config_info` labels
        (values as Python prints them); empty for an engine without one."""
        pool = getattr(self, "page_pool", None)
        if pool is None:
            return ()
        config = self.config
        info = {
            "block_size": pool.page_size,
            "num_gpu_blocks": pool.num_pages,
            "num_gpu_blocks_override": config.num_kv_pages,
            "enable_prefix_caching": pool.enable_caching,
            "cache_dtype": np.dtype(self.dtype).name,
            "gpu_memory_utilization": config.gpu_memory_utilization,
            "kv_cache_memory_bytes": config.kv_cache_memory,
        }
        return tuple((key, str(value)) for key, value in info.items())


def enable_compilation_cache(directory: Path) -> None:
    """Turn on JAX's persistent compilation cache in `directory` for every program, however small or quick to
    compile. JAX binds its cache to a folder on first use, so a different folder resets it."""
    directory.mkdir(parents=True, exist_ok=True)
    if jax.config.jax_compilation_cache_dir != str(directory):
        jax.config.update("jax_compilation_cache_dir", str(directory))
        compilation_cache.reset_cache()
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)


ACTIVATION_RESERVE_FRACTION = 0.1  # of free device memory, kept for the step's activations


def _kv_budget(memory: int, in_use: int, utilization: float) -> int:
    """Bytes for the KV cache: `utilization` of the device memory after what is in use (the weights), less an
    activation reserve."""
    return int((memory * utilization - in_use) * (1 - ACTIVATION_RESERVE_FRACTION))


def _target_kv_budget(target: Target, utilization: float, model, devices: int = 1) -> int:
    """The budget on a chip that is not attached: its nominal memory, less its share of the weights (of
    `devices` chips that split them)."""
    if target.platform == "cpu":
        return DEFAULT_CPU_KV_CACHE_BYTES
    weights = sum(x.size * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(nnx.state(model)))
    return _kv_budget(target.memory_bytes, weights // devices, utilization)


def _device_kv_budget(device: jax.Device, utilization: float) -> int:
    """The budget on an attached device, from its allocator's limit and what is in use (the weights)."""
    stats = device.memory_stats() or {}
    if "bytes_limit" not in stats:
        return DEFAULT_CPU_KV_CACHE_BYTES
    return _kv_budget(stats["bytes_limit"], stats.get("bytes_in_use", 0), utilization)
