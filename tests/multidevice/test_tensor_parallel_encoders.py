"""Tensor parallelism of the encoder families beyond BERT, on forced CPU devices: the same outputs over two devices
as on one, with their projections split. ModernBERT (a packed Wqkv and a GeGLU Wi split by output rows, local
attention layers), gte's `new` model (bert_with_rope.py: rotary positions, a packed up_gate_proj, o_proj split by
input columns) and DeBERTa-v3 (the disentangled attention's relative-position tables, whose attention XLA
partitions rather than shard_map)."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from flax import nnx

pytestmark = pytest.mark.skipif(
    jax.device_count() < 2, reason="needs 2 devices: XLA_FLAGS=--xla_force_host_platform_device_count=8"
)

TEXTS = ["a tiny test sentence", "another one, a little longer", "x"]
# one token bucket (16) per engine keeps the compiles short; the texts take several steps of it
SMALL = {"max_model_len": 16, "max_num_batched_tokens": 16}


def _embeddings(llm) -> np.ndarray:
    return np.asarray([o.outputs.embedding for o in llm.embed(TEXTS, use_tqdm=False)])


def _probs(llm) -> np.ndarray:
    return np.asarray([o.outputs.probs for o in llm.classify(TEXTS, use_tqdm=False)])


# (model, its outputs, a projection and how two devices split its weight [out, in]: by "rows" or "columns")
FAMILIES = {
    "tiny-modernbert-embed": (_embeddings, "backbone.model.layers.0.attn.Wqkv.weight", "rows"),
    "tiny-gte-new": (_embeddings, "backbone.model.encoder.layer.0.attention.o_proj.weight", "columns"),
    "tiny-deberta-v3-classifier": (_probs, "backbone.deberta.encoder.layer.0.attention.self.query_proj.weight", "rows"),
}


@pytest.mark.parametrize("name", list(FAMILIES))
def test_encoder_family_over_two_devices_matches_one_device(name, tiny_models, make_pooling_llm):
    outputs, weight_name, split = FAMILIES[name]
    one = outputs(make_pooling_llm(tiny_models[name], **SMALL))
    llm = make_pooling_llm(tiny_models[name], tensor_parallel_size=2, **SMALL)
    np.testing.assert_allclose(outputs(llm), one, atol=1e-5)

    params = {".".join(map(str, path)): var.get_value() for path, var in nnx.to_flat_state(llm.engine.runner.params)}
    weight = params[weight_name]
    rows, columns = weight.shape
    expected = (rows // 2, columns) if split == "rows" else (rows, columns // 2)
    assert {shard.data.shape for shard in weight.addressable_shards} == {expected}
