"""The scheduler on its own: token budget, decode first, chunked prefill, logits-row cap, preemption."""

from __future__ import annotations

from jaxserve.kv_pages import PageAllocator
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


def scheduler(max_num_seqs=4, budget=32, pages=64, page_size=4) -> Scheduler:
    return Scheduler(SchedulerConfig(max_num_seqs, budget), PageAllocator(pages, page_size))


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
