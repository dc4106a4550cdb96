"""JinaBERT (jina-embeddings-v2: -small-en, -base-en, -base-de / -es / -zh; jina-reranker-v1 -turbo-en / -tiny-en)
on models/bert.py's encoder with its two options.

The checkpoints are remote code (`auto_map` to jinaai/jina-bert-implementation), read here without running it:
config.json is a BERT config (`model_type` "bert") with `position_embedding_type` "alibi" and
`feed_forward_type` "geglu" (or "reglu"). Against BERT, a JinaBERT layer has

* no position table (`embeddings.word_embeddings`, `embeddings.token_type_embeddings`, `embeddings.LayerNorm`),
  but ALiBi in every attention: the scaled score of query i and key j gains -slope_h * |i - j| (symmetric, as
  the encoder is bidirectional), with the slopes of `bert.alibi_slopes`;
* BERT's attention (`encoder.layer.N.attention.self.{query,key,value}`, `attention.output.{dense,LayerNorm}`);
* a GLU MLP in place of intermediate / output: `mlp.gated_layers` (no bias, 2 x intermediate rows; the first
  half goes through the activation and gates the second), `mlp.wo`, then `mlp.layernorm` of the residual sum.

Embeddings are the mean of the last hidden states over the sequence (the published `encode` and its
sentence-transformers Pooling config). The published embedding checkpoints name their architecture
`JinaBertForMaskedLM` (tensors without the `bert.` prefix; an MLM head, if any, is not read).
jina-embeddings-v2-base-code is another remote code (jinaai/jina-bert-v2-qk-post-norm: LayerNorms on q and k,
`mlp.up_gated_layer` / `mlp.down_layer` gated the other way round, `layer_norm_1` / `layer_norm_2`) and is refused.
"""

from __future__ import annotations

from flax import nnx

from jaxserve.kernels_pallas import REFERENCE_KERNELS, Kernels

from .bert import BertForSequenceClassification, EncoderConfig, EncoderForEmbedding

QK_POST_NORM = "jina-bert-v2-qk-post-norm"


def jina_bert_config(hf, kernels: Kernels = REFERENCE_KERNELS) -> EncoderConfig:
    """The encoder options of a JinaBERT config.json (see the module docstring)."""
    auto_map = getattr(hf, "auto_map", None) or {}
    if any(QK_POST_NORM in str(target) for target in auto_map.values()):
        raise ValueError(
            f"JinaBERT from {QK_POST_NORM} (jina-embeddings-v2-base-code: LayerNorms on q and k, up_gated_layer / "
            "down_layer) is not supported; jinaai/jina-bert-implementation's layout is."
        )
    return EncoderConfig.from_hf(hf, kernels, jina=True)


class JinaBertForEmbedding(EncoderForEmbedding):
    """JinaBertModel (and the published JinaBertForMaskedLM embedding checkpoints): hidden states for the
    poolers, tensors named `embeddings.*` / `encoder.*` or with the `bert.` prefix."""

    @classmethod
    def from_hf_config(
        cls, hf_config, *, dtype, rngs: nnx.Rngs, kernels: Kernels = REFERENCE_KERNELS
    ) -> JinaBertForEmbedding:
        return cls(jina_bert_config(hf_config, kernels), dtype=dtype, rngs=rngs)


class JinaBertForSequenceClassification(BertForSequenceClassification):
    """jina-reranker-v1 (-turbo-en, -tiny-en): BERT's head on JinaBERT, [CLS] → pooler (dense + tanh) →
    classifier (one label, a sigmoid score)."""

    @classmethod
    def from_hf_config(
        cls, hf_config, *, dtype, rngs: nnx.Rngs, kernels: Kernels = REFERENCE_KERNELS
    ) -> JinaBertForSequenceClassification:
        return cls(jina_bert_config(hf_config, kernels), dtype=dtype, rngs=rngs)
