"""Data parallelism: 2 replicas × 2-way tensor parallelism on 4 of the forced CPU devices, behind a real server."""

from __future__ import annotations

import asyncio

import httpx
import jax
import openai
import pytest

from jaxserve import SamplingParams
from jaxserve.config import EngineConfig
from jaxserve.data_parallel import DataParallelEngine, create_serving_engine
from jaxserve.server.launch import background_server
from jaxserve.server.served_models import ServedModel

from .test_tensor_parallel import ENGINE

pytestmark = pytest.mark.skipif(jax.device_count() < 4, reason="needs 4 devices")

PROMPTS = [f"Request {i}: tell me about the number {i * 7 % 13} and" for i in range(50)]


@pytest.fixture(scope="module")
def single_device_answers(tiny_models, llm_cache):
    llm = llm_cache(tiny_models["tiny-llama-8h"], ENGINE)
    outputs = llm.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=6), use_tqdm=False)
    return [o.outputs[0].text for o in outputs]


@pytest.fixture(scope="module")
def replicated(tiny_models):
    config = EngineConfig(
        model=str(tiny_models["tiny-llama-8h"]), data_parallel_size=2, tensor_parallel_size=2, **ENGINE
    )
    engine = create_serving_engine(config)
    yield engine
    engine.shutdown()


@pytest.fixture(scope="module")
def url(replicated):
    with background_server([ServedModel.from_engine(["llama"], "tiny-llama-8h", replicated, "auto")]) as base:
        yield base


def test_replicas_on_disjoint_device_groups(replicated: DataParallelEngine):
    groups = [{d.id for d in replica.engine.mesh.devices.flat} for replica in replicated.replicas]
    assert groups == [{0, 1}, {2, 3}]


def test_fifty_concurrent_requests_spread_over_both_replicas(url, replicated, single_device_answers):
    client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)

    async def ask(prompt: str) -> str:
        result = await client.completions.create(model="llama", prompt=prompt, max_tokens=6, temperature=0)
        return result.choices[0].text

    async def ask_all() -> list[str]:
        return await asyncio.gather(*(ask(p) for p in PROMPTS))

    assert asyncio.run(ask_all()) == single_device_answers
    for replica in replicated.replicas:
        assert replica.stats().prefix_cache_queries > 0, "a replica served no request"
    assert replicated.outstanding == [0, 0]

    metrics = httpx.get(f"{url}/metrics").text
    for engine in ("0", "1"):
        assert f'vllm:prefix_cache_queries_total{{engine="{engine}",model_name="llama"}}' in metrics


def test_a_cached_prefix_draws_its_request_to_the_replica_holding_it(url, replicated):
    """With equal loads, a request goes where its prompt's pages are cached."""
    engine = replicated.replicas[0].engine
    for prompt in PROMPTS[:4]:
        request = replicated.process(engine.tokenizer.encode(prompt), SamplingParams(max_tokens=1), "probe")
        holders = [i for i, fraction in enumerate(replicated.cached_fractions(request)) if fraction > 0]
        assert len(holders) == 1
        assert replicated.choose(request) == holders[0]
