"""jina-embeddings-v2 (JinaBERT: ALiBi instead of position embeddings, a GEGLU MLP) on `tiny-jina-v2`, a tiny
random-weight model laid out as the published checkpoints are (remote-code config, 6 heads so that ALiBi takes
its non-power-of-two slopes): the config read without remote code, the slopes, embeddings vs an independent
torch implementation of the published code, packing invariance, and the Pallas kernels vs the references."""

from __future__ import annotations

import json

import numpy as np
import pytest

from jaxserve.model_source import load_hf_config
from models.bert import EncoderConfig, alibi_slopes
from models.jina_bert import JinaBertForEmbedding, jina_bert_config
from models.registry import pooling_model_class
from scripts.make_test_models import _alibi_head_slopes, build_test_models, jina_bert_reference
from tests.conftest import CACHE
from tests.test_pooling import TEXTS as POOLING_TEXTS

torch = pytest.importorskip("torch")

LONG_TEXT = (  # 58 tokens: two of the Pallas kernel's 32-token blocks, distances (and biases) up to 57
    "The old train left the station before dawn, carrying a quiet musician, a naïve tourist and the baker's "
    "brother through fields, until the river turned north."
)
TEXTS = [*POOLING_TEXTS[:5], LONG_TEXT]
# small buckets (rungs 1 ... 64) keep the compiles of this file short; every text fits in 64 tokens
ENGINE = dict(max_model_len=64, max_num_batched_tokens=64)


@pytest.fixture(scope="module")
def folder():
    return build_test_models(CACHE / "test-models", ["tiny-jina-v2"])["tiny-jina-v2"]


def cosines(a, b) -> np.ndarray:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return (a * b).sum(-1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)


def test_published_config_reads_without_remote_code(folder, tmp_path):
    """config.json as published (model_type bert, auto_map to jina-bert-implementation, architecture
    JinaBertForMaskedLM) reads as a BertConfig and selects the ALiBi / GLU encoder; the code model's remote code
    (jina-bert-v2-qk-post-norm) and ALiBi under a plain BERT architecture are refused with a reason."""
    hf = load_hf_config(folder)
    assert (hf.model_type, hf.position_embedding_type, hf.feed_forward_type) == ("bert", "alibi", "geglu")
    assert "jina-bert-implementation" in hf.auto_map["AutoModel"]
    assert pooling_model_class(hf) is JinaBertForEmbedding
    cfg = jina_bert_config(hf)
    assert (cfg.position_embedding, cfg.feed_forward, cfg.hidden_act, cfg.max_tokens) == ("alibi", "glu", "gelu", 8192)

    code = json.loads((folder / "config.json").read_text())
    code["auto_map"] = {key: "jinaai/jina-bert-v2-qk-post-norm--" + target.split("--")[1]
                        for key, target in code["auto_map"].items()}  # fmt: skip
    (tmp_path / "config.json").write_text(json.dumps(code))
    with pytest.raises(ValueError, match="jina-bert-v2-qk-post-norm .* is not supported"):
        jina_bert_config(load_hf_config(tmp_path))
    with pytest.raises(ValueError, match="'alibi' is not supported .*JinaBERT"):
        EncoderConfig.from_hf(hf)  # a BertModel's reading


def test_alibi_slopes_follow_the_published_recipe():
    """Per-head slopes 2^(-8/n), ..., 2^-8 for a power of two n; otherwise the nearest power of two's, then every
    other slope of twice that many (jina-embeddings-v2-base: 12 heads)."""
    for n in (1, 2, 4, 6, 8, 12, 16, 24):
        np.testing.assert_allclose(alibi_slopes(n), _alibi_head_slopes(n), rtol=1e-15)
    np.testing.assert_allclose(alibi_slopes(8), 2.0 ** -np.arange(1, 9), rtol=1e-15)
    np.testing.assert_allclose(alibi_slopes(12)[8:], 2.0 ** -np.array([0.5, 1.5, 2.5, 3.5]), rtol=1e-15)


def test_embeddings_match_the_torch_reference(folder, make_pooling_llm):
    """Mean-pooled, normalised embeddings as the published JinaBertModel.encode computes them (the reference runs
    a padded batch with the full ALiBi matrix; jaxserve packs the texts)."""
    expected = jina_bert_reference(folder, TEXTS)
    got = np.array([o.outputs.embedding for o in make_pooling_llm(folder, **ENGINE).embed(TEXTS, use_tqdm=False)])
    assert got.shape == expected.shape == (len(TEXTS), 48)
    assert cosines(got, expected).min() >= 0.9999
    np.testing.assert_allclose(np.linalg.norm(got, axis=-1), 1.0, atol=1e-5)
    sims = cosines(expected[:, None, :], expected[None, :, :])
    assert sims[~np.eye(len(TEXTS), dtype=bool)].max() < 0.99  # the inputs' embeddings differ clearly


def test_a_text_packed_among_50_gives_the_same_vector(folder, make_pooling_llm):
    """ALiBi's distances are within a segment: a text embeds alike alone and packed among 50 short texts."""
    llm = make_pooling_llm(folder, **ENGINE)
    rng = np.random.default_rng(0)
    words = " ".join(TEXTS).split()
    batch = [" ".join(rng.choice(words, size=int(n))) for n in rng.integers(1, 20, size=50)]
    batch[17] = LONG_TEXT
    alone = np.array(llm.embed(LONG_TEXT, use_tqdm=False)[0].outputs.embedding)
    packed = np.array(llm.embed(batch, use_tqdm=False)[17].outputs.embedding)
    np.testing.assert_allclose(packed, alone, atol=1e-5)  # float32 roundoff of another bucket shape


@pytest.mark.kernels
@pytest.mark.usefixtures("no_persistent_compile_cache")
def test_pallas_kernels_in_interpret_mode_give_the_reference_results(folder, make_pooling_llm):
    """The engine on the Pallas kernels (ALiBi in the varlen attention kernel, run by Pallas' interpreter on CPU)
    embeds as it does on the jnp references."""
    reference = make_pooling_llm(folder, **ENGINE)
    pallas = make_pooling_llm(folder, attention_backend="interpret", **ENGINE)
    assert (reference.engine.kernels.backend, pallas.engine.kernels.backend) == ("reference", "interpret")
    texts = [TEXTS[0], "Hello", LONG_TEXT]
    for task in reference.engine.spec.tasks:
        want = reference.encode(texts, task=task, use_tqdm=False)
        got = pallas.encode(texts, task=task, use_tqdm=False)
        for w, g in zip(want, got):
            np.testing.assert_allclose(g.outputs.data, w.outputs.data, rtol=1e-4, atol=1e-5)
