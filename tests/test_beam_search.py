"""Beam search equals HF transformers' `generate(num_beams=..., length_penalty=..., early_stopping=...)` token for
token: the selection and stopping rules on their own (scored by the HF model itself, with an EOS chosen so that
beams do finish early), and through the engine, where beams share prefix pages."""

from __future__ import annotations

import pytest

from jaxserve.beam_search import BeamSearch, BeamSearchParams, continuations, run_beam_searches
from jaxserve.outputs import CompletionOutput, Logprob, RequestOutput

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

PROMPT = "Once upon a time in a small village"


def hf_beams(model, ids: list[int], num_beams: int, max_new_tokens: int, eos: list[int] | None, **options):
    """HF's beams, best first, without the prompt or padding (the model's generation_config replaced)."""
    model.generation_config = transformers.GenerationConfig(
        max_new_tokens=max_new_tokens, do_sample=False, num_beams=num_beams, num_return_sequences=num_beams,
        eos_token_id=eos, pad_token_id=-1, **options,
    )  # fmt: skip
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long))
    return [[t for t in row[len(ids) :].tolist() if t != -1] for row in out]


def hf_scorer(model, width: int):
    """`score` for run_beam_searches from the HF model: each prompt's top `width` next-token logprobs."""

    def score(prompts, params):
        outputs = []
        for prompt in prompts:
            with torch.no_grad():
                logits = model(torch.tensor([prompt])).logits[0, -1].float()
            top = torch.topk(torch.log_softmax(logits, -1), params.logprobs)
            entry = {int(t): Logprob(float(lp)) for lp, t in zip(top.values, top.indices)}
            outputs.append(RequestOutput("", None, prompt, None, [CompletionOutput(0, "", [], None, [entry])], True))
        return outputs

    return score


@pytest.fixture(scope="module")
def hf_llama(tiny_models):
    folder = tiny_models["tiny-llama"]
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    return model, transformers.AutoTokenizer.from_pretrained(folder)


@pytest.mark.parametrize(
    ("length_penalty", "early_stopping"), [(1.0, False), (0.0, True), (-1.0, "never"), (1.5, "never")]
)
def test_the_search_rules_are_hf_transformers(hf_llama, length_penalty, early_stopping):
    model, tokenizer = hf_llama
    ids = tokenizer(PROMPT).input_ids
    greedy = hf_beams(model, ids, 1, 6, None)[0]
    ended = 0
    for eos in ([greedy[1]], [greedy[2]], [greedy[3], greedy[4]]):  # tokens the beams are likely to meet early
        params = BeamSearchParams(
            beam_width=3, max_tokens=8, length_penalty=length_penalty, early_stopping=early_stopping
        )
        search = BeamSearch(params, eos)
        run_beam_searches([(ids, search)], hf_scorer(model, search.num_candidates))
        expected = hf_beams(model, ids, 3, 8, eos, length_penalty=length_penalty, early_stopping=early_stopping)
        assert [beam.tokens for beam in search.best(3)] == expected
        ended += sum(beam.tokens[-1] in eos for beam in search.best(3))
    assert ended or length_penalty > 1, "meant to exercise beams ending in EOS (a large penalty favours long ones)"


def test_llm_beam_search_equals_hf_and_shares_pages(tiny_models, make_llm, hf_llama):
    model, tokenizer = hf_llama
    llm = make_llm(tiny_models["tiny-llama"])
    prompts = [PROMPT, "The quick brown fox jumps over"]
    params = BeamSearchParams(beam_width=4, max_tokens=10, length_penalty=0.5)
    hits = llm.engine.stats().prefix_cache_hits
    outputs = llm.beam_search(prompts, params)
    for prompt, output in zip(prompts, outputs):
        ids = tokenizer(prompt).input_ids
        expected = hf_beams(model, ids, 4, 10, [2], length_penalty=0.5)
        assert [seq.tokens[len(ids) :] for seq in output.sequences] == expected
        assert output.sequences[0].text == tokenizer.decode(expected[0], skip_special_tokens=True)
        scores = [seq.score for seq in output.sequences]
        assert scores == sorted(scores, reverse=True)
    assert llm.engine.stats().prefix_cache_hits > hits  # every round re-reads the beams' shared prefix pages
    pool = llm.engine.page_pool
    assert pool.num_free == pool.num_pages and not any(pool.ref_counts)


def test_continuations_read_a_one_token_output():
    entry = {5: Logprob(-0.1), 7: Logprob(-2.0)}
    output = RequestOutput("r", None, [1], None, [CompletionOutput(0, "", [5], None, [entry])], True)
    assert continuations(output) == [(5, -0.1), (7, -2.0)]
