"""Gemma 2 and 3 against HF transformers in float32: logits over the paged cache (prefill chunks and decode steps,
crossing the sliding window; Gemma 3's local and global layers with their own RoPE), greedy generation, the decoder
as an embedder (bge-multilingual-gemma2 style: the last token's final hidden state), and Gemma as an LLM
reranker."""

from __future__ import annotations

import numpy as np
import pytest

from jaxserve.kernels_pallas import REFERENCE_KERNELS, select_kernels

from .test_hf_parity import check_greedy_generation_matches_hf, check_logits_match_hf
from .test_pooling import TEXTS, assert_spread, cosines

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")


@pytest.mark.parametrize("name", ["tiny-gemma2", "tiny-gemma3"])
def test_logits_match_hf_for_chunked_prefill_and_decode(tiny_models, name):
    check_logits_match_hf(tiny_models[name], REFERENCE_KERNELS)


@pytest.mark.parametrize("name", ["tiny-gemma3"])  # Gemma 2's soft caps and windows are in the logits test
def test_greedy_generation_matches_hf_generate(tiny_models, make_llm, name):
    check_greedy_generation_matches_hf(tiny_models[name], make_llm(tiny_models[name]))


def test_last_token_embeddings_match_hf(tiny_models, make_pooling_llm):
    folder = tiny_models["tiny-gemma2"]
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    model = transformers.AutoModel.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        expected = np.stack(
            [model(**tokenizer(t, return_tensors="pt")).last_hidden_state[0, -1].numpy() for t in TEXTS]
        )
    llm = make_pooling_llm(folder, hf_overrides={"architectures": ["Gemma2Model"]})
    got = np.array([o.outputs.embedding for o in llm.embed(TEXTS, use_tqdm=False)])
    assert cosines(got, expected).min() >= 0.9999
    assert_spread(expected)


@pytest.mark.kernels
@pytest.mark.usefixtures("no_persistent_compile_cache")
def test_pallas_kernels_in_interpret_mode_match_hf(tiny_models):
    """Soft-capped scores and per-layer windows through ragged paged attention's Pallas kernel."""
    check_logits_match_hf(tiny_models["tiny-gemma2"], select_kernels("interpret"))


# bge-reranker-v2-gemma's prompt as its model card builds it (here without a BOS: the tiny vocabulary has none)
GEMMA_RERANKER_PROMPT = (
    "Given a query A and a passage B, determine whether the passage contains an answer to the query by providing a "
    "prediction of either 'Yes' or 'No'."
)
GEMMA_RERANKER_TEMPLATE = (
    "A: {{ messages[0]['content'] }}\nB: {{ messages[1]['content'] }}\n" + GEMMA_RERANKER_PROMPT + "\n"
)


def test_gemma_reranker_scores_as_its_model_card_does(tiny_models, make_pooling_llm):
    """bge-reranker-v2-gemma as vLLM serves it: GemmaForCausalLM with one `classifier_from_token` ("Yes"; here the
    tiny vocabulary's "y"), the score the sigmoid of that token's logit at the last position."""
    folder = tiny_models["tiny-gemma"]
    overrides = {"architectures": ["GemmaForSequenceClassification"], "classifier_from_token": ["y"]}
    llm = make_pooling_llm(folder, hf_overrides=overrides, chat_template=GEMMA_RERANKER_TEMPLATE)
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    yes = tokenizer.convert_tokens_to_ids("y")
    query, documents = TEXTS[0], TEXTS[1:]
    logits = []
    for document in documents:
        text = f"A: {query}\nB: {document}\n{GEMMA_RERANKER_PROMPT}"
        with torch.no_grad():
            logits.append(model(**tokenizer(text, return_tensors="pt")).logits[0, -1, yes].item())
    got = [o.outputs.score for o in llm.score(query, documents, use_tqdm=False)]
    np.testing.assert_allclose(got, 1 / (1 + np.exp(-np.array(logits))), rtol=1e-4, atol=1e-6)
    assert np.ptp(logits) > 0.5
