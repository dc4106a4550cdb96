"""Counts JAX traces and XLA compilations, so that anything compiled after warm-up is seen (and fails tests).

JAX reports both through `jax.monitoring`. The listener holds the watch weakly; `close()` removes it."""

from __future__ import annotations

import threading
import weakref

import jax

_COMPILE_EVENTS = ("/jax/core/compile/jaxpr_trace_duration", "/jax/core/compile/backend_compile_duration")


class CompileWatch:
    def __init__(self) -> None:
        self.count = 0
        self._lock = threading.Lock()
        ref = weakref.ref(self)

        def listener(event: str, duration: float, **kwargs) -> None:
            watch = ref()
            if watch is not None and event in _COMPILE_EVENTS:
                with watch._lock:
                    watch.count += 1

        self._listener = listener
        jax.monitoring.register_event_duration_secs_listener(listener)

    def close(self) -> None:
        jax.monitoring.unregister_event_duration_listener(self._listener)
