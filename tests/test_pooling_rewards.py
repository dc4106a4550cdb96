"""LLM reward models as vLLM serves them, on tiny random-weight models against torch references: Qwen2ForRewardModel
(a reward per token, raw by default), Qwen2ForProcessRewardModel (STEP pooling: the two-label softmax at each step
tag; `returned_token_ids` picking the head's columns), and a Llama sequence classifier with one label
(Skywork-Reward-Llama-3.1-8B's architecture) through classify."""

from __future__ import annotations

import re

import httpx
import numpy as np
import pytest

from jaxserve import AsyncEngine, PoolingParams
from jaxserve.models.qwen2_rm import Qwen2ForProcessRewardModel, Qwen2ForRewardModel
from jaxserve.pooler import resolve_pooler_config
from jaxserve.server.launch import background_server
from jaxserve.server.served_models import ServedModel
from scripts.make_test_models import PRM_STEP_TAG, PRM_STEP_TAG_ID, DecoderBuilder, qwen2_reward_reference

from .conftest import TINY_POOLING

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

TEXTS = ["The quick brown fox jumps over the lazy dog.", "Question: what is 17 + 25? Answer: 42.", "hello"]
STEPS = [  # as Qwen2.5-Math-PRM's inputs: each step closed by the step tag
    f"Question: what is 17 + 25?{PRM_STEP_TAG}Step 1: 17 + 25 = 42.{PRM_STEP_TAG}Step 2: it is 42.{PRM_STEP_TAG}",
    f"The cat found three apples.{PRM_STEP_TAG}It ate two.{PRM_STEP_TAG}",
    "No step tag in this one.",
]
STEP_CONFIG = {"step_tag_id": PRM_STEP_TAG_ID}  # the default, 151651, is outside the tiny vocabulary


def softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def sigmoid(x: np.ndarray) -> np.ndarray:
    return 1 / (1 + np.exp(-x))


def step_rows(output) -> np.ndarray:
    return np.asarray(output.prompt_token_ids) == PRM_STEP_TAG_ID


def test_qwen2_reward_model_scores_every_token_raw_by_default(tiny_models, make_pooling_llm):
    folder = tiny_models["tiny-qwen2-reward"]
    llm = make_pooling_llm(folder)
    assert llm.engine.spec.tasks == ("token_classify",)
    outputs = llm.reward(TEXTS, use_tqdm=False)
    for output in outputs:
        expected = qwen2_reward_reference(folder, output.prompt_token_ids)
        assert output.outputs.data.shape == expected.shape == (len(output.prompt_token_ids), 1)
        np.testing.assert_allclose(output.outputs.data, expected, atol=1e-4)  # no activation: vLLM's default here
    assert np.ptp(outputs[0].outputs.data) > 0.5
    activated = llm.reward(TEXTS[0], pooling_params=PoolingParams(use_activation=True), use_tqdm=False)[0]
    np.testing.assert_allclose(activated.outputs.data, sigmoid(outputs[0].outputs.data), atol=1e-5)  # one column


@pytest.mark.parametrize("prefix_caching", [True, False])  # the paged path (default) and the packed one
def test_prm_step_rewards_are_the_label_softmax_at_the_step_tags(tiny_models, make_pooling_llm, prefix_caching):
    folder = tiny_models["tiny-qwen2-prm"]
    llm = make_pooling_llm(folder, pooler_config=STEP_CONFIG, enable_prefix_caching=prefix_caching)
    # STEP pooling and the softmax are the model's defaults (151651, its <extra_0>, is outside the tiny vocabulary)
    assert llm.engine.spec.step_tag_id == PRM_STEP_TAG_ID and llm.engine.spec.tasks == ("token_classify",)
    outputs = llm.reward(STEPS, use_tqdm=False)
    for output, tags in zip(outputs, (3, 2, 0)):
        logits = qwen2_reward_reference(folder, output.prompt_token_ids)
        assert output.outputs.data.shape == (tags, 2)
        np.testing.assert_allclose(output.outputs.data, softmax(logits)[step_rows(output)], atol=1e-5)
    assert np.ptp(outputs[0].outputs.data[:, 1]) > 0.05  # the steps' probabilities differ
    raw = llm.reward(STEPS[0], pooling_params=PoolingParams(use_activation=False), use_tqdm=False)[0]
    logits = qwen2_reward_reference(folder, raw.prompt_token_ids)[step_rows(raw)]
    np.testing.assert_allclose(raw.outputs.data, logits, atol=1e-4)


def test_returned_token_ids_select_the_heads_columns(tiny_models, make_pooling_llm):
    """vLLM's StepPool: the columns first, then the activation over those kept (sigmoid for one, softmax for more)."""
    folder = tiny_models["tiny-qwen2-prm"]
    one = make_pooling_llm(folder, pooler_config=STEP_CONFIG | {"returned_token_ids": [1]})
    output = one.reward(STEPS[0], use_tqdm=False)[0]
    logits = qwen2_reward_reference(folder, output.prompt_token_ids)[step_rows(output)]
    assert output.outputs.data.shape == (3, 1)
    np.testing.assert_allclose(output.outputs.data[:, 0], sigmoid(logits[:, 1]), atol=1e-5)
    with pytest.raises(ValueError, match=r"returned_token_ids \[2\]: the model's token_classify head has 2 columns"):
        make_pooling_llm(folder, pooler_config={"returned_token_ids": [2]})


def test_pooler_config_over_the_models_defaults():
    """The user's keys win over the model's (vLLM's per-architecture config classes only fill what is unset)."""
    defaults = Qwen2ForProcessRewardModel.POOLER_DEFAULTS
    assert resolve_pooler_config(None, defaults) == {"tok_pooling_type": "STEP", "step_tag_id": 151651}
    assert resolve_pooler_config({"pooling_type": "STEP", "returned_token_ids": [1, 0]}, defaults) == {
        "tok_pooling_type": "STEP",
        "step_tag_id": 151651,
        "returned_token_ids": [1, 0],
    }
    assert resolve_pooler_config({"pooling_type": "ALL"}, defaults) == {"step_tag_id": 151651}  # ignored: not STEP
    assert resolve_pooler_config(None, Qwen2ForRewardModel.POOLER_DEFAULTS) == {"use_activation": False}
    for config, fragment in (
        ({"step_tag_id": "<extra_0>"}, "step_tag_id must be a token id"),
        ({"returned_token_ids": [-1]}, "returned_token_ids must be a list of column indices"),
        ({"tok_pooling_type": "MEAN"}, "tok_pooling_type 'MEAN' is not supported (ALL and STEP are)"),
    ):
        with pytest.raises(ValueError, match=re.escape(fragment)):
            resolve_pooler_config(config)


def test_step_rewards_alone_equal_those_packed_among_50(tiny_models, make_pooling_llm):
    llm = make_pooling_llm(tiny_models["tiny-qwen2-prm"], pooler_config=STEP_CONFIG)
    rng = np.random.default_rng(0)
    words = " ".join(TEXTS).split()
    batch = [
        PRM_STEP_TAG.join(" ".join(rng.choice(words, size=int(n))) for n in rng.integers(1, 9, size=3))
        for _ in range(50)
    ]
    batch[17] = STEPS[0]
    alone = llm.reward(STEPS[0], use_tqdm=False)[0].outputs.data
    packed = llm.reward(batch, use_tqdm=False)
    np.testing.assert_allclose(packed[17].outputs.data, alone, atol=1e-5)
    assert all(o.outputs.data.shape == (2, 2) for o in packed[:17])


@pytest.fixture(scope="module")
def skywork_style(tmp_path_factory):
    """A tiny LlamaForSequenceClassification with one label (Skywork/Skywork-Reward-Llama-3.1-8B's layout)."""
    folder = tmp_path_factory.mktemp("tiny-llama-reward")
    DecoderBuilder(
        model_class="LlamaForSequenceClassification",
        config_class="LlamaConfig",
        seed=32,
        config={"num_labels": 1, "tie_word_embeddings": False},
        generation=None,
    ).build(folder)
    return folder


def test_llama_reward_classifier_scores_as_hf(skywork_style, make_pooling_llm):
    """vLLM's classify activation for one label (no problem_type) is a sigmoid; use_activation=False gives the
    reward itself, the HF model's logit."""
    tokenizer = transformers.AutoTokenizer.from_pretrained(skywork_style)
    model = transformers.AutoModelForSequenceClassification.from_pretrained(skywork_style).eval()
    with torch.no_grad():
        logits = np.array([model(**tokenizer(t, return_tensors="pt")).logits[0, 0].item() for t in TEXTS])
    llm = make_pooling_llm(skywork_style)
    raw = llm.classify(TEXTS, pooling_params=PoolingParams(use_activation=False), use_tqdm=False)
    np.testing.assert_allclose([o.outputs.probs for o in raw], logits[:, None], atol=1e-4)
    probs = llm.classify(TEXTS, use_tqdm=False)
    np.testing.assert_allclose([o.outputs.probs for o in probs], sigmoid(logits)[:, None], atol=1e-5)
    assert np.ptp(logits) > 0.5


def test_step_rewards_over_http_pooling(tiny_models, llm_cache):
    llm = llm_cache(tiny_models["tiny-qwen2-prm"], TINY_POOLING, pooler_config=STEP_CONFIG)
    offline = llm.reward(STEPS[:2], use_tqdm=False)  # before the engine loop takes the engine over
    served = [ServedModel.from_engine(["prm"], "prm", AsyncEngine(llm.engine), "auto")]
    try:
        with background_server(served) as url:
            response = httpx.post(f"{url}/pooling", json={"model": "prm", "input": STEPS[:2]}, timeout=60)
    finally:
        served[0].engine.shutdown()
    assert response.status_code == 200, response.text
    for item, output in zip(response.json()["data"], offline):
        np.testing.assert_allclose(np.array(item["data"]), output.outputs.data, atol=1e-6)
