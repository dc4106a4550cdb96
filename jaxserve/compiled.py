"""One ahead-of-time compiled executable per token rung (DESIGN.md §3).

Lowering traces the step once per rung (sequentially: tracing is Python); compilation runs in a thread
pool, through JAX's persistent cache, under a progress bar. Afterwards only these executables are called,
so nothing compiles on the request path."""

from __future__ import annotations

import concurrent.futures
import logging
import os
import time
from collections.abc import Callable

import jax
from tqdm.auto import tqdm

logger = logging.getLogger(__name__)


def abstract(tree):
    """ShapeDtypeStructs for a tree of arrays."""
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), tree)


class BucketPrograms:
    def __init__(self, step: Callable, rungs: list[int], what: str):
        self._step = step  # a jax.jit-wrapped function
        self.rungs = rungs
        self._what = what
        self._executables: dict[int, jax.stages.Compiled] = {}

    def compile(self, example_args: Callable[[int], tuple], progress: bool = True) -> float:
        """Lower and compile every rung with `example_args(rung)` (arrays or ShapeDtypeStructs);
        returns the seconds it took."""
        began = time.perf_counter()
        lowered = {rung: self._step.lower(*example_args(rung)) for rung in self.rungs}
        workers = max(1, min(len(self.rungs), os.cpu_count() or 1))
        with (
            concurrent.futures.ThreadPoolExecutor(workers) as pool,
            tqdm(total=len(self.rungs), desc=f"Compiling {self._what}", unit="bucket", disable=not progress) as bar,
        ):
            futures = {pool.submit(lowered[rung].compile): rung for rung in self.rungs}
            for future in concurrent.futures.as_completed(futures):
                self._executables[futures[future]] = future.result()
                bar.update()
        seconds = time.perf_counter() - began
        logger.info("Compiled %d %s buckets (T = %s) in %.1f s", len(self.rungs), self._what, self.rungs, seconds)
        return seconds

    def __call__(self, rung: int, *args):
        return self._executables[rung](*args)
