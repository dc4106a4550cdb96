"""The Llama family as Flax NNX modules: Llama (llama3 RoPE scaling included), Mistral (sliding window),
Qwen2 (QKV bias) and Qwen3 (per-head Q/K RMSNorm), with grouped-query attention and tied or untied
embeddings. One forward pass runs a ragged batch over the paged KV cache:

    model(batch, kv_pages) -> (hidden [T, H], kv_pages')      model.logits(hidden_rows) -> [R, V] float32
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from jaxserve.kernels_pallas import REFERENCE_KERNELS, Kernels

from .batch import PackedBatch, RaggedBatch
from .layers import Embedding, Linear, RMSNorm, RopeConfig, apply_rotary, rotary_cos_sin


@dataclasses.dataclass(frozen=True)
class DecoderConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope: RopeConfig
    max_position_embeddings: int
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False
    sliding_window: int | None = None
    kernels: Kernels = REFERENCE_KERNELS  # the attention kernels (select_kernels: Pallas or the references)

    @property
    def max_tokens(self) -> int:
        return self.max_position_embeddings

    @classmethod
    def from_hf(cls, hf, kernels: Kernels = REFERENCE_KERNELS) -> DecoderConfig:
        model_type = hf.model_type
        act = getattr(hf, "hidden_act", "silu")
        if act != "silu":
            raise ValueError(f"{model_type}: hidden_act {act!r} is not supported (only silu).")
        num_heads = hf.num_attention_heads
        attention_bias = bool(getattr(hf, "attention_bias", False))
        qwen2 = model_type == "qwen2"
        return cls(
            vocab_size=hf.vocab_size,
            hidden_size=hf.hidden_size,
            intermediate_size=hf.intermediate_size,
            num_layers=hf.num_hidden_layers,
            num_heads=num_heads,
            num_kv_heads=getattr(hf, "num_key_value_heads", None) or num_heads,
            head_dim=getattr(hf, "head_dim", None) or hf.hidden_size // num_heads,
            rms_norm_eps=hf.rms_norm_eps,
            rope=RopeConfig.from_hf(hf),
            max_position_embeddings=hf.max_position_embeddings,
            tie_word_embeddings=bool(getattr(hf, "tie_word_embeddings", False)),
            qkv_bias=qwen2 or attention_bias,
            o_bias=attention_bias and not qwen2,
            mlp_bias=bool(getattr(hf, "mlp_bias", False)),
            qk_norm=model_type == "qwen3",
            sliding_window=_sliding_window(hf),
            kernels=kernels,
        )


def _sliding_window(hf) -> int | None:
    """Mistral always honours `sliding_window`; Qwen2/3 only with `use_sliding_window` on every layer."""
    window = getattr(hf, "sliding_window", None)
    if not window:
        return None
    if hf.model_type == "mistral":
        return int(window)
    if getattr(hf, "use_sliding_window", False):
        if set(getattr(hf, "layer_types", None) or ["sliding_attention"]) != {"sliding_attention"}:
            raise ValueError(f"{hf.model_type}: a mix of sliding and full attention layers is not supported yet.")
        return int(window)
    return None


class Attention(nnx.Module):
    def __init__(self, cfg: DecoderConfig, *, dtype, rngs: nnx.Rngs):
        self.cfg = cfg
        h, d = cfg.hidden_size, cfg.head_dim
        self.q_proj = Linear(h, cfg.num_heads * d, bias=cfg.qkv_bias, dtype=dtype, rngs=rngs)
        self.k_proj = Linear(h, cfg.num_kv_heads * d, bias=cfg.qkv_bias, dtype=dtype, rngs=rngs)
        self.v_proj = Linear(h, cfg.num_kv_heads * d, bias=cfg.qkv_bias, dtype=dtype, rngs=rngs)
        self.o_proj = Linear(cfg.num_heads * d, h, bias=cfg.o_bias, dtype=dtype, rngs=rngs)
        if cfg.qk_norm:
            self.q_norm = RMSNorm(d, eps=cfg.rms_norm_eps, dtype=dtype)
            self.k_norm = RMSNorm(d, eps=cfg.rms_norm_eps, dtype=dtype)

    def __call__(self, x, cos, sin, batch: RaggedBatch | PackedBatch, kv_pages):
        cfg = self.cfg
        t = x.shape[0]
        q = self.q_proj(x).reshape(t, cfg.num_heads, cfg.head_dim)
        k = self.k_proj(x).reshape(t, cfg.num_kv_heads, cfg.head_dim)
        v = self.v_proj(x).reshape(t, cfg.num_kv_heads, cfg.head_dim)
        if cfg.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        out, kv_pages = causal_attention(q, k, v, cos, sin, batch, kv_pages, cfg)
        return self.o_proj(out.reshape(t, cfg.num_heads * cfg.head_dim)), kv_pages


def causal_attention(q, k, v, cos, sin, batch: RaggedBatch | PackedBatch, kv_pages, cfg: DecoderConfig):
    """RoPE, then attention: over the paged cache for a generation step (RaggedBatch), or within each packed
    sequence, with no cache, for a one-shot pooling pass (PackedBatch)."""
    q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
    sm_scale = cfg.head_dim**-0.5
    if isinstance(batch, PackedBatch):
        out = cfg.kernels.varlen_attention(
            q, k, v, batch.cu_seqlens, batch.num_seqs, sm_scale=sm_scale, causal=True, sliding_window=cfg.sliding_window
        )
        return out, None
    return cfg.kernels.ragged_paged_attention(
        q,
        k,
        v,
        kv_pages,
        batch.kv_lens,
        batch.block_table,
        batch.cu_q_lens,
        batch.num_seqs,
        sm_scale=sm_scale,
        sliding_window=cfg.sliding_window,
    )


class MLP(nnx.Module):
    def __init__(self, cfg: DecoderConfig, *, dtype, rngs: nnx.Rngs):
        h, i, b = cfg.hidden_size, cfg.intermediate_size, cfg.mlp_bias
        self.gate_proj = Linear(h, i, bias=b, dtype=dtype, rngs=rngs)
        self.up_proj = Linear(h, i, bias=b, dtype=dtype, rngs=rngs)
        self.down_proj = Linear(i, h, bias=b, dtype=dtype, rngs=rngs)

    def __call__(self, x):
        return self.down_proj(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nnx.Module):
    def __init__(self, cfg: DecoderConfig, *, dtype, rngs: nnx.Rngs):
        self.input_layernorm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, dtype=dtype)
        self.self_attn = Attention(cfg, dtype=dtype, rngs=rngs)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, dtype=dtype)
        self.mlp = MLP(cfg, dtype=dtype, rngs=rngs)

    def __call__(self, x, cos, sin, batch: RaggedBatch, kv_pages):
        attn, kv_pages = self.self_attn(self.input_layernorm(x), cos, sin, batch, kv_pages)
        x = x + attn
        return x + self.mlp(self.post_attention_layernorm(x)), kv_pages


class LlamaModel(nnx.Module):
    def __init__(self, cfg: DecoderConfig, *, dtype, rngs: nnx.Rngs):
        self.cfg = cfg
        self.embed_tokens = Embedding(cfg.vocab_size, cfg.hidden_size, dtype=dtype, rngs=rngs)
        self.layers = nnx.List([DecoderLayer(cfg, dtype=dtype, rngs=rngs) for _ in range(cfg.num_layers)])
        self.norm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, dtype=dtype)

    def __call__(self, batch: RaggedBatch | PackedBatch, kv_pages: list[jax.Array] | None = None):
        """(hidden [T, H], the updated pages); pages are None for a packed, cache-free pass."""
        x = self.embed_tokens(batch.token_ids)
        cos, sin = rotary_cos_sin(batch.positions, self.cfg.rope.inverse_frequencies(self.cfg.head_dim))
        new_pages = []
        for i, layer in enumerate(self.layers):
            x, pages = layer(x, cos, sin, batch, None if kv_pages is None else kv_pages[i])
            new_pages.append(pages)
        return self.norm(x), None if kv_pages is None else new_pages


class PagedDecoder(nnx.Module):
    """A decoder with `model: LlamaModel` that also runs over the paged KV cache: what the generation engine
    needs, and what lets a decoder pooling model (embedder, classifier) use prefix caching."""

    cfg: DecoderConfig
    model: LlamaModel

    @property
    def kv_geometry(self) -> tuple[int, int, int]:
        """(layers, KV heads, head_dim): what the paged cache must hold."""
        return self.cfg.num_layers, self.cfg.num_kv_heads, self.cfg.head_dim

    def __call__(self, batch: RaggedBatch, kv_pages: list[jax.Array]) -> tuple[jax.Array, list[jax.Array]]:
        """(hidden [T, H], the updated pages) of a ragged step over the cache."""
        return self.model(batch, kv_pages)


class LlamaForCausalLM(PagedDecoder):
    """Llama, Mistral, Qwen2 and Qwen3 causal LMs (the differences live in `DecoderConfig`)."""

    def __init__(self, cfg: DecoderConfig, *, dtype=jnp.float32, rngs: nnx.Rngs):
        self.cfg = cfg
        self.model = LlamaModel(cfg, dtype=dtype, rngs=rngs)
        self.lm_head = (
            None
            if cfg.tie_word_embeddings
            else Linear(cfg.hidden_size, cfg.vocab_size, bias=False, dtype=dtype, rngs=rngs)
        )

    @classmethod
    def from_hf_config(
        cls, hf_config, *, dtype, rngs: nnx.Rngs, kernels: Kernels = REFERENCE_KERNELS
    ) -> LlamaForCausalLM:
        return cls(DecoderConfig.from_hf(hf_config, kernels), dtype=dtype, rngs=rngs)

    def logits(self, hidden: jax.Array) -> jax.Array:
        if self.lm_head is None:
            return self.model.embed_tokens.attend(hidden)
        return jnp.einsum("...h,vh->...v", hidden, self.lm_head.weight[...], preferred_element_type=jnp.float32)


class LlamaForSequenceClassification(PagedDecoder):
    """Llama/Mistral/Qwen2/Qwen3 `*ForSequenceClassification`: the `score` head on the last token."""

    def __init__(self, cfg: DecoderConfig, num_labels: int, *, dtype=jnp.float32, rngs: nnx.Rngs):
        self.cfg = cfg
        self.model = LlamaModel(cfg, dtype=dtype, rngs=rngs)
        self.score = Linear(cfg.hidden_size, num_labels, bias=False, dtype=dtype, rngs=rngs)

    @classmethod
    def from_hf_config(
        cls, hf_config, *, dtype, rngs: nnx.Rngs, kernels: Kernels = REFERENCE_KERNELS
    ) -> LlamaForSequenceClassification:
        return cls(DecoderConfig.from_hf(hf_config, kernels), hf_config.num_labels, dtype=dtype, rngs=rngs)

    def encode(self, batch: PackedBatch) -> jax.Array:
        return self.model(batch)[0]

    def classify(self, rows: jax.Array) -> jax.Array:
        return self.score(rows).astype(jnp.float32)

    token_classify = classify


class LlamaForEmbedding(PagedDecoder):
    """A Llama-family checkpoint run as an embedding model (hidden states for the poolers). The checkpoint may
    be a bare `*Model` (tensors named `layers.*`) or a causal LM (`model.layers.*`)."""

    CHECKPOINT_ALIASES = {"model.": ("",)}

    def __init__(self, cfg: DecoderConfig, *, dtype=jnp.float32, rngs: nnx.Rngs):
        self.cfg = cfg
        self.model = LlamaModel(cfg, dtype=dtype, rngs=rngs)

    @classmethod
    def from_hf_config(
        cls, hf_config, *, dtype, rngs: nnx.Rngs, kernels: Kernels = REFERENCE_KERNELS
    ) -> LlamaForEmbedding:
        return cls(DecoderConfig.from_hf(hf_config, kernels), dtype=dtype, rngs=rngs)

    def encode(self, batch: PackedBatch) -> jax.Array:
        return self.model(batch)[0]
