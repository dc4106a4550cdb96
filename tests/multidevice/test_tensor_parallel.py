"""Tensor parallelism on 8 forced CPU devices: the same tokens, logprobs and embeddings as one device, each device
holding its share of the weights and KV cache, and the collectives a step's program has."""

from __future__ import annotations

import re

import jax
import numpy as np
import pytest

from jaxserve import SamplingParams
from jaxserve.parallel import bytes_per_device, collectives

from ..conftest import TINY_ENGINE

# one token bucket (16) per engine keeps the compiles of these many engines short; prompts are chunked into it
ENGINE = TINY_ENGINE | {"max_num_batched_tokens": 16}

pytestmark = pytest.mark.skipif(
    jax.device_count() < 8, reason="needs 8 devices: XLA_FLAGS=--xla_force_host_platform_device_count=8"
)

PROMPTS = ["Hello there, how are you today", "The quick brown fox jumps over the lazy dog and", "1 2 3"]
GREEDY = SamplingParams(temperature=0, max_tokens=10, logprobs=3)

# Megatron's layout, written out independently of the code: which weights split over N devices
SPLIT = re.compile(r"(q_proj|o_proj|gate_proj|up_proj|down_proj|embed_tokens|lm_head)\.weight$")
SPLIT_WITH_KV_HEADS = re.compile(r"(k_proj|v_proj)\.weight$")


def _flat_params(llm) -> dict[str, jax.Array]:
    from flax import nnx

    return {".".join(map(str, path)): var.get_value() for path, var in nnx.to_flat_state(llm.engine.runner.params)}


def _generate(llm):
    outputs = [o.outputs[0] for o in llm.generate(PROMPTS, GREEDY, use_tqdm=False)]
    logprobs = [[step[token].logprob for token, step in zip(o.token_ids, o.logprobs)] for o in outputs]
    alternatives = [[sorted(step) for step in o.logprobs] for o in outputs]
    return [o.token_ids for o in outputs], np.asarray(logprobs), alternatives


@pytest.fixture(scope="module")
def one_device(tiny_models, llm_cache):
    return _generate(llm_cache(tiny_models["tiny-llama-8h"], ENGINE))


@pytest.mark.parametrize("tp", [2, 4, 8])
def test_decoder_over_n_devices_matches_one_device(tp, tiny_models, make_llm, one_device):
    """8 query heads over 2 KV heads: at 4 and 8 devices each KV head is repeated, one per device."""
    llm = make_llm(tiny_models["tiny-llama-8h"], tensor_parallel_size=tp, max_num_batched_tokens=16)
    tokens, logprobs, alternatives = _generate(llm)
    assert tokens == one_device[0]
    np.testing.assert_allclose(logprobs, one_device[1], atol=1e-4)
    assert alternatives == one_device[2]

    params = _flat_params(llm)
    held = bytes_per_device(llm.engine.runner.params)
    assert len(held) == tp
    expected = sum(
        a.nbytes // tp if SPLIT.search(name) or (SPLIT_WITH_KV_HEADS.search(name) and 2 % tp == 0) else a.nbytes
        for name, a in params.items()
    )
    assert set(held.values()) == {expected}
    total = sum(a.nbytes for a in params.values())
    assert max(held.values()) < total / tp * (1.1 if tp <= 2 else 1.5)  # about 1/N (KV projections whole past 2)

    kv = bytes_per_device(llm.engine.runner.state.kv_pages)
    one_layer = llm.engine.runner.state.kv_pages[0]
    assert one_layer.shape[2] == 2 * max(2, tp)  # K and V rows of each cached head
    assert set(kv.values()) == {sum(p.nbytes for p in llm.engine.runner.state.kv_pages) // tp}


def test_step_program_gathers_no_whole_vocabulary(tiny_models, make_llm):
    """The LM head's logits stay split by vocabulary through sampling: what crosses devices are the partial
    reductions (argmax, softmax sums) and the per-device top-k candidates, never rows of V logits; two all-reduces
    per layer (attention output, MLP down projection) plus the embedding's."""
    llm = make_llm(tiny_models["tiny-llama-8h"], tensor_parallel_size=8, max_num_batched_tokens=16)
    vocab = llm.engine.vocab_size
    text = llm.engine.runner.programs._executables[16].as_text()
    gathered = [dims.split(",") for dims in re.findall(r"\[([\d,]*)\]\{[^}]*\} all-gather\(", text)]
    assert gathered and max(int(dims[-1]) for dims in gathered) < vocab  # per row: candidates, not the vocabulary
    assert collectives(text)["all-reduce"].count >= 2 * 2 + 1


def test_mixture_of_experts_split_by_expert(tiny_models, make_llm):
    one = _generate(make_llm(tiny_models["tiny-qwen3-moe"], max_num_batched_tokens=16))
    llm = make_llm(tiny_models["tiny-qwen3-moe"], tensor_parallel_size=4, max_num_batched_tokens=16)
    tokens, logprobs, _ = _generate(llm)
    assert tokens == one[0]
    np.testing.assert_allclose(logprobs, one[1], atol=1e-4)
    experts = _flat_params(llm)["model.layers.0.mlp.experts.gate_up_proj"]
    assert {shard.data.shape[0] for shard in experts.addressable_shards} == {8 // 4}


def test_encoder_embeddings_over_n_devices(tiny_models, make_pooling_llm):
    texts = ["a tiny test sentence", "another one, longer than the first by a few words", "x"]
    small = {"max_model_len": 32, "max_num_batched_tokens": 32}
    one = np.asarray(
        [o.outputs.embedding for o in make_pooling_llm(tiny_models["tiny-bert-mean"], **small).embed(texts)]
    )
    llm = make_pooling_llm(tiny_models["tiny-bert-mean"], tensor_parallel_size=4, **small)
    four = np.asarray([o.outputs.embedding for o in llm.embed(texts)])
    np.testing.assert_allclose(four, one, atol=1e-5)
    query = _flat_params(llm)["backbone.model.encoder.layer.0.attention.self.query.weight"]
    assert {shard.data.shape for shard in query.addressable_shards} == {(query.shape[0] // 4, query.shape[1])}


def test_paged_decoder_classifier_over_two_devices(tiny_models, make_pooling_llm):
    texts = ["good", "this was a bad idea from the start"]
    small = {"max_model_len": 32, "max_num_batched_tokens": 32}
    one = [o.outputs.probs for o in make_pooling_llm(tiny_models["tiny-qwen2-classifier"], **small).classify(texts)]
    llm = make_pooling_llm(tiny_models["tiny-qwen2-classifier"], tensor_parallel_size=2, **small)
    two = [o.outputs.probs for o in llm.classify(texts)]
    np.testing.assert_allclose(two, one, atol=1e-5)


def test_pallas_kernels_per_device_under_shard_map(tiny_models, make_llm, one_device):
    llm = make_llm(
        tiny_models["tiny-llama-8h"], tensor_parallel_size=4, attention_backend="interpret", max_num_batched_tokens=16
    )
    tokens, logprobs, _ = _generate(llm)
    assert tokens == one_device[0]
    np.testing.assert_allclose(logprobs, one_device[1], atol=1e-4)


def test_heads_must_divide_over_the_devices(tiny_models):
    from jaxserve import LLM

    with pytest.raises(ValueError, match=r"attention heads \(4\) must be divisible by tensor parallel size \(8\)"):
        LLM(str(tiny_models["tiny-llama"]), tensor_parallel_size=8, **ENGINE)
