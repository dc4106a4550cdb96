"""BERT-style encoders with rotary positions, as Flax NNX modules: gte's `new` models (NewModel,
NewForSequenceClassification: Alibaba-NLP/gte-*-v1.5, gte-multilingual), NomicBERT (nomic-embed-text) and
jina-embeddings-v3 (an XLM-RoBERTa with rotary positions and task LoRA adapters). vLLM serves the same three
through one `BertWithRope`; so does this file, with each family's checkpoint names mapped onto one layout:

    embeddings   word (+ token type) embeddings → LayerNorm (no position table)
    layer        packed qkv_proj → RoPE on q, k → bidirectional attention → o_proj → attn_ln(x + ·)
                 → MLP (GLU: act(gate) * up, or act(up)) → down_proj → mlp_ln(x + ·)

All three ship as remote code; their configs are read as published (gte's `new` config, NomicBERT's GPT-2 style
names, jina's XLM-R config) and nothing from the folder is run. Sequences arrive packed (`PackedBatch`) and attend
through `kernels_pallas.varlen_attention`.

    model.encode(batch) -> hidden [T, H]
    model.classify(rows [S, H]) -> logits [S, num_labels]       (NewForSequenceClassification)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxserve.kernels_pallas import REFERENCE_KERNELS, Kernels

from .batch import PackedBatch
from .bert import Pooler
from .layers import Embedding, LayerNorm, Linear, RopeConfig, activation, apply_rotary

JINA_DEFAULT_LORA_TASK = "text-matching"  # the adapter vLLM merges into jina-embeddings-v3


@dataclasses.dataclass(frozen=True)
class RopeEncoderConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    type_vocab_size: int  # 0: no token type embeddings
    layer_norm_eps: float
    hidden_act: str
    gated_mlp: bool  # GLU: act(gate) * up, from one packed up_gate_proj ([up; gate] rows)
    attention_bias: bool  # qkv_proj and o_proj
    up_bias: bool
    down_bias: bool
    rope: RopeConfig
    rotary_dim: int
    max_position_embeddings: int
    num_labels: int = 1
    kernels: Kernels = REFERENCE_KERNELS

    @property
    def max_tokens(self) -> int:
        return self.max_position_embeddings

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads


def gte_config(hf, kernels: Kernels = REFERENCE_KERNELS) -> RopeEncoderConfig:
    """gte's `new` config (Alibaba-NLP/new-impl): GeGLU MLP named `hidden_act: gelu`, optional NTK scaling."""
    if getattr(hf, "position_embedding_type", "rope") not in ("rope", "rotary"):
        raise ValueError(f"new: position_embedding_type {hf.position_embedding_type!r} is not supported (rope is).")
    if getattr(hf, "layer_norm_type", "layer_norm") != "layer_norm":
        raise ValueError(f"new: layer_norm_type {hf.layer_norm_type!r} is not supported (layer_norm is).")
    if getattr(hf, "logn_attention_scale", False):
        raise ValueError("new: logn_attention_scale is not supported.")
    head_dim = hf.hidden_size // hf.num_attention_heads
    return RopeEncoderConfig(
        vocab_size=hf.vocab_size,
        hidden_size=hf.hidden_size,
        intermediate_size=hf.intermediate_size,
        num_layers=hf.num_hidden_layers,
        num_heads=hf.num_attention_heads,
        type_vocab_size=getattr(hf, "type_vocab_size", 0),
        layer_norm_eps=hf.layer_norm_eps,
        hidden_act=hf.hidden_act,
        gated_mlp=True,
        attention_bias=True,
        up_bias=False,
        down_bias=True,
        rope=RopeConfig.from_hf(hf),
        rotary_dim=getattr(hf, "rotary_emb_dim", None) or head_dim,
        max_position_embeddings=hf.max_position_embeddings,
        num_labels=getattr(hf, "num_labels", 1),
        kernels=kernels,
    )


def nomic_config(hf, kernels: Kernels = REFERENCE_KERNELS) -> RopeEncoderConfig:
    """NomicBERT's config after `NomicBertModel.verify_and_update_config`. As vLLM, the window is
    `max_trained_positions` and `rotary_scaling_factor` is not applied."""
    act = getattr(hf, "activation_function", "swiglu")
    if act not in ("swiglu", "gelu"):
        raise ValueError(f"nomic_bert: activation_function {act!r} is not supported (swiglu, gelu).")
    if getattr(hf, "rotary_emb_interleaved", False) or getattr(hf, "prenorm", False):
        raise ValueError("nomic_bert: interleaved rotary and pre-norm layers are not supported.")
    if getattr(hf, "num_experts", 0) or getattr(hf, "moe_every_n_layers", 0):
        raise ValueError("nomic_bert: mixture-of-experts layers (nomic-embed-text-v2-moe) are not supported yet.")
    return RopeEncoderConfig(
        vocab_size=hf.vocab_size,
        hidden_size=hf.hidden_size,
        intermediate_size=hf.intermediate_size,
        num_layers=hf.num_hidden_layers,
        num_heads=hf.num_attention_heads,
        type_vocab_size=getattr(hf, "type_vocab_size", 2),
        layer_norm_eps=hf.layer_norm_eps,
        hidden_act="silu" if act == "swiglu" else act,
        gated_mlp=act == "swiglu",
        attention_bias=bool(getattr(hf, "qkv_proj_bias", True)),
        up_bias=bool(getattr(hf, "mlp_fc1_bias", True)),
        down_bias=bool(getattr(hf, "mlp_fc2_bias", True)),
        rope=RopeConfig.from_hf(hf, theta=getattr(hf, "rotary_emb_base", None)),
        rotary_dim=int(hf.hidden_size // hf.num_attention_heads * getattr(hf, "rotary_emb_fraction", 1.0)),
        max_position_embeddings=getattr(hf, "max_trained_positions", None) or getattr(hf, "n_positions", 2048),
        kernels=kernels,
    )


def jina_config(hf, kernels: Kernels = REFERENCE_KERNELS) -> RopeEncoderConfig:
    """jina-embeddings-v3's XLM-R config with `position_embedding_type: rotary` and `rotary_emb_base`."""
    return RopeEncoderConfig(
        vocab_size=hf.vocab_size,
        hidden_size=hf.hidden_size,
        intermediate_size=hf.intermediate_size,
        num_layers=hf.num_hidden_layers,
        num_heads=hf.num_attention_heads,
        type_vocab_size=getattr(hf, "type_vocab_size", 1),
        layer_norm_eps=hf.layer_norm_eps,
        hidden_act=hf.hidden_act,
        gated_mlp=False,
        attention_bias=True,
        up_bias=True,
        down_bias=True,
        rope=RopeConfig.from_hf(hf, theta=getattr(hf, "rotary_emb_base", None)),
        rotary_dim=getattr(hf, "rotary_emb_dim", None) or hf.hidden_size // hf.num_attention_heads,
        max_position_embeddings=hf.max_position_embeddings,
        kernels=kernels,
    )


class Embeddings(nnx.Module):
    def __init__(self, cfg: RopeEncoderConfig, *, dtype, rngs: nnx.Rngs):
        self.word_embeddings = Embedding(cfg.vocab_size, cfg.hidden_size, dtype=dtype, rngs=rngs, axis="vocab")
        self.token_type_embeddings = (
            Embedding(cfg.type_vocab_size, cfg.hidden_size, dtype=dtype, rngs=rngs) if cfg.type_vocab_size else None
        )
        self.LayerNorm = LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps, dtype=dtype)

    def __call__(self, batch: PackedBatch) -> jax.Array:
        x = self.word_embeddings(batch.token_ids)
        if self.token_type_embeddings is not None:
            x = x + self.token_type_embeddings(batch.token_type_ids)
        return self.LayerNorm(x)


class Attention(nnx.Module):
    def __init__(self, cfg: RopeEncoderConfig, *, dtype, rngs: nnx.Rngs):
        h = cfg.hidden_size
        self.cfg = cfg
        self.qkv_proj = Linear(h, 3 * h, bias=cfg.attention_bias, dtype=dtype, rngs=rngs, axes=("heads", None))
        self.o_proj = Linear(h, h, bias=cfg.attention_bias, dtype=dtype, rngs=rngs, axes=(None, "heads"))

    def __call__(self, x: jax.Array, cos: jax.Array, sin: jax.Array, batch: PackedBatch) -> jax.Array:
        cfg, t = self.cfg, x.shape[0]
        q, k, v = jnp.split(self.qkv_proj(x).reshape(t, 3 * cfg.num_heads, cfg.head_dim), 3, axis=1)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        out = cfg.kernels.varlen_attention(
            q, k, v, batch.cu_seqlens, batch.num_seqs, sm_scale=cfg.head_dim**-0.5, causal=False
        )
        return self.o_proj(out.reshape(t, cfg.hidden_size))


class MLP(nnx.Module):
    def __init__(self, cfg: RopeEncoderConfig, *, dtype, rngs: nnx.Rngs):
        h, i = cfg.hidden_size, cfg.intermediate_size
        self.act = cfg.hidden_act
        self.gated = cfg.gated_mlp
        if cfg.gated_mlp:
            self.up_gate_proj = Linear(h, 2 * i, bias=cfg.up_bias, dtype=dtype, rngs=rngs, axes=("mlp", None))
        else:
            self.up_proj = Linear(h, i, bias=cfg.up_bias, dtype=dtype, rngs=rngs, axes=("mlp", None))
        self.down_proj = Linear(i, h, bias=cfg.down_bias, dtype=dtype, rngs=rngs, axes=(None, "mlp"))

    def __call__(self, x: jax.Array) -> jax.Array:
        if self.gated:
            up, gate = jnp.split(self.up_gate_proj(x), 2, axis=-1)
            return self.down_proj(activation(self.act)(gate) * up)
        return self.down_proj(activation(self.act)(self.up_proj(x)))


class Layer(nnx.Module):
    def __init__(self, cfg: RopeEncoderConfig, *, dtype, rngs: nnx.Rngs):
        self.attention = Attention(cfg, dtype=dtype, rngs=rngs)
        self.attn_ln = LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps, dtype=dtype)
        self.mlp = MLP(cfg, dtype=dtype, rngs=rngs)
        self.mlp_ln = LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps, dtype=dtype)

    def __call__(self, x: jax.Array, cos: jax.Array, sin: jax.Array, batch: PackedBatch) -> jax.Array:
        x = self.attn_ln(x + self.attention(x, cos, sin, batch))
        return self.mlp_ln(x + self.mlp(x))


class Encoder(nnx.Module):
    def __init__(self, cfg: RopeEncoderConfig, *, dtype, rngs: nnx.Rngs):
        self.layer = nnx.List([Layer(cfg, dtype=dtype, rngs=rngs) for _ in range(cfg.num_layers)])

    def __call__(self, x: jax.Array, cos: jax.Array, sin: jax.Array, batch: PackedBatch) -> jax.Array:
        for layer in self.layer:
            x = layer(x, cos, sin, batch)
        return x


class BertWithRope(nnx.Module):
    def __init__(self, cfg: RopeEncoderConfig, *, dtype, rngs: nnx.Rngs, with_pooler: bool = False):
        self.cfg = cfg
        self.embeddings = Embeddings(cfg, dtype=dtype, rngs=rngs)
        self.encoder = Encoder(cfg, dtype=dtype, rngs=rngs)
        self.pooler = Pooler(cfg.hidden_size, dtype=dtype, rngs=rngs) if with_pooler else None

    def __call__(self, batch: PackedBatch) -> jax.Array:
        cos, sin = self.cfg.rope.cos_sin(batch.positions, self.cfg.rotary_dim)
        return self.encoder(self.embeddings(batch), cos, sin, batch)


class RopeEmbedder(nnx.Module):
    """A bare encoder checkpoint of one of the families (hidden states for the poolers); a family names its config
    reader (`config_from_hf`), its checkpoint prefixes and its names for parts of a layer."""

    config_from_hf: Callable[..., RopeEncoderConfig]

    def __init__(self, cfg: RopeEncoderConfig, *, dtype, rngs: nnx.Rngs):
        self.cfg = cfg
        self.model = BertWithRope(cfg, dtype=dtype, rngs=rngs)

    @classmethod
    def from_hf_config(cls, hf_config, *, dtype, rngs: nnx.Rngs, kernels: Kernels = REFERENCE_KERNELS) -> RopeEmbedder:
        return cls(cls.config_from_hf(hf_config, kernels), dtype=dtype, rngs=rngs)

    def encode(self, batch: PackedBatch) -> jax.Array:
        return self.model(batch)


class GteNewModel(RopeEmbedder):
    """gte's NewModel (`model_type: new`): tensors `embeddings.*`, `encoder.layer.N.*`, or with the `new.` prefix."""

    CHECKPOINT_ALIASES = {"model.": ("", "new.")}
    config_from_hf = staticmethod(gte_config)


class GteNewForSequenceClassification(nnx.Module):
    """gte's NewForSequenceClassification (gte-multilingual-reranker-base): first token → pooler → classifier."""

    CHECKPOINT_ALIASES = {"model.": ("new.",)}

    def __init__(self, cfg: RopeEncoderConfig, *, dtype, rngs: nnx.Rngs):
        self.cfg = cfg
        self.model = BertWithRope(cfg, dtype=dtype, rngs=rngs, with_pooler=True)
        self.classifier = Linear(cfg.hidden_size, cfg.num_labels, bias=True, dtype=dtype, rngs=rngs)

    @classmethod
    def from_hf_config(
        cls, hf_config, *, dtype, rngs: nnx.Rngs, kernels: Kernels = REFERENCE_KERNELS
    ) -> GteNewForSequenceClassification:
        return cls(gte_config(hf_config, kernels), dtype=dtype, rngs=rngs)

    def encode(self, batch: PackedBatch) -> jax.Array:
        return self.model(batch)

    def classify(self, rows: jax.Array) -> jax.Array:
        return self.classifier(self.model.pooler(rows)).astype(jnp.float32)

    def token_classify(self, hidden: jax.Array) -> jax.Array:
        return self.classifier(hidden).astype(jnp.float32)


# NomicBERT and jina's flash implementation name the parts of a layer their own way
_FLASH_NAMES = {
    "embeddings.LayerNorm": "emb_ln",
    "encoder.layer.": "encoder.layers.",
    "attn_ln": "norm1",
    "mlp_ln": "norm2",
    "mlp.up_proj": "mlp.fc1",
    "mlp.down_proj": "mlp.fc2",
}


class NomicBertModel(RopeEmbedder):
    """nomic-embed-text (`model_type: nomic_bert`); SwiGLU checkpoints hold `mlp.fc11` (up) and `mlp.fc12` (gate),
    packed here into `up_gate_proj` at load (`derived_tensors`)."""

    CHECKPOINT_ALIASES = {"model.": ("",)}
    CHECKPOINT_RENAMES = {"attention.qkv_proj": "attn.Wqkv", "attention.o_proj": "attn.out_proj", **_FLASH_NAMES}
    config_from_hf = staticmethod(nomic_config)

    @staticmethod
    def verify_and_update_config(hf_config) -> None:
        """The published config's GPT-2 style names (n_embd, n_layer, n_head, n_inner, layer_norm_epsilon) as the
        BERT names the rest of jaxserve reads, as vLLM's NomicBertModelConfig does."""
        names = {
            "n_embd": "hidden_size",
            "n_layer": "num_hidden_layers",
            "n_head": "num_attention_heads",
            "n_inner": "intermediate_size",
            "layer_norm_epsilon": "layer_norm_eps",
        }
        for theirs, ours in names.items():
            if getattr(hf_config, theirs, None) is not None:
                setattr(hf_config, ours, getattr(hf_config, theirs))

    @staticmethod
    def derived_tensors(folder: Path, hf_config) -> dict[str, np.ndarray]:
        from jaxserve.weights import read_tensor, tensor_index

        names = tensor_index(folder)
        packed = {}
        for name in names:
            if name.endswith(".mlp.fc11.weight") or name.endswith(".mlp.fc11.bias"):
                gate = name.replace(".fc11.", ".fc12.")
                packed[name.replace(".fc11.", ".up_gate_proj.")] = np.concatenate(
                    [read_tensor(folder, name, names), read_tensor(folder, gate, names)], axis=0
                )
        return packed


class JinaRobertaModel(RopeEmbedder):
    """jina-embeddings-v3 (XLMRobertaModel with `position_embedding_type: rotary`). Its checkpoint keeps each
    weight as `*.parametrizations.weight.original` plus per-task LoRA factors; one adapter is merged at load
    (`derived_tensors`): text-matching, as vLLM does, or the one `--hf-overrides '{"lora_task": ...}'` names."""

    CHECKPOINT_ALIASES = {"model.": ("", "roberta.")}
    CHECKPOINT_RENAMES = {"attention.qkv_proj": "mixer.Wqkv", "attention.o_proj": "mixer.out_proj", **_FLASH_NAMES}
    config_from_hf = staticmethod(jina_config)

    @staticmethod
    def derived_tensors(folder: Path, hf_config) -> dict[str, np.ndarray]:
        from jaxserve.weights import read_tensor, tensor_index

        names = tensor_index(folder)
        originals = [name for name in names if name.endswith(".parametrizations.weight.original")]
        if not originals:
            return {}
        tasks = list(getattr(hf_config, "lora_adaptations", None) or [])
        task = getattr(hf_config, "lora_task", None) or JINA_DEFAULT_LORA_TASK
        if task not in tasks:
            raise ValueError(f"lora_task {task!r} is not one of the model's LoRA adaptations {tasks}.")
        index = tasks.index(task)
        scaling = hf_config.lora_alpha / hf_config.lora_rank
        merged = {}
        for name in originals:
            stem = name.removesuffix(".original")  # "<module>.parametrizations.weight"
            weight = read_tensor(folder, name, names).astype(np.float32)
            lora_a = read_tensor(folder, stem + ".0.lora_A", names)[index].astype(np.float32)
            lora_b = read_tensor(folder, stem + ".0.lora_B", names)[index].astype(np.float32)
            # embeddings hold A as [num_embeddings, rank] and B as [rank, dim]; linears A [rank, in], B [out, rank]
            delta = lora_a @ lora_b if ".embeddings." in name else lora_b @ lora_a
            merged[stem.replace(".parametrizations", "")] = weight + scaling * delta.reshape(weight.shape)
        return merged
