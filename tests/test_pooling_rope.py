"""Encoders with rotary positions, loaded from folders laid out as their families publish them (remote code in the
real checkpoints, never run here): gte's `new` models (with NTK-scaled rotary tables), NomicBERT and
jina-embeddings-v3 with its task LoRA adapters. The reference is transformers' native port of each family with the
published tensors loaded into it (`rope_encoder_reference`)."""

from __future__ import annotations

import numpy as np
import pytest

from jaxserve import PoolingParams
from scripts.make_test_models import rope_encoder_reference
from tests.test_pooling import TEXTS, assert_spread, cosines

pytest.importorskip("torch")
pytest.importorskip("transformers")

EMBEDDERS = ["tiny-gte-new", "tiny-nomic-bert", "tiny-jina-v3"]


@pytest.mark.parametrize("name", EMBEDDERS)
def test_embeddings_match_the_native_port(tiny_models, make_pooling_llm, name):
    folder = tiny_models[name]
    expected = rope_encoder_reference(folder, TEXTS)
    got = np.array([o.outputs.embedding for o in make_pooling_llm(folder).embed(TEXTS, use_tqdm=False)])
    assert cosines(got, expected).min() >= 0.9999
    assert_spread(expected)


def test_gte_reranker_scores_match_the_native_port(tiny_models, make_pooling_llm):
    folder = tiny_models["tiny-gte-new-reranker"]
    query, documents = TEXTS[0], TEXTS[1:]
    logits = rope_encoder_reference(folder, [(query, d) for d in documents])[:, 0]
    got = [o.outputs.score for o in make_pooling_llm(folder).score(query, documents, use_tqdm=False)]
    np.testing.assert_allclose(got, 1 / (1 + np.exp(-logits)), atol=1e-4)
    assert np.ptp(logits) > 1.0


def test_jina_v3_merges_the_lora_adapter_of_the_task_asked_for(tiny_models, make_pooling_llm):
    """text-matching by default (as vLLM); `--hf-overrides '{"lora_task": ...}'` merges another; an unknown task
    fails at start-up with the model's list."""
    folder = tiny_models["tiny-jina-v3"]
    llm = make_pooling_llm(folder, hf_overrides={"lora_task": "retrieval.query"})
    got = np.array([o.outputs.embedding for o in llm.embed(TEXTS, use_tqdm=False)])
    assert cosines(got, rope_encoder_reference(folder, TEXTS, lora_task="retrieval.query")).min() >= 0.9999
    assert cosines(got, rope_encoder_reference(folder, TEXTS)).max() < 0.99
    from jaxserve import LLM

    with pytest.raises(ValueError, match=r"lora_task 'nope' is not one of .*'text-matching'"):
        LLM(str(folder), runner="pooling", hf_overrides={"lora_task": "nope"}, progress=False)


def test_packing_invariance(tiny_models, make_pooling_llm):
    """A text embeds the same alone and packed among 49 others (rotary positions restart in each sequence)."""
    llm = make_pooling_llm(tiny_models["tiny-nomic-bert"])
    texts = [f"{TEXTS[i % len(TEXTS)]} {i}" for i in range(50)]
    batch = llm.embed(texts, pooling_params=PoolingParams(use_activation=False), use_tqdm=False)
    for i in (0, 17, 49):
        alone = llm.embed(texts[i], pooling_params=PoolingParams(use_activation=False), use_tqdm=False)[0]
        np.testing.assert_allclose(batch[i].outputs.embedding, alone.outputs.embedding, rtol=1e-5, atol=1e-5)


@pytest.mark.kernels
@pytest.mark.usefixtures("no_persistent_compile_cache")
def test_pallas_kernels_in_interpret_mode_give_the_reference_results(tiny_models, make_pooling_llm):
    folder = tiny_models["tiny-gte-new"]
    pallas = make_pooling_llm(folder, attention_backend="interpret")
    assert pallas.engine.kernels.backend == "interpret"
    got = np.array([o.outputs.embedding for o in pallas.embed(TEXTS, use_tqdm=False)])
    assert cosines(got, rope_encoder_reference(folder, TEXTS)).min() >= 0.9999
