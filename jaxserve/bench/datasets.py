"""Synthetic benchmark prompts: vLLM's "random" dataset and a built-in ShareGPT-like length distribution.

Prompts are random token ids when the model's vocabulary size is known (lengths then exact, since a server takes
token ids as they are), else text of common English words, one word per requested token: most BPE tokenizers
encode each of these words (with its leading space) as one token, but the real prompt length is only approximate
and the benchmark counts it from the server's `usage`."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

DATASETS = ("random", "sharegpt-like")

# Random token ids start here (or at half the vocabulary, if smaller): special and control tokens usually sit at
# the low ids. Ids up to the vocabulary size are used; a server rejects none of them, though a few may be special.
MIN_RANDOM_TOKEN_ID = 100

# The ShareGPT-like distribution: lognormal lengths with these medians (exp of the log-mean) and log-sigma.
SHAREGPT_INPUT_MEDIAN = 100
SHAREGPT_OUTPUT_MEDIAN = 180
SHAREGPT_SIGMA = 1.0
SHAREGPT_MIN_LEN = 4

WORDS = tuple(
    """the of and to in is that for it as was with be by on not he this are or his from at which but have an had
    they you were their one all we can her has there been if more when will would who so no time people year way
    day man world life hand part place case week work number water house city home book game music light night name
    story road team table river market power money school family system problem question small large good new old
    great high long little right early young public open red blue green black white make know take see come think
    look want give use find tell ask call keep show hear play run move live write read learn change follow stop
    start turn bring hold stand point door car food tree sun sea land air fire war head eye face word line
    side end""".split()
)


@dataclass(frozen=True)
class BenchRequest:
    """One benchmark prompt and how many tokens to generate for it. `input_len` is exact for token-id prompts
    and the word count (approximately the token count) for text prompts."""

    prompt: list[int] | str
    input_len: int
    output_len: int


def random_requests(
    num_prompts: int,
    input_len: int,
    output_len: int,
    range_ratio: float = 0.0,
    seed: int = 0,
    vocab_size: int | None = None,
) -> list[BenchRequest]:
    """vLLM's random dataset: input and output lengths uniform in [len * (1 - range_ratio), len * (1 + range_ratio)]
    (at least 1), prompts drawn at random (token ids in [min(100, vocab_size // 2), vocab_size), or words)."""
    if not 0 <= range_ratio < 1:
        raise ValueError(f"range_ratio must be in [0, 1), got {range_ratio}")
    rng = np.random.default_rng(seed)
    input_lens = _uniform_lengths(rng, input_len, range_ratio, num_prompts)
    output_lens = _uniform_lengths(rng, output_len, range_ratio, num_prompts)
    return [_request(rng, n, m, vocab_size) for n, m in zip(input_lens, output_lens)]


def sharegpt_like_requests(
    num_prompts: int,
    seed: int = 0,
    vocab_size: int | None = None,
    max_input_len: int = 1024,
    max_output_len: int = 1024,
) -> list[BenchRequest]:
    """A synthetic stand-in for the ShareGPT conversations of vLLM's `sharegpt` dataset (nothing is downloaded):
    lognormal input lengths with median 100 tokens and output lengths with median 180, both with log-sigma 1.0,
    rounded and clipped to [4, max_input_len] and [4, max_output_len]. The prompts are random as in
    `random_requests`."""
    rng = np.random.default_rng(seed)
    input_lens = _lognormal_lengths(rng, SHAREGPT_INPUT_MEDIAN, max_input_len, num_prompts)
    output_lens = _lognormal_lengths(rng, SHAREGPT_OUTPUT_MEDIAN, max_output_len, num_prompts)
    return [_request(rng, n, m, vocab_size) for n, m in zip(input_lens, output_lens)]


def random_prompt(rng: np.random.Generator, length: int, vocab_size: int | None) -> list[int] | str:
    """`length` random token ids below `vocab_size`, or `length` random words when it is None."""
    if vocab_size is None:
        return " ".join(rng.choice(WORDS, size=length).tolist())
    low = min(MIN_RANDOM_TOKEN_ID, vocab_size // 2)
    return rng.integers(low, vocab_size, size=length).tolist()


def _request(rng: np.random.Generator, input_len: int, output_len: int, vocab_size: int | None) -> BenchRequest:
    return BenchRequest(random_prompt(rng, input_len, vocab_size), input_len, output_len)


def _uniform_lengths(rng: np.random.Generator, length: int, range_ratio: float, count: int) -> list[int]:
    low = max(1, math.floor(length * (1 - range_ratio)))
    high = max(low, math.ceil(length * (1 + range_ratio)))
    return rng.integers(low, high + 1, size=count).tolist()


def _lognormal_lengths(rng: np.random.Generator, median: float, max_len: int, count: int) -> list[int]:
    lengths = np.rint(rng.lognormal(math.log(median), SHAREGPT_SIGMA, size=count))
    return np.clip(lengths, SHAREGPT_MIN_LEN, max_len).astype(int).tolist()
