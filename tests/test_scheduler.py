"""The scheduler on its own: token budget, decode first, chunked prefill, logits-row cap, preemption."""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from jaxserve.kv_pages import PagePool
from jaxserve.sampling_params import SamplingParams
from jaxserve.scheduler import Scheduler, SchedulerConfig
from jaxserve.sequence import Sequence, SequenceStatus


def make_seq(seq_id: int, prompt_len: int, prompt_logprobs: bool = False) -> Sequence:
    params = SamplingParams(prompt_logprobs=1 if prompt_logprobs else None)
    return Sequence(seq_id, f"r{seq_id}", 0, list(range(prompt_len)), prompt_len, params, 0, 16, prompt_logprobs)


def run(scheduler: Scheduler, plan) -> None:
    """Pretend the plan ran: commit it and append a token to every sampled sequence."""
    scheduler.commit(plan)
    for chunk in plan.chunks:
        if chunk.sample:
            chunk.seq.token_ids.append(7)
            chunk.seq.num_pending_tokens -= 1


def scheduler(max_num_seqs=4, budget=32, pages=64, page_size=4, caching=False, policy="fcfs") -> Scheduler:
    return Scheduler(SchedulerConfig(max_num_seqs, budget, 1 << 20, policy), PagePool(pages, page_size, caching))


def test_long_prompt_is_chunked_to_the_budget_and_decodes_go_first():
    s = scheduler(budget=32)
    long, short = make_seq(0, 70), make_seq(1, 5)
    s.add(long)
    plan = s.schedule()
    assert [(c.start, c.length, c.sample) for c in plan.chunks] == [(0, 32, False)]
    run(s, plan)
    s.add(short)
    plan = s.schedule()
    assert [(c.seq.seq_id, c.start, c.length) for c in plan.chunks] == [(0, 32, 32)]  # budget used up
    run(s, plan)
    plan = s.schedule()
    assert [(c.seq.seq_id, c.length, c.sample) for c in plan.chunks] == [(0, 6, True), (1, 5, True)]
    run(s, plan)
    plan = s.schedule()
    assert [(c.seq.seq_id, c.length) for c in plan.chunks] == [(0, 1), (1, 1)]  # both decoding now
    assert plan.num_tokens <= 32


def test_sequence_cap_limits_admission():
    s = scheduler(max_num_seqs=2)
    for i in range(3):
        s.add(make_seq(i, 3))
    plan = s.schedule()
    assert [c.seq.seq_id for c in plan.chunks] == [0, 1]
    assert len(s.waiting) == 1


def test_prompt_logprob_rows_respect_the_row_cap():
    s = scheduler(max_num_seqs=4, budget=64)
    seq = make_seq(0, 20, prompt_logprobs=True)
    s.add(seq)
    plan = s.schedule()
    (chunk,) = plan.chunks
    assert plan.num_rows <= 4 and chunk.length == 4 and list(chunk.prompt_logprob_positions) == [0, 1, 2, 3]
    while not chunk.sample:
        run(s, plan)
        plan = s.schedule()
        (chunk,) = plan.chunks
        assert plan.num_rows <= 4
    assert seq.num_prompt_logprobs_done == 16 and list(chunk.prompt_logprob_positions) == [16, 17, 18]


def test_running_out_of_pages_preempts_the_newest_and_recomputes_it():
    s = scheduler(max_num_seqs=4, budget=64, pages=6, page_size=4)  # 24 token slots
    old, new = make_seq(0, 8), make_seq(1, 12)
    s.add(old)
    s.add(new)
    run(s, s.schedule())  # old holds 3 pages (8 + 1 token), new holds 3 (12 + 1)
    for _ in range(3):
        plan = s.schedule()
        run(s, plan)
    assert new.status is SequenceStatus.WAITING and new.num_computed_tokens == 0 and not new.pages
    assert old.status is SequenceStatus.RUNNING and s.num_preemptions == 1
    assert new.num_tokens == 13  # its sampled token is kept and will be recomputed with the prompt
    s.finish(old)
    plan = s.schedule()
    assert [(c.seq.seq_id, c.start, c.length, c.sample) for c in plan.chunks] == [(1, 0, 13, True)]


def seq_with(seq_id: int, tokens: list[int], *, n_index: int = 0, priority: int = 0, salt: str | None = None):
    seq = Sequence(seq_id, f"r{seq_id}", n_index, list(tokens), len(tokens), SamplingParams(), 0, 16)
    seq.priority, seq.cache_salt = priority, salt
    return seq


def drain(s: Scheduler) -> None:
    """Run steps until every sequence has computed its prompt and sampled one token."""
    while plan := s.schedule():
        run(s, plan)
        for seq in list(s.running):
            if seq.num_output_tokens:
                s.finish(seq)


def check_invariants(s: Scheduler) -> None:
    pool = s.pages
    refs = [0] * pool.num_pages
    for seq in s.running:
        for page in seq.pages:
            refs[page] += 1
        assert seq.num_computed_tokens <= seq.num_tokens
        assert len(seq.pages) * pool.page_size >= seq.num_computed_tokens
    for seq in s.waiting:
        assert not seq.pages and seq.num_computed_tokens == 0
    assert refs == pool.ref_counts
    assert pool.num_free == refs.count(0)
    for page_hash, page in pool._cached.items():
        assert pool._hash_of[page] == page_hash


def test_a_prompt_that_starts_with_cached_pages_computes_only_the_rest():
    s = scheduler(budget=64, caching=True)
    first = seq_with(0, range(10))
    s.add(first)
    drain(s)
    assert s.pages.num_free == s.pages.num_pages and s.pages.num_cached == 2  # two full pages of 4
    second = seq_with(1, [*range(8), 50, 51, 52])
    s.add(second)
    plan = s.schedule()
    assert [(c.start, c.length) for c in plan.chunks] == [(8, 3)]
    assert (s.prefix_cache_stats.queries, s.prefix_cache_stats.hits) == (10 + 11, 8)
    run(s, plan)
    same = seq_with(2, range(8))  # entirely cached: its last token is still computed, to sample from
    s.add(same)
    plan = s.schedule()
    assert [(c.seq.seq_id, c.start, c.length) for c in plan.chunks] == [(1, 11, 1), (2, 4, 4)]
    assert second.pages[:2] == same.pages[:1] + [second.pages[1]] and s.pages.ref_counts[same.pages[0]] == 2
    check_invariants(s)


def test_cache_salt_keeps_prefixes_apart_and_reset_forgets_them():
    s = scheduler(budget=64, caching=True)
    s.add(seq_with(0, range(9), salt="alice"))
    drain(s)
    bob = seq_with(1, range(9), salt="bob")
    s.add(bob)
    assert s.schedule().chunks[0].start == 0
    drain(s)
    s.reset_prefix_cache()
    alice = seq_with(2, range(9), salt="alice")
    s.add(alice)
    assert s.schedule().chunks[0].start == 0 and s.pages.num_cached == 0


def test_evicted_pages_are_the_least_recently_freed_and_uncached_ones_go_first():
    s = scheduler(budget=64, pages=8, caching=True)
    s.add(seq_with(0, range(9)))  # 3 pages: two full ones cached, the partial one not
    drain(s)
    s.add(seq_with(1, range(100, 113)))  # needs 4 pages: the partial page and 3 never-used ones...
    drain(s)
    s.add(seq_with(2, range(9)))
    assert s.schedule().chunks[0].start == 8  # ...so the first request's cached pages survived


def test_n_samples_wait_for_the_first_and_share_its_prompt_pages():
    s = scheduler(budget=64, caching=True)
    leader = seq_with(0, range(10))
    siblings = [seq_with(i, range(10), n_index=i) for i in (1, 2)]
    for sibling in siblings:
        sibling.leader = leader
    for seq in (leader, *siblings):
        s.add(seq)
    plan = s.schedule()
    assert [c.seq.seq_id for c in plan.chunks] == [0]
    run(s, plan)
    plan = s.schedule()
    assert [(c.seq.seq_id, c.start, c.length) for c in plan.chunks] == [(0, 10, 1), (1, 8, 2), (2, 8, 2)]
    assert all(sib.pages[:2] == leader.pages[:2] for sib in siblings)
    assert s.pages.ref_counts[leader.pages[0]] == 3
    check_invariants(s)


def test_priority_orders_admission_and_preempts_the_lowest_priority_first():
    s = scheduler(max_num_seqs=2, budget=64, pages=5, policy="priority")
    low, high, mid = seq_with(0, range(8), priority=5), seq_with(1, range(8), priority=-1), seq_with(2, range(8))
    for seq in (low, high, mid):
        s.add(seq)
    plan = s.schedule()
    assert [c.seq.seq_id for c in plan.chunks] == [1, 2]  # admitted by priority, not arrival
    run(s, plan)
    while mid.status is SequenceStatus.RUNNING:
        run(s, s.schedule())
    assert mid.num_computed_tokens == 0 and high.status is SequenceStatus.RUNNING  # mid outranks nobody running
    assert [q.seq_id for q in s.waiting] == [2, 0]


def test_fcfs_preempts_the_newest():
    s = scheduler(max_num_seqs=2, budget=64, pages=5)
    old, new = seq_with(0, range(8), priority=9), seq_with(1, range(8), priority=-9)
    s.add(old)
    s.add(new)
    run(s, s.schedule())
    while new.status is SequenceStatus.RUNNING:
        run(s, s.schedule())
    assert old.status is SequenceStatus.RUNNING and s.num_preemptions == 1


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    ops=st.lists(
        st.one_of(
            st.tuples(st.just("add"), st.integers(1, 3), st.integers(1, 14), st.integers(0, 2), st.integers(-1, 1)),
            st.tuples(st.just("step"), st.integers(1, 4)),
            st.tuples(st.just("step"), st.integers(1, 4)),
            st.tuples(st.just("abort"), st.integers(0, 50)),
        ),
        min_size=4,
        max_size=40,
    ),
    policy=st.sampled_from(["fcfs", "priority"]),
    caching=st.booleans(),
)
def test_random_arrivals_aborts_and_preemptions_keep_the_page_pool_consistent(ops, policy, caching):
    """Prompts share prefixes (a few tokens from a small alphabet), the pool is small enough to preempt; after
    every operation the reference counts are the block tables', and at the end every page is free again."""
    s = scheduler(max_num_seqs=3, budget=12, pages=8, caching=caching, policy=policy)
    seqs: list[Sequence] = []
    for op in ops:
        if op[0] == "add":
            _, n, length, variant, priority = op
            leader = None
            for i in range(n):
                seq = seq_with(len(seqs), [variant] * 4 + list(range(length)), n_index=i, priority=priority)
                seq.leader, seq.max_tokens = leader, 6
                leader = leader or seq
                seqs.append(seq)
                s.add(seq)
        elif op[0] == "step":
            for _ in range(op[1]):
                plan = s.schedule()
                if plan is None:
                    break
                run(s, plan)
                for seq in list(s.running):
                    if seq.num_output_tokens >= seq.max_tokens:
                        s.finish(seq)
        elif seqs:
            s.finish(seqs[op[1] % len(seqs)])
        check_invariants(s)
    for seq in seqs:
        s.finish(seq)
    assert s.pages.num_free == s.pages.num_pages and not any(s.pages.ref_counts)
