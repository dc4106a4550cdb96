"""Bad requests raise ValueError with vLLM's wording, before any device work, and leave the engine clean."""

from __future__ import annotations

import pytest

from jaxserve import SamplingParams


@pytest.mark.parametrize(
    "fields, message",
    [
        (dict(temperature=-0.5), "temperature must be non-negative, got -0.5."),
        (dict(temperature=2.5), "temperature must be in [0, 2], got 2.5."),
        (dict(top_p=0.0), "top_p must be in (0, 1], got 0.0."),
        (dict(top_k=-3), "top_k must be 0 (disable), or at least 1, got -3."),
        (dict(min_p=1.5), "min_p must be in [0, 1], got 1.5."),
        (dict(presence_penalty=3.0), "presence_penalty must be in [-2, 2], got 3.0."),
        (dict(frequency_penalty=-2.5), "frequency_penalty must be in [-2, 2], got -2.5."),
        (dict(repetition_penalty=0.0), "repetition_penalty must be greater than zero, got 0.0."),
        (dict(max_tokens=0), "max_tokens must be at least 1, got 0."),
        (dict(min_tokens=5, max_tokens=3), "min_tokens must be less than or equal to max_tokens=3, got 5."),
        (dict(n=0), "n must be at least 1, got 0."),
        (dict(n=2, temperature=0), "n must be 1 when using greedy sampling, got 2."),
        (dict(stop=["ok", ""]), "stop cannot contain an empty string."),
        (dict(logprobs=-2), "logprobs must be non-negative or -1, got -2."),
    ],
)
def test_invalid_sampling_values(fields, message):
    with pytest.raises(ValueError) as error:
        SamplingParams(**fields)
    assert str(error.value) == message


def test_requests_the_model_cannot_take(tiny_models, make_llm):
    llm = make_llm(tiny_models["tiny-llama"])
    engine = llm.engine
    limit = engine.max_model_len
    cases = [
        (
            [5] * limit,
            SamplingParams(),
            f"maximum context length is {limit} tokens. However, your prompt contains {limit} input tokens",
        ),
        (
            [5, 6],
            SamplingParams(max_tokens=limit + 1),
            f"max_tokens={limit + 1} cannot be greater than max_model_len={limit}. Please request fewer output tokens.",
        ),
        ([5, 6], SamplingParams(logprobs=21), "Requested sample logprobs of 21, which is greater than max allowed: 20"),
        ([5, 6], SamplingParams(prompt_logprobs=-1), "Requested prompt logprobs of 512, which is greater than max"),
        ([], SamplingParams(), "The decoder prompt cannot be empty"),
        ([5, 100000], SamplingParams(), "Token id 100000 is out of vocabulary"),
    ]
    for ids, params, message in cases:
        with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
            llm.generate({"prompt_token_ids": ids}, params, use_tqdm=False)
        assert not engine.has_unfinished_requests()
    assert engine.page_pool.num_free == engine.page_pool.num_pages


def test_max_tokens_is_clamped_to_the_context(tiny_models, make_llm):
    llm = make_llm(tiny_models["tiny-llama"])
    limit = llm.engine.max_model_len
    out = llm.generate(
        {"prompt_token_ids": [5] * (limit - 3)},
        SamplingParams(temperature=0, max_tokens=50, ignore_eos=True),
        use_tqdm=False,
    )
    assert len(out[0].outputs[0].token_ids) == 3 and out[0].outputs[0].finish_reason == "length"


def test_a_bad_prompt_in_a_batch_rejects_the_whole_batch(tiny_models, make_llm):
    llm = make_llm(tiny_models["tiny-llama"])
    with pytest.raises(ValueError):
        llm.generate(["fine", {"prompt_token_ids": []}], use_tqdm=False)
    assert not llm.engine.has_unfinished_requests()
