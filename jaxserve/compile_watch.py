"""Counts JAX traces and XLA compilations on the engine's step path, so that anything compiled after
warm-up is seen (tests fail on it; the server exports it as a metric).

JAX reports both through `jax.monitoring`, synchronously in the thread that compiles. A watch counts only
events raised inside `watching()` on that same thread, so other engines warming up elsewhere in the process
are not counted. The listener, registered on the first `watching()`, holds the watch weakly; `close()` (at the
engine's shutdown) removes it."""

from __future__ import annotations

import contextlib
import threading
import weakref

import jax

_COMPILE_EVENTS = ("/jax/core/compile/jaxpr_trace_duration", "/jax/core/compile/backend_compile_duration")


class CompileWatch:
    def __init__(self) -> None:
        self.count = 0
        self._watched_thread: int | None = None
        ref = weakref.ref(self)

        def listener(event: str, duration: float, **kwargs) -> None:
            watch = ref()
            if watch is not None and event in _COMPILE_EVENTS and watch._watched_thread == threading.get_ident():
                watch.count += 1

        self._listener = listener
        self._registered = False

    @contextlib.contextmanager
    def watching(self):
        if not self._registered:
            jax.monitoring.register_event_duration_secs_listener(self._listener)
            self._registered = True
        self._watched_thread = threading.get_ident()
        try:
            yield
        finally:
            self._watched_thread = None

    def close(self) -> None:
        """Stop listening (a later `watching()` listens again)."""
        if self._registered:
            jax.monitoring.unregister_event_duration_listener(self._listener)
            self._registered = False
