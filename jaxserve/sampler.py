"""Sampling on the device, one row per logits row of the step, in vLLM's order:

    raw logits ─ logprobs (raw, as vLLM reports them)
               └ bias (min_tokens bans) → penalties → grammar bitmask → greedy argmax
                                                                      └ temperature → min_p → top_k → top_p → Gumbel-max draw

Penalties read per-sequence token histories that live on the device (`TokenHistory`, one row per sequence
slot) and are updated from the step's own input tokens, so no histogram crosses PCIe. Each row draws from
its own key, `fold_in(key(seed), output_index)`, so a seeded request samples the same tokens whatever else
is in the batch. top_k and top_p thresholds come from a 32-step bisection over the float bit patterns
rather than a sort of the vocabulary; each stage runs only when some row in the step asks for it.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, PartitionSpec

NUM_BIAS_SLOTS = 64  # sparse per-row logit biases (min_tokens bans of EOS and stop tokens)


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class TokenHistory:
    """Per sequence slot: how often each token was generated, and which tokens the prompt holds."""

    output_counts: jax.Array  # [num_slots, V] int32
    prompt_seen: jax.Array  # [num_slots, V] bool

    @classmethod
    def zeros(cls, num_slots: int, vocab_size: int) -> TokenHistory:
        return cls(jnp.zeros((num_slots, vocab_size), jnp.int32), jnp.zeros((num_slots, vocab_size), jnp.bool_))

    def update(self, token_ids, token_slots, is_output, reset_slots) -> TokenHistory:
        """Clear the slots of sequences that start over at position 0, then record the step's input tokens.
        Slots out of range (padding) are dropped."""
        num_slots = self.output_counts.shape[0]
        counts = self.output_counts.at[reset_slots].set(0, mode="drop")
        seen = self.prompt_seen.at[reset_slots].set(False, mode="drop")
        counts = counts.at[jnp.where(is_output, token_slots, num_slots), token_ids].add(1, mode="drop")
        seen = seen.at[jnp.where(is_output, num_slots, token_slots), token_ids].set(True, mode="drop")
        return TokenHistory(counts, seen)


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class SamplingBatch:
    """Per logits row [R]. `targets` >= 0 scores a given token (prompt logprobs) instead of sampling."""

    temperature: jax.Array  # f32
    top_k: jax.Array  # i32, 0 = off
    top_p: jax.Array  # f32
    min_p: jax.Array  # f32
    repetition_penalty: jax.Array  # f32
    presence_penalty: jax.Array  # f32
    frequency_penalty: jax.Array  # f32
    seeds: jax.Array  # u32
    output_index: jax.Array  # i32, tokens generated so far by the row's sequence
    targets: jax.Array  # i32
    slots: jax.Array  # i32, the row's sequence slot in TokenHistory
    wants_logprobs: jax.Array  # bool
    timestamps: jax.Array  # bool, Whisper's timestamp rule applies (`TokenRules.timestamp_begin`)
    bias_ids: jax.Array  # [R, NUM_BIAS_SLOTS] i32, V = unused
    bias_values: jax.Array  # [R, NUM_BIAS_SLOTS] f32

    @classmethod
    def neutral(cls, rows: int, vocab_size: int, num_slots: int) -> SamplingBatch:
        """Host (numpy) rows that sample greedily with nothing applied: the padding of every step."""
        return cls(
            temperature=np.zeros(rows, np.float32),
            top_k=np.zeros(rows, np.int32),
            top_p=np.ones(rows, np.float32),
            min_p=np.zeros(rows, np.float32),
            repetition_penalty=np.ones(rows, np.float32),
            presence_penalty=np.zeros(rows, np.float32),
            frequency_penalty=np.zeros(rows, np.float32),
            seeds=np.zeros(rows, np.uint32),
            output_index=np.zeros(rows, np.int32),
            targets=np.full(rows, -1, np.int32),
            slots=np.full(rows, num_slots, np.int32),
            wants_logprobs=np.zeros(rows, np.bool_),
            timestamps=np.zeros(rows, np.bool_),
            bias_ids=np.full((rows, NUM_BIAS_SLOTS), vocab_size, np.int32),
            bias_values=np.zeros((rows, NUM_BIAS_SLOTS), np.float32),
        )


@dataclasses.dataclass(frozen=True)
class TokenRules:
    """A model's own rules of what may be sampled, from generation_config.json as HF's `generate` applies them:
    `suppress_tokens` never are; and on rows that ask for timestamps (Whisper, `SamplingBatch.timestamps`), when
    the timestamp tokens (from `timestamp_begin` on) together outweigh every text token, one of them must come
    next. Whisper's other timestamp rules depend on the row's past tokens: the host's bitmask holds them
    (timestamp_rules.py)."""

    suppress_tokens: tuple[int, ...] = ()
    timestamp_begin: int | None = None


NO_TOKEN_RULES = TokenRules()


def _apply_token_rules(logits: jax.Array, batch: SamplingBatch, rules: TokenRules) -> jax.Array:
    if rules.suppress_tokens:
        logits = logits.at[:, jnp.asarray(rules.suppress_tokens)].set(-jnp.inf)
    if rules.timestamp_begin is None:
        return logits
    return _when(jnp.any(batch.timestamps), _force_timestamps, logits, batch, rules.timestamp_begin)


def _force_timestamps(logits: jax.Array, batch: SamplingBatch, begin: int) -> jax.Array:
    """On timestamp rows, only timestamps when their total probability beats every text token's."""
    logprobs = jax.nn.log_softmax(logits, axis=-1)
    timestamp = jax.nn.logsumexp(logprobs[:, begin:], axis=-1)
    text = jnp.max(logprobs[:, :begin], axis=-1)
    force = batch.timestamps & (timestamp > text)
    return jnp.where(force[:, None] & (jnp.arange(logits.shape[-1]) < begin), -jnp.inf, logits)


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class SampleOutput:
    tokens: jax.Array  # [R] the sampled token, or the target
    logprobs: jax.Array  # [R] its raw logprob
    ranks: jax.Array  # [R] its rank in the raw distribution (1 = most likely)
    top_ids: jax.Array  # [R, K]
    top_logprobs: jax.Array  # [R, K]


def _sortable_keys(x: jax.Array) -> jax.Array:
    """uint32 keys that order like the float32 values."""
    bits = jax.lax.bitcast_convert_type(x, jnp.uint32)
    return jnp.where(bits >> 31 == 1, ~bits, bits | jnp.uint32(0x80000000))


def _largest_key_with_weight(keys: jax.Array, weights: jax.Array, need: jax.Array) -> jax.Array:
    """Per row, the largest key k such that the weight of entries with key >= k is at least `need`."""

    def halve(_, bounds):
        lo, hi = bounds
        mid = lo + (hi - lo) // 2 + (hi - lo) % 2
        enough = jnp.sum(jnp.where(keys >= mid[:, None], weights, 0), axis=-1) >= need
        enough |= mid == 0
        return jnp.where(enough, mid, lo), jnp.where(enough, hi, mid - 1)

    rows = keys.shape[0]
    init = (jnp.zeros(rows, jnp.uint32), jnp.full(rows, 0xFFFFFFFF, jnp.uint32))
    return jax.lax.fori_loop(0, 32, halve, init)[0]


def _apply_top_k(logits: jax.Array, top_k: jax.Array) -> jax.Array:
    vocab = logits.shape[-1]
    k = jnp.where(top_k > 0, jnp.minimum(top_k, vocab), vocab).astype(jnp.float32)
    keys = _sortable_keys(logits)
    threshold = _largest_key_with_weight(keys, jnp.ones_like(logits), k)
    return jnp.where(keys >= threshold[:, None], logits, -jnp.inf)


def _apply_top_p(logits: jax.Array, top_p: jax.Array) -> jax.Array:
    probs = jax.nn.softmax(logits, axis=-1)
    total = jnp.sum(probs, axis=-1)
    keys = _sortable_keys(probs)
    threshold = _largest_key_with_weight(keys, probs, jnp.minimum(top_p * total, total))
    return jnp.where(keys >= threshold[:, None], logits, -jnp.inf)


def _apply_min_p(logits: jax.Array, min_p: jax.Array) -> jax.Array:
    probs = jax.nn.softmax(logits, axis=-1)
    floor = min_p[:, None] * jnp.max(probs, axis=-1, keepdims=True)
    return jnp.where(probs < floor, -jnp.inf, logits)


def _apply_penalties(logits: jax.Array, batch: SamplingBatch, history: TokenHistory) -> jax.Array:
    counts = history.output_counts[batch.slots]
    seen = history.prompt_seen[batch.slots] | (counts > 0)
    rep = batch.repetition_penalty[:, None]
    logits = jnp.where(seen, jnp.where(logits > 0, logits / rep, logits * rep), logits)
    logits = logits - batch.frequency_penalty[:, None] * counts
    return logits - batch.presence_penalty[:, None] * (counts > 0)


def apply_token_bitmask(logits: jax.Array, bitmask: jax.Array) -> jax.Array:
    """logits [R, V] with the tokens `bitmask` [R, ceil(V / 32)] int32 forbids at -inf (bit j of word i allows
    token 32 i + j; a row of all ones, -1, allows everything: structured_outputs.py)."""
    bits = (bitmask[:, :, None] >> jnp.arange(32, dtype=jnp.int32)) & 1
    allowed = bits.reshape(bitmask.shape[0], -1)[:, : logits.shape[-1]]
    return jnp.where(allowed == 1, logits, -jnp.inf)


def _when(flag: jax.Array, fn, logits: jax.Array, *args) -> jax.Array:
    return jax.lax.cond(flag, lambda x: fn(x, *args), lambda x: x, logits)


def _gumbel_noise(seeds: jax.Array, output_index: jax.Array, vocab: int) -> jax.Array:
    def row(seed, index):
        return jax.random.gumbel(jax.random.fold_in(jax.random.key(seed), index), (vocab,), jnp.float32)

    return jax.vmap(row)(seeds, output_index)


def _draw(logits: jax.Array, batch: SamplingBatch) -> jax.Array:
    temperature = jnp.where(batch.temperature > 0, batch.temperature, 1.0)
    logits = logits / temperature[:, None]
    logits = _when(jnp.any(batch.min_p > 0), _apply_min_p, logits, batch.min_p)
    logits = _when(jnp.any(batch.top_k > 0), _apply_top_k, logits, batch.top_k)
    logits = _when(jnp.any(batch.top_p < 1), _apply_top_p, logits, batch.top_p)
    noise = _gumbel_noise(batch.seeds, batch.output_index, logits.shape[-1])
    return jnp.argmax(logits + noise, axis=-1).astype(jnp.int32)


def top_k_over_mesh(x: jax.Array, k: int, mesh: Mesh | None = None, axis: str = "model") -> tuple[jax.Array, jax.Array]:
    """`jax.lax.top_k` over the last axis of x [R, V], whose V is split over the `mesh` axis (the logits of a
    vocabulary-parallel LM head): each device takes the top k of its own part, then the top k of those N * k
    candidates is taken, so that only the candidates cross between devices, never whole rows. Without a mesh
    (or when k exceeds a part) it is top_k itself."""
    rows, width = x.shape
    parts = 1 if mesh is None else mesh.shape[axis]
    if parts == 1 or width % parts or k > width // parts:
        return jax.lax.top_k(x, k)

    def part_top_k(part: jax.Array) -> tuple[jax.Array, jax.Array]:
        values, ids = jax.lax.top_k(part, k)
        return values, ids + jax.lax.axis_index(axis) * part.shape[-1]

    spec = PartitionSpec(None, axis)
    candidates, ids = jax.shard_map(part_top_k, mesh=mesh, in_specs=spec, out_specs=(spec, spec))(x)
    values, picks = jax.lax.top_k(candidates, k)
    return values, jnp.take_along_axis(ids, picks, axis=-1)


def _score(raw_logprobs: jax.Array, chosen: jax.Array, wants: jax.Array, num_top: int, vocab_mesh: Mesh | None):
    def ranked(lp):
        chosen_lp = jnp.take_along_axis(lp, chosen[:, None], axis=-1)[:, 0]
        ranks = 1 + jnp.sum(lp > chosen_lp[:, None], axis=-1).astype(jnp.int32)
        top_lp, top_ids = top_k_over_mesh(lp, num_top, vocab_mesh)
        return chosen_lp, ranks, top_ids.astype(jnp.int32), top_lp

    def skipped(lp):
        rows = lp.shape[0]
        return (
            jnp.zeros(rows, jnp.float32),
            jnp.zeros(rows, jnp.int32),
            jnp.zeros((rows, num_top), jnp.int32),
            jnp.zeros((rows, num_top), jnp.float32),
        )

    return jax.lax.cond(jnp.any(wants), ranked, skipped, raw_logprobs)


def sample(
    logits: jax.Array,
    batch: SamplingBatch,
    history: TokenHistory,
    bitmask: jax.Array,
    num_top: int,
    rules: TokenRules = NO_TOKEN_RULES,
    vocab_mesh: Mesh | None = None,
) -> SampleOutput:
    """logits [R, V] float32 → one token per row, with raw logprobs and the top `num_top` alternatives; rows whose
    `bitmask` [R, ceil(V / 32)] is not all ones sample only the tokens it allows, and the model's `rules` hold.
    `vocab_mesh`: the mesh whose "model" axis splits the vocabulary (logits of a tensor-parallel LM head); every
    stage reduces where the logits lie (XLA's partitioner combines the per-device partial results), and the top
    alternatives are chosen per device first (`top_k_over_mesh`), so that no device gathers whole rows of logits."""
    raw_logprobs = jax.nn.log_softmax(logits, axis=-1)
    rows = jnp.arange(logits.shape[0])[:, None]
    logits = logits.at[rows, batch.bias_ids].add(batch.bias_values, mode="drop")
    penalized = jnp.any(
        (batch.repetition_penalty != 1) | (batch.presence_penalty != 0) | (batch.frequency_penalty != 0)
    )
    logits = _when(penalized, _apply_penalties, logits, batch, history)
    logits = _when(jnp.any(bitmask != -1), apply_token_bitmask, logits, bitmask)
    logits = _apply_token_rules(logits, batch, rules)
    greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    sampling = batch.temperature > 0
    drawn = jax.lax.cond(jnp.any(sampling), _draw, lambda l, b: greedy, logits, batch)
    tokens = jnp.where(batch.targets >= 0, batch.targets, jnp.where(sampling, drawn, greedy))
    chosen_lp, ranks, top_ids, top_lp = _score(raw_logprobs, tokens, batch.wants_logprobs, num_top, vocab_mesh)
    return SampleOutput(tokens, chosen_lp, ranks, top_ids, top_lp)
