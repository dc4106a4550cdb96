"""Qwen2 reward models (published as remote code, reimplemented here): a Qwen2 backbone and a two-layer `score`
head (Linear(h, h) → ReLU → Linear(h, num_labels), both with bias) over every token, as vLLM serves them.

    Qwen2ForRewardModel         Qwen/Qwen2.5-Math-RM-72B: one reward per token (pooling ALL), raw by default
    Qwen2ForProcessRewardModel  Qwen/Qwen2.5-Math-PRM-7B: two labels, STEP pooling at `step_tag_id` (151651,
                                `<extra_0>`), softmax over the labels

vLLM fixes num_labels per architecture (1 and 2) whatever config.json says, and its per-architecture config
classes supply the pooler defaults (`POOLER_DEFAULTS`, under any `--pooler-config`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jaxserve.kernels_pallas import REFERENCE_KERNELS, Kernels

from .batch import PackedBatch
from .layers import Linear
from .llama import DecoderConfig, LlamaModel, PagedDecoder


class ReLU(nnx.Module):
    """The parameterless middle of `score` (it keeps the checkpoint's `score.0` / `score.2` numbering)."""

    def __call__(self, x: jax.Array) -> jax.Array:
        return jax.nn.relu(x)


class Qwen2ForRewardModel(PagedDecoder):
    """Per-token rewards: `score` over every final hidden state."""

    NUM_LABELS = 1
    TOKEN_LABELS = True  # the head's outputs are logits: sigmoid for one column, softmax for more
    POOLER_DEFAULTS = {"use_activation": False}  # vLLM's Qwen2ForRewardModelConfig

    def __init__(self, cfg: DecoderConfig, num_labels: int, *, dtype=jnp.float32, rngs: nnx.Rngs):
        self.cfg = cfg
        self.model = LlamaModel(cfg, dtype=dtype, rngs=rngs)
        h = cfg.hidden_size
        self.score = nnx.List(
            [
                Linear(h, h, bias=True, dtype=dtype, rngs=rngs),
                ReLU(),
                Linear(h, num_labels, bias=True, dtype=dtype, rngs=rngs),
            ]
        )

    @classmethod
    def from_hf_config(
        cls, hf_config, *, dtype, rngs: nnx.Rngs, kernels: Kernels = REFERENCE_KERNELS
    ) -> Qwen2ForRewardModel:
        return cls(DecoderConfig.from_hf(hf_config, kernels), cls.NUM_LABELS, dtype=dtype, rngs=rngs)

    @classmethod
    def verify_and_update_config(cls, hf_config) -> None:
        """vLLM fixes the labels per architecture, whatever config.json says."""
        hf_config.num_labels = cls.NUM_LABELS

    def encode(self, batch: PackedBatch) -> jax.Array:
        return self.model(batch)[0]

    def token_classify(self, hidden: jax.Array) -> jax.Array:
        for layer in self.score:
            hidden = layer(hidden)
        return hidden.astype(jnp.float32)


class Qwen2ForProcessRewardModel(Qwen2ForRewardModel):
    """Step rewards: the two-label head's softmax at each step tag (vLLM's default pooling for it is STEP)."""

    NUM_LABELS = 2
    POOLER_DEFAULTS = {"tok_pooling_type": "STEP", "step_tag_id": 151651}  # vLLM's Qwen2ForProcessRewardModelConfig
