"""The engine's modes change speed, never tokens: prefix caching and async scheduling, each on or off, give the
same outputs, greedy and seeded, on a workload of chats sharing a system prompt, long prompts, n > 1, an abort and preemptions. After
every run the page pool is whole again and no page is referenced."""

from __future__ import annotations

import numpy as np
import pytest

from jaxserve import SamplingParams

# about three sequences fit at once: the workload preempts
SMALL_POOL = dict(max_model_len=128, max_num_seqs=8, max_num_batched_tokens=32, num_kv_pages=16)


def workload(seed: int = 0) -> list[tuple[list[int], SamplingParams]]:
    rng = np.random.default_rng(seed)
    system = rng.integers(3, 500, size=37).tolist()
    greedy = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    requests = [(system + rng.integers(3, 500, size=int(n)).tolist(), greedy) for n in rng.integers(2, 20, size=6)]
    requests += [(rng.integers(3, 500, size=90).tolist(), greedy) for _ in range(2)]
    requests.append((system + [7, 8, 9], SamplingParams(n=3, temperature=1.0, seed=5, max_tokens=10, ignore_eos=True)))
    requests.append((system[:20], SamplingParams(temperature=0.8, top_k=20, seed=11, max_tokens=16, ignore_eos=True)))
    return requests


def run_workload(engine, requests, abort_index: int, abort_after: int = 3) -> dict[str, list[list[int]]]:
    """Every request's output tokens (per sample), all submitted at once; one is aborted after a few steps."""
    for i, (prompt, params) in enumerate(requests):
        engine.add_request(str(i), prompt, params)
    results, steps = {}, 0
    while engine.has_unfinished_requests():
        for output in engine.step():
            if output.finished:
                results[output.request_id] = [o.token_ids for o in output.outputs]
        steps += 1
        if steps == abort_after:
            engine.abort_request(str(abort_index))
    pool = engine.page_pool
    assert pool.num_free == pool.num_pages and not any(pool.ref_counts)
    assert not engine.scheduler.running and not engine.scheduler.waiting
    return {rid: tokens for rid, tokens in results.items() if rid != str(abort_index)}


@pytest.mark.parametrize("seed", [0, 1])
def test_prefix_caching_and_async_scheduling_do_not_change_outputs(tiny_models, make_llm, seed):
    requests = workload(seed)
    plain = make_llm(tiny_models["tiny-llama"], enable_prefix_caching=False, async_scheduling=False, **SMALL_POOL)
    expected = run_workload(plain.engine, requests, abort_index=3)
    assert len(expected["8"]) == 3
    for caching, overlap in ((True, False), (False, True), (True, True)):
        engine = make_llm(
            tiny_models["tiny-llama"], enable_prefix_caching=caching, async_scheduling=overlap, **SMALL_POOL
        ).engine
        preemptions, hits = engine.scheduler.num_preemptions, engine.scheduler.prefix_cache_stats.hits
        assert run_workload(engine, requests, abort_index=3) == expected, (caching, overlap)
        assert run_workload(engine, requests, abort_index=3) == expected, (caching, overlap)  # now from the cache
        assert engine.scheduler.num_preemptions > preemptions, "the pool was meant to force preemption"
        assert (engine.scheduler.prefix_cache_stats.hits > hits) == caching


def test_a_prefix_hit_computes_only_the_uncached_tokens(tiny_models, make_llm):
    engine = make_llm(tiny_models["tiny-llama"], enable_prefix_caching=True, async_scheduling=True, **SMALL_POOL).engine
    engine.reset_prefix_cache()
    prompt = list(range(10, 60))  # 50 tokens: three full pages of 16
    params = SamplingParams(temperature=0, max_tokens=1)
    computed = []
    schedule = engine.scheduler.schedule

    def counting():
        plan = schedule()
        computed.append(plan.num_tokens if plan else 0)
        return plan

    engine.scheduler.schedule = counting
    try:
        run_workload(engine, [(prompt, params)], abort_index=-1)
        first = sum(computed)
        stats = engine.stats()
        computed.clear()
        run_workload(engine, [(prompt + [5, 6], params)], abort_index=-1)
    finally:
        del engine.scheduler.schedule
    assert first == 50 and sum(computed) == 52 - 48
    assert engine.stats().prefix_cache_hits - stats.prefix_cache_hits == 48
    assert engine.stats().prefix_cache_queries - stats.prefix_cache_queries == 52


def test_a_stop_string_ends_a_sample_the_same_way_in_every_mode(tiny_models, make_llm):
    """The front end finds stop strings and has the core finish the sample; under async scheduling the core has
    already run one more step for it, whose token must not show."""
    prompt = list(range(40, 70))
    greedy = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    results = {}
    for caching, overlap in ((False, False), (True, True), (False, True)):
        engine = make_llm(
            tiny_models["tiny-llama"], enable_prefix_caching=caching, async_scheduling=overlap, **SMALL_POOL
        ).engine
        if not results:
            full = run_text(engine, prompt, greedy)
            stop = full[len(full) // 3 : len(full) // 3 + 3]
        params = SamplingParams(n=2, temperature=1.0, seed=3, max_tokens=12, ignore_eos=True, stop=[stop])
        results[(caching, overlap)] = (
            run_text(engine, prompt, greedy.clone(stop=[stop])),
            run_text(engine, prompt, params),
        )
        assert engine.page_pool.num_free == engine.page_pool.num_pages and not engine.has_unfinished_requests()
    first = results[(False, False)]
    assert first[0] == full[: full.index(stop)]
    assert all(result == first for result in results.values())


def run_text(engine, prompt: list[int], params: SamplingParams):
    engine.add_request("text", prompt, params)
    while engine.has_unfinished_requests():
        for output in engine.step():
            if output.finished:
                final = output
    texts = [(o.text, o.token_ids, o.finish_reason) for o in final.outputs]
    return texts[0][0] if params.n == 1 else texts


def test_async_scheduling_pools_the_same(tiny_models, make_pooling_llm):
    texts = [f"sentence number {i} " * (1 + i % 5) for i in range(40)]
    sync = make_pooling_llm(tiny_models["tiny-bert-mean"], async_scheduling=False)
    overlap = make_pooling_llm(tiny_models["tiny-bert-mean"], async_scheduling=True)
    expected = [o.outputs.embedding for o in sync.embed(texts, use_tqdm=False)]
    assert [o.outputs.embedding for o in overlap.embed(texts, use_tqdm=False)] == expected
    assert not overlap.engine.has_unfinished_requests()


def test_causal_pooling_models_use_the_prefix_cache(tiny_models, make_pooling_llm):
    """A decoder embedder or classifier runs over the paged cache when prefix caching is on: the same outputs
    as the packed, cache-free pass, with prompts that share a prefix computing only the rest. Tasks that read
    every token (MEAN pooling, token embeddings) are computed whole and read no cached page."""
    shared = "a long shared instruction that every query starts with, " * 2
    texts = [shared + f"query number {i}" for i in range(6)]
    small = dict(max_model_len=128, max_num_batched_tokens=128)
    for folder, method, options in (
        ("tiny-qwen2", "embed", {}),
        ("tiny-qwen2", "embed", {"pooler_config": {"pooling_type": "MEAN"}}),
        ("tiny-qwen2-classifier", "classify", {}),
    ):
        packed = make_pooling_llm(tiny_models[folder], enable_prefix_caching=False, **small, **options)
        paged = make_pooling_llm(tiny_models[folder], **small, **options)
        assert paged.engine.page_pool is not None and packed.engine.page_pool is None
        hits = paged.engine.stats().prefix_cache_hits

        np.testing.assert_allclose(pooled(paged, method, texts), pooled(packed, method, texts), atol=2e-5)
        cached = paged.engine.stats().prefix_cache_hits - hits
        assert (cached > 0) == (options == {}), (folder, options, cached)
        pool = paged.engine.page_pool
        assert pool.num_free == pool.num_pages and not paged.engine.has_unfinished_requests()
    paged = make_pooling_llm(tiny_models["tiny-qwen2"], **small).encode(texts, task="token_embed", use_tqdm=False)
    packed = make_pooling_llm(tiny_models["tiny-qwen2"], enable_prefix_caching=False, **small)
    for got, want in zip(paged, packed.encode(texts, task="token_embed", use_tqdm=False)):
        np.testing.assert_allclose(got.outputs.data, want.outputs.data, atol=2e-5)


def pooled(llm, method: str, texts: list[str]) -> np.ndarray:
    outputs = getattr(llm, method)(texts, use_tqdm=False)
    return np.array([o.outputs.embedding if method == "embed" else o.outputs.probs for o in outputs])
