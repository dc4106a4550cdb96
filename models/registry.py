"""Hugging Face `architectures` → jaxserve module. Every architecture is reimplemented here; remote code
is never run."""

from __future__ import annotations

from flax import nnx

from .llama import LlamaForCausalLM

CAUSAL_LM_ARCHITECTURES: dict[str, type] = {
    "LlamaForCausalLM": LlamaForCausalLM,
    "MistralForCausalLM": LlamaForCausalLM,
    "Qwen2ForCausalLM": LlamaForCausalLM,
    "Qwen3ForCausalLM": LlamaForCausalLM,
}


def causal_lm_class(hf_config) -> type:
    for name in getattr(hf_config, "architectures", None) or []:
        if name in CAUSAL_LM_ARCHITECTURES:
            return CAUSAL_LM_ARCHITECTURES[name]
    raise ValueError(
        f"Model architectures {hf_config.architectures} are not supported for generation. "
        f"Supported architectures: {sorted(CAUSAL_LM_ARCHITECTURES)}."
    )


def create_causal_lm(hf_config, *, dtype, rngs: nnx.Rngs) -> nnx.Module:
    return causal_lm_class(hf_config).from_hf_config(hf_config, dtype=dtype, rngs=rngs)
