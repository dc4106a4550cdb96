"""Per-request output state: incremental text, stop conditions, logprobs, and the outputs the caller sees.

Stop rules follow vLLM V1: the length cap is checked first, then (once `min_tokens` are out) EOS and
`stop_token_ids`; the detokenized text is then searched for stop strings, which end the sequence with the
text cut before the match (or after it, with `include_stop_str_in_output`). While a sequence runs, the last
`max(len(stop)) - 1` characters are held back from streamed text, since a stop string may still start there.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from .outputs import CompletionOutput, Logprob, RequestOutput, TokenLogprobs
from .sampling_params import RequestOutputKind, SamplingParams
from .sequence import Sequence
from .tokenizer import IncrementalDetokenizer, Tokenizer


@dataclasses.dataclass
class RowResult:
    """One logits row read back from the device."""

    token: int
    logprob: float
    rank: int
    top_ids: np.ndarray
    top_logprobs: np.ndarray


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


class SequenceOutput:
    def __init__(self, seq: Sequence, detokenizer: IncrementalDetokenizer):
        self.seq = seq
        self.detokenizer = detokenizer
        self.text = ""
        self.logprobs: list[TokenLogprobs] | None = [] if seq.params.logprobs is not None else None
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
        return len(self.text) if self.finished else max(0, len(self.text) - self.seq.params.stop_holdback)


class RequestState:
    def __init__(
        self,
        request_id: str,
        prompt: str | None,
        seqs: list[Sequence],
        tokenizer: Tokenizer,
        eos_token_id: int | None,
        max_model_len: int,
    ):
        self.request_id = request_id
        self.prompt = prompt
        self.params: SamplingParams = seqs[0].params
        self.prompt_token_ids = seqs[0].token_ids[: seqs[0].num_prompt_tokens]
        self.tokenizer = tokenizer
        self.eos_token_id = eos_token_id
        self.max_model_len = max_model_len
        self.seqs = seqs
        self.outputs = [
            SequenceOutput(
                s,
                tokenizer.detokenizer(
                    self.prompt_token_ids, self.params.skip_special_tokens, self.params.spaces_between_special_tokens
                ),
            )
            for s in seqs
        ]
        self.prompt_logprobs: list[TokenLogprobs | None] | None = (
            [None] if self.params.prompt_logprobs is not None else None
        )
        self.prompt_logprobs_sent = False

    @property
    def finished(self) -> bool:
        return all(o.finished for o in self.outputs)

    def add_prompt_logprob(self, result: RowResult) -> None:
        self.prompt_logprobs.append(self._logprob_entry(result, self.params.prompt_logprobs))

    def add_token(self, seq: Sequence, result: RowResult) -> bool:
        """Record a sampled token (already appended to `seq`); returns True when the sequence finished."""
        out = self.outputs[seq.index]
        params = seq.params
        token = result.token
        if out.logprobs is not None:
            out.logprobs.append(self._logprob_entry(result, params.logprobs))
            out.cumulative_logprob += result.logprob

        num_outputs = len(seq.token_ids) - seq.num_prompt_tokens  # those the host has: the next step's is pending
        if len(seq.token_ids) >= self.max_model_len or num_outputs >= seq.max_tokens:
            out.finish_reason = "length"
        elif num_outputs >= params.min_tokens:
            if not params.ignore_eos and token == self.eos_token_id:
                out.finish_reason = "stop"
            elif token in params.stop_token_ids:
                out.finish_reason, out.stop_reason = "stop", token

        if out.finish_reason != "stop" or params.include_stop_str_in_output:
            new_text = out.detokenizer.step(token)
            out.text += new_text
            if params.stop and num_outputs > params.min_tokens:
                match = check_stop_strings(out.text, len(new_text), params.stop, params.include_stop_str_in_output)
                if match is not None:
                    stop, cut = match
                    if cut != -1:
                        out.text = out.text[:cut]
                    out.finish_reason, out.stop_reason = "stop", stop
        return out.finished

    def abort(self) -> None:
        for out in self.outputs:
            if not out.finished:
                out.finish_reason = "abort"

    def take_output(self) -> RequestOutput | None:
        """The output to hand out now under the request's output kind, or None if there is nothing new."""
        kind = self.params.output_kind
        if kind is RequestOutputKind.FINAL_ONLY and not self.finished:
            return None
        delta = kind is RequestOutputKind.DELTA
        completions = []
        for out in self.outputs:
            visible = out.visible_chars()
            num_tokens = len(out.seq.token_ids) - out.seq.num_prompt_tokens
            changed = num_tokens > out.sent_tokens or visible > out.sent_chars or (out.finished and not out.final_sent)
            if delta and not changed:
                continue
            text_from, tokens_from = (out.sent_chars, out.sent_tokens) if delta else (0, 0)
            completions.append(
                CompletionOutput(
                    index=out.seq.index,
                    text=out.text[text_from:visible],
                    token_ids=out.seq.output_token_ids[tokens_from:],
                    cumulative_logprob=out.cumulative_logprob if out.logprobs is not None else None,
                    logprobs=out.logprobs[tokens_from:] if out.logprobs is not None else None,
                    finish_reason=out.finish_reason,
                    stop_reason=out.stop_reason,
                )
            )
            out.sent_chars, out.sent_tokens = max(out.sent_chars, visible), num_tokens
            out.final_sent = out.finished
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
        )

    def _logprob_entry(self, result: RowResult, num_top: int) -> TokenLogprobs:
        skip = self.params.skip_special_tokens
        entry = {result.token: Logprob(result.logprob, result.rank, self.tokenizer.token_text(result.token, skip))}
        for rank, (token, logprob) in enumerate(zip(result.top_ids[:num_top], result.top_logprobs[:num_top]), 1):
            token = int(token)
            if token not in entry:
                entry[token] = Logprob(float(logprob), rank, self.tokenizer.token_text(token, skip))
        return entry
