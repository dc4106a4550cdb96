"""DistilBERT as Flax NNX modules: the bare encoder (for embeddings) and DistilBertForSequenceClassification.

BERT's post-LayerNorm blocks with DistilBERT's own tensor names and no token types: embeddings (word + absolute
position, LayerNorm), then per layer `attention.{q,k,v,out}_lin` → `sa_layer_norm` of the residual sum →
`ffn.lin1` / activation / `ffn.lin2` → `output_layer_norm`. The classifier reads the first token ([CLS]) through
`pre_classifier` and a ReLU. Sequences arrive packed (`PackedBatch`) and attend through
`kernels_pallas.varlen_attention`, as in bert.py.

    model.encode(batch) -> hidden [T, H]
    model.classify(rows [S, H]) -> logits [S, num_labels]
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jaxserve.kernels_pallas import REFERENCE_KERNELS, Kernels

from .batch import PackedBatch
from .bert import EncoderConfig
from .layers import Embedding, LayerNorm, Linear, activation

LAYER_NORM_EPS = 1e-12  # fixed in DistilBERT (not in its config)


def distilbert_config(hf, kernels: Kernels = REFERENCE_KERNELS) -> EncoderConfig:
    if getattr(hf, "sinusoidal_pos_embds", False):
        raise ValueError("distilbert: sinusoidal_pos_embds is not supported (only learned position embeddings).")
    return EncoderConfig(
        vocab_size=hf.vocab_size,
        hidden_size=hf.dim,
        intermediate_size=hf.hidden_dim,
        num_layers=hf.n_layers,
        num_heads=hf.n_heads,
        max_position_embeddings=hf.max_position_embeddings,
        type_vocab_size=0,
        layer_norm_eps=LAYER_NORM_EPS,
        hidden_act=hf.activation,
        position_offset=0,
        num_labels=getattr(hf, "num_labels", 2),
        kernels=kernels,
    )


class Embeddings(nnx.Module):
    def __init__(self, cfg: EncoderConfig, *, dtype, rngs: nnx.Rngs):
        self.word_embeddings = Embedding(cfg.vocab_size, cfg.hidden_size, dtype=dtype, rngs=rngs, axis="vocab")
        self.position_embeddings = Embedding(cfg.max_position_embeddings, cfg.hidden_size, dtype=dtype, rngs=rngs)
        self.LayerNorm = LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps, dtype=dtype)

    def __call__(self, batch: PackedBatch) -> jax.Array:
        return self.LayerNorm(self.word_embeddings(batch.token_ids) + self.position_embeddings(batch.positions))


class MultiHeadSelfAttention(nnx.Module):
    def __init__(self, cfg: EncoderConfig, *, dtype, rngs: nnx.Rngs):
        h = cfg.hidden_size
        self.num_heads = cfg.num_heads
        self.attention = cfg.kernels.varlen_attention
        self.q_lin = Linear(h, h, bias=True, dtype=dtype, rngs=rngs, axes=("heads", None))
        self.k_lin = Linear(h, h, bias=True, dtype=dtype, rngs=rngs, axes=("heads", None))
        self.v_lin = Linear(h, h, bias=True, dtype=dtype, rngs=rngs, axes=("heads", None))
        self.out_lin = Linear(h, h, bias=True, dtype=dtype, rngs=rngs, axes=(None, "heads"))

    def __call__(self, x: jax.Array, batch: PackedBatch) -> jax.Array:
        t, h = x.shape
        d = h // self.num_heads
        q, k, v = (proj(x).reshape(t, self.num_heads, d) for proj in (self.q_lin, self.k_lin, self.v_lin))
        out = self.attention(q, k, v, batch.cu_seqlens, batch.num_seqs, sm_scale=d**-0.5, causal=False)
        return self.out_lin(out.reshape(t, h))


class FFN(nnx.Module):
    def __init__(self, cfg: EncoderConfig, *, dtype, rngs: nnx.Rngs):
        self.lin1 = Linear(
            cfg.hidden_size, cfg.intermediate_size, bias=True, dtype=dtype, rngs=rngs, axes=("mlp", None)
        )
        self.lin2 = Linear(
            cfg.intermediate_size, cfg.hidden_size, bias=True, dtype=dtype, rngs=rngs, axes=(None, "mlp")
        )
        self.act = cfg.hidden_act

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.lin2(activation(self.act)(self.lin1(x)))


class TransformerBlock(nnx.Module):
    def __init__(self, cfg: EncoderConfig, *, dtype, rngs: nnx.Rngs):
        self.attention = MultiHeadSelfAttention(cfg, dtype=dtype, rngs=rngs)
        self.sa_layer_norm = LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps, dtype=dtype)
        self.ffn = FFN(cfg, dtype=dtype, rngs=rngs)
        self.output_layer_norm = LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps, dtype=dtype)

    def __call__(self, x: jax.Array, batch: PackedBatch) -> jax.Array:
        x = self.sa_layer_norm(self.attention(x, batch) + x)
        return self.output_layer_norm(self.ffn(x) + x)


class Transformer(nnx.Module):
    def __init__(self, cfg: EncoderConfig, *, dtype, rngs: nnx.Rngs):
        self.layer = nnx.List([TransformerBlock(cfg, dtype=dtype, rngs=rngs) for _ in range(cfg.num_layers)])

    def __call__(self, x: jax.Array, batch: PackedBatch) -> jax.Array:
        for layer in self.layer:
            x = layer(x, batch)
        return x


class DistilBertModel(nnx.Module):
    def __init__(self, cfg: EncoderConfig, *, dtype, rngs: nnx.Rngs):
        self.embeddings = Embeddings(cfg, dtype=dtype, rngs=rngs)
        self.transformer = Transformer(cfg, dtype=dtype, rngs=rngs)

    def __call__(self, batch: PackedBatch) -> jax.Array:
        return self.transformer(self.embeddings(batch), batch)


class DistilBertForEmbedding(nnx.Module):
    """A bare DistilBertModel checkpoint (`embeddings.*`, `transformer.*`, or with the `distilbert.` prefix)."""

    CHECKPOINT_ALIASES = {"model.": ("", "distilbert.")}

    def __init__(self, cfg: EncoderConfig, *, dtype, rngs: nnx.Rngs):
        self.cfg = cfg
        self.model = DistilBertModel(cfg, dtype=dtype, rngs=rngs)

    @classmethod
    def from_hf_config(
        cls, hf_config, *, dtype, rngs: nnx.Rngs, kernels: Kernels = REFERENCE_KERNELS
    ) -> DistilBertForEmbedding:
        return cls(distilbert_config(hf_config, kernels), dtype=dtype, rngs=rngs)

    def encode(self, batch: PackedBatch) -> jax.Array:
        return self.model(batch)


class DistilBertForSequenceClassification(nnx.Module):
    """[CLS] → pre_classifier → ReLU → classifier."""

    def __init__(self, cfg: EncoderConfig, *, dtype, rngs: nnx.Rngs):
        self.cfg = cfg
        self.distilbert = DistilBertModel(cfg, dtype=dtype, rngs=rngs)
        self.pre_classifier = Linear(cfg.hidden_size, cfg.hidden_size, bias=True, dtype=dtype, rngs=rngs)
        self.classifier = Linear(cfg.hidden_size, cfg.num_labels, bias=True, dtype=dtype, rngs=rngs)

    @classmethod
    def from_hf_config(
        cls, hf_config, *, dtype, rngs: nnx.Rngs, kernels: Kernels = REFERENCE_KERNELS
    ) -> DistilBertForSequenceClassification:
        return cls(distilbert_config(hf_config, kernels), dtype=dtype, rngs=rngs)

    def encode(self, batch: PackedBatch) -> jax.Array:
        return self.distilbert(batch)

    def classify(self, rows: jax.Array) -> jax.Array:
        return self.classifier(jax.nn.relu(self.pre_classifier(rows))).astype(jnp.float32)

    token_classify = classify
