"""Pooling on the paged KV cache, for causal models (decoder embedders, LLM classifiers): the generation
engine's scheduler, page pool and prefix cache, with the pooling heads where the sampler would be.

A request is a sequence that ends when its prompt is computed: its last chunk's step pools it. A task that
reads only the last token's hidden state (`embed` with LAST pooling, `classify` of a decoder) can start from
cached pages and be chunked, since that state is computed whatever is cached. A task that reads every token's
state (MEAN or MAX pooling, token tasks) is computed whole, in one step, and reads no cached page (its full
pages still join the cache for others). Each step runs `PoolingModel.paged`: the backbone over the cache, then
the heads over the step's tokens taken as one packed segment per sequence.
"""

from __future__ import annotations

import dataclasses
import itertools
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from .bucket_runner import BucketRunner
from .buckets import BucketShape, seq_rung
from .engine_core import InFlight
from .kernels_pallas import kv_cache_shape
from .kv_pages import PagePool
from .models.batch import PackedBatch, RaggedBatch
from .outputs import PoolingOutput, PoolingRequestOutput
from .parallel import cache_kv_heads, kv_pages_sharding, mesh_size
from .pooler import PoolerSpec, PoolingInputs, PoolingModel
from .pooling_params import TASKS
from .request import EngineRequest
from .scheduler import Scheduler, SchedulerConfig, StepPlan
from .sequence import Sequence, SequenceStatus


@dataclasses.dataclass(frozen=True)
class PagedPoolingShape(BucketShape):
    pages_per_seq: int


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class PagedPoolingInputs:
    batch: RaggedBatch
    tasks: jax.Array  # [S] int32, index into TASKS of a sequence whose last chunk this is (-1 otherwise)
    start_offsets: jax.Array  # [S] int32, prompt tokens of the chunk left out of the pool
    dimensions: jax.Array  # [S] int32
    activate: jax.Array  # [S] bool

    def pooling_inputs(self) -> PoolingInputs:
        """The step as packed segments, one per sequence (its new tokens), for the heads."""
        b = self.batch
        packed = PackedBatch(b.token_ids, b.positions, jnp.zeros_like(b.token_ids), b.cu_q_lens, b.num_seqs)
        return PoolingInputs(packed, self.tasks, self.start_offsets, self.dimensions, self.activate)


def empty_paged_inputs(shape: PagedPoolingShape, num_tokens: int) -> PagedPoolingInputs:
    s = seq_rung(num_tokens, shape.max_num_seqs)
    return PagedPoolingInputs(
        batch=RaggedBatch.padding(num_tokens, s, shape.pages_per_seq),
        tasks=np.full(s, -1, np.int32),
        start_offsets=np.zeros(s, np.int32),
        dimensions=np.zeros(s, np.int32),
        activate=np.zeros(s, np.bool_),
    )


@dataclasses.dataclass
class PooledSequence:
    """What the heads need of a request beside its sequence."""

    task: str
    activate: bool
    dimensions: int
    start_offset: int


def fill_paged_step(plan: StepPlan, pooled: dict[int, PooledSequence], inputs: PagedPoolingInputs) -> None:
    b = inputs.batch
    offset = 0
    for i, chunk in enumerate(plan.chunks):
        seq, start, end = chunk.seq, chunk.start, chunk.start + chunk.length
        b.token_ids[offset : offset + chunk.length] = seq.token_ids[start:end]
        b.positions[offset : offset + chunk.length] = np.arange(start, end)
        b.kv_lens[i] = end
        b.block_table[i, : len(seq.pages)] = seq.pages
        offset += chunk.length
        b.cu_q_lens[i + 1] = offset
        request = pooled[seq.seq_id]
        inputs.tasks[i] = TASKS.index(request.task) if chunk.sample else -1
        inputs.start_offsets[i] = max(0, request.start_offset - start)
        inputs.dimensions[i] = request.dimensions
        inputs.activate[i] = request.activate
    b.cu_q_lens[len(plan.chunks) + 1 :] = offset
    b.num_seqs[0] = len(plan.chunks)


class PagedPoolingRunner(BucketRunner):
    """The KV pages are its device state, donated to each step."""

    def __init__(
        self,
        model: PoolingModel,
        shape: PagedPoolingShape,
        num_pages: int,
        page_size: int,
        kv_dtype,
        compile_only: bool = False,
        mesh: Mesh | None = None,
    ):
        self.shape = shape
        super().__init__(model, shape.token_rungs, shape.max_num_seqs, "pooling", (1,), compile_only, mesh)
        num_layers, num_kv_heads, head_dim = model.backbone.kv_geometry
        page_shape = kv_cache_shape(num_pages, page_size, cache_kv_heads(num_kv_heads, mesh_size(mesh)), head_dim)

        def initial_pages() -> list[jax.Array]:
            return [jnp.zeros(page_shape, kv_dtype) for _ in range(num_layers)]

        self.state = self.create_state(initial_pages, lambda: [kv_pages_sharding(mesh)] * num_layers)

    def _step_fn(self, params, kv_pages, inputs: PagedPoolingInputs):
        outputs, kv_pages = nnx.merge(self.graphdef, params).paged(inputs.batch, kv_pages, inputs.pooling_inputs())
        return self.keep_layout(kv_pages, outputs)

    def example_args(self, rung: int) -> tuple:
        return self.state, empty_paged_inputs(self.shape, rung)

    def dispatch(self, inputs: PagedPoolingInputs, tasks: set[str]) -> dict[str, jax.Array]:
        """Start the step and the copy of the outputs of `tasks` to the host; returns without waiting."""
        self.announce("dispatch", inputs, tasks)
        self.state, outputs = self.launch(inputs.batch.token_ids.shape[0], self.state, inputs)
        return self.start_copy({task: outputs[task] for task in tasks})


def reads_last_token_only(spec: PoolerSpec, task: str) -> bool:
    """Whether the task's output depends on the last token's hidden state alone (so cached pages may stand in
    for the rest of the prompt)."""
    if task == "embed":
        return spec.embed_pooling == "last"
    return task == "classify" and spec.classify_pooling == "last"


class PagedPoolingBatches:
    """The paged pooling engine's requests: scheduled as generation sequences that end with their prompt."""

    def __init__(
        self, spec: PoolerSpec, runner: PagedPoolingRunner, scheduler_config: SchedulerConfig, pages: PagePool
    ):
        self.spec = spec
        self.runner = runner
        self.pages = pages
        self.scheduler = Scheduler(scheduler_config, pages)
        self._pooled: dict[int, PooledSequence] = {}
        self._seqs: dict[str, Sequence] = {}
        self._seq_ids = itertools.count()

    def add(self, request: EngineRequest, pooled: PooledSequence) -> None:
        if request.request_id in self._seqs:
            raise ValueError(f"Request id {request.request_id!r} is already in use.")
        cacheable = reads_last_token_only(self.spec, pooled.task)
        seq = Sequence(
            seq_id=next(self._seq_ids), request_id=request.request_id, index=0,
            token_ids=list(request.prompt_token_ids), num_prompt_tokens=len(request.prompt_token_ids),
            params=request.params, seed=0, max_tokens=1, reads_prefix_cache=cacheable, chunkable=cacheable,
        )  # fmt: skip
        self._pooled[seq.seq_id] = pooled
        self._seqs[request.request_id] = seq
        self.scheduler.add(seq)

    def abort(self, request_id: str) -> bool:
        seq = self._seqs.get(request_id)
        if seq is None:
            return False
        self._finish(seq)
        return True

    def has_requests(self) -> bool:
        return bool(self._seqs)

    def schedule(self) -> StepPlan | None:
        return self.scheduler.schedule()

    def dispatch(self, plan: StepPlan) -> InFlight:
        inputs = empty_paged_inputs(self.runner.shape, self.runner.programs.rung_for(plan.num_tokens))
        fill_paged_step(plan, self._pooled, inputs)
        tasks = {self._pooled[c.seq.seq_id].task for c in plan.chunks if c.sample}
        step = InFlight(plan, self.runner.dispatch(inputs, tasks))
        self.scheduler.commit(plan)
        return step

    def process(self, step: InFlight) -> list[PoolingRequestOutput]:
        """The outputs of the sequences whose last chunk the step computed (those not aborted meanwhile)."""
        outputs = self.runner.fetch(step.out)
        now = time.monotonic()
        results, offset = [], 0
        for i, chunk in enumerate(step.plan.chunks):
            seq = chunk.seq
            first, offset = offset, offset + chunk.length
            if not chunk.sample or seq.status is SequenceStatus.FINISHED:
                continue
            request = self._pooled[seq.seq_id]
            prompt = seq.token_ids[: seq.num_prompt_tokens]
            if request.task.startswith("token_"):  # computed whole, in this chunk
                data = self.spec.token_rows(request.task, outputs[request.task][first:offset], prompt)
            else:
                data = outputs[request.task][i, : request.dimensions]
            seq.stats.first_token_ts = seq.stats.last_token_ts = now
            results.append(
                PoolingRequestOutput(seq.request_id, prompt, PoolingOutput(data), request.task, metrics=seq.stats)
            )
            self._finish(seq)
        return results

    def _finish(self, seq: Sequence) -> None:
        self.scheduler.finish(seq)
        self._pooled.pop(seq.seq_id, None)
        self._seqs.pop(seq.request_id, None)
