"""The front end's side of a request's outputs (vLLM's OutputProcessor): incremental text, stop strings,
logprob entries and the `RequestOutput`s the caller sees, built from the engine core's token-level outputs.

The engine core decides what depends only on token ids: the length cap first, then (once `min_tokens` are out)
EOS and `stop_token_ids`. Here the detokenized text is searched for stop strings, which end the sample with
the text cut before the match (or after it, with `include_stop_str_in_output`); the core is then told to
finish that sample, and tokens it produced meanwhile are dropped, so they are never visible. While a sample
runs, the last `max(len(stop)) - 1` characters are held back from streamed text, since a stop string may still
start there.

`AsyncEngine` runs this in the event loop's thread, off the engine's step loop; `LLMEngine.step()` runs it
after each core step for offline callers.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from .outputs import CompletionOutput, Logprob, RequestOutput, RequestStateStats, TokenLogprobs
from .request import EngineRequest
from .sampling_params import RequestOutputKind, SamplingParams
from .tokenizer import IncrementalDetokenizer, Tokenizer


@dataclasses.dataclass
class RowResult:
    """One logits row read back from the device."""

    token: int
    logprob: float
    rank: int
    top_ids: np.ndarray
    top_logprobs: np.ndarray


@dataclasses.dataclass
class EngineCoreOutput:
    """What one step did for one sample of a request: its new tokens (with their logprob rows, when the request
    asked for logprobs), prompt-logprob rows, and how the core finished it, if it did."""

    request_id: str
    index: int
    new_token_ids: list[int] = dataclasses.field(default_factory=list)
    new_logprobs: list[RowResult] = dataclasses.field(default_factory=list)
    new_prompt_logprobs: list[RowResult] = dataclasses.field(default_factory=list)
    finish_reason: str | None = None  # "length", "stop" (EOS or a stop token) or "abort"
    stop_reason: int | None = None  # the stop token id, if one ended it
    grammar_complete: bool = False  # "stop" because its structured output is complete (its last token is text)
    num_cached_tokens: int | None = None  # prompt tokens that came from the prefix cache
    stats: RequestStateStats | None = None  # the request's timeline in the core (shared, updated by the core)
    timestamp: float | None = None  # when the step's tokens reached the host (time.monotonic())

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


def check_stop_strings(text: str, new_chars: int, stops: list[str], include: bool) -> tuple[str, int] | None:
    """(matched stop string, where to cut the text, or -1 for no cut) for a match overlapping the new chars."""
    if not new_chars:
        return None
    for stop in stops:
        index = text.find(stop, 1 - new_chars - len(stop))
        if index == -1:
            continue
        if include:
            index += len(stop)
            if index >= len(text):
                return stop, -1
        return stop, index
    return None


class SampleState:
    """One of a request's n samples as the caller sees it."""

    def __init__(self, index: int, detokenizer: IncrementalDetokenizer, params: SamplingParams):
        self.index = index
        self.detokenizer = detokenizer
        self.params = params
        self.token_ids: list[int] = []
        self.text = ""
        self.logprobs: list[TokenLogprobs] | None = [] if params.logprobs is not None else None
        self.cumulative_logprob = 0.0
        self.finish_reason: str | None = None
        self.stop_reason: int | str | None = None
        self.sent_chars = 0
        self.sent_tokens = 0
        self.final_sent = False

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def visible_chars(self) -> int:
        return len(self.text) if self.finished else max(0, len(self.text) - self.params.stop_holdback)


class RequestState:
    def __init__(
        self,
        request_id: str,
        prompt: str | None,
        prompt_token_ids: list[int],
        params: SamplingParams,
        tokenizer: Tokenizer,
    ):
        self.request_id = request_id
        self.prompt = prompt
        self.prompt_token_ids = prompt_token_ids
        self.params = params
        self.tokenizer = tokenizer
        self.samples = [
            SampleState(
                i,
                tokenizer.detokenizer(
                    prompt_token_ids, params.skip_special_tokens, params.spaces_between_special_tokens
                ),
                params,
            )
            for i in range(params.n)
        ]
        self.prompt_logprobs: list[TokenLogprobs | None] | None = [None] if params.prompt_logprobs is not None else None
        self.prompt_logprobs_sent = False
        self.num_cached_tokens: int | None = None
        self.core_stats: RequestStateStats | None = None
        # when the first and the last token the caller sees reached the host (tokens past a stop string do not count)
        self.first_token_ts: float | None = None
        self.last_token_ts: float | None = None

    @classmethod
    def of(cls, request: EngineRequest, tokenizer: Tokenizer) -> RequestState:
        return cls(request.request_id, request.prompt, request.prompt_token_ids, request.params, tokenizer)

    @property
    def finished(self) -> bool:
        return all(s.finished for s in self.samples)

    def add(self, core: EngineCoreOutput) -> bool:
        """Take a core output of this request; returns True when a stop string ended a sample that the core
        still runs (the caller must have the core finish it)."""
        if core.index == 0 and core.num_cached_tokens is not None:
            self.num_cached_tokens = core.num_cached_tokens
        if core.stats is not None:
            self.core_stats = core.stats
        for row in core.new_prompt_logprobs:
            self.prompt_logprobs.append(self._logprob_entry(row, self.params.prompt_logprobs))
        sample = self.samples[core.index]
        if sample.finished and core.new_token_ids:
            return False  # tokens past a stop string, made before the core heard of it
        last = len(core.new_token_ids) - 1
        for i, token in enumerate(core.new_token_ids):
            if sample.finished:
                break  # the rest are past the stop string this output's tokens ended with
            row = core.new_logprobs[i] if core.new_logprobs else None
            self._add_token(sample, token, row, core if i == last and core.finished else None)
        if core.new_token_ids and core.timestamp is not None:
            if self.first_token_ts is None:
                self.first_token_ts = core.timestamp
            self.last_token_ts = core.timestamp
        if core.finished and not sample.finished:
            sample.finish_reason = core.finish_reason  # aborted before any token
        return sample.finished and not core.finished

    def _add_token(self, sample: SampleState, token: int, row: RowResult | None, ended: EngineCoreOutput | None):
        """One token; `ended` is the core output that finished the sample with it, if any."""
        params = self.params
        sample.token_ids.append(token)
        if sample.logprobs is not None and row is not None:
            sample.logprobs.append(self._logprob_entry(row, params.logprobs))
            sample.cumulative_logprob += row.logprob
        if ended is not None:
            sample.finish_reason, sample.stop_reason = ended.finish_reason, ended.stop_reason
            if ended.finish_reason == "stop" and not ended.grammar_complete and not params.include_stop_str_in_output:
                return  # the EOS or stop token's text is not shown
        new_text = sample.detokenizer.step(token)
        sample.text += new_text
        if params.stop and len(sample.token_ids) > params.min_tokens:
            match = check_stop_strings(sample.text, len(new_text), params.stop, params.include_stop_str_in_output)
            if match is not None:
                stop, cut = match
                if cut != -1:
                    sample.text = sample.text[:cut]
                sample.finish_reason, sample.stop_reason = "stop", stop

    def abort(self) -> None:
        for sample in self.samples:
            if not sample.finished:
                sample.finish_reason = "abort"

    def take_output(self) -> RequestOutput | None:
        """The output to hand out now under the request's output kind, or None if there is nothing new."""
        kind = self.params.output_kind
        if kind is RequestOutputKind.FINAL_ONLY and not self.finished:
            return None
        delta = kind is RequestOutputKind.DELTA
        completions = []
        for sample in self.samples:
            visible = sample.visible_chars()
            num_tokens = len(sample.token_ids)
            changed = (
                num_tokens > sample.sent_tokens
                or visible > sample.sent_chars
                or (sample.finished and not sample.final_sent)
            )
            if delta and not changed:
                continue
            text_from, tokens_from = (sample.sent_chars, sample.sent_tokens) if delta else (0, 0)
            completions.append(
                CompletionOutput(
                    index=sample.index,
                    text=sample.text[text_from:visible],
                    token_ids=sample.token_ids[tokens_from:],
                    cumulative_logprob=sample.cumulative_logprob if sample.logprobs is not None else None,
                    logprobs=sample.logprobs[tokens_from:] if sample.logprobs is not None else None,
                    finish_reason=sample.finish_reason,
                    stop_reason=sample.stop_reason,
                )
            )
            sample.sent_chars, sample.sent_tokens = max(sample.sent_chars, visible), num_tokens
            sample.final_sent = sample.finished
        if not completions:
            return None
        prompt_logprobs = self.prompt_logprobs
        if delta and self.prompt_logprobs_sent:
            prompt_logprobs = None
        self.prompt_logprobs_sent = self.prompt_logprobs_sent or prompt_logprobs is not None
        return RequestOutput(
            request_id=self.request_id,
            prompt=self.prompt,
            prompt_token_ids=self.prompt_token_ids,
            prompt_logprobs=prompt_logprobs,
            outputs=completions,
            finished=self.finished,
            num_cached_tokens=self.num_cached_tokens,
            metrics=self.metrics() if self.finished else None,
        )

    def metrics(self) -> RequestStateStats | None:
        """The request's timeline now: the core's (queued, first scheduled, preemptions) with the times its first
        and last visible tokens reached the host."""
        if self.core_stats is None:
            return None
        return dataclasses.replace(
            self.core_stats, first_token_ts=self.first_token_ts, last_token_ts=self.last_token_ts
        )

    def _logprob_entry(self, result: RowResult, num_top: int) -> TokenLogprobs:
        """The chosen token and the `num_top` most likely ones (-1: every one the step returned)."""
        skip = self.params.skip_special_tokens
        num_top = len(result.top_ids) if num_top == -1 else num_top
        entry = {result.token: Logprob(result.logprob, result.rank, self.tokenizer.token_text(result.token, skip))}
        for rank, (token, logprob) in enumerate(zip(result.top_ids[:num_top], result.top_logprobs[:num_top]), 1):
            token = int(token)
            if token not in entry:
                entry[token] = Logprob(float(logprob), rank, self.tokenizer.token_text(token, skip))
        return entry


class OutputProcessor:
    """The request states of one front end; `process` turns a core step's outputs into RequestOutputs."""

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self.requests: dict[str, RequestState] = {}

    def add_request(self, request: EngineRequest) -> None:
        self.requests[request.request_id] = RequestState.of(request, self.tokenizer)

    def abort_request(self, request_id: str) -> None:
        self.requests.pop(request_id, None)

    def process(self, core_outputs: list[EngineCoreOutput]) -> tuple[list[RequestOutput], list[tuple[str, int]]]:
        """(the outputs to hand out, the (request id, sample index) pairs that stop strings ended and the core
        must finish)."""
        touched: dict[str, RequestState] = {}
        to_finish = []
        for core in core_outputs:
            state = self.requests.get(core.request_id)
            if state is None:
                continue
            if state.add(core):
                to_finish.append((core.request_id, core.index))
            touched[core.request_id] = state
        outputs = []
        for request_id, state in touched.items():
            output = state.take_output()
            if output is not None:
                outputs.append(output)
            if state.finished:
                del self.requests[request_id]
        return outputs, to_finish
