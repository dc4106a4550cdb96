"""Continuous batching under one token budget (vLLM V1 style, docs/architecture.md §3).

Each step takes decode tokens first, then chunks of unfinished prefills, then new requests, until the token
budget, the sequence cap or the logits-row cap is reached. A running sequence that needs a page when none is
free preempts another (the newest under `fcfs`, the lowest priority under `priority`), which drops its pages
and is recomputed later: no request fails for lack of pages. New requests are only admitted when their pages
are free, in arrival order or by (priority, arrival).

With prefix caching a new sequence first takes the cached pages its prompt starts with and computes only the
rest; every page it completes is offered to the cache. The other samples of an `n > 1` request wait until
the first has computed the prompt's full pages, and then share them.

On a model whose every layer attends within a sliding window, a running sequence gives back the pages wholly
behind the window of its next chunk (vLLM's sliding-window manager), so a long generation holds a bounded number
of pages. Their ids stay in its block table: attention masks those positions out whatever the pages hold by then.

An encoder-decoder's sequence (Whisper's) is admitted with the pages its encoding's cross-attention keys and values
take (`SchedulerConfig.cross_pages`) besides its decoder's; it holds them until it finishes or is preempted, and
the engine fills them before its first decoder step.

Under async scheduling a step is planned before the previous one's sampled tokens reach the host: a sampled
token is pending (`Sequence.num_pending_tokens`) until then, and the next step reads it on the device.

For the per-request metrics, a request's timeline (`Sequence.stats`) gets the time it was first scheduled and a
count of its preemptions.
"""

from __future__ import annotations

import bisect
import dataclasses
import time

from .kv_pages import PagePool, page_hashes
from .sequence import Sequence, SequenceStatus

POLICIES = ("fcfs", "priority")


@dataclasses.dataclass(frozen=True)
class SchedulerConfig:
    max_num_seqs: int
    max_num_batched_tokens: int
    max_model_len: int
    policy: str = "fcfs"
    sliding_window: int | None = None  # the model's `kv_window`: no layer reads keys this far behind a query
    cross_pages: int = 0  # an encoder-decoder's: pages a sequence with an encoder input holds for its encoding


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


@dataclasses.dataclass
class PrefixCacheStats:
    """vLLM's prefix-cache counters: prompt tokens looked up, and how many of them were found."""

    queries: int = 0
    hits: int = 0


class Scheduler:
    def __init__(self, config: SchedulerConfig, pages: PagePool):
        if config.policy not in POLICIES:
            raise ValueError(f"scheduling policy must be one of {', '.join(POLICIES)}, got {config.policy!r}.")
        self.config = config
        self.pages = pages
        self.waiting: list[Sequence] = []  # in admission order: by _order
        self.running: list[Sequence] = []  # in admission order
        self._free_slots = list(range(config.max_num_seqs - 1, -1, -1))
        self.num_preemptions = 0
        self.prefix_cache_stats = PrefixCacheStats()

    def _order(self, seq: Sequence) -> tuple[int, int]:
        return (seq.priority if self.config.policy == "priority" else 0, seq.seq_id)

    def add(self, seq: Sequence) -> None:
        bisect.insort(self.waiting, seq, key=self._order)

    def schedule(self) -> StepPlan | None:
        budget = _Budget(self.config.max_num_batched_tokens, self.config.max_num_seqs)
        chunks: list[ScheduledChunk] = []
        preemptions = self.num_preemptions
        decoding = [s for s in self.running if s.num_uncomputed_tokens == 1]
        prefilling = [s for s in self.running if s.num_uncomputed_tokens > 1]
        for seq in decoding + prefilling:
            if seq.status is not SequenceStatus.RUNNING or self._at_limit(seq):
                continue
            chunk = self._chunk(seq, budget)
            if chunk:
                self._release_out_of_window(seq, chunk.start)
            if chunk and self._reserve_pages_preempting(seq, chunk):
                budget.take(chunk)
                chunks.append(chunk)
        # a sequence preempted in this step may have been scheduled before it was chosen as the victim
        chunks = [c for c in chunks if c.seq.status is SequenceStatus.RUNNING]
        if self.num_preemptions == preemptions:
            self._admit(chunks, budget)
        return StepPlan(chunks) if chunks else None

    def _at_limit(self, seq: Sequence) -> bool:
        """Its last output (maybe still pending) is its last: nothing more to compute. (A pooling sequence's one
        output is its pooled prompt: max_tokens 1.)"""
        outputs = seq.num_output_tokens
        return outputs >= seq.max_tokens or (outputs > 0 and seq.num_tokens >= self.config.max_model_len)

    def _admit(self, chunks: list[ScheduledChunk], budget: _Budget) -> None:
        i = 0
        while i < len(self.waiting) and len(self.running) < self.config.max_num_seqs:
            seq = self.waiting[i]
            if self._waits_for_leader(seq):
                i += 1
                continue
            cached = self._cached_prefix(seq)
            seq.num_computed_tokens = len(cached) * self.pages.page_size
            chunk = self._chunk(seq, budget)
            fresh = self.pages.pages_for(chunk.start + chunk.length) - len(cached) if chunk else 0
            cross = self.config.cross_pages if seq.encoder_input is not None else 0
            if chunk is None or fresh + cross > self.pages.num_free - self.pages.num_unreferenced(cached):
                seq.num_computed_tokens = 0
                return
            del self.waiting[i]
            self.pages.touch(cached)
            seq.pages = cached + self.pages.allocate(fresh)
            seq.cross_pages = self.pages.allocate(cross)
            seq.num_registered_pages = len(cached)
            if seq.num_cached_tokens is None:
                seq.num_cached_tokens = seq.num_computed_tokens
            if seq.reads_prefix_cache and self.pages.enable_caching:
                self.prefix_cache_stats.queries += seq.num_tokens
                self.prefix_cache_stats.hits += seq.num_computed_tokens
            seq.status = SequenceStatus.RUNNING
            if seq.stats.scheduled_ts is None:
                seq.stats.scheduled_ts = time.monotonic()
            seq.slot = self._free_slots.pop()
            self.running.append(seq)
            budget.take(chunk)
            chunks.append(chunk)

    def _waits_for_leader(self, seq: Sequence) -> bool:
        """An n > 1 sample waits while the request's first sample computes the prompt's full pages."""
        leader = seq.leader
        if leader is None or not self.pages.enable_caching or leader.status is SequenceStatus.FINISHED:
            return False
        shared = seq.num_prompt_tokens // self.pages.page_size * self.pages.page_size
        return leader.num_computed_tokens < shared

    def _cached_prefix(self, seq: Sequence) -> list[int]:
        """The cached pages the sequence can start from: whole pages, never its last token (it must be computed
        to sample the next one)."""
        if not (self.pages.enable_caching and seq.reads_prefix_cache):
            return []
        num_pages = (seq.num_tokens - 1) // self.pages.page_size
        self._hash_pages(seq)
        return self.pages.lookup(seq.page_hashes[:num_pages])

    def _hash_pages(self, seq: Sequence) -> None:
        if len(seq.token_ids) // self.pages.page_size > len(seq.page_hashes):
            seq.page_hashes = page_hashes(seq.token_ids, self.pages.page_size, seq.cache_salt, seq.page_hashes)

    def commit(self, plan: StepPlan) -> None:
        """Record that the plan was dispatched: its tokens are (or will be, in device order) in the cache, and
        each sampling chunk has one more token pending. Full pages whose tokens are known join the cache."""
        for chunk in plan.chunks:
            seq = chunk.seq
            seq.num_computed_tokens = chunk.start + chunk.length
            seq.num_prompt_logprobs_done = max(seq.num_prompt_logprobs_done, chunk.prompt_logprob_positions.stop)
            seq.num_pending_tokens += int(chunk.sample)
            if self.pages.enable_caching:
                self._register(seq)

    def _register(self, seq: Sequence) -> None:
        self._hash_pages(seq)
        ready = min(len(seq.token_ids), seq.num_computed_tokens) // self.pages.page_size
        for i in range(max(seq.num_registered_pages, seq.num_released_pages), min(ready, len(seq.page_hashes))):
            self.pages.cache(seq.pages[i], seq.page_hashes[i])
        seq.num_registered_pages = max(seq.num_registered_pages, ready)

    def finish(self, seq: Sequence) -> None:
        if seq.status is SequenceStatus.FINISHED:
            return
        if seq.status is SequenceStatus.RUNNING:
            self.running.remove(seq)
            self._release(seq)
        else:
            self.waiting.remove(seq)
        seq.status = SequenceStatus.FINISHED

    def reset_prefix_cache(self) -> None:
        self.pages.reset_cache()
        for seq in self.running:
            seq.num_registered_pages = len(seq.pages)  # their pages were computed before the reset: not offered

    def _chunk(self, seq: Sequence, budget: _Budget) -> ScheduledChunk | None:
        start = seq.num_computed_tokens
        length = min(seq.num_uncomputed_tokens, budget.tokens)
        if not seq.chunkable and length < seq.num_uncomputed_tokens:
            return None
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

    def _reserve_pages(self, seq: Sequence, chunk: ScheduledChunk) -> bool:
        missing = self.pages.pages_for(chunk.start + chunk.length) - len(seq.pages)
        if missing > self.pages.num_free:
            return False
        if missing > 0:
            seq.pages.extend(self.pages.allocate(missing))
        return True

    def _reserve_pages_preempting(self, seq: Sequence, chunk: ScheduledChunk) -> bool:
        while not self._reserve_pages(seq, chunk):
            victim = self._victim()
            self._preempt(victim)
            if victim is seq:
                return False
        return True

    def _victim(self) -> Sequence:
        """The newest running sequence; under `priority`, the one that would be admitted last."""
        if self.config.policy == "priority":
            return max(self.running, key=self._order)
        return self.running[-1]

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self._release(seq)
        seq.status = SequenceStatus.WAITING
        seq.num_computed_tokens = 0
        self.add(seq)  # by arrival (and priority): ahead of every request that came after it
        self.num_preemptions += 1
        seq.stats.num_preemptions += 1

    def _release_out_of_window(self, seq: Sequence, start: int) -> None:
        """Give back the pages that hold only keys before `start - window + 1`, the first any query from `start`
        on can see."""
        window = self.config.sliding_window
        if window is None:
            return
        behind = min(max(0, start - window + 1) // self.pages.page_size, len(seq.pages))
        if behind > seq.num_released_pages:
            self.pages.free(seq.pages[seq.num_released_pages : behind])
            seq.num_released_pages = behind

    def _release(self, seq: Sequence) -> None:
        self.pages.free(seq.pages[seq.num_released_pages :] + seq.cross_pages)
        seq.pages, seq.cross_pages, seq.encoded = [], [], False
        seq.num_released_pages = 0
        seq.num_registered_pages = 0
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
