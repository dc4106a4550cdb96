"""BERT, RoBERTa and XLM-RoBERTa encoders as Flax NNX modules, with their sequence- and token-classification
heads; with two options, JinaBERT (jina-embeddings-v2, models/jina_bert.py) as well.

Sequences arrive packed, with no padding between them (`PackedBatch`); attention is block-diagonal and
bidirectional through `kernels_pallas.varlen_attention`. RoBERTa-style models number positions from
`pad_token_id + 1`. Module attributes follow Hugging Face's names, so state paths are the checkpoint's
tensor names (`embeddings.word_embeddings.weight`, `encoder.layer.0.attention.self.query.weight`, ...).

The options (`EncoderConfig`): `position_embedding` "alibi" drops the position table and biases every attention
score by -slope_h * |i - j| (`alibi_slopes`); `feed_forward` "glu" replaces BERT's intermediate / output pair by
a gated MLP with its own residual LayerNorm (`mlp.gated_layers`, `mlp.wo`, `mlp.layernorm`).

    model.encode(batch) -> hidden [T, H]
    model.classify(rows [S, H]) -> logits [S, num_labels]       (the *ForSequenceClassification heads)
    model.token_classify(hidden [T, H]) -> logits [T, num_labels]
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import nnx

from jaxserve.kernels_pallas import REFERENCE_KERNELS, Kernels

from .batch import PackedBatch
from .layers import Embedding, LayerNorm, Linear, activation


@dataclasses.dataclass(frozen=True)
class EncoderConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    max_position_embeddings: int
    type_vocab_size: int
    layer_norm_eps: float
    hidden_act: str
    position_offset: int  # RoBERTa family: positions start after the padding index
    num_labels: int
    kernels: Kernels = REFERENCE_KERNELS  # the attention kernels (select_kernels: Pallas or the references)
    position_embedding: str = "absolute"  # "absolute": a learned position table; "alibi": ALiBi score biases
    feed_forward: str = "dense"  # "dense": intermediate + output; "glu": GatedMLP (activation: hidden_act)

    @classmethod
    def from_hf(cls, hf, kernels: Kernels = REFERENCE_KERNELS, *, jina: bool = False) -> EncoderConfig:
        """A BERT-family config; with `jina`, JinaBERT's too: `position_embedding_type` "alibi" and
        `feed_forward_type` "geglu" / "reglu" (GELU / ReLU gates) or "original" (BERT's MLP)."""
        kind = getattr(hf, "position_embedding_type", "absolute") or "absolute"
        if kind not in ("absolute", "alibi") or (kind == "alibi" and not jina):
            supported = "absolute, or alibi for JinaBERT architectures" if kind == "alibi" else "only absolute"
            raise ValueError(f"{hf.model_type}: position_embedding_type {kind!r} is not supported ({supported}).")
        feed_forward_type = getattr(hf, "feed_forward_type", "original") if jina else "original"
        if feed_forward_type not in GLU_ACTIVATIONS and feed_forward_type != "original":
            raise ValueError(f"feed_forward_type {feed_forward_type!r} is not supported (geglu, reglu, original).")
        roberta = hf.model_type in ("roberta", "xlm-roberta")
        return cls(
            vocab_size=hf.vocab_size,
            hidden_size=hf.hidden_size,
            intermediate_size=hf.intermediate_size,
            num_layers=hf.num_hidden_layers,
            num_heads=hf.num_attention_heads,
            max_position_embeddings=hf.max_position_embeddings,
            type_vocab_size=getattr(hf, "type_vocab_size", 2),
            layer_norm_eps=hf.layer_norm_eps,
            hidden_act=GLU_ACTIVATIONS.get(feed_forward_type, hf.hidden_act),
            position_offset=hf.pad_token_id + 1 if roberta else 0,
            num_labels=getattr(hf, "num_labels", 2),
            kernels=kernels,
            position_embedding=kind,
            feed_forward="glu" if feed_forward_type in GLU_ACTIVATIONS else "dense",
        )

    @property
    def max_tokens(self) -> int:
        """Longest sequence the position table allows (with ALiBi, the length the config declares)."""
        return self.max_position_embeddings - self.position_offset


# JinaBERT's feed_forward_type -> the activation of its gate (nn.GELU is the exact, erf GELU)
GLU_ACTIVATIONS = {"geglu": "gelu", "reglu": "relu"}


def alibi_slopes(num_heads: int) -> list[float]:
    """ALiBi's per-head slopes (Press et al.), as JinaBERT builds them: for a power of two n, the geometric
    sequence 2^(-8/n), 2^(-16/n), ..., 2^-8; otherwise those of the largest power of two p below n, then every
    other slope of 2p's sequence (its 1st, 3rd, ...) for the remaining n - p heads."""

    def power_of_2(n: int) -> list[float]:
        start = 2.0 ** (-8.0 / n)
        return [start ** (i + 1) for i in range(n)]

    p = 2 ** math.floor(math.log2(num_heads))
    return power_of_2(p) + power_of_2(2 * p)[0::2][: num_heads - p]


class Embeddings(nnx.Module):
    def __init__(self, cfg: EncoderConfig, *, dtype, rngs: nnx.Rngs):
        self.offset = cfg.position_offset
        self.word_embeddings = Embedding(cfg.vocab_size, cfg.hidden_size, dtype=dtype, rngs=rngs, axis="vocab")
        absolute = cfg.position_embedding == "absolute"  # ALiBi models have no position table
        self.position_embeddings = (
            Embedding(cfg.max_position_embeddings, cfg.hidden_size, dtype=dtype, rngs=rngs) if absolute else None
        )
        self.token_type_embeddings = Embedding(cfg.type_vocab_size, cfg.hidden_size, dtype=dtype, rngs=rngs)
        self.LayerNorm = LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps, dtype=dtype)

    def __call__(self, batch: PackedBatch) -> jax.Array:
        x = self.word_embeddings(batch.token_ids)
        if self.position_embeddings is not None:
            x = x + self.position_embeddings(batch.positions + self.offset)
        return self.LayerNorm(x + self.token_type_embeddings(batch.token_type_ids))


class SelfAttention(nnx.Module):
    def __init__(self, cfg: EncoderConfig, *, dtype, rngs: nnx.Rngs):
        h = cfg.hidden_size
        self.num_heads = cfg.num_heads
        self.attention = cfg.kernels.varlen_attention
        self.alibi_slopes = tuple(alibi_slopes(cfg.num_heads)) if cfg.position_embedding == "alibi" else None
        self.query = Linear(h, h, bias=True, dtype=dtype, rngs=rngs, axes=("heads", None))
        self.key = Linear(h, h, bias=True, dtype=dtype, rngs=rngs, axes=("heads", None))
        self.value = Linear(h, h, bias=True, dtype=dtype, rngs=rngs, axes=("heads", None))

    def __call__(self, x: jax.Array, batch: PackedBatch) -> jax.Array:
        t, h = x.shape
        d = h // self.num_heads
        q, k, v = (proj(x).reshape(t, self.num_heads, d) for proj in (self.query, self.key, self.value))
        slopes = None if self.alibi_slopes is None else jnp.asarray(self.alibi_slopes, jnp.float32)
        out = self.attention(
            q, k, v, batch.cu_seqlens, batch.num_seqs, sm_scale=d**-0.5, causal=False, alibi_slopes=slopes
        )
        return out.reshape(t, h)


class DenseLayerNorm(nnx.Module):
    """HF's `*SelfOutput` / `*Output`: dense, then LayerNorm of the residual sum. `axis`: the logical axis of the
    input features (the attention heads', or the MLP's)."""

    def __init__(self, in_features: int, cfg: EncoderConfig, *, dtype, rngs: nnx.Rngs, axis: str):
        self.dense = Linear(in_features, cfg.hidden_size, bias=True, dtype=dtype, rngs=rngs, axes=(None, axis))
        self.LayerNorm = LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps, dtype=dtype)

    def __call__(self, x: jax.Array, residual: jax.Array) -> jax.Array:
        return self.LayerNorm(self.dense(x) + residual)


class AttentionBlock(nnx.Module):
    def __init__(self, cfg: EncoderConfig, *, dtype, rngs: nnx.Rngs):
        self.self = SelfAttention(cfg, dtype=dtype, rngs=rngs)
        self.output = DenseLayerNorm(cfg.hidden_size, cfg, dtype=dtype, rngs=rngs, axis="heads")

    def __call__(self, x: jax.Array, batch: PackedBatch) -> jax.Array:
        return self.output(self.self(x, batch), x)


class Intermediate(nnx.Module):
    def __init__(self, cfg: EncoderConfig, *, dtype, rngs: nnx.Rngs):
        self.dense = Linear(
            cfg.hidden_size, cfg.intermediate_size, bias=True, dtype=dtype, rngs=rngs, axes=("mlp", None)
        )
        self.act = cfg.hidden_act

    def __call__(self, x: jax.Array) -> jax.Array:
        return activation(self.act)(self.dense(x))


class GatedMLP(nnx.Module):
    """JinaBERT's GLU feed-forward (`feed_forward` "glu"): `gated_layers` (no bias) makes 2 x intermediate
    features, the activation of the first half gates the second, `wo` projects back, and `layernorm` takes the
    residual sum."""

    def __init__(self, cfg: EncoderConfig, *, dtype, rngs: nnx.Rngs):
        self.intermediate_size = cfg.intermediate_size
        self.act = cfg.hidden_act
        self.gated_layers = Linear(
            cfg.hidden_size, 2 * cfg.intermediate_size, bias=False, dtype=dtype, rngs=rngs, axes=("mlp", None)
        )
        self.wo = Linear(cfg.intermediate_size, cfg.hidden_size, bias=True, dtype=dtype, rngs=rngs, axes=(None, "mlp"))
        self.layernorm = LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps, dtype=dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        h = self.gated_layers(x)
        gated, non_gated = h[..., : self.intermediate_size], h[..., self.intermediate_size :]
        return self.layernorm(self.wo(activation(self.act)(gated) * non_gated) + x)


class EncoderLayer(nnx.Module):
    def __init__(self, cfg: EncoderConfig, *, dtype, rngs: nnx.Rngs):
        self.attention = AttentionBlock(cfg, dtype=dtype, rngs=rngs)
        if cfg.feed_forward == "glu":
            self.mlp = GatedMLP(cfg, dtype=dtype, rngs=rngs)
        else:
            self.intermediate = Intermediate(cfg, dtype=dtype, rngs=rngs)
            self.output = DenseLayerNorm(cfg.intermediate_size, cfg, dtype=dtype, rngs=rngs, axis="mlp")

    def __call__(self, x: jax.Array, batch: PackedBatch) -> jax.Array:
        x = self.attention(x, batch)
        if hasattr(self, "mlp"):
            return self.mlp(x)
        return self.output(self.intermediate(x), x)


class Encoder(nnx.Module):
    def __init__(self, cfg: EncoderConfig, *, dtype, rngs: nnx.Rngs):
        self.layer = nnx.List([EncoderLayer(cfg, dtype=dtype, rngs=rngs) for _ in range(cfg.num_layers)])

    def __call__(self, x: jax.Array, batch: PackedBatch) -> jax.Array:
        for layer in self.layer:
            x = layer(x, batch)
        return x


class Pooler(nnx.Module):
    """BERT's pooler: dense + tanh over a row (the [CLS] token); gte's `new` models have it too."""

    def __init__(self, hidden_size: int, *, dtype, rngs: nnx.Rngs):
        self.dense = Linear(hidden_size, hidden_size, bias=True, dtype=dtype, rngs=rngs)

    def __call__(self, rows: jax.Array) -> jax.Array:
        return jnp.tanh(self.dense(rows))


class EncoderModel(nnx.Module):
    """HF BertModel / RobertaModel / XLMRobertaModel (the pooler, when present, is only used by heads)."""

    def __init__(self, cfg: EncoderConfig, *, dtype, rngs: nnx.Rngs, with_pooler: bool):
        self.cfg = cfg
        self.embeddings = Embeddings(cfg, dtype=dtype, rngs=rngs)
        self.encoder = Encoder(cfg, dtype=dtype, rngs=rngs)
        self.pooler = Pooler(cfg.hidden_size, dtype=dtype, rngs=rngs) if with_pooler else None

    def __call__(self, batch: PackedBatch) -> jax.Array:
        return self.encoder(self.embeddings(batch), batch)


class EncoderForEmbedding(nnx.Module):
    """A bare encoder checkpoint (BertModel, XLMRobertaModel, ...): hidden states for the poolers. Such
    checkpoints name tensors `embeddings.*` / `encoder.*`, or with the `bert.` / `roberta.` prefix."""

    CHECKPOINT_ALIASES = {"model.": ("", "bert.", "roberta.")}

    def __init__(self, cfg: EncoderConfig, *, dtype, rngs: nnx.Rngs):
        self.cfg = cfg
        self.model = EncoderModel(cfg, dtype=dtype, rngs=rngs, with_pooler=False)

    @classmethod
    def from_hf_config(
        cls, hf_config, *, dtype, rngs: nnx.Rngs, kernels: Kernels = REFERENCE_KERNELS
    ) -> EncoderForEmbedding:
        return cls(EncoderConfig.from_hf(hf_config, kernels), dtype=dtype, rngs=rngs)

    def encode(self, batch: PackedBatch) -> jax.Array:
        return self.model(batch)


class BertForSequenceClassification(nnx.Module):
    """[CLS] → pooler (dense + tanh) → classifier."""

    def __init__(self, cfg: EncoderConfig, *, dtype, rngs: nnx.Rngs):
        self.cfg = cfg
        self.bert = EncoderModel(cfg, dtype=dtype, rngs=rngs, with_pooler=True)
        self.classifier = Linear(cfg.hidden_size, cfg.num_labels, bias=True, dtype=dtype, rngs=rngs)

    @classmethod
    def from_hf_config(
        cls, hf_config, *, dtype, rngs: nnx.Rngs, kernels: Kernels = REFERENCE_KERNELS
    ) -> BertForSequenceClassification:
        return cls(EncoderConfig.from_hf(hf_config, kernels), dtype=dtype, rngs=rngs)

    def encode(self, batch: PackedBatch) -> jax.Array:
        return self.bert(batch)

    def classify(self, rows: jax.Array) -> jax.Array:
        return self.classifier(self.bert.pooler(rows)).astype(jnp.float32)

    def token_classify(self, hidden: jax.Array) -> jax.Array:
        """The classifier on every token (no pooler), as vLLM's token_classify does."""
        return self.classifier(hidden).astype(jnp.float32)


class RobertaClassificationHead(nnx.Module):
    def __init__(self, cfg: EncoderConfig, *, dtype, rngs: nnx.Rngs):
        self.dense = Linear(cfg.hidden_size, cfg.hidden_size, bias=True, dtype=dtype, rngs=rngs)
        self.out_proj = Linear(cfg.hidden_size, cfg.num_labels, bias=True, dtype=dtype, rngs=rngs)

    def __call__(self, rows: jax.Array) -> jax.Array:
        return self.out_proj(jnp.tanh(self.dense(rows)))


class RobertaForSequenceClassification(nnx.Module):
    """<s> → dense + tanh → out_proj (RoBERTa and XLM-RoBERTa; the checkpoint prefix is `roberta.`)."""

    def __init__(self, cfg: EncoderConfig, *, dtype, rngs: nnx.Rngs):
        self.cfg = cfg
        self.roberta = EncoderModel(cfg, dtype=dtype, rngs=rngs, with_pooler=False)
        self.classifier = RobertaClassificationHead(cfg, dtype=dtype, rngs=rngs)

    @classmethod
    def from_hf_config(
        cls, hf_config, *, dtype, rngs: nnx.Rngs, kernels: Kernels = REFERENCE_KERNELS
    ) -> RobertaForSequenceClassification:
        return cls(EncoderConfig.from_hf(hf_config, kernels), dtype=dtype, rngs=rngs)

    def encode(self, batch: PackedBatch) -> jax.Array:
        return self.roberta(batch)

    def classify(self, rows: jax.Array) -> jax.Array:
        return self.classifier(rows).astype(jnp.float32)

    token_classify = classify


class EncoderForTokenClassification(nnx.Module):
    """BertForTokenClassification, RobertaForTokenClassification, XLMRobertaForTokenClassification: a label per
    token (NER-style), the classifier on every hidden state. Checkpoints name the encoder `bert.` or `roberta.`."""

    CHECKPOINT_ALIASES = {"model.": ("bert.", "roberta.")}
    TOKEN_LABELS = True  # its token_classify is a classifier: softmax over num_labels (not a reward score)

    def __init__(self, cfg: EncoderConfig, *, dtype, rngs: nnx.Rngs):
        self.cfg = cfg
        self.model = EncoderModel(cfg, dtype=dtype, rngs=rngs, with_pooler=False)
        self.classifier = Linear(cfg.hidden_size, cfg.num_labels, bias=True, dtype=dtype, rngs=rngs)

    @classmethod
    def from_hf_config(
        cls, hf_config, *, dtype, rngs: nnx.Rngs, kernels: Kernels = REFERENCE_KERNELS
    ) -> EncoderForTokenClassification:
        return cls(EncoderConfig.from_hf(hf_config, kernels), dtype=dtype, rngs=rngs)

    def encode(self, batch: PackedBatch) -> jax.Array:
        return self.model(batch)

    def token_classify(self, hidden: jax.Array) -> jax.Array:
        return self.classifier(hidden).astype(jnp.float32)
