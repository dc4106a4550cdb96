"""One ahead-of-time compiled executable per token rung (DESIGN.md §3).

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
import logging
import os
import threading
import time
from collections.abc import Callable

import jax
from tqdm.auto import tqdm

logger = logging.getLogger(__name__)


def abstract(tree):
    """ShapeDtypeStructs for a tree of arrays."""
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), tree)


def first_rungs(rungs: list[int], max_num_seqs: int) -> list[int]:
    """The rungs a server compiles before it answers: those up to max_num_seqs, and the largest."""
    return sorted({r for r in rungs if r <= max_num_seqs} | {rungs[-1]})


class BucketPrograms:
    def __init__(self, step: Callable, rungs: list[int], what: str):
        self._step = step  # a jax.jit-wrapped function
        self.rungs = rungs
        self._what = what
        self._executables: dict[int, jax.stages.Compiled] = {}
        self._ready: tuple[int, ...] = ()  # sorted; replaced whole, so readers on other threads see a snapshot
        self._background: threading.Thread | None = None
        self._stopping = threading.Event()

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

    def _compile_in_background(self, rungs: list[int], example_args: Callable[[int], tuple]) -> None:
        began = time.perf_counter()
        for rung in rungs:  # one at a time, smallest first: each is usable as soon as it is done
            if self._stopping.is_set():
                return
            self._add(rung, self._step.lower(*example_args(rung)).compile())
        logger.info(
            "Compiled the other %d %s buckets (T = %s) in the background in %.1f s",
            len(rungs), self._what, rungs, time.perf_counter() - began,
        )  # fmt: skip

    def _compile(self, rungs: list[int], example_args: Callable[[int], tuple], progress: bool) -> None:
        lowered = {rung: self._step.lower(*example_args(rung)) for rung in rungs}
        workers = max(1, min(len(rungs), os.cpu_count() or 1))
        with (
            concurrent.futures.ThreadPoolExecutor(workers) as pool,
            tqdm(total=len(rungs), desc=f"Compiling {self._what}", unit="bucket", disable=not progress) as bar,
        ):
            futures = {pool.submit(lowered[rung].compile): rung for rung in rungs}
            for future in concurrent.futures.as_completed(futures):
                self._add(futures[future], future.result())
                bar.update()

    def _add(self, rung: int, executable: jax.stages.Compiled) -> None:
        self._executables[rung] = executable
        self._ready = tuple(sorted((*self._ready, rung)))

    def __call__(self, rung: int, *args):
        return self._executables[rung](*args)
