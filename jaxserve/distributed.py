"""Serving from several processes, one per host, as one SPMD program over the global device mesh.

Every process runs the same `jaxserve serve` command (with its own `--process-id`): it joins the others through
`jax.distributed.initialize`, builds the same engines in the same order (each loads the shards of the weights its
own devices hold, and compiles the same programs), and then either leads or follows. Process 0 leads: it serves
HTTP, tokenizes and schedules, and before each device call of a runner (a step, an encoder batch) it sends that
call's host inputs to every follower over the step channel (`StepBroadcast`); the followers make the same call
with them (`follow`), so that each process launches the same program, with the same inputs, in the same order, and
XLA's collectives meet across the hosts. Outputs are whole on every device, and the leader reads its own copy.

The step channel is a TCP connection from each follower to the leader, at the coordinator's host and the next
port (`step_channel_address`). A follower that dies closes it: the leader marks every engine dead at once, so
`/health` answers 503 and requests are refused instead of waiting on collectives that will never complete; JAX's
coordination service later ends the remaining processes (after its heartbeat timeout), as it does for any job
that lost a process. A leader that dies ends its followers the same way.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import threading
import time
from collections.abc import Callable, Sequence
from multiprocessing.connection import Client, Connection, Listener
from typing import Any

import jax

logger = logging.getLogger(__name__)

CONNECT_TIMEOUT_SECONDS = 300.0


@dataclasses.dataclass(frozen=True)
class DistributedConfig:
    """How this process joins the others: `coordinator` HOST:PORT (process 0's), the number of processes and this
    one's id. `auto` lets JAX find them in the environment (TPU pods, SLURM, Open MPI)."""

    coordinator: str | None = None
    num_processes: int | None = None
    process_id: int | None = None
    auto: bool = False

    @property
    def enabled(self) -> bool:
        return self.auto or (self.num_processes or 1) > 1

    @classmethod
    def from_environment(cls, coordinator: str | None, num_processes: int | None, process_id: int | None):
        """The flags when given; else a multi-process job of TPU pods or SLURM is joined automatically."""
        if coordinator or num_processes:
            if not (coordinator and num_processes and process_id is not None):
                raise ValueError("--distributed-coordinator, --num-processes and --process-id go together.")
            if not 0 <= process_id < num_processes:
                raise ValueError(f"--process-id must be in 0..{num_processes - 1}, got {process_id}.")
            return cls(coordinator, num_processes, process_id)
        pod = "," in os.environ.get("TPU_WORKER_HOSTNAMES", "")
        slurm = int(os.environ.get("SLURM_NTASKS", "1")) > 1
        return cls(auto=pod or slurm)


def initialize(config: DistributedConfig) -> None:
    """Join the other processes (before any JAX computation). On CPU, collectives across processes go over gloo."""
    if not config.enabled:
        return
    if os.environ.get("JAX_PLATFORMS", "").startswith("cpu"):
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if config.auto:
        jax.distributed.initialize()
    else:
        jax.distributed.initialize(config.coordinator, config.num_processes, config.process_id)
    logger.info(
        "Process %d of %d: %d local devices of %d",
        jax.process_index(), jax.process_count(), jax.local_device_count(), jax.device_count(),
    )  # fmt: skip


def step_channel_address(coordinator: str) -> tuple[str, int]:
    """The leader's step channel: the coordinator's host, the port after the coordinator's."""
    host, port = coordinator.rsplit(":", 1)
    return host, int(port) + 1


def _authkey(coordinator: str) -> bytes:
    return f"jaxserve-steps:{coordinator}".encode()


class StepBroadcast:
    """The leader's end: a connection to each follower. `send` hands a runner call to all of them; a follower
    whose connection drops (it died) is reported once to `on_lost`."""

    def __init__(self, coordinator: str, num_followers: int, on_lost: Callable[[int], None] | None = None):
        self.on_lost = on_lost
        self._lost = threading.Event()
        host, port = step_channel_address(coordinator)
        with Listener((host, port), authkey=_authkey(coordinator)) as listener:
            self._followers: list[Connection] = [listener.accept() for _ in range(num_followers)]
        for index, connection in enumerate(self._followers):
            threading.Thread(
                target=self._watch, args=(index + 1, connection), name=f"jaxserve-follower-{index + 1}", daemon=True
            ).start()

    @property
    def lost(self) -> bool:
        return self._lost.is_set()

    def send(self, message: Any) -> None:
        """`message` to every follower; raises ConnectionError once one is gone (the step must not start: its
        collectives would wait for that process forever)."""
        if self.lost:
            raise ConnectionError("A serving process has died; this server can no longer run steps.")
        try:
            for connection in self._followers:
                connection.send(message)
        except OSError as error:
            self._report(0)
            raise ConnectionError("A serving process has died; this server can no longer run steps.") from error

    def close(self) -> None:
        for connection in self._followers:
            try:
                connection.send(None)
                connection.close()
            except OSError:
                pass

    def _watch(self, process: int, connection: Connection) -> None:
        """Followers never send: a read returns only when the connection ends."""
        try:
            connection.recv()
        except (EOFError, OSError):
            pass
        self._report(process)

    def _report(self, process: int) -> None:
        if self._lost.is_set():
            return
        self._lost.set()
        logger.error("Serving process %s is gone; every engine is stopped and /health reports 503.", process or "?")
        if self.on_lost is not None:
            self.on_lost(process)


def connect_to_leader(coordinator: str) -> Connection:
    """A follower's end of the step channel, retried until the leader listens (it does once its engines are
    built)."""
    address = step_channel_address(coordinator)
    deadline = time.monotonic() + CONNECT_TIMEOUT_SECONDS
    while True:
        try:
            return Client(address, authkey=_authkey(coordinator))
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def follow(connection: Connection, runners: Sequence[Any]) -> None:
    """A follower's loop: make each call the leader announces, `(runner index, method, args)`, on its own
    runners, until the leader says stop (None) or is gone."""
    while True:
        try:
            message = connection.recv()
        except (EOFError, OSError):
            logger.error("The leading process is gone; this process stops.")
            return
        if message is None:
            return
        index, method, args = message
        getattr(runners[index], method)(*args)


def check_layout(tensor_parallel_size: int, data_parallel_size: int) -> None:
    """Every process runs every program, so each engine's mesh must span the devices of all processes."""
    if data_parallel_size != 1 or tensor_parallel_size != jax.device_count():
        raise ValueError(
            f"Across {jax.process_count()} processes, one engine spans all {jax.device_count()} devices: "
            f"--tensor-parallel-size {jax.device_count()} with --data-parallel-size 1 (got "
            f"{tensor_parallel_size} and {data_parallel_size})."
        )


def _detected_coordinator() -> str:
    """The coordinator address JAX found in the environment (TPU pod, SLURM); it has no public accessor."""
    from jax._src import distributed as jax_distributed

    return jax_distributed.global_state.coordinator_address


def lead_or_follow(config: DistributedConfig, engines: Sequence[Any]) -> StepBroadcast | None:
    """Once every process has built its engines (`AsyncEngine`s or data-parallel ones: their `runners`, in order):
    process 0 opens the step channel to the others and returns it, its runners announcing each call on it, and
    marks the engines dead (`fail`) when a process is lost; any other process follows process 0's calls until it
    stops, and returns None."""
    from .errors import EngineDeadError

    runners = [runner for engine in engines for runner in engine.runners]
    coordinator = config.coordinator or _detected_coordinator()
    if jax.process_index() != 0:
        follow(connect_to_leader(coordinator), runners)
        return None

    def lost(process: int) -> None:
        for engine in engines:
            engine.fail(EngineDeadError(f"Serving process {process} is gone."))

    broadcast = StepBroadcast(coordinator, jax.process_count() - 1, on_lost=lost)
    for index, runner in enumerate(runners):
        runner.step_broadcast, runner.runner_index = broadcast, index
    return broadcast
