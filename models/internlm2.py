"""InternLM2: the Llama architecture under other names, with Q, K and V packed in one `wqkv` whose rows hold, for
each KV head in turn, its query heads, then its key head, then its value head (`DecoderConfig.fused_qkv` "grouped").
`InternLM2ForCausalLM` generates; `InternLM2ForRewardModel`'s `v_head` scores every token (the seed example
internlm/internlm2-1_8b-reward). Both are remote code on the Hub; these are reimplementations."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jaxserve.kernels_pallas import REFERENCE_KERNELS, Kernels

from .batch import PackedBatch
from .layers import Linear
from .llama import DecoderConfig, LlamaForCausalLM, LlamaModel, PagedDecoder

# jaxserve's module names (HF Llama's) → InternLM2's
INTERNLM2_RENAMES = {
    "embed_tokens": "tok_embeddings",
    "self_attn.qkv_proj": "attention.wqkv",
    "self_attn.o_proj": "attention.wo",
    "mlp.gate_proj": "feed_forward.w1",
    "mlp.up_proj": "feed_forward.w3",
    "mlp.down_proj": "feed_forward.w2",
    "input_layernorm": "attention_norm",
    "post_attention_layernorm": "ffn_norm",
    "lm_head": "output",
}


class InternLM2ForCausalLM(LlamaForCausalLM):
    CHECKPOINT_RENAMES = INTERNLM2_RENAMES


class InternLM2ForRewardModel(PagedDecoder):
    """One reward per token: `v_head` over the final hidden states."""

    CHECKPOINT_RENAMES = INTERNLM2_RENAMES

    def __init__(self, cfg: DecoderConfig, *, dtype=jnp.float32, rngs: nnx.Rngs):
        self.cfg = cfg
        self.model = LlamaModel(cfg, dtype=dtype, rngs=rngs)
        self.v_head = Linear(cfg.hidden_size, 1, bias=False, dtype=dtype, rngs=rngs)

    @classmethod
    def from_hf_config(
        cls, hf_config, *, dtype, rngs: nnx.Rngs, kernels: Kernels = REFERENCE_KERNELS
    ) -> InternLM2ForRewardModel:
        return cls(DecoderConfig.from_hf(hf_config, kernels), dtype=dtype, rngs=rngs)

    def encode(self, batch: PackedBatch) -> jax.Array:
        return self.model(batch)[0]

    def token_classify(self, hidden: jax.Array) -> jax.Array:
        return self.v_head(hidden).astype(jnp.float32)
