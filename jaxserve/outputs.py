"""What the engine returns, shaped like vLLM's `RequestOutput` / `CompletionOutput` / `Logprob`."""

from __future__ import annotations

import dataclasses
import time

import numpy as np


@dataclasses.dataclass
class Logprob:
    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


# one dict per token: the chosen token and the top alternatives, by token id
TokenLogprobs = dict[int, Logprob]


@dataclasses.dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: float | None
    logprobs: list[TokenLogprobs] | None
    finish_reason: str | None = None  # "stop", "length" or "abort"
    stop_reason: int | str | None = None  # the stop string or stop token id that ended it; None for EOS

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclasses.dataclass
class RequestStateStats:
    """A request's timeline in the engine, as vLLM's `RequestStateStats` keeps it: `time.monotonic()` seconds when
    the engine core queued it, first scheduled it (preemptions do not reset this), and when its first and last
    output tokens (a pooled output counts as both) reached the host; and how often it was preempted (over all its
    samples). Handed out on a finished output as `metrics`."""

    queued_ts: float = dataclasses.field(default_factory=time.monotonic)
    scheduled_ts: float | None = None
    first_token_ts: float | None = None
    last_token_ts: float | None = None
    num_preemptions: int = 0

    @property
    def queue_time(self) -> float | None:
        """Queued until first scheduled (vLLM's WAITING phase)."""
        return None if self.scheduled_ts is None else self.scheduled_ts - self.queued_ts

    @property
    def prefill_time(self) -> float | None:
        """First scheduled until the first token."""
        if self.scheduled_ts is None or self.first_token_ts is None:
            return None
        return self.first_token_ts - self.scheduled_ts

    @property
    def decode_time(self) -> float | None:
        """The first token until the last."""
        if self.first_token_ts is None or self.last_token_ts is None:
            return None
        return self.last_token_ts - self.first_token_ts

    @property
    def inference_time(self) -> float | None:
        """First scheduled until the last token (vLLM's RUNNING phase: prefill and decode)."""
        if self.scheduled_ts is None or self.last_token_ts is None:
            return None
        return self.last_token_ts - self.scheduled_ts


@dataclasses.dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    prompt_logprobs: list[TokenLogprobs | None] | None
    outputs: list[CompletionOutput]
    finished: bool
    num_cached_tokens: int | None = None  # prompt tokens taken from the prefix cache (vLLM's field)
    metrics: RequestStateStats | None = None  # on the finished output: the request's engine timeline


@dataclasses.dataclass
class PoolingOutput:
    """The pooled result: [dim] for sequence tasks, [num_tokens, dim] for token tasks."""

    data: np.ndarray


@dataclasses.dataclass
class PoolingRequestOutput:
    request_id: str
    prompt_token_ids: list[int]
    outputs: PoolingOutput
    task: str
    finished: bool = True
    metrics: RequestStateStats | None = None  # the request's engine timeline (its pooled output is its one token)


@dataclasses.dataclass
class EmbeddingOutput:
    embedding: list[float]


@dataclasses.dataclass
class ClassificationOutput:
    probs: list[float]
    label: str | None = None

    @property
    def num_classes(self) -> int:
        return len(self.probs)


@dataclasses.dataclass
class ScoringOutput:
    score: float


@dataclasses.dataclass
class EmbeddingRequestOutput:
    request_id: str
    prompt_token_ids: list[int]
    outputs: EmbeddingOutput


@dataclasses.dataclass
class ClassificationRequestOutput:
    request_id: str
    prompt_token_ids: list[int]
    outputs: ClassificationOutput


@dataclasses.dataclass
class ScoringRequestOutput:
    request_id: str
    prompt_token_ids: list[int]
    outputs: ScoringOutput
