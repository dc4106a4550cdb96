"""The device sampler against NumPy references of vLLM's semantics (penalties, min_p, top_k, top_p,
temperature), on random logits whose values differ clearly."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxserve.sampler import (
    NUM_BIAS_SLOTS,
    SamplingBatch,
    TokenHistory,
    TokenRules,
    _apply_min_p,
    _apply_top_k,
    _apply_top_p,
    sample,
)
from jaxserve.structured_outputs import bitmask_width

V = 97
ROWS = 6


def batch(rows: int = ROWS, **fields) -> SamplingBatch:
    """Rows that sample greedily, with the given fields set (every row wants logprobs, slot = row)."""
    base = SamplingBatch.neutral(rows, V, num_slots=rows)
    base.slots = np.arange(rows, dtype=np.int32)
    base.wants_logprobs = np.ones(rows, np.bool_)
    base.seeds = np.arange(rows, dtype=np.uint32)
    for key, value in fields.items():
        setattr(base, key, np.asarray(value, dtype=getattr(base, key).dtype))
    return base


def free(rows: int, vocab: int = V) -> np.ndarray:
    """A grammar bitmask that allows every token."""
    return np.full((rows, bitmask_width(vocab)), -1, np.int32)


@pytest.fixture
def logits():
    return np.random.default_rng(0).normal(0, 3, size=(ROWS, V)).astype(np.float32)


def test_penalties_follow_vllm(logits):
    rng = np.random.default_rng(1)
    counts = rng.integers(0, 3, size=(ROWS, V)) * (rng.random((ROWS, V)) < 0.3)
    prompt = rng.random((ROWS, V)) < 0.2
    history = TokenHistory(jnp.asarray(counts, jnp.int32), jnp.asarray(prompt))
    rep = np.array([1.0, 1.5, 0.7, 2.0, 1.0, 1.2], np.float32)
    pres = np.array([0.0, 0.5, -0.5, 1.0, 2.0, 0.0], np.float32)
    freq = np.array([0.0, 0.3, 0.0, -1.0, 0.5, 2.0], np.float32)
    params = batch(repetition_penalty=rep, presence_penalty=pres, frequency_penalty=freq)
    out = sample(jnp.asarray(logits), params, history, free(ROWS), 4)

    expected = logits.astype(np.float64).copy()
    seen = prompt | (counts > 0)
    r = rep[:, None]
    expected = np.where(seen, np.where(expected > 0, expected / r, expected * r), expected)
    expected -= freq[:, None] * counts + pres[:, None] * (counts > 0)
    np.testing.assert_array_equal(np.asarray(out.tokens), expected.argmax(-1))
    assert (expected.argmax(-1) != logits.argmax(-1)).any()


def test_bias_bans_tokens(logits):
    ids = np.full((ROWS, NUM_BIAS_SLOTS), V, np.int32)
    values = np.zeros((ROWS, NUM_BIAS_SLOTS), np.float32)
    top2 = np.argsort(-logits, axis=-1)[:, :2]
    ids[:, :2], values[:, :2] = top2, -np.inf
    history = TokenHistory.zeros(ROWS, V)
    out = sample(jnp.asarray(logits), batch(bias_ids=ids, bias_values=values), history, free(ROWS), 4)
    np.testing.assert_array_equal(np.asarray(out.tokens), np.argsort(-logits, axis=-1)[:, 2])


def test_top_k_keeps_the_k_largest(logits):
    k = np.array([1, 2, 5, 50, V, 200], np.int32)
    kept = np.isfinite(np.asarray(jax.jit(_apply_top_k)(jnp.asarray(logits), jnp.asarray(k))))
    for row, kk in enumerate(k):
        expected = logits[row] >= np.sort(logits[row])[::-1][min(kk, V) - 1]
        np.testing.assert_array_equal(kept[row], expected)


def test_top_p_keeps_the_smallest_nucleus(logits):
    p = np.array([0.05, 0.3, 0.5, 0.9, 0.999, 1.0], np.float32)
    kept = np.isfinite(np.asarray(jax.jit(_apply_top_p)(jnp.asarray(logits), jnp.asarray(p))))
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    for row in range(ROWS):
        order = np.argsort(-probs[row])
        mass_above = np.concatenate([[0.0], np.cumsum(probs[row][order])[:-1]])
        expected = np.zeros(V, bool)
        expected[order[mass_above < p[row]]] = True  # vLLM: drop a token once the mass above it reaches top_p
        np.testing.assert_array_equal(kept[row], expected, err_msg=f"row {row}, top_p {p[row]}")


def test_min_p_drops_tokens_below_a_fraction_of_the_top(logits):
    m = np.array([0.0, 0.01, 0.1, 0.3, 0.9, 1.0], np.float32)
    kept = np.isfinite(np.asarray(jax.jit(_apply_min_p)(jnp.asarray(logits), jnp.asarray(m))))
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    np.testing.assert_array_equal(kept, probs >= m[:, None] * probs.max(-1, keepdims=True))


def test_draws_follow_the_tempered_distribution():
    rows = 4000
    row_logits = np.array([2.0, 1.0, 0.0, -1.0, -8.0], np.float32)
    logits = np.tile(row_logits, (rows, 1))
    temperature = 0.7
    params = batch(
        rows,
        temperature=np.full(rows, temperature),
        seeds=np.arange(rows),
        bias_ids=np.full((rows, NUM_BIAS_SLOTS), 5),
        wants_logprobs=np.zeros(rows),
    )
    tokens = np.asarray(sample(jnp.asarray(logits), params, TokenHistory.zeros(1, 5), free(rows, 5), 2).tokens)
    expected = np.exp(row_logits / temperature)
    expected /= expected.sum()
    observed = np.bincount(tokens, minlength=5) / rows
    np.testing.assert_allclose(observed, expected, atol=0.03)


def test_logprobs_are_raw_and_ranked(logits):
    targets = np.array([-1, 3, -1, 7, -1, 0], np.int32)
    out = sample(jnp.asarray(logits), batch(targets=targets), TokenHistory.zeros(ROWS, V), free(ROWS), 5)
    raw = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    tokens = np.asarray(out.tokens)
    np.testing.assert_array_equal(tokens, np.where(targets >= 0, targets, logits.argmax(-1)))
    np.testing.assert_allclose(np.asarray(out.logprobs), raw[np.arange(ROWS), tokens], atol=1e-5)
    ranks = 1 + (raw > raw[np.arange(ROWS), tokens][:, None]).sum(-1)
    np.testing.assert_array_equal(np.asarray(out.ranks), ranks)
    np.testing.assert_array_equal(np.asarray(out.top_ids), np.argsort(-raw, axis=-1)[:, :5])
    np.testing.assert_allclose(np.asarray(out.top_logprobs), -np.sort(-raw, axis=-1)[:, :5], atol=1e-5)


def test_a_grammar_bitmask_limits_its_rows_to_the_tokens_it_allows(logits):
    rng = np.random.default_rng(2)
    allowed = rng.random((ROWS, V)) < 0.1
    allowed[:, 96] = True  # the last word's first bit, past the end of a whole word
    allowed[0] = True  # row 0 is free
    bits = np.zeros((ROWS, bitmask_width(V) * 32), np.uint32)
    bits[:, :V] = allowed
    bitmask = (bits.reshape(ROWS, -1, 32) << np.arange(32, dtype=np.uint32)).sum(-1).astype(np.uint32).view(np.int32)
    history = TokenHistory.zeros(ROWS, V)
    greedy = np.asarray(sample(jnp.asarray(logits), batch(), history, bitmask, 3).tokens)
    np.testing.assert_array_equal(greedy, np.where(allowed, logits, -np.inf).argmax(-1))
    assert greedy[0] == logits[0].argmax() and (greedy[1:] != logits[1:].argmax(-1)).any()
    drawn = sample(jnp.asarray(logits), batch(temperature=np.full(ROWS, 2.0)), history, bitmask, 3)
    assert allowed[np.arange(ROWS), np.asarray(drawn.tokens)].all()
    raw = logits - np.log(np.exp(logits).sum(-1, keepdims=True))  # logprobs stay those of the raw logits
    np.testing.assert_allclose(np.asarray(drawn.logprobs), raw[np.arange(ROWS), np.asarray(drawn.tokens)], atol=1e-5)


def test_token_rules_suppress_tokens_and_force_timestamps(logits):
    """generation_config's suppress_tokens are never sampled (their raw logprobs still reported); on a timestamp row
    whose timestamps (tokens from 90 on) together outweigh every text token, a timestamp comes next, while a row
    that asks for none keeps its text token."""
    history = TokenHistory.zeros(ROWS, V)
    top = logits.argmax(axis=-1)
    out = sample(jnp.asarray(logits), batch(), history, free(ROWS), 2, TokenRules(suppress_tokens=tuple(top)))
    assert not set(np.asarray(out.tokens)) & set(top)
    np.testing.assert_allclose(np.asarray(out.top_ids)[:, 0], top)  # raw: before the rules
    begin, weighted = 90, logits.copy()
    weighted[:, begin:] = weighted.max(axis=-1, keepdims=True) - 0.5  # 7 timestamps, each a little below the top
    rules = TokenRules(timestamp_begin=begin)
    asked = np.array([True, False] * (ROWS // 2))
    out = sample(jnp.asarray(weighted), batch(timestamps=asked), history, free(ROWS), 2, rules)
    tokens = np.asarray(out.tokens)
    assert (tokens[asked] >= begin).all() and (tokens[~asked] == weighted[~asked].argmax(axis=-1)).all()
