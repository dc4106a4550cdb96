"""ModernBERT as Flax NNX modules: the bare encoder (for embeddings) and its sequence- and token-classification
heads (gte-modernbert-base, gte-reranker-modernbert-base and other ModernBertFor*Classification checkpoints).

A pre-LayerNorm encoder with rotary positions and no token types: `embeddings.tok_embeddings` then
`embeddings.norm`; per layer `attn_norm` (none on layer 0) → `attn.Wqkv` (q, k and v packed in that order) →
RoPE → attention → `attn.Wo`, added to the residual; `mlp_norm` → `mlp.Wi` → GeGLU (the first half of Wi's
output through the activation, times the second half) → `mlp.Wo`, added; finally `final_norm`. Layers alternate
between global attention (every `global_attn_every_n_layers`-th layer from layer 0, RoPE at the global theta)
and local attention (keys within `local_attention // 2` positions either side, RoPE at the local theta).
transformers 5 reads the older config keys into `layer_types` and per-type `rope_parameters`; both spellings are
accepted. The norms have no bias unless `norm_bias`. Sequences arrive packed (`PackedBatch`) and attend through
`kernels_pallas.varlen_attention`, as in bert.py.

The classifiers pool by `classifier_pooling` ("cls": the first token, "mean": the mean of the sequence), then
`head.dense` → `classifier_activation` → `head.norm` → `classifier`; the token classifier runs the same head
and classifier on every token.

    model.encode(batch) -> hidden [T, H]
    model.classify(rows [S, H]) -> logits [S, num_labels]       (ModernBertForSequenceClassification)
    model.token_classify(hidden [T, H]) -> logits [T, num_labels]
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from jaxserve.kernels_pallas import REFERENCE_KERNELS, Kernels

from .batch import PackedBatch
from .layers import Embedding, LayerNorm, Linear, RopeConfig, activation, apply_rotary

GLOBAL, LOCAL = "full_attention", "sliding_attention"  # transformers' `layer_types` names
DEFAULT_THETA = {GLOBAL: 160_000.0, LOCAL: 10_000.0}
CLASSIFIER_POOLING = ("cls", "mean")


@dataclasses.dataclass(frozen=True)
class ModernBertConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    max_position_embeddings: int
    norm_eps: float
    norm_bias: bool
    attention_bias: bool
    mlp_bias: bool
    hidden_act: str
    layer_types: tuple[str, ...]  # GLOBAL or LOCAL per layer
    rope: tuple[tuple[str, RopeConfig], ...]  # (layer type, its RoPE)
    local_window: int  # varlen_attention's sliding_window: keys with |i - j| < local_window
    classifier_pooling: str
    classifier_activation: str
    classifier_bias: bool
    num_labels: int
    kernels: Kernels = REFERENCE_KERNELS

    @classmethod
    def from_hf(cls, hf, kernels: Kernels = REFERENCE_KERNELS) -> ModernBertConfig:
        num_layers = hf.num_hidden_layers
        layer_types = tuple(getattr(hf, "layer_types", None) or _layer_types(hf, num_layers))
        if len(layer_types) != num_layers or set(layer_types) - {GLOBAL, LOCAL}:
            raise ValueError(f"modernbert: layer_types {list(layer_types)} are not {num_layers} of {GLOBAL}/{LOCAL}.")
        pooling = getattr(hf, "classifier_pooling", "cls")
        if pooling not in CLASSIFIER_POOLING:
            raise ValueError(f"modernbert: classifier_pooling {pooling!r} is not supported (cls, mean).")
        if hf.hidden_size % hf.num_attention_heads:
            raise ValueError("modernbert: hidden_size is not a multiple of num_attention_heads.")
        return cls(
            vocab_size=hf.vocab_size,
            hidden_size=hf.hidden_size,
            intermediate_size=hf.intermediate_size,
            num_layers=num_layers,
            num_heads=hf.num_attention_heads,
            max_position_embeddings=hf.max_position_embeddings,
            norm_eps=getattr(hf, "norm_eps", 1e-5),
            norm_bias=bool(getattr(hf, "norm_bias", False)),
            attention_bias=bool(getattr(hf, "attention_bias", False)),
            mlp_bias=bool(getattr(hf, "mlp_bias", False)),
            hidden_act=getattr(hf, "hidden_activation", "gelu"),
            layer_types=layer_types,
            rope=tuple((kind, _rope(hf, kind)) for kind in sorted(set(layer_types))),
            local_window=int(getattr(hf, "local_attention", 128)) // 2 + 1,
            classifier_pooling=pooling,
            classifier_activation=getattr(hf, "classifier_activation", "gelu"),
            classifier_bias=bool(getattr(hf, "classifier_bias", False)),
            num_labels=getattr(hf, "num_labels", 2),
            kernels=kernels,
        )

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def max_tokens(self) -> int:
        return self.max_position_embeddings


def _layer_types(hf, num_layers: int) -> list[str]:
    """The older configs' pattern: every `global_attn_every_n_layers`-th layer, from layer 0, is global."""
    every = int(getattr(hf, "global_attn_every_n_layers", 3))
    return [GLOBAL if i % every == 0 else LOCAL for i in range(num_layers)]


def _rope(hf, kind: str) -> RopeConfig:
    """The RoPE of one layer type: `rope_parameters[kind]` (transformers 5), else `global_rope_theta` /
    `local_rope_theta` (a null local theta means the global one, as transformers 4 read it)."""
    params = dict((getattr(hf, "rope_parameters", None) or {}).get(kind) or {})
    global_theta = getattr(hf, "global_rope_theta", None) or DEFAULT_THETA[GLOBAL]
    if kind == GLOBAL:
        fallback = global_theta
    else:
        fallback = getattr(hf, "local_rope_theta", DEFAULT_THETA[LOCAL]) or global_theta
    rope_type = params.get("rope_type", "default")
    if rope_type != "default":
        raise ValueError(f"modernbert: RoPE type {rope_type!r} is not supported (only default).")
    return RopeConfig(theta=float(params.get("rope_theta", fallback)))


class Embeddings(nnx.Module):
    def __init__(self, cfg: ModernBertConfig, *, dtype, rngs: nnx.Rngs):
        self.tok_embeddings = Embedding(cfg.vocab_size, cfg.hidden_size, dtype=dtype, rngs=rngs, axis="vocab")
        self.norm = LayerNorm(cfg.hidden_size, eps=cfg.norm_eps, bias=cfg.norm_bias, dtype=dtype)

    def __call__(self, batch: PackedBatch) -> jax.Array:
        return self.norm(self.tok_embeddings(batch.token_ids))


class Attention(nnx.Module):
    def __init__(self, cfg: ModernBertConfig, *, dtype, rngs: nnx.Rngs):
        h = cfg.hidden_size
        self.num_heads, self.head_dim = cfg.num_heads, cfg.head_dim
        self.attention = cfg.kernels.varlen_attention
        self.Wqkv = Linear(h, 3 * h, bias=cfg.attention_bias, dtype=dtype, rngs=rngs, axes=("heads", None))
        self.Wo = Linear(h, h, bias=cfg.attention_bias, dtype=dtype, rngs=rngs, axes=(None, "heads"))

    def __call__(self, x: jax.Array, cos: jax.Array, sin: jax.Array, batch: PackedBatch, window: int | None):
        t, h = x.shape
        qkv = self.Wqkv(x).reshape(t, 3, self.num_heads, self.head_dim)
        q, k, v = qkv[:, 0], qkv[:, 1], qkv[:, 2]
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        out = self.attention(
            q, k, v, batch.cu_seqlens, batch.num_seqs, sm_scale=self.head_dim**-0.5, causal=False,
            sliding_window=window,
        )  # fmt: skip
        return self.Wo(out.reshape(t, h))


class MLP(nnx.Module):
    """GeGLU: Wi projects to 2 x intermediate; act(first half) * second half; Wo back to hidden."""

    def __init__(self, cfg: ModernBertConfig, *, dtype, rngs: nnx.Rngs):
        self.Wi = Linear(
            cfg.hidden_size, 2 * cfg.intermediate_size, bias=cfg.mlp_bias, dtype=dtype, rngs=rngs, axes=("mlp", None)
        )
        self.Wo = Linear(
            cfg.intermediate_size, cfg.hidden_size, bias=cfg.mlp_bias, dtype=dtype, rngs=rngs, axes=(None, "mlp")
        )
        self.act = cfg.hidden_act

    def __call__(self, x: jax.Array) -> jax.Array:
        value, gate = jnp.split(self.Wi(x), 2, axis=-1)
        return self.Wo(activation(self.act)(value) * gate)


class EncoderLayer(nnx.Module):
    def __init__(self, cfg: ModernBertConfig, index: int, *, dtype, rngs: nnx.Rngs):
        self.kind = cfg.layer_types[index]
        self.window = cfg.local_window if self.kind == LOCAL else None
        # layer 0 reads the embeddings' norm directly
        self.attn_norm = (
            LayerNorm(cfg.hidden_size, eps=cfg.norm_eps, bias=cfg.norm_bias, dtype=dtype) if index else None
        )
        self.attn = Attention(cfg, dtype=dtype, rngs=rngs)
        self.mlp_norm = LayerNorm(cfg.hidden_size, eps=cfg.norm_eps, bias=cfg.norm_bias, dtype=dtype)
        self.mlp = MLP(cfg, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array, rope: dict[str, tuple[jax.Array, jax.Array]], batch: PackedBatch) -> jax.Array:
        normed = self.attn_norm(x) if self.attn_norm is not None else x
        x = x + self.attn(normed, *rope[self.kind], batch, self.window)
        return x + self.mlp(self.mlp_norm(x))


class ModernBertModel(nnx.Module):
    def __init__(self, cfg: ModernBertConfig, *, dtype, rngs: nnx.Rngs):
        self.cfg = cfg
        self.embeddings = Embeddings(cfg, dtype=dtype, rngs=rngs)
        self.layers = nnx.List([EncoderLayer(cfg, i, dtype=dtype, rngs=rngs) for i in range(cfg.num_layers)])
        self.final_norm = LayerNorm(cfg.hidden_size, eps=cfg.norm_eps, bias=cfg.norm_bias, dtype=dtype)

    def __call__(self, batch: PackedBatch) -> jax.Array:
        cfg = self.cfg
        rope = {kind: rope.cos_sin(batch.positions, cfg.head_dim) for kind, rope in cfg.rope}
        x = self.embeddings(batch)
        for layer in self.layers:
            x = layer(x, rope, batch)
        return self.final_norm(x)


class PredictionHead(nnx.Module):
    """HF's `ModernBertPredictionHead`: dense → classifier_activation → norm."""

    def __init__(self, cfg: ModernBertConfig, *, dtype, rngs: nnx.Rngs):
        h = cfg.hidden_size
        self.dense = Linear(h, h, bias=cfg.classifier_bias, dtype=dtype, rngs=rngs)
        self.norm = LayerNorm(h, eps=cfg.norm_eps, bias=cfg.norm_bias, dtype=dtype)
        self.act = cfg.classifier_activation

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.norm(activation(self.act)(self.dense(x)))


class ModernBertForEmbedding(nnx.Module):
    """A bare ModernBertModel checkpoint (tensors `embeddings.*`, `layers.*`, `final_norm.*`, or under `model.`
    as ModernBertForMaskedLM saves them, whose MLM head is not read): hidden states for the poolers."""

    CHECKPOINT_ALIASES = {"model.": ("",)}

    def __init__(self, cfg: ModernBertConfig, *, dtype, rngs: nnx.Rngs):
        self.cfg = cfg
        self.model = ModernBertModel(cfg, dtype=dtype, rngs=rngs)

    @classmethod
    def from_hf_config(
        cls, hf_config, *, dtype, rngs: nnx.Rngs, kernels: Kernels = REFERENCE_KERNELS
    ) -> ModernBertForEmbedding:
        return cls(ModernBertConfig.from_hf(hf_config, kernels), dtype=dtype, rngs=rngs)

    def encode(self, batch: PackedBatch) -> jax.Array:
        return self.model(batch)


class _HeadedModernBert(nnx.Module):
    """The encoder with HF's prediction head and a classifier: tensors `model.*`, `head.*`, `classifier.*`."""

    def __init__(self, cfg: ModernBertConfig, *, dtype, rngs: nnx.Rngs):
        self.cfg = cfg
        self.model = ModernBertModel(cfg, dtype=dtype, rngs=rngs)
        self.head = PredictionHead(cfg, dtype=dtype, rngs=rngs)
        self.classifier = Linear(cfg.hidden_size, cfg.num_labels, bias=True, dtype=dtype, rngs=rngs)

    @classmethod
    def from_hf_config(cls, hf_config, *, dtype, rngs: nnx.Rngs, kernels: Kernels = REFERENCE_KERNELS):
        return cls(ModernBertConfig.from_hf(hf_config, kernels), dtype=dtype, rngs=rngs)

    def encode(self, batch: PackedBatch) -> jax.Array:
        return self.model(batch)

    def token_classify(self, hidden: jax.Array) -> jax.Array:
        """The head and classifier on every token."""
        return self.classifier(self.head(hidden)).astype(jnp.float32)


class ModernBertForSequenceClassification(_HeadedModernBert):
    """The `classifier_pooling` row (the first token, or the mean of the sequence) → head → classifier."""

    @staticmethod
    def classify_pooling(hf_config) -> str:
        """The row `classify` reads (pooler.build_spec): the config's `classifier_pooling`."""
        return getattr(hf_config, "classifier_pooling", "cls")

    def classify(self, rows: jax.Array) -> jax.Array:
        return self.classifier(self.head(rows)).astype(jnp.float32)


class ModernBertForTokenClassification(_HeadedModernBert):
    """A label per token (NER-style)."""

    TOKEN_LABELS = True  # its token_classify is a classifier: softmax over num_labels (not a reward score)
