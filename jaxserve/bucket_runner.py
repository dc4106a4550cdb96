"""What every model runner shares (docs/architecture.md §3): the model split into its graph and parameters, one
ahead-of-time compiled program per token rung, warm-up, and dispatch that does not wait for the device.

A runner subclass says what one step computes (`_step_fn`) and what its inputs look like at a rung
(`example_args`); `warm_up` compiles every rung (or, without `strict`, the first ones and the rest in the
background: compiled.py), `launch` calls the rung's program, `start_copy` starts moving what the host will read
to it, and `fetch` reads it there. With `compile_only` (compiling for a chip that need not be attached) the model is
only shapes, and a rung that does not compile is reported instead of raised.
"""

from __future__ import annotations

import abc
from collections.abc import Callable
from typing import Any

import jax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from .compiled import BucketPrograms, abstract, first_rungs
from .distributed import StepBroadcast


class BucketRunner(abc.ABC):
    def __init__(
        self,
        model: nnx.Module,
        token_rungs: list[int],
        max_num_seqs: int,
        what: str,
        donate_argnums: tuple[int, ...] = (),
        compile_only: bool = False,
        mesh: Mesh | None = None,
    ):
        self.graphdef, self.params = nnx.split(model)
        self.max_num_seqs = max_num_seqs
        self.mesh = mesh
        self.compile_only = compile_only
        self.state_shardings = None  # over a mesh, the layout of the runner's device state (`create_state`)
        # a multi-process leader's step channel, and this runner's index among the engines' (distributed.py)
        self.step_broadcast: StepBroadcast | None = None
        self.runner_index = 0
        self.programs = BucketPrograms(
            jax.jit(self._step_fn, donate_argnums=donate_argnums), token_rungs, what, keep_going=compile_only
        )

    @abc.abstractmethod
    def _step_fn(self, params, *args) -> Any:
        """One step, traced once per rung: `params` and the runner's arguments to its outputs."""

    @abc.abstractmethod
    def example_args(self, rung: int) -> tuple:
        """The arguments after `params` of a step at `rung` (arrays or shapes)."""

    def warm_up(self, strict: bool = True, progress: bool = True) -> float:
        """Compile the rungs ahead of time; returns the seconds until the engine can step."""
        first = None if strict else first_rungs(self.programs.rungs, self.max_num_seqs)
        return self.programs.compile(
            lambda rung: abstract((self.params, *self.example_args(rung)), self.mesh), first, progress
        )

    def create_state(self, make: Callable[[], Any], shardings: Callable[[], Any]) -> Any:
        """The runner's device state from `make()`: over a mesh created in place, each array with its sharding of
        `shardings()` (a tree like the state's); only shapes when compiling for another chip."""
        if self.mesh is None:
            return jax.eval_shape(make) if self.compile_only else make()
        self.state_shardings = shardings()
        if self.compile_only:
            shapes = jax.eval_shape(make)
            return jax.tree.map(
                lambda s, sharding: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding),
                shapes,
                self.state_shardings,
            )
        return jax.jit(make, out_shardings=self.state_shardings)()

    def keep_layout(self, state: Any, outputs: Any) -> tuple[Any, Any]:
        """Inside a step over a mesh: the new state laid out as the old (it is donated and fed back), and the
        outputs the host reads whole on every device (any one device, or process, can read them)."""
        if self.mesh is None:
            return state, outputs
        whole = NamedSharding(self.mesh, PartitionSpec())
        outputs = jax.tree.map(lambda x: jax.lax.with_sharding_constraint(x, whole), outputs)
        if self.state_shardings is not None:
            state = jax.lax.with_sharding_constraint(state, self.state_shardings)
        return state, outputs

    def on_devices(self, array: Any) -> Any:
        """A host array on the runner's device(s): whole on each device of a mesh."""
        return jax.device_put(array, None if self.mesh is None else NamedSharding(self.mesh, PartitionSpec()))

    def announce(self, method: str, *args: Any) -> None:
        """On a multi-process leader, send a call of `method` (one that launches a program) with its host
        arguments to the followers, which make it too (distributed.py); elsewhere nothing."""
        if self.step_broadcast is not None:
            self.step_broadcast.send((self.runner_index, method, args))

    def launch(self, rung: int, *args) -> Any:
        """Call the rung's program; returns without waiting for it."""
        return self.programs(rung, self.params, *args)

    @staticmethod
    def start_copy(out: Any) -> Any:
        """Start copying `out` (what the host will read of a step) to the host; returns it."""
        for leaf in jax.tree.leaves(out):
            leaf.copy_to_host_async()
        return out

    @staticmethod
    def fetch(out: Any) -> Any:
        """Outputs on the host (waits for the step)."""
        return jax.device_get(out)
