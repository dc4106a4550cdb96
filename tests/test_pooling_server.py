"""The pooling routes over HTTP: a real uvicorn server on loopback serving tiny embedding, Matryoshka,
cross-encoder, classifier, reward and bge-m3 models (and the real default MiniLM), driven by the `openai`
client and `httpx`; results compared with the offline `LLM` API and sentence-transformers."""

from __future__ import annotations

import base64
import json
import subprocess
import sys
from pathlib import Path

import httpx
import ml_dtypes
import numpy as np
import openai
import pytest

from jaxserve import AsyncEngine, PoolingParams
from jaxserve.model_source import DEFAULT_POOLING_MODEL, ROLE_CONTENT_TEMPLATE, resolve_model
from jaxserve.server.launch import background_server
from jaxserve.server.served_models import ServedModel
from scripts.make_test_models import internlm2_reward_reference

from .conftest import TINY_ENGINE, TINY_POOLING

ROOT = Path(__file__).resolve().parents[1]
TEXTS = ["The cat sits outside.", "A man is playing guitar in the park today.", "Pasta!", "Quantum bits and bytes"]
MODELS = {  # served name: (test model, engine arguments beyond TINY_POOLING)
    "embed": ("tiny-bert-mean", {"chat_template": ROLE_CONTENT_TEMPLATE}),
    "matryoshka": ("tiny-bert-matryoshka", {}),
    "cross": ("tiny-xlmr-cross-encoder", {}),
    "classifier": ("tiny-bert-classifier", {}),
    "reward": ("tiny-internlm2-reward", {}),
    "m3": ("tiny-bge-m3", {}),
    "colbert": ("tiny-bge-m3", {"pooler_config": {"task": "token_embed"}}),
    "published": ("tiny-internlm2-reward-published", {}),
    "long": ("tiny-bert-mean", {"pooler_config": {"enable_chunked_processing": True, "max_embed_len": 200}}),
}


@pytest.fixture(scope="module")
def llms(tiny_models, llm_cache):
    return {name: llm_cache(tiny_models[folder], TINY_POOLING, **extra) for name, (folder, extra) in MODELS.items()}


@pytest.fixture(scope="module")
def url(llms):
    served = [ServedModel.from_engine([name], name, AsyncEngine(llm.engine), "auto") for name, llm in llms.items()]
    with background_server(served) as base:
        yield base
    for model in served:
        model.engine.shutdown()


def post(url: str, path: str, body: dict) -> dict:
    response = httpx.post(f"{url}{path}", json=body, timeout=60)
    assert response.status_code == 200, response.text
    return response.json()


def offline_embeddings(llm, texts, **kwargs) -> np.ndarray:
    return np.array([o.outputs.embedding for o in llm.embed(texts, use_tqdm=False, **kwargs)])


# --- /v1/embeddings ------------------------------------------------------------------------------------------


def test_openai_embeddings_equal_offline_and_sentence_transformers(url, llms, tiny_models):
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
    result = client.embeddings.create(model="embed", input=TEXTS)
    got = np.array([d.embedding for d in result.data])
    np.testing.assert_allclose(got, offline_embeddings(llms["embed"], TEXTS), atol=1e-6)
    sentence_transformers = pytest.importorskip("sentence_transformers")
    reference = sentence_transformers.SentenceTransformer(str(tiny_models["tiny-bert-mean"]), device="cpu")
    expected = reference.encode(TEXTS)
    assert ((got * expected).sum(-1) / np.linalg.norm(expected, axis=-1)).min() >= 0.9999
    tokenizer = llms["embed"].get_tokenizer()
    assert result.usage.prompt_tokens == sum(len(tokenizer.encode(t)) for t in TEXTS) == result.usage.total_tokens
    assert [d.index for d in result.data] == [0, 1, 2, 3]
    assert not np.allclose(got[0], got[1])  # the weights are large enough that inputs differ clearly

    ids = tokenizer.encode(TEXTS[1])
    by_ids = post(url, "/v1/embeddings", {"model": "embed", "input": [ids]})["data"][0]["embedding"]
    np.testing.assert_allclose(by_ids, got[1], atol=1e-6)


def test_cohere_embed_equals_sentence_transformers_with_the_prompt_of_its_input_type(url, llms, tiny_models):
    body = {"model": "embed", "texts": TEXTS, "input_type": "query", "embedding_types": ["float", "ubinary", "binary"]}
    answer = post(url, "/v2/embed", body)
    floats = np.array(answer["embeddings"]["float"], np.float32)
    sentence_transformers = pytest.importorskip("sentence_transformers")
    reference = sentence_transformers.SentenceTransformer(str(tiny_models["tiny-bert-mean"]), device="cpu")
    expected = reference.encode(TEXTS, prompt_name="query")  # "query: " before each text
    assert ((floats * expected).sum(-1) / np.linalg.norm(expected, axis=-1)).min() >= 0.9999
    unprefixed = np.array(post(url, "/v2/embed", {"model": "embed", "texts": TEXTS})["embeddings"]["float"])
    assert not np.allclose(unprefixed, floats, atol=1e-3)
    bits = np.unpackbits(np.array(answer["embeddings"]["ubinary"], np.uint8), axis=1)
    np.testing.assert_array_equal(bits, (floats >= 0).astype(np.uint8))
    np.testing.assert_array_equal(np.array(answer["embeddings"]["binary"]), np.packbits(bits, axis=1).astype(int) - 128)
    tokenizer = llms["embed"].get_tokenizer()
    assert answer["texts"] == TEXTS and answer["meta"]["api_version"] == {"version": "2"}
    assert answer["meta"]["tokens"]["input_tokens"] == sum(len(tokenizer.encode("query: " + t)) for t in TEXTS)

    b64 = post(url, "/v2/embed", {"model": "embed", "texts": TEXTS[:1], "embedding_types": ["base64"]})["embeddings"]
    assert set(b64) == {"base64"}
    np.testing.assert_allclose(np.frombuffer(base64.b64decode(b64["base64"][0]), "<f4"), unprefixed[0], atol=1e-5)
    parts = {"model": "embed", "inputs": [{"content": [{"type": "text", "text": TEXTS[0]}]}]}
    as_chat = post(url, "/v2/embed", parts)["embeddings"]["float"][0]
    chat = post(url, "/v1/embeddings", {"model": "embed", "messages": [{"role": "user", "content": TEXTS[0]}]})
    np.testing.assert_allclose(as_chat, chat["data"][0]["embedding"], atol=1e-6)

    long_text = " ".join(["word"] * 40)
    kept_start = post(url, "/v2/embed", {"model": "embed", "texts": [long_text], "max_tokens": 8})
    assert kept_start["meta"]["tokens"]["input_tokens"] == 8
    for bad, fragment in (
        ({"texts": [long_text], "truncate": "NONE", "max_tokens": 8}, "exceeds max_tokens=8"),
        ({"texts": TEXTS, "input_type": "classification"}, "Supported values: passage, query"),
        ({"images": ["data:image/png;base64,AAAA"]}, "image inputs are not supported"),
        ({"texts": TEXTS, "inputs": []}, "Exactly one of texts, images, or inputs"),
        ({"texts": ["x"], "embedding_types": ["int4"]}, "embedding_types"),
    ):
        response = httpx.post(f"{url}/v2/embed", json={"model": "embed", **bad})
        assert response.status_code == 400 and fragment in response.json()["error"]["message"], response.text


def test_long_inputs_are_embedded_in_windows_and_averaged(url, llms):
    """vLLM's chunked processing: windows of the model's 64 tokens, each embedded, averaged by token count."""
    llm = llms["long"]
    text = " ".join(f"word{i % 17} and more" for i in range(24))
    ids = llm.engine.prepare(text).token_ids
    assert 128 < len(ids) <= 200
    windows = [ids[start : start + 64] for start in range(0, len(ids), 64)]
    vectors = offline_embeddings(llm, windows)
    expected = sum(v * len(w) for v, w in zip(vectors, windows)) / len(ids)
    got = post(url, "/v1/embeddings", {"model": "long", "input": [text, "short text"]})["data"]
    np.testing.assert_allclose(got[0]["embedding"], expected, atol=1e-5)
    np.testing.assert_allclose(got[1]["embedding"], offline_embeddings(llm, ["short text"])[0], atol=1e-5)
    assert not np.allclose(expected, vectors[0], atol=1e-2)  # the later windows count
    too_long = httpx.post(f"{url}/v1/embeddings", json={"model": "long", "input": text * 2})
    assert too_long.status_code == 400 and "maximum embedding input length is 200" in too_long.text


def test_the_seed_reward_model_as_published_over_pooling(url, llms, tiny_models):
    """The seed's pooling client against a folder laid out like internlm/internlm2-1_8b-reward (remote-code
    tokenizer, SentencePiece model): completion-style and chat-style input give per-token rewards."""
    folder = tiny_models["tiny-internlm2-reward-published"]
    tokenizer = llms["published"].get_tokenizer()
    whole = post(url, "/pooling", {"model": "published", "input": "vLLM is great!"})["data"][0]["data"]
    ids = tokenizer.encode("vLLM is great!")
    assert ids[0] == 1 and len(whole) == len(ids)  # BOS first, one reward per token
    np.testing.assert_allclose(np.array(whole)[:, 0], internlm2_reward_reference(folder, ids), atol=1e-4)
    messages = [{"role": "user", "content": "vLLM is great!"}]
    chat = post(url, "/pooling", {"model": "published", "messages": messages})["data"][0]["data"]
    ids = tokenizer.encode(tokenizer.render_chat(messages, add_generation_prompt=False), add_special_tokens=False)
    np.testing.assert_allclose(np.array(chat)[:, 0], internlm2_reward_reference(folder, ids), atol=1e-4)


def test_float_base64_and_bytes_encode_the_same_vectors(url):
    body = {"model": "embed", "input": TEXTS[:2]}
    floats = np.array([d["embedding"] for d in post(url, "/v1/embeddings", body)["data"]], np.float32)
    b64 = post(url, "/v1/embeddings", {**body, "encoding_format": "base64"})["data"]
    decoded = np.array([np.frombuffer(base64.b64decode(d["embedding"]), np.float32) for d in b64])
    np.testing.assert_array_equal(decoded, floats)

    raw = httpx.post(f"{url}/v1/embeddings", json={**body, "encoding_format": "bytes"})
    assert raw.headers["content-type"] == "application/octet-stream"
    metadata = json.loads(raw.headers["metadata"])
    for item, vector in zip(metadata["data"], floats):
        chunk = raw.content[item["start"] : item["end"]]
        np.testing.assert_array_equal(np.frombuffer(chunk, np.float32).reshape(item["shape"]), vector)
    only = httpx.post(f"{url}/v1/embeddings", json={**body, "encoding_format": "bytes_only"})
    assert only.content == raw.content and "metadata" not in only.headers

    for dtype, numpy_dtype, tolerance in (
        ("float16", np.float16, 1e-2),
        ("bfloat16", ml_dtypes.bfloat16, 1e-2),
        ("fp8_e4m3", ml_dtypes.float8_e4m3fn, 0.1),
        ("fp8_e5m2", ml_dtypes.float8_e5m2, 0.1),
    ):
        for endianness in ("little", "big"):
            encoded = post(
                url,
                "/v1/embeddings",
                {**body, "encoding_format": "base64", "embed_dtype": dtype, "endianness": endianness},
            )["data"]
            order = "<" if endianness == "little" else ">"
            values = [
                np.frombuffer(base64.b64decode(d["embedding"]), np.dtype(numpy_dtype).newbyteorder(order))
                for d in encoded
            ]
            np.testing.assert_allclose(np.array(values, np.float32), floats, atol=tolerance)


def test_dimensions_truncation_and_activation(url, llms):
    text = TEXTS[1]
    short = post(url, "/v1/embeddings", {"model": "matryoshka", "input": text, "dimensions": 16})["data"][0]
    assert len(short["embedding"]) == 16 and np.linalg.norm(short["embedding"]) == pytest.approx(1, abs=1e-5)
    offline = offline_embeddings(llms["matryoshka"], [text], pooling_params=PoolingParams(dimensions=16))[0]
    np.testing.assert_allclose(short["embedding"], offline, atol=1e-6)
    bad = httpx.post(f"{url}/v1/embeddings", json={"model": "embed", "input": text, "dimensions": 8})
    assert bad.status_code == 400 and "matryoshka" in bad.json()["error"]["message"]

    truncated = post(url, "/v1/embeddings", {"model": "embed", "input": text, "truncate_prompt_tokens": 5})
    assert truncated["usage"]["prompt_tokens"] == 5
    offline = offline_embeddings(llms["embed"], [text], truncate_prompt_tokens=5)[0]
    np.testing.assert_allclose(truncated["data"][0]["embedding"], offline, atol=1e-6)
    too_long = httpx.post(f"{url}/v1/embeddings", json={"model": "embed", "input": "word " * 500})
    assert too_long.status_code == 400 and "maximum context length" in too_long.json()["error"]["message"]
    assert too_long.json()["error"]["param"] == "input_tokens"

    raw = post(url, "/v1/embeddings", {"model": "embed", "input": text, "use_activation": False})["data"][0]
    legacy = post(url, "/v1/embeddings", {"model": "embed", "input": text, "normalize": False})["data"][0]
    assert raw["embedding"] == legacy["embedding"] and np.linalg.norm(raw["embedding"]) != pytest.approx(1)


def test_chat_style_inputs_embed_the_rendered_conversation(url, llms):
    messages = [{"role": "user", "content": [{"type": "text", "text": "Hello there"}]}]
    # the role: content template frames the conversation with [CLS] ... [SEP]: the same tokens as the plain text
    expected = offline_embeddings(llms["embed"], ["user: Hello there"])[0]
    for path, key in (("/v1/embeddings", "embedding"), ("/pooling", "data")):
        body = {"model": "embed", "messages": messages}
        if path == "/pooling":
            body["task"] = "embed"
        np.testing.assert_allclose(post(url, path, body)["data"][0][key], expected, atol=1e-6)
    no_template = httpx.post(f"{url}/v1/embeddings", json={"model": "matryoshka", "messages": messages})
    assert no_template.status_code == 400 and "chat template" in no_template.json()["error"]["message"]


# --- /pooling ------------------------------------------------------------------------------------------------


def test_pooling_gives_token_matrices_rewards_or_sequence_outputs(url, llms):
    matrices = post(url, "/pooling", {"model": "embed", "input": TEXTS})["data"]
    offline = llms["embed"].encode(TEXTS, task="token_embed", use_tqdm=False)
    for item, want in zip(matrices, offline):
        assert item["object"] == "pooling"
        # the server may pack the texts into other steps (buckets) than the offline call: float32 noise, ~1e-6
        np.testing.assert_allclose(np.array(item["data"]), want.outputs.data, atol=1e-5)
    assert len({len(item["data"]) for item in matrices}) > 1  # one row per token of each text

    rewards = post(url, "/pooling", {"model": "reward", "input": TEXTS[0]})["data"][0]["data"]
    np.testing.assert_allclose(
        np.array(rewards), llms["reward"].reward(TEXTS[0], use_tqdm=False)[0].outputs.data, atol=1e-5
    )

    probs = post(url, "/pooling", {"model": "classifier", "input": TEXTS[0]})["data"][0]["data"]
    np.testing.assert_allclose(probs, llms["classifier"].classify(TEXTS[0], use_tqdm=False)[0].outputs.probs, atol=1e-6)

    b64 = post(url, "/pooling", {"model": "embed", "input": TEXTS, "encoding_format": "base64"})["data"][0]
    flat = np.frombuffer(base64.b64decode(b64["data"]), np.float32)
    np.testing.assert_array_equal(flat, np.array(matrices[0]["data"], np.float32).ravel())

    for task, message in (("score", "use `classify` instead"), ("classify", "Unsupported task: 'classify'")):
        bad = httpx.post(f"{url}/pooling", json={"model": "embed", "input": "x", "task": task})
        assert bad.status_code == 400 and message in bad.json()["error"]["message"]


# --- /classify -----------------------------------------------------------------------------------------------


def test_classify_labels_probs_and_raw_logits(url, llms):
    data = post(url, "/classify", {"model": "classifier", "input": TEXTS})["data"]
    offline = llms["classifier"].classify(TEXTS, use_tqdm=False)
    for item, want in zip(data, offline):
        np.testing.assert_allclose(item["probs"], want.outputs.probs, atol=1e-6)
        assert item["label"] == want.outputs.label and item["num_classes"] == 3
    assert len({item["label"] for item in data}) > 1
    single = post(url, "/classify", {"model": "classifier", "input": TEXTS[0]})["data"]
    assert len(single) == 1
    np.testing.assert_allclose(single[0]["probs"], data[0]["probs"], atol=1e-6)
    logits = post(url, "/classify", {"model": "classifier", "input": TEXTS[0], "use_activation": False})["data"][0]
    assert sum(logits["probs"]) != pytest.approx(1.0)
    wrong = httpx.post(f"{url}/classify", json={"model": "embed", "input": "x"})
    assert wrong.status_code == 400
    assert wrong.json()["error"]["message"] == "Unsupported task: 'classify' Supported tasks: ('embed', 'token_embed')"


# --- /score and /rerank --------------------------------------------------------------------------------------

PAIRINGS = [
    ({"text_1": "query", "text_2": "document"}, ["query"], ["document"]),
    ({"queries": "query", "documents": TEXTS}, ["query"] * 4, TEXTS),
    ({"queries": TEXTS, "items": TEXTS[::-1]}, TEXTS, TEXTS[::-1]),
    ({"data_1": ["q1", "q2"], "data_2": ["d1", "d2"]}, ["q1", "q2"], ["d1", "d2"]),
]


@pytest.mark.parametrize("model", ["cross", "m3", "colbert"])
@pytest.mark.parametrize(("sides", "queries", "documents"), PAIRINGS)
def test_score_pairings_equal_offline(url, llms, model, sides, queries, documents):
    result = post(url, "/score", {"model": model, **sides})
    expected = [o.outputs.score for o in llms[model].score(queries, documents, use_tqdm=False)]
    assert [d["index"] for d in result["data"]] == list(range(len(expected)))
    np.testing.assert_allclose([d["score"] for d in result["data"]], expected, rtol=1e-5, atol=1e-6)
    assert result["usage"]["prompt_tokens"] > 0 and result["usage"]["completion_tokens"] == 0


def test_late_interaction_score_is_maxsim(url, llms):
    score = post(url, "/v1/score", {"model": "colbert", "queries": "query text", "documents": "a document"})
    tokens = llms["colbert"].encode(["query text", "a document"], task="token_embed", use_tqdm=False)
    q, d = tokens[0].outputs.data, tokens[1].outputs.data
    assert score["data"][0]["score"] == pytest.approx(float(np.max(q @ d.T, axis=1).sum()), rel=1e-5)


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"queries": ["a", "b"], "documents": ["a", "b", "c"]}, "Input lengths must be either 1:1, 1:N or N:N"),
        ({"queries": [], "documents": ["a"]}, "At least one text element must be given"),
        ({"queries": "a", "documents": []}, "At least one text_pair element must be given"),
        ({"queries": "a"}, "Give exactly one pair of inputs"),
        ({"model": "classifier", "queries": "a", "documents": "b"}, "does not support the Score API"),
        ({"queries": "a", "documents": ["b"], "max_tokens_per_doc": 0}, "max_tokens_per_doc must be a positive"),
    ],
)
def test_score_errors(url, body, message):
    response = httpx.post(f"{url}/score", json={"model": "cross", **body})
    assert response.status_code == 400 and message in response.json()["error"]["message"]
    assert post(url, "/score", {"model": "cross", "queries": "a", "documents": "b"})["data"]


@pytest.mark.parametrize("path", ["/rerank", "/v1/rerank", "/v2/rerank"])
def test_rerank_sorts_and_echoes_documents(url, llms, path):
    documents = [TEXTS[0], {"text": TEXTS[1]}, TEXTS[2], TEXTS[3]]
    result = post(url, path, {"model": "cross", "query": "guitar music", "documents": documents, "top_n": 3})
    scores = [o.outputs.score for o in llms["cross"].score("guitar music", TEXTS, use_tqdm=False)]
    order = sorted(range(4), key=lambda i: -scores[i])[:3]
    assert [r["index"] for r in result["results"]] == order
    assert [r["document"]["text"] for r in result["results"]] == [TEXTS[i] for i in order]
    np.testing.assert_allclose([r["relevance_score"] for r in result["results"]], [scores[i] for i in order], rtol=1e-5)
    assert result["usage"]["prompt_tokens"] == result["usage"]["total_tokens"] > 0
    bare = post(url, path, {"model": "cross", "query": "q", "documents": TEXTS, "return_documents": False})
    assert len(bare["results"]) == 4 and all(r["document"] is None for r in bare["results"])


def test_scores_truncate_queries_and_documents_to_their_token_limits(url, llms):
    tokenizer = llms["m3"].get_tokenizer()
    document = TEXTS[1]
    first_three = tokenizer.truncate_text(document, 3)
    assert len(tokenizer.encode(first_three, add_special_tokens=False)) == 3
    cut = post(url, "/rerank", {"model": "m3", "query": "q", "documents": [document], "max_tokens_per_doc": 3})
    expected = llms["m3"].score("q", first_three, use_tqdm=False)[0].outputs.score
    assert cut["results"][0]["relevance_score"] == pytest.approx(expected, rel=1e-5)
    query = TEXTS[2]
    query_cut = tokenizer.truncate_text(query, 2)
    body = {"model": "m3", "queries": query, "documents": [document], "max_tokens_per_query": 2}
    expected = llms["m3"].score(query_cut, document, use_tqdm=False)[0].outputs.score
    assert post(url, "/score", body)["data"][0]["score"] == pytest.approx(expected, rel=1e-5)
    assert expected != pytest.approx(llms["m3"].score(query, document, use_tqdm=False)[0].outputs.score, rel=1e-3)


# --- which routes a server has -------------------------------------------------------------------------------


def test_routes_follow_what_the_served_models_can_do(tiny_models, llm_cache):
    generator = llm_cache(tiny_models["tiny-llama"], TINY_ENGINE)
    embedder = llm_cache(tiny_models["tiny-bert-mean"], TINY_POOLING)
    only_generation = [ServedModel.from_engine(["llama"], "tiny-llama", AsyncEngine(generator.engine), "auto")]
    only_embedding = [ServedModel.from_engine(["bert"], "tiny-bert-mean", AsyncEngine(embedder.engine), "auto")]
    try:
        with background_server(only_generation) as base:
            for path in ("/v1/embeddings", "/pooling", "/classify", "/score", "/rerank"):
                assert httpx.post(f"{base}{path}", json={"input": "x"}).status_code == 404
        with background_server(only_embedding) as base:
            for path in ("/v1/completions", "/v1/chat/completions", "/classify"):
                assert httpx.post(f"{base}{path}", json={"prompt": "x"}).status_code == 404
            assert httpx.post(f"{base}/v1/embeddings", json={"input": "x"}).status_code == 200
            assert httpx.post(f"{base}/score", json={"queries": "a", "documents": "b"}).status_code == 200
    finally:
        for model in only_generation + only_embedding:
            model.engine.shutdown()


# --- the real default model and the example clients ----------------------------------------------------------

EXAMPLES = [
    "pooling_client.py",
    "multi_vector_retrieval_client.py",
    "openai_embedding_client.py",
    "score_client.py",
    "rerank_client.py",
]


@pytest.fixture(scope="module")
def default_server(llm_cache):
    llm = llm_cache(DEFAULT_POOLING_MODEL, TINY_POOLING)
    served = ServedModel.from_engine([DEFAULT_POOLING_MODEL], DEFAULT_POOLING_MODEL, AsyncEngine(llm.engine), "auto")
    with background_server([served]) as base:
        yield base, llm
    served.engine.shutdown()


def test_default_model_over_http_matches_sentence_transformers(default_server):
    sentence_transformers = pytest.importorskip("sentence_transformers")
    base, _ = default_server
    data = post(base, "/v1/embeddings", {"model": DEFAULT_POOLING_MODEL, "input": TEXTS})["data"]
    got = np.array([d["embedding"] for d in data])
    model = sentence_transformers.SentenceTransformer(str(resolve_model(DEFAULT_POOLING_MODEL)), device="cpu")
    expected = model.encode(TEXTS)
    assert ((got * expected).sum(-1) / np.linalg.norm(expected, axis=-1)).min() >= 0.9999
    chat = post(base, "/pooling", {"messages": [{"role": "user", "content": "Hello"}], "task": "embed"})
    np.testing.assert_allclose(chat["data"][0]["data"], model.encode("user: Hello"), atol=1e-4)


@pytest.mark.parametrize("script", EXAMPLES)
def test_pooling_examples_run_against_the_default_model(default_server, script):
    base, _ = default_server
    port = base.rsplit(":", 1)[1]
    result = subprocess.run(
        [sys.executable, str(ROOT / "examples" / script), "--host", "127.0.0.1", "--port", port],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip()
