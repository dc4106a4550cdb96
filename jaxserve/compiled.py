"""One ahead-of-time compiled executable per token rung (docs/architecture.md §3).

Lowering traces the step once per rung (sequentially: tracing is Python); compilation runs in a thread
pool, through JAX's persistent cache, under a progress bar. Afterwards only these executables are called,
so nothing compiles on the request path.

Without `strict`, only the rungs a server needs first are compiled before `compile` returns: every rung up to
`max_num_seqs` (each decode step fits one of them) and the largest (every step fits it). The others compile
in a background thread, smallest first, and a step pads up to the smallest rung compiled so far.

The persistent cache is keyed by the lowered program (with the JAX version, backend and compile options), so
a changed model architecture, dtype or bucket set is a different program and compiles anew, while the same
model started again loads every executable from disk."""

from __future__ import annotations

import bisect
import concurrent.futures
import dataclasses
import logging
import os
import re
import threading
import time
import weakref
from collections.abc import Callable

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from tqdm.auto import tqdm

logger = logging.getLogger(__name__)

_CACHE_HIT = "/jax/compilation_cache/cache_hits"


def abstract(tree, mesh: Mesh | None = None):
    """ShapeDtypeStructs for a tree of arrays. Without a mesh they carry no sharding: lowered on the default
    device, the program is the same (and so is its cache key) whether that device is attached or a compile
    target's. Over a mesh each keeps its array's sharding, and a host array (a step input) is whole on every
    device."""
    if mesh is None:
        return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), tree)
    whole = NamedSharding(mesh, PartitionSpec())

    def one(a) -> jax.ShapeDtypeStruct:
        sharding = getattr(a, "sharding", None)
        return jax.ShapeDtypeStruct(
            a.shape, a.dtype, sharding=sharding if isinstance(sharding, NamedSharding) else whole
        )

    return jax.tree.map(one, tree)


@dataclasses.dataclass
class BucketReport:
    """How one rung's program came to be: compile seconds, whether it came from the persistent cache, and the
    compiler's memory figures (bytes; None where the backend reports none)."""

    tokens: int
    seconds: float
    cache_hit: bool
    temp_bytes: int | None = None
    argument_bytes: int | None = None
    generated_code_bytes: int | None = None
    kernel_scratch_bytes: int | None = None  # the most on-chip scratch a kernel uses (TPU: scoped VMEM)
    error: str | None = None  # the compiler's, when the rung did not compile (kept only in compile-only runs)

    @classmethod
    def of(
        cls, tokens: int, seconds: float, cache_hit: bool, executable: jax.stages.Compiled, detailed: bool = False
    ) -> BucketReport:
        """`detailed` also reads the kernels' scratch from the compiled program's text (slow for a large one)."""
        memory = executable.memory_analysis()
        return cls(
            tokens,
            round(seconds, 3),
            cache_hit,
            getattr(memory, "temp_size_in_bytes", None),
            getattr(memory, "argument_size_in_bytes", None),
            getattr(memory, "generated_code_size_in_bytes", None),
            kernel_scratch_bytes(executable) if detailed else None,
        )


_USED_SCOPED_MEMORY = re.compile(r'"used_scoped_memory_configs":\[([^\]]*)\]')
_SIZE = re.compile(r'"size":"(\d+)"')


def kernel_scratch_bytes(executable: jax.stages.Compiled) -> int | None:
    """The most scoped VMEM any Mosaic kernel of the program uses, as the TPU compiler reports it per custom
    call; None where the compiler reports none (Triton's shared memory is not in the program's text)."""
    kernels = [line for line in executable.as_text().splitlines() if 'custom_call_target="tpu_custom_call"' in line]
    used = [
        int(size)
        for line in kernels
        for configs in _USED_SCOPED_MEMORY.findall(line)
        for size in _SIZE.findall(configs)
    ]
    return max(used) if used else None


class _CacheHits:
    """Which rungs were loaded from the persistent cache. JAX reports a hit through `jax.monitoring`, in the
    thread that compiles, so a compile run through `compile(rung, lowered)` is attributed to its rung."""

    def __init__(self) -> None:
        self.rungs: set[int] = set()
        self._current = threading.local()
        ref = weakref.ref(self)

        def listener(event: str, **kwargs) -> None:
            tally = ref()
            rung = getattr(tally._current, "rung", None) if tally is not None else None
            if event == _CACHE_HIT and rung is not None:
                tally.rungs.add(rung)

        self._listener = listener
        jax.monitoring.register_event_listener(listener)

    def close(self) -> None:
        if self._listener is not None:
            jax.monitoring.unregister_event_listener(self._listener)
            self._listener = None

    def compile(self, rung: int, lowered: jax.stages.Lowered) -> tuple[jax.stages.Compiled, float, bool]:
        """(executable, seconds, whether it was a cache hit)."""
        began = time.perf_counter()
        self._current.rung = rung
        try:
            executable = lowered.compile()
        finally:
            self._current.rung = None
        return executable, time.perf_counter() - began, rung in self.rungs


def first_rungs(rungs: list[int], max_num_seqs: int) -> list[int]:
    """The rungs a server compiles before it answers: those up to max_num_seqs, and the largest."""
    return sorted({r for r in rungs if r <= max_num_seqs} | {rungs[-1]})


def error_line(error: Exception) -> str:
    """The line of a compiler's message that says what failed (XLA wraps Mosaic's and Triton's in a few)."""
    lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()]
    for line in lines:
        if any(mark in line for mark in ("E1001", "E2003", "Mosaic failed", "error:", "Error:")):
            return line[:300]
    return f"{type(error).__name__}: {lines[0][:300] if lines else ''}"


class BucketPrograms:
    """The compiled step of each rung. With `keep_going` (compiling for another chip, where the programs are
    only reported), a rung that fails to lower or compile is recorded with its error and the others go on."""

    def __init__(self, step: Callable, rungs: list[int], what: str, keep_going: bool = False):
        self._step = step  # a jax.jit-wrapped function
        self.rungs = rungs
        self._what = what
        self._keep_going = keep_going
        self._executables: dict[int, jax.stages.Compiled] = {}
        self._ready: tuple[int, ...] = ()  # sorted; replaced whole, so readers on other threads see a snapshot
        self._background: threading.Thread | None = None
        self._stopping = threading.Event()
        self._cache_hits = _CacheHits()
        self.reports: dict[int, BucketReport] = {}

    @property
    def ready_rungs(self) -> tuple[int, ...]:
        return self._ready

    def rung_for(self, num_tokens: int) -> int:
        """The smallest compiled rung that holds `num_tokens`."""
        ready = self._ready
        return ready[bisect.bisect_left(ready, num_tokens)]

    def compile(self, example_args: Callable[[int], tuple], first: list[int] | None = None, progress: bool = True):
        """Compile the rungs in `first` now (every rung when None) and the rest in a background thread, with
        `example_args(rung)` (arrays or ShapeDtypeStructs); returns the seconds until `first` was ready."""
        began = time.perf_counter()
        now = self.rungs if first is None else first
        self._compile(now, example_args, progress)
        seconds = time.perf_counter() - began
        logger.info("Compiled %d %s buckets (T = %s) in %.1f s", len(now), self._what, list(now), seconds)
        rest = [rung for rung in self.rungs if rung not in now]
        if rest:
            self._background = threading.Thread(
                target=self._compile_in_background, args=(rest, example_args), name=f"compile-{self._what}", daemon=True
            )
            self._background.start()
        return seconds

    def wait(self) -> None:
        """Block until the background compilation (if any) has finished."""
        if self._background is not None:
            self._background.join()

    def stop(self) -> None:
        """Stop compiling in the background after the bucket in progress (a process must not exit while XLA
        compiles in one of its threads)."""
        self._stopping.set()
        self.wait()
        self._cache_hits.close()

    def _compile_in_background(self, rungs: list[int], example_args: Callable[[int], tuple]) -> None:
        began = time.perf_counter()
        for rung in rungs:  # one at a time, smallest first: each is usable as soon as it is done
            if self._stopping.is_set():
                return
            self._add(rung, *self._cache_hits.compile(rung, self._step.lower(*example_args(rung))))
        logger.info(
            "Compiled the other %d %s buckets (T = %s) in the background in %.1f s",
            len(rungs), self._what, rungs, time.perf_counter() - began,
        )  # fmt: skip

    def _compile(self, rungs: list[int], example_args: Callable[[int], tuple], progress: bool) -> None:
        lowered = {}
        for rung in rungs:
            try:
                lowered[rung] = self._step.lower(*example_args(rung))
            except Exception as error:
                self._failed(rung, error)
        rungs = list(lowered)
        workers = max(1, min(len(rungs), os.cpu_count() or 1))
        with (
            concurrent.futures.ThreadPoolExecutor(workers) as pool,
            tqdm(total=len(rungs), desc=f"Compiling {self._what}", unit="bucket", disable=not progress) as bar,
        ):
            futures = {pool.submit(self._cache_hits.compile, rung, lowered[rung]): rung for rung in rungs}
            for future in concurrent.futures.as_completed(futures):
                try:
                    self._add(futures[future], *future.result())
                except Exception as error:
                    self._failed(futures[future], error)
                bar.update()

    def _failed(self, rung: int, error: Exception) -> None:
        if not self._keep_going:
            raise error
        logger.warning("The %s bucket T = %d did not compile: %s", self._what, rung, error_line(error))
        self.reports[rung] = BucketReport(rung, 0.0, False, error=error_line(error))

    def _add(self, rung: int, executable: jax.stages.Compiled, seconds: float, cache_hit: bool) -> None:
        self.reports[rung] = BucketReport.of(rung, seconds, cache_hit, executable, detailed=self._keep_going)
        self._executables[rung] = executable
        self._ready = tuple(sorted((*self._ready, rung)))

    def __call__(self, rung: int, *args):
        return self._executables[rung](*args)
