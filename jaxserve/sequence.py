"""One sequence being generated: its tokens, its progress through the model and its cache pages."""

from __future__ import annotations

import dataclasses
import enum
from typing import TYPE_CHECKING

import numpy as np

from .outputs import RequestStateStats
from .pooling_params import PoolingParams
from .sampling_params import SamplingParams

if TYPE_CHECKING:
    from .structured_outputs import Matcher


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclasses.dataclass(eq=False)
class Sequence:
    """`token_ids` is the prompt followed by the outputs the host has; `num_pending_tokens` more were sampled by
    dispatched steps and not yet read back. `num_computed_tokens` of all of them are in the cache.

    A preempted sequence drops its pages and starts again from token 0: its outputs so far are recomputed
    as part of its "prompt", which is why everything here is counted over `token_ids`.
    """

    seq_id: int
    request_id: str
    index: int  # which of the request's n samples
    token_ids: list[int]
    num_prompt_tokens: int
    params: SamplingParams | PoolingParams
    seed: int
    max_tokens: int  # the output cap after clamping to the context
    wants_prompt_logprobs: bool = False
    priority: int = 0  # lower runs first under the priority policy
    cache_salt: str | None = None  # joins the first page's hash: only requests with the same salt share pages
    leader: Sequence | None = None  # sample 0 of the request, whose prompt pages the other n - 1 samples share
    reads_prefix_cache: bool = True  # cached pages may stand in for computing its prompt
    chunkable: bool = True  # its prompt may be computed over several steps (else in one)
    status: SequenceStatus = SequenceStatus.WAITING
    num_computed_tokens: int = 0
    num_pending_tokens: int = 0
    num_prompt_logprobs_done: int = 0  # positions whose next-token logprob has been collected
    pages: list[int] = dataclasses.field(default_factory=list)
    slot: int = -1  # row of the per-sequence penalty state on the device
    page_hashes: list[int] = dataclasses.field(default_factory=list)  # of the full pages of token_ids
    num_registered_pages: int = 0  # pages offered to the prefix cache since the sequence (re)started
    num_released_pages: int = 0  # leading pages behind every layer's sliding window, given back to the pool
    num_cached_tokens: int | None = None  # prompt tokens the prefix cache held when it was first scheduled
    matcher: Matcher | None = None  # structured outputs: where its output stands in its grammar
    # an encoder-decoder's (Whisper's): the encoder input (log-mel features), and the cache pages that hold its
    # encoding's cross-attention keys and values, filled (`encoded`) before its first decoder step
    encoder_input: np.ndarray | None = None
    cross_pages: list[int] = dataclasses.field(default_factory=list)
    encoded: bool = False
    # the request's timeline (queued, first scheduled) and preemptions, shared by its samples
    stats: RequestStateStats = dataclasses.field(default_factory=RequestStateStats)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids) + self.num_pending_tokens

    @property
    def num_output_tokens(self) -> int:
        return self.num_tokens - self.num_prompt_tokens

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]

    @property
    def num_uncomputed_tokens(self) -> int:
        return self.num_tokens - self.num_computed_tokens

    def prompt_logprob_positions(self, start: int, length: int) -> range:
        """Positions in [start, start + length) whose next prompt token still needs its logprob."""
        if not self.wants_prompt_logprobs:
            return range(0)
        lo = max(start, self.num_prompt_logprobs_done)
        return range(lo, max(lo, min(start + length, self.num_prompt_tokens - 1)))
