"""Hugging Face `architectures` → jaxserve module. Every architecture is reimplemented here; remote code
is never run."""

from __future__ import annotations

from flax import nnx

from jaxserve.kernels_pallas import REFERENCE_KERNELS, Kernels

from .bert import (
    BertForSequenceClassification,
    EncoderForEmbedding,
    EncoderForTokenClassification,
    RobertaForSequenceClassification,
)
from .distilbert import DistilBertForEmbedding, DistilBertForSequenceClassification
from .internlm2 import InternLM2ForRewardModel
from .llama import LlamaForCausalLM, LlamaForEmbedding, LlamaForSequenceClassification

_DECODER_FAMILIES = ("Llama", "Mistral", "Qwen2", "Qwen3")

CAUSAL_LM_ARCHITECTURES: dict[str, type] = {f"{family}ForCausalLM": LlamaForCausalLM for family in _DECODER_FAMILIES}

POOLING_ARCHITECTURES: dict[str, type] = {
    "BertModel": EncoderForEmbedding,
    "RobertaModel": EncoderForEmbedding,
    "XLMRobertaModel": EncoderForEmbedding,
    "BgeM3EmbeddingModel": EncoderForEmbedding,
    "BertForSequenceClassification": BertForSequenceClassification,
    "RobertaForSequenceClassification": RobertaForSequenceClassification,
    "XLMRobertaForSequenceClassification": RobertaForSequenceClassification,
    "DistilBertModel": DistilBertForEmbedding,
    "DistilBertForSequenceClassification": DistilBertForSequenceClassification,
    "BertForTokenClassification": EncoderForTokenClassification,
    "RobertaForTokenClassification": EncoderForTokenClassification,
    "XLMRobertaForTokenClassification": EncoderForTokenClassification,
    "InternLM2ForRewardModel": InternLM2ForRewardModel,
    **{f"{family}ForSequenceClassification": LlamaForSequenceClassification for family in _DECODER_FAMILIES},
    **{f"{family}Model": LlamaForEmbedding for family in _DECODER_FAMILIES},
    # a causal LM served with --runner pooling embeds with its hidden states
    **{f"{family}ForCausalLM": LlamaForEmbedding for family in _DECODER_FAMILIES},
}


def _lookup(hf_config, table: dict[str, type], what: str) -> type:
    for name in getattr(hf_config, "architectures", None) or []:
        if name in table:
            return table[name]
    raise ValueError(
        f"Model architectures {hf_config.architectures} are not supported for {what}. "
        f"Supported architectures: {sorted(table)}."
    )


def causal_lm_class(hf_config) -> type:
    return _lookup(hf_config, CAUSAL_LM_ARCHITECTURES, "generation")


def pooling_model_class(hf_config) -> type:
    return _lookup(hf_config, POOLING_ARCHITECTURES, "pooling")


def is_generative(hf_config) -> bool:
    return any(name in CAUSAL_LM_ARCHITECTURES for name in getattr(hf_config, "architectures", None) or [])


def create_causal_lm(hf_config, *, dtype, rngs: nnx.Rngs, kernels: Kernels = REFERENCE_KERNELS) -> nnx.Module:
    return causal_lm_class(hf_config).from_hf_config(hf_config, dtype=dtype, rngs=rngs, kernels=kernels)
