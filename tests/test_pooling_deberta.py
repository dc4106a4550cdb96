"""DeBERTa-v2 / v3 against HF transformers (float32) on `tiny-deberta-v3-classifier`, a tiny random-weight
DebertaV2ForSequenceClassification with deberta-v3's attention settings and 8 position buckets up to 32 positions,
so that the test texts (up to 58 tokens) reach the log buckets and the clamped ones: the buckets vs HF's, class
probabilities and labels of single texts and of text pairs (token types), packing invariance, the token
classifier and the bare encoder on the same tensors, deberta-v2's other options (absolute positions,
`embed_proj`, separate position projections, no buckets, the ConvLayer) on a variant, and the Pallas kernel sets
sending the relative-bias attention to the jnp reference."""

from __future__ import annotations

import numpy as np
import pytest

from jaxserve import PoolingParams
from jaxserve.kernels_pallas import PALLAS_KERNELS, REFERENCE_KERNELS
from jaxserve.model_source import load_hf_config
from jaxserve.weights import load_weights
from models.batch import PackedBatch
from models.deberta_v2 import (
    DebertaV2Config,
    DebertaV2ForEmbedding,
    DebertaV2ForSequenceClassification,
    DebertaV2ForTokenClassification,
    relative_buckets,
)
from models.registry import pooling_model_class
from scripts.make_test_models import build_test_models
from tests.conftest import CACHE

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
jax = pytest.importorskip("jax")
jnp = jax.numpy
nnx = pytest.importorskip("flax.nnx")

LONG_TEXT = (  # 58 tokens: distances up to 57, past the 32 positions the buckets resolve
    "The old train left the station before dawn, carrying a quiet musician, a naïve tourist and the baker's "
    "brother through fields, until the river turned north."
)
TEXTS = [
    "A man is playing a guitar on stage.",
    "Paris is the capital of France.",
    "hello",
    "Numbers like 42 and 1999 appear in this somewhat longer sentence about nothing in particular.",
    LONG_TEXT,
]
PAIRS = [
    ("A man is playing a guitar on stage.", "Someone is making music."),
    ("what is the price of coffee in Paris?", "Paris is the capital of France."),
    ("The river turned north.", TEXTS[3]),
]
ENGINE = dict(max_model_len=64, max_num_batched_tokens=128)  # small buckets (quick compiles); every input fits


@pytest.fixture(scope="module")
def folder():
    return build_test_models(CACHE / "test-models", ["tiny-deberta-v3-classifier"])["tiny-deberta-v3-classifier"]


def hf_logits(folder, texts, pairs=None, model_class="AutoModelForSequenceClassification", **config) -> np.ndarray:
    """HF's outputs of a padded batch (logits, or the last hidden states for AutoModel), config overrides applied."""
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    model = getattr(transformers, model_class).from_pretrained(folder, **config).eval()
    batch = tokenizer(texts, pairs, padding=True, return_tensors="pt")
    with torch.no_grad():
        out = model(**batch)
    return (out.logits if hasattr(out, "logits") else out.last_hidden_state).numpy(), batch


def softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def test_buckets_match_hf():
    """The c2p / p2c rows of every distance as HF's make_log_bucket_position (float32) and clamp give them:
    deberta-v3's 256 buckets up to 512 positions, the tiny model's 8 up to 32, and no buckets (a span of 6)."""
    from transformers.models.deberta_v2.modeling_deberta_v2 import make_log_bucket_position

    for buckets, max_relative, max_tokens in [(256, 512, 512), (8, 32, 128), (-1, 6, 40)]:
        span = buckets if buckets > 0 else max_relative
        distance = torch.arange(-(max_tokens - 1), max_tokens)
        hf = make_log_bucket_position(distance, buckets, max_relative) if buckets > 0 else distance
        expected = torch.clamp(hf.long() + span, 0, 2 * span - 1).numpy()
        np.testing.assert_array_equal(relative_buckets(buckets, max_relative, max_tokens), expected)


def test_probabilities_and_labels_match_hf(folder, make_pooling_llm):
    """Texts alone and (premise, hypothesis) pairs with their token types: probabilities within 1e-4 of HF's
    softmax over a padded batch, the same labels; raw logits with use_activation=False."""
    cfg = DebertaV2Config.from_hf(load_hf_config(folder))
    assert (cfg.relative_attention, cfg.share_att_key, cfg.norm_rel_ebd, cfg.position_biased_input) == (
        True, True, True, False,
    )  # fmt: skip
    assert (cfg.pos_att_type, cfg.span, cfg.scale) == (("p2c", "c2p"), 8, (8 * 3) ** -0.5)
    llm = make_pooling_llm(folder, **ENGINE)
    id2label = load_hf_config(folder).id2label

    logits, batch = hf_logits(folder, TEXTS)
    assert batch["input_ids"].shape[1] == 58  # LONG_TEXT
    got = llm.classify(TEXTS, use_tqdm=False)
    np.testing.assert_allclose([o.outputs.probs for o in got], softmax(logits), atol=1e-4)
    assert [o.outputs.label for o in got] == [id2label[i] for i in logits.argmax(-1)]
    assert len({o.outputs.label for o in got}) > 1 and np.ptp(logits) > 0.5  # the inputs' outputs differ clearly
    raw = llm.classify(TEXTS, pooling_params=PoolingParams(use_activation=False), use_tqdm=False)
    np.testing.assert_allclose([o.outputs.probs for o in raw], logits, atol=1e-4)

    pair_logits, pair_batch = hf_logits(folder, [p for p, _ in PAIRS], [h for _, h in PAIRS])
    assert pair_batch["token_type_ids"].any()
    prompts = [llm.engine.prepare(p, text_pair=h) for p, h in PAIRS]
    assert all(prompt.token_type_ids[-1] == 1 for prompt in prompts)
    pooled = llm._pool(prompts, PoolingParams(task="classify"), use_tqdm=False)
    np.testing.assert_allclose([o.outputs.data for o in pooled], softmax(pair_logits), atol=1e-4)
    # the token types matter: the same ids all of type 0 classify otherwise
    untyped = llm.classify([{"prompt_token_ids": p.token_ids} for p in prompts], use_tqdm=False)
    assert np.abs(np.array([o.outputs.probs for o in untyped]) - softmax(pair_logits)).max() > 1e-3


def test_a_text_packed_among_50_gives_the_same_output(folder, make_pooling_llm):
    """The relative positions are within a sequence: a text classifies alike alone and among 49 short ones."""
    llm = make_pooling_llm(folder, **ENGINE)
    rng = np.random.default_rng(0)
    words = " ".join(TEXTS).split()
    batch = [" ".join(rng.choice(words, size=int(n))) for n in rng.integers(1, 12, size=50)]
    batch[17] = LONG_TEXT
    alone = llm.classify(LONG_TEXT, pooling_params=PoolingParams(use_activation=False), use_tqdm=False)
    packed = llm.classify(batch, pooling_params=PoolingParams(use_activation=False), use_tqdm=False)
    np.testing.assert_allclose(packed[17].outputs.probs, alone[0].outputs.probs, atol=1e-5)


def load_module(model_class, folder, overrides=None, kernels=REFERENCE_KERNELS):
    """A jaxserve module with the checkpoint's weights (float32), without an engine."""
    hf = load_hf_config(folder, overrides)
    skeleton = nnx.eval_shape(
        lambda: model_class.from_hf_config(hf, dtype=jnp.float32, rngs=nnx.Rngs(0), kernels=kernels)
    )
    aliases = getattr(model_class, "CHECKPOINT_ALIASES", None)
    return load_weights(skeleton, folder, jnp.float32, aliases=aliases, progress=False)


def packed(batch) -> tuple[PackedBatch, list[int]]:
    """HF's padded batch packed back to back, with 3 padding tokens and a padded sequence slot."""
    lens = batch["attention_mask"].sum(-1).tolist()
    pad = np.zeros(3, np.int32)

    def tokens(key: str) -> jax.Array:
        rows = [batch[key][i, :n].numpy() for i, n in enumerate(lens)] if key in batch else [np.zeros(sum(lens))]
        return jnp.asarray(np.concatenate([*rows, pad]), jnp.int32)

    positions = jnp.asarray(np.concatenate([*(np.arange(n) for n in lens), pad]), jnp.int32)
    cu = jnp.asarray(np.concatenate([[0], np.cumsum(lens), [sum(lens)]]), jnp.int32)
    num_seqs = jnp.asarray([len(lens)], jnp.int32)
    return PackedBatch(tokens("input_ids"), positions, tokens("token_type_ids"), cu, num_seqs), lens


def test_token_classifier_and_encoder_match_hf(folder):
    """DebertaV2ForTokenClassification and DebertaV2Model (the embedder's backbone, tensors under `deberta.`) on the
    classifier's tensors: per-token logits and hidden states of a packed batch as HF's padded one."""
    logits, batch = hf_logits(folder, TEXTS[2:], model_class="DebertaV2ForTokenClassification")
    hidden, _ = hf_logits(folder, TEXTS[2:], model_class="AutoModel")
    b, lens = packed(batch)
    tokens = load_module(DebertaV2ForTokenClassification, folder)
    embedder = load_module(DebertaV2ForEmbedding, folder)
    got_logits = np.asarray(tokens.token_classify(tokens.encode(b)))
    got_hidden = np.asarray(embedder.encode(b))
    lo = 0
    for i, n in enumerate(lens):
        np.testing.assert_allclose(got_logits[lo : lo + n], logits[i, :n], atol=1e-4)
        np.testing.assert_allclose(got_hidden[lo : lo + n], hidden[i, :n], atol=1e-4)
        lo += n
    hf = load_hf_config(folder, {"architectures": ["DebertaV2Model"]})
    assert pooling_model_class(hf) is DebertaV2ForEmbedding


V2_OPTIONS = {  # deberta-v2(-xlarge)'s other settings
    "position_biased_input": True,
    "embedding_size": 24,
    "share_att_key": False,
    "position_buckets": -1,
    "max_relative_positions": 6,
    "norm_rel_ebd": "none",
    "conv_kernel_size": 3,
    "conv_act": "tanh",
    "pooler_hidden_act": "tanh",
    "type_vocab_size": 0,
}


def test_deberta_v2_options_match_hf(folder, tmp_path):
    """Absolute positions, embed_proj (24 -> 32), pos_key_proj / pos_query_proj, a plain span of 6 relative
    positions and the ConvLayer after layer 0 (kernel 3, zeros past each packed sequence's ends)."""
    from scripts.make_test_models import _decorrelate_encoder, _init_weights

    config = transformers.AutoConfig.from_pretrained(folder)
    config.update(V2_OPTIONS)
    config.pos_att_type = ["c2p", "p2c"]
    model = transformers.DebertaV2ForSequenceClassification(config).eval()
    _init_weights(model, 44)
    _decorrelate_encoder(model)
    model.save_pretrained(tmp_path)
    transformers.AutoTokenizer.from_pretrained(folder).save_pretrained(tmp_path)
    assert model.deberta.encoder.conv is not None and model.deberta.embeddings.embed_proj is not None

    logits, batch = hf_logits(tmp_path, TEXTS)
    b, lens = packed(batch)
    jax_model = load_module(DebertaV2ForSequenceClassification, tmp_path)
    cfg = jax_model.cfg
    assert (cfg.span, cfg.conv_kernel_size, cfg.embedding_size, cfg.type_vocab_size) == (6, 3, 24, 0)
    hidden = jax_model.encode(b)
    got = np.asarray(jax_model.classify(hidden[np.cumsum([0, *lens[:-1]])]))
    np.testing.assert_allclose(got, logits, atol=1e-4)
    # without the ConvLayer HF answers otherwise: it is not a no-op here
    plain, _ = hf_logits(tmp_path, TEXTS, conv_kernel_size=0)
    assert np.abs(plain - logits).max() > 1e-2


def test_pallas_kernel_sets_run_the_relative_bias_on_the_reference(folder):
    """The Pallas varlen kernels cannot gather along the bucket axis: on the Pallas kernel set (which cannot run on
    CPU outside the interpreter) the model still runs, through the reference, and gives its results."""
    _, batch = hf_logits(folder, TEXTS[:3])
    b, _ = packed(batch)
    want = load_module(DebertaV2ForSequenceClassification, folder).encode(b)
    got = load_module(DebertaV2ForSequenceClassification, folder, kernels=PALLAS_KERNELS).encode(b)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
