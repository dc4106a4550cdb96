"""The model runner: turns a `StepPlan` into fixed-shape host arrays (and the constrained rows' grammar bitmask),
dispatches the compiled step for its bucket without waiting for it, and copies the sampled rows back when asked (the step's one device-to-host
transfer, started as soon as the step is dispatched). The KV pages, the token histories and each sequence
slot's last sampled token are donated to each step and live on the device: a decode token sampled by one step
is read there by the next (`StepInputs.from_last`), so a step can be dispatched before the previous one's
tokens reach the host.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from .bucket_runner import BucketRunner
from .buckets import BucketShape, seq_rung
from .compiled import BucketPrograms, abstract
from .kernels_pallas import kv_cache_shape
from .models.batch import EncoderDecoderBatch, RaggedBatch
from .parallel import cache_kv_heads, kv_pages_sharding, mesh_size, replicated, vocab_sharding
from .sampler import NO_TOKEN_RULES, SampleOutput, SamplingBatch, TokenHistory, TokenRules, sample
from .scheduler import StepPlan
from .sequence import Sequence
from .structured_outputs import bitmask_width


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class DeviceState:
    kv_pages: list[jax.Array]  # one [num_pages, page_size, 2 * Hkv, D] array per layer
    history: TokenHistory
    last_tokens: jax.Array  # [num_slots] int32, the token each sequence slot sampled last


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class StepInputs:
    batch: RaggedBatch
    token_slots: jax.Array  # [T] sequence slot of each token (num_slots for padding)
    from_last: jax.Array  # [T] bool, the token is its slot's last sampled one (not yet on the host)
    is_output: jax.Array  # [T] bool, the token was generated (vs. prompt)
    reset_slots: jax.Array  # [S] slots of sequences starting at position 0 (num_slots otherwise)
    logits_indices: jax.Array  # [R] which token rows produce logits
    sampling: SamplingBatch


@dataclasses.dataclass(frozen=True)
class RunnerShape(BucketShape):
    """Everything that fixes the compiled programs' shapes. An encoder-decoder's steps also carry each sequence's
    `cross_pages` cache pages, which hold its encoder's `encoder_frames` keys and values; its encode programs take
    inputs of `encoder_input_shape` (Whisper: [mels, 2 * frames]) for up to `max_encode_batch` sequences."""

    pages_per_seq: int
    vocab_size: int
    num_top_logprobs: int
    cross_pages: int = 0
    encoder_frames: int = 0
    encoder_input_shape: tuple[int, ...] = ()
    max_encode_batch: int = 8

    @property
    def encode_rungs(self) -> list[int]:
        """Powers of two up to the largest encode batch (more sequences encode in several calls)."""
        largest = min(self.max_num_seqs, self.max_encode_batch)
        return [1 << i for i in range(largest.bit_length()) if 1 << i <= largest]


def empty_inputs(shape: RunnerShape, num_tokens: int) -> StepInputs:
    """Numpy staging buffers of one bucket, all padding: every slot index out of range, every row neutral."""
    t, s = num_tokens, seq_rung(num_tokens, shape.max_num_seqs)
    slots_oob = shape.max_num_seqs
    if shape.cross_pages:
        batch = EncoderDecoderBatch.padding(t, s, shape.pages_per_seq, shape.cross_pages)
    else:
        batch = RaggedBatch.padding(t, s, shape.pages_per_seq)
    return StepInputs(
        batch=batch,
        token_slots=np.full(t, slots_oob, np.int32),
        from_last=np.zeros(t, np.bool_),
        is_output=np.zeros(t, np.bool_),
        reset_slots=np.full(s, slots_oob, np.int32),
        logits_indices=np.zeros(s, np.int32),
        sampling=SamplingBatch.neutral(s, shape.vocab_size, slots_oob),
    )


@dataclasses.dataclass
class StepRows:
    """Whose each logits row of a step is: the plan's chunk, the position whose next token it scores, and
    whether it sampled (otherwise it scored a prompt token for prompt logprobs)."""

    chunk_index: np.ndarray  # [R] int
    position: np.ndarray  # [R] int
    is_sample: np.ndarray  # [R] bool


# the per-row sampling fields that come from SamplingParams, in SamplingParams.row order
_ROW_FIELDS = (
    "temperature", "top_k", "top_p", "min_p", "repetition_penalty", "presence_penalty", "frequency_penalty",
    "wants_logprobs", "timestamps",
)  # fmt: skip


def fill_step(
    plan: StepPlan, bias: dict[int, list[tuple[int, float]]], inputs: StepInputs, num_frames: int = 0
) -> StepRows:
    """Write a plan into a bucket's staging buffers (all padding on entry). `bias` maps seq_id → (token, value)
    pairs for this step. Tokens the host does not have yet (sampled by a step still in flight) are read on the
    device from their slot's last sampled token. An encoder-decoder's sequences read `num_frames` encoder keys
    from their cross pages."""
    b, smp = inputs.batch, inputs.sampling
    chunks = plan.chunks
    n = len(chunks)
    token_ids: list[int] = []
    starts, lengths, slots, num_prompt = [], [], [], []
    row_chunk, row_position, row_sample = [], [], []
    for i, chunk in enumerate(chunks):
        seq, start, end = chunk.seq, chunk.start, chunk.start + chunk.length
        token_ids += seq.token_ids[start:end]
        token_ids += [0] * (end - len(seq.token_ids)) if end > len(seq.token_ids) else []
        starts.append(start)
        lengths.append(chunk.length)
        slots.append(seq.slot)
        num_prompt.append(seq.num_prompt_tokens)
        b.block_table[i, : len(seq.pages)] = seq.pages
        if seq.cross_pages:
            b.cross_block_table[i, : len(seq.cross_pages)] = seq.cross_pages
            b.cross_kv_lens[i] = num_frames
        if chunk.prompt_logprob_positions:
            row_position += chunk.prompt_logprob_positions
            row_chunk += [i] * len(chunk.prompt_logprob_positions)
            row_sample += [False] * len(chunk.prompt_logprob_positions)
        if chunk.sample:
            row_position.append(end - 1)
            row_chunk.append(i)
            row_sample.append(True)
    lengths_np = np.asarray(lengths, np.int32)
    starts_np = np.asarray(starts, np.int32)
    ends = starts_np + lengths_np
    cu = np.cumsum(lengths_np, dtype=np.int32)
    num_tokens = int(cu[-1])
    first = np.repeat(cu - lengths_np, lengths_np)
    positions = np.repeat(starts_np, lengths_np) + np.arange(num_tokens, dtype=np.int32) - first
    token_slots = np.repeat(np.asarray(slots, np.int32), lengths_np)
    b.token_ids[:num_tokens] = token_ids
    b.positions[:num_tokens] = positions
    inputs.token_slots[:num_tokens] = token_slots
    inputs.is_output[:num_tokens] = positions >= np.repeat(np.asarray(num_prompt, np.int32), lengths_np)
    known = np.repeat(np.asarray([len(c.seq.token_ids) for c in chunks], np.int32), lengths_np)
    inputs.from_last[:num_tokens] = positions >= known
    b.kv_lens[:n] = ends
    b.cu_q_lens[1 : n + 1] = cu
    b.cu_q_lens[n + 1 :] = num_tokens
    b.num_seqs[0] = n
    fresh = starts_np == 0
    inputs.reset_slots[:n][fresh] = np.asarray(slots, np.int32)[fresh]

    rows = StepRows(np.asarray(row_chunk, np.int64), np.asarray(row_position, np.int64), np.asarray(row_sample))
    num_rows = len(row_chunk)
    if not num_rows:
        return rows
    row_chunk_np = rows.chunk_index
    inputs.logits_indices[:num_rows] = (cu - lengths_np)[row_chunk_np] + rows.position - starts_np[row_chunk_np]
    smp.slots[:num_rows] = np.asarray(slots, np.int32)[row_chunk_np]
    sample_rows = np.flatnonzero(rows.is_sample)
    seqs = [chunks[i].seq for i in row_chunk_np[sample_rows]]
    if seqs:
        values = np.asarray([seq.params.row for seq in seqs], np.float64)
        for column, name in enumerate(_ROW_FIELDS):
            getattr(smp, name)[sample_rows] = values[:, column]
        smp.seeds[sample_rows] = [seq.seed for seq in seqs]
        smp.output_index[sample_rows] = [seq.num_output_tokens for seq in seqs]
        for r, seq in zip(sample_rows, seqs):
            for j, (token, value) in enumerate(bias.get(seq.seq_id, ())):
                smp.bias_ids[r, j] = token
                smp.bias_values[r, j] = value
    scored = np.flatnonzero(~rows.is_sample)
    if len(scored):
        smp.wants_logprobs[scored] = True
        smp.targets[scored] = [
            chunks[c].seq.token_ids[p + 1] for c, p in zip(row_chunk_np[scored], rows.position[scored])
        ]
    return rows


class StagingBuffers:
    """Host input buffers, two per bucket, allocated once: a step fills the pair's other half while the step
    before may still read its own (the device may read host memory in place)."""

    def __init__(self, shape: RunnerShape):
        self.shape = shape
        self._padding: dict[int, list[np.ndarray]] = {}
        self._buffers: dict[int, list[StepInputs]] = {}
        self._turn = 0

    def take(self, rung: int) -> StepInputs:
        """The next buffer of the bucket, reset to padding."""
        if rung not in self._buffers:
            self._padding[rung] = jax.tree.leaves(empty_inputs(self.shape, rung))
            self._buffers[rung] = [empty_inputs(self.shape, rung) for _ in range(2)]
        self._turn ^= 1
        inputs = self._buffers[rung][self._turn]
        for buffer, padding in zip(jax.tree.leaves(inputs), self._padding[rung]):
            np.copyto(buffer, padding)
        return inputs


class ModelRunner(BucketRunner):
    """The generation runner: the KV pages, token histories and last sampled tokens are its device state.
    `rules` are the model's own rules of what may be sampled. An encoder-decoder's runner also has one encode
    program per batch rung, which fills sequences' cross pages (`encode`)."""

    def __init__(
        self,
        model: nnx.Module,
        shape: RunnerShape,
        num_pages: int,
        page_size: int,
        kv_dtype,
        compile_only: bool = False,
        rules: TokenRules = NO_TOKEN_RULES,
        mesh: Mesh | None = None,
    ):
        self.shape = shape
        self.page_size, self.num_pages = page_size, num_pages
        self.rules = rules
        super().__init__(model, shape.token_rungs, shape.max_num_seqs, "generation", (1,), compile_only, mesh)
        self.encoder_programs = (
            BucketPrograms(jax.jit(self._encode_fn, donate_argnums=(1,)), shape.encode_rungs, "encoder", compile_only)
            if shape.cross_pages
            else None
        )
        num_layers, num_kv_heads, head_dim = model.kv_geometry
        page_shape = kv_cache_shape(num_pages, page_size, cache_kv_heads(num_kv_heads, mesh_size(mesh)), head_dim)

        def initial_state() -> DeviceState:
            return DeviceState(
                kv_pages=[jnp.zeros(page_shape, kv_dtype) for _ in range(num_layers)],
                history=TokenHistory.zeros(shape.max_num_seqs, shape.vocab_size),
                last_tokens=jnp.zeros(shape.max_num_seqs, jnp.int32),
            )

        def shardings() -> DeviceState:  # the pages by KV heads, the token histories by vocabulary, as the logits
            by_vocab = vocab_sharding(mesh, shape.vocab_size)
            return DeviceState(
                [kv_pages_sharding(mesh)] * num_layers, TokenHistory(by_vocab, by_vocab), replicated(mesh)
            )

        self.state = self.create_state(initial_state, shardings)
        # the mesh that splits the logits by vocabulary, as the LM head's rows (None: whole on each device)
        self.vocab_mesh = mesh if mesh_size(mesh) > 1 and shape.vocab_size % mesh_size(mesh) == 0 else None
        self.staging = StagingBuffers(shape)
        self._all_allowed_cache: dict[int, jax.Array] = {}

    def _step_fn(
        self, params, state: DeviceState, inputs: StepInputs, bitmask: jax.Array
    ) -> tuple[DeviceState, SampleOutput]:
        model = nnx.merge(self.graphdef, params)
        num_slots = self.shape.max_num_seqs
        last = state.last_tokens[jnp.minimum(inputs.token_slots, num_slots - 1)]
        batch = dataclasses.replace(inputs.batch, token_ids=jnp.where(inputs.from_last, last, inputs.batch.token_ids))
        hidden, kv_pages = model(batch, state.kv_pages)
        history = state.history.update(batch.token_ids, inputs.token_slots, inputs.is_output, inputs.reset_slots)
        logits = model.logits(hidden[inputs.logits_indices])
        smp = inputs.sampling
        out = sample(logits, smp, history, bitmask, self.shape.num_top_logprobs, self.rules, self.vocab_mesh)
        sampled_slots = jnp.where(smp.targets < 0, smp.slots, num_slots)  # prompt-logprob rows sample nothing
        last_tokens = state.last_tokens.at[sampled_slots].set(out.tokens, mode="drop")
        return self.keep_layout(DeviceState(kv_pages, history, last_tokens), out)

    def example_args(self, rung: int) -> tuple:
        inputs = empty_inputs(self.shape, rung)
        return self.state, inputs, self.unconstrained(len(inputs.logits_indices))

    def _encode_fn(self, params, state: DeviceState, features: jax.Array, slots: jax.Array) -> DeviceState:
        model = nnx.merge(self.graphdef, params)
        return self.keep_layout(dataclasses.replace(state, kv_pages=model.encode(features, slots, state.kv_pages)), ())[
            0
        ]

    def _encode_args(self, rung: int) -> tuple[np.ndarray, np.ndarray]:
        """Encode inputs of a batch rung, all padding: zero features, slots past the cache (dropped)."""
        features = np.zeros((rung, *self.shape.encoder_input_shape), np.float32)
        return features, np.full((rung, self.shape.encoder_frames), self.num_pages * self.page_size, np.int32)

    def warm_up(self, strict: bool = True, progress: bool = True) -> float:
        seconds = super().warm_up(strict, progress)
        if self.encoder_programs is not None:

            def example(rung: int) -> tuple:
                return abstract((self.params, self.state, *self._encode_args(rung)), self.mesh)

            seconds += self.encoder_programs.compile(example, None, progress)
        return seconds

    def encode(self, seqs: list[Sequence]) -> None:
        """Dispatch the encoder over the sequences' inputs, filling their cross pages (in batches of at most the
        largest encode rung); returns without waiting. The next step's program reads the pages after it."""
        largest = self.encoder_programs.rungs[-1]
        offsets = np.arange(self.shape.encoder_frames)
        for start in range(0, len(seqs), largest):
            group = seqs[start : start + largest]
            features, slots = self._encode_args(self.encoder_programs.rung_for(len(group)))
            for i, seq in enumerate(group):
                features[i] = seq.encoder_input
                slots[i] = np.asarray(seq.cross_pages)[offsets // self.page_size] * self.page_size
                slots[i] += offsets % self.page_size
            self.encode_batch(features, slots)

    def encode_batch(self, features: np.ndarray, slots: np.ndarray) -> None:
        """Dispatch the encode program of the batch's rung over `features`, writing them at `slots`."""
        self.announce("encode_batch", features, slots)
        self.state = self.encoder_programs(len(features), self.params, self.state, features, slots)

    def unconstrained(self, rows: int) -> np.ndarray:
        """A grammar bitmask that allows every token in each of `rows` rows."""
        return np.full((rows, bitmask_width(self.shape.vocab_size)), -1, np.int32)

    def _all_allowed(self, rows: int) -> jax.Array:
        """`unconstrained(rows)` kept on the device, so that a step without a constrained row moves no mask."""
        if rows not in self._all_allowed_cache:
            self._all_allowed_cache[rows] = self.on_devices(self.unconstrained(rows))
        return self._all_allowed_cache[rows]

    def prepare(self, plan: StepPlan, bias: dict[int, list[tuple[int, float]]]) -> tuple[StepInputs, StepRows]:
        """The plan in the staging buffers of its bucket."""
        inputs = self.staging.take(self.programs.rung_for(plan.num_tokens))
        return inputs, fill_step(plan, bias, inputs, self.shape.encoder_frames)

    def dispatch(self, inputs: StepInputs, bitmask: np.ndarray | None = None) -> SampleOutput:
        """Start the step and the copy of its sampled rows to the host; returns without waiting for either.
        `bitmask` (`unconstrained(rows)` with the constrained rows filled in) holds the sampling rows to their
        grammars; without one every token is allowed."""
        self.announce("dispatch", inputs, bitmask)
        if bitmask is None:
            bitmask = self._all_allowed(len(inputs.logits_indices))
        self.state, out = self.launch(inputs.batch.token_ids.shape[0], self.state, inputs, bitmask)
        return self.start_copy(out)
