"""The async interface the server uses: streamed deltas, concurrent requests, aborts that free pages at once,
bad requests, and a dead engine loop."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from jaxserve import AsyncEngine, PoolingParams, RequestOutputKind, SamplingParams
from jaxserve.errors import EngineDeadError

PROMPTS = ["The quick brown fox", "Once upon a time", "1 2 3 4 5 6 7", "café naïve"]


@pytest.fixture
def engine(tiny_models, make_llm):
    llm = make_llm(tiny_models["tiny-mistral"])
    async_engine = AsyncEngine(llm.engine)
    yield llm, async_engine
    async_engine.shutdown()


async def collect(engine: AsyncEngine, prompt_ids, params, request_id):
    deltas = []
    async for output in engine.generate(prompt_ids, params, request_id):
        deltas.append(output)
    return deltas


def test_concurrent_streams_equal_offline_outputs(engine):
    llm, async_engine = engine
    params = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
    expected = llm.generate(PROMPTS, params, use_tqdm=False)
    delta = params.clone(output_kind=RequestOutputKind.DELTA)
    ids = [llm.get_tokenizer().encode(p) for p in PROMPTS]

    async def main():
        return await asyncio.gather(*(collect(async_engine, i, delta, f"r{n}") for n, i in enumerate(ids)))

    for deltas, want in zip(asyncio.run(main()), expected):
        assert deltas[-1].finished and all(not d.finished for d in deltas[:-1])
        assert "".join(d.outputs[0].text for d in deltas) == want.outputs[0].text
        assert [t for d in deltas for t in d.outputs[0].token_ids] == want.outputs[0].token_ids
        assert len(deltas) > 1


def test_abandoned_stream_is_aborted_and_frees_its_pages(engine):
    llm, async_engine = engine
    allocator = llm.engine.page_pool
    params = SamplingParams(temperature=0, max_tokens=200, ignore_eos=True, output_kind=RequestOutputKind.DELTA)

    async def main():
        stream = async_engine.generate(llm.get_tokenizer().encode(PROMPTS[1]), params, "long")
        await stream.__anext__()
        assert allocator.num_free < allocator.num_pages
        await stream.aclose()  # what a disconnecting client's handler does
        for _ in range(200):
            if allocator.num_free == allocator.num_pages and not llm.engine.has_unfinished_requests():
                return True
            await asyncio.sleep(0.01)
        return False

    assert asyncio.run(main())


def test_shutdown_leaves_the_engine_holding_no_request(engine):
    """A server that stops with a stream still open (its handler never closed it) must not leave the request in
    the engine for whoever drives it next."""
    llm, _ = engine
    allocator = llm.engine.page_pool
    params = SamplingParams(temperature=0, max_tokens=200, ignore_eos=True, output_kind=RequestOutputKind.DELTA)
    async_engine = AsyncEngine(llm.engine)

    async def main():
        stream = async_engine.generate(llm.get_tokenizer().encode(PROMPTS[1]), params, "orphan")
        await stream.__anext__()
        async_engine.shutdown()
        return stream

    asyncio.run(main())
    assert not llm.engine.has_unfinished_requests()
    assert allocator.num_free == allocator.num_pages


def test_bad_request_raises_and_engine_keeps_serving(engine):
    llm, async_engine = engine

    async def main():
        with pytest.raises(ValueError, match="max_tokens=100000 cannot be greater than max_model_len"):
            await collect(async_engine, [5, 6], SamplingParams(max_tokens=100000), "bad")
        return await collect(async_engine, [5, 6], SamplingParams(temperature=0, max_tokens=4), "good")

    assert asyncio.run(main())[-1].outputs[0].finish_reason in ("length", "stop")
    assert not async_engine.errored


def test_a_dead_engine_loop_fails_requests_and_reports_it(engine, monkeypatch):
    llm, async_engine = engine

    def broken_step():
        raise RuntimeError("device lost")

    monkeypatch.setattr(llm.engine, "core_step", broken_step)

    async def main():
        with pytest.raises(EngineDeadError):
            await collect(async_engine, [5, 6], SamplingParams(max_tokens=4), "doomed")
        with pytest.raises(EngineDeadError):
            await collect(async_engine, [5, 6], SamplingParams(max_tokens=4), "after")

    asyncio.run(main())
    assert async_engine.errored
    llm.engine.abort_request("doomed")


def test_concurrent_encodes_equal_offline_embeddings(tiny_models, make_pooling_llm):
    llm = make_pooling_llm(tiny_models["tiny-bert-mean"])
    expected = [o.outputs.embedding for o in llm.embed(PROMPTS, use_tqdm=False)]
    async_engine = AsyncEngine(llm.engine)
    prompts = [llm.engine.prepare(p) for p in PROMPTS]

    async def main():
        return await asyncio.gather(
            *(
                async_engine.encode(p.token_ids, PoolingParams(task="embed"), f"e{n}", p.token_type_ids)
                for n, p in enumerate(prompts)
            )
        )

    async def bad_then_good():
        with pytest.raises(ValueError, match="Unsupported task: 'classify'"):
            await async_engine.encode(prompts[0].token_ids, PoolingParams(task="classify"), "bad")
        with pytest.raises(ValueError, match="does not support generation"):
            async for _ in async_engine.generate(prompts[0].token_ids, SamplingParams(), "gen"):
                pass
        return await async_engine.encode(prompts[0].token_ids, PoolingParams(task="embed"), "good")

    try:
        outputs = asyncio.run(main())
        good = asyncio.run(bad_then_good())
    finally:
        async_engine.shutdown()
    for output, want in zip(outputs, expected):
        assert output.finished
        np.testing.assert_allclose(output.outputs.data, want, atol=1e-6)
    np.testing.assert_allclose(good.outputs.data, expected[0], atol=1e-6)
    assert not llm.engine.has_unfinished_requests()
