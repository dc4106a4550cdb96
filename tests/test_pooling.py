"""Pooling models against their references, on tiny random-weight models: embeddings vs sentence-transformers,
cross-encoder scores vs CrossEncoder, classifiers vs HF, per-token rewards and bge-m3's three outputs vs torch
references, scores vs NumPy, and packing invariance."""

from __future__ import annotations

import json
import re
import shutil

import numpy as np
import pytest

from jaxserve import PoolingParams
from jaxserve.pooler import resolve_pooler_config
from scripts.make_test_models import bge_m3_reference, internlm2_reward_reference

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
sentence_transformers = pytest.importorskip("sentence_transformers")

TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "A journey of a thousand miles begins with a single step.",
    "Paris is the capital of France.",
    "naïve café with 3 cats",
    "hello",
    "Numbers like 42 and 1999 appear in this somewhat longer sentence about nothing in particular.",
]


def cosines(a, b) -> np.ndarray:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return (a * b).sum(-1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)


def assert_spread(vectors) -> None:
    """The model's outputs differ clearly between inputs, so a parity check means something."""
    v = np.asarray(vectors, np.float64)
    sims = cosines(v[:, None, :], v[None, :, :])
    assert sims[~np.eye(len(v), dtype=bool)].max() < 0.99


@pytest.mark.parametrize("name", ["tiny-bert-mean", "tiny-bert-cls-dense", "tiny-bert-matryoshka", "tiny-bge-m3"])
def test_embeddings_match_sentence_transformers(tiny_models, make_pooling_llm, name):
    folder = tiny_models[name]
    expected = sentence_transformers.SentenceTransformer(str(folder), device="cpu").encode(TEXTS)
    got = np.array([o.outputs.embedding for o in make_pooling_llm(folder).embed(TEXTS, use_tqdm=False)])
    assert got.shape == expected.shape
    assert cosines(got, expected).min() >= 0.9999
    np.testing.assert_allclose(np.linalg.norm(got, axis=-1), 1.0, atol=1e-5)
    assert_spread(expected)


def test_prompts_from_the_sentence_transformers_config(tiny_models, make_pooling_llm):
    folder = tiny_models["tiny-bert-mean"]
    model = sentence_transformers.SentenceTransformer(str(folder), device="cpu")
    llm = make_pooling_llm(folder)
    got = np.array([o.outputs.embedding for o in llm.embed(TEXTS, prompt_name="query", use_tqdm=False)])
    assert cosines(got, model.encode(TEXTS, prompt_name="query")).min() >= 0.9999
    plain = np.array([o.outputs.embedding for o in llm.embed(TEXTS, use_tqdm=False)])
    assert cosines(got, plain).min() < 0.9999
    with pytest.raises(ValueError, match="Prompt name 'nope' not found"):
        llm.embed("x", prompt_name="nope", use_tqdm=False)


def test_matryoshka_dimensions_truncate_then_normalize(tiny_models, make_pooling_llm):
    folder = tiny_models["tiny-bert-matryoshka"]
    llm = make_pooling_llm(folder)
    full = np.array([o.outputs.embedding for o in llm.embed(TEXTS, use_tqdm=False)])
    short = np.array(
        [o.outputs.embedding for o in llm.embed(TEXTS, pooling_params=PoolingParams(dimensions=16), use_tqdm=False)]
    )
    expected = full[:, :16] / np.linalg.norm(full[:, :16], axis=-1, keepdims=True)
    np.testing.assert_allclose(short, expected, atol=1e-5)
    with pytest.raises(ValueError, match=r"only supports \[16, 32, 64\] matryoshka dimensions"):
        llm.embed("x", pooling_params=PoolingParams(dimensions=20), use_tqdm=False)


def test_unnormalized_embeddings(tiny_models, make_pooling_llm):
    folder = tiny_models["tiny-bert-mean"]
    llm = make_pooling_llm(folder)
    raw = llm.embed(TEXTS[:2], pooling_params=PoolingParams(use_activation=False), use_tqdm=False)
    legacy = llm.embed(TEXTS[:2], pooling_params=PoolingParams(normalize=False), use_tqdm=False)
    norms = [np.linalg.norm(o.outputs.embedding) for o in raw]
    assert min(abs(n - 1.0) for n in norms) > 1e-3
    assert [o.outputs.embedding for o in raw] == [o.outputs.embedding for o in legacy]


def test_cross_encoder_scores_match_crossencoder_predict(tiny_models, make_pooling_llm):
    folder = tiny_models["tiny-xlmr-cross-encoder"]
    query, documents = TEXTS[0], TEXTS[1:]
    expected = sentence_transformers.CrossEncoder(str(folder), device="cpu").predict([(query, d) for d in documents])
    got = [o.outputs.score for o in make_pooling_llm(folder).score(query, documents, use_tqdm=False)]
    np.testing.assert_allclose(got, expected, atol=1e-5)
    assert np.ptp(expected) > 0.05


@pytest.mark.parametrize("name", ["tiny-bert-classifier", "tiny-distilbert-sst2", "tiny-qwen2-classifier"])
def test_classifier_probabilities_and_labels_match_hf(tiny_models, make_pooling_llm, name):
    folder = tiny_models[name]
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    model = transformers.AutoModelForSequenceClassification.from_pretrained(folder).eval()
    with torch.no_grad():
        logits = np.stack([model(**tokenizer(t, return_tensors="pt")).logits[0].numpy() for t in TEXTS])
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    llm = make_pooling_llm(folder)
    got = llm.classify(TEXTS, use_tqdm=False)
    np.testing.assert_allclose([o.outputs.probs for o in got], probs, atol=1e-5)
    assert [o.outputs.label for o in got] == [model.config.id2label[int(i)] for i in logits.argmax(-1)]
    raw = llm.classify(TEXTS, pooling_params=PoolingParams(use_activation=False), use_tqdm=False)
    np.testing.assert_allclose([o.outputs.probs for o in raw], logits, atol=1e-4)
    assert np.ptp(logits) > 1.0


def test_pooler_config_as_vllm_reads_it(tiny_models, make_pooling_llm):
    assert resolve_pooler_config({"normalize": False, "seq_pooling_type": "MEAN", "tok_pooling_type": "ALL"}) == {
        "use_activation": False,
        "pooling_type": "MEAN",
    }
    for config, fragment in (
        ({"pooling_typ": "MEAN"}, "Unknown pooler_config keys ['pooling_typ']"),
        ({"max_embed_len": 1000}, "max_embed_len needs enable_chunked_processing"),
        ({"tok_pooling_type": "MAX"}, "tok_pooling_type 'MAX'"),
    ):
        with pytest.raises(ValueError, match=re.escape(fragment)):
            resolve_pooler_config(config)
    folder = tiny_models["tiny-bert-classifier"]
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    model = transformers.AutoModelForSequenceClassification.from_pretrained(folder).eval()
    with torch.no_grad():
        logits = np.stack([model(**tokenizer(t, return_tensors="pt")).logits[0].numpy() for t in TEXTS])
    shifted = make_pooling_llm(folder, pooler_config={"logit_mean": 0.5, "logit_sigma": 2.0, "normalize": False})
    got = [o.outputs.probs for o in shifted.classify(TEXTS, use_tqdm=False)]  # raw by default: normalize false
    np.testing.assert_allclose(got, (logits - 0.5) / 2.0, atol=1e-4)


def test_token_classifier_labels_every_token_as_hf(tiny_models, make_pooling_llm):
    folder = tiny_models["tiny-bert-ner"]
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    model = transformers.AutoModelForTokenClassification.from_pretrained(folder).eval()
    llm = make_pooling_llm(folder)
    assert llm.engine.spec.tasks == ("token_classify",)
    outputs = llm.encode(TEXTS, task="token_classify", use_tqdm=False)
    for text, output in zip(TEXTS, outputs):
        with torch.no_grad():
            logits = model(**tokenizer(text, return_tensors="pt")).logits[0].numpy()
        probs = np.exp(logits - logits.max(-1, keepdims=True))
        probs /= probs.sum(-1, keepdims=True)
        assert output.outputs.data.shape == (len(output.prompt_token_ids), 5)
        np.testing.assert_allclose(output.outputs.data, probs, atol=1e-5)
    assert len({int(i) for o in outputs for i in o.outputs.data.argmax(-1)}) > 1  # the labels differ by token


def test_reward_model_scores_every_token(tiny_models, make_pooling_llm):
    folder = tiny_models["tiny-internlm2-reward"]
    llm = make_pooling_llm(folder)
    outputs = llm.reward(TEXTS, use_tqdm=False)
    for output in outputs:
        expected = internlm2_reward_reference(folder, output.prompt_token_ids)
        assert output.outputs.data.shape == (len(output.prompt_token_ids), 1)
        np.testing.assert_allclose(output.outputs.data[:, 0], expected, atol=1e-4)
    assert np.ptp(outputs[0].outputs.data) > 0.1


def test_bge_m3_dense_colbert_and_sparse(tiny_models, make_pooling_llm):
    folder = tiny_models["tiny-bge-m3"]
    llm = make_pooling_llm(folder)
    expected = bge_m3_reference(folder, TEXTS)
    dense = np.array([o.outputs.data for o in llm.encode(TEXTS, task="embed", use_tqdm=False)])
    np.testing.assert_allclose(dense, np.asarray(expected["dense"]), atol=1e-5)
    for got, want in zip(llm.encode(TEXTS, task="token_embed", use_tqdm=False), expected["colbert"]):
        np.testing.assert_allclose(got.outputs.data, want, atol=1e-5)
    for got, want in zip(llm.encode(TEXTS, task="token_classify", use_tqdm=False), expected["sparse"]):
        np.testing.assert_allclose(got.outputs.data[:, 0], want, rtol=1e-4, atol=1e-5)


def test_bi_encoder_and_late_interaction_scores_match_numpy(tiny_models, make_pooling_llm):
    query, documents = TEXTS[0], TEXTS[1:4]
    embedder = make_pooling_llm(tiny_models["tiny-bert-mean"])
    vectors = {t: np.array(o.outputs.embedding) for t, o in zip(TEXTS, embedder.embed(TEXTS, use_tqdm=False))}
    scores = [o.outputs.score for o in embedder.score(query, documents, use_tqdm=False)]
    np.testing.assert_allclose(scores, [cosines(vectors[query], vectors[d]) for d in documents], atol=1e-6)

    colbert = make_pooling_llm(tiny_models["tiny-bge-m3"], pooler_config={"task": "token_embed"})
    tokens = {t: o.outputs.data for t, o in zip(TEXTS, colbert.encode(TEXTS, use_tqdm=False))}
    scores = [o.outputs.score for o in colbert.score([query] * 3, documents, use_tqdm=False)]
    expected = [(tokens[query] @ tokens[d].T).max(axis=1).sum() for d in documents]
    np.testing.assert_allclose(scores, expected, rtol=1e-5)


def test_pairing_rules(tiny_models, make_pooling_llm):
    llm = make_pooling_llm(tiny_models["tiny-bert-mean"])
    assert len(llm.score(TEXTS[:3], TEXTS[3:], use_tqdm=False)) == 3  # N:N, zipped
    with pytest.raises(ValueError, match="Input lengths must be either 1:1, 1:N or N:N"):
        llm.score(TEXTS[:2], TEXTS[2:5], use_tqdm=False)
    with pytest.raises(ValueError, match="At least one text element must be given"):
        llm.score([], TEXTS, use_tqdm=False)


def test_a_text_packed_among_50_gives_the_same_vector(tiny_models, make_pooling_llm):
    llm = make_pooling_llm(tiny_models["tiny-bert-cls-dense"])
    rng = np.random.default_rng(0)
    words = " ".join(TEXTS).split()
    batch = [" ".join(rng.choice(words, size=int(n))) for n in rng.integers(1, 20, size=50)]
    batch[17] = TEXTS[2]
    alone = np.array(llm.embed(TEXTS[2], use_tqdm=False)[0].outputs.embedding)
    packed = np.array(llm.embed(batch, use_tqdm=False)[17].outputs.embedding)
    np.testing.assert_allclose(packed, alone, atol=1e-5)  # float32 roundoff of another bucket shape


def test_truncation(tiny_models, make_pooling_llm):
    llm = make_pooling_llm(tiny_models["tiny-bert-mean"])
    long_text = " ".join(TEXTS * 4)
    right = llm.embed(long_text, truncate_prompt_tokens=8, use_tqdm=False)[0]
    left = llm.embed(long_text, truncate_prompt_tokens=8, truncation_side="left", use_tqdm=False)[0]
    ids = llm.get_tokenizer().encode(long_text)
    assert right.prompt_token_ids == ids[:7] + ids[-1:]  # [CLS] + the first tokens + [SEP]
    assert left.prompt_token_ids == ids[:1] + ids[-7:]
    limit = llm.engine.max_model_len
    with pytest.raises(ValueError, match=f"maximum context length is {limit} tokens"):
        llm.embed(" ".join(TEXTS * 20), use_tqdm=False)
    full = llm.embed(" ".join(TEXTS * 20), truncate_prompt_tokens=-1, use_tqdm=False)[0]
    assert len(full.prompt_token_ids) == limit
    with pytest.raises(ValueError, match="is greater than max_model_len"):
        llm.embed("x", truncate_prompt_tokens=limit + 1, use_tqdm=False)
    token_input = llm.encode({"prompt_token_ids": ids}, truncate_prompt_tokens=5, use_tqdm=False)[0]
    assert token_input.prompt_token_ids == ids[:5]
    by_params = llm.embed(long_text, pooling_params=PoolingParams(truncate_prompt_tokens=8), use_tqdm=False)[0]
    assert by_params.prompt_token_ids == right.prompt_token_ids


def test_bad_requests(tiny_models, make_pooling_llm):
    llm = make_pooling_llm(tiny_models["tiny-bert-mean"])
    with pytest.raises(ValueError, match="You must pass at least one prompt"):
        llm.embed([], use_tqdm=False)
    with pytest.raises(ValueError, match="The decoder prompt cannot be empty"):
        llm.encode({"prompt_token_ids": []}, use_tqdm=False)
    with pytest.raises(ValueError, match=r"Unsupported task: 'classify' Supported tasks: \('embed', 'token_embed'\)"):
        llm.classify("x", use_tqdm=False)
    with pytest.raises(ValueError, match="does not support matryoshka representation"):
        llm.embed("x", pooling_params=PoolingParams(dimensions=8), use_tqdm=False)
    with pytest.raises(ValueError, match="`score` task was removed; use `classify` instead."):
        PoolingParams(task="score")
    with pytest.raises(ValueError, match="only supported for generative models"):
        llm.generate("x")
    assert not llm.engine.has_unfinished_requests()


@pytest.mark.kernels
@pytest.mark.usefixtures("no_persistent_compile_cache")
@pytest.mark.parametrize(
    "name",
    # an encoder's embeddings (bert) and a causal backbone's classify and token_classify (qwen2); bge-m3's heads and
    # the other families' layers are jnp around the same kernel calls
    ["tiny-bert-mean", "tiny-qwen2-classifier"],
)
def test_pallas_kernels_in_interpret_mode_give_the_reference_results(tiny_models, make_pooling_llm, name):
    """The engine with its attention and pooling forced onto the Pallas kernels (run by Pallas' interpreter on
    CPU) pools every task as it does on the jnp references."""
    reference = make_pooling_llm(tiny_models[name])
    pallas = make_pooling_llm(tiny_models[name], attention_backend="interpret")
    assert (reference.engine.kernels.backend, pallas.engine.kernels.backend) == ("reference", "interpret")
    texts = ["The quick brown fox jumps over the lazy dog.", "Hello", "A somewhat longer sentence, " * 2]
    for task in reference.engine.spec.tasks:
        want = reference.encode(texts, task=task, use_tqdm=False)
        got = pallas.encode(texts, task=task, use_tqdm=False)
        for w, g in zip(want, got):
            np.testing.assert_allclose(g.outputs.data, w.outputs.data, rtol=1e-4, atol=1e-5)


def test_sharded_pytorch_bin_weights_load_as_the_safetensors_do(tiny_models, make_pooling_llm, tmp_path):
    """Weights as published in `.bin` shards with an index (read without PyTorch) give the same rewards."""
    from safetensors.numpy import load_file

    source = tiny_models["tiny-internlm2-reward-published"]
    folder = tmp_path / "bin-shards"
    shutil.copytree(source, folder, ignore=shutil.ignore_patterns("*.safetensors", ".complete"))
    tensors = load_file(source / "model.safetensors")
    names = sorted(tensors)
    shards = {"pytorch_model-00001-of-00002.bin": names[::2], "pytorch_model-00002-of-00002.bin": names[1::2]}
    for file, shard in shards.items():
        torch.save({name: torch.from_numpy(tensors[name]) for name in shard}, folder / file)
    weight_map = {name: file for file, shard in shards.items() for name in shard}
    (folder / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}))
    from_bin = make_pooling_llm(folder).reward(TEXTS[:2], use_tqdm=False)
    from_safetensors = make_pooling_llm(source).reward(TEXTS[:2], use_tqdm=False)
    for a, b in zip(from_bin, from_safetensors):
        np.testing.assert_allclose(a.outputs.data, b.outputs.data, atol=1e-6)


# Qwen3-Reranker's prompt as its model card writes it, and a score template that renders the same (Jinja drops one
# trailing newline, hence three)
RERANKER_PREFIX = (
    "<|im_start|>system\nJudge whether the Document meets the requirements based on the Query and the Instruct "
    'provided. Note that the answer can only be "yes" or "no".<|im_end|>\n<|im_start|>user\n'
)
RERANKER_SUFFIX = "<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
DEFAULT_INSTRUCTION = "Given a web search query, retrieve relevant passages that answer the query"
RERANKER_TEMPLATE = (
    RERANKER_PREFIX
    + "<Instruct>: {{ instruction | default('"
    + DEFAULT_INSTRUCTION
    + "', true) }}\n"
    + "<Query>: {{ messages[0]['content'] }}\n<Document>: {{ messages[1]['content'] }}"
    + RERANKER_SUFFIX
    + "\n"
)


def test_an_llm_reranker_scores_as_its_model_card_does(tiny_models, make_pooling_llm):
    """Qwen3-Reranker as vLLM serves it: the causal LM with `classifier_from_token` (here the tiny vocabulary's
    "n" and "y" for "no" and "yes") and a score template; the score is the probability of "yes" against "no" at
    the last token, as the model card computes it."""
    folder = tiny_models["tiny-qwen3"]
    overrides = {
        "architectures": ["Qwen3ForSequenceClassification"],
        "classifier_from_token": ["n", "y"],
        "is_original_qwen3_reranker": True,
    }
    llm = make_pooling_llm(folder, hf_overrides=overrides, chat_template=RERANKER_TEMPLATE)
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    model = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
    no, yes = tokenizer.convert_tokens_to_ids(["n", "y"])
    query, documents = TEXTS[0], TEXTS[1:]
    for instruction in (None, "Find texts about animals"):
        margins = []  # the logit of "yes" less that of "no": the score before its sigmoid
        for document in documents:
            body = f"<Instruct>: {instruction or DEFAULT_INSTRUCTION}\n<Query>: {query}\n<Document>: {document}"
            ids = tokenizer(RERANKER_PREFIX + body + RERANKER_SUFFIX, return_tensors="pt", add_special_tokens=False)
            with torch.no_grad():
                logits = model(**ids).logits[0, -1]
            margins.append((logits[yes] - logits[no]).item())
        raw = PoolingParams(use_activation=False)
        got = [
            o.outputs.score
            for o in llm.score(query, documents, instruction=instruction, pooling_params=raw, use_tqdm=False)
        ]
        np.testing.assert_allclose(got, margins, atol=1e-3)
        probabilities = [o.outputs.score for o in llm.score(query, documents, instruction=instruction, use_tqdm=False)]
        np.testing.assert_allclose(probabilities, 1 / (1 + np.exp(-np.array(margins))), rtol=1e-3)
        assert np.ptp(margins) > 0.5
