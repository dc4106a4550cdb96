"""DeBERTa-v2 and DeBERTa-v3 encoders as Flax NNX modules, with their sequence- and token-classification heads
(NLI / zero-shot classifiers, cross-encoder rerankers, prompt-injection classifiers fine-tuned from
microsoft/deberta-v3-base / -large, and microsoft/deberta-v2-xlarge's ConvLayer).

Sequences arrive packed, with no padding between them (`PackedBatch`); attention is block-diagonal and
bidirectional through `kernels_pallas.varlen_attention`. Module attributes follow Hugging Face's names, so state
paths are the checkpoint's tensor names (`deberta.embeddings.word_embeddings.weight`,
`deberta.encoder.layer.0.attention.self.query_proj.weight`, `deberta.encoder.rel_embeddings.weight`, ...).

As HF's `modeling_deberta_v2` computes it:

* embeddings: words (`embedding_size` wide), plus absolute positions only when `position_biased_input` (v3: no),
  plus token types when `type_vocab_size` > 0; `embed_proj` (no bias) up to hidden when `embedding_size` differs;
  then `LayerNorm`.
* disentangled attention: the content score q_i . k_j plus, with `relative_attention`, c2p = q_i . K_r[b] and
  p2c = k_j . Q_r[b], all scaled by 1 / sqrt(d * (1 + len(pos_att_type))). b = clamp(bucket(i - j) + span, 0,
  2 span - 1) for both terms (HF's p2c gathers at -bucket(j - i), the same bucket as the log buckets are odd), with
  `position_buckets` log buckets up to `max_relative_positions` (that, or max_position_embeddings when < 1, is
  also the span when there are no buckets). K_r / Q_r project the relative embeddings (`encoder.rel_embeddings`,
  through `encoder.LayerNorm` when `norm_rel_ebd` has "layer_norm") by `key_proj` / `query_proj` when
  `share_att_key`, else by `pos_key_proj` / `pos_query_proj`. The model turns them into per-token tables
  [T, heads, 2 span] (each token's c2p and p2c scores against every bucket), which the attention gathers tile by
  tile (`relative_bias`); memory stays O(T x span), never O(T^2). The Pallas kernels cannot gather along the
  bucket axis, so this attention runs the jnp reference on every backend (`kernels_pallas.Kernels`).
* `conv_kernel_size` > 0 (deberta-v2-xlarge / -xxlarge): after layer 0, `encoder.conv` convolves the embeddings
  within each sequence (zeros beyond its ends), tanh (`conv_act`), and LayerNorms the sum with layer 0's output.
* the sequence classifier: [CLS] → `pooler.dense` → `pooler_hidden_act` → `classifier`.

    model.encode(batch) -> hidden [T, H]
    model.classify(rows [S, H]) -> logits [S, num_labels]       (DebertaV2ForSequenceClassification)
    model.token_classify(hidden [T, H]) -> logits [T, num_labels]
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxserve.kernels_pallas import REFERENCE_KERNELS, Kernels
from jaxserve.kernels_pallas.varlen_attention import segment_layout

from .batch import PackedBatch
from .layers import INIT_STD, Embedding, LayerNorm, Linear, activation

POS_ATT_TYPES = ("c2p", "p2c")


@dataclasses.dataclass(frozen=True)
class DebertaV2Config:
    vocab_size: int
    hidden_size: int
    embedding_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    head_dim: int
    max_position_embeddings: int
    type_vocab_size: int
    layer_norm_eps: float
    hidden_act: str
    position_biased_input: bool
    relative_attention: bool
    pos_att_type: tuple[str, ...]
    share_att_key: bool
    position_buckets: int  # <= 0: no log buckets
    max_relative_positions: int
    norm_rel_ebd: bool  # the relative embeddings go through encoder.LayerNorm
    conv_kernel_size: int  # 0: no ConvLayer
    conv_groups: int
    conv_act: str
    pooler_hidden_act: str
    num_labels: int
    kernels: Kernels = REFERENCE_KERNELS

    @classmethod
    def from_hf(cls, hf, kernels: Kernels = REFERENCE_KERNELS) -> DebertaV2Config:
        pos_att_type = getattr(hf, "pos_att_type", None) or []
        if isinstance(pos_att_type, str):  # a raw config.json: "p2c|c2p"
            pos_att_type = pos_att_type.lower().split("|")
        pos_att_type = tuple(t.strip() for t in pos_att_type)
        if set(pos_att_type) - set(POS_ATT_TYPES):
            raise ValueError(f"deberta-v2: pos_att_type {list(pos_att_type)} is not supported (c2p, p2c).")
        norm_rel_ebd = [x.strip() for x in (getattr(hf, "norm_rel_ebd", None) or "none").lower().split("|")]
        if set(norm_rel_ebd) - {"none", "layer_norm"}:
            raise ValueError(f"deberta-v2: norm_rel_ebd {norm_rel_ebd} is not supported (layer_norm, none).")
        conv_kernel_size = int(getattr(hf, "conv_kernel_size", 0) or 0)
        if conv_kernel_size > 0 and conv_kernel_size % 2 == 0:
            raise ValueError(f"deberta-v2: conv_kernel_size {conv_kernel_size} is even; only odd kernels keep length.")
        pooler_size = getattr(hf, "pooler_hidden_size", hf.hidden_size)
        if pooler_size != hf.hidden_size:
            raise ValueError(f"deberta-v2: pooler_hidden_size {pooler_size} differs from hidden_size {hf.hidden_size}.")
        if getattr(hf, "attention_head_size", None) is None and hf.hidden_size % hf.num_attention_heads:
            raise ValueError("deberta-v2: hidden_size is not a multiple of num_attention_heads.")
        max_relative = getattr(hf, "max_relative_positions", -1)
        return cls(
            vocab_size=hf.vocab_size,
            hidden_size=hf.hidden_size,
            embedding_size=getattr(hf, "embedding_size", None) or hf.hidden_size,
            intermediate_size=hf.intermediate_size,
            num_layers=hf.num_hidden_layers,
            num_heads=hf.num_attention_heads,
            head_dim=getattr(hf, "attention_head_size", None) or hf.hidden_size // hf.num_attention_heads,
            max_position_embeddings=hf.max_position_embeddings,
            type_vocab_size=getattr(hf, "type_vocab_size", 0),
            layer_norm_eps=hf.layer_norm_eps,
            hidden_act=hf.hidden_act,
            position_biased_input=bool(getattr(hf, "position_biased_input", True)),
            relative_attention=bool(getattr(hf, "relative_attention", False)),
            pos_att_type=pos_att_type,
            share_att_key=bool(getattr(hf, "share_att_key", False)),
            position_buckets=getattr(hf, "position_buckets", -1),
            max_relative_positions=max_relative if max_relative >= 1 else hf.max_position_embeddings,
            norm_rel_ebd="layer_norm" in norm_rel_ebd,
            conv_kernel_size=conv_kernel_size,
            conv_groups=getattr(hf, "conv_groups", 1),
            conv_act=getattr(hf, "conv_act", "tanh"),
            pooler_hidden_act=getattr(hf, "pooler_hidden_act", "gelu"),
            num_labels=getattr(hf, "num_labels", 2),
            kernels=kernels,
        )

    @property
    def span(self) -> int:
        """Relative embeddings on either side (HF's `pos_ebd_size`): 2 x span rows in `rel_embeddings`."""
        return self.position_buckets if self.position_buckets > 0 else self.max_relative_positions

    @property
    def scale(self) -> float:
        """HF's 1 / sqrt(d * scale_factor): content, c2p and p2c scores alike."""
        return (self.head_dim * (1 + len(self.pos_att_type))) ** -0.5

    @property
    def max_tokens(self) -> int:
        return self.max_position_embeddings


def log_bucket_position(relative: np.ndarray, bucket_size: int, max_position: int) -> np.ndarray:
    """HF's `make_log_bucket_position` (in float32, as torch computes it): distances within +-bucket_size / 2 as
    they are, farther ones on a log scale that reaches bucket_size / 2 - 1 more at max_position - 1."""
    relative = np.asarray(relative, np.int64)
    if bucket_size <= 0:
        return relative
    sign, mid = np.sign(relative), bucket_size // 2
    abs_pos = np.where((relative < mid) & (relative > -mid), mid - 1, np.abs(relative))
    ratio = np.log((abs_pos / mid).astype(np.float32)) / np.log(np.float32((max_position - 1) / mid))
    log_pos = np.ceil(ratio * np.float32(mid - 1)) + np.float32(mid)
    return np.where(abs_pos <= mid, relative, (log_pos * sign).astype(np.int64))


@functools.lru_cache(maxsize=8)
def relative_buckets(position_buckets: int, max_relative_positions: int, max_tokens: int) -> np.ndarray:
    """The attention's `buckets` table [2 max_tokens - 1] int32: for the distance i - j in -(max_tokens - 1) ...
    max_tokens - 1, the row of the c2p / p2c tables, clamp(bucket(i - j) + span, 0, 2 span - 1)."""
    span = position_buckets if position_buckets > 0 else max_relative_positions
    distance = np.arange(-(max_tokens - 1), max_tokens)
    bucket = log_bucket_position(distance, position_buckets, max_relative_positions)
    return np.clip(bucket + span, 0, 2 * span - 1).astype(np.int32)


class Embeddings(nnx.Module):
    def __init__(self, cfg: DebertaV2Config, *, dtype, rngs: nnx.Rngs):
        e, h = cfg.embedding_size, cfg.hidden_size
        self.word_embeddings = Embedding(cfg.vocab_size, e, dtype=dtype, rngs=rngs, axis="vocab")
        biased = cfg.position_biased_input
        self.position_embeddings = Embedding(cfg.max_position_embeddings, e, dtype=dtype, rngs=rngs) if biased else None
        types = cfg.type_vocab_size
        self.token_type_embeddings = Embedding(types, e, dtype=dtype, rngs=rngs) if types > 0 else None
        self.embed_proj = Linear(e, h, bias=False, dtype=dtype, rngs=rngs) if e != h else None
        self.LayerNorm = LayerNorm(h, eps=cfg.layer_norm_eps, dtype=dtype)

    def __call__(self, batch: PackedBatch) -> jax.Array:
        x = self.word_embeddings(batch.token_ids)
        if self.position_embeddings is not None:
            x = x + self.position_embeddings(batch.positions)
        if self.token_type_embeddings is not None:
            x = x + self.token_type_embeddings(batch.token_type_ids)
        if self.embed_proj is not None:
            x = self.embed_proj(x)
        return self.LayerNorm(x)


class DisentangledSelfAttention(nnx.Module):
    def __init__(self, cfg: DebertaV2Config, *, dtype, rngs: nnx.Rngs):
        h, inner = cfg.hidden_size, cfg.num_heads * cfg.head_dim
        self.num_heads, self.head_dim, self.scale = cfg.num_heads, cfg.head_dim, cfg.scale
        self.pos_att_type = cfg.pos_att_type if cfg.relative_attention else ()
        self.share_att_key = cfg.share_att_key
        self.attention = cfg.kernels.varlen_attention
        self.query_proj = Linear(h, inner, bias=True, dtype=dtype, rngs=rngs, axes=("heads", None))
        self.key_proj = Linear(h, inner, bias=True, dtype=dtype, rngs=rngs, axes=("heads", None))
        self.value_proj = Linear(h, inner, bias=True, dtype=dtype, rngs=rngs, axes=("heads", None))
        separate = not cfg.share_att_key
        with_c2p, with_p2c = ("c2p" in self.pos_att_type and separate), ("p2c" in self.pos_att_type and separate)
        by_heads = ("heads", None)
        self.pos_key_proj = Linear(h, inner, bias=True, dtype=dtype, rngs=rngs, axes=by_heads) if with_c2p else None
        self.pos_query_proj = Linear(h, inner, bias=True, dtype=dtype, rngs=rngs, axes=by_heads) if with_p2c else None

    def _heads(self, x: jax.Array) -> jax.Array:
        return x.reshape(x.shape[0], self.num_heads, self.head_dim)

    def __call__(self, x: jax.Array, batch: PackedBatch, rel: jax.Array | None, buckets: jax.Array | None):
        t = x.shape[0]
        q, k, v = (self._heads(proj(x)) for proj in (self.query_proj, self.key_proj, self.value_proj))
        bias = None
        if self.pos_att_type:  # per-token scores against every relative embedding [T, heads, 2 span], scaled

            def table(states: jax.Array, proj: Linear) -> jax.Array:
                scores = jnp.einsum("thd,bhd->thb", states, self._heads(proj(rel)), preferred_element_type=jnp.float32)
                return scores * self.scale

            shared = self.share_att_key
            c2p = table(q, self.key_proj if shared else self.pos_key_proj) if "c2p" in self.pos_att_type else None
            p2c = table(k, self.query_proj if shared else self.pos_query_proj) if "p2c" in self.pos_att_type else None
            bias = (c2p, p2c, buckets)
        out = self.attention(
            q, k, v, batch.cu_seqlens, batch.num_seqs, sm_scale=self.scale, causal=False, relative_bias=bias
        )
        return out.reshape(t, self.num_heads * self.head_dim)


class DenseLayerNorm(nnx.Module):
    """HF's `DebertaV2SelfOutput` / `DebertaV2Output`: dense, then LayerNorm of the residual sum. `axis`: the logical
    axis of the input features (the attention heads', or the MLP's)."""

    def __init__(self, in_features: int, cfg: DebertaV2Config, *, dtype, rngs: nnx.Rngs, axis: str):
        self.dense = Linear(in_features, cfg.hidden_size, bias=True, dtype=dtype, rngs=rngs, axes=(None, axis))
        self.LayerNorm = LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps, dtype=dtype)

    def __call__(self, x: jax.Array, residual: jax.Array) -> jax.Array:
        return self.LayerNorm(self.dense(x) + residual)


class Attention(nnx.Module):
    def __init__(self, cfg: DebertaV2Config, *, dtype, rngs: nnx.Rngs):
        self.self = DisentangledSelfAttention(cfg, dtype=dtype, rngs=rngs)
        self.output = DenseLayerNorm(cfg.num_heads * cfg.head_dim, cfg, dtype=dtype, rngs=rngs, axis="heads")

    def __call__(self, x, batch, rel, buckets) -> jax.Array:
        return self.output(self.self(x, batch, rel, buckets), x)


class Intermediate(nnx.Module):
    def __init__(self, cfg: DebertaV2Config, *, dtype, rngs: nnx.Rngs):
        self.dense = Linear(
            cfg.hidden_size, cfg.intermediate_size, bias=True, dtype=dtype, rngs=rngs, axes=("mlp", None)
        )
        self.act = cfg.hidden_act

    def __call__(self, x: jax.Array) -> jax.Array:
        return activation(self.act)(self.dense(x))


class Layer(nnx.Module):
    def __init__(self, cfg: DebertaV2Config, *, dtype, rngs: nnx.Rngs):
        self.attention = Attention(cfg, dtype=dtype, rngs=rngs)
        self.intermediate = Intermediate(cfg, dtype=dtype, rngs=rngs)
        self.output = DenseLayerNorm(cfg.intermediate_size, cfg, dtype=dtype, rngs=rngs, axis="mlp")

    def __call__(self, x, batch, rel, buckets) -> jax.Array:
        x = self.attention(x, batch, rel, buckets)
        return self.output(self.intermediate(x), x)


class Conv1d(nnx.Module):
    """torch.nn.Conv1d (`weight` [out, in / groups, kernel], `bias`) over the tokens of each packed sequence, with
    `padding` (kernel - 1) // 2 zeros past each sequence's ends."""

    def __init__(self, features: int, kernel_size: int, groups: int, *, dtype, rngs: nnx.Rngs):
        shape = (features, features // groups, kernel_size)
        self.weight = nnx.Param((INIT_STD * jax.random.normal(rngs.params(), shape, jnp.float32)).astype(dtype))
        self.bias = nnx.Param(jnp.zeros((features,), dtype))
        self.groups = groups

    def __call__(self, x: jax.Array, batch: PackedBatch) -> jax.Array:
        t, h = x.shape
        kernel_size = self.weight.shape[-1]
        _, _, _, (start, end) = segment_layout(batch.cu_seqlens, batch.num_seqs, t)
        # [groups, out / groups, in / groups, kernel]
        weight = self.weight[...].reshape(self.groups, h // self.groups, h // self.groups, kernel_size)
        slots = jnp.arange(t, dtype=jnp.int32)
        out = jnp.zeros((t, self.groups, h // self.groups), jnp.float32)
        for tap in range(kernel_size):  # out[t] = sum over taps of W[..., tap] @ x[t + tap - pad], in its sequence
            offset = tap - (kernel_size - 1) // 2
            source = slots + offset
            inside = (source >= start) & (source < end)
            shifted = jnp.where(inside[:, None], jnp.take(x, jnp.clip(source, 0, t - 1), axis=0), 0)
            grouped = shifted.reshape(t, self.groups, h // self.groups)
            out += jnp.einsum("tgi,goi->tgo", grouped, weight[..., tap], preferred_element_type=jnp.float32)
        return (out.reshape(t, h) + self.bias[...]).astype(x.dtype)


class ConvLayer(nnx.Module):
    """HF's `ConvLayer` (deberta-v2-xlarge): conv over the embeddings → `conv_act` → LayerNorm(layer 0's output
    + it)."""

    def __init__(self, cfg: DebertaV2Config, *, dtype, rngs: nnx.Rngs):
        self.conv = Conv1d(cfg.hidden_size, cfg.conv_kernel_size, cfg.conv_groups, dtype=dtype, rngs=rngs)
        self.LayerNorm = LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps, dtype=dtype)
        self.act = cfg.conv_act

    def __call__(self, embeddings: jax.Array, residual: jax.Array, batch: PackedBatch) -> jax.Array:
        return self.LayerNorm(residual + activation(self.act)(self.conv(embeddings, batch)))


class Encoder(nnx.Module):
    def __init__(self, cfg: DebertaV2Config, *, dtype, rngs: nnx.Rngs):
        self.cfg = cfg
        self.layer = nnx.List([Layer(cfg, dtype=dtype, rngs=rngs) for _ in range(cfg.num_layers)])
        relative = cfg.relative_attention
        self.rel_embeddings = Embedding(2 * cfg.span, cfg.hidden_size, dtype=dtype, rngs=rngs) if relative else None
        norm = cfg.norm_rel_ebd
        self.LayerNorm = LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps, dtype=dtype) if norm else None
        self.conv = ConvLayer(cfg, dtype=dtype, rngs=rngs) if cfg.conv_kernel_size > 0 else None

    def __call__(self, embeddings: jax.Array, batch: PackedBatch) -> jax.Array:
        cfg = self.cfg
        rel = buckets = None
        if self.rel_embeddings is not None:
            rel = self.rel_embeddings.weight[...]
            if self.LayerNorm is not None:
                rel = self.LayerNorm(rel)
            buckets = jnp.asarray(relative_buckets(cfg.position_buckets, cfg.max_relative_positions, cfg.max_tokens))
        x = embeddings
        for i, layer in enumerate(self.layer):
            x = layer(x, batch, rel, buckets)
            if i == 0 and self.conv is not None:
                x = self.conv(embeddings, x, batch)
        return x


class DebertaV2Model(nnx.Module):
    def __init__(self, cfg: DebertaV2Config, *, dtype, rngs: nnx.Rngs):
        self.cfg = cfg
        self.embeddings = Embeddings(cfg, dtype=dtype, rngs=rngs)
        self.encoder = Encoder(cfg, dtype=dtype, rngs=rngs)

    def __call__(self, batch: PackedBatch) -> jax.Array:
        return self.encoder(self.embeddings(batch), batch)


class DebertaV2ForEmbedding(nnx.Module):
    """A bare DebertaV2Model checkpoint: hidden states for the poolers (CLS unless sentence-transformers says
    otherwise), tensors named `embeddings.*` / `encoder.*` or with the `deberta.` prefix."""

    CHECKPOINT_ALIASES = {"model.": ("", "deberta.")}

    def __init__(self, cfg: DebertaV2Config, *, dtype, rngs: nnx.Rngs):
        self.cfg = cfg
        self.model = DebertaV2Model(cfg, dtype=dtype, rngs=rngs)

    @classmethod
    def from_hf_config(
        cls, hf_config, *, dtype, rngs: nnx.Rngs, kernels: Kernels = REFERENCE_KERNELS
    ) -> DebertaV2ForEmbedding:
        return cls(DebertaV2Config.from_hf(hf_config, kernels), dtype=dtype, rngs=rngs)

    def encode(self, batch: PackedBatch) -> jax.Array:
        return self.model(batch)


class ContextPooler(nnx.Module):
    """HF's `ContextPooler`: dense + `pooler_hidden_act` over a row (the [CLS] token)."""

    def __init__(self, cfg: DebertaV2Config, *, dtype, rngs: nnx.Rngs):
        self.dense = Linear(cfg.hidden_size, cfg.hidden_size, bias=True, dtype=dtype, rngs=rngs)
        self.act = cfg.pooler_hidden_act

    def __call__(self, rows: jax.Array) -> jax.Array:
        return activation(self.act)(self.dense(rows))


class DebertaV2ForSequenceClassification(nnx.Module):
    """[CLS] → pooler (dense + pooler_hidden_act) → classifier."""

    def __init__(self, cfg: DebertaV2Config, *, dtype, rngs: nnx.Rngs):
        self.cfg = cfg
        self.deberta = DebertaV2Model(cfg, dtype=dtype, rngs=rngs)
        self.pooler = ContextPooler(cfg, dtype=dtype, rngs=rngs)
        self.classifier = Linear(cfg.hidden_size, cfg.num_labels, bias=True, dtype=dtype, rngs=rngs)

    @classmethod
    def from_hf_config(
        cls, hf_config, *, dtype, rngs: nnx.Rngs, kernels: Kernels = REFERENCE_KERNELS
    ) -> DebertaV2ForSequenceClassification:
        return cls(DebertaV2Config.from_hf(hf_config, kernels), dtype=dtype, rngs=rngs)

    def encode(self, batch: PackedBatch) -> jax.Array:
        return self.deberta(batch)

    def classify(self, rows: jax.Array) -> jax.Array:
        return self.classifier(self.pooler(rows)).astype(jnp.float32)

    def token_classify(self, hidden: jax.Array) -> jax.Array:
        """The classifier on every token (no pooler), as bert.py's sequence classifiers do."""
        return self.classifier(hidden).astype(jnp.float32)


class DebertaV2ForTokenClassification(nnx.Module):
    """A label per token (NER-style): the classifier on every hidden state."""

    TOKEN_LABELS = True  # its token_classify is a classifier: softmax over num_labels (not a reward score)

    def __init__(self, cfg: DebertaV2Config, *, dtype, rngs: nnx.Rngs):
        self.cfg = cfg
        self.deberta = DebertaV2Model(cfg, dtype=dtype, rngs=rngs)
        self.classifier = Linear(cfg.hidden_size, cfg.num_labels, bias=True, dtype=dtype, rngs=rngs)

    @classmethod
    def from_hf_config(
        cls, hf_config, *, dtype, rngs: nnx.Rngs, kernels: Kernels = REFERENCE_KERNELS
    ) -> DebertaV2ForTokenClassification:
        return cls(DebertaV2Config.from_hf(hf_config, kernels), dtype=dtype, rngs=rngs)

    def encode(self, batch: PackedBatch) -> jax.Array:
        return self.deberta(batch)

    def token_classify(self, hidden: jax.Array) -> jax.Array:
        return self.classifier(hidden).astype(jnp.float32)
