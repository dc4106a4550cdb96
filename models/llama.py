"""The Llama family as Flax NNX modules: Llama (llama3 RoPE scaling included), Mistral (sliding window),
Qwen2 (QKV bias), Qwen3 (per-head Q/K RMSNorm), Gemma (RMSNorm scaled by 1 + w, embeddings scaled by
sqrt(hidden), GeGLU), Gemma 2 (Gemma with norms before and after attention and MLP, soft-capped attention and
final logits, sliding-window layers alternating with full ones) and Phi-3 / Phi-4 (packed `qkv_proj` and
`gate_up_proj`, longrope, partial rotary), with grouped-query attention, tied or untied embeddings and every RoPE
scaling of `RopeConfig`. One forward pass runs a ragged batch over the paged KV cache:

    model(batch, kv_pages) -> (hidden [T, H], kv_pages')      model.logits(hidden_rows) -> [R, V] float32
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from jaxserve.kernels_pallas import REFERENCE_KERNELS, Kernels

from .batch import PackedBatch, RaggedBatch
from .layers import Embedding, Linear, RMSNorm, RopeConfig, activation, apply_rotary
from .moe import SparseMoeBlock, expert_tensors


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
    qk_norm: str | None = None  # RMSNorm of Q and K: "head", each head's (Qwen3, Gemma 3); "projection", all (OLMo 2)
    layer_windows: tuple[int | None, ...] = ()  # per layer: its sliding window, or None for full attention
    rope_layers: tuple[bool, ...] = ()  # per layer: whether it rotates Q and K (SmolLM3's NoPE layers); () all do
    hidden_act: str = "silu"  # the gated MLP's activation
    norm_unit_offset: bool = False  # Gemma: RMSNorm scales by (1 + weight)
    embed_scale: float | None = None  # embeddings times this: Gemma's sqrt(hidden_size), Granite's multiplier
    # where each layer normalizes: "pre", the inputs of attention and MLP (Llama); "sandwich", their inputs and
    # outputs (Gemma 2 / 3); "post", their outputs only (OLMo 2)
    norms: str = "pre"
    residual_multiplier: float = 1.0  # Granite: each block's output scaled before it joins the residual stream
    local_rope: RopeConfig | None = None  # Gemma 3: the sliding-window layers' own RoPE (their base)
    attn_logit_softcap: float | None = None
    final_logit_softcap: float | None = None
    logits_scaling: float = 1.0  # Granite: the logits divided by this
    query_pre_attn_scalar: float | None = None  # Gemma 2: attention scaled by this ** -0.5 instead of head_dim's
    attention_multiplier: float | None = None  # Granite: the attention scale itself
    # one packed QKV projection: "stacked", `qkv_proj` of [q; k; v] rows (Phi-3); "grouped", for each KV head its
    # query heads, key and value (InternLM2's `wqkv`); None, q/k/v_proj
    fused_qkv: str | None = None
    fused_gate_up: bool = False  # Phi-3: one `gate_up_proj` ([gate; up] rows) instead of gate_proj / up_proj
    # mixture of experts (Mixtral, Qwen2-MoE, Qwen3-MoE; models/moe.py): top-k of `num_experts` on sparse layers
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0  # each expert's
    norm_topk_prob: bool = False  # the top-k routing weights rescaled to sum to 1
    shared_expert_intermediate_size: int = 0  # Qwen2-MoE: an expert every token runs, sigmoid-gated
    sparse_layers: tuple[bool, ...] = ()  # per layer: routed experts (True) or the dense MLP
    kernels: Kernels = REFERENCE_KERNELS  # the attention kernels (select_kernels: Pallas or the references)

    def layer_window(self, layer: int) -> int | None:
        return self.layer_windows[layer] if self.layer_windows else None

    @property
    def kv_window(self) -> int | None:
        """The window no layer reads behind when every layer slides (the smallest), else None: cache pages wholly
        behind it can be released as a sequence grows."""
        if not self.layer_windows or None in self.layer_windows:
            return None
        return min(self.layer_windows)

    def uses_rope(self, layer: int) -> bool:
        return not self.rope_layers or self.rope_layers[layer]

    def is_sparse(self, layer: int) -> bool:
        return bool(self.sparse_layers) and self.sparse_layers[layer]

    @property
    def rotary_dim(self) -> int:
        return self.rope.rotary_dim(self.head_dim)

    @property
    def sm_scale(self) -> float:
        return self.attention_multiplier or (self.query_pre_attn_scalar or self.head_dim) ** -0.5

    @property
    def max_tokens(self) -> int:
        return self.max_position_embeddings

    @classmethod
    def from_hf(cls, hf, kernels: Kernels = REFERENCE_KERNELS) -> DecoderConfig:
        """From a transformers config; a multimodal checkpoint's (Gemma 3's) is read for its text model."""
        hf = hf.get_text_config()
        model_type = hf.model_type
        gemma = model_type in ("gemma", "gemma2", "gemma3_text")
        if getattr(hf, "use_bidirectional_attention", False):
            raise ValueError(f"{model_type}: bidirectional attention (EmbeddingGemma) is not supported yet.")
        act = (getattr(hf, "hidden_activation", None) if gemma else None) or getattr(hf, "hidden_act", "silu")
        if act not in ("silu", "gelu_pytorch_tanh"):
            raise ValueError(f"{model_type}: hidden activation {act!r} is not supported (silu, gelu_pytorch_tanh).")
        num_heads = hf.num_attention_heads
        attention_bias = bool(getattr(hf, "attention_bias", getattr(hf, "bias", False)))  # InternLM2's `bias`
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
            rope=_rope(hf),
            max_position_embeddings=hf.max_position_embeddings,
            tie_word_embeddings=bool(getattr(hf, "tie_word_embeddings", gemma)),
            qkv_bias=bool(getattr(hf, "qkv_bias", True)) if model_type == "qwen2_moe" else qwen2 or attention_bias,
            o_bias=attention_bias and not qwen2,
            mlp_bias=bool(getattr(hf, "mlp_bias", False)),
            qk_norm=_QK_NORMS.get(model_type),
            layer_windows=_layer_windows(hf),
            rope_layers=tuple(bool(r) for r in getattr(hf, "no_rope_layers", None) or ()),  # SmolLM3: 1 = RoPE
            hidden_act=act,
            norm_unit_offset=gemma,
            embed_scale=hf.hidden_size**0.5 if gemma else getattr(hf, "embedding_multiplier", None),
            norms=_NORMS.get(model_type, "pre"),
            residual_multiplier=getattr(hf, "residual_multiplier", 1.0),
            local_rope=_rope(hf, "sliding_attention") if model_type == "gemma3_text" else None,
            attn_logit_softcap=getattr(hf, "attn_logit_softcapping", None),
            final_logit_softcap=getattr(hf, "final_logit_softcapping", None),
            logits_scaling=getattr(hf, "logits_scaling", 1.0),
            query_pre_attn_scalar=getattr(hf, "query_pre_attn_scalar", None),
            attention_multiplier=getattr(hf, "attention_multiplier", None),
            fused_qkv=_FUSED_QKV.get(model_type),
            fused_gate_up=model_type == "phi3",
            **_moe_fields(hf),
            kernels=kernels,
        )


_QK_NORMS = {"qwen3": "head", "qwen3_moe": "head", "gemma3_text": "head", "olmo2": "projection"}
_NORMS = {"gemma2": "sandwich", "gemma3_text": "sandwich", "olmo2": "post"}
_FUSED_QKV = {"phi3": "stacked", "internlm2": "grouped"}


def _moe_fields(hf) -> dict:
    """Mixtral: every layer sparse, experts of `intermediate_size`, the top-k always renormalised. Qwen2/3-MoE:
    experts of `moe_intermediate_size`, layer i sparse when (i + 1) % `decoder_sparse_step` is 0 and i is not in
    `mlp_only_layers`, renormalised under `norm_topk_prob`; Qwen2-MoE's shared expert. Other families: dense."""
    model_type, layers = hf.model_type, hf.num_hidden_layers
    if model_type not in ("mixtral", "qwen2_moe", "qwen3_moe"):
        return {}
    mixtral = model_type == "mixtral"
    dense, step = set(getattr(hf, "mlp_only_layers", None) or ()), getattr(hf, "decoder_sparse_step", 1)
    return {
        "num_experts": hf.num_experts,  # Mixtral's `num_local_experts`
        "num_experts_per_tok": hf.num_experts_per_tok,
        "moe_intermediate_size": hf.intermediate_size if mixtral else hf.moe_intermediate_size,
        "norm_topk_prob": mixtral or bool(hf.norm_topk_prob),
        "shared_expert_intermediate_size": getattr(hf, "shared_expert_intermediate_size", 0) or 0,
        "sparse_layers": tuple(i not in dense and hf.num_experts > 0 and (i + 1) % step == 0 for i in range(layers)),
    }


def _rope(hf, layer_type: str | None = None) -> RopeConfig:
    """Of the families here only Phi-3 rotates part of each head: HF's other modules ignore a
    `partial_rotary_factor` (their default RoPE spans the head)."""
    rope = RopeConfig.from_hf(hf, layer_type=layer_type)
    return rope if hf.model_type == "phi3" else dataclasses.replace(rope, partial_rotary_factor=1.0)


def _layer_windows(hf) -> tuple[int | None, ...]:
    """Each layer's sliding window. Mistral and Phi-3 always honour `sliding_window`; Qwen2/3 and SmolLM3 only with
    `use_sliding_window`; Gemma 2/3 on their `layer_types`' sliding layers."""
    window = getattr(hf, "sliding_window", None)
    layers = hf.num_hidden_layers
    optional = ("qwen2", "qwen3", "qwen2_moe", "qwen3_moe", "smollm3")  # windows only under `use_sliding_window`
    if not window or (hf.model_type in optional and not getattr(hf, "use_sliding_window", False)):
        return ()
    if hf.model_type in ("mistral", "phi3", "mixtral"):
        return (int(window),) * layers
    types = getattr(hf, "layer_types", None) or ["sliding_attention"] * layers
    return tuple(int(window) if kind == "sliding_attention" else None for kind in types)


class Attention(nnx.Module):
    def __init__(self, cfg: DecoderConfig, layer: int, *, dtype, rngs: nnx.Rngs):
        self.cfg = cfg
        self.layer = layer
        h, d = cfg.hidden_size, cfg.head_dim
        if cfg.fused_qkv:
            rows = (cfg.num_heads + 2 * cfg.num_kv_heads) * d
            self.qkv_proj = Linear(h, rows, bias=cfg.qkv_bias, dtype=dtype, rngs=rngs, axes=("heads", None))
        else:
            self.q_proj = Linear(h, cfg.num_heads * d, bias=cfg.qkv_bias, dtype=dtype, rngs=rngs, axes=("heads", None))
            self.k_proj = Linear(
                h, cfg.num_kv_heads * d, bias=cfg.qkv_bias, dtype=dtype, rngs=rngs, axes=("kv_heads", None)
            )
            self.v_proj = Linear(
                h, cfg.num_kv_heads * d, bias=cfg.qkv_bias, dtype=dtype, rngs=rngs, axes=("kv_heads", None)
            )
        self.o_proj = Linear(cfg.num_heads * d, h, bias=cfg.o_bias, dtype=dtype, rngs=rngs, axes=(None, "heads"))
        if cfg.qk_norm:
            q_size, k_size = (d, d) if cfg.qk_norm == "head" else (cfg.num_heads * d, cfg.num_kv_heads * d)
            self.q_norm = RMSNorm(q_size, eps=cfg.rms_norm_eps, dtype=dtype, unit_offset=cfg.norm_unit_offset)
            self.k_norm = RMSNorm(k_size, eps=cfg.rms_norm_eps, dtype=dtype, unit_offset=cfg.norm_unit_offset)

    def __call__(self, x, cos, sin, batch: RaggedBatch | PackedBatch, kv_pages):
        cfg = self.cfg
        q, k, v = self._project(x)
        if cfg.qk_norm == "projection":
            q, k = self.q_norm(q), self.k_norm(k)
        t = x.shape[0]
        q = q.reshape(t, cfg.num_heads, cfg.head_dim)
        k = k.reshape(t, cfg.num_kv_heads, cfg.head_dim)
        v = v.reshape(t, cfg.num_kv_heads, cfg.head_dim)
        if cfg.qk_norm == "head":
            q, k = self.q_norm(q), self.k_norm(k)
        out, kv_pages = causal_attention(q, k, v, cos, sin, batch, kv_pages, cfg, self.layer)
        return self.o_proj(out.reshape(t, cfg.num_heads * cfg.head_dim)), kv_pages

    def _project(self, x: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        """q [T, heads * head_dim], k and v [T, kv_heads * head_dim]."""
        cfg = self.cfg
        if cfg.fused_qkv is None:
            return self.q_proj(x), self.k_proj(x), self.v_proj(x)
        qkv, t, d = self.qkv_proj(x), x.shape[0], cfg.head_dim
        if cfg.fused_qkv == "stacked":
            q_rows, kv_rows = cfg.num_heads * d, cfg.num_kv_heads * d
            return tuple(jnp.split(qkv, [q_rows, q_rows + kv_rows], axis=-1))
        group = cfg.num_heads // cfg.num_kv_heads
        qkv = qkv.reshape(t, cfg.num_kv_heads, group + 2, d)
        return qkv[:, :, :group].reshape(t, -1), qkv[:, :, group].reshape(t, -1), qkv[:, :, group + 1].reshape(t, -1)


def causal_attention(q, k, v, cos, sin, batch: RaggedBatch | PackedBatch, kv_pages, cfg: DecoderConfig, layer: int = 0):
    """RoPE (unless `cos` is None: a NoPE layer), then attention: over the paged cache for a generation step
    (RaggedBatch), or within each packed sequence, with no cache, for a one-shot pooling pass (PackedBatch)."""
    if cos is not None:
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
    window, soft_cap = cfg.layer_window(layer), cfg.attn_logit_softcap
    if isinstance(batch, PackedBatch):
        out = cfg.kernels.varlen_attention(
            q, k, v, batch.cu_seqlens, batch.num_seqs, sm_scale=cfg.sm_scale, causal=True, sliding_window=window,
            soft_cap=soft_cap,
        )  # fmt: skip
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
        sm_scale=cfg.sm_scale,
        sliding_window=window,
        soft_cap=soft_cap,
    )


class MLP(nnx.Module):
    def __init__(self, cfg: DecoderConfig, *, dtype, rngs: nnx.Rngs, intermediate_size: int | None = None):
        h, i, b = cfg.hidden_size, intermediate_size or cfg.intermediate_size, cfg.mlp_bias
        self.fused = cfg.fused_gate_up
        if self.fused:
            self.gate_up_proj = Linear(h, 2 * i, bias=b, dtype=dtype, rngs=rngs, axes=("mlp", None))
        else:
            self.gate_proj = Linear(h, i, bias=b, dtype=dtype, rngs=rngs, axes=("mlp", None))
            self.up_proj = Linear(h, i, bias=b, dtype=dtype, rngs=rngs, axes=("mlp", None))
        self.down_proj = Linear(i, h, bias=b, dtype=dtype, rngs=rngs, axes=(None, "mlp"))
        self.act = activation(cfg.hidden_act)

    def __call__(self, x):
        if self.fused:
            gate, up = jnp.split(self.gate_up_proj(x), 2, axis=-1)
        else:
            gate, up = self.gate_proj(x), self.up_proj(x)
        return self.down_proj(self.act(gate) * up)


def _mlp(cfg: DecoderConfig, layer: int, *, dtype, rngs: nnx.Rngs) -> nnx.Module:
    """The layer's MLP: dense, or on an MoE model's sparse layer the routed experts (with a shared expert, an MLP
    of `shared_expert_intermediate_size`, where the family has one)."""
    if not cfg.is_sparse(layer):
        return MLP(cfg, dtype=dtype, rngs=rngs)
    size = cfg.shared_expert_intermediate_size
    shared = MLP(cfg, dtype=dtype, rngs=rngs, intermediate_size=size) if size else None
    return SparseMoeBlock(cfg, dtype=dtype, rngs=rngs, shared_expert=shared)


class DecoderLayer(nnx.Module):
    """Attention then MLP, each added to the residual stream, with norms where `cfg.norms` puts them. The norm
    names are HF's: under "pre", `post_attention_layernorm` normalizes the MLP's input; under "sandwich" (Gemma 2/3)
    and "post" (OLMo 2) it is the attention output's norm, and the MLP's are `pre_feedforward_layernorm` (sandwich
    only) and `post_feedforward_layernorm`."""

    def __init__(self, cfg: DecoderConfig, layer: int, *, dtype, rngs: nnx.Rngs):
        def norm():
            return RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, dtype=dtype, unit_offset=cfg.norm_unit_offset)

        self.norms, self.residual_multiplier = cfg.norms, cfg.residual_multiplier
        if cfg.norms != "post":
            self.input_layernorm = norm()
        self.self_attn = Attention(cfg, layer, dtype=dtype, rngs=rngs)
        self.post_attention_layernorm = norm()
        if cfg.norms == "sandwich":
            self.pre_feedforward_layernorm = norm()
        if cfg.norms != "pre":
            self.post_feedforward_layernorm = norm()
        self.mlp = _mlp(cfg, layer, dtype=dtype, rngs=rngs)

    def __call__(self, x, cos, sin, batch: RaggedBatch, kv_pages):
        norms = self.norms
        attn, kv_pages = self.self_attn(x if norms == "post" else self.input_layernorm(x), cos, sin, batch, kv_pages)
        x = self._residual(x, attn if norms == "pre" else self.post_attention_layernorm(attn))
        if norms == "pre":
            return self._residual(x, self.mlp(self.post_attention_layernorm(x))), kv_pages
        mlp = self.mlp(self.pre_feedforward_layernorm(x) if norms == "sandwich" else x)
        return self._residual(x, self.post_feedforward_layernorm(mlp)), kv_pages

    def _residual(self, x: jax.Array, block: jax.Array) -> jax.Array:
        return x + (block if self.residual_multiplier == 1.0 else block * self.residual_multiplier)


class LlamaModel(nnx.Module):
    def __init__(self, cfg: DecoderConfig, *, dtype, rngs: nnx.Rngs):
        self.cfg = cfg
        self.embed_tokens = Embedding(cfg.vocab_size, cfg.hidden_size, dtype=dtype, rngs=rngs, axis="vocab")
        self.layers = nnx.List([DecoderLayer(cfg, i, dtype=dtype, rngs=rngs) for i in range(cfg.num_layers)])
        self.norm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, dtype=dtype, unit_offset=cfg.norm_unit_offset)

    def __call__(self, batch: RaggedBatch | PackedBatch, kv_pages: list[jax.Array] | None = None):
        """(hidden [T, H], the updated pages); pages are None for a packed, cache-free pass."""
        x = self.embed_tokens(batch.token_ids)
        if self.cfg.embed_scale is not None:  # Gemma: the scale rounded to the activations' dtype, as HF does
            x = x * jnp.asarray(self.cfg.embed_scale, x.dtype)
        cfg = self.cfg
        tables = cfg.rope.cos_sin(batch.positions, cfg.rotary_dim)
        local = cfg.local_rope.cos_sin(batch.positions, cfg.rotary_dim) if cfg.local_rope else tables
        new_pages = []
        for i, layer in enumerate(self.layers):
            cos, sin = (local if cfg.layer_window(i) else tables) if cfg.uses_rope(i) else (None, None)
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
    """Llama, Mistral, Qwen2/3, Gemma 1/2/3, Phi-3, Granite, OLMo 2 and SmolLM3 causal LMs, and the
    mixture-of-experts Mixtral and Qwen2/3-MoE (the differences live in `DecoderConfig`)."""

    def __init__(self, cfg: DecoderConfig, *, dtype=jnp.float32, rngs: nnx.Rngs):
        self.cfg = cfg
        self.model = LlamaModel(cfg, dtype=dtype, rngs=rngs)
        self.lm_head = (
            None
            if cfg.tie_word_embeddings
            else Linear(cfg.hidden_size, cfg.vocab_size, bias=False, dtype=dtype, rngs=rngs, axes=("vocab", None))
        )

    @classmethod
    def from_hf_config(
        cls, hf_config, *, dtype, rngs: nnx.Rngs, kernels: Kernels = REFERENCE_KERNELS
    ) -> LlamaForCausalLM:
        return cls(DecoderConfig.from_hf(hf_config, kernels), dtype=dtype, rngs=rngs)

    @staticmethod
    def derived_tensors(folder, hf_config):
        """An MoE checkpoint's per-expert weights stacked per layer at load (`moe.expert_tensors`); else none."""
        return expert_tensors(folder, hf_config)

    def logits(self, hidden: jax.Array) -> jax.Array:
        if self.lm_head is None:
            logits = self.model.embed_tokens.attend(hidden)
        else:
            logits = jnp.einsum("...h,vh->...v", hidden, self.lm_head.weight[...], preferred_element_type=jnp.float32)
        if self.cfg.logits_scaling != 1.0:
            logits = logits / self.cfg.logits_scaling
        cap = self.cfg.final_logit_softcap
        return logits if cap is None else cap * jnp.tanh(logits / cap)


class Gemma3ForConditionalGeneration(LlamaForCausalLM):
    """Gemma 3's multimodal checkpoints served text-only, as its text model: its tensors sit under
    `language_model.model.` as published (`model.language_model.` as transformers 5 saves them); the vision tower's
    are never read, and requests with images are refused by the chat front end."""

    CHECKPOINT_ALIASES = {"model.": ("language_model.model.", "model.language_model.")}


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
