"""What every engine shares: the model folder, its config and tokenizer, the dtype, the compilation cache,
the compile watch around each step, and model loading (a checkpoint, or random weights for benchmarks)."""

from __future__ import annotations

import abc
import dataclasses
import random
from collections.abc import Callable, Mapping
from pathlib import Path

import jax
from flax import nnx
from jax.experimental.compilation_cache import compilation_cache

from .compile_watch import CompileWatch
from .config import EngineConfig
from .kernels_pallas import select_kernels
from .model_source import cache_root, embedded_chat_template, load_hf_config, resolve_model
from .stats import EngineStats
from .tokenizer import Tokenizer, load_chat_template
from .weights import load_weights


@dataclasses.dataclass
class StartupTimes:
    load_seconds: float
    compile_seconds: float


class EngineCore(abc.ABC):
    def __init__(self, config: EngineConfig):
        self.config = config
        enable_compilation_cache(Path(config.compile_cache_dir) if config.compile_cache_dir else cache_root() / "xla")
        self.model_folder = resolve_model(config.model)
        self.hf_config = load_hf_config(self.model_folder, config.hf_overrides)
        self.tokenizer = Tokenizer(
            self.model_folder, load_chat_template(config.chat_template) or embedded_chat_template(config.model)
        )
        self.dtype = config.resolved_dtype()
        self.kernels = select_kernels(config.attention_backend)
        self.compile_watch = CompileWatch()
        self._rng = random.Random(config.seed)

    def load_model(
        self,
        build: Callable[[], nnx.Module],
        extra: Mapping | None = None,
        aliases: Callable[[nnx.Module], Mapping] = lambda model: {},
    ) -> nnx.Module:
        """`build()` with the checkpoint's weights (or random ones under load_format=dummy). `extra` holds
        tensors from outside the safetensors; `aliases(skeleton)` the checkpoint prefixes to try."""
        if self.config.load_format == "dummy":
            return nnx.jit(build)()  # random weights, created on the device
        skeleton = nnx.eval_shape(build)
        return load_weights(
            skeleton,
            self.model_folder,
            self.dtype,
            extra=extra,
            aliases=aliases(skeleton),
            progress=self.config.progress,
        )

    def step(self) -> list:
        """Run one step; compiles inside it are counted by `compile_watch`."""
        with self.compile_watch.watching():
            return self._step()

    @abc.abstractmethod
    def _step(self) -> list: ...

    @abc.abstractmethod
    def abort_request(self, request_id: str) -> bool: ...

    @abc.abstractmethod
    def has_unfinished_requests(self) -> bool: ...

    @abc.abstractmethod
    def stats(self) -> EngineStats:
        """A snapshot of the load; safe to call from another thread while the engine steps."""

    def shutdown(self) -> None:
        """Stop compiling buckets in the background (after the one in progress)."""
        self.runner.programs.stop()

    def _startup_stats(self, stats: EngineStats) -> EngineStats:
        """`stats` with the start-up times and the compiled buckets filled in."""
        programs = self.runner.programs
        return dataclasses.replace(
            stats,
            load_seconds=self.startup.load_seconds,
            compile_seconds=self.startup.compile_seconds,
            buckets_compiled=len(programs.ready_rungs),
            buckets_total=len(programs.rungs),
        )


def enable_compilation_cache(directory: Path) -> None:
    """Turn on JAX's persistent compilation cache in `directory` for every program, however small or quick to
    compile. JAX binds its cache to a folder on first use, so a different folder resets it."""
    directory.mkdir(parents=True, exist_ok=True)
    if jax.config.jax_compilation_cache_dir != str(directory):
        jax.config.update("jax_compilation_cache_dir", str(directory))
        compilation_cache.reset_cache()
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
