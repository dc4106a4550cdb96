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
from .bert_with_rope import GteNewForSequenceClassification, GteNewModel, JinaRobertaModel, NomicBertModel
from .deberta_v2 import DebertaV2ForEmbedding, DebertaV2ForSequenceClassification, DebertaV2ForTokenClassification
from .distilbert import DistilBertForEmbedding, DistilBertForSequenceClassification
from .internlm2 import InternLM2ForCausalLM, InternLM2ForRewardModel
from .jina_bert import JinaBertForEmbedding, JinaBertForSequenceClassification
from .llama import (
    Gemma3ForConditionalGeneration,
    LlamaForCausalLM,
    LlamaForEmbedding,
    LlamaForSequenceClassification,
)
from .modernbert import ModernBertForEmbedding, ModernBertForSequenceClassification, ModernBertForTokenClassification
from .qwen2_rm import Qwen2ForProcessRewardModel, Qwen2ForRewardModel
from .whisper import WhisperForConditionalGeneration

_DECODER_FAMILIES = ("Llama", "Mistral", "Qwen2", "Qwen3", "Gemma", "Gemma2", "Phi3")

# generation only: the MoE families (their experts stacked at load, models/moe.py), the families whose pooling
# models nobody publishes, and Gemma 3's text model (its `Gemma3Model` / `Gemma3ForSequenceClassification` are the
# multimodal ones)
_GENERATION_FAMILIES = ("Mixtral", "Qwen2Moe", "Qwen3Moe", "Granite", "Olmo2", "SmolLM3", "Gemma3")

CAUSAL_LM_ARCHITECTURES: dict[str, type] = {
    **{f"{family}ForCausalLM": LlamaForCausalLM for family in _DECODER_FAMILIES + _GENERATION_FAMILIES},
    "InternLM2ForCausalLM": InternLM2ForCausalLM,
    "Gemma3ForConditionalGeneration": Gemma3ForConditionalGeneration,  # text-only
    "WhisperForConditionalGeneration": WhisperForConditionalGeneration,  # speech to text (an encoder-decoder)
}

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
    "JinaBertModel": JinaBertForEmbedding,
    "JinaBertForMaskedLM": JinaBertForEmbedding,  # jina-embeddings-v2's published architecture: its encoder
    "JinaBertForSequenceClassification": JinaBertForSequenceClassification,  # jina-reranker-v1
    "Qwen2ForRewardModel": Qwen2ForRewardModel,
    "Qwen2ForProcessRewardModel": Qwen2ForProcessRewardModel,
    "NewModel": GteNewModel,
    "NewForSequenceClassification": GteNewForSequenceClassification,
    "NomicBertModel": NomicBertModel,
    "ModernBertModel": ModernBertForEmbedding,
    "ModernBertForMaskedLM": ModernBertForEmbedding,  # answerdotai/ModernBERT-base: its encoder, MLM head unread
    "ModernBertForSequenceClassification": ModernBertForSequenceClassification,
    "ModernBertForTokenClassification": ModernBertForTokenClassification,
    "DebertaV2Model": DebertaV2ForEmbedding,
    "DebertaV2ForSequenceClassification": DebertaV2ForSequenceClassification,
    "DebertaV2ForTokenClassification": DebertaV2ForTokenClassification,
    **{f"{family}ForSequenceClassification": LlamaForSequenceClassification for family in _DECODER_FAMILIES},
    **{f"{family}Model": LlamaForEmbedding for family in _DECODER_FAMILIES},
    "Gemma3TextModel": LlamaForEmbedding,
    "Gemma3ForCausalLM": LlamaForEmbedding,
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


# architectures whose checkpoints with rotary positions are another family (jina-embeddings-v3 is an XLMRobertaModel)
ROTARY_VARIANTS: dict[str, type] = {"XLMRobertaModel": JinaRobertaModel}


def pooling_model_class(hf_config) -> type:
    if getattr(hf_config, "position_embedding_type", None) in ("rotary", "rope"):
        for name in getattr(hf_config, "architectures", None) or []:
            if name in ROTARY_VARIANTS:
                return ROTARY_VARIANTS[name]
    return _lookup(hf_config, POOLING_ARCHITECTURES, "pooling")


def is_generative(hf_config) -> bool:
    return any(name in CAUSAL_LM_ARCHITECTURES for name in getattr(hf_config, "architectures", None) or [])


def create_causal_lm(hf_config, *, dtype, rngs: nnx.Rngs, kernels: Kernels = REFERENCE_KERNELS) -> nnx.Module:
    return causal_lm_class(hf_config).from_hf_config(hf_config, dtype=dtype, rngs=rngs, kernels=kernels)
