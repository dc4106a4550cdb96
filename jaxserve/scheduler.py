"""Continuous batching under one token budget (vLLM V1 style, DESIGN.md §3).

Each step takes decode tokens first, then chunks of unfinished prefills, then new requests, until the token
budget, the sequence cap or the logits-row cap is reached. A running sequence that needs a page when none is
free preempts the newest running sequence, which drops its pages and is recomputed later: no request fails
for lack of pages. New requests are only admitted when their pages are free.
"""

from __future__ import annotations

import dataclasses
from collections import deque

from .kv_pages import PageAllocator
from .sequence import Sequence, SequenceStatus


@dataclasses.dataclass(frozen=True)
class SchedulerConfig:
    max_num_seqs: int
    max_num_batched_tokens: int


@dataclasses.dataclass
class ScheduledChunk:
    """`length` tokens of `seq` starting at `start`; `sample` when the chunk ends at the sequence's last token."""

    seq: Sequence
    start: int
    length: int
    sample: bool
    prompt_logprob_positions: range

    @property
    def num_rows(self) -> int:
        return len(self.prompt_logprob_positions) + int(self.sample)


@dataclasses.dataclass
class StepPlan:
    chunks: list[ScheduledChunk]

    @property
    def num_tokens(self) -> int:
        return sum(c.length for c in self.chunks)

    @property
    def num_rows(self) -> int:
        return sum(c.num_rows for c in self.chunks)


class Scheduler:
    def __init__(self, config: SchedulerConfig, allocator: PageAllocator):
        self.config = config
        self.allocator = allocator
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self._free_slots = list(range(config.max_num_seqs - 1, -1, -1))
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> StepPlan | None:
        budget = _Budget(self.config.max_num_batched_tokens, self.config.max_num_seqs)
        chunks: list[ScheduledChunk] = []
        preemptions = self.num_preemptions
        decoding = [s for s in self.running if s.num_uncomputed_tokens == 1]
        prefilling = [s for s in self.running if s.num_uncomputed_tokens > 1]
        for seq in decoding + prefilling:
            if seq.status is not SequenceStatus.RUNNING:
                continue
            chunk = self._chunk(seq, budget)
            if chunk and self._reserve_pages_preempting(seq, chunk):
                budget.take(chunk)
                chunks.append(chunk)
        # a sequence preempted in this step may have been scheduled before it was chosen as the victim
        chunks = [c for c in chunks if c.seq.status is SequenceStatus.RUNNING]
        if self.num_preemptions == preemptions:
            self._admit(chunks, budget)
        return StepPlan(chunks) if chunks else None

    def _admit(self, chunks: list[ScheduledChunk], budget: _Budget) -> None:
        while self.waiting and len(self.running) < self.config.max_num_seqs:
            seq = self.waiting[0]
            chunk = self._chunk(seq, budget)
            if chunk is None or not self._reserve_pages(seq, chunk):
                return
            self.waiting.popleft()
            seq.status = SequenceStatus.RUNNING
            seq.slot = self._free_slots.pop()
            self.running.append(seq)
            budget.take(chunk)
            chunks.append(chunk)

    def commit(self, plan: StepPlan) -> None:
        """Record that the plan ran: its tokens are now in the cache."""
        for chunk in plan.chunks:
            chunk.seq.num_computed_tokens = chunk.start + chunk.length
            chunk.seq.num_prompt_logprobs_done = max(
                chunk.seq.num_prompt_logprobs_done, chunk.prompt_logprob_positions.stop
            )

    def finish(self, seq: Sequence) -> None:
        if seq.status is SequenceStatus.FINISHED:
            return
        if seq.status is SequenceStatus.RUNNING:
            self.running.remove(seq)
            self._release(seq)
        else:
            self.waiting.remove(seq)
        seq.status = SequenceStatus.FINISHED

    def _chunk(self, seq: Sequence, budget: _Budget) -> ScheduledChunk | None:
        start = seq.num_computed_tokens
        length = min(seq.num_uncomputed_tokens, budget.tokens)
        if _rows(seq, start, length) > budget.rows:
            # only prompt-logprob rows can overflow: end the chunk where they fill the rows left
            first = max(start, seq.num_prompt_logprobs_done)
            length = min(length, first - start + budget.rows)
            if start + length == seq.num_tokens:
                length -= 1
        if length <= 0:
            return None
        return ScheduledChunk(
            seq, start, length, start + length == seq.num_tokens, seq.prompt_logprob_positions(start, length)
        )

    def _pages_missing(self, seq: Sequence, chunk: ScheduledChunk) -> int:
        return self.allocator.pages_for(chunk.start + chunk.length) - len(seq.pages)

    def _reserve_pages(self, seq: Sequence, chunk: ScheduledChunk) -> bool:
        missing = self._pages_missing(seq, chunk)
        if missing > self.allocator.num_free:
            return False
        if missing > 0:
            seq.pages.extend(self.allocator.allocate(missing))
        return True

    def _reserve_pages_preempting(self, seq: Sequence, chunk: ScheduledChunk) -> bool:
        while not self._reserve_pages(seq, chunk):
            victim = self.running[-1]
            self._preempt(victim)
            if victim is seq:
                return False
        return True

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self._release(seq)
        seq.status = SequenceStatus.WAITING
        seq.num_computed_tokens = 0
        self.waiting.appendleft(seq)
        self.num_preemptions += 1

    def _release(self, seq: Sequence) -> None:
        self.allocator.free(seq.pages)
        seq.pages = []
        self._free_slots.append(seq.slot)
        seq.slot = -1


def _rows(seq: Sequence, start: int, length: int) -> int:
    return len(seq.prompt_logprob_positions(start, length)) + int(start + length == seq.num_tokens)


class _Budget:
    def __init__(self, tokens: int, rows: int):
        self.tokens = tokens
        self.rows = rows

    def take(self, chunk: ScheduledChunk) -> None:
        self.tokens -= chunk.length
        self.rows -= chunk.num_rows
