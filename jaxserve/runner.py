"""The model runner: turns a `StepPlan` into fixed-shape host arrays, runs the compiled step for its bucket,
and copies the sampled rows back (the step's one device-to-host transfer). The KV pages and the token
histories are donated to each step and live on the device.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from .buckets import seq_rung, token_rungs
from .compiled import BucketPrograms, abstract, first_rungs
from .kernels_pallas import kv_cache_shape
from .models.batch import RaggedBatch
from .sampler import SampleOutput, SamplingBatch, TokenHistory, sample
from .scheduler import StepPlan


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class DeviceState:
    kv_pages: list[jax.Array]  # one [num_pages, page_size, 2 * Hkv, D] array per layer
    history: TokenHistory


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class StepInputs:
    batch: RaggedBatch
    token_slots: jax.Array  # [T] sequence slot of each token (num_slots for padding)
    is_output: jax.Array  # [T] bool, the token was generated (vs. prompt)
    reset_slots: jax.Array  # [S] slots of sequences starting at position 0 (num_slots otherwise)
    logits_indices: jax.Array  # [R] which token rows produce logits
    sampling: SamplingBatch


@dataclasses.dataclass(frozen=True)
class RunnerShape:
    """Everything that fixes the compiled programs' shapes."""

    max_num_seqs: int
    max_num_batched_tokens: int
    pages_per_seq: int
    vocab_size: int
    num_top_logprobs: int
    min_token_rung: int

    @property
    def token_rungs(self) -> list[int]:
        return token_rungs(self.max_num_batched_tokens, self.min_token_rung)


def empty_inputs(shape: RunnerShape, num_tokens: int) -> StepInputs:
    """Numpy staging buffers of one bucket, all padding: every slot index out of range, every row neutral."""
    t, s = num_tokens, seq_rung(num_tokens, shape.max_num_seqs)
    slots_oob = shape.max_num_seqs
    return StepInputs(
        batch=RaggedBatch(
            token_ids=np.zeros(t, np.int32),
            positions=np.zeros(t, np.int32),
            kv_lens=np.zeros(s, np.int32),
            block_table=np.zeros((s, shape.pages_per_seq), np.int32),
            cu_q_lens=np.zeros(s + 1, np.int32),
            num_seqs=np.zeros(1, np.int32),
        ),
        token_slots=np.full(t, slots_oob, np.int32),
        is_output=np.zeros(t, np.bool_),
        reset_slots=np.full(s, slots_oob, np.int32),
        logits_indices=np.zeros(s, np.int32),
        sampling=SamplingBatch.neutral(s, shape.vocab_size, slots_oob),
    )


@dataclasses.dataclass
class RowInfo:
    """What the engine needs to read back a logits row: whose it is and whether it sampled."""

    chunk_index: int
    position: int  # the token position whose next-token distribution the row holds
    is_sample: bool


def fill_step(
    plan: StepPlan, shape: RunnerShape, bias: dict[int, list[tuple[int, float]]], rung: int
) -> tuple[StepInputs, list[RowInfo]]:
    """Host arrays for a plan, padded to the bucket `rung`. `bias` maps seq_id → (token, value) pairs for this
    step."""
    inputs = empty_inputs(shape, rung)
    b, smp = inputs.batch, inputs.sampling
    rows: list[RowInfo] = []
    offset = 0
    for i, chunk in enumerate(plan.chunks):
        seq, start, end = chunk.seq, chunk.start, chunk.start + chunk.length
        tokens = slice(offset, offset + chunk.length)
        b.token_ids[tokens] = seq.token_ids[start:end]
        b.positions[tokens] = np.arange(start, end)
        inputs.token_slots[tokens] = seq.slot
        inputs.is_output[tokens] = b.positions[tokens] >= seq.num_prompt_tokens
        b.kv_lens[i] = end
        b.block_table[i, : len(seq.pages)] = seq.pages
        b.cu_q_lens[i + 1] = offset + chunk.length
        if start == 0:
            inputs.reset_slots[i] = seq.slot
        positions = list(chunk.prompt_logprob_positions) + ([end - 1] if chunk.sample else [])
        for position in positions:
            r = len(rows)
            rows.append(RowInfo(i, position, is_sample=position == end - 1 and chunk.sample))
            inputs.logits_indices[r] = offset + position - start
            _fill_row(smp, r, seq, rows[-1], bias.get(seq.seq_id, ()))
        offset += chunk.length
    b.cu_q_lens[len(plan.chunks) + 1 :] = offset
    b.num_seqs[0] = len(plan.chunks)
    return inputs, rows


def _fill_row(smp: SamplingBatch, r: int, seq, row: RowInfo, bias) -> None:
    p = seq.params
    smp.slots[r] = seq.slot
    if not row.is_sample:
        smp.targets[r] = seq.token_ids[row.position + 1]
        smp.wants_logprobs[r] = True
        return
    smp.temperature[r] = 0.0 if p.greedy else p.temperature
    smp.top_k[r] = p.top_k
    smp.top_p[r] = p.top_p
    smp.min_p[r] = p.min_p
    smp.repetition_penalty[r] = p.repetition_penalty
    smp.presence_penalty[r] = p.presence_penalty
    smp.frequency_penalty[r] = p.frequency_penalty
    smp.seeds[r] = seq.seed
    smp.output_index[r] = seq.num_output_tokens
    smp.wants_logprobs[r] = p.logprobs is not None
    for j, (token, value) in enumerate(bias):
        smp.bias_ids[r, j] = token
        smp.bias_values[r, j] = value


class ModelRunner:
    """With `compile_only` (compiling for a chip that need not be attached), the model and the state are only
    shapes, and a bucket that does not compile is reported instead of raised."""

    def __init__(
        self,
        model: nnx.Module,
        shape: RunnerShape,
        num_pages: int,
        page_size: int,
        kv_dtype,
        compile_only: bool = False,
    ):
        self.shape = shape
        self.graphdef, self.params = nnx.split(model)
        num_layers, num_kv_heads, head_dim = model.kv_geometry
        page_shape = kv_cache_shape(num_pages, page_size, num_kv_heads, head_dim)

        def initial_state() -> DeviceState:
            return DeviceState(
                kv_pages=[jnp.zeros(page_shape, kv_dtype) for _ in range(num_layers)],
                history=TokenHistory.zeros(shape.max_num_seqs, shape.vocab_size),
            )

        self.state = jax.eval_shape(initial_state) if compile_only else initial_state()
        self.programs = BucketPrograms(
            jax.jit(self._step_fn, donate_argnums=(1,)),
            shape.token_rungs,
            "generation",
            keep_going=compile_only,
        )

    def _step_fn(self, params, state: DeviceState, inputs: StepInputs) -> tuple[DeviceState, SampleOutput]:
        model = nnx.merge(self.graphdef, params)
        hidden, kv_pages = model(inputs.batch, state.kv_pages)
        history = state.history.update(inputs.batch.token_ids, inputs.token_slots, inputs.is_output, inputs.reset_slots)
        logits = model.logits(hidden[inputs.logits_indices])
        out = sample(logits, inputs.sampling, history, self.shape.num_top_logprobs)
        return DeviceState(kv_pages, history), out

    def warm_up(self, strict: bool = True, progress: bool = True) -> float:
        """Compile the buckets ahead of time (with strict=False, the rest in the background: compiled.py);
        returns the seconds until the engine can step."""
        first = None if strict else first_rungs(self.shape.token_rungs, self.shape.max_num_seqs)
        return self.programs.compile(
            lambda t: abstract((self.params, self.state, empty_inputs(self.shape, t))), first, progress
        )

    def execute(self, inputs: StepInputs) -> SampleOutput:
        self.state, out = self.programs(inputs.batch.token_ids.shape[0], self.params, self.state, inputs)
        return jax.device_get(out)
