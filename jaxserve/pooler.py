"""Poolers and heads on the device: what a pooling model computes from its hidden states, per task.

    embed           segment_pool (the model's mode) → sentence-transformers Dense layers → Matryoshka
                    truncation → L2 normalization                                              [S, E]
    classify        the classifier's row (CLS or last token) → the model's head → activation    [S, L]
    token_embed     every token (through bge-m3's ColBERT linear) → L2 normalization           [T, E_tok]
    token_classify  the per-token head (classifier, reward v_head, bge-m3's sparse linear)
                    → activation                                                                [T, L_tok]

Each task runs only when a sequence of the step asks for it (`lax.cond`), and the host copies back only the
outputs of the tasks present, so nothing but pooled rows (or token rows for token tasks) crosses PCIe.
Whether a sequence's output is activated (normalized) and its Matryoshka width are per-sequence inputs, so
one program per bucket serves every request.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from .kernels_pallas import REFERENCE_KERNELS, Kernels, truncate_and_normalize
from .models.batch import PackedBatch, RaggedBatch
from .models.layers import Linear, activation
from .pooling_params import TASKS
from .st_config import SentenceTransformersConfig, cross_encoder_activation
from .torch_pickle import load_torch_state_dict
from .weights import read_tensor, tensor_index

BGE_M3_HEADS = ("colbert_linear", "sparse_linear")
# --pooler-config keys vLLM accepts; those jaxserve does not implement yet are refused rather than ignored
POOLER_CONFIG_KEYS = (
    "task", "pooling_type", "seq_pooling_type", "tok_pooling_type", "use_activation", "normalize", "dimensions",
    "logit_mean", "logit_sigma", "enable_chunked_processing", "max_embed_len", "step_tag_id", "returned_token_ids",
)  # fmt: skip
NOT_YET: tuple[str, ...] = ()
TOKEN_POOLING_TYPES = ("ALL", "STEP")
ENGINE_SIDE = ("enable_chunked_processing", "max_embed_len")  # read by the engine, not the heads


def resolve_pooler_config(config: dict[str, Any] | None, defaults: dict[str, Any] | None = None) -> dict[str, Any]:
    """`--pooler-config` as vLLM reads it, in one spelling: `normalize` (the older name) → `use_activation`,
    `seq_pooling_type` → `pooling_type`, a token pooling (ALL: every token, or STEP) named by `pooling_type` →
    `tok_pooling_type` (left out when ALL, the default). `defaults` (a model class's `POOLER_DEFAULTS`, what vLLM's
    per-architecture config classes set) fill the keys the user left unset. ValueError for keys vLLM does not
    have, and for the ones jaxserve does not do yet."""
    config = dict(config or {})
    unknown = sorted(set(config) - set(POOLER_CONFIG_KEYS))
    if unknown:
        raise ValueError(f"Unknown pooler_config keys {unknown}; the known ones: {', '.join(POOLER_CONFIG_KEYS)}.")
    missing = [key for key in NOT_YET if config.get(key) not in (None, False)]
    if missing:
        raise ValueError(f"pooler_config {missing} are not supported by jaxserve yet.")
    if "normalize" in config:
        normalize = config.pop("normalize")
        config.setdefault("use_activation", normalize)
    if "seq_pooling_type" in config:
        config.setdefault("pooling_type", config.pop("seq_pooling_type"))
    if config.get("pooling_type") in TOKEN_POOLING_TYPES:  # vLLM's pooling_type also names the token pooling
        config.setdefault("tok_pooling_type", config.pop("pooling_type"))
    for key, value in (defaults or {}).items():
        config.setdefault(key, value)
    token_pooling = config.pop("tok_pooling_type", None)
    if token_pooling not in (None, *TOKEN_POOLING_TYPES):
        raise ValueError(f"tok_pooling_type {token_pooling!r} is not supported (ALL and STEP are).")
    if token_pooling == "STEP":
        config["tok_pooling_type"] = token_pooling
    step_tag = config.get("step_tag_id")
    if step_tag is not None and (not isinstance(step_tag, int) or isinstance(step_tag, bool)):
        raise ValueError(f"pooler_config step_tag_id must be a token id, got {step_tag!r}.")
    returned = config.get("returned_token_ids")
    if returned is not None and not (
        isinstance(returned, (list, tuple))
        and all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in returned)
    ):
        raise ValueError(f"pooler_config returned_token_ids must be a list of column indices, got {returned!r}.")
    if config.get("max_embed_len") is not None and not config.get("enable_chunked_processing"):
        raise ValueError("pooler_config max_embed_len needs enable_chunked_processing.")
    return {key: value for key, value in config.items() if key not in NOT_YET}


@dataclasses.dataclass(frozen=True)
class PoolerSpec:
    """Everything about a pooling model's heads that fixes the compiled programs (hashable, static)."""

    tasks: tuple[str, ...]
    default_task: str
    hidden_size: int
    embed_pooling: str | None  # segment_pool mode of `embed`
    classify_pooling: str | None  # the row the classifier reads (a segment_pool mode): "cls", "last" or "mean"
    dense: tuple[tuple[int, int, bool, str], ...]  # sentence-transformers Dense: (in, out, bias, activation)
    multi_vector: bool  # bge-m3: ColBERT and sparse linears over the token states
    num_labels: int
    classify_activation: str
    token_classify_activation: str
    include_prompt: bool
    matryoshka_dimensions: tuple[int, ...] | None
    is_matryoshka: bool
    logit_mean: float | None = None  # --pooler-config: classification logits become (logits - mean) / sigma
    logit_sigma: float | None = None
    # STEP pooling (--pooler-config, vLLM's StepPool): token tasks keep only the rows of the tokens equal to
    # `step_tag_id` (None: every row), and token_classify only the head's `returned_token_ids` columns (empty: all),
    # its activation then taken over those columns
    step_tag_id: int | None = None
    returned_token_ids: tuple[int, ...] = ()

    @property
    def embed_dim(self) -> int:
        return self.dense[-1][1] if self.dense else self.hidden_size

    @property
    def token_classify_dim(self) -> int:
        return 1 if self.multi_vector else len(self.returned_token_ids) or self.num_labels

    @property
    def token_embed_offset(self) -> int:
        """Rows left out at the start of each sequence's token embeddings (bge-m3's ColBERT drops [CLS])."""
        return 1 if self.multi_vector else 0

    def token_rows(self, task: str, rows: np.ndarray, token_ids: list[int]) -> np.ndarray:
        """A sequence's output for a token task from its rows (one per token id): bge-m3's ColBERT leaves out
        [CLS]; STEP pooling keeps the rows of the step tags only (a [0, dim] array when there is none, as vLLM)."""
        first = self.token_embed_offset if task == "token_embed" else 0
        rows = rows[first:]
        if self.step_tag_id is not None:
            rows = rows[np.asarray(token_ids[first:]) == self.step_tag_id]
        return rows

    def output_dim(self, task: str) -> int:
        return {
            "embed": self.embed_dim,
            "token_embed": self.hidden_size,
            "classify": self.num_labels,
            "token_classify": self.token_classify_dim,
        }[task]


def classification_activation(hf_config) -> str:
    """vLLM's rule: the sentence-transformers activation if the config names one, else by `problem_type`:
    regression → identity, multi-label → sigmoid, otherwise softmax (sigmoid for a single label)."""
    named = cross_encoder_activation(hf_config)
    if named:
        return named
    problem = getattr(hf_config, "problem_type", None)
    if problem == "regression":
        return "identity"
    if problem == "multi_label_classification" or hf_config.num_labels == 1:
        return "sigmoid"
    return "softmax"


def build_spec(
    model_class: type, hf_config, folder: Path, st: SentenceTransformersConfig | None, pooler_config: dict[str, Any]
) -> PoolerSpec:
    """The heads of a pooling model, from its class, its config, its sentence-transformers files and
    `--pooler-config` (`resolve_pooler_config`'s: pooling_type, task, logit_mean, logit_sigma, and STEP pooling's
    step_tag_id and returned_token_ids, which vLLM ignores unless tok_pooling_type is STEP)."""
    multi_vector = all((folder / f"{name}.pt").is_file() for name in BGE_M3_HEADS)
    classifies = hasattr(model_class, "classify")
    decoder = hasattr(hf_config, "rms_norm_eps")
    if classifies:
        tasks = ("classify", "token_classify")
    elif multi_vector:
        tasks = ("embed", "token_embed", "token_classify")
    elif hasattr(model_class, "token_classify"):
        tasks = ("token_classify",)  # token classifiers (a label per token) and reward models (a score per token)
    else:
        tasks = ("embed", "token_embed")

    default_pooling = "last" if decoder else "cls"
    override = pooler_config.get("pooling_type")
    embed_pooling = (override or "").lower() or (st.pooling_mode if st and st.pooling_mode else default_pooling)
    if "embed" in tasks and embed_pooling not in ("cls", "mean", "max", "last", "mean_sqrt_len"):
        raise ValueError(f"pooling_type {override!r} is not supported for embeddings (CLS, MEAN, LAST, MAX).")
    default_task = pooler_config.get("task") or next(t for t in TASKS if t in tasks)
    if default_task not in tasks:
        raise ValueError(f"Unsupported task: {default_task!r} Supported tasks: {tasks}")
    matryoshka = getattr(hf_config, "matryoshka_dimensions", None)
    labels = classifies or getattr(model_class, "TOKEN_LABELS", False)
    # the classifier's row: the model class's `classify_pooling(hf_config)` if it has one (ModernBERT's
    # classifier_pooling), else the last token of a decoder and the first ([CLS]) of an encoder
    named_pooling = getattr(model_class, "classify_pooling", None)
    classify_pooling = named_pooling(hf_config) if named_pooling else default_pooling
    activation_name = classification_activation(hf_config) if labels else "identity"
    num_labels = getattr(hf_config, "num_labels", 1) if labels else 1
    step = pooler_config.get("tok_pooling_type") == "STEP"
    returned = tuple(pooler_config.get("returned_token_ids") or ()) if step else ()
    token_activation = activation_name
    if returned:
        columns = num_labels if "token_classify" in tasks and not multi_vector else 0
        if max(returned) >= columns:
            raise ValueError(
                f"pooler_config returned_token_ids {list(returned)}: the model's token_classify head has "
                f"{columns} columns."
            )
        token_activation = "sigmoid" if len(returned) == 1 else "softmax"  # vLLM's, by the columns kept
    return PoolerSpec(
        tasks=tasks,
        default_task=default_task,
        hidden_size=hf_config.hidden_size,
        embed_pooling=embed_pooling if "embed" in tasks else None,
        classify_pooling=classify_pooling if classifies else None,
        dense=tuple((d.in_features, d.out_features, d.bias, d.activation) for d in (st.dense if st else ())),
        multi_vector=multi_vector,
        num_labels=num_labels,
        classify_activation=activation_name,
        token_classify_activation=token_activation,
        include_prompt=st.include_prompt if st else True,
        matryoshka_dimensions=tuple(matryoshka) if matryoshka else None,
        is_matryoshka=bool(matryoshka or getattr(hf_config, "is_matryoshka", False)),
        logit_mean=pooler_config.get("logit_mean"),
        logit_sigma=pooler_config.get("logit_sigma"),
        step_tag_id=pooler_config.get("step_tag_id") if step else None,
        returned_token_ids=returned,
    )


def classifier_from_tokens(folder: Path, hf_config, tokenizer) -> dict[str, np.ndarray]:
    """vLLM's `classifier_from_token` (through `--hf-overrides`, with the architecture set to a
    `*ForSequenceClassification`): a causal LM checkpoint served as a classifier whose head is its LM head's rows
    of those tokens. Two tokens (Qwen3-Reranker's ["no", "yes"]) make one label, the second's logit less the
    first's, so its sigmoid is the two-way softmax's probability of the second. Sets `num_labels`; returns the
    head as `score.weight`."""
    tokens = list(hf_config.classifier_from_token)
    ids = [tokenizer.hf.convert_tokens_to_ids(token) for token in tokens]
    unknown = [t for t, i in zip(tokens, ids) if i is None or i == tokenizer.hf.unk_token_id]
    if unknown:
        raise ValueError(f"classifier_from_token: {unknown} are not tokens of the model's vocabulary.")
    names = tensor_index(folder)
    head = "lm_head.weight" if "lm_head.weight" in names else "model.embed_tokens.weight"  # tied embeddings
    rows = read_tensor(folder, head)[ids].astype(np.float32)
    weight = rows[1:] - rows[:1] if len(ids) == 2 else rows
    hf_config.num_labels = weight.shape[0]
    return {"score.weight": weight}


def head_tensors(spec: PoolerSpec, folder: Path, st: SentenceTransformersConfig | None) -> dict[str, np.ndarray]:
    """Tensors of the heads that live outside the model's safetensors (ST Dense layers, bge-m3 .pt heads)."""
    tensors: dict[str, np.ndarray] = {}
    for i, layer in enumerate(st.dense if st else ()):
        tensors.update(layer.weights(i))
    if spec.multi_vector:
        for name in BGE_M3_HEADS:
            tensors.update({f"{name}.{k}": v for k, v in load_torch_state_dict(folder / f"{name}.pt").items()})
    return tensors


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class PoolingInputs:
    batch: PackedBatch
    tasks: jax.Array  # [S] int32, index into TASKS (-1 for padding)
    start_offsets: jax.Array  # [S] int32, prompt tokens left out of the pool (include_prompt=False)
    dimensions: jax.Array  # [S] int32, embedding width kept (Matryoshka)
    activate: jax.Array  # [S] bool, normalize / apply the classifier activation


def _activate(name: str, x: jax.Array) -> jax.Array:
    if name == "softmax":
        return jax.nn.softmax(x, axis=-1)
    if name == "sigmoid":
        return jax.nn.sigmoid(x)
    if name == "identity":
        return x
    return activation(name)(x)


class PoolingModel(nnx.Module):
    """A backbone (anything with `encode(PackedBatch) -> hidden`) and the heads its spec names. Checkpoint
    names of the backbone carry no `backbone.` prefix; ST Dense layers are `st_dense.{i}`."""

    def __init__(
        self, backbone: nnx.Module, spec: PoolerSpec, *, dtype, rngs: nnx.Rngs, kernels: Kernels = REFERENCE_KERNELS
    ):
        self.spec = spec
        self.backbone = backbone
        self.segment_pool = kernels.segment_pool
        self.st_dense = nnx.List([Linear(i, o, bias=b, dtype=dtype, rngs=rngs) for i, o, b, _ in spec.dense])
        if spec.multi_vector:
            h = spec.hidden_size
            self.colbert_linear = Linear(h, h, bias=True, dtype=dtype, rngs=rngs)
            self.sparse_linear = Linear(h, 1, bias=True, dtype=dtype, rngs=rngs)

    @property
    def checkpoint_aliases(self) -> dict[str, tuple[str, ...]]:
        inner = getattr(self.backbone, "CHECKPOINT_ALIASES", {})
        return {"backbone.": ("",), **{f"backbone.{k}": v for k, v in inner.items()}}

    def __call__(self, inputs: PoolingInputs) -> dict[str, jax.Array]:
        """A packed, cache-free pass: the backbone over whole sequences, then the heads."""
        return self.heads(self.backbone.encode(inputs.batch), inputs)

    def paged(
        self, batch: RaggedBatch, kv_pages: list[jax.Array], inputs: PoolingInputs
    ) -> tuple[dict[str, jax.Array], list[jax.Array]]:
        """A step of a causal backbone over the paged cache (`PagedDecoder`), then the heads over the step's
        tokens: `inputs.batch` is the step as packed segments (one per sequence, its new tokens)."""
        hidden, kv_pages = self.backbone(batch, kv_pages)
        return self.heads(hidden, inputs), kv_pages

    def heads(self, hidden: jax.Array, inputs: PoolingInputs) -> dict[str, jax.Array]:
        """The outputs of every task some sequence of the step asks for (zeros for the others)."""
        spec = self.spec
        heads = {
            "embed": self._embed,
            "classify": self._classify,
            "token_embed": self._token_embed,
            "token_classify": self._token_classify,
        }
        outputs = {}
        for task in spec.tasks:
            wanted = jnp.any(inputs.tasks == TASKS.index(task))
            shape = (hidden.shape[0] if task.startswith("token_") else inputs.tasks.shape[0], spec.output_dim(task))
            outputs[task] = jax.lax.cond(
                wanted, heads[task], lambda *_, shape=shape: jnp.zeros(shape, jnp.float32), hidden, inputs
            )
        return outputs

    def _embed(self, hidden: jax.Array, inputs: PoolingInputs) -> jax.Array:
        b, spec = inputs.batch, self.spec
        offsets = None if spec.include_prompt else inputs.start_offsets
        if not spec.dense:
            return self.segment_pool(
                hidden, b.cu_seqlens, b.num_seqs, mode=spec.embed_pooling, start_offsets=offsets,
                dimensions=inputs.dimensions, normalize=inputs.activate,
            )  # fmt: skip
        x = self.segment_pool(hidden, b.cu_seqlens, b.num_seqs, mode=spec.embed_pooling, start_offsets=offsets)
        for layer, (_, _, _, act) in zip(self.st_dense, spec.dense):
            x = _activate(act, layer(x.astype(hidden.dtype)).astype(jnp.float32))
        return truncate_and_normalize(x, inputs.dimensions, inputs.activate)

    def _classify(self, hidden: jax.Array, inputs: PoolingInputs) -> jax.Array:
        b = inputs.batch
        rows = self.segment_pool(hidden, b.cu_seqlens, b.num_seqs, mode=self.spec.classify_pooling)
        logits = self.backbone.classify(rows.astype(hidden.dtype))
        if self.spec.logit_mean is not None:
            logits = logits - self.spec.logit_mean
        if self.spec.logit_sigma is not None:
            logits = logits / self.spec.logit_sigma
        return jnp.where(inputs.activate[:, None], _activate(self.spec.classify_activation, logits), logits)

    def _token_embed(self, hidden: jax.Array, inputs: PoolingInputs) -> jax.Array:
        x = self.colbert_linear(hidden) if self.spec.multi_vector else hidden
        return truncate_and_normalize(x, normalize=_per_token(inputs.activate, inputs.batch))

    def _token_classify(self, hidden: jax.Array, inputs: PoolingInputs) -> jax.Array:
        if self.spec.multi_vector:
            return jax.nn.relu(self.sparse_linear(hidden)).astype(jnp.float32)
        logits = self.backbone.token_classify(hidden)
        if self.spec.returned_token_ids:  # STEP pooling: only these columns (the activation is over them)
            logits = logits[:, np.asarray(self.spec.returned_token_ids)]
        activated = _activate(self.spec.token_classify_activation, logits)
        return jnp.where(_per_token(inputs.activate, inputs.batch)[:, None], activated, logits)


def _per_token(flags: jax.Array, batch: PackedBatch) -> jax.Array:
    """A per-sequence flag spread over the sequence's tokens (padding tokens get False)."""
    t = jnp.arange(batch.token_ids.shape[0], dtype=jnp.int32)
    seq = jnp.searchsorted(batch.cu_seqlens[1:], t, side="right")
    real = t < batch.cu_seqlens[batch.num_seqs[0]]
    return real & flags[jnp.minimum(seq, flags.shape[0] - 1)]
