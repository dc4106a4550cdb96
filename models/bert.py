"""BERT, RoBERTa and XLM-RoBERTa encoders as Flax NNX modules, with their sequence- and token-classification
heads.

Sequences arrive packed, with no padding between them (`PackedBatch`); attention is block-diagonal and
bidirectional through `kernels_pallas.varlen_attention`. RoBERTa-style models number positions from
`pad_token_id + 1`. Module attributes follow Hugging Face's names, so state paths are the checkpoint's
tensor names (`embeddings.word_embeddings.weight`, `encoder.layer.0.attention.self.query.weight`, ...).

    model.encode(batch) -> hidden [T, H]
    model.classify(rows [S, H]) -> logits [S, num_labels]       (the *ForSequenceClassification heads)
    model.token_classify(hidden [T, H]) -> logits [T, num_labels]
"""

from __future__ import annotations

import dataclasses

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

    @classmethod
    def from_hf(cls, hf, kernels: Kernels = REFERENCE_KERNELS) -> EncoderConfig:
        kind = getattr(hf, "position_embedding_type", "absolute")
        if kind not in (None, "absolute"):
            raise ValueError(f"{hf.model_type}: position_embedding_type {kind!r} is not supported (only absolute).")
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
            hidden_act=hf.hidden_act,
            position_offset=hf.pad_token_id + 1 if roberta else 0,
            num_labels=getattr(hf, "num_labels", 2),
            kernels=kernels,
        )

    @property
    def max_tokens(self) -> int:
        """Longest sequence the position table allows."""
        return self.max_position_embeddings - self.position_offset


class Embeddings(nnx.Module):
    def __init__(self, cfg: EncoderConfig, *, dtype, rngs: nnx.Rngs):
        self.offset = cfg.position_offset
        self.word_embeddings = Embedding(cfg.vocab_size, cfg.hidden_size, dtype=dtype, rngs=rngs)
        self.position_embeddings = Embedding(cfg.max_position_embeddings, cfg.hidden_size, dtype=dtype, rngs=rngs)
        self.token_type_embeddings = Embedding(cfg.type_vocab_size, cfg.hidden_size, dtype=dtype, rngs=rngs)
        self.LayerNorm = LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps, dtype=dtype)

    def __call__(self, batch: PackedBatch) -> jax.Array:
        x = self.word_embeddings(batch.token_ids)
        x = x + self.position_embeddings(batch.positions + self.offset)
        return self.LayerNorm(x + self.token_type_embeddings(batch.token_type_ids))


class SelfAttention(nnx.Module):
    def __init__(self, cfg: EncoderConfig, *, dtype, rngs: nnx.Rngs):
        h = cfg.hidden_size
        self.num_heads = cfg.num_heads
        self.attention = cfg.kernels.varlen_attention
        self.query = Linear(h, h, bias=True, dtype=dtype, rngs=rngs)
        self.key = Linear(h, h, bias=True, dtype=dtype, rngs=rngs)
        self.value = Linear(h, h, bias=True, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array, batch: PackedBatch) -> jax.Array:
        t, h = x.shape
        d = h // self.num_heads
        q, k, v = (proj(x).reshape(t, self.num_heads, d) for proj in (self.query, self.key, self.value))
        out = self.attention(q, k, v, batch.cu_seqlens, batch.num_seqs, sm_scale=d**-0.5, causal=False)
        return out.reshape(t, h)


class DenseLayerNorm(nnx.Module):
    """HF's `*SelfOutput` / `*Output`: dense, then LayerNorm of the residual sum."""

    def __init__(self, in_features: int, cfg: EncoderConfig, *, dtype, rngs: nnx.Rngs):
        self.dense = Linear(in_features, cfg.hidden_size, bias=True, dtype=dtype, rngs=rngs)
        self.LayerNorm = LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps, dtype=dtype)

    def __call__(self, x: jax.Array, residual: jax.Array) -> jax.Array:
        return self.LayerNorm(self.dense(x) + residual)


class AttentionBlock(nnx.Module):
    def __init__(self, cfg: EncoderConfig, *, dtype, rngs: nnx.Rngs):
        self.self = SelfAttention(cfg, dtype=dtype, rngs=rngs)
        self.output = DenseLayerNorm(cfg.hidden_size, cfg, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array, batch: PackedBatch) -> jax.Array:
        return self.output(self.self(x, batch), x)


class Intermediate(nnx.Module):
    def __init__(self, cfg: EncoderConfig, *, dtype, rngs: nnx.Rngs):
        self.dense = Linear(cfg.hidden_size, cfg.intermediate_size, bias=True, dtype=dtype, rngs=rngs)
        self.act = cfg.hidden_act

    def __call__(self, x: jax.Array) -> jax.Array:
        return activation(self.act)(self.dense(x))


class EncoderLayer(nnx.Module):
    def __init__(self, cfg: EncoderConfig, *, dtype, rngs: nnx.Rngs):
        self.attention = AttentionBlock(cfg, dtype=dtype, rngs=rngs)
        self.intermediate = Intermediate(cfg, dtype=dtype, rngs=rngs)
        self.output = DenseLayerNorm(cfg.intermediate_size, cfg, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array, batch: PackedBatch) -> jax.Array:
        x = self.attention(x, batch)
        return self.output(self.intermediate(x), x)


class Encoder(nnx.Module):
    def __init__(self, cfg: EncoderConfig, *, dtype, rngs: nnx.Rngs):
        self.layer = nnx.List([EncoderLayer(cfg, dtype=dtype, rngs=rngs) for _ in range(cfg.num_layers)])

    def __call__(self, x: jax.Array, batch: PackedBatch) -> jax.Array:
        for layer in self.layer:
            x = layer(x, batch)
        return x


class Pooler(nnx.Module):
    """BERT's pooler: dense + tanh over a row (the [CLS] token)."""

    def __init__(self, cfg: EncoderConfig, *, dtype, rngs: nnx.Rngs):
        self.dense = Linear(cfg.hidden_size, cfg.hidden_size, bias=True, dtype=dtype, rngs=rngs)

    def __call__(self, rows: jax.Array) -> jax.Array:
        return jnp.tanh(self.dense(rows))


class EncoderModel(nnx.Module):
    """HF BertModel / RobertaModel / XLMRobertaModel (the pooler, when present, is only used by heads)."""

    def __init__(self, cfg: EncoderConfig, *, dtype, rngs: nnx.Rngs, with_pooler: bool):
        self.cfg = cfg
        self.embeddings = Embeddings(cfg, dtype=dtype, rngs=rngs)
        self.encoder = Encoder(cfg, dtype=dtype, rngs=rngs)
        self.pooler = Pooler(cfg, dtype=dtype, rngs=rngs) if with_pooler else None

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
