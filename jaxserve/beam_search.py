"""Beam search on top of the engine, as vLLM runs it: each step asks the engine for one token of every live
beam, with its top logprobs, and keeps the best continuations. A beam is an ordinary request whose prompt is
the original prompt plus the beam's tokens, so beams that share a prefix share its KV pages through the prefix
cache (reference counts, no copy per beam); only the last, partly filled page of each beam is computed again.

The selection and stopping rules are HF transformers' (`generate(num_beams=..., length_penalty=...,
early_stopping=...)`), so both return the same tokens:

- each step ranks the top `2 * beam_width` continuations of all live beams by cumulative logprob;
- a continuation that ends in EOS, or reaches `max_tokens`, finishes only if it ranks among the first
  `beam_width`, with score `cumulative logprob / generated_length ** length_penalty` (the EOS counted);
- the best `beam_width` continuations that do not finish live on;
- the search stops when every continuation finishes, or when the finished set is full and either
  `early_stopping` is true or (`early_stopping` false) the best live beam, scored at its current length,
  cannot beat the worst finished one. `early_stopping="never"` scores it at `max_tokens` when
  `length_penalty` > 0.
"""

from __future__ import annotations

import dataclasses
import heapq
from collections.abc import Callable, Sequence

from .outputs import CompletionOutput, RequestOutput
from .sampling_params import RequestOutputKind, SamplingParams
from .tokenizer import Tokenizer


@dataclasses.dataclass(frozen=True)
class BeamSearchParams:
    """vLLM's beam search parameters (`beam_width` is the request's `n`)."""

    beam_width: int
    max_tokens: int
    ignore_eos: bool = False
    length_penalty: float = 1.0
    early_stopping: bool | str = False  # True, False or "never", as in HF transformers
    include_stop_str_in_output: bool = False

    def __post_init__(self) -> None:
        if self.beam_width < 1:
            raise ValueError(f"beam_width must be at least 1, got {self.beam_width}.")
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be at least 1, got {self.max_tokens}.")
        if self.early_stopping not in (True, False, "never"):
            raise ValueError(f"early_stopping must be true, false or 'never', got {self.early_stopping!r}.")


@dataclasses.dataclass
class Beam:
    tokens: list[int]  # generated so far
    cum_logprob: float
    score: float = 0.0  # finished beams: cum_logprob / length ** length_penalty


class BeamSearch:
    """The beam search of one prompt: `live` beams to extend, `advance` with each one's top continuations."""

    def __init__(self, params: BeamSearchParams, eos_token_ids: Sequence[int]):
        self.params = params
        self.eos = set() if params.ignore_eos else set(eos_token_ids)
        # continuations ranked per step (HF's `beams_to_keep`): enough that beam_width survive every EOS
        self.num_candidates = max(2, 1 + len(self.eos)) * params.beam_width
        self.live: list[Beam] = [Beam([], 0.0)]
        self.finished: list[Beam] = []  # at most beam_width, best first
        self._improvable = True
        self.done = False

    def advance(self, continuations: Sequence[Sequence[tuple[int, float]]]) -> None:
        """`continuations[b]`: (token, logprob) pairs of live beam b, at least `num_candidates` of them or all
        its vocabulary."""
        p = self.params
        candidates = heapq.nlargest(
            self.num_candidates,
            ((beam.cum_logprob + logprob, b, token) for b, beam in enumerate(self.live) for token, logprob in
             continuations[b]),
            key=lambda c: c[0],
        )  # fmt: skip
        length = len(self.live[0].tokens) + 1
        at_limit = length >= p.max_tokens
        stops = [at_limit or token in self.eos for _, _, token in candidates]
        full_and_stopping = len(self.finished) == p.beam_width and p.early_stopping is True
        if self._improvable and not full_and_stopping:
            for rank, ((cum, b, token), stop) in enumerate(zip(candidates, stops)):
                if stop and rank < p.beam_width:
                    self._finish(Beam(self.live[b].tokens + [token], cum, cum / length**p.length_penalty))
        self.live = [
            Beam(self.live[b].tokens + [token], cum) for (cum, b, token), stop in zip(candidates, stops) if not stop
        ][: p.beam_width]
        if all(stops) or not self.live:
            self.done = True
            return
        if len(self.finished) == p.beam_width:
            best_length = p.max_tokens if p.early_stopping == "never" and p.length_penalty > 0 else length
            best_possible = self.live[0].cum_logprob / best_length**p.length_penalty
            self._improvable = self._improvable and best_possible > self.finished[-1].score
            self.done = not self._improvable or p.early_stopping is True

    def _finish(self, beam: Beam) -> None:
        self.finished.append(beam)
        self.finished.sort(key=lambda b: b.score, reverse=True)
        del self.finished[self.params.beam_width :]

    def best(self, n: int) -> list[Beam]:
        """The `n` best finished beams, best first."""
        return self.finished[:n]


def clamped(params: BeamSearchParams, prompt_length: int, max_model_len: int) -> BeamSearchParams:
    """`params` with max_tokens cut to what the context leaves after the prompt."""
    return dataclasses.replace(params, max_tokens=max(1, min(params.max_tokens, max_model_len - prompt_length)))


def step_params(search: BeamSearch) -> SamplingParams:
    """One greedy token with the top logprobs a step ranks."""
    return SamplingParams(
        temperature=0, max_tokens=1, logprobs=search.num_candidates, ignore_eos=True,
        output_kind=RequestOutputKind.FINAL_ONLY,
    )  # fmt: skip


def continuations(output: RequestOutput) -> list[tuple[int, float]]:
    """The (token, raw logprob) pairs of a one-token beam request."""
    (entry,) = output.outputs[0].logprobs
    return [(token, logprob.logprob) for token, logprob in entry.items()]


@dataclasses.dataclass
class BeamSearchSequence:
    """A finished beam, as vLLM returns it: `tokens` include the prompt; `text` is the generated part's,
    without a final EOS."""

    tokens: list[int]
    cum_logprob: float
    text: str
    finish_reason: str  # "stop" (EOS) or "length"
    score: float  # what the beams are ranked by: cum_logprob / generated_length ** length_penalty


@dataclasses.dataclass
class BeamSearchOutput:
    sequences: list[BeamSearchSequence]  # best first, beam_width of them


def search_output(
    prompt_token_ids: list[int], search: BeamSearch, tokenizer: Tokenizer, skip_special_tokens: bool = True
) -> BeamSearchOutput:
    sequences = []
    for beam in search.best(search.params.beam_width):
        ended = bool(beam.tokens) and beam.tokens[-1] in search.eos
        text = tokenizer.decode(beam.tokens[:-1] if ended else beam.tokens, skip_special_tokens=skip_special_tokens)
        finish = "stop" if ended else "length"
        sequences.append(BeamSearchSequence(prompt_token_ids + beam.tokens, beam.cum_logprob, text, finish, beam.score))
    return BeamSearchOutput(sequences)


def as_request_output(
    request_id: str, prompt: str | None, prompt_token_ids: list[int], output: BeamSearchOutput
) -> RequestOutput:
    """The beams as one finished request with a completion per beam, for the OpenAI routes."""
    completions = [
        CompletionOutput(
            index=i,
            text=seq.text,
            token_ids=seq.tokens[len(prompt_token_ids) :],
            cumulative_logprob=seq.cum_logprob,
            logprobs=None,
            finish_reason=seq.finish_reason,
        )
        for i, seq in enumerate(output.sequences)
    ]
    return RequestOutput(request_id, prompt, prompt_token_ids, None, completions, finished=True)


def run_beam_searches(
    searches: Sequence[tuple[list[int], BeamSearch]],
    score: Callable[[list[list[int]], SamplingParams], list[RequestOutput]],
) -> None:
    """Run (prompt, search) pairs to the end together: each round scores the live beams of every unfinished
    search with one call of `score(prompts, params)`, which runs those one-token requests on the engine."""
    while active := [(prompt, search) for prompt, search in searches if not search.done]:
        sampling = step_params(active[0][1])
        outputs = iter(score([prompt + beam.tokens for prompt, search in active for beam in search.live], sampling))
        for _, search in active:
            search.advance([continuations(next(outputs)) for _ in search.live])
