"""Continuous batching must not change results: the same greedy tokens for a prompt alone and among 20
concurrent mixed-length requests, with chunked prefill and a KV pool so small that sequences get preempted
and recomputed. Afterwards every page is free again."""

from __future__ import annotations

import numpy as np

from jaxserve import SamplingParams

# 8 pages of 16 tokens per sequence at most, 24 pages in all: about three sequences fit at once
SMALL_POOL = dict(max_model_len=128, max_num_seqs=8, max_num_batched_tokens=32, num_kv_pages=24)


def mixed_prompts(count: int, seed: int = 0) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(3, 500, size=int(n)).tolist() for n in rng.integers(3, 70, size=count)]


def test_greedy_tokens_do_not_depend_on_the_batch(tiny_models, make_llm):
    llm = make_llm(tiny_models["tiny-qwen2"], **SMALL_POOL)
    engine = llm.engine
    params = SamplingParams(temperature=0, max_tokens=32, ignore_eos=True)
    prompts = mixed_prompts(20)

    alone = [llm.generate([p], params, use_tqdm=False)[0].outputs[0].token_ids for p in prompts]
    preemptions_before = engine.scheduler.num_preemptions
    together = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]

    assert together == alone
    assert engine.scheduler.num_preemptions > preemptions_before, "the pool was meant to force preemption"
    assert engine.page_pool.num_free == engine.page_pool.num_pages
    assert not engine.scheduler.running and not engine.scheduler.waiting


def test_seeded_sampling_does_not_depend_on_the_batch(tiny_models, make_llm):
    llm = make_llm(tiny_models["tiny-qwen2"], **SMALL_POOL)
    prompts = mixed_prompts(12, seed=1)
    seeded = [SamplingParams(temperature=1.0, top_p=0.9, max_tokens=24, ignore_eos=True, seed=i) for i in range(12)]

    alone = [llm.generate([p], s, use_tqdm=False)[0].outputs[0].token_ids for p, s in zip(prompts, seeded)]
    together = [o.outputs[0].token_ids for o in llm.generate(prompts, seeded, use_tqdm=False)]

    assert together == alone
    assert llm.engine.page_pool.num_free == llm.engine.page_pool.num_pages
