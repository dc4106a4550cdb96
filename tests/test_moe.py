"""Mixture-of-experts decoders against HF transformers in float32: Mixtral (top-2 of 8, renormalised), Qwen2-MoE
(top-2 not renormalised, a sigmoid-gated shared expert, a dense layer) and Qwen3-MoE (top-4 renormalised, q/k
norms): logits over chunked prefill and decode steps on the paged cache, and greedy generation. Also the grouped
expert computation against a dense per-token reference under very uneven expert loads, which layers are sparse,
and checkpoints with experts stored apart or already stacked loading alike."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxserve.kernels_pallas import REFERENCE_KERNELS, select_kernels
from jaxserve.models.llama import MLP, DecoderConfig, LlamaForCausalLM
from jaxserve.models.moe import SparseMoeBlock, expert_tensors, grouped_experts, route
from jaxserve.weights import tensor_index

from .test_hf_parity import check_greedy_generation_matches_hf, check_logits_match_hf, jax_model

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

MOE_MODELS = ["tiny-mixtral", "tiny-qwen2-moe", "tiny-qwen3-moe"]
# These tiny MoE models are less well conditioned than the dense ones: HF's own float32 logits lie 1.1e-5
# (Mixtral) and 1.7e-5 (Qwen2-MoE) of the largest |logit| from float64's, ours 1.4e-5 and 1.2e-5; so the two
# float32 runs may differ by a little over the dense models' 2e-5.
MOE_ATOL = 5e-5


@pytest.mark.parametrize("name", MOE_MODELS)
def test_logits_match_hf_for_chunked_prefill_and_decode(tiny_models, name):
    check_logits_match_hf(tiny_models[name], REFERENCE_KERNELS, atol=MOE_ATOL)


# Qwen2-MoE's shared expert is in the logits test; the sampling path is every family's
@pytest.mark.parametrize("name", ["tiny-mixtral", "tiny-qwen3-moe"])
def test_greedy_generation_matches_hf_generate(tiny_models, make_llm, name):
    check_greedy_generation_matches_hf(tiny_models[name], make_llm(tiny_models[name]))


@pytest.mark.kernels
@pytest.mark.usefixtures("no_persistent_compile_cache")
def test_pallas_kernels_in_interpret_mode_match_hf(tiny_models):
    check_logits_match_hf(tiny_models["tiny-qwen3-moe"], select_kernels("interpret"), atol=MOE_ATOL)


def _dense_reference(x, ids, weights, gate_up, down) -> np.ndarray:
    """Each token through each of its experts one by one, in float64."""
    x, gate_up, down = (np.asarray(a, np.float64) for a in (x, gate_up, down))
    inter = down.shape[-1]
    out = np.zeros_like(x)
    for t in range(x.shape[0]):
        for e, w in zip(ids[t], weights[t]):
            gate, up = gate_up[e, :inter] @ x[t], gate_up[e, inter:] @ x[t]
            out[t] += w * (down[e] @ (gate / (1 + np.exp(-gate)) * up))
    return out


def test_grouped_experts_match_a_dense_reference_under_uneven_loads():
    """Expert 0 takes 35 of 40 tokens, expert 1 about half the second choices, expert 3 none at all; a token
    count that is no multiple of anything."""
    rng = np.random.default_rng(0)
    experts, hidden, inter, tokens = 8, 16, 12, 40
    x = rng.standard_normal((tokens, hidden)).astype(np.float32)
    gate_up = (0.3 * rng.standard_normal((experts, 2 * inter, hidden))).astype(np.float32)
    down = (0.3 * rng.standard_normal((experts, hidden, inter))).astype(np.float32)
    ids = np.stack(
        [np.where(np.arange(tokens) < 35, 0, 5), rng.choice([1, 2, 4, 6, 7], tokens, p=[0.5, 0.2, 0.1, 0.1, 0.1])],
        axis=1,
    ).astype(np.int32)
    weights = rng.uniform(0.1, 1.0, (tokens, 2)).astype(np.float32)
    counts = np.bincount(ids.ravel(), minlength=experts)
    assert counts[0] == 35 and counts[3] == 0 and counts.max() > 5 * np.median(counts[counts > 0][1:])

    run = jax.jit(lambda *a: grouped_experts(*a, jax.nn.silu))
    got = run(x, ids, weights, gate_up, down)
    expected = _dense_reference(x, ids, weights, gate_up, down)
    np.testing.assert_allclose(np.asarray(got), expected, rtol=1e-5, atol=1e-5 * np.abs(expected).max())
    # swapping a token's two slots (ids and weights together) changes nothing
    np.testing.assert_allclose(run(x, ids[:, ::-1], weights[:, ::-1], gate_up, down), got, rtol=1e-6, atol=1e-6)


def test_routing_is_softmax_top_k_optionally_renormalised():
    logits = np.array([[2.0, 1.0, 0.5, -1.0], [0.0, 3.0, 0.0, 2.5]], np.float32)
    probs = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    ids, weights = route(jnp.asarray(logits), 2, renormalize=False)
    assert ids.tolist() == [[0, 1], [1, 3]]
    np.testing.assert_allclose(weights, np.take_along_axis(probs, np.asarray(ids), 1), rtol=1e-6)
    _, renormalised = route(jnp.asarray(logits), 2, renormalize=True)
    np.testing.assert_allclose(renormalised, weights / weights.sum(-1, keepdims=True), rtol=1e-6)


def test_sparse_layers_follow_decoder_sparse_step_and_mlp_only_layers():
    shape = dict(hidden_size=16, num_attention_heads=2, num_key_value_heads=1, vocab_size=64, intermediate_size=24)
    qwen = transformers.Qwen2MoeConfig(
        **shape, num_hidden_layers=6, decoder_sparse_step=2, mlp_only_layers=[3], num_experts=4,
        num_experts_per_tok=2, moe_intermediate_size=8, shared_expert_intermediate_size=20,
    )  # fmt: skip
    cfg = DecoderConfig.from_hf(qwen)
    assert cfg.sparse_layers == (False, True, False, False, False, True)  # (i + 1) % 2 == 0, but not layer 3
    assert (cfg.num_experts, cfg.num_experts_per_tok, cfg.norm_topk_prob, cfg.qkv_bias) == (4, 2, False, True)
    model = nnx.eval_shape(lambda: LlamaForCausalLM(cfg, rngs=nnx.Rngs(0)))
    mlps = [layer.mlp for layer in model.model.layers]
    assert [type(m) for m in mlps] == [MLP, SparseMoeBlock, MLP, MLP, MLP, SparseMoeBlock]
    assert mlps[1].experts.gate_up_proj.shape == (4, 16, 16) and mlps[1].experts.down_proj.shape == (4, 16, 8)
    assert mlps[1].shared_expert.up_proj.weight.shape == (20, 16) and mlps[0].up_proj.weight.shape == (24, 16)

    mixtral = DecoderConfig.from_hf(transformers.MixtralConfig(**shape, num_hidden_layers=2, num_local_experts=4))
    assert mixtral.sparse_layers == (True, True) and mixtral.norm_topk_prob
    assert (mixtral.num_experts, mixtral.moe_intermediate_size, mixtral.shared_expert_intermediate_size) == (4, 24, 0)
    qwen3 = DecoderConfig.from_hf(transformers.Qwen3MoeConfig(**shape, num_hidden_layers=2, norm_topk_prob=True))
    assert qwen3.sparse_layers == (True, True) and qwen3.norm_topk_prob and qwen3.qk_norm and not qwen3.qkv_bias


@pytest.mark.parametrize("name", MOE_MODELS)
def test_stacked_expert_checkpoints_load_as_per_expert_ones(tiny_models, tmp_path, name):
    """transformers 5 writes each expert apart by default (`save_original_format`); the same weights saved as it
    holds them (`experts.gate_up_proj` / `experts.down_proj`, Mixtral's router under `mlp.`) load as they are."""
    folder = tiny_models[name]
    config = transformers.AutoConfig.from_pretrained(folder)
    per_expert = expert_tensors(folder, config)
    assert "model.layers.0.mlp.experts.gate_up_proj" in per_expert and "model.layers.0.mlp.gate.weight" in (
        per_expert if name == "tiny-mixtral" else tensor_index(folder)
    )
    hf = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    hf.save_pretrained(tmp_path, save_original_format=False)
    assert "model.layers.0.mlp.experts.gate_up_proj" in tensor_index(tmp_path)
    assert not expert_tensors(tmp_path, config)  # nothing to stack
    ours, fused = (
        nnx.to_flat_state(nnx.state(jax_model(folder))),
        dict(nnx.to_flat_state(nnx.state(jax_model(tmp_path)))),
    )
    assert len(ours) == len(fused)
    for path, value in ours:
        np.testing.assert_array_equal(np.asarray(value.get_value()), np.asarray(fused[path].get_value()), str(path))
