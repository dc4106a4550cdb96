"""InternLM2 (Flax NNX): the Llama architecture with InternLM2's names and one packed `wqkv` projection, and
`InternLM2ForRewardModel`, whose `v_head` scores every token (the seed example internlm/internlm2-1_8b-reward).

`wqkv` rows hold, for each KV head in turn, its query heads, then its key head, then its value head.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jaxserve.kernels_pallas import REFERENCE_KERNELS, Kernels

from .batch import PackedBatch, RaggedBatch
from .layers import Embedding, Linear, RMSNorm, RopeConfig
from .llama import DecoderConfig, causal_attention


def decoder_config(hf, kernels: Kernels = REFERENCE_KERNELS) -> DecoderConfig:
    scaling = getattr(hf, "rope_scaling", None) or {}
    if scaling.get("type", "dynamic") != "dynamic":
        raise ValueError(f"InternLM2 rope_scaling {scaling!r} is not supported (only dynamic or none).")
    # dynamic NTK scaling only changes positions beyond max_position_embeddings, which max_model_len never exceeds
    return DecoderConfig(
        vocab_size=hf.vocab_size,
        hidden_size=hf.hidden_size,
        intermediate_size=hf.intermediate_size,
        num_layers=hf.num_hidden_layers,
        num_heads=hf.num_attention_heads,
        num_kv_heads=getattr(hf, "num_key_value_heads", hf.num_attention_heads),
        head_dim=hf.hidden_size // hf.num_attention_heads,
        rms_norm_eps=hf.rms_norm_eps,
        rope=RopeConfig(theta=float(getattr(hf, "rope_theta", 10000.0))),
        max_position_embeddings=hf.max_position_embeddings,
        qkv_bias=bool(getattr(hf, "bias", False)),
        o_bias=bool(getattr(hf, "bias", False)),
        kernels=kernels,
    )


class InternLM2Attention(nnx.Module):
    def __init__(self, cfg: DecoderConfig, *, dtype, rngs: nnx.Rngs):
        self.cfg = cfg
        rows = (cfg.num_heads + 2 * cfg.num_kv_heads) * cfg.head_dim
        self.wqkv = Linear(cfg.hidden_size, rows, bias=cfg.qkv_bias, dtype=dtype, rngs=rngs)
        self.wo = Linear(cfg.num_heads * cfg.head_dim, cfg.hidden_size, bias=cfg.o_bias, dtype=dtype, rngs=rngs)

    def __call__(self, x, cos, sin, batch: RaggedBatch | PackedBatch, kv_pages):
        cfg = self.cfg
        t, group = x.shape[0], cfg.num_heads // cfg.num_kv_heads
        qkv = self.wqkv(x).reshape(t, cfg.num_kv_heads, group + 2, cfg.head_dim)
        q = qkv[:, :, :group].reshape(t, cfg.num_heads, cfg.head_dim)
        out, kv_pages = causal_attention(q, qkv[:, :, group], qkv[:, :, group + 1], cos, sin, batch, kv_pages, cfg)
        return self.wo(out.reshape(t, cfg.num_heads * cfg.head_dim)), kv_pages


class InternLM2FeedForward(nnx.Module):
    def __init__(self, cfg: DecoderConfig, *, dtype, rngs: nnx.Rngs):
        h, i = cfg.hidden_size, cfg.intermediate_size
        self.w1 = Linear(h, i, bias=False, dtype=dtype, rngs=rngs)  # gate
        self.w3 = Linear(h, i, bias=False, dtype=dtype, rngs=rngs)  # up
        self.w2 = Linear(i, h, bias=False, dtype=dtype, rngs=rngs)  # down

    def __call__(self, x):
        return self.w2(jax.nn.silu(self.w1(x)) * self.w3(x))


class InternLM2Layer(nnx.Module):
    def __init__(self, cfg: DecoderConfig, *, dtype, rngs: nnx.Rngs):
        self.attention_norm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, dtype=dtype)
        self.attention = InternLM2Attention(cfg, dtype=dtype, rngs=rngs)
        self.ffn_norm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, dtype=dtype)
        self.feed_forward = InternLM2FeedForward(cfg, dtype=dtype, rngs=rngs)

    def __call__(self, x, cos, sin, batch, kv_pages):
        attn, kv_pages = self.attention(self.attention_norm(x), cos, sin, batch, kv_pages)
        x = x + attn
        return x + self.feed_forward(self.ffn_norm(x)), kv_pages


class InternLM2Model(nnx.Module):
    def __init__(self, cfg: DecoderConfig, *, dtype, rngs: nnx.Rngs):
        self.cfg = cfg
        self.tok_embeddings = Embedding(cfg.vocab_size, cfg.hidden_size, dtype=dtype, rngs=rngs)
        self.layers = nnx.List([InternLM2Layer(cfg, dtype=dtype, rngs=rngs) for _ in range(cfg.num_layers)])
        self.norm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, dtype=dtype)

    def __call__(self, batch: PackedBatch) -> jax.Array:
        x = self.tok_embeddings(batch.token_ids)
        cos, sin = self.cfg.rope.cos_sin(batch.positions, self.cfg.head_dim)
        for layer in self.layers:
            x, _ = layer(x, cos, sin, batch, None)
        return self.norm(x)


class InternLM2ForRewardModel(nnx.Module):
    """One reward per token: `v_head` over the final hidden states."""

    def __init__(self, cfg: DecoderConfig, *, dtype=jnp.float32, rngs: nnx.Rngs):
        self.cfg = cfg
        self.model = InternLM2Model(cfg, dtype=dtype, rngs=rngs)
        self.v_head = Linear(cfg.hidden_size, 1, bias=False, dtype=dtype, rngs=rngs)

    @classmethod
    def from_hf_config(
        cls, hf_config, *, dtype, rngs: nnx.Rngs, kernels: Kernels = REFERENCE_KERNELS
    ) -> InternLM2ForRewardModel:
        return cls(decoder_config(hf_config, kernels), dtype=dtype, rngs=rngs)

    def encode(self, batch: PackedBatch) -> jax.Array:
        return self.model(batch)

    def token_classify(self, hidden: jax.Array) -> jax.Array:
        return self.v_head(hidden).astype(jnp.float32)
