"""ModernBERT against its references, on tiny random-weight models whose local attention window (8: keys within 4
positions either side) is shorter than the test texts: embeddings vs sentence-transformers (gte-modernbert's
layout: CLS pooling, Normalize, a transformers 4.4x config.json), reranker scores vs CrossEncoder and logits vs
HF (mean pooling, biases everywhere, transformers 5's config keys), per-token logits vs
ModernBertForTokenClassification, packing invariance and the Pallas kernels."""

from __future__ import annotations

import json
import types

import numpy as np
import pytest

from jaxserve import PoolingParams
from jaxserve.model_source import load_hf_config
from jaxserve.pooler import build_spec
from models.modernbert import GLOBAL, LOCAL, ModernBertConfig, ModernBertForTokenClassification

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
sentence_transformers = pytest.importorskip("sentence_transformers")

LONG_TEXT = (
    "The old train left the station before dawn, carrying a quiet musician, a naïve tourist and the baker's "
    "brother through fields, forests and three small towns, until the river turned north and the pilot of the "
    "ferry waved at every student on the bridge."
)
TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "A journey of a thousand miles begins with a single step.",
    "Paris is the capital of France.",
    "hello",
    "Numbers like 42 and 1999 appear in this somewhat longer sentence about nothing in particular.",
    LONG_TEXT,
]
QUERY = "what is the price of coffee in Paris?"


def cosines(a, b) -> np.ndarray:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return (a * b).sum(-1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)


def hf_cls_embedding(folder, text: str, **config) -> np.ndarray:
    """The normalized [CLS] state of HF's ModernBertModel (config overrides applied)."""
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    model = transformers.AutoModel.from_pretrained(folder, **config).eval()
    with torch.no_grad():
        cls = model(**tokenizer(text, return_tensors="pt")).last_hidden_state[0, 0].numpy()
    return cls / np.linalg.norm(cls)


def test_embeddings_match_sentence_transformers(tiny_models, make_pooling_llm):
    folder = tiny_models["tiny-modernbert-embed"]
    model = sentence_transformers.SentenceTransformer(str(folder), device="cpu")
    expected = model.encode(TEXTS)
    got = np.array([o.outputs.embedding for o in make_pooling_llm(folder).embed(TEXTS, use_tqdm=False)])
    assert got.shape == expected.shape == (len(TEXTS), 32)
    assert cosines(got, expected).min() >= 0.9999
    np.testing.assert_allclose(np.linalg.norm(got, axis=-1), 1.0, atol=1e-5)
    sims = cosines(expected[:, None], expected[None, :])
    assert sims[~np.eye(len(TEXTS), dtype=bool)].max() < 0.99  # the embeddings differ clearly between texts
    # the local window shapes the long text's embedding: with every layer seeing the whole text it moves away
    assert len(model.tokenizer(LONG_TEXT).input_ids) > 40
    unwindowed = hf_cls_embedding(folder, LONG_TEXT, local_attention=1024)
    assert cosines(unwindowed, expected[-1]) < 0.99


def test_published_and_transformers_5_config_keys_read_alike(tiny_models):
    """The embedder's config.json holds transformers 4.4x's keys (as gte-modernbert-base's), which transformers 5
    turns into `layer_types` / `rope_parameters`; read raw, the older keys give the same configuration."""
    folder = tiny_models["tiny-modernbert-embed"]
    raw = json.loads((folder / "config.json").read_text())
    assert "layer_types" not in raw and raw["global_rope_theta"] != raw["local_rope_theta"]
    loaded = ModernBertConfig.from_hf(load_hf_config(folder))
    assert loaded == ModernBertConfig.from_hf(types.SimpleNamespace(**raw))
    assert loaded.layer_types == (GLOBAL, LOCAL, LOCAL)
    assert dict(loaded.rope)[GLOBAL].theta == raw["global_rope_theta"]
    assert dict(loaded.rope)[LOCAL].theta == raw["local_rope_theta"]
    assert loaded.local_window == raw["local_attention"] // 2 + 1  # the kernel keeps |i - j| < local_window
    assert not loaded.norm_bias


def test_reranker_scores_match_crossencoder_and_logits_match_hf(tiny_models, make_pooling_llm):
    folder = tiny_models["tiny-modernbert-reranker"]
    llm = make_pooling_llm(folder)
    assert llm.engine.spec.classify_pooling == "mean"
    expected = sentence_transformers.CrossEncoder(str(folder), device="cpu").predict([(QUERY, t) for t in TEXTS])
    got = [o.outputs.score for o in llm.score(QUERY, TEXTS, use_tqdm=False)]
    np.testing.assert_allclose(got, expected, atol=1e-4)
    assert np.ptp(expected) > 0.05

    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    model = transformers.AutoModelForSequenceClassification.from_pretrained(folder).eval()
    with torch.no_grad():  # a padded batch: HF's mean pools over the attention mask
        logits = model(**tokenizer(TEXTS, padding=True, return_tensors="pt")).logits[:, 0].numpy()
    raw = llm.classify(TEXTS, pooling_params=PoolingParams(use_activation=False), use_tqdm=False)
    np.testing.assert_allclose([o.outputs.probs[0] for o in raw], logits, atol=1e-4)


def test_token_classify_runs_the_head_on_every_token_as_hf(tiny_models, make_pooling_llm):
    """ModernBertForTokenClassification's head and classifier, on the reranker's weights (the same tensors), as
    the sequence classifier's token_classify computes them."""
    folder = tiny_models["tiny-modernbert-reranker"]
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    model = transformers.ModernBertForTokenClassification.from_pretrained(folder).eval()
    texts = TEXTS[3:]
    outputs = make_pooling_llm(folder).encode(texts, task="token_classify", use_tqdm=False)
    for text, output in zip(texts, outputs):
        with torch.no_grad():
            logits = model(**tokenizer(text, return_tensors="pt")).logits[0, :, 0].numpy()
        assert output.outputs.data.shape == (len(output.prompt_token_ids), 1)
        np.testing.assert_allclose(output.outputs.data[:, 0], 1 / (1 + np.exp(-logits)), atol=1e-5)
    # served as ModernBertForTokenClassification, the same head is its only task
    spec = build_spec(ModernBertForTokenClassification, load_hf_config(folder), folder, None, {})
    assert (spec.tasks, spec.token_classify_activation) == (("token_classify",), "sigmoid")


def test_a_text_packed_among_50_gives_the_same_output(tiny_models, make_pooling_llm):
    """The long text alone and among 49 short ones: no key of a neighbour leaks through the local window."""
    rng = np.random.default_rng(0)
    words = " ".join(TEXTS[:5]).split()
    batch = [" ".join(rng.choice(words, size=int(n))) for n in rng.integers(1, 8, size=50)]
    batch[17] = LONG_TEXT
    embedder = make_pooling_llm(tiny_models["tiny-modernbert-embed"])
    alone = np.array(embedder.embed(LONG_TEXT, use_tqdm=False)[0].outputs.embedding)
    packed = np.array(embedder.embed(batch, use_tqdm=False)[17].outputs.embedding)
    np.testing.assert_allclose(packed, alone, atol=1e-5)
    reranker = make_pooling_llm(tiny_models["tiny-modernbert-reranker"])
    alone = reranker.classify(LONG_TEXT, use_tqdm=False)[0].outputs.probs
    packed = reranker.classify(batch, use_tqdm=False)[17].outputs.probs
    np.testing.assert_allclose(packed, alone, atol=1e-5)


@pytest.mark.kernels
@pytest.mark.usefixtures("no_persistent_compile_cache")
@pytest.mark.parametrize("name", ["tiny-modernbert-reranker"])  # the embedder's path differs only by its CLS pool
def test_pallas_kernels_in_interpret_mode_give_the_reference_results(tiny_models, make_pooling_llm, name):
    """Local (sliding-window) and global attention and the CLS / mean pools on the Pallas kernels, run by Pallas'
    interpreter on CPU, give what the jnp references give."""
    small = dict(max_model_len=64, max_num_batched_tokens=64)  # fewer, smaller programs for the interpreter
    reference = make_pooling_llm(tiny_models[name], **small)
    pallas = make_pooling_llm(tiny_models[name], attention_backend="interpret", **small)
    assert (reference.engine.kernels.backend, pallas.engine.kernels.backend) == ("reference", "interpret")
    texts = [TEXTS[0], "Hello", TEXTS[4]]  # 12, 3 and 51 tokens
    for task in reference.engine.spec.tasks:
        want = reference.encode(texts, task=task, use_tqdm=False)
        got = pallas.encode(texts, task=task, use_tqdm=False)
        for w, g in zip(want, got):
            np.testing.assert_allclose(g.outputs.data, w.outputs.data, rtol=1e-4, atol=1e-5)
